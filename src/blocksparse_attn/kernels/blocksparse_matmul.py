"""Block-sparse matrix products on DeepSpeed's compressed format ``[Z, nnz, block, block]``
(blocks in ``layout.nonzero()`` order). Plain launchers, no autograd.

* ``sdd``: sparse = dense x dense, only the layout's blocks of the product;
* ``dsd``: dense = sparse x dense;
* ``dds``: dense = dense x sparse.

``trans_a`` / ``trans_b`` multiply by the transpose of the stored operand; a sparse
operand's layout always describes it as stored. Dense operands are ``[Z, H, rows, cols]``
with any strides. Each output element is one program's fp32 sum in a fixed order:
deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _dot, empty, input_precision, launch, upcast_dots
from .configs import launch_configs, matmul_tile


@triton.autotune(configs=launch_configs("matmul"), key=["BLOCK", "BLOCK_K", "GRID_CLASS"])
@triton.jit(do_not_specialize=["GRID_CLASS"])
def _sdd_kernel(
    A,
    B,
    C,
    s_az,
    s_ah,
    s_am,
    s_ak,
    s_bz,
    s_bh,
    s_bk,
    s_bn,
    s_cz,
    s_cb,
    blk_h,
    blk_i,
    blk_j,
    K,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    GRID_CLASS,  # the launch's size class, for the autotuner's key only (_common.launch)
):
    t = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    h = tl.load(blk_h + t).to(tl.int64)
    offs_m = tl.load(blk_i + t) * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.load(blk_j + t) * BLOCK + tl.arange(0, BLOCK)
    a_base = A + z * s_az + h * s_ah + offs_m[:, None] * s_am
    b_base = B + z * s_bz + h * s_bh + offs_n[None, :] * s_bn
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_base + offs_k[None, :] * s_ak, mask=offs_k[None, :] < K, other=0.0)
        b = tl.load(b_base + offs_k[:, None] * s_bk, mask=offs_k[:, None] < K, other=0.0)
        acc += _dot(a, b, INPUT_PRECISION, UPCAST)
    r = tl.arange(0, BLOCK)
    tl.store(
        C + z * s_cz + t.to(tl.int64) * s_cb + r[:, None] * BLOCK + r[None, :],
        acc.to(C.dtype.element_ty),
    )


@triton.autotune(configs=launch_configs("matmul"), key=["BLOCK", "BLOCK_N", "GRID_CLASS"])
@triton.jit(do_not_specialize=["GRID_CLASS"])
def _dsd_kernel(
    S,
    D,
    C,
    s_sz,
    s_sb,
    S_ROW,
    S_COL,
    s_dz,
    s_dh,
    s_dk,
    s_dn,
    s_cz,
    s_ch,
    s_cm,
    s_cn,
    ptr,
    other,
    pos,
    lists_per_head,
    N,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    GRID_CLASS,  # the launch's size class, for the autotuner's key only (_common.launch)
):
    """Row-block ``rb`` of ``op(S) @ op(D)``: the sum over the row's sparse blocks."""
    r = tl.program_id(0)
    pn = tl.program_id(1)
    z = tl.program_id(2).to(tl.int64)
    h = (r // lists_per_head).to(tl.int64)
    rb = r % lists_per_head
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.arange(0, BLOCK)
    s_base = S + z * s_sz + i[:, None] * S_ROW + i[None, :] * S_COL
    d_base = D + z * s_dz + h * s_dh + offs_n[None, :] * s_dn
    acc = tl.zeros([BLOCK, BLOCK_N], dtype=tl.float32)
    for e in range(tl.load(ptr + r), tl.load(ptr + r + 1)):
        k = tl.load(other + e)
        t = tl.load(pos + e).to(tl.int64)
        s = tl.load(s_base + t * s_sb)
        d = tl.load(d_base + (k * BLOCK + i)[:, None] * s_dk, mask=offs_n[None, :] < N, other=0.0)
        acc += _dot(s, d, INPUT_PRECISION, UPCAST)
    offs_m = rb * BLOCK + i
    tl.store(
        C + z * s_cz + h * s_ch + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn,
        acc.to(C.dtype.element_ty),
        mask=offs_n[None, :] < N,
    )


@triton.autotune(configs=launch_configs("matmul"), key=["BLOCK", "BLOCK_M", "GRID_CLASS"])
@triton.jit(do_not_specialize=["GRID_CLASS"])
def _dds_kernel(
    D,
    S,
    C,
    s_dz,
    s_dh,
    s_dm,
    s_dk,
    s_sz,
    s_sb,
    S_ROW,
    S_COL,
    s_cz,
    s_ch,
    s_cm,
    s_cn,
    ptr,
    other,
    pos,
    lists_per_head,
    M,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    GRID_CLASS,  # the launch's size class, for the autotuner's key only (_common.launch)
):
    """Column-block ``cb`` of ``op(D) @ op(S)``: the sum over the column's sparse blocks."""
    r = tl.program_id(0)
    pm = tl.program_id(1)
    z = tl.program_id(2).to(tl.int64)
    h = (r // lists_per_head).to(tl.int64)
    cb = r % lists_per_head
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    i = tl.arange(0, BLOCK)
    s_base = S + z * s_sz + i[:, None] * S_ROW + i[None, :] * S_COL
    d_base = D + z * s_dz + h * s_dh + offs_m[:, None] * s_dm
    acc = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
    for e in range(tl.load(ptr + r), tl.load(ptr + r + 1)):
        k = tl.load(other + e)
        t = tl.load(pos + e).to(tl.int64)
        d = tl.load(d_base + (k * BLOCK + i)[None, :] * s_dk, mask=offs_m[:, None] < M, other=0.0)
        s = tl.load(s_base + t * s_sb)
        acc += _dot(d, s, INPUT_PRECISION, UPCAST)
    offs_n = cb * BLOCK + i
    tl.store(
        C + z * s_cz + h * s_ch + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn,
        acc.to(C.dtype.element_ty),
        mask=offs_m[:, None] < M,
    )


def _op(t: torch.Tensor, trans: bool) -> torch.Tensor:
    return t.transpose(-1, -2) if trans else t


def sdd(
    a: torch.Tensor,
    b: torch.Tensor,
    trans_a: bool,
    trans_b: bool,
    blocks: torch.Tensor,
    block: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``op(a) @ op(b)`` on the blocks ``blocks`` (``[nnz, 3]`` of (head, row, col), in
    compressed order). ``a``, ``b``: ``[Z, H, ., .]``. Returns ``[Z, nnz, block, block]``
    in ``out_dtype`` (default: the inputs'; the sums are fp32 either way)."""
    a, b = _op(a, trans_a), _op(b, trans_b)
    Z, K = a.shape[0], a.shape[-1]
    nnz = blocks.shape[0]
    c = empty((Z, nnz, block, block), out_dtype or a.dtype, a.device)
    if nnz == 0:
        return c
    h, i, j = (blocks[:, d].contiguous() for d in range(3))
    launch(
        _sdd_kernel,
        (nnz, Z),
        dict(
            A=a,
            B=b,
            C=c,
            s_az=a.stride(0),
            s_ah=a.stride(1),
            s_am=a.stride(2),
            s_ak=a.stride(3),
            s_bz=b.stride(0),
            s_bh=b.stride(1),
            s_bk=b.stride(2),
            s_bn=b.stride(3),
            s_cz=c.stride(0),
            s_cb=c.stride(1),
            blk_h=h,
            blk_i=i,
            blk_j=j,
            K=K,
            BLOCK=block,
            BLOCK_K=matmul_tile(K, block, a.element_size(), widest=64),
            INPUT_PRECISION=input_precision(a.dtype),
            UPCAST=upcast_dots(a.dtype),
        ),
    )
    return c


def _lists(index, by_rows: bool):
    """(offsets, other index, compressed position) of the index's rows or columns."""
    if by_rows:
        pos = torch.arange(index.row_idx.numel(), device=index.device, dtype=torch.int32)
        return index.row_ptr, index.row_idx, pos, index.row_tiles
    return index.col_ptr, index.col_idx, index.col_pos, index.col_tiles


def dsd(
    a: torch.Tensor, b: torch.Tensor, trans_a: bool, trans_b: bool, index, block: int
) -> torch.Tensor:
    """``op(a) @ op(b)`` with ``a`` compressed (``index``: its stored layout at tile =
    block) and ``b`` dense ``[Z, H, ., .]``. Returns dense ``[Z, H, M, N]``."""
    b = _op(b, trans_b)
    Z, H, _, N = b.shape
    ptr, other, pos, lists = _lists(index, by_rows=not trans_a)
    c = empty((Z, H, lists * block, N), b.dtype, b.device)
    rs, cs = (1, block) if trans_a else (block, 1)
    BLOCK_N = matmul_tile(N, block, b.element_size())
    launch(
        _dsd_kernel,
        (H * lists, triton.cdiv(N, BLOCK_N), Z),
        dict(
            S=a,
            D=b,
            C=c,
            s_sz=a.stride(0),
            s_sb=a.stride(1),
            S_ROW=rs,
            S_COL=cs,
            s_dz=b.stride(0),
            s_dh=b.stride(1),
            s_dk=b.stride(2),
            s_dn=b.stride(3),
            s_cz=c.stride(0),
            s_ch=c.stride(1),
            s_cm=c.stride(2),
            s_cn=c.stride(3),
            ptr=ptr,
            other=other,
            pos=pos,
            lists_per_head=lists,
            N=N,
            BLOCK=block,
            BLOCK_N=BLOCK_N,
            INPUT_PRECISION=input_precision(b.dtype),
            UPCAST=upcast_dots(b.dtype),
        ),
    )
    return c


def dds(
    a: torch.Tensor, b: torch.Tensor, trans_a: bool, trans_b: bool, index, block: int
) -> torch.Tensor:
    """``op(a) @ op(b)`` with ``a`` dense ``[Z, H, ., .]`` and ``b`` compressed (``index``:
    its stored layout at tile = block). Returns dense ``[Z, H, M, N]``."""
    a = _op(a, trans_a)
    Z, H, M, _ = a.shape
    ptr, other, pos, lists = _lists(index, by_rows=trans_b)
    c = empty((Z, H, M, lists * block), a.dtype, a.device)
    rs, cs = (1, block) if trans_b else (block, 1)
    BLOCK_M = matmul_tile(M, block, a.element_size())
    launch(
        _dds_kernel,
        (H * lists, triton.cdiv(M, BLOCK_M), Z),
        dict(
            D=a,
            S=b,
            C=c,
            s_dz=a.stride(0),
            s_dh=a.stride(1),
            s_dm=a.stride(2),
            s_dk=a.stride(3),
            s_sz=b.stride(0),
            s_sb=b.stride(1),
            S_ROW=rs,
            S_COL=cs,
            s_cz=c.stride(0),
            s_ch=c.stride(1),
            s_cm=c.stride(2),
            s_cn=c.stride(3),
            ptr=ptr,
            other=other,
            pos=pos,
            lists_per_head=lists,
            M=M,
            BLOCK=block,
            BLOCK_M=BLOCK_M,
            INPUT_PRECISION=input_precision(a.dtype),
            UPCAST=upcast_dots(a.dtype),
        ),
    )
    return c
