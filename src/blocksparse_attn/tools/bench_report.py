"""The benchmark's report: ``bench.jsonl``, the markdown tables, the plots and the terminal
table.

``bench.jsonl`` is the record of one run, one JSON object per line, schema 1:

* the first line, ``{"record": "run", "schema": 1, "env": {...}, "tuned": [...]}``: the
  environment (torch, triton, python, date, gpu and cuda or cpu, seconds) and the launch
  options the autotuner chose per kernel and key;
* every other line, ``{"record": "result", ...}``: one timed row. Case rows carry
  ``name, pattern, seq_len, batch, heads, head_dim, block, causal, density, dtype, mode,
  backend, ms, tflops, peak_mib, peak_total_mib, flex_over_this, fa4_over_this`` (``ms``
  null and ``error`` set where a backend could not run), and on a GPU ``graph_ms,
  flex_over_this_graph, fa4_over_this_graph`` (the call replayed from a CUDA graph;
  ``graph_error`` where it could not be captured); section rows carry ``suite``
  (``max_length``, ``index_cost``, ``matmul``, ``dynamic``, ``varlen``, ``decode``) and
  that section's fields.

The tables and plots are made from it (``blocksparse-attn bench --from FILE``).
"""

from __future__ import annotations

import json

# result rows outside the case table
SECTIONS = ("max_length", "index_cost", "matmul", "dynamic", "varlen", "decode")


def _cell(r: dict, key: str, fmt: str = "{:.3f}") -> str:
    """``r[key]`` formatted, or empty where the row lacks it."""
    return fmt.format(r[key]) if r.get(key) is not None else ""


def _case_cells(report: dict) -> list[list[str]]:
    """The case table's cells, one row per (case, dtype, mode, backend): name, dtype, mode,
    backend, ms, TF, peak MiB, flex/this, fa4/this, then the same three timings from a
    CUDA graph (a failed backend: its error in the ms cell; a failed capture: its error
    in the graph cell)."""
    out = []
    for r in report["results"]:
        if r.get("suite") in SECTIONS:
            continue
        head = [r["name"], r["dtype"], r["mode"], r["backend"]]
        if r["ms"] is None:
            out.append(head + [r["error"], "", "", "", "", "", "", ""])
            continue
        ratios = [_cell(r, key, "{:.2f}") for key in ("flex_over_this", "fa4_over_this")]
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        tf = f"{r['tflops']:.0f}" if r["tflops"] >= 1 else f"{r['tflops']:.3f}"
        graph = [_cell(r, "graph_ms") or r.get("graph_error", "")]
        graph += [_cell(r, k, "{:.2f}") for k in ("flex_over_this_graph", "fa4_over_this_graph")]
        out.append(head + [f"{r['ms']:.3f}", tf, peak, *ratios, *graph])
    return out


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        f"{env.get('gpu', 'CPU')}, torch {env['torch']}, triton {env['triton']}, "
        f"{env['date']}. Median ms (do_bench on a GPU, wall clock on the CPU) of eager "
        "calls, host work included; TF = effective TFLOP/s; "
        "'flex/this' = FlexAttention time over this backend's time; 'fa4/this' the same "
        "for FlashAttention-4's block-sparse kernels; 'graph' = the same call replayed "
        "from a CUDA graph (the GPU's time alone; GPU runs only).",
        "",
        "| case | dtype | mode | backend | ms | TF | peak MiB | flex/this | fa4/this "
        "| graph ms | flex/this graph | fa4/this graph |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
    dynamic = [r for r in report["results"] if r.get("suite") == "dynamic"]
    if dynamic:
        lines += [
            "",
            "Dynamic top-k step (B1, causal, topk_blocks then fused forward+backward on the "
            "lists; ms; 'graph' = replayed from a CUDA graph; per sample vs shared: B2):",
            "",
            "| L | H | D | block | topk | step | step graph | select | index | index graph | "
            "index share | kernels (cached index) | flex step | flex/ours | fa4 step | fa4/ours | "
            "per sample | shared | ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]

        for r in dynamic:
            flex = _cell(r, "flex_step_ms") or r.get("flex_error", "")
            fa4 = _cell(r, "fa4_step_ms") or r.get("fa4_error", "")
            lines.append(
                f"| {r['seq_len']:,} | {r['heads']} | {r['head_dim']} | {r['block']} | "
                f"{r['topk']} | {_cell(r, 'step_ms')} | {_cell(r, 'step_graph_ms')} | "
                f"{_cell(r, 'select_ms')} | {_cell(r, 'index_ms')} | "
                f"{_cell(r, 'index_graph_ms')} | "
                f"{_cell(r, 'index_share', '{:.1%}')} | {_cell(r, 'attention_cached_index_ms')} | "
                f"{flex} | "
                f"{_cell(r, 'flex_over_ours', '{:.2f}')} | {fa4} | "
                f"{_cell(r, 'fa4_over_ours', '{:.2f}')} | "
                f"{_cell(r, 'per_sample_ms')} | {_cell(r, 'shared_ms')} | "
                f"{_cell(r, 'per_sample_over_shared', '{:.2f}')} |"
            )
    packed = [r for r in report["results"] if r.get("suite") == "varlen"]
    for r in packed:
        flex = f"{r['flex_ms']:.3f}" if r.get("flex_ms") is not None else r.get("flex_error", "")
        lines += [
            "",
            f"Packed documents ({r['docs']} of {min(r['lengths'])}-{max(r['lengths'])} tokens, "
            f"{r['total']:,} in all, H{r['heads']} D{r['head_dim']} block {r['block']}, causal "
            "window_global per document), forward+backward ms:",
            "",
            "| packed (varlen) | packed, a new batch | padded batch | packed / padded | "
            "FlexAttention, document mask |",
            "|---|---|---|---|---|",
            f"| {r['packed_ms']:.3f} | {_cell(r, 'packed_new_batch_ms')} | {r['padded_ms']:.3f} | "
            f"{r['packed_over_padded']:.2f} | {flex} |",
        ]
    decoding = [r for r in report["results"] if r.get("suite") == "decode"]
    for r in decoding:
        ours = [_cell(r, key, "{:.4f}") or "-" for key in ("ms", "graph_ms")]
        flex = [
            _cell(r, key, "{:.4f}") or r.get("flex_error", "-")
            for key in ("flex_ms", "flex_graph_ms")
        ]
        gb = f"{r['gb_per_s']:.0f}"
        if r.get("graph_gb_per_s") is not None:
            gb += f" / {r['graph_gb_per_s']:.0f}"
        lines += [
            "",
            f"Decoding one token (B{r['batch']}, context {r['context']:,}, H{r['heads']} over "
            f"{r['kv_heads']} kv heads, D{r['head_dim']}, block {r['block']}, window_global), "
            "called eagerly / replayed from a CUDA graph:",
            "",
            "| ms | selected K/V MiB | GB/s on them | FlexAttention ms |",
            "|---|---|---|---|",
            f"| {ours[0]} / {ours[1]} | {r['selected_mib']:.1f} | {gb} | {flex[0]} / {flex[1]} |",
        ]
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
            for other in ("flex", "fa4", "sdpa_cudnn"):
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
    for col in (
        "case",
        "dtype",
        "mode",
        "backend",
        "ms",
        "TF",
        "peak MiB",
        "flex/this",
        "fa4/this",
        "graph ms",
        "flex/this graph",
        "fa4/this graph",
    ):
        table.add_column(col)
    for cells in _case_cells(report):
        table.add_row(*cells)
    Console().print(table)


SCHEMA = 1


def to_jsonl(report: dict) -> str:
    """The run as ``bench.jsonl`` text (see the module docstring)."""
    head = {
        "record": "run",
        "schema": SCHEMA,
        "env": report["env"],
        "tuned": report.get("tuned", []),
    }
    lines = [json.dumps(head)] + [json.dumps({"record": "result", **r}) for r in report["results"]]
    return "\n".join(lines) + "\n"


def read_jsonl(path: str) -> dict:
    """A run read back from ``bench.jsonl``: ``{"env", "tuned", "results"}``."""
    report = {"env": {}, "tuned": [], "results": []}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            kind = rec.pop("record", None)
            if kind == "run":
                if rec.get("schema") != SCHEMA:
                    raise ValueError(f"{path}: schema {rec.get('schema')!r}, this reads {SCHEMA}")
                report["env"], report["tuned"] = rec["env"], rec.get("tuned", [])
            elif kind == "result":
                report["results"].append(rec)
            else:
                raise ValueError(f"{path}:{n}: record must be 'run' or 'result', got {kind!r}")
    return report


def write_report(
    report: dict, out_dir: str, with_plots: bool = True, with_record: bool = True
) -> list[str]:
    """bench.jsonl (every figure and the environment; ``with_record``), bench.md and the
    plots, in ``out_dir``. Returns the files written."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    written = []
    if with_record:
        written.append(os.path.join(out_dir, "bench.jsonl"))
        with open(written[-1], "w") as f:
            f.write(to_jsonl(report))
    written.append(os.path.join(out_dir, "bench.md"))
    with open(written[-1], "w") as f:
        f.write(markdown(report) + "\n")
    return written + (plots(report, out_dir) if with_plots else [])
