"""Experiment (GPU): where a decoding step's time goes. The bench decode case (B8, context
131072, H32 over 8 kv heads, D128, block 64, window_global as trusted block lists made once):
the whole ``block_sparse_decode`` call and the decoding kernels alone, each timed by wall
clock over 200 unsynchronised calls, by ``do_bench`` eagerly and replayed from a CUDA graph;
then a torch.profiler table of 20 calls (host time per operation, GPU time per kernel).
Prints to stdout.

    PYTHONPATH=src python3 benchmarks/experiments/decode_profile.py
"""

import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from blocksparse_attn import KVBlocks, block_sparse_decode
from blocksparse_attn.kernels.decode import decode_attention
from blocksparse_attn.tools.bench_cases import pattern_layout
from blocksparse_attn.tools.bench_harness import graph_ms

B, CONTEXT, H, H_KV, D, BLOCK = 8, 131072, 32, 8, 128, 64


def timer(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def wall_us(fn, calls: int = 200) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    dev = "cuda"
    q = torch.randn(B, 1, H, D, device=dev).bfloat16()
    k_cache = torch.randn(B, CONTEXT, H_KV, D, device=dev).bfloat16()
    v_cache = torch.randn_like(k_cache)
    lengths = torch.full((B,), CONTEXT, dtype=torch.int32, device=dev)
    made = KVBlocks.from_layout(pattern_layout("window_global", CONTEXT, BLOCK).to(dev))
    lists = KVBlocks(made.num_blocks, made.indices, trusted=True)
    # the pattern's lists, from which the kernel picks the newest token's row
    num, idx = made.num_blocks, made.indices
    print("num", num[0, :, -1].tolist(), "width", idx.shape)

    def step():
        return block_sparse_decode(q, k_cache, v_cache, lengths, lists, block=BLOCK)

    def kernels():
        return decode_attention(
            q[:, 0], k_cache, v_cache, lengths, num, idx, block=BLOCK, scale=D**-0.5
        )

    step(), kernels()
    print("step wall us", wall_us(step))
    print("kernels wall us", wall_us(kernels))
    print("step do_bench ms", timer(step))
    print("kern do_bench ms", timer(kernels))
    print("step graph ms", graph_ms(step, timer))
    print("kern graph ms", graph_ms(kernels, timer))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
