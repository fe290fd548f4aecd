"""Experiment (GPU): dK/dV tiles of 64 keys with 128-query steps (128x64) against the default
64x64, each over a set of launch options, the dQ kernel at its tuned default. Whole backward
in ms (do_bench median) and max |difference| of dK/dV from the default tiles. Writes
$OUT/dkdv_tiles.json.

    PYTHONPATH=src python3 benchmarks/experiments/dkdv_tiles.py
"""

import json
import os

import torch
import triton

from blocksparse_attn.kernels.configs import Tiles, backward_tiles
from blocksparse_attn.kernels.fused_bwd import fused_attention_backward
from blocksparse_attn.kernels.fused_fwd import fused_attention_forward
from blocksparse_attn.tools.bench_cases import Case


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    cases = [
        Case("dense", 8192, 4, 8, 128, 128),
        Case("causal_dense", 8192, 4, 8, 128, 128),
        Case("dense", 8192, 4, 16, 64, 128),
        Case("window_global", 16384, 2, 8, 128, 64),
        Case("causal_fixed", 16384, 2, 8, 128, 64, causal=True),
    ]
    options = [
        dict(DESC=d, num_warps=w, num_stages=s)
        for d, w, s in ((0, 4, 2), (0, 4, 3), (0, 8, 2), (0, 8, 3), (1, 4, 2), (1, 8, 2))
    ]
    options += [dict(o, maxnreg=128) for o in options if o["num_warps"] == 8]
    rows = []
    for case in cases:
        torch.manual_seed(0)
        layout = case.layout().cuda()
        shape = (case.batch, case.heads, case.seq_len, case.head_dim)
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        kw = dict(block=case.block, scale=case.head_dim**-0.5, causal=case.causal)
        o, lse = fused_attention_forward(q, k, v, layout, **kw)
        kv_default, q_default = backward_tiles(case.head_dim, case.block, 1.0)
        ref = fused_attention_backward(do, q, k, v, o, lse, layout, **kw)
        for kv_tiles in (kv_default, Tiles(128, 64)):
            for opt in options:

                def fn():
                    return fused_attention_backward(
                        do,
                        q,
                        k,
                        v,
                        o,
                        lse,
                        layout,
                        **kw,
                        tiles=(kv_tiles, q_default),
                        configs=(opt, None),
                    )

                row = {"case": case.name, "kv_tiles": f"{kv_tiles.m}x{kv_tiles.n}", **opt}
                try:
                    got = fn()
                    row["diff"] = max(
                        (a.float() - b.float()).abs().max().item()
                        for a, b in zip(got[1:3], ref[1:3])
                    )
                    row["ms"] = triton.testing.do_bench(fn, warmup=10, rep=60)
                except Exception as e:  # out of shared memory or registers: record it
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
                with open(os.path.join(out_dir, "dkdv_tiles.json"), "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
