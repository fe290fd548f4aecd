"""``blocksparse-attn bench``: our kernels beside FlexAttention and SDPA, same run, same GPU.

For each case and backend: median time (``triton.testing.do_bench``, warm-up excluded,
inputs rotated so the L2 cache does not flatter small cases), effective TFLOP/s (computed
blocks for block-sparse backends, the full square for dense SDPA), peak memory, and the
ratio of FlexAttention's time to ours. A backend that cannot run a case gets its reason.
"""

from __future__ import annotations

import sys
import time

import torch

from . import bench_harness as harness
from .bench_cases import anchor_cases, density_cases, gqa_cases, quick_cases, select
from .bench_harness import GQA_BACKENDS, MODES
from .bench_report import print_table, read_jsonl, write_report
from .bench_serving import decode_suite, varlen_suite
from .bench_suites import (
    DENSITY_BACKENDS,
    dynamic_step,
    index_cost,
    matmul_throughput,
    max_length_search,
    run,
)


def bench_main(args) -> int:
    if getattr(args, "from_file", None):
        return _from_record(args)
    suites = ["anchors"] if args.quick else args.suite
    anchors = anchor_cases() if "anchors" in suites else []
    density = density_cases() if "density" in suites else []
    gqa = gqa_cases() if "gqa" in suites else []
    try:  # a --match that selects nothing fails before anything runs
        chosen = set(select(anchors + density + gqa, args.match))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        return _cpu_quick(args)
    dtypes = tuple(getattr(torch, d) for d in args.dtype)
    modes = MODES if args.mode == "both" else (args.mode,)
    start = time.perf_counter()
    report = {"env": harness.environment(), "results": []}

    def save(with_plots: bool = True) -> list[str]:
        from ..kernels._common import tuned_options

        report["env"]["seconds"] = round(time.perf_counter() - start, 1)
        report["tuned"] = tuned_options()
        return write_report(report, args.out, with_plots) if args.out else []

    def keep(rows):  # after every timed step: a run cut short keeps what it measured
        report["results"].extend(rows)
        save(with_plots=False)

    if args.quick:
        cases = quick_cases()
    else:
        cases = [c for c in anchors if c in chosen]
    run(cases, tuple(args.backends), modes, dtypes, on_step=keep)
    written = save()
    if "density" in suites:
        # dense SDPA does not depend on the density: one SDPA backend is enough there
        backends = tuple(b for b in args.backends if b in DENSITY_BACKENDS)
        run([c for c in density if c in chosen], backends, modes, dtypes, on_step=keep)
        written = save()
    if gqa:
        backends = tuple(b for b in GQA_BACKENDS if b in args.backends or b == "fused_repeat")
        run([c for c in gqa if c in chosen], backends, modes, dtypes, on_step=keep)
        written = save()
    for name, section in (
        ("dynamic", dynamic_step),
        ("varlen", varlen_suite),
        ("decode", decode_suite),
        ("matmul", matmul_throughput),
        ("max-length", max_length_search),
        ("index", index_cost),
    ):
        if name in suites:
            report["results"] += section()
            written = save()
    _show(report, written)
    print(
        f"bench: {len(report['results'])} rows in {report['env']['seconds']:.0f} s", file=sys.stderr
    )
    return 0


def _show(report: dict, written: list[str]) -> None:
    """The results as a table on stdout, and the files written, on stderr."""
    print_table(report)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)


def _cpu_quick(args) -> int:
    """Without a GPU: the quick cases on the PyTorch reference backend, fp32, both modes,
    written as on the GPU (bench.jsonl, bench.md, the case plot) when ``--out`` is given."""
    if not args.quick:
        print(
            "bench: no CUDA GPU. The fused kernel, FlexAttention and SDPA figures need one; "
            "'bench --quick' times the PyTorch reference on two small CPU cases.",
            file=sys.stderr,
        )
        return 2
    print(
        "No CUDA GPU: timing the PyTorch reference backend on the two quick cases, on the "
        "CPU (GPU figures need CUDA).",
        file=sys.stderr,
    )
    start = time.perf_counter()
    report = run(quick_cases(), ("reference",), MODES, (torch.float32,), device="cpu")
    report["env"]["seconds"] = round(time.perf_counter() - start, 1)
    report["tuned"] = []
    written = write_report(report, args.out) if args.out else []
    _show(report, written)
    return 0


def _from_record(args) -> int:
    """``bench --from FILE``: the tables and plots of a recorded run, nothing timed."""
    import os

    try:
        report = read_jsonl(args.from_file)
    except (OSError, ValueError) as e:
        print(f"bench --from: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.dirname(os.path.abspath(args.from_file))
    written = write_report(report, out, with_record=False)
    _show(report, written)
    return 0
