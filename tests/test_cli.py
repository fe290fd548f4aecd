"""The command line: layout and env."""

import subprocess
import sys

import pytest

from blocksparse_attn.tools.cli import main


def test_layout_prints_grid_and_density(capsys):
    assert main(["layout", "--pattern", "fixed", "--seq-len", "128", "--block", "16"]) == 0
    out = capsys.readouterr().out
    assert "FixedSparsityConfig(num_heads=1, block=16" in out
    assert "40 blocks kept of 64 (density 0.6250)" in out
    assert "XXXX...X\n...XXXXX" in out


def test_layout_downsampled_with_legend(capsys):
    main(
        [
            "layout",
            "--pattern",
            "sliding",
            "--seq-len",
            "4096",
            "--block",
            "16",
            "--attention",
            "bidirectional",
        ]
    )
    out = capsys.readouterr().out
    assert "each cell is 4x4 blocks" in out
    assert "\n++" + "." * 62 + "\n+++" + "." * 61 + "\n" in out


def test_layout_png(tmp_path, capsys):
    path = tmp_path / "layout.png"
    main(
        [
            "layout",
            "--pattern",
            "bigbird",
            "--seq-len",
            "512",
            "--heads",
            "2",
            "--different-layout-per-head",
            "--seed",
            "3",
            "--png",
            str(path),
            "--all-heads",
        ]
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "head 1:" in out


def test_layout_rejects_option_of_other_pattern():
    with pytest.raises(SystemExit, match="--num-local-blocks not used by --pattern bigbird"):
        main(["layout", "--pattern", "bigbird", "--seq-len", "128", "--num-local-blocks", "3"])


def test_layout_reports_config_errors():
    with pytest.raises(SystemExit, match="Sequence Length, 100"):
        main(["layout", "--pattern", "dense", "--seq-len", "100"])


def test_env(capsys):
    main(["env"])
    out = capsys.readouterr().out
    for word in ("torch", "triton", "numpy", "kernels", "backend='auto'"):
        assert word in out


def test_console_script_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "blocksparse_attn.tools.cli", "--help"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "layout" in r.stdout


def test_output_piped_into_a_reader_that_stops_early():
    # 68 KB of layout pictures into a pipe closed after one line (`| head -1`)
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "blocksparse_attn.tools.cli",
        "layout",
        "--pattern",
        "bigbird",
        "--seq-len",
        "16384",
        "--block",
        "16",
        "--heads",
        "16",
        "--all-heads",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith(b"BigBirdSparsityConfig")
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "BrokenPipeError" not in err and "Traceback" not in err


def test_png_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "layout",
                "--pattern",
                "fixed",
                "--seq-len",
                "128",
                "--block",
                "16",
                "--png",
                str(tmp_path / "x.png"),
            ]
        )
    assert "pip install 'blocksparse-attn[bench]'" in str(e.value)


def test_sanitize_script_refuses_unknown_sections(capsys):
    """``scripts/sanitize_kernels.py`` runs the sections named on its command line; a name it
    does not know stops it before any kernel runs, listing the sections there are."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "sanitize_kernels.py"
    spec = importlib.util.spec_from_file_location("sanitize_kernels", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["hopper", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown sections ['bogus']" in err
    assert "fused, parts, topk, hopper, varlen, decode" in err
