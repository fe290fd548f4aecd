"""``blocksparse-attn bench``: our kernels beside FlexAttention and SDPA, same run, same GPU.

For each case and backend: median time (``triton.testing.do_bench``, warm-up excluded,
inputs rotated so the L2 cache does not flatter small cases), effective TFLOP/s (computed
blocks for block-sparse backends, the full square for dense SDPA), peak memory, and the
ratio of FlexAttention's time to ours. A backend that cannot run a case gets its reason.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time

import torch

from .bench_cases import Case, anchor_cases, dense_flops, density_cases, flops, quick_cases, select

BACKENDS = ("fused", "unfused", "flex", "sdpa_cudnn", "sdpa_flash", "sdpa_mask")
MODES = ("fwd", "fwd+bwd")
MASK_LIMIT_BYTES = 4 << 30  # dense boolean masks larger than this are not tried
DENSITY_BACKENDS = ("fused", "flex", "sdpa_cudnn")  # the density sweep's comparison
SECTIONS = ("max_length", "index_cost", "matmul")  # result rows outside the case table


def environment() -> dict:
    from ..kernels.availability import triton_version

    env = {
        "torch": torch.__version__,
        "triton": triton_version() or "not installed",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = f"{platform.machine()}, {torch.get_num_threads()} threads"
    return env


def _inputs(case: Case, dtype, device, sets: int, grad: bool):
    out = []
    for _ in range(sets):
        qkv = [
            torch.randn(
                case.batch,
                case.heads,
                case.seq_len,
                case.head_dim,
                device=device,
                dtype=dtype,
                requires_grad=grad,
            )
            for _ in range(3)
        ]
        out.append(qkv)
    return out


def _attention_fn(backend: str, case: Case, layout: torch.Tensor, device):
    """A function ``(q, k, v) -> out`` for ``backend``, or raise with the reason."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend in ("fused", "unfused", "reference"):
        from ..functional import block_sparse_attention

        # a CPU layout, as the patterns make them: each call checks it for edits with a
        # host comparison (a CUDA layout would be compared on the device, waiting for it)
        return lambda q, k, v: block_sparse_attention(
            q, k, v, layout, block=case.block, causal=case.causal, backend=backend
        )
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        from ..flex_block_mask import layout_to_block_mask

        bm = layout_to_block_mask(layout, case.block, causal=case.causal, device=device)
        # a fresh compile per case: past dynamo's recompile limit flex would run eagerly
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: flex(q, k, v, block_mask=bm)
    if backend in ("sdpa_cudnn", "sdpa_flash"):
        kind = SDPBackend.CUDNN_ATTENTION if backend == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION

        def fn(q, k, v):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v)

        return fn
    if backend == "sdpa_mask":
        L = case.seq_len
        if layout.shape[0] * L * L > MASK_LIMIT_BYTES:
            raise RuntimeError(
                f"dense mask of {layout.shape[0] * L * L / 2**30:.1f} GiB exceeds the 4 GiB limit"
            )
        from ..reference import token_mask

        mask = token_mask(layout.to(device), case.block, case.causal).unsqueeze(0)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    raise ValueError(f"bench: backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")


def _median_ms(fn, reps: int = 7) -> float:
    """Median wall time of ``fn`` in ms, for CPU runs (``do_bench`` needs a GPU)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[reps // 2]


def time_backend(
    backend: str, case: Case, layout: torch.Tensor, mode: str, dtype, device="cuda"
) -> dict:
    """Median ms, TFLOP/s and peak memory of one backend on one case (or its failure). On
    the CPU the median of a few wall-clock runs, and no memory figure."""
    cuda = torch.device(device).type == "cuda"
    row = {"backend": backend, "mode": mode, "dtype": str(dtype).replace("torch.", "")}
    try:
        fn = _attention_fn(backend, case, layout, device)
        bytes_per_set = 4 * case.batch * case.heads * case.seq_len * case.head_dim * 2
        sets = max(1, min(4, math.ceil(200e6 / bytes_per_set)))
        grad = mode == "fwd+bwd"
        data = _inputs(case, dtype, device, sets, grad)
        grad_out = torch.randn_like(data[0][0])
        counter = [0]

        def step():
            q, k, v = data[counter[0] % sets]
            counter[0] += 1
            out = fn(q, k, v)
            if grad:
                torch.autograd.grad(out, (q, k, v), grad_out)
            return out

        step()  # compile / autotune outside the timing
        if cuda:
            from triton.testing import do_bench

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak_total = torch.cuda.max_memory_allocated() / 2**20
            peak = peak_total - base / 2**20
            ms = do_bench(step, warmup=25, rep=100, return_mode="median")
        else:
            peak = peak_total = None
            ms = _median_ms(step)
        work = (
            dense_flops(case, mode)
            if backend.startswith("sdpa_") and backend != "sdpa_mask"
            else flops(case, layout, mode)
        )
        row.update(ms=ms, tflops=work / ms / 1e9, peak_mib=peak, peak_total_mib=peak_total)
    except Exception as e:  # a backend that cannot run this case: record why
        row.update(
            ms=None,
            tflops=None,
            peak_mib=None,
            error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
        )
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def run(
    cases: list[Case],
    backends=BACKENDS,
    modes=MODES,
    dtypes=(torch.bfloat16,),
    progress=True,
    on_step=None,
    device="cuda",
) -> dict:
    """Time every (case, dtype, mode, backend) on ``device``; returns ``{"env":...,
    "results": [...]}``. ``on_step(rows)`` receives each (case, dtype, mode)'s rows as soon
    as they are timed."""
    results = []
    start = time.perf_counter()
    total = len(cases) * len(dtypes) * len(modes)
    n = 0
    for case in cases:
        layout = case.layout()
        density = float((layout != 0).float().mean())
        for dtype in dtypes:
            for mode in modes:
                n += 1
                rows = [time_backend(b, case, layout, mode, dtype, device) for b in backends]
                flex = next((r["ms"] for r in rows if r["backend"] == "flex"), None)
                for r in rows:
                    r.update(case.as_dict(), density=density)
                    r["flex_over_this"] = (flex / r["ms"]) if flex and r["ms"] else None
                results.extend(rows)
                if on_step is not None:
                    on_step(rows)
                if progress:
                    ours = next((r for r in rows if r["backend"] == "fused"), {})
                    elapsed = time.perf_counter() - start
                    msg = (
                        f"[{n}/{total} {elapsed:.0f}s] {case.name} {mode} {rows[0]['dtype']}: "
                        + ", ".join(
                            f"{r['backend']} {r['ms']:.3f} ms" if r["ms"] else f"{r['backend']} -"
                            for r in rows
                        )
                    )
                    if ours.get("flex_over_this"):
                        msg += f" | fused vs flex {ours['flex_over_this']:.2f}x"
                    print(msg, file=sys.stderr, flush=True)
    return {"env": environment(), "results": results}


def max_length_search(
    backends=("fused", "flex", "sdpa_cudnn"),
    start: int = 65536,
    stop: int = 1 << 22,
    time_limit_ms: float = 2000.0,
    progress: bool = True,
) -> list[dict]:
    """Per backend, forward+backward at doubling lengths (window_global, B1 H16 D64,
    block 128, bf16) until it fails or needs more than 80% of the GPU's memory. A backend
    whose step takes longer than ``time_limit_ms`` (dense attention is quadratic in L) stops
    there too, with that reason, so the suite keeps its time budget."""
    limit = 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**20
    rows = []
    for backend in backends:
        L = start
        while L <= stop:
            case = Case("window_global", L, 1, 16, 64, 128)
            row = time_backend(backend, case, case.layout(), "fwd+bwd", torch.bfloat16)
            row.update(case.as_dict(), suite="max_length")
            row["fits"] = row["ms"] is not None and row["peak_total_mib"] <= limit
            if row["fits"] and row["ms"] > time_limit_ms:
                row["stop"] = f"step > {time_limit_ms / 1e3:g} s"
            rows.append(row)
            if progress:
                state = (
                    f"{row['ms']:.2f} ms, {row['peak_total_mib']:,.0f} MiB"
                    if row["ms"]
                    else row["error"]
                )
                print(f"[max length] {backend} L={L:,}: {state}", file=sys.stderr, flush=True)
            if not row["fits"] or "stop" in row:
                break
            L *= 2
    return rows


def index_cost(
    lengths=(4096, 16384, 65536, 262144), heads: int = 16, block: int = 64, progress: bool = True
) -> list[dict]:
    """Median ms to compile a window_global layout (one per head) into our index, beside
    FlexAttention's ``create_block_mask`` (compiled) for the same pattern, both timed by
    ``do_bench`` (median of many calls, after a first call that compiles)."""
    from triton.testing import do_bench

    from ..index import build_index
    from ..kernels.configs import forward_tiles

    rows = []
    for L in lengths:
        layout = Case("window_global", L, 1, heads, 64, block).layout().expand(heads, -1, -1)
        layout = layout.contiguous().cuda()
        tiles = forward_tiles(64, block, 0.0)
        ours = do_bench(
            lambda: build_index(layout, block, tile_m=tiles.m, tile_n=tiles.n),
            warmup=5,
            rep=50,
            return_mode="median",
        )
        row = {
            "suite": "index_cost",
            "seq_len": L,
            "heads": heads,
            "block": block,
            "ours_ms": ours,
            "flex_ms": None,
        }
        try:
            from torch.nn.attention.flex_attention import create_block_mask

            grid = layout[0]

            def mask_mod(b, h, q, k):
                return grid[q // block, k // block]

            make = torch.compile(create_block_mask)
            make(mask_mod, 1, heads, L, L, device="cuda")  # compile outside the timing
            row["flex_ms"] = do_bench(  # timed as ours is: the median of many calls
                lambda: make(mask_mod, 1, heads, L, L, device="cuda"),
                warmup=5,
                rep=50,
                return_mode="median",
            )
        except Exception as e:  # record why FlexAttention could not build it
            row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        finally:
            torch.cuda.empty_cache()
        rows.append(row)
        if progress:
            flex = f"{row['flex_ms']:.2f} ms" if row["flex_ms"] is not None else row["flex_error"]
            print(f"[index] L={L:,}: ours {ours:.3f} ms, flex {flex}", file=sys.stderr, flush=True)
    return rows


def matmul_throughput(
    blocks=(64, 128),
    seq_len: int = 8192,
    batch: int = 2,
    heads: int = 8,
    head_dim: int = 128,
    density: float = 0.1,
    dtype=torch.bfloat16,
    device="cuda",
    progress: bool = True,
) -> list[dict]:
    """The three block-sparse products of the unfused path on a random layout, each beside
    ``torch.matmul`` on the dense product of the same shapes: TFLOP/s per computed block
    against dense TFLOP/s. ``sdd`` is ``Q K^T`` ([L, D] x [D, L]), ``dsd`` is ``P V``
    ([L, L] x [L, D]), ``dds`` is ``A P`` ([D, L] x [L, L])."""
    from triton.testing import do_bench

    from ..ops.matmul import MatMul

    rows = []
    for block in blocks:
        case = Case("random", seq_len, batch, heads, head_dim, block, density=density)
        layout = case.layout().expand(heads, -1, -1).contiguous()
        nnz = int(layout.sum())
        q, k, at = (
            torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype)
            for _ in range(3)
        )
        a = at.transpose(-1, -2).contiguous()  # [Z, H, D, L]
        sdd = MatMul(layout, block, "sdd", trans_b=True)
        p = sdd(q, k)
        products = {
            "sdd": (sdd, q, k),
            "dsd": (MatMul(layout, block, "dsd"), p, k),
            "dds": (MatMul(layout, block, "dds"), a, p),
        }
        dense_p = torch.randn(batch, heads, seq_len, seq_len, device=device, dtype=dtype)
        dense = {"sdd": (q, k.transpose(-1, -2)), "dsd": (dense_p, k), "dds": (a, dense_p)}
        work = 2.0 * batch * nnz * block * block * head_dim
        dense_work = 2.0 * batch * heads * seq_len * seq_len * head_dim
        for mode, (op, x, y) in products.items():
            ms = do_bench(lambda: op(x, y), warmup=25, rep=100, return_mode="median")
            dx, dy = dense[mode]
            dense_ms = do_bench(
                lambda: torch.matmul(dx, dy), warmup=25, rep=100, return_mode="median"
            )
            row = {
                "suite": "matmul",
                "op": mode,
                "seq_len": seq_len,
                "batch": batch,
                "heads": heads,
                "head_dim": head_dim,
                "block": block,
                "density": nnz / layout.numel(),
                "dtype": str(dtype).replace("torch.", ""),
                "ms": ms,
                "tflops": work / ms / 1e9,
                "dense_ms": dense_ms,
                "dense_tflops": dense_work / dense_ms / 1e9,
            }
            row["of_dense"] = row["tflops"] / row["dense_tflops"]
            rows.append(row)
            if progress:
                print(
                    f"[matmul] {mode} block {block}: {ms:.3f} ms, {row['tflops']:.0f} TF "
                    f"= {row['of_dense']:.0%} of dense torch.matmul ({row['dense_tflops']:.0f} "
                    "TF)",
                    file=sys.stderr,
                    flush=True,
                )
        del dense_p, p
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _case_cells(report: dict) -> list[list[str]]:
    """The case table's cells, one row per (case, dtype, mode, backend): name, dtype, mode,
    backend, ms, TF, peak MiB, flex/this (a failed backend: its error in the ms cell)."""
    out = []
    for r in report["results"]:
        if r.get("suite") in SECTIONS:
            continue
        head = [r["name"], r["dtype"], r["mode"], r["backend"]]
        if r["ms"] is None:
            out.append(head + [r["error"], "", "", ""])
            continue
        ratio = f"{r['flex_over_this']:.2f}" if r["flex_over_this"] else ""
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        tf = f"{r['tflops']:.0f}" if r["tflops"] >= 1 else f"{r['tflops']:.3f}"
        out.append(head + [f"{r['ms']:.3f}", tf, peak, ratio])
    return out


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        f"{env.get('gpu', 'CPU')}, torch {env['torch']}, triton {env['triton']}, "
        f"{env['date']}. Median ms (do_bench on a GPU, wall clock on the CPU); "
        "TF = effective TFLOP/s; "
        "'flex/this' = FlexAttention time over this backend's time.",
        "",
        "| case | dtype | mode | backend | ms | TF | peak MiB | flex/this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in _case_cells(report)]
    search = [r for r in report["results"] if r.get("suite") == "max_length"]
    if search:
        lines += [
            "",
            "Longest window_global length that runs forward+backward in 80% of GPU "
            "memory (B1 H16 D64, block 128, bf16):",
            "",
            "| backend | longest L | ms there | peak MiB | stopped by |",
            "|---|---|---|---|---|",
        ]
        for backend in dict.fromkeys(r["backend"] for r in search):
            rows = [r for r in search if r["backend"] == backend]
            ok = [r for r in rows if r["fits"]]
            last = rows[-1]
            why = (
                last.get("stop", "search end")
                if last["fits"]
                else (last.get("error") or "memory > 80%")
            )
            best = ok[-1] if ok else None
            lines.append(
                f"| {backend} | {best['seq_len']:,} | {best['ms']:.2f} | "
                f"{best['peak_total_mib']:,.0f} | {why} |"
                if best
                else f"| {backend} | none | | | {why} |"
            )
    index = [r for r in report["results"] if r.get("suite") == "index_cost"]
    if index:
        lines += [
            "",
            "Layout compile time, window_global, one layout per head:",
            "",
            "| L | heads | block | ours ms | FlexAttention create_block_mask ms |",
            "|---|---|---|---|---|",
        ]
        for r in index:
            flex = f"{r['flex_ms']:.2f}" if r["flex_ms"] is not None else r.get("flex_error", "")
            lines.append(
                f"| {r['seq_len']:,} | {r['heads']} | {r['block']} | {r['ours_ms']:.3f} | {flex} |"
            )
    if report.get("tuned"):
        lines += [
            "",
            "Launch options the autotuner chose (fused attention and block-sparse matmul kernels):",
            "",
            "| kernel | dtype | tuning key | options |",
            "|---|---|---|---|",
        ]
        for t in report["tuned"]:
            key = " ".join(
                f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in t["key"].items()
            )
            options = " ".join(f"{k}={v}" for k, v in t["options"].items() if v is not None)
            lines.append(f"| {t['kernel']} | {t['dtype']} | {key} | {options} |")
    products = [r for r in report["results"] if r.get("suite") == "matmul"]
    if products:
        r0 = products[0]
        lines += [
            "",
            f"Block-sparse products of the unfused path (random layout, density "
            f"{r0['density']:.2f}, L{r0['seq_len']} B{r0['batch']} H{r0['heads']} "
            f"D{r0['head_dim']}, {r0['dtype']}) beside dense torch.matmul:",
            "",
            "| op | block | ms | TF on computed blocks | dense matmul TF | of dense |",
            "|---|---|---|---|---|---|",
        ]
        for r in products:
            lines.append(
                f"| {r['op']} | {r['block']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                f"{r['dense_tflops']:.0f} | {r['of_dense']:.0%} |"
            )
    return "\n".join(lines)


def plots(report: dict, out_dir: str) -> list[str]:
    """PNG plots: the time of every timed case per backend and mode; forward+backward time
    against sequence length per backend (from the max-length search) and our speedup over
    FlexAttention and SDPA against density (from the density sweep). Returns the files
    written."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = report["env"]
    title = f"{env.get('gpu', 'CPU')}, torch {env['torch']}, triton {env['triton']}"
    written = []
    cases = [
        r
        for r in report["results"]
        if r.get("suite") not in SECTIONS and r.get("ms") and r.get("pattern") != "random"
    ]
    if cases:
        labels = list(dict.fromkeys(f"{r['name']}\n{r['mode']} {r['dtype']}" for r in cases))
        backends = list(dict.fromkeys(r["backend"] for r in cases))
        fig, ax = plt.subplots(figsize=(7, 1.0 + 0.45 * len(labels) * len(backends)))
        width = 0.8 / len(backends)
        for n, backend in enumerate(backends):
            ms = {
                f"{r['name']}\n{r['mode']} {r['dtype']}": r["ms"]
                for r in cases
                if r["backend"] == backend
            }
            ax.barh(
                [i + n * width for i in range(len(labels))],
                [ms.get(label, 0.0) for label in labels],
                height=width,
                label=backend,
            )
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set(xscale="log", xlabel="median ms (log)", title=f"cases\n{title}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "cases.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    search = [r for r in report["results"] if r.get("suite") == "max_length" and r["ms"]]
    if search:
        fig, ax = plt.subplots(figsize=(6, 4))
        for backend in dict.fromkeys(r["backend"] for r in search):
            rows = [r for r in search if r["backend"] == backend]
            ax.plot([r["seq_len"] for r in rows], [r["ms"] for r in rows], "o-", label=backend)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length",
            ylabel="fwd+bwd ms",
            title=f"window_global B1 H16 D64\n{title}",
        )
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "time_vs_length.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    sweep = [r for r in report["results"] if r.get("pattern") == "random" and r.get("ms")]
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for block in sorted({r["block"] for r in sweep}):
            for other in ("flex", "sdpa_cudnn"):
                pts = []
                for d in sorted({r["density"] for r in sweep}):
                    ms = {
                        r["backend"]: r["ms"]
                        for r in sweep
                        if r["block"] == block and r["density"] == d and r["mode"] == "fwd+bwd"
                    }
                    if "fused" in ms and other in ms:
                        pts.append((d, ms[other] / ms["fused"]))
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"over {other}, block {block}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(
            xscale="log",
            xlabel="layout density",
            ylabel="speedup of fused (fwd+bwd)",
            title=f"random layouts L8192 B2 H8 D128\n{title}",
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "speedup_vs_density.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def print_table(report: dict) -> None:
    """The main results as a rich table when rich is installed, else markdown."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(report))
        return
    table = Table(title=f"{report['env'].get('gpu', 'CPU')} - flex/this > 1: faster than Flex")
    for col in ("case", "dtype", "mode", "backend", "ms", "TF", "peak MiB", "flex/this"):
        table.add_column(col)
    for cells in _case_cells(report):
        table.add_row(*cells)
    Console().print(table)


def write_report(report: dict, out_dir: str, with_plots: bool = True) -> list[str]:
    """bench.json (every figure and the environment), bench.md and the plots."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(markdown(report) + "\n")
    return [
        os.path.join(out_dir, "bench.json"),
        os.path.join(out_dir, "bench.md"),
        *(plots(report, out_dir) if with_plots else []),
    ]


def bench_main(args) -> int:
    suites = ["anchors"] if args.quick else args.suite
    anchors = anchor_cases() if "anchors" in suites else []
    density = density_cases() if "density" in suites else []
    try:  # a --match that selects nothing fails before anything runs
        chosen = set(select(anchors + density, args.match))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        return _cpu_quick(args)
    dtypes = tuple(getattr(torch, d) for d in args.dtype)
    modes = MODES if args.mode == "both" else (args.mode,)
    start = time.perf_counter()
    report = {"env": environment(), "results": []}

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
    for name, section in (
        ("matmul", matmul_throughput),
        ("max-length", max_length_search),
        ("index", index_cost),
    ):
        if name in suites:
            report["results"] += section()
            written = save()
    print_table(report)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    print(
        f"bench: {len(report['results'])} rows in {report['env']['seconds']:.0f} s", file=sys.stderr
    )
    return 0


def _cpu_quick(args) -> int:
    """Without a GPU: the quick cases on the PyTorch reference backend, fp32, both modes,
    written as on the GPU (bench.json, bench.md, the case plot) when ``--out`` is given."""
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
    print_table(report)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0
