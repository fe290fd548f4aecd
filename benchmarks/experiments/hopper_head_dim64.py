"""Experiment (Hopper, sm90): the Gluon kernels at head dim 64, which the library sends to
the Triton kernels (``SM90_FORWARD_HEAD_DIMS``, ``SM90_BACKWARD_HEAD_DIMS`` in
``kernels/availability.py``).

Each case runs up to four ways in one process: both directions on the Triton kernels, the
Gluon forward before the Triton backward (the library's choice at head dim 64 since v20),
the Gluon backward behind the Triton forward, and both directions on the Gluon kernels;
each way with the deterministic backward and with ``deterministic=False``, timed as
``bench`` times them (eager ``ms`` and ``graph_ms``, CUDA graph replay). Before timing, the
gradients of each way are compared with the first way's on a small problem (largest
absolute difference). ``WAYS`` (comma-separated names) runs only those. Prints one JSON
line a row and writes ``$OUT/hopper_head_dim64.json``.

    PYTHONPATH=src python3 benchmarks/experiments/hopper_head_dim64.py [name part ...]
"""

from __future__ import annotations

import json
import os
import sys

import torch

from blocksparse_attn import block_sparse_attention
from blocksparse_attn.kernels import availability
from blocksparse_attn.tools.bench_cases import Case, pattern_layout
from blocksparse_attn.tools.bench_harness import time_backend

CASES = [
    Case("dense", 8192, 4, 16, 64, 128),
    Case("causal_dense", 8192, 4, 16, 64, 128),
    Case("random", 8192, 4, 16, 64, 128, density=0.11),
    Case("window_global", 16384, 2, 16, 64, 128),
]
WAYS = {  # name: (forward head dims, backward head dims) the Gluon kernels take
    "triton": ((128,), (128,)),
    "gluon_fwd": ((64, 128), (128,)),
    "gluon_bwd": ((128,), (64, 128)),
    "gluon_both": ((64, 128), (64, 128)),
}
if os.environ.get("WAYS"):
    WAYS = {name: WAYS[name] for name in os.environ["WAYS"].split(",")}


def _use(way: str) -> None:
    availability.SM90_FORWARD_HEAD_DIMS, availability.SM90_BACKWARD_HEAD_DIMS = WAYS[way]


def _gradients(way: str, deterministic: bool) -> list[torch.Tensor]:
    _use(way)
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    layout = pattern_layout("random", 1024, 128, 0.4)
    out = block_sparse_attention(q, k, v, layout, block=128, deterministic=deterministic)
    return list(torch.autograd.grad(out, (q, k, v), torch.randn_like(out)))


def main(match: list[str]) -> None:
    rows = []
    for deterministic in (True, False):
        first = _gradients(next(iter(WAYS)), deterministic)
        for way in WAYS:
            grads = _gradients(way, deterministic)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(first, grads))
            row = dict(check="gradients", way=way, deterministic=deterministic, max_diff=diff)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for case in [c for c in CASES if not match or any(m in c.name for m in match)]:
        layout = case.layout()
        for way in WAYS:
            _use(way)
            # these forwards are those of triton and gluon_fwd: timed there
            same_forward = way in ("gluon_bwd", "gluon_both")
            for backend in ("fused", "fused_nondet"):
                for mode in ("fwd", "fwd+bwd"):
                    if mode == "fwd" and (backend == "fused_nondet" or same_forward):
                        continue  # the same forward as another row
                    r = time_backend(backend, case, layout, mode, torch.bfloat16)
                    row = dict(case=case.name, way=way, backend=backend, mode=mode)
                    row.update({k: r.get(k) for k in ("ms", "graph_ms", "tflops", "error")})
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "hopper_head_dim64.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f)


if __name__ == "__main__":
    main(sys.argv[1:])  # optional: substrings of the case names to run
