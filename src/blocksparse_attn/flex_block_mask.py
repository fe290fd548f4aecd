"""Conversions between our layouts and FlexAttention's ``BlockMask`` (index layer).

FlexAttention tiles at 128 tokens; a layout of smaller blocks is coarsened to 128 and the
partial tiles are masked by a ``mask_mod`` that reads the layout. Used by the benchmark
(FlexAttention beside the fused kernel on the same pattern) and by users moving between
the two libraries.
"""

from __future__ import annotations

import torch

from .index import build_index

FLEX_BLOCK = 128


def _padded_lists(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, width: int):
    """Counts ``[n_rows]`` and left-packed column lists ``[n_rows, width]`` from (row, col)
    pairs sorted by row."""
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    lists = torch.zeros((n_rows, max(width, 1)), dtype=torch.int32, device=rows.device)
    lists[rows, pos] = cols.to(torch.int32)
    return counts.to(torch.int32), lists


def layout_to_block_mask(
    layout: torch.Tensor,
    block: int,
    *,
    q_len: int | None = None,
    k_len: int | None = None,
    causal: bool = False,
    device: torch.device | str | None = None,
):
    """A FlexAttention ``BlockMask`` (``BLOCK_SIZE=128``) that keeps exactly the
    (query, key) pairs ``layout`` keeps (``[nb_q, nb_k]``, ``[H, nb_q, nb_k]`` or, a layout
    per sample, ``[B, H, nb_q, nb_k]``; and ``causal``: key <= query + k_len - q_len,
    bottom-right aligned). Tiles the layout fills completely are *full* (no ``mask_mod``
    call); the others are partial."""
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device) if device is not None else layout.device
    grid = layout.to(device) != 0
    grid = grid.reshape((1,) * (4 - grid.dim()) + tuple(grid.shape))  # [B, H, nb_q, nb_k]
    B, H, nbq, nbk = grid.shape
    q_len = nbq * block if q_len is None else q_len
    k_len = nbk * block if k_len is None else k_len
    idx = build_index(
        grid.flatten(0, 1),
        block,
        q_len=q_len,
        k_len=k_len,
        tile_m=FLEX_BLOCK,
        tile_n=FLEX_BLOCK,
        causal=causal,
    )
    n_rows = B * H * idx.row_tiles
    counts = (idx.row_ptr[1:] - idx.row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(n_rows, device=device), counts)
    full = idx.row_partial == 0
    shape = (B, H, idx.row_tiles)
    kv_n, kv_i = _padded_lists(rows[~full], idx.row_idx[~full], n_rows, idx.col_tiles)
    f_n, f_i = _padded_lists(rows[full], idx.row_idx[full], n_rows, idx.col_tiles)
    mask_mod = None
    if bool((~full).any()):
        fine = grid

        def mask_mod(b, h, q_idx, kv_idx):
            keep = fine[b if B > 1 else 0, h if H > 1 else 0, q_idx // block, kv_idx // block]
            if causal:  # bottom-right aligned, as the index
                keep = keep & (kv_idx <= q_idx + (k_len - q_len))
            return keep

    return BlockMask.from_kv_blocks(
        kv_n.view(shape),
        kv_i.view(*shape, -1),
        f_n.view(shape),
        f_i.view(*shape, -1),
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(q_len, k_len),
    )


def block_mask_to_layout(block_mask) -> torch.Tensor:
    """The ``[H, nq, nk]`` int64 layout of a ``BlockMask``'s kept tiles (partial or full),
    at its own block size, for batch 0."""
    dense = block_mask.to_dense()  # [B, H, nq, nk], partial + full tiles
    return (dense[0] != 0).to(torch.int64)
