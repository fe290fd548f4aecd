"""Rows of a ``[rows, H, D]`` tensor copied to new places by an index: the packing of
variable-length batches (:mod:`blocksparse_attn.varlen`) into block-aligned positions and
back. One program copies ``BLOCK_R`` rows of one head; a row whose source is ``-1`` is
written as zeros, so the destination needs no fill."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 32


@triton.jit
def _gather_rows_kernel(
    SRC,
    DST,
    IDX,  # int32 [n]: the source row of each destination row, -1 for zeros
    n,
    src_row,
    src_head,
    dst_row,
    dst_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1).to(tl.int64)
    inside = rows < n
    source = tl.load(IDX + rows, mask=inside, other=-1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    cols = (offs_d < HEAD_DIM)[None, :]
    x = tl.load(
        SRC + h * src_head + source[:, None] * src_row + offs_d[None, :],
        mask=(source >= 0)[:, None] & cols,
        other=0.0,
    )
    tl.store(
        DST + h * dst_head + rows.to(tl.int64)[:, None] * dst_row + offs_d[None, :],
        x,
        mask=inside[:, None] & cols,
    )


def gather_rows(src: torch.Tensor, idx: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``dst[r] = src[idx[r]]`` (zeros where ``idx[r] < 0``) for ``src [N, H, D]``,
    ``dst [n, H, D]`` (any strides, unit last stride) and int32 ``idx [n]`` with entries
    in ``[-1, N)``; returns ``dst``."""
    n, H, D = dst.shape
    if n == 0 or H == 0:
        return dst
    grid = (triton.cdiv(n, BLOCK_R), H)
    _gather_rows_kernel[grid](
        src,
        dst,
        idx,
        n,
        src.stride(0),
        src.stride(1),
        dst.stride(0),
        dst.stride(1),
        HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_R=BLOCK_R,
    )
    return dst
