"""Experiment (Hopper, sm90): versions of ``kernels/sm90_bwd.py`` against the library's, in
one process: each version's ``sm90_dkdvdq`` (the ``deterministic=False`` backward) on
the same inputs, its largest difference from the library's dQ, dK and dV, its kernel's
CUDA time (profiler) and its time replayed from a CUDA graph (the bench's ``graph_ms``
with its median timer), every version timed twice in turn. ``VARIANTS``: ``name=path``
pairs, comma-separated, each a copy of that file (e.g. ``git show
BRANCH:src/blocksparse_attn/kernels/sm90_bwd.py > /tmp/BRANCH.py``). Prints one JSON line
a case.

    VARIANTS=producer=/tmp/p.py,barrier=/tmp/b.py PYTHONPATH=src \\
        python3 benchmarks/experiments/sm90_bwd_variants.py
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch
from hopper_bwd import _kernel_ms  # beside this script

from blocksparse_attn.index import get_index
from blocksparse_attn.kernels import sm90_bwd
from blocksparse_attn.kernels._common import schedule_args
from blocksparse_attn.kernels.fused_fwd import fused_attention_forward
from blocksparse_attn.tools.bench_cases import pattern_layout
from blocksparse_attn.tools.bench_harness import gpu_median_ms, graph_ms

CASES = [  # name, pattern, density, L, B, H, causal
    ("dense L8192 B4 H8", "dense", None, 8192, 4, 8, False),
    ("causal L8192 B4 H8", "dense", None, 8192, 4, 8, True),
    ("random 11% L8192 B4 H8", "random", 0.11, 8192, 4, 8, False),
    ("random 30% L8192 B4 H8", "random", 0.30, 8192, 4, 8, False),
    ("window_global L16384 B2 H8", "window_global", None, 16384, 2, 8, False),
]


def _variants() -> dict:
    found = {"library": sm90_bwd}
    for pair in filter(None, os.environ.get("VARIANTS", "").split(",")):
        name, path = pair.split("=", 1)
        spec = importlib.util.spec_from_file_location(
            f"blocksparse_attn.kernels._variant_{name}", path
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[name] = module
    return found


def main() -> None:
    variants = _variants()
    for label, pattern, density, L, B, H, causal in CASES:
        torch.manual_seed(0)
        q, k, v, go = (
            torch.randn(B, H, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)
        )
        layout = pattern_layout(pattern, L, 128, density).cuda()
        scale = 128**-0.5
        out, lse = fused_attention_forward(q, k, v, layout, block=128, scale=scale, causal=causal)
        delta = (out.float() * go.float()).sum(-1)
        index = get_index(layout, 128, q_len=L, k_len=L, tile_m=128, tile_n=128, causal=causal)
        args = (q, k, v, go, lse, delta, index, schedule_args(layout, index, B, H))
        kw = dict(causal=causal, scale=scale)
        want = sm90_bwd.sm90_dkdvdq(*args, **kw)
        row = dict(case=label)
        for name, module in variants.items():
            got = module.sm90_dkdvdq(*args, **kw)
            for grad, x, y in zip(("dq", "dk", "dv"), got, want):
                row[f"{name}_{grad}_diff"] = float((x.float() - y.float()).abs().max())
        for turn in (1, 2):
            for name, module in variants.items():

                def step(module=module):
                    return module.sm90_dkdvdq(*args, **kw)

                kernel = _kernel_ms(step, {"t": "_sm90_dkdvdq"})["t"]
                row[f"{name}_kernel_ms_{turn}"] = kernel
                row[f"{name}_graph_ms_{turn}"] = graph_ms(step, gpu_median_ms)
        print(json.dumps(row), flush=True)
    print("card:", torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
