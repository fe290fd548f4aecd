"""Experiment (two GPUs): forward+backward of window_global attention (B1 H16 D64, block
128, bf16) on one GPU at L = 2M tokens, then split across both GPUs at L = 4M with each
context-parallel strategy: median step time, tokens per second per GPU, peak memory per
GPU. Writes $OUT/context_parallel_scale.json from rank 0.

    torchrun --nproc-per-node 2 benchmarks/experiments/context_parallel_scale.py
"""

import json
import os
import time

import torch
import torch.distributed as dist

from blocksparse_attn import block_sparse_attention
from blocksparse_attn.distributed import context_parallel_attention
from blocksparse_attn.tools.bench_cases import pattern_layout

H, D, BLOCK = 16, 64, 128


def timed(step, reps: int = 5) -> float:
    """Median wall time of ``step`` in ms, every rank synchronised around each run."""
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[reps // 2]


def main() -> None:
    dist.init_process_group("nccl")
    rank, P = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    rows = []
    one = 1 << 21  # 2M tokens on one GPU
    if rank == 0:
        # on the GPU, as context_parallel_attention keeps its per-rank layouts: the check that
        # a layout was not edited compares it on its device each call, and on the host
        # under torchrun (one OpenMP thread) that comparison alone took longer than the step
        layout = pattern_layout("window_global", one, BLOCK).cuda()
        q, k, v, g = (
            torch.randn(1, H, one, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)
        )
        for t in (q, k, v):
            t.requires_grad_()

        def single():
            out = block_sparse_attention(q, k, v, layout, block=BLOCK)
            torch.autograd.grad(out, (q, k, v), g)

        single()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            single()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        ms = sorted(times)[2]
        rows.append(
            {
                "gpus": 1,
                "seq_len": one,
                "ms": ms,
                "tokens_per_s_per_gpu": one / ms * 1e3,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del q, k, v, g
        torch.cuda.empty_cache()
    dist.barrier()
    L = one * P
    layout = pattern_layout("window_global", L, BLOCK)
    S = L // P
    q, k, v, g = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    for strategy in ("all_to_all", "kv_exchange"):

        def step():
            out = context_parallel_attention(q, k, v, layout, block=BLOCK, strategy=strategy)
            torch.autograd.grad(out, (q, k, v), g)

        step()
        torch.cuda.reset_peak_memory_stats()
        ms = timed(step)
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device="cuda")
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rows.append(
            {
                "gpus": P,
                "seq_len": L,
                "strategy": strategy,
                "ms": ms,
                "tokens_per_s_per_gpu": L / P / ms * 1e3,
                "peak_gib_max_rank": float(peak),
            }
        )
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    if rank == 0:
        out = os.environ.get("OUT", ".")
        with open(os.path.join(out, "context_parallel_scale.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
