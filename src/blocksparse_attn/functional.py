"""The functional API (layer 6): validation, defaults and the choice of backend."""

from __future__ import annotations

import warnings

import torch

from ._errors import bad_argument
from ._inputs import AttentionInputs, check_attention_inputs
from .kernels.availability import (
    FUSED_MAX_HEAD_DIM_BWD,
    FUSED_MAX_HEAD_DIM_FWD,
    KERNEL_DTYPES,
    UNFUSED_BLOCKS,
)

BACKENDS = ("auto", "fused", "unfused", "reference")


def _triton_reasons(x: AttentionInputs) -> list[str]:
    """Reasons both Triton backends share: the device and the dtype."""
    from .kernels.availability import kernel_unavailable_reasons

    reasons = kernel_unavailable_reasons(x.q.device)
    if x.q.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {x.q.dtype} is not supported (float16, bfloat16, float32)")
    return reasons


def fused_unavailable_reasons(x: AttentionInputs, needs_grad: bool) -> list[str]:
    """Why the fused Triton backend cannot run these inputs (empty: it can)."""
    reasons = _triton_reasons(x)
    D = x.q.shape[-1]
    if D > FUSED_MAX_HEAD_DIM_FWD:
        reasons.append(f"head dim {D} > {FUSED_MAX_HEAD_DIM_FWD}")
    elif needs_grad and D > FUSED_MAX_HEAD_DIM_BWD:
        reasons.append(
            f"head dim {D} > {FUSED_MAX_HEAD_DIM_BWD} needs a gradient "
            f"(the backward kernel supports up to {FUSED_MAX_HEAD_DIM_BWD})"
        )
    return reasons


def unfused_unavailable_reasons(x: AttentionInputs, return_lse: bool) -> list[str]:
    """Why the unfused SDD -> softmax -> DSD backend cannot run these inputs."""
    reasons = _triton_reasons(x)
    if x.block not in UNFUSED_BLOCKS:
        reasons.append(f"block {x.block} is not one of {', '.join(map(str, UNFUSED_BLOCKS))}")
    if return_lse:
        reasons.append("return_lse=True: the unfused path does not form the log-sum-exp")
    return reasons


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    *,
    block: int,
    scale: float | None = None,
    causal: bool = False,
    rpe: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask_mode: str = "add",
    attn_mask_mode: str = "mul",
    backend: str = "auto",
    return_lse: bool = False,
):
    """Attention restricted to the blocks of ``layout``.

    Args:
        q: ``[B, H, L_q, D]``; ``k``, ``v``: ``[B, H, L_k, D]``; one dtype and device.
        layout: ``[H or 1, L_q // block, L_k // block]`` integer/bool, non-zero = attend
            (any device; it is compiled once and cached per tensor).
        block: layout block size in tokens.
        scale: score scale, default ``D ** -0.5``.
        causal: token-level causal mask (key ``j`` visible from query ``i`` iff ``j <= i``),
            applied inside diagonal blocks; blocks wholly in the future are skipped.
        rpe: bias added to the scores, broadcastable to ``[B, H, L_q, L_k]``; read only on
            kept blocks; receives a gradient.
        key_padding_mask: ``[B, L_k]`` (or BERT's ``[B, 1, 1, L_k]``).
        attn_mask: ``[L_q, L_k]``, shared by batches and heads.
        key_padding_mask_mode, attn_mask_mode: ``'add'`` (added to the scores: 0 keeps,
            ``-inf`` masks) or ``'mul'`` (non-zero keeps, 0 masks).
        backend: ``'fused'`` (Triton flash kernel), ``'unfused'`` (Triton SDD -> softmax ->
            DSD on the compressed format, O(B*nnz*block^2) memory; DeepSpeed's algorithm),
            ``'reference'`` (dense PyTorch, exact, O(L^2) memory) or ``'auto'``: fused for
            CUDA tensors it supports, else the reference (with a warning when CUDA inputs
            cannot use the kernel). A backend asked for by name that cannot run raises
            ``NotImplementedError`` listing every reason.
        return_lse: also return the log-sum-exp ``[B, H, L_q]`` (float32, natural log);
            with the fused backend it carries no gradient (``requires_grad=False``).

    Returns ``out [B, H, L_q, D]`` in the input dtype (and ``lse``). A query with nothing
    to attend gets zeros (and zero gradients), never NaN; its ``lse`` is ``-inf``.

    fp32 inputs use exact fp32 products in the kernel unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set.
    """
    where = "block_sparse_attention"
    if backend not in BACKENDS:
        raise bad_argument(
            where, "backend", "one of " + ", ".join(map(repr, BACKENDS)), repr(backend)
        )
    x = check_attention_inputs(
        where,
        q,
        k,
        v,
        layout,
        block=block,
        scale=scale,
        causal=causal,
        rpe=rpe,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        key_padding_mask_mode=key_padding_mask_mode,
        attn_mask_mode=attn_mask_mode,
    )
    if backend == "unfused":
        reasons = unfused_unavailable_reasons(x, return_lse)
        if reasons:
            raise NotImplementedError(
                f"{where}: backend='unfused' cannot run these inputs: "
                + "; ".join(reasons)
                + ". Fix: use backend='fused' or 'reference', or change the inputs."
            )
        from .index import frozen
        from .ops.unfused_attention import unfused_attention

        return unfused_attention(x, frozen(layout))
    if backend != "reference":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rpe, key_padding_mask, attn_mask)
        )
        reasons = fused_unavailable_reasons(x, needs_grad)
        if backend == "fused" and reasons:
            raise NotImplementedError(
                f"{where}: backend='fused' cannot run these inputs: "
                + "; ".join(reasons)
                + ". Fix: use backend='reference' (exact, O(L^2) memory) or change the inputs."
            )
        if backend == "auto":  # the kernel on CUDA; CPU tensors (even interpreted) use PyTorch
            backend = "fused" if q.device.type == "cuda" and not reasons else "reference"
            if reasons and q.device.type == "cuda":
                warnings.warn(
                    f"{where}: the fused kernel cannot run these inputs ("
                    + "; ".join(reasons)
                    + "); using the PyTorch reference "
                    "(O(L^2) memory). Pass backend='reference' to silence this.",
                    stacklevel=2,
                )
    if backend == "fused":
        from .ops.fused_attention import fused_attention

        out, lse = fused_attention(
            x.q,
            x.k,
            x.v,
            layout,
            block=x.block,
            scale=x.scale,
            causal=x.causal,
            rpe=x.rpe,
            key_padding_mask=x.key_padding_mask,
            attn_mask=x.attn_mask,
            key_padding_mask_mode=x.key_padding_mask_mode,
            attn_mask_mode=x.attn_mask_mode,
        )
        return (out, lse) if return_lse else out
    from .reference import reference_attention

    return reference_attention(
        q,
        k,
        v,
        layout,
        block=block,
        scale=scale,
        causal=causal,
        rpe=rpe,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        key_padding_mask_mode=key_padding_mask_mode,
        attn_mask_mode=attn_mask_mode,
        return_lse=return_lse,
    )
