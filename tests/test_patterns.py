"""Sparsity patterns: the worked grids of the DeepSpeed study (spec 1.3-1.8), validation
errors, random-pattern reproducibility."""

import random

import pytest
import torch

from blocksparse_attn import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LayoutSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
)

from helpers import assert_raises_with, grid

B = 16  # block used by every golden example


def heads(config, nb):
    return config.make_layout(nb * B)


# --- Fixed (spec 1.3) ---------------------------------------------------------------------
FIXED_BI = """XXXX...X
XXXX...X
XXXX...X
XXXX...X
...XXXXX
...XXXXX
...XXXXX
...XXXXX"""
FIXED_UNI = """X.......
XX......
XXX.....
XXXX....
...XX...
...XXX..
...XXXX.
...XXXXX"""
FIXED_HORIZONTAL = """XXXX...X
XXXX...X
XXXX...X
XXXXXXXX
...XXXXX
...XXXXX
...XXXXX
XXXXXXXX"""
FIXED_PATTERNS_UNI = [
    """X.......
XX......
XXX.....
XXXX....
...XX...
...XXX..
...XXXX.
...XXXXX""",
    """X.......
XX......
XXX.....
XXXX....
..X.X...
..X.XX..
..X.XXX.
..X.XXXX""",
    """X.......
XX......
XXX.....
XXXX....
.X..X...
.X..XX..
.X..XXX.
.X..XXXX""",
    """X.......
XX......
XXX.....
XXXX....
X...X...
X...XX..
X...XXX.
X...XXXX""",
]
FIXED_G2_PATTERNS = [
    """XXXX..XX
XXXX..XX
XXXX..XX
XXXX..XX
..XXXXXX
..XXXXXX
..XXXXXX
..XXXXXX""",
    """XXXXXX..
XXXXXX..
XXXXXX..
XXXXXX..
XX..XXXX
XX..XXXX
XX..XXXX
XX..XXXX""",
]
FIXED_TRAILING_6 = """XXXX.X
XXXX.X
XXXX.X
XXXX.X
...XXX
...XXX"""
FIXED_W3_10 = """XXX..X..XX
XXX..X..XX
XXX..X..XX
..XXXX..XX
..XXXX..XX
..XXXX..XX
..X..XXXXX
..X..XXXXX
..X..XXXXX
..X..X..XX"""
FIXED_UNI_G2 = """X.......
XX......
XXXX....
XXXX....
..XXX...
..XXXX..
..XXXXXX
..XXXXXX"""


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, FIXED_BI),
        ({"attention": "unidirectional"}, FIXED_UNI),
        ({"horizontal_global_attention": True}, FIXED_HORIZONTAL),
        ({"attention": "unidirectional", "num_global_blocks": 2}, FIXED_UNI_G2),
    ],
)
def test_fixed_grids(kwargs, expected):
    layout = heads(FixedSparsityConfig(num_heads=2, **kwargs), 8)
    assert layout.dtype == torch.int64 and layout.shape == (2, 8, 8)
    for h in range(2):  # head 0 propagated
        assert torch.equal(layout[h], grid(expected))


def test_fixed_different_global_patterns():
    cfg = FixedSparsityConfig(
        num_heads=4,
        different_layout_per_head=True,
        num_different_global_patterns=4,
        attention="unidirectional",
    )
    layout = heads(cfg, 8)
    for h in range(4):
        assert torch.equal(layout[h], grid(FIXED_PATTERNS_UNI[h]))
    cfg = FixedSparsityConfig(
        num_heads=2,
        different_layout_per_head=True,
        num_global_blocks=2,
        num_different_global_patterns=2,
    )
    layout = heads(cfg, 8)
    for h in range(2):
        assert torch.equal(layout[h], grid(FIXED_G2_PATTERNS[h]))


def test_fixed_trailing_window_clamp():
    assert torch.equal(heads(FixedSparsityConfig(1), 6)[0], grid(FIXED_TRAILING_6))
    assert torch.equal(heads(FixedSparsityConfig(1, num_local_blocks=3), 10)[0], grid(FIXED_W3_10))


# --- Variable (spec 1.4) ------------------------------------------------------------------
VAR_BI = """XXXX....
XXXX....
XXXX....
XXXX....
X...XXXX
X...XXXX
X...XXXX
X...XXXX"""
VAR_UNI = """X.......
XX......
XXX.....
XXXX....
X...X...
X...XX..
X...XXX.
X...XXXX"""
VAR_HORIZONTAL = """XXXXXXXX
XXXX....
XXXX....
XXXX....
X...XXXX
X...XXXX
X...XXXX
X...XXXX"""
VAR_WINDOWS = """X....X....
.XX..X....
.XX..X....
...XXX....
...XXX....
...XXX....
.....XXXX.
.....XXXX.
.....XXXX.
.....X...X"""
VAR_RANGES_UNI = """X.......
XXX.....
.XX.....
.XXX....
.XX.X...
.XX.XX..
.XX...X.
.XX...XX"""


@pytest.mark.parametrize(
    "kwargs, nb, expected",
    [
        ({}, 8, VAR_BI),
        ({"attention": "unidirectional"}, 8, VAR_UNI),
        ({"horizontal_global_attention": True}, 8, VAR_HORIZONTAL),
        ({"local_window_blocks": [1, 2, 3], "global_block_indices": [5]}, 10, VAR_WINDOWS),
        (
            {
                "local_window_blocks": [2],
                "global_block_indices": [1, 6],
                "global_block_end_indices": [3, 7],
                "attention": "unidirectional",
            },
            8,
            VAR_RANGES_UNI,
        ),
    ],
)
def test_variable_grids(kwargs, nb, expected):
    assert torch.equal(heads(VariableSparsityConfig(1, **kwargs), nb)[0], grid(expected))


# --- BigBird (spec 1.5) -------------------------------------------------------------------
BIGBIRD_BI = """XXXXXXXX
XXX.....
XXXX....
X.XXX...
X..XXX..
X...XXX.
X....XXX
X.....XX"""
BIGBIRD_UNI = """X.......
XX......
XXX.....
X.XX....
X..XX...
X...XX..
X....XX.
X.....XX"""
BIGBIRD_SEED0 = """XXXXXXXX
XXX...X.
XXXX....
X.XXX...
X..XXX.X
X...XXX.
X...XXXX
X.....XX"""


def test_bigbird_grids():
    assert torch.equal(heads(BigBirdSparsityConfig(1, num_random_blocks=0), 8)[0], grid(BIGBIRD_BI))
    uni = BigBirdSparsityConfig(1, num_random_blocks=0, attention="unidirectional")
    assert torch.equal(heads(uni, 8)[0], grid(BIGBIRD_UNI))
    random.seed(0)
    assert torch.equal(heads(BigBirdSparsityConfig(1), 8)[0], grid(BIGBIRD_SEED0))


def test_bigbird_unidirectional_many_random_blocks_does_not_crash():
    cfg = BigBirdSparsityConfig(
        2, num_random_blocks=3, attention="unidirectional", different_layout_per_head=True, seed=5
    )
    layout = heads(cfg, 16)
    assert torch.equal(layout, layout.tril())  # still block-causal
    # every row has at least min(3, row + 1) blocks at or before the diagonal
    assert bool((layout.sum(-1) >= torch.clamp(torch.arange(16) + 1, max=3)).all())


# --- BSLongformer (spec 1.6) --------------------------------------------------------------
LONGFORMER = {
    "default": (
        {},
        """XXXXXXXX
XXX.....
XXXX....
X.XXX...
X..XXX..
X...XXX.
X....XXX
X.....XX""",
    ),
    "uni": (
        {"attention": "unidirectional"},
        """X.......
XX......
XXX.....
X.XX....
X..XX...
X...XX..
X....XX.
X.....XX""",
    ),
    "win5_g04": (
        {"num_sliding_window_blocks": 5, "global_block_indices": [0, 4]},
        """XXXXXXXX
XXXXX...
XXXXX...
XXXXXX..
XXXXXXXX
X..XXXXX
X...XXXX
X...XXXX""",
    ),
    "even4": (
        {"num_sliding_window_blocks": 4, "global_block_indices": []},
        """XXX.....
XXXX....
XXXXX...
.XXXXX..
..XXXXX.
...XXXXX
....XXXX
.....XXX""",
    ),
    "range24": (
        {"global_block_indices": [2], "global_block_end_indices": [4]},
        """XXXX....
XXXX....
XXXXXXXX
XXXXXXXX
..XXXX..
..XXXXX.
..XX.XXX
..XX..XX""",
    ),
}


@pytest.mark.parametrize("name", sorted(LONGFORMER))
def test_bslongformer_grids(name):
    kwargs, expected = LONGFORMER[name]
    assert torch.equal(heads(BSLongformerSparsityConfig(1, **kwargs), 8)[0], grid(expected))


def test_bslongformer_ignores_global_index_beyond_sequence():
    a = heads(BSLongformerSparsityConfig(1, global_block_indices=[0, 50]), 8)
    assert torch.equal(a[0], grid(LONGFORMER["default"][1]))


# --- LocalSlidingWindow (spec 1.7) --------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (
            {},
            """X.......
XX......
.XX.....
..XX....
...XX...
....XX..
.....XX.
......XX""",
        ),
        (
            {"attention": "bidirectional"},
            """XX......
XXX.....
.XXX....
..XXX...
...XXX..
....XXX.
.....XXX
......XX""",
        ),
        (
            {"num_sliding_window_blocks": 4},
            """X.......
XX......
XXX.....
.XXX....
..XXX...
...XXX..
....XXX.
.....XXX""",
        ),
    ],
)
def test_sliding_window_grids(kwargs, expected):
    assert torch.equal(heads(LocalSlidingWindowSparsityConfig(3, **kwargs), 8)[1], grid(expected))


# --- Density table (spec 1.8) -------------------------------------------------------------
@pytest.mark.parametrize(
    "seq_len, expected",
    [
        (128, [40, 34, 37, 36, 15]),
        (256, [112, 74, 88, 76, 31]),
        (1024, [1216, 314, 373, 316, 127]),
        (2048, [4480, 634, 755, 636, 255]),
    ],
)
def test_density_table(seq_len, expected):
    configs = [
        FixedSparsityConfig(1),
        BSLongformerSparsityConfig(1),
        BigBirdSparsityConfig(1),
        VariableSparsityConfig(1),
        LocalSlidingWindowSparsityConfig(1),
    ]
    got = []
    for c in configs:
        random.seed(0)
        got.append(int(c.make_layout(seq_len).sum()))
    assert got == expected


def test_dense():
    layout = DenseSparsityConfig(3, block=32).make_layout(256)
    assert layout.shape == (3, 8, 8) and bool((layout == 1).all())


# --- Random patterns ----------------------------------------------------------------------
@pytest.mark.parametrize("cls", [BigBirdSparsityConfig, VariableSparsityConfig])
def test_random_patterns_reproduce(cls):
    kwargs = {"num_random_blocks": 2, "different_layout_per_head": True}
    a = cls(4, seed=123, **kwargs).make_layout(512)
    b = cls(4, seed=123, **kwargs).make_layout(512)
    c = cls(4, seed=124, **kwargs).make_layout(512)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # heads differ
    # a seeded config draws exactly what DeepSpeed draws after random.seed(seed)
    random.seed(123)
    assert torch.equal(a, cls(4, **kwargs).make_layout(512))
    gen = torch.Generator().manual_seed(7)
    d = cls(4, seed=gen, **kwargs)
    assert torch.equal(d.make_layout(512), d.make_layout(512))


def test_random_blocks_only_for_head_zero_when_shared():
    random.seed(1)
    layout = BigBirdSparsityConfig(3).make_layout(256)
    assert torch.equal(layout[0], layout[1]) and torch.equal(layout[0], layout[2])


# --- Validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, words",
    [
        (
            lambda: FixedSparsityConfig(4, num_local_blocks=4, num_global_blocks=3),
            ValueError,
            ["num_local_blocks", "divisible by num_global_blocks", "num_global_blocks=3"],
        ),
        (
            lambda: FixedSparsityConfig(4, attention="causal"),
            NotImplementedError,
            ["attention", "'unidirectional' or 'bidirectional'", "'causal'"],
        ),
        (
            lambda: FixedSparsityConfig(
                4, attention="unidirectional", horizontal_global_attention=True
            ),
            ValueError,
            ["horizontal_global_attention", "bidirectional"],
        ),
        (
            lambda: FixedSparsityConfig(4, num_different_global_patterns=2),
            ValueError,
            ["num_different_global_patterns", "different_layout_per_head=True"],
        ),
        (
            lambda: FixedSparsityConfig(
                4, different_layout_per_head=True, num_different_global_patterns=5
            ),
            ValueError,
            ["num_different_global_patterns", "<= num_local_blocks // num_global_blocks = 4"],
        ),
        (
            lambda: VariableSparsityConfig(
                4, global_block_indices=[0, 4], global_block_end_indices=[2]
            ),
            ValueError,
            ["global_block_end_indices", "as long as global_block_indices"],
        ),
        (
            lambda: VariableSparsityConfig(
                4, global_block_indices=[3], global_block_end_indices=[3]
            ),
            ValueError,
            ["global_block_end_indices", "start 3 with end 3"],
        ),
        (lambda: VariableSparsityConfig(4, attention="x"), NotImplementedError, ["attention"]),
        (
            lambda: VariableSparsityConfig(
                4, attention="unidirectional", horizontal_global_attention=True
            ),
            ValueError,
            ["horizontal_global_attention"],
        ),
        (
            lambda: VariableSparsityConfig(4, local_window_blocks=[]),
            ValueError,
            ["local_window_blocks"],
        ),
        (lambda: BigBirdSparsityConfig(4, attention="x"), NotImplementedError, ["attention"]),
        (
            lambda: BSLongformerSparsityConfig(
                4, global_block_indices=[5], global_block_end_indices=[1]
            ),
            ValueError,
            ["global_block_end_indices", "start 5 with end 1"],
        ),
        (lambda: DenseSparsityConfig(0), ValueError, ["num_heads", "an int >= 1", "0"]),
        (lambda: DenseSparsityConfig(2, block=0), ValueError, ["block"]),
        (lambda: BigBirdSparsityConfig(2, seed="x"), ValueError, ["seed", "torch.Generator"]),
    ],
)
def test_constructor_errors(make, error, words):
    assert_raises_with(error, words, make)


@pytest.mark.parametrize(
    "config, seq_len, words",
    [
        (
            FixedSparsityConfig(2),
            100,
            ["Sequence Length, 100", "Block size 16", "pad_to_block_size"],
        ),
        (BigBirdSparsityConfig(2, num_random_blocks=5), 64, ["num_random_blocks", "(4)", "5"]),
        (BigBirdSparsityConfig(2, num_sliding_window_blocks=9), 64, ["num_sliding_window_blocks"]),
        (
            BigBirdSparsityConfig(2, num_random_blocks=0, num_global_blocks=9),
            64,
            ["num_global_blocks"],
        ),
        (VariableSparsityConfig(2, num_random_blocks=9), 64, ["num_random_blocks"]),
        (
            BSLongformerSparsityConfig(2, num_sliding_window_blocks=9),
            64,
            ["num_sliding_window_blocks"],
        ),
        (
            LocalSlidingWindowSparsityConfig(2, num_sliding_window_blocks=9),
            64,
            ["num_sliding_window_blocks"],
        ),
    ],
)
def test_layout_time_errors(config, seq_len, words):
    assert_raises_with(ValueError, words, config.make_layout, seq_len)


def test_abstract_base_has_clear_error():
    with pytest.raises(NotImplementedError, match="abstract base"):
        SparsityConfig(num_heads=4).make_layout(64)
    assert SparsityConfig(4).setup_layout(64).shape == (4, 4, 4)


def test_layout_config_wraps_user_layout():
    user = (torch.rand(2, 8, 8) < 0.5).to(torch.int64)
    cfg = LayoutSparsityConfig(user, block=32)
    assert cfg.num_heads == 2
    assert torch.equal(cfg.make_layout(256), user)
    assert torch.equal(cfg.make_layout(128), user[:, :4, :4])
    assert LayoutSparsityConfig(user[0].bool(), block=16).make_layout(128).shape == (1, 8, 8)


@pytest.mark.parametrize(
    "layout, words",
    [
        ([[1, 0], [0, 1]], ["a torch.Tensor"]),
        (torch.ones(2, 3, 4, dtype=torch.int64), ["square"]),
        (torch.ones(1, 4, 4), ["integer or bool"]),
        (torch.full((1, 4, 4), 2), ["0/1 values"]),
    ],
)
def test_layout_config_errors(layout, words):
    assert_raises_with(ValueError, words, LayoutSparsityConfig, layout, block=16)
    with pytest.raises(ValueError, match="seq_len"):
        LayoutSparsityConfig(torch.ones(1, 4, 4, dtype=torch.int64)).make_layout(128)


def test_large_layout_is_fast():
    # vectorised rules: a 2048-block Fixed layout is built without a per-block Python loop
    layout = FixedSparsityConfig(1, block=16, num_local_blocks=16).make_layout(2048 * 16)
    assert int(layout.sum()) > 0
