"""Sweep kernel tile shapes and launch configurations on a GPU; prints the fastest per case.

    PYTHONPATH=src python3 benchmarks/sweep_configs.py [fwd|bwd|all] [--out FILE.csv]

Forward: every (tiles, num_warps, num_stages). Backward: the dK/dV kernel's choices with the
dQ kernel at its default, then the dQ kernel's with dK/dV at its default (times are of the
whole backward, so a difference is that kernel's). bf16, inputs as in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys

import torch
from triton.testing import do_bench

from blocksparse_attn.kernels.configs import Tiles, backward_tiles
from blocksparse_attn.kernels.fused_bwd import fused_attention_backward
from blocksparse_attn.kernels.fused_fwd import fused_attention_forward
from blocksparse_attn.tools.bench_cases import Case, flops, pattern_layout

CASES = [
    Case("dense", 8192, 4, 8, 128, 128),
    Case("window_global", 16384, 2, 8, 128, 64),
    Case("dense", 8192, 4, 16, 64, 128),
    Case("window_global", 4096, 8, 16, 64, 64),
]
FWD_TILES = [Tiles(128, 64), Tiles(128, 128), Tiles(64, 64), Tiles(64, 128)]
KV_TILES = [Tiles(64, 64), Tiles(64, 128), Tiles(32, 128)]
Q_TILES = [Tiles(64, 64), Tiles(128, 64), Tiles(128, 32)]
LAUNCH = [dict(num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


def problem(case: Case):
    layout = pattern_layout(case.pattern, case.seq_len, case.block).cuda()
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    kw = dict(block=case.block, scale=case.head_dim**-0.5, causal=case.causal)
    return layout, q, k, v, do, kw


def timed(fn) -> float | None:
    try:
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as e:  # out of resources for this config
        print(f"    skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
        return None


def sweep_fwd(case, rows):
    layout, q, k, v, _, kw = problem(case)
    f = flops(case, layout.cpu(), "fwd")
    for tiles, cfg in itertools.product(FWD_TILES, LAUNCH):
        ms = timed(lambda: fused_attention_forward(q, k, v, layout, tiles=tiles, config=cfg, **kw))
        rows.append(
            dict(
                kernel="fwd",
                case=case.name,
                tiles=f"{tiles.m}x{tiles.n}",
                **cfg,
                ms=ms,
                tflops=f / ms / 1e9 if ms else None,
            )
        )


def sweep_bwd(case, rows):
    layout, q, k, v, do, kw = problem(case)
    out, lse = fused_attention_forward(q, k, v, layout, **kw)
    f = flops(case, layout.cpu(), "fwd+bwd") - flops(case, layout.cpu(), "fwd")
    default_kv, default_q = backward_tiles(case.head_dim, case.block, 0.0)
    default_cfg = dict(num_warps=4, num_stages=2)
    for which, tile_set in (("dkdv", KV_TILES), ("dq", Q_TILES)):
        for tiles, cfg in itertools.product(tile_set, LAUNCH):
            t = (tiles, default_q) if which == "dkdv" else (default_kv, tiles)
            c = (cfg, default_cfg) if which == "dkdv" else (default_cfg, cfg)
            ms = timed(
                lambda: fused_attention_backward(
                    do, q, k, v, out, lse, layout, tiles=t, configs=c, **kw
                )
            )
            rows.append(
                dict(
                    kernel=which,
                    case=case.name,
                    tiles=f"{tiles.m}x{tiles.n}",
                    **cfg,
                    ms=ms,
                    tflops=f / ms / 1e9 if ms else None,
                )
            )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["fwd", "bwd", "all"], nargs="?", default="all")
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    for case in CASES:
        print(f"{case.name}", file=sys.stderr, flush=True)
        if args.what in ("fwd", "all"):
            sweep_fwd(case, rows)
        if args.what in ("bwd", "all"):
            sweep_bwd(case, rows)
    if args.out:
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(f"{torch.cuda.get_device_name()}: best 3 per (kernel, case), bf16")
    for key in sorted({(r["kernel"], r["case"]) for r in rows}):
        got = sorted(
            (r for r in rows if (r["kernel"], r["case"]) == key and r["ms"]), key=lambda r: r["ms"]
        )
        print(f"{key[0]:5s} {key[1]}")
        for r in got[:3]:
            print(
                f"      {r['tiles']:8s} w{r['num_warps']} s{r['num_stages']}  "
                f"{r['ms']:.3f} ms  {r['tflops']:.0f} TF"
            )


if __name__ == "__main__":
    main()
