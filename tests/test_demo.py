"""The demo (the README's main command) trains, and its sparse model learns the recall."""

import math

import pytest

from blocksparse_attn.tools.cli import build_parser
from blocksparse_attn.tools.demo import recall_batch, vocab_size


def run_demo(argv):
    from blocksparse_attn.tools.demo import demo_main

    return demo_main(build_parser().parse_args(["demo", *argv]))


@pytest.mark.slow
def test_sparse_model_learns_recall_below_chance(capsys):
    (sparse,) = run_demo(["--no-dense", "--device", "cpu"])
    assert sparse["last"] < 0.6 * math.log(8) < sparse["first"]
    out = capsys.readouterr().out
    assert "| sparse |" in out and "tokens/s" in out and "peak memory" in out
    assert "XXXX....." in out  # the layout picture


def test_short_run_with_dense_comparison(capsys):
    runs = run_demo(["--steps", "12", "--seq-len", "128", "--batch", "4", "--device", "cpu"])
    assert [r["name"] for r in runs] == ["sparse", "dense"]
    assert all(r["last"] < r["first"] for r in runs)


def test_bad_length():
    with pytest.raises(SystemExit, match="multiple of 4\\*block = 64 \\(four windows\\)"):
        run_demo(["--seq-len", "100", "--device", "cpu"])
    with pytest.raises(SystemExit, match="multiple of window\\*block = 48"):
        run_demo(["--seq-len", "128", "--window", "3", "--device", "cpu"])


def test_recall_batch():
    import torch

    g = torch.Generator().manual_seed(0)
    tokens, targets = recall_batch(3, 128, 16, 4, 8, 8, g, "cpu")
    assert tokens.shape == targets.shape == (3, 128)
    pairs = tokens[:, 48:64] - (64 + 8)  # the whole summary block of window 0: the table twice
    assert bool((pairs >= 0).all()) and int(tokens.max()) < vocab_size(8)
    assert bool((pairs[:, :8] == pairs[:, 8:]).all())
    assert bool((tokens[:, :48] < 64).all()) and bool((tokens[:, 64:].lt(64).sum(1) == 56).all())
    assert bool((targets[:, 64:72] < 8).all()) and int((targets != -100).sum()) == 3 * 8
    # each query's target is the value stored with its key in the memory block
    for b in range(3):
        table = {int(p) // 8: int(p) % 8 for p in pairs[b]}
        for key, value in zip(tokens[b, 64:72] - 64, targets[b, 64:72]):
            assert table[int(key)] == int(value)
