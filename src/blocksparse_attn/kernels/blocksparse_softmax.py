"""Block-sparse row softmax on the compressed format ``[Z, nnz, block, block]``, with
DeepSpeed's semantics: ``x * scale + rpe + key_padding_mask + attn_mask`` (masks 'add' or
'mul'), softmax over each row's kept blocks in fp32. A row with nothing to attend gives 0.
One program per (block-row, batch) walks the row's blocks twice (statistics, then output).
Plain launchers, no autograd; results are written out of place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _add_masks, empty, mask_args


@triton.jit
def _scores(
    X,
    t,
    rows,
    cols,
    z,
    h,
    Lq,
    Lk,
    scale,
    RPE,
    KPM,
    AM,
    BLOCK: tl.constexpr,
    HAS_RPE: tl.constexpr,
    HAS_KPM: tl.constexpr,
    KPM_MUL: tl.constexpr,
    HAS_AM: tl.constexpr,
    AM_MUL: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """The scores of the ``t``-th stored block, masks applied (see ``_add_masks``)."""
    i = tl.arange(0, BLOCK)
    s = tl.load(X + t * BLOCK * BLOCK + i[:, None] * BLOCK + i[None, :]).to(tl.float32) * scale
    s = _add_masks(
        s, rows, cols, z, h, Lq, Lk, RPE, KPM, AM, HAS_RPE, HAS_KPM, KPM_MUL, HAS_AM, AM_MUL
    )
    if CAUSAL:  # bottom-right aligned: the last query sees the last key
        s = tl.where(cols[None, :] <= rows[:, None] + (Lk - Lq), s, float("-inf"))
    return s


@triton.jit
def _softmax_fwd_kernel(
    X,
    Y,
    s_xz,
    s_yz,
    row_ptr,
    row_idx,
    rows_per_head,
    Lq,
    Lk,
    scale,
    RPE,  # masks: (pointer, strides), see mask_args
    KPM,
    AM,
    BLOCK: tl.constexpr,
    HAS_RPE: tl.constexpr,
    HAS_KPM: tl.constexpr,
    KPM_MUL: tl.constexpr,
    HAS_AM: tl.constexpr,
    AM_MUL: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    r = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    h = (r // rows_per_head).to(tl.int64)
    rows = (r % rows_per_head) * BLOCK + tl.arange(0, BLOCK)
    x_base = X + z * s_xz
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(start, end):
        cols = tl.load(row_idx + t) * BLOCK + tl.arange(0, BLOCK)
        s = _scores(
            x_base,
            t,
            rows,
            cols,
            z,
            h,
            Lq,
            Lk,
            scale,
            RPE,
            KPM,
            AM,
            BLOCK,
            HAS_RPE,
            HAS_KPM,
            KPM_MUL,
            HAS_AM,
            AM_MUL,
            CAUSAL,
        )
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_use) + tl.sum(tl.exp(s - m_use[:, None]), 1)
        m = m_new
    m_use = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)
    i = tl.arange(0, BLOCK)
    for t in range(start, end):
        cols = tl.load(row_idx + t) * BLOCK + tl.arange(0, BLOCK)
        s = _scores(
            x_base,
            t,
            rows,
            cols,
            z,
            h,
            Lq,
            Lk,
            scale,
            RPE,
            KPM,
            AM,
            BLOCK,
            HAS_RPE,
            HAS_KPM,
            KPM_MUL,
            HAS_AM,
            AM_MUL,
            CAUSAL,
        )
        p = tl.exp(s - m_use[:, None]) * inv[:, None]
        tl.store(
            Y + z * s_yz + t * BLOCK * BLOCK + i[:, None] * BLOCK + i[None, :],
            p.to(Y.dtype.element_ty),
        )


@triton.jit
def _softmax_bwd_kernel(
    Y,
    DY,
    DX,
    DS,
    s_yz,
    s_dyz,
    s_dxz,
    s_dsz,
    row_ptr,
    scale,
    BLOCK: tl.constexpr,
    STORE_DS: tl.constexpr,
):
    """``ds = y * (dy - rowsum(y * dy))``; ``dx = scale * ds``; ``ds`` is rpe's gradient."""
    r = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, BLOCK)
    offs = i[:, None] * BLOCK + i[None, :]
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(start, end):
        y = tl.load(Y + z * s_yz + t * BLOCK * BLOCK + offs).to(tl.float32)
        dy = tl.load(DY + z * s_dyz + t * BLOCK * BLOCK + offs).to(tl.float32)
        acc += tl.sum(y * dy, 1)
    for t in range(start, end):
        y = tl.load(Y + z * s_yz + t * BLOCK * BLOCK + offs).to(tl.float32)
        dy = tl.load(DY + z * s_dyz + t * BLOCK * BLOCK + offs).to(tl.float32)
        ds = y * (dy - acc[:, None])
        tl.store(DX + z * s_dxz + t * BLOCK * BLOCK + offs, (ds * scale).to(DX.dtype.element_ty))
        if STORE_DS:
            tl.store(DS + z * s_dsz + t * BLOCK * BLOCK + offs, ds)


def softmax_forward(
    x: torch.Tensor,
    index,
    block: int,
    scale: float,
    rpe=None,
    key_padding_mask=None,
    attn_mask=None,
    key_padding_mask_mode="add",
    attn_mask_mode="add",
    causal: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x``: contiguous ``[Z, nnz, block, block]``; ``index``: the layout at tile = block;
    ``rpe`` broadcastable to ``[Z, H, L_q, L_k]``; ``key_padding_mask [Z, L_k]``;
    ``attn_mask [L_q, L_k]``; ``causal`` hides keys after the query. Returns the
    probabilities, same shape, in ``out_dtype`` (default: ``x``'s), written into ``out``
    when given (``out`` may be ``x`` itself: each program reads a block before it writes
    it, and every block belongs to one program)."""
    Z = x.shape[0]
    y = out if out is not None else empty(x.shape, out_dtype or x.dtype, x.device)
    H, rows = index.heads, index.row_tiles
    masks = mask_args(
        rpe,
        key_padding_mask,
        attn_mask,
        key_padding_mask_mode,
        attn_mask_mode,
        Z,
        H,
        index.q_len,
        index.k_len,
        x,
    )
    _softmax_fwd_kernel[(H * rows, Z)](
        X=x,
        Y=y,
        s_xz=x.stride(0),
        s_yz=y.stride(0),
        row_ptr=index.row_ptr,
        row_idx=index.row_idx,
        rows_per_head=rows,
        Lq=index.q_len,
        Lk=index.k_len,
        scale=scale,
        BLOCK=block,
        CAUSAL=causal,
        num_warps=4,
        **masks,
    )
    return y


def softmax_backward(
    y: torch.Tensor,
    dy: torch.Tensor,
    index,
    block: int,
    scale: float,
    rpe_grad: bool = False,
    dx_dtype: torch.dtype | None = None,
):
    """Gradient of :func:`softmax_forward` for ``x``, in ``dx_dtype`` (default: ``y``'s),
    and, with ``rpe_grad``, the score gradient in compressed form, float32. Returns
    ``(dx, ds or None)``."""
    Z = y.shape[0]
    dy = dy.contiguous()
    dx = empty(y.shape, dx_dtype or y.dtype, y.device)
    ds = empty(y.shape, torch.float32, y.device) if rpe_grad else dx
    _softmax_bwd_kernel[(index.heads * index.row_tiles, Z)](
        Y=y,
        DY=dy,
        DX=dx,
        DS=ds,
        s_yz=y.stride(0),
        s_dyz=dy.stride(0),
        s_dxz=dx.stride(0),
        s_dsz=ds.stride(0),
        row_ptr=index.row_ptr,
        scale=scale,
        BLOCK=block,
        STORE_DS=rpe_grad,
        num_warps=4,
    )
    return dx, (ds if rpe_grad else None)
