"""Experiment (GPU): where the packed documents' step loses to the padded batch. The bench
varlen case (16 documents packed to 131072 tokens, H16 D128, block 64, causal window_global
per document, bf16, forward+backward): the packed step (its batch seen before) and the
padded batch of the same documents, each timed by wall clock over unsynchronised calls,
then profiled over 5 calls with torch.profiler: every GPU kernel's total time and count,
the sum of kernel time per step beside the step's wall time (the rest is the GPU waiting
for the host). Writes $OUT/varlen_profile.json and prints the tables.

    PYTHONPATH=src python3 benchmarks/experiments/varlen_profile.py
"""

import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from blocksparse_attn.tools.bench_serving import varlen_steps

CALLS = 5


def wall_ms(fn, calls: int = 10) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def kernels(fn) -> tuple[list[dict], float]:
    """GPU kernels of ``CALLS`` calls: ``(rows, kernel ms per call)``, rows by total time."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        total = e.device_time_total / 1e3  # ms over every call
        if total > 0:
            rows.append({"kernel": e.key[:90], "count": e.count // CALLS, "ms": total / CALLS})
    rows.sort(key=lambda r: -r["ms"])
    return rows, sum(r["ms"] for r in rows)


def main() -> None:
    steps = varlen_steps()
    result = {"lengths": steps["lengths"]}
    for name in ("packed", "padded"):
        fn = steps[name]
        for _ in range(3):  # compile, tune, cache the packing and the index
            fn()
        wall = wall_ms(fn)
        rows, kernel_ms = kernels(fn)
        result[name] = {"wall_ms": wall, "kernel_ms": kernel_ms, "kernels": rows}
        print(f"{name}: wall {wall:.2f} ms per step, kernels {kernel_ms:.2f} ms", flush=True)
        for r in rows[:15]:
            print(f"  {r['ms']:8.3f} ms  x{r['count']:<4d} {r['kernel']}", flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "varlen_profile.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
