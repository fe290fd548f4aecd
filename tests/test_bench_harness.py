"""The benchmark harness on CPU: cases, FLOP counting, report files, plots, failure rows.
No timing is asserted."""

import pytest
import torch

from blocksparse_attn.tools.bench_cases import (
    Case,
    anchor_cases,
    dense_flops,
    density_cases,
    flops,
    pattern_layout,
    quick_cases,
)
from blocksparse_attn.tools.bench_harness import time_backend
from blocksparse_attn.tools.bench_report import markdown, plots, read_jsonl, write_report


def test_anchor_cases_reproduce_perf_md_densities():
    # densities from PERF.md's anchor table
    expected = {
        ("window_global", 16384, 128): 0.054,
        ("window_global", 16384, 64): 0.050,
        ("window_global", 16384, 32): 0.048,
        ("causal_fixed", 16384, 64): 0.078,
        ("window_global", 4096, 64): 0.193,
        ("causal_dense", 8192, 128): 0.51,
        ("dense", 8192, 128): 1.0,
    }
    cases = anchor_cases()
    assert len(cases) == 11 and len({c.name for c in cases}) == 11
    for c in cases:
        d = float((c.layout() != 0).float().mean())
        assert d == pytest.approx(expected[(c.pattern, c.seq_len, c.block)], abs=0.005)


def test_density_cases():
    cases = density_cases()
    assert {c.block for c in cases} == {64, 128} and len(cases) == 14
    low = next(c for c in cases if c.block == 128 and c.density == 0.01)
    assert 0.01 <= float(low.layout().float().mean()) < 0.03  # 1% plus the diagonal
    assert torch.equal(low.layout(), low.layout())  # seeded


def test_flops_by_hand():
    # 3 kept blocks of 16 x 16, B=2, H=4 (layout shared by the heads), D=8
    case = Case("dense", 32, 2, 4, 8, 16)
    layout = torch.tensor([[[1, 1], [0, 1]]])
    assert flops(case, layout, "fwd") == 4 * 2 * (3 * 4) * 16 * 16 * 8
    assert flops(case, layout, "fwd+bwd") == 3.5 * 4 * 2 * 12 * 256 * 8
    per_head = torch.ones(4, 2, 2, dtype=torch.long)
    assert flops(case, per_head, "fwd") == 4 * 2 * 16 * 256 * 8 == dense_flops(case, "fwd")


def test_pattern_errors():
    with pytest.raises(ValueError, match="multiple of block=64"):
        pattern_layout("dense", 100, 64)
    with pytest.raises(ValueError, match="pattern must be one of"):
        pattern_layout("zigzag", 128, 64)
    with pytest.raises(ValueError, match="needs 0 < density <= 1"):
        pattern_layout("random", 128, 64)


def synthetic_report():
    case = Case("random", 8192, 2, 8, 128, 64, density=0.1)
    rows = []
    for backend, ms in (("fused", 1.0), ("flex", 2.0), ("fa4", 0.8), ("sdpa_cudnn", 3.0)):
        rows.append(
            dict(
                case.as_dict(),
                backend=backend,
                mode="fwd+bwd",
                dtype="bfloat16",
                ms=ms,
                tflops=100.0 / ms,
                peak_mib=64.0,
                peak_total_mib=200.0,
                density=0.1,
                flex_over_this=2.0 / ms,
                fa4_over_this=0.8 / ms,
                graph_ms=ms / 2,
                flex_over_this_graph=2.0 / ms,
                fa4_over_this_graph=0.8 / ms,
            )
        )
    rows[-1].update(graph_ms=None, graph_error="RuntimeError: capture failed")
    rows.append(
        dict(
            case.as_dict(),
            backend="sdpa_mask",
            mode="fwd+bwd",
            dtype="bfloat16",
            ms=None,
            tflops=None,
            peak_mib=None,
            density=0.1,
            flex_over_this=None,
            error="RuntimeError: dense mask too large",
        )
    )
    for L, ms, fits in ((65536, 5.0, True), (131072, 11.0, False)):
        rows.append(
            dict(
                Case("window_global", L, 1, 16, 64, 128).as_dict(),
                backend="fused",
                mode="fwd+bwd",
                dtype="bfloat16",
                ms=ms,
                tflops=1.0,
                peak_mib=1.0,
                peak_total_mib=100.0 * L / 65536,
                suite="max_length",
                fits=fits,
            )
        )
    rows.append(
        dict(
            Case("window_global", 65536, 1, 16, 64, 128).as_dict(),
            backend="sdpa_cudnn",
            mode="fwd+bwd",
            dtype="bfloat16",
            ms=2500.0,
            tflops=1.0,
            peak_mib=1.0,
            peak_total_mib=50.0,
            suite="max_length",
            fits=True,
            stop="step > 2 s",
        )
    )
    rows.append(
        dict(
            suite="matmul",
            op="dsd",
            seq_len=8192,
            batch=2,
            heads=8,
            head_dim=128,
            block=64,
            density=0.1,
            dtype="bfloat16",
            ms=0.5,
            tflops=300.0,
            dense_ms=2.0,
            dense_tflops=600.0,
            of_dense=0.5,
        )
    )
    rows.append(
        dict(
            suite="index_cost",
            seq_len=4096,
            heads=16,
            block=64,
            ours_ms=0.5,
            flex_ms=None,
            flex_error="OutOfMemoryError: 32 GiB",
        )
    )
    env = {
        "torch": "2.13.0",
        "triton": "3.6.0",
        "python": "3.11",
        "date": "2026-11-26",
        "gpu": "test card",
    }
    tuned = [
        {
            "kernel": "_bsa_fwd_kernel",
            "dtype": "bfloat16",
            "key": {"HEAD_DIM": 128, "CAUSAL": True},
            "options": {"DESC": 1, "num_warps": 8, "num_stages": 2, "maxnreg": 128},
        }
    ]
    return {"env": env, "results": rows, "tuned": tuned}


def test_markdown_rendering():
    text = markdown(synthetic_report())
    assert "test card, torch 2.13.0, triton 3.6.0, 2026-11-26" in text
    row = "| random0.1 L8192 B2 H8 D128 block64 | bfloat16 | fwd+bwd | fused | 1.000 | 100 | 64 |"
    assert row + " 2.00 | 0.80 | 0.500 | 2.00 | 0.80 |" in text
    assert "| 3.000 | 33 | 64 | 0.67 | 0.27 | RuntimeError: capture failed |" in text
    assert "RuntimeError: dense mask too large" in text
    assert (
        "| _bsa_fwd_kernel | bfloat16 | HEAD_DIM=128 CAUSAL=1 | DESC=1 num_warps=8 "
        "num_stages=2 maxnreg=128 |"
    ) in text
    assert "| fused | 65,536 | 5.00 | 100 | memory > 80% |" in text
    assert "| 4,096 | 16 | 64 | 0.500 | OutOfMemoryError: 32 GiB |" in text
    assert "| sdpa_cudnn | 65,536 | 2500.00 | 50 | step > 2 s |" in text
    assert "density 0.10, L8192 B2 H8 D128, bfloat16" in text
    assert "| dsd | 64 | 0.500 | 300 | 600 | 50% |" in text


def test_report_files_and_plots(tmp_path):
    written = write_report(synthetic_report(), str(tmp_path))
    names = sorted(p.split("/")[-1] for p in written)
    assert names == ["bench.jsonl", "bench.md", "speedup_vs_density.png", "time_vs_length.png"]
    data = read_jsonl(str(tmp_path / "bench.jsonl"))
    assert set(data) == {"env", "results", "tuned"}
    required = {"backend", "mode", "dtype", "ms", "tflops", "peak_mib", "name", "seq_len", "block"}
    assert all(required <= set(r) for r in data["results"] if "suite" not in r)
    for png in ("speedup_vs_density.png", "time_vs_length.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots({"env": synthetic_report()["env"], "results": []}, str(tmp_path)) == []


def test_flashattention4_rows_say_why_they_did_not_run(monkeypatch):
    """FlashAttention-4's columns (its default and its deterministic backward): a block
    other than 128 and a token-causal case say so;
    without ``flash_attn.cute`` the row names the missing package and where its wheels
    come from (nothing is timed, nothing raised)."""
    import sys

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not importable, as on CPU CI
    layout = torch.ones(2, 2, 2)
    for case, words in (
        (Case("dense", 128, 1, 2, 64, 64), "block 128 (block 64)"),
        (Case("dense", 256, 1, 2, 64, 128, causal=True), "mask_mod"),
        (Case("dense", 256, 1, 2, 64, 128), "fa4-wheels.sh"),
    ):
        for backend in ("fa4", "fa4_det"):
            row = time_backend(backend, case, layout, "fwd", torch.bfloat16, device="cpu")
            assert row["ms"] is None and words in row["error"], row["error"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_rows_are_timed_eager_and_from_a_cuda_graph():
    """On a GPU each backend's row has its eager time and its time replayed from a CUDA
    graph (forward and forward+backward), and the ratios to FlexAttention come in both
    kinds."""
    from blocksparse_attn.tools.bench_suites import run

    case = Case("random", 1024, 1, 2, 64, 64, density=0.3)
    report = run([case], backends=("fused", "flex"), progress=False)
    assert len(report["results"]) == 4
    for r in report["results"]:
        assert r["ms"] > 0 and r["graph_ms"] > 0, r
        assert r["flex_over_this_graph"] > 0, r


def test_longest_sequence_search_asks_for_no_graph(monkeypatch):
    """The longest-sequence search times eager steps only: a CUDA graph of its largest
    steps would hold a second copy of their memory."""
    from types import SimpleNamespace

    from blocksparse_attn.tools import bench_harness
    from blocksparse_attn.tools.bench_suites import max_length_search

    asked = []

    def fake_time_backend(backend, case, layout, mode, dtype, device="cuda", graph=True):
        asked.append(graph)
        return dict(backend=backend, ms=1.0, peak_total_mib=1.0)

    monkeypatch.setattr(bench_harness, "time_backend", fake_time_backend)
    memory = SimpleNamespace(total_memory=2**40)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: memory)
    rows = max_length_search(backends=("fused",), start=65536, stop=131072, progress=False)
    assert [r["seq_len"] for r in rows] == [65536, 131072]
    assert asked == [False, False]


def test_cpu_rows_have_no_graph_time():
    """On the CPU a row has its wall-clock time only: no CUDA graph, no graph ratio."""
    from blocksparse_attn.tools.bench_suites import run

    case = Case("random", 256, 1, 2, 32, 64, density=0.5)
    report = run([case], backends=("reference",), modes=("fwd",), progress=False, device="cpu")
    (row,) = report["results"]
    assert row["ms"] > 0
    assert "graph_ms" not in row and row["flex_over_this_graph"] is None


def test_unsupported_backend_reason_is_recorded():
    case = Case("dense", 65536, 1, 16, 64, 128)
    row = time_backend(
        "sdpa_mask",
        case,
        torch.ones(1, 1, 1, dtype=torch.bool).expand(16, 512, 512),
        "fwd",
        torch.bfloat16,
        device="cpu",
    )
    assert row["ms"] is None and "exceeds the 4 GiB limit" in row["error"]
    row = time_backend("nope", case, torch.ones(1, 2, 2), "fwd", torch.bfloat16, device="cpu")
    assert row["ms"] is None and "backend must be one of" in row["error"]


def fake_result(backend, mode, ms=1.0):
    """A timed step as ``time_backend`` returns it."""
    return {
        "backend": backend,
        "mode": mode,
        "dtype": "bfloat16",
        "ms": ms,
        "tflops": 1.0,
        "peak_mib": 1.0,
        "peak_total_mib": 1.0,
    }


def fake_gpu_bench(monkeypatch, time_backend):
    """``bench`` as on a GPU machine, timing with ``time_backend``."""
    from blocksparse_attn.tools import bench, bench_harness

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_harness, "time_backend", time_backend)
    monkeypatch.setattr(
        bench_harness,
        "environment",
        lambda: {"torch": "t", "triton": "tr", "python": "p", "date": "d", "gpu": "card"},
    )
    return bench


def test_run_cut_short_keeps_every_timed_step(tmp_path, monkeypatch):
    from blocksparse_attn.tools.cli import build_parser

    timed = []

    def fake_time_backend(backend, case, layout, mode, dtype, device="cuda"):
        if len(timed) == 4:  # the third step (two backends per step): a time limit strikes
            raise KeyboardInterrupt
        timed.append(backend)
        return fake_result(backend, mode, ms=1.0 + len(timed))

    bench = fake_gpu_bench(monkeypatch, fake_time_backend)
    args = build_parser().parse_args(
        ["bench", "--suite", "anchors", "--backends", "fused", "flex", "--out", str(tmp_path)]
    )
    with pytest.raises(KeyboardInterrupt):
        bench.bench_main(args)
    rows = read_jsonl(str(tmp_path / "bench.jsonl"))["results"]
    assert [(r["backend"], r["mode"], r["ms"]) for r in rows] == [
        ("fused", "fwd", 2.0),
        ("flex", "fwd", 3.0),
        ("fused", "fwd+bwd", 4.0),
        ("flex", "fwd+bwd", 5.0),
    ]
    assert rows[0]["name"] == "dense L8192 B4 H8 D128 block128"
    md = (tmp_path / "bench.md").read_text()
    assert "| dense L8192 B4 H8 D128 block128 | bfloat16 | fwd+bwd | flex | 5.000 |" in md
    assert not list(tmp_path.glob("*.png"))  # plots only at the end of a section


def test_match_selects_cases_by_name(tmp_path, monkeypatch, capsys):
    from blocksparse_attn.tools.cli import build_parser

    timed = []

    def fake_time_backend(backend, case, layout, mode, dtype, device="cuda"):
        timed.append(case.name)
        return fake_result(backend, mode)

    bench = fake_gpu_bench(monkeypatch, fake_time_backend)
    from blocksparse_attn.tools import bench_report

    monkeypatch.setattr(bench_report, "plots", lambda report, out_dir: [])
    parse = build_parser().parse_args
    args = parse(
        [
            "bench",
            "--suite",
            "anchors",
            "--backends",
            "fused",
            "--mode",
            "fwd",
            "--match",
            "causal_fixed",
            "L4096 B8 H16",
            "--out",
            str(tmp_path),
        ]
    )
    assert bench.bench_main(args) == 0
    assert timed == [
        "causal_fixed+causal L16384 B2 H8 D128 block64",
        "window_global L4096 B8 H16 D64 block64",
    ]

    timed.clear()
    args = parse(["bench", "--suite", "anchors", "--match", "dense", "no_such_case"])
    assert bench.bench_main(args) == 2
    err = capsys.readouterr().err
    assert "'no_such_case' is in no case name" in err and "causal_fixed+causal L16384" in err
    assert timed == []


def test_tuned_options_name_kernel_key_and_choice(monkeypatch):
    from types import SimpleNamespace

    from blocksparse_attn.kernels import _common

    class Kernel:  # an autotuned kernel as the cache holds it (hashable)
        fn = SimpleNamespace(__name__="_bsa_bwd_dq_kernel")
        keys = ["HEAD_DIM", "STORE_DS"]

    kernel = Kernel()
    options = {"DESC": 0, "num_warps": 4, "num_stages": 3, "maxnreg": None}
    monkeypatch.setattr(_common, "_TUNED", {(kernel, torch.float16, "cuda", 64, False): options})
    assert _common.tuned_options() == [
        {
            "kernel": "_bsa_bwd_dq_kernel",
            "dtype": "float16",
            "key": {"HEAD_DIM": 64, "STORE_DS": False},
            "options": options,
        }
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of bench --quick")
def test_quick_bench_on_cpu_writes_the_report(tmp_path, capsys):
    from blocksparse_attn.tools.cli import main

    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    report = read_jsonl(str(tmp_path / "bench.jsonl"))
    rows = report["results"]
    assert [(r["name"].split()[0], r["mode"], r["backend"]) for r in rows] == [
        ("window_global", "fwd", "reference"),
        ("window_global", "fwd+bwd", "reference"),
        ("causal_fixed+causal", "fwd", "reference"),
        ("causal_fixed+causal", "fwd+bwd", "reference"),
    ]
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["peak_mib"] is None for r in rows)
    assert "cpu" in report["env"] and (tmp_path / "cases.png").stat().st_size > 0
    md = (tmp_path / "bench.md").read_text()
    assert "| window_global L1024 B1 H2 D64 block64 | float32 | fwd | reference |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of bench")
def test_full_bench_on_cpu_says_what_runs(capsys):
    from blocksparse_attn.tools.cli import main

    assert main(["bench", "--suite", "anchors"]) == 2
    assert "'bench --quick' times the PyTorch reference" in capsys.readouterr().err


def test_tables_and_plots_from_a_recorded_run(tmp_path, capsys):
    from blocksparse_attn.tools.cli import main

    report = {
        "env": {"torch": "t", "triton": "tr", "python": "p", "date": "d", "gpu": "card"},
        "tuned": [],
        "results": [
            {
                **Case("window_global", 1024, 1, 2, 64, 64).as_dict(),
                "backend": b,
                "mode": "fwd",
                "dtype": "bfloat16",
                "ms": ms,
                "tflops": 1.0,
                "peak_mib": 2.0,
                "peak_total_mib": 3.0,
                "flex_over_this": 2.0 / ms,
            }
            for b, ms in (("fused", 1.0), ("flex", 2.0))
        ],
    }
    write_report(report, str(tmp_path / "run"))
    assert read_jsonl(str(tmp_path / "run" / "bench.jsonl")) == report
    assert (
        main(
            [
                "bench",
                "--from",
                str(tmp_path / "run" / "bench.jsonl"),
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    again = (tmp_path / "again" / "bench.md").read_text()
    assert again == (tmp_path / "run" / "bench.md").read_text()
    assert (tmp_path / "again" / "cases.png").exists()
    assert not (tmp_path / "again" / "bench.jsonl").exists()  # the record is not rewritten
    (tmp_path / "bad.jsonl").write_text('{"record": "run", "schema": 9, "env": {}}\n')
    assert main(["bench", "--from", str(tmp_path / "bad.jsonl")]) == 2
    assert "schema 9, this reads 1" in capsys.readouterr().err


def test_a_record_that_is_not_a_run_is_refused(tmp_path, capsys):
    from blocksparse_attn.tools.cli import main

    (tmp_path / "odd.jsonl").write_text('{"record": "note"}\n')
    assert main(["bench", "--from", str(tmp_path / "odd.jsonl")]) == 2
    assert "odd.jsonl:1: record must be 'run' or 'result', got 'note'" in capsys.readouterr().err
    assert main(["bench", "--from", str(tmp_path / "missing.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_gqa_suite_times_native_repeated_and_peers(tmp_path, monkeypatch):
    from blocksparse_attn.tools.cli import build_parser

    timed = []

    def fake_time_backend(backend, case, layout, mode, dtype, device="cuda"):
        timed.append((case.name, backend))
        return fake_result(backend, mode)

    bench = fake_gpu_bench(monkeypatch, fake_time_backend)
    from blocksparse_attn.tools import bench_report

    monkeypatch.setattr(bench_report, "plots", lambda report, out_dir: [])
    args = build_parser().parse_args(
        ["bench", "--suite", "gqa", "--backends", "fused", "flex", "--mode", "fwd"]
        + ["--match", "block64", "--out", str(tmp_path)]
    )
    assert bench.bench_main(args) == 0
    name = "window_global+causal L16384 B1 H32 Hkv8 D128 block64"
    assert timed == [(name, "fused"), (name, "fused_repeat"), (name, "flex")]


def test_grouped_query_case_on_cpu():
    # the inputs carry H_kv heads; every way of running them agrees on the FLOPs
    case = Case("window_global", 256, 1, 4, 16, 32, causal=True, kv_heads=2)
    assert case.name == "window_global+causal L256 B1 H4 Hkv2 D16 block32"
    row = time_backend("reference", case, case.layout(), "fwd+bwd", torch.float32, "cpu")
    assert row["ms"] > 0 and "error" not in row
    assert row["tflops"] == pytest.approx(flops(case, case.layout(), "fwd+bwd") / row["ms"] / 1e9)


def test_dynamic_step_on_cpu_and_its_table():
    # the suite's code path at a tiny size on the CPU (reference backend, wall clock; no
    # CUDA graph or FlexAttention rows there); no timing is asserted
    from blocksparse_attn.tools.bench_suites import dynamic_step

    rows = dynamic_step(
        blocks=(32,),
        seq_len=256,
        heads=2,
        head_dim=16,
        topk=2,
        dtype=torch.float32,
        device="cpu",
        progress=False,
        timer=lambda fn: (fn(), 1.0)[1],
    )
    (row,) = rows
    assert row["suite"] == "dynamic" and row["block"] == 32 and row["index_tiles"]
    assert row["per_sample_over_shared"] == 1.0 and "step_graph_ms" not in row
    text = markdown({"env": {"torch": "t", "triton": "tr", "date": "d"}, "results": rows})
    assert "| 256 | 2 | 16 | 32 | 2 | 1.000 |  | 1.000 | 1.000 |  |  | 1.000 |" in text


def test_fa4_selection_step_says_why_it_cannot_run():
    # the dynamic suite's FlashAttention-4 column where flash_attn.cute is not installed:
    # the reason, no time
    try:
        import flash_attn.cute  # noqa: F401

        pytest.skip("flash_attn.cute is installed here")
    except ImportError:
        pass
    from blocksparse_attn import topk_blocks
    from blocksparse_attn.tools.bench_suites import _fa4_selection_step

    leaves = [torch.randn(1, 2, 256, 8, requires_grad=True) for _ in range(3)]

    def select():
        return topk_blocks(*leaves[:2], block=128, topk=1, causal=True, keep_diagonal=True)

    row = _fa4_selection_step(select, leaves, torch.randn(1, 2, 256, 8), 256, lambda fn: 1.0)
    assert set(row) == {"fa4_error"} and "fa4-wheels.sh" in row["fa4_error"]


@pytest.mark.parametrize("block", [64, 128])
def test_flex_selection_mask_keeps_the_selection(block):
    # FlexAttention's mask of a top-k selection narrower than nb_k (what the dynamic suite
    # hands FlexAttention): its dense grid at 128-token tiles is the selection's, coarsened
    pytest.importorskip("torch.nn.attention.flex_attention")
    from blocksparse_attn import topk_blocks
    from blocksparse_attn.tools.bench_suites import _flex_selection_mask

    L = 1024
    q, k = torch.randn(1, 2, L, 8), torch.randn(1, 2, L, 8)
    lists = topk_blocks(q, k, block=block, topk=2, causal=True, keep_diagonal=True)
    assert lists.indices.shape[-1] < L // block
    mask = _flex_selection_mask(lists, block, L)
    grid = lists.to_layout(L // block)
    tiles = grid.view(1, 2, L // 128, 128 // block, L // 128, 128 // block).any(5).any(3)
    assert torch.equal(mask.to_dense().bool(), tiles)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_window_global_config_is_the_window_global_pattern(block):
    from blocksparse_attn.tools.bench_cases import pattern_layout, window_global_config

    config = window_global_config(block)
    for n_blocks in (17, 31, 114):  # at least the window (DeepSpeed's rule for the config)
        grid = config.make_layout(n_blocks * block) != 0
        assert torch.equal(grid, pattern_layout("window_global", n_blocks * block, block))


def test_varlen_and_decode_suites_on_cpu_and_their_tables():
    # the suites' code paths at tiny sizes on the CPU (reference backend, no FlexAttention
    # rows there); no timing is asserted
    from blocksparse_attn.tools.bench_serving import (
        decode_suite,
        document_lengths,
        varlen_suite,
    )

    lengths = document_lengths(1000, 4, 100, 400, 16)
    assert sum(lengths) == 1000 and len(lengths) == 4
    assert any(n % 16 for n in lengths)  # lengths off the block are part of the case

    def timer(fn):
        fn()
        return 2.0

    common = dict(heads=2, head_dim=16, dtype=torch.float32, device="cpu", timer=timer)
    # documents of at least the pattern's 33-block window at block 16
    (packed,) = varlen_suite(total=1800, docs=3, block=16, progress=False, **common)
    assert packed["packed_over_padded"] == 1.0 and sum(packed["lengths"]) == 1800
    assert packed["packed_new_batch_ms"] == 2.0
    (dec,) = decode_suite(batch=2, context=256, kv_heads=1, block=16, progress=False, **common)
    assert dec["selected_mib"] > 0 and dec["gb_per_s"] > 0
    text = markdown({"env": {"torch": "t", "triton": "tr", "date": "d"}, "results": [packed, dec]})
    assert "| 2.000 | 2.000 | 1.00 |" in text and "Decoding one token (B2, context 256" in text
    assert "| 2.0000 / - |" in text  # no CUDA graph on the CPU


def test_fused_nondet_backend_asks_for_the_faster_backward(monkeypatch):
    """``--backends fused_nondet`` is the fused backend with ``deterministic=False``; the
    CLI offers every harness backend, all but that one and ``fa4_det`` by default."""
    from blocksparse_attn import functional
    from blocksparse_attn.tools import bench_harness, cli

    seen = []
    monkeypatch.setattr(functional, "block_sparse_attention", lambda *a, **kw: seen.append(kw))
    case = quick_cases()[1]
    layout = torch.ones(1, 16, 16, dtype=torch.long)
    for backend in ("fused", "fused_nondet"):
        bench_harness._attention_fn(backend, case, layout, "cpu")(None, None, None)
    assert [(kw["backend"], kw.get("deterministic", True)) for kw in seen] == [
        ("fused", True),
        ("fused", False),
    ]
    action = next(
        a
        for sub in cli.build_parser()._subparsers._group_actions[0].choices.values()
        for a in sub._actions
        if a.dest == "backends"
    )
    assert tuple(action.choices) == bench_harness.BACKENDS
    by_name = ("fused_nondet", "fa4_det")
    assert action.default == [b for b in bench_harness.BACKENDS if b not in by_name]
