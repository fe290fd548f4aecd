"""Experiment (GPU): the same forward+backward step timed three ways, ours and Flex, in
alternating order: do_bench as the benchmark runs it (L2 cleared before each step), CUDA
events around 20 back-to-back steps, and the sum of GPU kernel durations under
torch.profiler. Writes $OUT/timing_methods.json.

    PYTHONPATH=src python3 benchmarks/experiments/timing_methods.py
"""

import json
import os
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from triton.testing import do_bench

from blocksparse_attn.tools.bench_cases import Case
from blocksparse_attn.tools.bench_harness import _attention_fn


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    cases = [
        Case("dense", 8192, 4, 8, 128, 128),
        Case("causal_dense", 8192, 4, 8, 128, 128),
        Case("window_global", 16384, 2, 8, 128, 64),
    ]
    rows = []
    for case in cases:
        layout = case.layout()
        torch.manual_seed(0)
        q, k, v = (
            torch.randn(
                case.batch,
                case.heads,
                case.seq_len,
                case.head_dim,
                device="cuda",
                dtype=torch.bfloat16,
                requires_grad=True,
            )
            for _ in range(3)
        )
        do = torch.randn_like(q)
        fns = {b: _attention_fn(b, case, layout, "cuda") for b in ("fused", "flex")}
        for rnd in range(2):
            for backend in ("fused", "flex") if rnd == 0 else ("flex", "fused"):
                fn = fns[backend]

                def step():
                    torch.autograd.grad(fn(q, k, v), (q, k, v), do)

                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                row = {"case": case.name, "backend": backend, "round": rnd}
                row["do_bench_ms"] = do_bench(step, warmup=25, rep=100, return_mode="median")
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                for _ in range(20):
                    step()
                end.record()
                torch.cuda.synchronize()
                row["events_ms"] = start.elapsed_time(end) / 20
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
                    for _ in range(10):
                        step()
                    torch.cuda.synchronize()
                per = defaultdict(float)
                spans = []
                for evt in p.events():
                    if evt.device_type == DeviceType.CUDA:
                        per[evt.name[:60]] += evt.time_range.elapsed_us() / 1e4
                        spans.append((evt.time_range.start, evt.time_range.end))
                # first kernel start to last kernel end, per step (gaps between kernels count)
                row["span_ms"] = (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e4
                row["kernels_ms"] = sum(per.values())
                row["per_kernel_ms"] = dict(per)
                print(json.dumps(row), flush=True)
                rows.append(row)
                with open(os.path.join(out_dir, "timing_methods.json"), "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
