"""``blocksparse_attn::fused_attention_fwd`` / ``_bwd`` custom ops and their autograd.

The ops take checked inputs (see :func:`blocksparse_attn.block_sparse_attention`); the
kernels are imported on first call, so registering the ops does not import Triton.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kv_blocks import KVBlocks
from ._first_order import first_order_only


def _mode(mul: bool) -> str:
    return "mul" if mul else "add"


def _packed_lists(blocks: KVBlocks) -> Tensor:
    """Block lists as the custom ops take them: one int32 tensor ``[1, H_l, nb_q,
    1 + max_blocks]``, each row's count first (a dense layout is 3-D)."""
    return torch.cat([blocks.num_blocks[..., None], blocks.indices], -1)


def _private(layout):
    """The layout the kernels read: a frozen copy of a layout tensor (see
    ``index.frozen``); block lists as given (``fused_attention`` copied them), or unpacked
    from :func:`_packed_lists`'s form."""
    from ..index import frozen

    if isinstance(layout, KVBlocks):
        return layout
    if layout.dim() == 4:
        return KVBlocks(layout[..., 0], layout[..., 1:], trusted=True)
    return frozen(layout)


def _forward(
    q, k, v, layout, rpe, key_padding_mask, attn_mask, block, scale, causal, kpm_mul, am_mul
):
    from ..kernels.fused_fwd import fused_attention_forward

    return fused_attention_forward(
        q,
        k,
        v,
        _private(layout),
        block=block,
        scale=scale,
        causal=causal,
        rpe=rpe,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        key_padding_mask_mode=_mode(kpm_mul),
        attn_mask_mode=_mode(am_mul),
    )


def _backward_kernels(
    grad_out,
    q,
    k,
    v,
    out,
    stats,
    layout,
    rpe,
    key_padding_mask,
    attn_mask,
    block,
    scale,
    causal,
    kpm_mul,
    am_mul,
    rpe_grad,
    kpm_grad,
    am_grad,
    grad_lse=None,
    deterministic=True,
):
    from ..kernels.fused_bwd import fused_attention_backward

    return fused_attention_backward(
        grad_out,
        q,
        k,
        v,
        out,
        stats,
        _private(layout),
        block=block,
        scale=scale,
        causal=causal,
        rpe=rpe,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        key_padding_mask_mode=_mode(kpm_mul),
        attn_mask_mode=_mode(am_mul),
        bias_grads=(rpe_grad, kpm_grad, am_grad),
        grad_lse=grad_lse,
        deterministic=deterministic,
    )


@torch.library.custom_op("blocksparse_attn::fused_attention_fwd", mutates_args=())
def fused_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Tensor,
    rpe: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    block: int,
    scale: float,
    causal: bool,
    kpm_mul: bool,
    am_mul: bool,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(out, row statistics)``: see ``kernels.fused_fwd.fused_attention_forward``.
    ``layout``: a dense ``[H_l, nb_q, nb_k]`` layout, or 4-D block lists packed with their
    counts (``_packed_lists``), compiled on the device. ``deterministic``: kept for the
    backward (``kernels.fused_bwd.fused_attention_backward``)."""
    return _forward(
        q, k, v, layout, rpe, key_padding_mask, attn_mask, block, scale, causal, kpm_mul, am_mul
    )


@fused_attention_fwd.register_fake
def _(
    q,
    k,
    v,
    layout,
    rpe,
    key_padding_mask,
    attn_mask,
    block,
    scale,
    causal,
    kpm_mul,
    am_mul,
    deterministic=True,
):
    B, H, Lq, _ = q.shape
    biased = rpe is not None or key_padding_mask is not None or attn_mask is not None
    stats = (2, B, H, Lq) if biased else (B, H, Lq)
    return q.new_empty(q.shape), q.new_empty(stats, dtype=torch.float32)


@torch.library.custom_op("blocksparse_attn::fused_attention_bwd", mutates_args=())
def fused_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    layout: Tensor,
    rpe: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    block: int,
    scale: float,
    causal: bool,
    kpm_mul: bool,
    am_mul: bool,
    rpe_grad: bool,
    kpm_grad: bool,
    am_grad: bool,
    grad_lse: Optional[Tensor] = None,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, drpe, dkpm, dam)`` (empty where not wanted): see
    ``kernels.fused_bwd.fused_attention_backward``; ``grad_lse``: the log-sum-exp's
    gradient, or ``None``."""
    grads = _backward_kernels(
        grad_out,
        q,
        k,
        v,
        out,
        stats,
        layout,
        rpe,
        key_padding_mask,
        attn_mask,
        block,
        scale,
        causal,
        kpm_mul,
        am_mul,
        rpe_grad,
        kpm_grad,
        am_grad,
        grad_lse,
        deterministic,
    )
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@fused_attention_bwd.register_fake
def _(
    grad_out,
    q,
    k,
    v,
    out,
    stats,
    layout,
    rpe,
    key_padding_mask,
    attn_mask,
    block,
    scale,
    causal,
    kpm_mul,
    am_mul,
    rpe_grad,
    kpm_grad,
    am_grad,
    grad_lse=None,
    deterministic=True,
):
    def like(t, wanted):
        return t.new_empty(t.shape) if wanted else q.new_empty(0)

    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        like(rpe, rpe_grad),
        like(key_padding_mask, kpm_grad),
        like(attn_mask, am_grad),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, layout, rpe, kpm, am, block, scale, causal, kpm_mul, am_mul, *rest = inputs
    deterministic = rest[0] if rest else True
    out, stats = output
    ctx.blocks = layout if isinstance(layout, KVBlocks) else None  # not a tensor to save
    if ctx.blocks is not None:
        layout = None
    ctx.save_for_backward(q, k, v, out, stats, layout, rpe, kpm, am)
    ctx.options = (block, scale, causal, kpm_mul, am_mul, deterministic)
    # no zero tensor is made for an absent gradient (of the output or of the statistics):
    # that allocation and fill cost more host time than the backward's launches
    ctx.set_materialize_grads(False)


def _gradients(ctx, grad_out, grad_stats, backward):
    """Input gradients from the saved forward; ``backward`` is the custom op (traced by
    ``torch.compile``) or the plain implementation (eager). Additive masks that require
    grad get one (as ``rpe`` does); 'mul' masks have none. ``grad_stats``: the gradient
    of the row statistics, which reach the caller only as the log-sum-exp
    (``row_statistics_lse``: ``lse = stats`` or ``stats[0] + stats[1] * ln 2``), so
    ``stats``'s (first) row is the log-sum-exp's gradient."""
    if grad_out is None and grad_stats is None:
        return (None,) * len(ctx.needs_input_grad)
    q, k, v, out, stats, layout, rpe, kpm, am = ctx.saved_tensors
    if grad_out is None:  # only the log-sum-exp was used
        grad_out = torch.zeros_like(out)
    grad_lse = None
    if grad_stats is not None:
        grad_lse = grad_stats[0] if stats.dim() == 4 else grad_stats
    layout = ctx.blocks if ctx.blocks is not None else layout
    block, scale, causal, kpm_mul, am_mul, deterministic = ctx.options
    wanted = (
        rpe is not None and ctx.needs_input_grad[4],
        kpm is not None and not kpm_mul and ctx.needs_input_grad[5],
        am is not None and not am_mul and ctx.needs_input_grad[6],
    )
    dq, dk, dv, drpe, dkpm, dam = backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        stats,
        layout,
        rpe,
        kpm,
        am,
        block,
        scale,
        causal,
        kpm_mul,
        am_mul,
        *wanted,
        grad_lse,
        deterministic,
    )
    biases = tuple(g if w else None for g, w in zip((drpe, dkpm, dam), wanted))
    grads = (dq, dk, dv, None, *biases)  # then none for the options, one per input
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


def _backward(ctx, grad_out, grad_stats):
    return _gradients(ctx, grad_out, grad_stats, fused_attention_bwd)


fused_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerFusedAttention(torch.autograd.Function):
    """The same kernels and gradients as the custom ops, for eager mode: a custom op's
    Python dispatch and autograd wrapper cost a few hundred microseconds of host time per
    call, which a short kernel cannot hide (``benchmarks/NOTES.md``, v3)."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        layout,
        rpe,
        kpm,
        am,
        block,
        scale,
        causal,
        kpm_mul,
        am_mul,
        deterministic=True,
    ):
        out, stats = _forward(q, k, v, layout, rpe, kpm, am, block, scale, causal, kpm_mul, am_mul)
        inputs = (q, k, v, layout, rpe, kpm, am, block, scale, causal, kpm_mul, am_mul)
        _setup_context(ctx, (*inputs, deterministic), (out, stats))
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, grad_stats):
        grads = _gradients(ctx, grad_out, grad_stats, _backward_kernels)
        return first_order_only(
            "block_sparse_attention (backend='fused')",
            grads,
            (*ctx.saved_tensors, grad_out, grad_stats),
        )


def fused_attention(
    q,
    k,
    v,
    layout,
    *,
    block,
    scale,
    causal,
    rpe,
    key_padding_mask,
    attn_mask,
    key_padding_mask_mode,
    attn_mask_mode,
    deterministic=True,
) -> tuple[Tensor, Tensor]:
    """Differentiable fused attention on checked inputs: ``(out, lse)``. Under
    ``torch.compile`` the custom ops (opaque to the compiler, with fake implementations);
    in eager mode a plain ``autograd.Function`` over the same implementations."""
    from ..index import frozen, is_private_lists
    from ..kernels.fused_fwd import row_statistics_lse

    if isinstance(layout, KVBlocks):
        if torch.compiler.is_compiling():  # the custom ops take tensors: lists packed
            layout = _packed_lists(layout)
        elif not is_private_lists(layout):
            # a copy, so that the backward reads the forward's lists
            layout = KVBlocks(layout.num_blocks.clone(), layout.indices.clone(), True)
    elif not torch.compiler.is_compiling():  # the backward then reads the forward's copy
        layout = frozen(layout)
    args = (
        q,
        k,
        v,
        layout,
        rpe,
        key_padding_mask,
        attn_mask,
        block,
        scale,
        causal,
        key_padding_mask_mode == "mul",
        attn_mask_mode == "mul",
        deterministic,
    )
    if torch.compiler.is_compiling():
        out, stats = fused_attention_fwd(*args)
    else:
        out, stats = _EagerFusedAttention.apply(*args)
    return out, row_statistics_lse(stats)
