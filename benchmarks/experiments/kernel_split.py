"""Experiment (GPU): where forward+backward time goes, kernel by kernel, for ours, Flex and
cuDNN on the block-128 anchors (torch.profiler, GPU kernel durations averaged per step).
Writes $OUT/kernel_split.json.

    PYTHONPATH=src python3 benchmarks/experiments/kernel_split.py
"""

import json
import os
from collections import defaultdict

import torch
from torch.autograd import DeviceType

from blocksparse_attn.tools.bench_cases import Case
from blocksparse_attn.tools.bench_harness import _attention_fn


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    cases = [
        Case("dense", 8192, 4, 8, 128, 128),
        Case("causal_dense", 8192, 4, 8, 128, 128),
        Case("dense", 8192, 4, 16, 64, 128),
        Case("window_global", 16384, 2, 8, 128, 64),
    ]
    STEPS = 10
    rows = []
    for case in cases:
        layout = case.layout()
        for backend in ("fused", "flex", "sdpa_cudnn"):
            if backend == "sdpa_cudnn" and case.pattern != "dense":
                continue
            fn = _attention_fn(backend, case, layout, "cuda")
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

            def step():
                out = fn(q, k, v)
                out.backward(do)
                q.grad = k.grad = v.grad = None

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(STEPS):
                    step()
                torch.cuda.synchronize()
            per_kernel = defaultdict(float)
            for evt in prof.events():
                if evt.device_type == DeviceType.CUDA:
                    per_kernel[evt.name[:90]] += evt.time_range.elapsed_us() / 1e3 / STEPS
            row = {
                "case": case.name,
                "backend": backend,
                "total_ms": sum(per_kernel.values()),
                "kernels_ms": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8]),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(os.path.join(out_dir, "kernel_split.json"), "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
