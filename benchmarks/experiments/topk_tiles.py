"""Experiment (GPU): tile shapes for top-k layouts at blocks 128 (where the dynamic step
trails FlexAttention) and 64 (benchmarks/NOTES.md). The bench dynamic suite's attention
(B1 H16 D128 L32768, topk 16, causal, first and diagonal blocks kept, bf16) on the selection as a
dense layout (its index compiled once): the forward over three tile shapes, the backward
over four (dK/dV, dQ) pairs, each at its tuned launch options. The defaults (64x64
forward; 64x64 dK/dV with 128x64 dQ) are chosen for sparse layouts whose few long rows set
the critical path; every top-k row has the same length. With 64x64 dQ tiles as well, the
step would compile one index instead of two. Also the max |difference| from the default
tiles. Writes $OUT/topk_tiles.json.

    PYTHONPATH=src python3 benchmarks/experiments/topk_tiles.py
"""

import json
import os

import torch
import triton

from blocksparse_attn import topk_blocks
from blocksparse_attn.kernels.configs import Tiles
from blocksparse_attn.kernels.fused_bwd import fused_attention_backward
from blocksparse_attn.kernels.fused_fwd import fused_attention_forward

B, H, D, L, TOPK = 1, 16, 128, 32768, 16


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    rows = []
    for block in (128, 64):
        rows += one_block(block, rows, out_dir)


def one_block(block: int, rows: list, out_dir: str) -> list:
    """The rows of one block size (written out with ``rows`` as they come)."""
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    lists = topk_blocks(
        q, k, block=block, topk=TOPK, causal=True, keep_first=True, keep_diagonal=True
    )
    layout = lists.to_layout(L // block)[0]  # [H, nb, nb]: one compiled index per tile shape
    kw = dict(block=block, scale=D**-0.5, causal=True)
    mine = []

    def record(row, fn, ref):
        row = {"block": block, **row}
        try:
            got = fn()
            pairs = [
                (a, b)
                for a, b in zip(got if isinstance(got, tuple) else (got,), ref)
                if a is not None  # the backward's bias gradients: none here
            ]
            row["diff"] = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
            row["ms"] = triton.testing.do_bench(fn, warmup=10, rep=100)
        except Exception as e:  # out of shared memory or registers: record it
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        print(json.dumps(row), flush=True)
        mine.append(row)
        with open(os.path.join(out_dir, "topk_tiles.json"), "w") as f:
            json.dump(rows + mine, f, indent=1)

    o, lse = fused_attention_forward(q, k, v, layout, **kw)
    for tiles in (Tiles(64, 64), Tiles(128, 64), Tiles(128, 128)):
        record(
            {"pass": "forward", "tiles": f"{tiles.m}x{tiles.n}"},
            lambda t=tiles: fused_attention_forward(q, k, v, layout, **kw, tiles=t)[0],
            (o,),
        )
    ref = fused_attention_backward(do, q, k, v, o, lse, layout, **kw)
    for kv_tiles, q_tiles in (
        (Tiles(64, 64), Tiles(128, 64)),
        (Tiles(64, 64), Tiles(64, 64)),  # one tile shape for the whole step: one index build
        (Tiles(128, 64), Tiles(128, 64)),
        (Tiles(64, 128), Tiles(128, 128)),
    ):
        record(
            {"pass": "backward", "tiles": f"{kv_tiles.m}x{kv_tiles.n} / {q_tiles.m}x{q_tiles.n}"},
            lambda a=kv_tiles, b=q_tiles: fused_attention_backward(
                do, q, k, v, o, lse, layout, **kw, tiles=(a, b)
            ),
            ref,
        )
    return mine


if __name__ == "__main__":
    main()
