"""The functional API (layer 6): validation, defaults and the choice of backend."""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from ._errors import bad_argument
from ._inputs import (
    AttentionInputs,
    check_attention_inputs,
    check_deterministic,
    per_query_head,
)
from .kernels.availability import (
    FUSED_MAX_HEAD_DIM_BWD,
    FUSED_MAX_HEAD_DIM_FWD,
    KERNEL_DTYPES,
    UNFUSED_BLOCKS,
)
from .kv_blocks import KVBlocks

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


def _sample(lay, b: int):
    """Sample ``b``'s layout as the kernels take it: ``[H_l, nb_q, nb_k]``, or block lists
    ``[1, H_l, nb_q]``."""
    if isinstance(lay, KVBlocks):
        return KVBlocks(lay.num_blocks[b : b + 1], lay.indices[b : b + 1], lay.trusted)
    return lay[b]


def _fold_layout(lay: torch.Tensor, B: int, heads: int) -> torch.Tensor:
    """A dense per-sample layout ``[B, H_l, nb_q, nb_k]`` with the batch folded into the
    heads (``heads``: expand ``H_l`` to that many first, -1 keeps it)."""
    return lay.expand(B, heads, -1, -1).flatten(0, 1)


def _on_kernels(x: AttentionInputs, layout, run, grouped: bool):
    """``run(inputs, layout)`` -> ``(out, lse or None)`` on inputs the Triton kernels take:
    one ``[H_l, nb_q, nb_k]`` layout for the batch, or block lists per sample (fused).

    ``grouped``: the kernels read grouped K/V heads and layouts of ``H_kv`` heads
    themselves (the fused kernels); otherwise K/V and the layout are repeated to the query
    heads first (the repeat's gradient sums over each group). Block lists per sample go to
    the fused kernels as they are (one launch; each sample's programs read its own lists
    and masks). A dense layout per sample runs as one launch over ``B * H`` heads when
    there is no key padding mask (which the kernels read per batch), else sample by
    sample. The caller's own 2-D/3-D tensor goes to the kernels as it is, so its compiled
    index is cached; a layout made here is compiled on every call."""
    B, H = x.q.shape[:2]
    if grouped:  # the fused kernels read block lists as they are (built on the device)
        lay = x.layout
    else:
        k, v, lay = per_query_head(x)
        x = replace(x, k=k, v=v)
    if isinstance(lay, KVBlocks) and (lay.shape[0] == 1 or grouped):
        return run(x, lay)  # as given (their index may be cached), per sample or shared
    if lay.shape[0] == 1:
        mine = isinstance(layout, torch.Tensor) and layout.dim() <= 3 and lay is x.layout
        return run(x, layout if mine else _sample(lay, 0))
    Lq, Lk = x.q.shape[2], x.k.shape[2]
    rpe = x.rpe
    if x.key_padding_mask is None:  # fold the batch into the heads: one launch

        def fold(t):
            return t.reshape(1, -1, *t.shape[2:])

        folded = replace(
            x,
            q=fold(x.q),
            k=fold(x.k),
            v=fold(x.v),
            rpe=None if rpe is None else fold(rpe.expand(B, H, Lq, Lk)),
        )
        heads = -1 if grouped else H  # the unfused ops take 1 or H layout heads
        out, lse = run(folded, _fold_layout(lay, B, heads))
        return out.view(x.q.shape), None if lse is None else lse.view(B, H, Lq)
    outs, lses = [], []
    for b in range(B):
        one = slice(b, b + 1)
        sample = replace(
            x,
            q=x.q[one],
            k=x.k[one],
            v=x.v[one],
            rpe=None if rpe is None else rpe[one if rpe.shape[0] == B else slice(0, 1)],
            key_padding_mask=x.key_padding_mask[one],
        )
        out, lse = run(sample, _sample(lay, b))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), None if lses[0] is None else torch.cat(lses)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor | KVBlocks,
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
    deterministic: bool = True,
):
    """Attention restricted to the blocks of ``layout``.

    Args:
        q: ``[B, H, L_q, D]``; ``k``, ``v``: ``[B, H_kv, L_k, D]`` with ``H_kv`` dividing
            ``H`` (grouped-query attention: query head ``h`` reads kv head
            ``h // (H // H_kv)``; ``H_kv = H`` is ordinary attention); one dtype and device.
        layout: integer/bool, non-zero = attend: ``[H_l, L_q // block, L_k // block]``
            shared by the batch (compiled once and cached per tensor, checked for edits on
            every call), or ``[1 or B, H_l, L_q // block, L_k // block]`` with a layout per
            sample, or a :class:`~blocksparse_attn.KVBlocks` (block lists, ``[1 or B, H_l,
            L_q // block]``); ``H_l`` is 1, ``H_kv`` or ``H``. The fused kernels read the
            grouped K/V heads directly; the unfused backend repeats them to ``H`` heads.
            Per-sample layouts run as one launch over ``B * H`` heads (sample by sample
            with a key padding mask) and are compiled on every call.
        block: layout block size in tokens.
        scale: score scale, default ``D ** -0.5``.
        causal: token-level causal mask, bottom-right aligned as in FlashAttention 2.1+ and
            FlexAttention's decoding (key ``j`` visible from query ``i`` iff
            ``j <= i + L_k - L_q``: the last query sees the last key, so queries that are
            the newest tokens of a KV cache see all of it), applied inside diagonal blocks;
            blocks wholly in the future are skipped. With ``L_q == L_k`` it is ``j <= i``.
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
        return_lse: also return the log-sum-exp ``[B, H, L_q]`` (float32, natural log),
            differentiable: a loss of both the output and the log-sum-exp (merging
            partial attentions, a z-loss) gets the gradient of each.
        deterministic: the gradients do not depend on the order GPU programs run in
            (bit-identical from run to run; the default). ``False`` allows a faster
            backward where there is one: on Hopper (the fused backend's sm90 kernels,
            head dim 128, block 128) one kernel computes dQ, dK and dV, adding dQ's parts
            into fp32 by reductions in no fixed order, so dQ's last bits vary from run to
            run (dK, dV and the forward do not). ``torch.use_deterministic_algorithms(True)``
            keeps the deterministic backward. Elsewhere it changes nothing.

    Returns ``out [B, H, L_q, D]`` in the input dtype (and ``lse``). A query with nothing
    to attend gets zeros (and zero gradients), never NaN; its ``lse`` is ``-inf``.

    fp32 inputs use exact fp32 products in the kernel unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set.
    """
    where = "block_sparse_attention"
    check_deterministic(where, deterministic)
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

        def unfused(xs: AttentionInputs, lay: torch.Tensor):
            return unfused_attention(xs, frozen(lay)), None

        return _on_kernels(x, layout, unfused, grouped=False)[0]
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

        def fused(xs: AttentionInputs, lay: torch.Tensor):
            return fused_attention(
                xs.q,
                xs.k,
                xs.v,
                lay,
                block=xs.block,
                scale=xs.scale,
                causal=xs.causal,
                rpe=xs.rpe,
                key_padding_mask=xs.key_padding_mask,
                attn_mask=xs.attn_mask,
                key_padding_mask_mode=xs.key_padding_mask_mode,
                attn_mask_mode=xs.attn_mask_mode,
                deterministic=deterministic,
            )

        out, lse = _on_kernels(x, layout, fused, grouped=True)
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
