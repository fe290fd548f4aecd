"""Experiment (GPU): do window_global's long lists (global rows in the forward and dQ, global
columns in dK/dV) set the critical path? Times the forward and the whole backward on three
layouts per case: the full pattern, its band alone, and its global rows/columns alone (a few
long lists: their time is about one long list's run). Writes $OUT/long_lists.json.

    PYTHONPATH=src python3 benchmarks/experiments/long_lists.py
"""

import json
import os

import torch
import triton

from blocksparse_attn.kernels.fused_bwd import fused_attention_backward
from blocksparse_attn.kernels.fused_fwd import fused_attention_forward
from blocksparse_attn.tools.bench_cases import Case


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    cases = [
        Case("window_global", 16384, 2, 8, 128, 128),
        Case("window_global", 16384, 2, 8, 128, 64),
        Case("window_global", 16384, 2, 8, 128, 32),
        Case("window_global", 4096, 8, 8, 128, 64),
        Case("window_global", 4096, 8, 16, 64, 64),
    ]
    rows = []
    for case in cases:
        full = case.layout()
        nb = full.shape[-1]
        half = max(1, 256 // case.block)
        g = max(1, 128 // case.block)
        band = torch.ones(nb, nb, dtype=torch.bool).triu(-half).tril(half).unsqueeze(0)
        glob = torch.zeros(1, nb, nb, dtype=torch.bool)
        glob[:, :g, :] = True
        glob[:, :, :g] = True
        torch.manual_seed(0)
        shape = (case.batch, case.heads, case.seq_len, case.head_dim)
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        kw = dict(block=case.block, scale=case.head_dim**-0.5)
        for name, lay in (("full", full), ("band", band), ("global", glob)):
            lay = lay.cuda()
            o, lse = fused_attention_forward(q, k, v, lay, **kw)
            fwd = triton.testing.do_bench(
                lambda: fused_attention_forward(q, k, v, lay, **kw), warmup=25, rep=200
            )
            bwd = triton.testing.do_bench(
                lambda: fused_attention_backward(do, q, k, v, o, lse, lay, **kw), warmup=25, rep=200
            )
            row = {
                "case": case.name,
                "layout": name,
                "nnz": int(lay.sum()),
                "fwd_ms": fwd,
                "bwd_ms": bwd,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(os.path.join(out_dir, "long_lists.json"), "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
