"""The ``blocksparse-attn`` command: ``demo``, ``layout``, ``bench``, ``env``.
``blocksparse-attn COMMAND --help`` lists each command's options."""

from __future__ import annotations

import argparse
import inspect
import sys

PATTERNS = {
    "dense": "DenseSparsityConfig",
    "fixed": "FixedSparsityConfig",
    "variable": "VariableSparsityConfig",
    "bigbird": "BigBirdSparsityConfig",
    "bslongformer": "BSLongformerSparsityConfig",
    "sliding": "LocalSlidingWindowSparsityConfig",
}

# command-line option -> constructor argument, for the pattern options
PATTERN_OPTIONS = {
    "different_layout_per_head": dict(action="store_true", default=None, help="a pattern per head"),
    "attention": dict(choices=["bidirectional", "unidirectional"]),
    "num_local_blocks": dict(type=int, help="fixed: window size in blocks"),
    "num_global_blocks": dict(type=int, help="fixed/bigbird: global blocks"),
    "horizontal_global_attention": dict(
        action="store_true", default=None, help="fixed/variable: global rows too"
    ),
    "num_different_global_patterns": dict(type=int, help="fixed: global positions over heads"),
    "num_random_blocks": dict(type=int, help="variable/bigbird: random blocks per row"),
    "local_window_blocks": dict(type=int, nargs="+", help="variable: window sizes"),
    "global_block_indices": dict(type=int, nargs="+", help="variable/bslongformer"),
    "global_block_end_indices": dict(type=int, nargs="+", help="variable/bslongformer"),
    "num_sliding_window_blocks": dict(type=int, help="bigbird/bslongformer/sliding"),
    "seed": dict(type=int, help="variable/bigbird: seed of the random blocks"),
}


def make_config(pattern: str, heads: int, block: int, options: dict):
    """Build the config for ``pattern`` from the options the user gave; an option the
    pattern does not take is an error."""
    import blocksparse_attn.patterns as patterns

    cls = getattr(patterns, PATTERNS[pattern])
    accepted = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(k for k in given if k not in accepted)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise SystemExit(
            f"blocksparse-attn layout: {flags} not used by --pattern {pattern} "
            f"({cls.__name__}); drop it or pick another pattern."
        )
    return cls(heads, block, **given)


def _cmd_layout(args) -> int:
    from .layout_view import layout_summary, layout_text, save_layout_png

    options = {k: getattr(args, k) for k in PATTERN_OPTIONS}
    try:
        config = make_config(args.pattern, args.heads, args.block, options)
        layout = config.make_layout(args.seq_len)
    except (ValueError, NotImplementedError) as e:
        raise SystemExit(f"blocksparse-attn layout: {e}") from None
    print(config)
    print(layout_summary(layout))
    shown = range(layout.shape[0]) if args.all_heads else range(1)
    for h in shown:
        print(f"\nhead {h}:")
        print(layout_text(layout[h], max_width=args.max_width))
    if args.png:
        save_layout_png(
            layout, args.png, title=f"{args.pattern}, L={args.seq_len}, block {args.block}"
        )
        print(f"\nwrote {args.png}")
    return 0


def _cmd_env(args) -> int:
    from .env import env_report

    print(env_report())
    return 0


def _cmd_demo(args) -> int:
    from .demo import demo_main

    demo_main(args)
    return 0


def _cmd_bench(args) -> int:
    from .bench import bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blocksparse-attn",
        description="Block-sparse attention for PyTorch: layouts, environment report.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layout", help="print (and draw) a sparsity layout")
    p.add_argument("--pattern", required=True, choices=sorted(PATTERNS))
    p.add_argument("--seq-len", type=int, required=True, help="sequence length in tokens")
    p.add_argument("--block", type=int, default=16, help="block size in tokens (default 16)")
    p.add_argument("--heads", type=int, default=1, help="number of heads (default 1)")
    for name, kw in PATTERN_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, **kw)
    p.add_argument("--all-heads", action="store_true", help="print every head, not only head 0")
    p.add_argument("--max-width", type=int, default=64, help="widest text grid (default 64)")
    p.add_argument("--png", metavar="FILE", help="also draw every head into a PNG file")
    p.set_defaults(func=_cmd_layout)

    p = sub.add_parser("demo", help="train a small sparse-attention language model (main job)")
    p.add_argument("--steps", type=int, help="training steps (default 250 on CPU, 1000 on GPU)")
    p.add_argument("--seq-len", type=int, help="sequence length (default 256 CPU, 8192 GPU)")
    p.add_argument("--block", type=int, help="layout block (default 16 CPU, 64 GPU)")
    p.add_argument(
        "--window", type=int, help="Fixed window in blocks (default: a quarter of the sequence)"
    )
    p.add_argument("--batch", type=int, help="sequences per step (default 16)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--queries", type=int, default=32, help="answers per sequence")
    p.add_argument("--keys", type=int, default=8, help="key->value pairs in the table")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--no-dense", action="store_true", help="skip the dense comparison run")
    p.add_argument("--png", metavar="FILE", help="also draw the layout into a PNG file")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="time the kernels beside FlexAttention and SDPA (GPU)")
    p.add_argument("--quick", action="store_true", help="two small cases (on CPU: reference only)")
    suites = [
        "anchors",
        "density",
        "gqa",
        "dynamic",
        "varlen",
        "decode",
        "matmul",
        "max-length",
        "index",
    ]
    p.add_argument(
        "--suite", nargs="+", choices=suites, default=suites, help="what to run (default: all)"
    )
    p.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both")
    p.add_argument("--dtype", nargs="+", choices=["bfloat16", "float16"], default=["bfloat16"])
    p.add_argument(
        "--backends",
        nargs="+",
        choices=[
            "fused",
            "fused_nondet",
            "unfused",
            "flex",
            "fa4",
            "fa4_det",
            "sdpa_cudnn",
            "sdpa_flash",
            "sdpa_mask",
        ],
        default=["fused", "unfused", "flex", "fa4", "sdpa_cudnn", "sdpa_flash", "sdpa_mask"],
        help="default: all but fused_nondet (the fused backend with deterministic=False) and "
        "fa4_det (FlashAttention-4 with its deterministic backward)",
    )
    p.add_argument(
        "--match",
        nargs="+",
        metavar="TEXT",
        help="only the anchor/density/gqa cases whose name contains one of these "
        "(e.g. 'causal_fixed' 'L4096')",
    )
    p.add_argument("--out", metavar="DIR", help="write bench.jsonl, bench.md and the plots here")
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="run nothing: make bench.md and the plots from a run's bench.jsonl (into --out, "
        "default the file's folder)",
    )
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("env", help="versions and whether the Triton kernels will run")
    p.set_defaults(func=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0


if __name__ == "__main__":
    sys.exit(main())
