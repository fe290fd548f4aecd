"""The compiled index of block lists in two launches (the index layer's device builder; see
:mod:`blocksparse_attn.index_dynamic`).

For square tiles that divide the block (``block % tile == 0``: each tile holds one
sub-block), a list entry ``j`` of block row ``i`` covers the tiles ``(i * e + a, j * e + d)``
for ``a, d < e = block // tile``. One program per (list head, block row) reads the row's
list once, merges repeats and ranks the distinct entries by comparing every pair (rows of
at most :data:`MAX_WIDTH` entries), and for each of its ``e`` tile rows:

* pass 1 writes the number of tiles the row keeps and how many of them are full (under
  ``causal`` the kept tiles of a row are a prefix of its sorted tiles, and the partial ones
  a suffix of that prefix: the diagonal and the ragged last column come last);
* pass 2, after a prefix sum gave the row offsets, writes each kept tile at
  ``row_ptr[row] + rank * e + d``: its key tile, whether it needs element masks, and the
  sort key of its column-major place, from which one stable sort gives the column lists.

No host synchronisation: every array is sized from the shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WIDTH = 256  # entries per list: the pairwise comparisons grow as its square


@triton.jit
def _list_tiles_kernel(
    NUM,  # [H, nb_q] used entries per list
    num_s0,
    num_s1,
    IDX,  # [H, nb_q, width] key blocks
    idx_s0,
    idx_s1,
    idx_s2,
    ROW_COUNT,  # [H * row_tiles] kept tiles per tile row (pass 1)
    ROW_LEAD,  # [H * row_tiles] full tiles per tile row (pass 1)
    ROW_PTR,  # [H * row_tiles + 1] row offsets (pass 2 reads)
    ROW_IDX,  # [capacity] key tile of each kept tile, row-major (pass 2)
    ROW_PARTIAL,  # [capacity] 1 where the tile needs element masks (pass 2)
    COL_KEY,  # [capacity] (head * col_tiles + key tile) * row_tiles + tile row (pass 2)
    nb_q,
    width,
    row_tiles,
    col_tiles,
    q_len,
    k_len,
    E: tl.constexpr,  # tiles per block along each side
    TILE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    CAUSAL: tl.constexpr,
    WRITE: tl.constexpr,
):
    pid = tl.program_id(0)
    h = pid // nb_q
    i = pid % nb_q
    p = tl.arange(0, BLOCK_W)
    used = tl.load(NUM + h * num_s0 + i * num_s1)
    valid = (p < used) & (p < width)
    v = tl.load(IDX + h * idx_s0 + i * idx_s1 + p * idx_s2, mask=valid, other=0).to(tl.int32)
    v = tl.where(valid, v, 2**30)
    # a repeat of an earlier entry is dropped; the rest are ranked by key block
    earlier = (v[:, None] == v[None, :]) & (p[None, :] < p[:, None])
    keep = valid & (tl.max(earlier.to(tl.int32), axis=1) == 0)
    rank = tl.sum((keep[None, :] & (v[None, :] < v[:, None])).to(tl.int32), axis=1)
    shift = k_len - q_len  # bottom-right causal: key c visible from query r if c <= r + shift
    for a in tl.static_range(E):
        r = i * E + a
        last_query = tl.minimum(r * TILE + TILE, q_len) - 1
        row = h * row_tiles + r
        kept = 0
        full = 0
        if WRITE:
            base = tl.load(ROW_PTR + row).to(tl.int64)
        for d in tl.static_range(E):
            c = v * E + d
            on = keep
            if CAUSAL:
                on = on & (c * TILE <= last_query + shift)
            partial = (c == col_tiles - 1) & (k_len % TILE != 0)
            partial = partial | ((r == row_tiles - 1) & (q_len % TILE != 0))
            if CAUSAL:
                partial = partial | (c * TILE + TILE - 1 > r * TILE + shift)
            if WRITE:
                pos = base + rank * E + d
                tl.store(ROW_IDX + pos, c, mask=on)
                tl.store(ROW_PARTIAL + pos, partial.to(tl.int32), mask=on)
                key = (h.to(tl.int64) * col_tiles + c) * row_tiles + r
                tl.store(COL_KEY + pos, key, mask=on)
            else:
                kept += tl.sum(on.to(tl.int32))
                full += tl.sum((on & ~partial).to(tl.int32))
        if not WRITE:
            tl.store(ROW_COUNT + row, kept)
            tl.store(ROW_LEAD + row, full)


def list_tiles(
    counts: torch.Tensor,
    lists: torch.Tensor,
    block: int,
    tile: int,
    q_len: int,
    k_len: int,
    causal: bool,
) -> dict:
    """The row-major and column-major arrays of the index of ``lists`` (``[H, nb_q,
    width]`` key blocks, ``counts [H, nb_q]`` used) for ``tile x tile`` tiles, ``block %
    tile == 0``, ``width <= MAX_WIDTH``: ``row_ptr, row_idx, row_partial, row_lead,
    col_ptr, col_idx, col_partial, col_pos`` (int32; arrays past ``row_ptr[-1]`` are
    padding)."""
    H, nbq, width = lists.shape
    e = block // tile
    rt, ct = -(-q_len // tile), -(-k_len // tile)
    dev = lists.device
    cap = max(H * nbq * e * width * e, 1)
    row_count = torch.empty(H * rt, dtype=torch.int32, device=dev)
    row_lead = torch.empty(H * rt, dtype=torch.int32, device=dev)
    row_ptr = torch.zeros(H * rt + 1, dtype=torch.int32, device=dev)
    row_idx = torch.empty(cap, dtype=torch.int32, device=dev)
    row_partial = torch.empty(cap, dtype=torch.int32, device=dev)
    col_key = torch.full((cap,), 2**62, dtype=torch.int64, device=dev)  # padding sorts last
    args = dict(
        NUM=counts,
        num_s0=counts.stride(0),
        num_s1=counts.stride(1),
        IDX=lists,
        idx_s0=lists.stride(0),
        idx_s1=lists.stride(1),
        idx_s2=lists.stride(2),
        ROW_COUNT=row_count,
        ROW_LEAD=row_lead,
        ROW_PTR=row_ptr,
        ROW_IDX=row_idx,
        ROW_PARTIAL=row_partial,
        COL_KEY=col_key,
        nb_q=nbq,
        width=width,
        row_tiles=rt,
        col_tiles=ct,
        q_len=q_len,
        k_len=k_len,
        E=e,
        TILE=tile,
        BLOCK_W=max(16, triton.next_power_of_2(width)),
        CAUSAL=causal,
        num_warps=8 if width > 64 else 4,  # the pairwise comparisons: width^2 values
    )
    grid = (H * nbq,)
    if H * nbq:
        _list_tiles_kernel[grid](**args, WRITE=False)
        torch.cumsum(row_count, 0, dtype=torch.int32, out=row_ptr[1:])
        _list_tiles_kernel[grid](**args, WRITE=True)
    sorted_key, col_order = torch.sort(col_key, stable=True)
    starts = torch.arange(H * ct + 1, device=dev, dtype=torch.int64) * rt
    col_ptr = torch.searchsorted(sorted_key, starts).to(torch.int32)
    return dict(
        row_ptr=row_ptr,
        row_idx=row_idx,
        row_partial=row_partial,
        row_lead=row_lead,
        col_ptr=col_ptr,
        col_idx=(sorted_key % rt).to(torch.int32),
        col_partial=row_partial[col_order],
        col_pos=col_order.to(torch.int32),
    )
