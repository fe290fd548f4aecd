"""``blocksparse_attn::fused_attention_fwd`` / ``_bwd`` custom ops and their autograd.

The ops take checked inputs (see :func:`blocksparse_attn.block_sparse_attention`); the
kernels are imported on first call, so registering the ops does not import Triton.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _mode(mul: bool) -> str:
    return "mul" if mul else "add"


@torch.library.custom_op("blocksparse_attn::fused_attention_fwd", mutates_args=())
def fused_attention_fwd(q: Tensor, k: Tensor, v: Tensor, layout: Tensor, rpe: Optional[Tensor],
                        key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                        block: int, scale: float, causal: bool, kpm_mul: bool,
                        am_mul: bool) -> tuple[Tensor, Tensor]:
    from ..kernels.fused_fwd import fused_attention_forward

    return fused_attention_forward(q, k, v, layout, block=block, scale=scale, causal=causal,
                                   rpe=rpe, key_padding_mask=key_padding_mask,
                                   attn_mask=attn_mask, key_padding_mask_mode=_mode(kpm_mul),
                                   attn_mask_mode=_mode(am_mul))


@fused_attention_fwd.register_fake
def _(q, k, v, layout, rpe, key_padding_mask, attn_mask, block, scale, causal, kpm_mul, am_mul):
    B, H, Lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("blocksparse_attn::fused_attention_bwd", mutates_args=())
def fused_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                        lse: Tensor, layout: Tensor, rpe: Optional[Tensor],
                        key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                        block: int, scale: float, causal: bool, kpm_mul: bool, am_mul: bool,
                        rpe_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.fused_bwd import fused_attention_backward

    dq, dk, dv, drpe = fused_attention_backward(
        grad_out, q, k, v, out, lse, layout, block=block, scale=scale, causal=causal, rpe=rpe,
        key_padding_mask=key_padding_mask, attn_mask=attn_mask,
        key_padding_mask_mode=_mode(kpm_mul), attn_mask_mode=_mode(am_mul), rpe_grad=rpe_grad)
    return dq, dk, dv, (drpe if drpe is not None else q.new_empty(0))


@fused_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, layout, rpe, key_padding_mask, attn_mask, block, scale,
      causal, kpm_mul, am_mul, rpe_grad):
    drpe = rpe.new_empty(rpe.shape) if rpe_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), drpe


def _setup_context(ctx, inputs, output):
    q, k, v, layout, rpe, kpm, am, block, scale, causal, kpm_mul, am_mul = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, layout, rpe, kpm, am)
    ctx.options = (block, scale, causal, kpm_mul, am_mul)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, layout, rpe, kpm, am = ctx.saved_tensors
    block, scale, causal, kpm_mul, am_mul = ctx.options
    rpe_grad = rpe is not None and ctx.needs_input_grad[4]
    dq, dk, dv, drpe = fused_attention_bwd(grad_out.contiguous(), q, k, v, out, lse, layout, rpe,
                                           kpm, am, block, scale, causal, kpm_mul, am_mul,
                                           rpe_grad)
    return dq, dk, dv, None, (drpe if rpe_grad else None), None, None, None, None, None, None, None


fused_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(q, k, v, layout, *, block, scale, causal, rpe, key_padding_mask, attn_mask,
                    key_padding_mask_mode, attn_mask_mode) -> tuple[Tensor, Tensor]:
    """Differentiable fused attention on checked inputs: ``(out, lse)``."""
    return fused_attention_fwd(q, k, v, layout, rpe, key_padding_mask, attn_mask, block, scale,
                               causal, key_padding_mask_mode == "mul", attn_mask_mode == "mul")
