"""Experiment (GPU host): host time to issue one ``block_sparse_attention`` call against
the GPU time of its kernels, block 128, bf16. ``CASE=random`` (default: random 1% plus the
diagonal, L8192 B2 H8 D128) or ``CASE=window`` (window_global L16384 B2 H8 D128, the bench
row).

For the layout on the CPU (as ``bench`` passes it) and on the GPU, forward and
forward+backward: the host time of 50 calls issued without synchronising, their wall time
once synchronised, the CUDA time of the kernels of one call (``torch.profiler``) with the
largest kernels, and, unless ``PROFILE=0``, cProfile's view of 20 calls (cumulative, then
own time). Last, ``do_bench``'s median of each. Prints to standard output.

    CASE=window PYTHONPATH=src python3 benchmarks/experiments/host_issue.py
"""

import cProfile
import io
import os
import pstats
import time

import torch
from triton.testing import do_bench

from blocksparse_attn import block_sparse_attention
from blocksparse_attn.tools.bench_cases import pattern_layout

torch.manual_seed(0)
CASE = os.environ.get("CASE", "random")
PROFILE = os.environ.get("PROFILE", "1") == "1"
if CASE == "random":
    B, H, L, D, BLOCK = 2, 8, 8192, 128, 128
    nb = L // BLOCK
    LAYOUT = (torch.rand(H, nb, nb) < 0.01).long()
    LAYOUT[:, torch.arange(nb), torch.arange(nb)] = 1
else:
    B, H, L, D, BLOCK = 2, 8, 16384, 128, 128
    LAYOUT = pattern_layout("window_global", L, BLOCK)
q, k, v = (
    torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(3)
)
grad_out = torch.randn_like(q)


def step(layout, grad):
    out = block_sparse_attention(q, k, v, layout, block=BLOCK)
    if grad:
        torch.autograd.grad(out, (q, k, v), grad_out)


def report(name, layout, grad):
    for _ in range(5):
        step(layout, grad)
    torch.cuda.synchronize()
    n = 50
    t = time.perf_counter()
    for _ in range(n):
        step(layout, grad)
    host = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            step(layout, grad)
        torch.cuda.synchronize()
    gpu = sum(e.device_time_total for e in p.key_averages()) / 10 / 1e3
    print(
        f"{name} grad={grad}: host issue {host:.3f} ms/step, wall {wall:.3f}, "
        f"gpu kernels {gpu:.3f}",
        flush=True,
    )
    for e in sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:12]:
        print(f"    {e.key[:70]:70s} {e.device_time_total / 10 / 1e3:.3f} ms x{e.count / 10:.0f}")
    if not PROFILE:
        return
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        step(layout, grad)
    torch.cuda.synchronize()
    prof.disable()
    for order, lines in (("cumulative", 45), ("tottime", 25)):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(order).print_stats(lines)
        print(s.getvalue()[:9000])


def main() -> None:
    for name, layout in (("cpu-layout", LAYOUT), ("cuda-layout", LAYOUT.cuda())):
        for grad in (False, True):
            report(name, layout, grad)
    for grad in (False, True):
        ms = do_bench(lambda: step(LAYOUT, grad), warmup=25, rep=100, return_mode="median")
        print(f"do_bench {CASE} grad={grad}: {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
