"""Experiment (GPU): do window_global's long lists (global rows in the forward and dQ, global
columns in dK/dV) set the critical path? Times the forward and the whole backward on three
layouts per case: the full pattern, its band alone, and its global rows/columns alone (a few
long lists: their time is about one long list's run). Writes $OUT/long_lists.json.

With ``--long``: the one-GPU problem at 2M tokens (B1 H16 D64, block 128) beside what each
rank computes under context parallelism's all-to-all at 4M tokens on two GPUs (the whole
sequence for half the heads, B1 H8): the same work, but each global row and column twice as
long. If the long lists set the critical path, the 4M case runs longer than the 2M case,
and by about its global layout's time.

With ``--full``: the full layout only (a before/after check of one source tree).

    PYTHONPATH=src python3 benchmarks/experiments/long_lists.py [--long] [--full]
"""

import json
import os
import sys

import torch
import triton

from blocksparse_attn.kernels.fused_bwd import fused_attention_backward
from blocksparse_attn.kernels.fused_fwd import fused_attention_forward
from blocksparse_attn.tools.bench_cases import Case


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    long = "--long" in sys.argv[1:]
    cases = [
        Case("window_global", 16384, 2, 8, 128, 128),
        Case("window_global", 16384, 2, 8, 128, 64),
        Case("window_global", 16384, 2, 8, 128, 32),
        Case("window_global", 4096, 8, 8, 128, 64),
        Case("window_global", 4096, 8, 16, 64, 64),
    ]
    if long:
        cases = [
            Case("window_global", 2**21, 1, 16, 64, 128),
            Case("window_global", 2**22, 1, 8, 64, 128),
        ]
    timing = dict(warmup=2, rep=800) if long else dict(warmup=25, rep=200)
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
        layouts = (("full", full), ("band", band), ("global", glob))
        for name, lay in layouts[:1] if "--full" in sys.argv[1:] else layouts:
            lay = lay.cuda()
            o, lse = fused_attention_forward(q, k, v, lay, **kw)
            fwd = triton.testing.do_bench(
                lambda: fused_attention_forward(q, k, v, lay, **kw), **timing
            )
            bwd = triton.testing.do_bench(
                lambda: fused_attention_backward(do, q, k, v, o, lse, lay, **kw), **timing
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
            name = "long_lists_long.json" if long else "long_lists.json"
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
