"""Layouts chosen from the inputs at run time (pattern layer): top-k key blocks per query
block, scored by block-mean-pooled queries and keys (the scoring of Mixture of Block
Attention and of sparse video attention), returned as block lists for
:func:`~blocksparse_attn.block_sparse_attention`.

The scores are ``[B, H, nb_q, nb_k]``: one per pair of blocks, never one per pair of tokens.
Everything runs on the inputs' device with no host synchronisation, so a step that selects
and attends can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from ._errors import bad_argument, describe
from ._inputs import check_block
from .kv_blocks import KVBlocks


def _check(where, q, k, block, topk):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise bad_argument(where, "q", "a 4-D tensor [B, H, L_q, D]", describe(q))
    B, H, Lq, D = q.shape
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[0] != B or k.shape[3] != D:
        raise bad_argument(
            where, "k", f"a 4-D tensor [B, H_kv, L_k, D] = [{B}, H_kv, L_k, {D}]", describe(k)
        )
    if k.shape[1] == 0 or H % k.shape[1]:
        raise bad_argument(
            where, "k", f"H_kv heads dividing H = {H} (grouped-query attention)", describe(k)
        )
    if k.device != q.device:
        raise bad_argument(where, "k", f"on q's device ({q.device})", describe(k))
    check_block(where, block)
    for name, n in (("q", Lq), ("k", k.shape[2])):
        if n % block:
            raise bad_argument(
                where,
                f"{name}.shape[2]",
                f"a multiple of block={block}",
                n,
                "pad the sequence to the block and mask the padding.",
            )
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise bad_argument(where, "topk", "a positive int (key blocks per query block)", repr(topk))


def topk_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block: int,
    topk: int,
    causal: bool = False,
    keep_first: bool = False,
    keep_diagonal: bool = False,
    share_group: bool = False,
) -> KVBlocks:
    """For each query block, the ``topk`` key blocks with the highest score
    ``mean(q over the query block) . mean(k over the key block)``.

    Args:
        q: ``[B, H, L_q, D]``; ``k``: ``[B, H_kv, L_k, D]`` with ``H_kv`` dividing ``H``;
            lengths multiples of ``block``.
        block: block size in tokens (the layout's block).
        topk: key blocks kept per query block (at most ``L_k // block``; rows with fewer
            candidates, under ``causal``, keep all of theirs).
        causal: only key blocks that are not wholly after the query block are candidates
            (key block ``j`` for query block ``i`` when ``j <= i + nb_k - nb_q``, the
            bottom-right alignment of the attention functions); pair it with
            ``causal=True`` in the attention call for the token-level mask.
        keep_first: always keep key block 0 (an attention sink), within the ``topk``.
        keep_diagonal: always keep key block ``i`` for query block ``i``, within the
            ``topk``.
        share_group: with grouped-query attention, one choice per kv head from the summed
            scores of its query heads (lists ``[B, H_kv, nb_q]``); else one per query head.

    Returns trusted :class:`~blocksparse_attn.KVBlocks` ``[B, H or H_kv, nb_q]``, int32,
    ``max_blocks = min(topk, nb_k)``, each row's blocks by descending score. No gradient
    flows through the selection.
    """
    where = "topk_blocks"
    _check(where, q, k, block, topk)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nbq, nbk = Lq // block, Lk // block
    group = H // Hkv
    with torch.no_grad():
        # fp32 sums without an fp32 copy of q and k
        qp = q.detach().reshape(B, H, nbq, block, D).mean(3, dtype=torch.float32)
        kp = k.detach().reshape(B, Hkv, nbk, block, D).mean(3, dtype=torch.float32)
        if share_group:  # the sum of the group's scores is the score of its summed queries
            qp = qp.view(B, Hkv, group, nbq, D).sum(2)
        elif group > 1:
            kp = kp.repeat_interleave(group, 1)
        scores = torch.matmul(qp, kp.transpose(-1, -2))  # [B, H or H_kv, nb_q, nb_k]
        scores = torch.nan_to_num(scores, nan=float("-inf"))
        i = torch.arange(nbq, device=q.device)[:, None]
        j = torch.arange(nbk, device=q.device)[None, :]
        if keep_first:
            scores = scores.masked_fill(j == 0, float("inf"))
        if keep_diagonal:
            scores = scores.masked_fill(i == j, float("inf"))
        if causal:
            scores = scores.masked_fill(j > i + (nbk - nbq), float("-inf"))
        values, indices = torch.topk(scores, min(topk, nbk), dim=-1)
        # past a row's candidates topk returns -inf entries: they are not counted
        count = (values != float("-inf")).sum(-1)
    return KVBlocks(count.to(torch.int32), indices.to(torch.int32), trusted=True)
