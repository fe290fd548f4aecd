"""Experiment (Hopper, sm90): the library's backward on the Hopper kernels against the
Triton kernels (``BLOCKSPARSE_ATTN_SM90=0``), on layouts whose global rows and columns the
index cuts into parts (window_global, BigBird) and on layouts it does not cut (dense,
random).

For each case and backward (Hopper deterministic, Hopper ``deterministic=False``, Triton):
the CUDA time of every kernel one ``torch.autograd.grad`` through
``block_sparse_attention`` runs (the backward alone, under ``torch.profiler``), and the
wall time of such a call with its host work (mean of 20 calls, synchronised at the
end). Writes ``$OUT/hopper_bwd_library.json``.

    python3 benchmarks/experiments/hopper_bwd_library.py
"""

from __future__ import annotations

import os

import torch
from hopper_bwd import _kernel_ms, write_rows  # beside this script
from varlen_profile import wall_ms

from blocksparse_attn import BigBirdSparsityConfig, block_sparse_attention
from blocksparse_attn.tools.bench_cases import pattern_layout


def _layout(pattern: str, L: int, H: int, density) -> torch.Tensor:
    if pattern == "bigbird":
        config = BigBirdSparsityConfig(num_heads=H, block=128, num_random_blocks=3, seed=0)
        return config.make_layout(L)
    return pattern_layout(pattern, L, 128, density)


def main() -> None:
    cases = [  # name, pattern, density, L, B, H
        ("window_global L16384 B2 H8", "window_global", None, 16384, 2, 8),
        ("bigbird 6% L16384 B2 H8", "bigbird", None, 16384, 2, 8),
        ("random 11% L8192 B4 H8", "random", 0.11, 8192, 4, 8),
        ("dense L8192 B4 H8", "dense", None, 8192, 4, 8),
    ]
    backwards = {  # name: (BLOCKSPARSE_ATTN_SM90, deterministic)
        "hopper": ("1", True),
        "hopper_nondet": ("1", False),
        "triton": ("0", True),
    }
    rows = []
    for label, pattern, density, L, B, H in cases:
        torch.manual_seed(0)
        q, k, v = (
            torch.randn(B, H, L, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad_out = torch.randn(B, H, L, 128, device="cuda", dtype=torch.bfloat16)
        layout = _layout(pattern, L, H, density).cuda()
        row = dict(case=label, density=float(layout.float().mean()))
        grads = {}
        for name, (sm90, deterministic) in backwards.items():
            os.environ["BLOCKSPARSE_ATTN_SM90"] = sm90
            out = block_sparse_attention(q, k, v, layout, block=128, deterministic=deterministic)

            def step(out=out):
                return torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)

            grads[name] = step()
            row[f"{name}_kernels_ms"] = _kernel_ms(step, {"all": ""})["all"]
            row[f"{name}_call_ms"] = wall_ms(step, 20)  # warmed up by the profiled steps
        os.environ["BLOCKSPARSE_ATTN_SM90"] = "1"
        for name in ("hopper", "hopper_nondet"):
            row[f"{name}_max_diff"] = max(
                float((a.float() - b.float()).abs().max())
                for a, b in zip(grads[name], grads["triton"])
            )
        rows.append(row)
        print(row, flush=True)
    write_rows("hopper_bwd_library", rows)


if __name__ == "__main__":
    main()
