"""Reference attention (layer 3): dense PyTorch math with the exact mask semantics.

The oracle of every kernel test and the backend on machines without a GPU. It builds the
``[B, H, L_q, L_k]`` score matrix, so its memory is O(L^2): use it for small problems.
"""

from __future__ import annotations

import torch

from ._inputs import additive, check_attention_inputs, per_query_head


def token_mask(layout: torch.Tensor, block: int, causal: bool = False) -> torch.Tensor:
    """Bool ``[..., L_q, L_k]`` for a layout ``[..., nb_q, nb_k]``: which (query, key) pairs
    the layout (and ``causal``, bottom-right aligned: key ``j`` is visible from query ``i``
    when ``j <= i + L_k - L_q``) keep."""
    keep = (layout != 0).repeat_interleave(block, -2).repeat_interleave(block, -1)
    if causal:
        Lq, Lk = keep.shape[-2:]
        ones = torch.ones((Lq, Lk), dtype=torch.bool, device=keep.device)
        keep = keep & ones.tril(Lk - Lq)
    return keep


def reference_attention(
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
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """Block-sparse attention computed densely, with DeepSpeed's semantics.

    For each batch ``b``, head ``h``, query ``i`` and key ``j`` kept by the layout
    (``layout[h, i // block, j // block] != 0``, and ``j <= i + L_k - L_q`` when ``causal``):

        s = scale * q·k + rpe + key_padding_mask + attn_mask      (masks in additive form)
        out = softmax(s over kept j) @ v

    Shapes: ``q [B, H, L_q, D]``, ``k, v [B, H_kv, L_k, D]`` (``H_kv`` dividing ``H``: query
    head ``h`` reads kv head ``h // (H // H_kv)``), ``layout [1, H_kv or H, L_q/block,
    L_k/block]``, per sample ``[1 or B, 1, H_kv or H, L_q/block, L_k/block]``, or a
    :class:`~blocksparse_attn.KVBlocks`; ``rpe`` broadcastable to ``[B, H, L_q, L_k]``,
    ``key_padding_mask [B, L_k]`` (BERT's ``[B, 1, 1, L_k]`` accepted), ``attn_mask
    [L_q, L_k]``. Mask modes:
    ``'add'`` adds the value; ``'mul'`` keeps non-zero entries and masks zeros.

    Computed in ``compute_dtype`` (default float32, float64 for float64 inputs; the input
    dtype measures plain low-precision error in tests) and returned in the input dtype. A
    query with nothing to attend gets a zero output and zero gradients (its log-sum-exp is
    ``-inf``). Gradients flow to ``q``, ``k``, ``v``, ``rpe`` and additive ('add' mode)
    masks.

    Masked means replaced: a ``-inf`` mask entry, a zero 'mul' entry, a block outside the
    layout or a key after the query (``causal``) set the score to ``-inf`` whatever ``q·k``
    is, and a key whose ``k`` or ``v`` holds NaN or inf changes only the queries that attend
    it (their score, or their output, is NaN).

    Returns ``out`` or, with ``return_lse``, ``(out, lse)`` with ``lse [B, H, L_q]`` in the
    compute dtype, the natural-log sum of ``exp(s)`` over kept keys.
    """
    x = check_attention_inputs(
        "reference_attention",
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
    ct = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    kh, vh, layout = per_query_head(x)  # grouped-query attention: one head per query head
    qc, kc, vc = q.to(ct), kh.to(ct), vh.to(ct)
    # Non-finite keys and values enter the products as zeros, so that a key a query does not
    # attend contributes exactly nothing to it (0 * NaN would be NaN); a query that does
    # attend such a key gets a NaN score (K) or a NaN output (V).
    k_ok = torch.isfinite(kc).all(-1)  # [B, H, L_k]
    v_ok = torch.isfinite(vc).all(-1)
    kc = torch.where(k_ok[..., None], kc, 0.0)
    vc = torch.where(v_ok[..., None], vc, 0.0)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * x.scale
    s = torch.where(k_ok[..., None, :], s, float("nan"))
    if x.rpe is not None:
        s = _add_bias(s, x.rpe.to(ct))
    if x.key_padding_mask is not None:
        s = _add_bias(
            s, additive(x.key_padding_mask, x.key_padding_mask_mode, ct)[:, None, None, :]
        )
    if x.attn_mask is not None:
        s = _add_bias(s, additive(x.attn_mask, x.attn_mask_mode, ct))
    s = s.masked_fill(~token_mask(layout.to(q.device), block, x.causal), float("-inf"))
    if s.shape[-1]:
        m = s.detach().amax(-1, keepdim=True)
    else:  # no keys at all
        m = s.new_full(s.shape[:-1] + (1,), float("-inf"))
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p, vc) / torch.where(denom == 0, torch.ones_like(denom), denom)
    sees_bad_value = torch.matmul((p.detach() > 0).to(ct), (~v_ok).to(ct)[..., None]) > 0
    out = torch.where(sees_bad_value, float("nan"), out).to(q.dtype)
    if not return_lse:
        return out
    # rows with nothing to attend: -inf, and no gradient (log(0)'s infinite slope times a
    # zero seed would be NaN, and reach q, k and the masks where the row was emptied by
    # finite masks whose sum passed the compute dtype's range)
    empty = denom == 0  # not NaN: a NaN score keeps its row's log-sum-exp NaN
    lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, denom)))
    return out, lse.squeeze(-1)


def _add_bias(s: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``s + bias``, where a ``-inf`` bias masks: it replaces the score (NaN or inf
    included) instead of being added to it."""
    return torch.where(torch.isneginf(bias), float("-inf"), s + bias)
