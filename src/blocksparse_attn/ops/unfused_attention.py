"""The unfused backend: DeepSpeed's algorithm, ``scores = sdd(q, k)`` on the layout's
blocks, ``probs = softmax(scores, ...)``, ``out = dsd(probs, v)``, on the compressed format.

Scores are stored in fp32 (4 bytes per kept score, O(B * nnz * block^2)), so that fp16
inputs with large ``q.k`` or ``scale`` do not overflow before the softmax; probabilities
are stored in the inputs' dtype. Keys hidden from every query by the key padding mask are
read as zeros, so that a NaN or inf stored there does not reach other rows through
``0 * NaN``.
"""

from __future__ import annotations

import torch

from .._inputs import AttentionInputs
from ..index import _cached
from .softmax import attention_ops


def unfused_ops(layout: torch.Tensor, block: int, heads: int, causal: bool):
    """SDD, softmax and DSD operators for ``layout`` over ``heads`` heads, cached per layout
    tensor (see :func:`blocksparse_attn.index.get_index`). With ``causal`` the blocks
    wholly after the diagonal are dropped."""

    def build():
        lay = (layout != 0).expand(heads, -1, -1)
        if causal:  # bottom-right aligned: the diagonal moves by nb_k - nb_q blocks
            nbq, nbk = lay.shape[1:]
            ones = torch.ones((nbq, nbk), dtype=torch.bool, device=lay.device)
            lay = lay & ones.tril(nbk - nbq)
        return attention_ops(lay, block)

    return _cached(layout, ("unfused", block, heads, causal), build)


def _padding(x: AttentionInputs) -> torch.Tensor | None:
    """``[B, 1, L_k, 1]`` true at keys the key padding mask hides from every query."""
    kpm = x.key_padding_mask
    if kpm is None:
        return None
    hidden = kpm == 0 if x.key_padding_mask_mode == "mul" else torch.isneginf(kpm)
    return hidden[:, None, :, None]


def unfused_attention(x: AttentionInputs, layout: torch.Tensor) -> torch.Tensor:
    """Differentiable attention on checked inputs (``layout``: the caller's tensor, whose
    compiled form is cached)."""
    sdd, softmax, dsd = unfused_ops(layout, x.block, x.q.shape[1], x.causal)
    k, v = x.k, x.v
    hidden = _padding(x)
    if hidden is not None:
        k, v = k.masked_fill(hidden, 0), v.masked_fill(hidden, 0)
    scores = sdd.product(x.q, k, out_dtype=torch.float32)
    probs = softmax.probabilities(
        scores,
        x.scale,
        x.rpe,
        x.key_padding_mask,
        x.attn_mask,
        x.key_padding_mask_mode,
        x.attn_mask_mode,
        causal=x.causal,
        out_dtype=x.q.dtype,
    )
    return dsd(probs, v)
