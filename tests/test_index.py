"""The compiled layout: round trips, orderings, counts, causal classification, cache."""

import gc

import pytest
import torch

from blocksparse_attn.index import (
    _CACHE,
    PART_MIN,
    PART_OVER_MEAN,
    build_index,
    get_density,
    get_index,
    part_length,
)

from helpers import assert_raises_with


def random_layout(h, nq, nk, density):
    lay = (torch.rand(h, nq, nk) < density).to(torch.int64)
    if nq > 2:
        lay[:, 1] = 0  # an empty row
    if h > 1:
        lay[-1] = 0  # an empty head
    return lay


@pytest.mark.parametrize(
    "block, tile_m, tile_n",
    [
        (16, 16, 16),
        (16, 64, 64),
        (16, 128, 64),
        (32, 64, 32),
        (64, 128, 64),
        (128, 64, 64),
        (128, 128, 128),
        (8, 64, 64),
    ],
)
@pytest.mark.parametrize("shape, density", [((3, 8, 6), 0.3), ((1, 7, 7), 0.8), ((2, 5, 9), 0.0)])
def test_round_trip(block, tile_m, tile_n, shape, density):
    layout = random_layout(*shape, density)
    idx = build_index(layout, block, tile_m=tile_m, tile_n=tile_n)
    e = block // idx.sub
    expected = (layout != 0).repeat_interleave(e, 1).repeat_interleave(e, 2)
    assert torch.equal(idx.to_layout(), expected)
    # offsets and counts
    assert idx.row_ptr.dtype == torch.int32 and idx.row_ptr[0] == 0
    assert int(idx.row_ptr[-1]) == idx.nnz == int(idx.col_ptr[-1])
    assert idx.row_ptr.numel() == shape[0] * idx.row_tiles + 1
    assert idx.col_ptr.numel() == shape[0] * idx.col_tiles + 1
    # each list is sorted, and CSC is the transpose of CSR
    csr, csc = set(), set()
    for r in range(shape[0] * idx.row_tiles):
        cols = idx.row_idx[idx.row_ptr[r] : idx.row_ptr[r + 1]].tolist()
        assert cols == sorted(cols)
        bits = idx.row_bits[idx.row_ptr[r] : idx.row_ptr[r + 1]].tolist()
        part = idx.row_partial[idx.row_ptr[r] : idx.row_ptr[r + 1]].tolist()
        csr |= {
            (r // idx.row_tiles, r % idx.row_tiles, c, b, p) for c, b, p in zip(cols, bits, part)
        }
        assert int(idx.row_lead[r]) == (part + [1]).index(1)  # full tiles before the first partial
    for c in range(shape[0] * idx.col_tiles):
        rows = idx.col_idx[idx.col_ptr[c] : idx.col_ptr[c + 1]].tolist()
        assert rows == sorted(rows)
        bits = idx.col_bits[idx.col_ptr[c] : idx.col_ptr[c + 1]].tolist()
        part = idx.col_partial[idx.col_ptr[c] : idx.col_ptr[c + 1]].tolist()
        csc |= {
            (c // idx.col_tiles, r, c % idx.col_tiles, b, p) for r, b, p in zip(rows, bits, part)
        }
        for e in range(int(idx.col_ptr[c]), int(idx.col_ptr[c + 1])):  # col_pos points back
            t = int(idx.col_pos[e])
            assert int(idx.row_idx[t]) == c % idx.col_tiles
            assert int(idx.row_bits[t]) == int(idx.col_bits[e])
    assert csr == csc
    row_len = (idx.row_ptr[1:] - idx.row_ptr[:-1]).tolist()
    col_len = (idx.col_ptr[1:] - idx.col_ptr[:-1]).tolist()
    # short lists run whole, longest first
    for work, lengths, ptr in ((idx.rows, row_len, idx.row_ptr), (idx.cols, col_len, idx.col_ptr)):
        assert work.parts == 0 and work.items[:, 3].eq(-1).all()
        assert work.items[:, 0].tolist() == list(range(len(lengths)))
        assert torch.equal(work.items[:, 1], ptr[:-1]) and torch.equal(work.items[:, 2], ptr[1:])
        assert [lengths[r] for r in work.order.tolist()] == sorted(lengths, reverse=True)


def check_work(work, ptr, longest):
    """``work`` runs every entry of every list once: whole lists up to ``longest`` entries,
    longer ones in parts of at most ``longest`` numbered in list order."""
    items = work.items.tolist()
    assert sorted(work.order.tolist()) == list(range(len(items)))
    spans = [e - s for _, s, e, _ in items]
    assert [spans[i] for i in work.order.tolist()] == sorted(spans, reverse=True)
    parts = []
    for r in range(ptr.numel() - 1):
        mine = [it for it in items if it[0] == r]
        n = int(ptr[r + 1] - ptr[r])
        assert [mine[0][1], mine[-1][2]] == [int(ptr[r]), int(ptr[r + 1])]
        assert all(a[2] == b[1] for a, b in zip(mine, mine[1:]))  # contiguous, in order
        if n <= longest:
            assert len(mine) == 1 and mine[0][3] == -1
        else:
            assert all(e - s <= longest for _, s, e, _ in mine)
            parts.append((r, [it[3] for it in mine]))
    assert work.parts == sum(len(p) for _, p in parts)
    assert work.split.tolist() == [r for r, _ in parts]
    for s, (_, numbers) in enumerate(parts):
        assert numbers == list(range(int(work.first[s]), int(work.first[s + 1])))


@pytest.mark.parametrize("causal", [False, True])
def test_long_lists_are_cut_into_parts(causal):
    # a global row and a global column among short band lists (window_global's shape)
    n = 160
    layout = torch.zeros(2, n, n, dtype=torch.int64)
    for i in range(n):
        layout[:, i, max(0, i - 1) : i + 2] = 1
    layout[:, 0], layout[:, :, 0] = 1, 1
    idx = build_index(layout, 16, tile_m=16, tile_n=16, causal=causal)
    rows, cols = idx.row_ptr.diff(), idx.col_ptr.diff()
    for work, ptr, counts in ((idx.rows, idx.row_ptr, rows), (idx.cols, idx.col_ptr, cols)):
        longest = part_length(counts)
        assert longest == max(PART_MIN, -(-PART_OVER_MEAN * counts.sum().item() // len(counts)))
        check_work(work, ptr, longest)
    # causal: the global row sees only its diagonal, the global column every row
    assert idx.rows.parts == 0 if causal else idx.rows.split.tolist() == [0, n]
    assert idx.cols.split.tolist() == [0, n]


def test_parts_of_any_length(monkeypatch):
    import blocksparse_attn.index as index

    monkeypatch.setattr(index, "PART_MIN", 1)
    monkeypatch.setattr(index, "PART_OVER_MEAN", 0.5)
    layout = random_layout(3, 9, 7, 0.6)
    idx = build_index(layout, 32, tile_m=32, tile_n=32)
    check_work(idx.rows, idx.row_ptr, part_length(idx.row_ptr.diff()))
    check_work(idx.cols, idx.col_ptr, part_length(idx.col_ptr.diff()))
    assert idx.rows.parts > 0 and idx.cols.parts > 0


def test_compressed_order_is_layout_nonzero():
    layout = random_layout(3, 6, 6, 0.5)
    idx = build_index(layout, 32)
    nz = layout.nonzero()
    assert torch.equal(idx.row_idx.long(), nz[:, 2])
    rows = torch.repeat_interleave(torch.arange(3 * 6), (idx.row_ptr[1:] - idx.row_ptr[:-1]).long())
    assert torch.equal(rows, nz[:, 0] * 6 + nz[:, 1])


def test_full_and_partial_tiles():
    # block 16 under 32x32 tiles: a tile is full only when its four sub-blocks are kept
    layout = torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]])
    idx = build_index(layout, 16, tile_m=32, tile_n=32)
    assert idx.row_ptr.tolist() == [0, 2, 3]
    assert idx.row_idx.tolist() == [0, 1, 1]
    assert idx.row_partial.tolist() == [0, 1, 0]
    assert idx.row_lead.tolist() == [1, 1]
    assert idx.split_tiles and not build_index(layout, 16).split_tiles  # 2x2 vs 1 sub-block
    assert idx.row_bits.tolist() == [0b1111, 0b0001, 0b1111]


def test_causal_tiles():
    idx = build_index(torch.ones(1, 4, 4, dtype=torch.int64), 16, causal=True)
    assert idx.row_ptr.tolist() == [0, 1, 3, 6, 10]
    assert idx.row_idx.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert idx.row_partial.tolist() == [1, 0, 1, 0, 0, 1, 0, 0, 0, 1]  # diagonal partial
    assert idx.row_lead.tolist() == [0, 1, 2, 3]
    assert idx.col_idx.tolist() == [0, 1, 2, 3, 1, 2, 3, 2, 3, 3]
    # 32x16 tiles: tile (0, 2) lies after the diagonal and is dropped
    idx = build_index(torch.ones(1, 4, 4, dtype=torch.int64), 16, tile_m=32, tile_n=16, causal=True)
    assert idx.row_idx.tolist() == [0, 1, 0, 1, 2, 3]
    assert idx.row_partial.tolist() == [1, 1, 0, 0, 1, 1]  # every tile touching the diagonal
    assert idx.row_lead.tolist() == [0, 2]


def test_ragged_tiles_are_partial():
    # L = 80 = 5 blocks of 16 under 64-token tiles: the last tile hangs over the end
    idx = build_index(torch.ones(1, 5, 5, dtype=torch.int64), 16, tile_m=64, tile_n=64)
    assert idx.row_tiles == 2 and idx.col_tiles == 2
    assert idx.row_partial.tolist() == [0, 1, 1, 1]


def test_rectangular():
    layout = torch.ones(2, 3, 7, dtype=torch.int64)
    idx = build_index(layout, 32, q_len=96, k_len=224, tile_m=64, tile_n=64)
    assert idx.row_tiles == 2 and idx.col_tiles == 4 and idx.nnz == 16


def test_no_token_level_tensor():
    # L = 1M tokens, block 128, window of 3 blocks: built from the non-zero blocks only
    nb = 8192
    r = torch.arange(nb)
    layout = ((r[:, None] - r[None, :]).abs() <= 1).unsqueeze(0)
    idx = build_index(layout, 128, tile_m=128, tile_n=64)
    assert idx.nnz == (3 * nb - 2) * 2


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"layout": torch.ones(1, 4, 4), "block": 16}, ["layout", "integer or bool"]),
        ({"layout": torch.ones(4, dtype=torch.int64), "block": 16}, ["3-D tensor"]),
        (
            {"layout": torch.ones(1, 4, 4, dtype=torch.int64), "block": 16, "q_len": 48},
            ["layout", "[H, 48 // 16, 64 // 16]"],
        ),
        (
            {
                "layout": torch.ones(1, 4, 4, dtype=torch.int64),
                "block": 8,
                "tile_m": 128,
                "tile_n": 128,
            },
            ["at most 64 sub-blocks", "128x128 over block 8"],
        ),
    ],
)
def test_errors(kwargs, words):
    assert_raises_with(ValueError, words, build_index, **kwargs)


def test_cache_hits_rebuilds_and_evicts():
    layout = torch.ones(1, 4, 4, dtype=torch.int64)
    a = get_index(layout, 16, tile_m=32, tile_n=32)
    assert get_index(layout, 16, tile_m=32, tile_n=32) is a
    assert get_index(layout, 16, tile_m=16, tile_n=16) is not a
    layout[0, 0, 3] = 0  # in-place edit bumps the version: rebuilt
    b = get_index(layout, 16, tile_m=32, tile_n=32)
    assert b is not a and b.nnz == a.nnz and int(b.row_bits[1]) != int(a.row_bits[1])
    assert get_density(layout) == 15 / 16
    mine = [key for key in _CACHE if key[0] == id(layout)]
    assert len(mine) == 3  # two indexes (the rebuilt one replaced the first) and the density
    del layout
    gc.collect()
    assert not any(key in _CACHE for key in mine)
