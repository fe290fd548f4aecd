"""Attention of new tokens against a KV cache (functional layer): ``block_sparse_decode``.

The new queries of sequence ``b`` are the last ``L_new`` of its ``n_b`` tokens (``n_b`` =
``cache_seqlens[b]``, plus ``L_new`` when ``k_new``/``v_new`` are appended), and each uses
the layout row of its absolute position, as in prefill.

One new token per sequence (decoding) runs on the cache in place. On the fused backend the
decoding kernels (``kernels.decode``) read each sequence's layout row as a block list,
contiguous or paged caches directly, a grouped-query group's heads in one program, and a
long row split across programs merged by log-sum-exp; they compute no gradient, so inputs
that require one take the general fused kernels (the cache read as ``[B, H_kv, L_max, D]``
through its strides, a key padding mask hiding the keys at or past ``n_b``, a paged cache
gathered into a contiguous one). Several new tokens (chunked prefill, speculative
decoding) go through :func:`~blocksparse_attn.block_sparse_attention_varlen`, which copies
each sequence's cached keys into a packed batch.
"""

from __future__ import annotations

import torch

from ._errors import bad_argument, describe
from ._inputs import capturing, check_block, check_layout, check_scale
from .kv_blocks import KVBlocks, source_grid, source_lists


def _check_heads(where, heads: int, H: int, H_kv: int) -> None:
    if heads not in (1, H_kv, H):
        raise bad_argument(
            where, "layout", f"1, H_kv = {H_kv} or H = {H} layout heads", f"{heads} heads"
        )


def _rows(where, layout, n_keys: int, block: int, device) -> KVBlocks:
    """Block lists ``[B_l, H_l, nb]`` of the pattern over ``n_keys`` tokens (rows =
    absolute query blocks, each row's blocks ascending)."""
    if isinstance(layout, KVBlocks):
        return layout
    return source_lists(where, layout, n_keys, block, device)


def _unique(num: torch.Tensor, idx: torch.Tensor):
    """Each row's used entries once, ascending, first (a key block listed twice is attended
    once): ``(num, idx)`` of ``[..]`` and ``[.., W]``. Device operations only."""
    spare = torch.iinfo(torch.int32).max
    used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    ordered = torch.where(used, idx, spare).sort(-1).values
    repeat = torch.zeros_like(used)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    ordered = torch.where(repeat, spare, ordered).sort(-1).values
    return (ordered != spare).sum(-1).to(torch.int32), ordered


def _query_lists(where, layout, lengths, added, L_pad, block, device):
    """``(num, idx)`` for the decoding kernels: ``[B|1, H_l, nb]`` and ``[B|1, H_l, nb, W]``,
    the pattern's lists over ``L_pad`` tokens, from which the kernel takes each sequence's
    newest block row (a ``SparsityConfig``'s, cached, and trusted lists: no operation per
    call); or that row already picked, ``[B, H_l, 1]`` and ``[B, H_l, 1, W]`` for the
    ``lengths + added`` keys of each sequence: a callable's (only those rows are converted)
    and lists given untrusted (each key block kept once; they were checked by
    :func:`~blocksparse_attn._inputs.check_layout`)."""
    from .patterns import SparsityConfig

    def newest_rows():  # each sequence's newest block row
        return ((lengths.long() + (added - 1)) // block).clamp(min=0)

    if not isinstance(layout, (KVBlocks, SparsityConfig)):  # a callable: only the rows
        grid = source_grid(where, layout, L_pad, block, device)
        rows = grid.to(device)[:, newest_rows()] != 0  # [H_l, B, nb]
        lists = KVBlocks.from_layout(rows.transpose(0, 1)[:, :, None])
        return lists.num_blocks, lists.indices
    lists = _rows(where, layout, L_pad, block, device)
    if lists.trusted:
        return lists.num_blocks, lists.indices
    mine = _row_lists(lists, newest_rows())
    return _unique(mine.num_blocks, mine.indices)


def _decode_kernel(
    where,
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    added,
    layout,
    L_pad,
    block,
    scale,
    block_table,
    first_key=None,
):
    """``(out [B, 1, H, D], lse [B, 1, H])`` of one new query per sequence by the decoding
    kernels (see the module docstring): sequence ``b`` has ``cache_seqlens[b] + added``
    keys; ``L_pad``: the pattern's length."""
    from .kernels._common import unit_last_stride
    from .kernels.decode import decode_attention

    B, _, H, D = q.shape
    num, idx = _query_lists(where, layout, cache_seqlens, added, L_pad, block, q.device)
    _check_heads(where, num.shape[1], H, k_cache.shape[2])
    out, lse = decode_attention(
        unit_last_stride(q[:, 0]),
        unit_last_stride(k_cache),
        unit_last_stride(v_cache),
        cache_seqlens,
        num,
        idx,
        block=block,
        scale=scale,
        added=added,
        block_table=block_table,
        first_key=first_key,
    )
    return out[:, None], lse[:, None]


def _decoding_kernels_run(where, q, k_cache, v_cache, backend) -> bool:
    """Whether one new token per sequence goes to the decoding kernels: the fused backend
    (``'auto'`` on CUDA) on inputs the kernels take, and no gradient wanted."""
    from .kernels.availability import (
        FUSED_MAX_HEAD_DIM_FWD,
        KERNEL_DTYPES,
        kernel_unavailable_reasons,
    )

    if backend == "reference":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        return False  # the general fused kernels have the backward
    reasons = kernel_unavailable_reasons(q.device)
    if q.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if q.shape[-1] > FUSED_MAX_HEAD_DIM_FWD:
        reasons.append(f"head dim {q.shape[-1]} > {FUSED_MAX_HEAD_DIM_FWD}")
    if backend == "fused" and reasons:
        raise NotImplementedError(
            f"{where}: backend='fused' cannot run these inputs: "
            + "; ".join(reasons)
            + ". Fix: use backend='reference' or change the inputs."
        )
    return backend == "fused" or (q.device.type == "cuda" and not reasons)


def _per_sequence(lists: KVBlocks, B: int) -> KVBlocks:
    """Lists shared by the batch expanded to ``B`` sequences."""
    if lists.shape[0] == B:
        return lists
    return KVBlocks(
        lists.num_blocks.expand(B, -1, -1), lists.indices.expand(B, -1, -1, -1), lists.trusted
    )


def _row_lists(lists: KVBlocks, row: torch.Tensor) -> KVBlocks:
    """Row ``row[b]`` of each sequence's lists (shared lists or one set per sequence):
    ``[B, H_l, 1]``."""
    lists = _per_sequence(lists, row.shape[0])
    B, heads = lists.shape[:2]
    at = row.view(B, 1, 1).expand(B, heads, 1)
    width = lists.indices.shape[-1]
    num = lists.num_blocks.gather(2, at)
    idx = lists.indices.gather(2, at[..., None].expand(B, heads, 1, width))
    return KVBlocks(num, idx, lists.trusted)


def _present(lists: KVBlocks, nb: torch.Tensor) -> KVBlocks:
    """The lists with the key blocks at or past ``nb [B, 1, 1]`` (not yet written) dropped,
    used entries first. Device operations only."""
    width = lists.indices.shape[-1]
    used = torch.arange(width, device=nb.device) < lists.num_blocks[..., None]
    keep = used & (lists.indices < nb[..., None])
    return KVBlocks.from_entries(keep, lists.indices, lists.trusted)


def _contiguous_cache(k_cache, v_cache, block_table, L_pad: int):
    """``(k, v)`` as ``[B, L_pad, H_kv, D]``: the cache itself, the cache with zero rows
    up to whole blocks (a copy), or the pages of ``block_table`` gathered (a copy; pages
    hold whole blocks)."""
    if block_table is None:
        rows = L_pad - k_cache.shape[1]
        if rows == 0:
            return k_cache, v_cache
        return tuple(torch.nn.functional.pad(t, (0, 0, 0, 0, 0, rows)) for t in (k_cache, v_cache))
    B = block_table.shape[0]
    k = k_cache[block_table.long()].reshape(B, -1, *k_cache.shape[2:])
    v = v_cache[block_table.long()].reshape(B, -1, *v_cache.shape[2:])
    return k, v


def _check_pages(where, k_cache, block_table, B: int, block: int) -> None:
    if (
        not isinstance(block_table, torch.Tensor)
        or block_table.dim() != 2
        or block_table.shape[0] != B
        or block_table.dtype != torch.int32
        or block_table.device != k_cache.device
    ):
        raise bad_argument(
            where,
            "block_table",
            f"an int32 tensor [{B}, max_pages] on the cache's device ({k_cache.device})",
            describe(block_table),
        )
    if k_cache.shape[1] % block:
        raise bad_argument(
            where,
            "k_cache",
            f"pages of a multiple of block={block} tokens",
            f"page size {k_cache.shape[1]}",
            "allocate the paged cache with pages of whole blocks.",
        )
    pages = k_cache.shape[0]
    if not capturing(block_table.device):  # before anything is written through it
        if bool(((block_table < 0) | (block_table >= pages)).any()):
            raise bad_argument(
                where,
                "block_table",
                f"page numbers in [0, {pages})",
                f"values up to {int(block_table.max())}",
            )


def _check_first_key(where, first_key, B: int, L_new: int, device) -> None:
    if (
        not isinstance(first_key, torch.Tensor)
        or first_key.shape != (B,)
        or first_key.dtype != torch.int32
        or first_key.device != device
    ):
        raise bad_argument(
            where, "first_key", f"an int32 tensor [{B}] on {device}", describe(first_key)
        )
    if L_new != 1:
        raise NotImplementedError(
            f"{where}: first_key with {L_new} new tokens per sequence: hidden leading keys "
            "are supported for one new token only. Fix: leave first_key out (attend from "
            "key 0) or decode one token at a time."
        )


def _append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    """Write ``k_new``/``v_new`` ``[B, L_new, H_kv, D]`` into the cache at
    ``cache_seqlens`` (through the pages of ``block_table`` when given), in place."""
    B, L_new = k_new.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(L_new, device=k_new.device)
    rows = torch.arange(B, device=k_new.device)[:, None].expand(B, L_new)
    if block_table is None:
        index = (rows, pos)
    else:
        page_size = k_cache.shape[1]
        page = block_table.long()[rows, pos // page_size]
        index = (page, pos % page_size)
    k_cache.index_put_(index, k_new)
    v_cache.index_put_(index, v_new)


def block_sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    layout,
    *,
    block: int,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_table: torch.Tensor | None = None,
    first_key: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of ``L_new`` new queries per sequence against a KV cache, appending the
    new keys and values first.

    Args:
        q: ``[B, L_new, H, D]``.
        k_cache, v_cache: ``[B, L_max, H_kv, D]`` (any strides; the pattern is taken
            over ``L_max`` rounded up to the block), or pages
            ``[num_pages, page_size, H_kv, D]`` with ``block_table``.
        cache_seqlens: int32 ``[B]``, the tokens each sequence has in the cache (not
            updated here, as in FlashAttention's ``flash_attn_with_kvcache``).
        layout: the pattern over a sequence's absolute blocks: a
            :class:`~blocksparse_attn.SparsityConfig`, a callable ``(seq_len, device) ->
            [H_l, nb, nb]``, or :class:`~blocksparse_attn.KVBlocks` ``[B or 1, H_l, nb]``.
        block: layout block size in tokens.
        k_new, v_new: ``[B, L_new, H_kv, D]`` written into the cache at ``cache_seqlens``
            (in place) before attending; the cache must have room.
        causal: a new query sees the keys up to its own position (bottom-right aligned).
        scale: score scale, default ``D ** -0.5``.
        block_table: int32 ``[B, max_pages]``, page numbers of each sequence (paged
            cache; pages of a multiple of ``block`` tokens).
        first_key: int32 ``[B]``, each sequence's first visible key: the keys before it
            (a left-padded batch's padding) are hidden; positions still count from 0.
            One new token per sequence only.
        return_lse: also return the log-sum-exp ``[B, L_new, H]``.
        backend: ``'auto'``, ``'fused'`` or ``'reference'``.

    Returns ``out [B, L_new, H, D]`` (and ``lse``).
    """
    from .functional import block_sparse_attention
    from .varlen import block_sparse_attention_varlen

    where = "block_sparse_decode"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise bad_argument(where, "q", "a 4-D tensor [B, L_new, H, D]", describe(q))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise bad_argument(where, name, "a 4-D tensor [B, L_max, H_kv, D]", describe(t))
    check_block(where, block)
    B, L_new, H, D = q.shape
    scale = check_scale(where, scale, D)
    if (
        not isinstance(cache_seqlens, torch.Tensor)
        or cache_seqlens.shape != (B,)
        or cache_seqlens.dtype != torch.int32
    ):
        raise bad_argument(
            where, "cache_seqlens", f"an int32 tensor [{B}]", describe(cache_seqlens)
        )
    if (k_new is None) != (v_new is None):
        raise bad_argument(where, "k_new, v_new", "both or neither", "only one of them")
    if block_table is not None:
        _check_pages(where, k_cache, block_table, B, block)
    if first_key is not None:
        _check_first_key(where, first_key, B, L_new, q.device)
    L_max = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    L_pad = -(-L_max // block) * block  # the pattern's length: whole blocks
    added = L_new if k_new is not None else 0  # tokens after appending: cache_seqlens + added
    if not capturing(q.device) and B:
        stats = [*torch.aminmax(cache_seqlens)]
        if first_key is not None:  # each sequence's first key before its newest
            hidden = (first_key < 0) | (first_key >= cache_seqlens + added)
            stats.append(hidden.any().to(torch.int32))
        low, high, *hidden = torch.stack(stats).tolist()  # one read-back
        if hidden and hidden[0]:
            raise bad_argument(
                where,
                "first_key",
                "first keys in [0, cache_seqlens + new) (the newest token stays visible)",
                f"first_key {first_key.tolist()[:8]} for cache_seqlens "
                f"{cache_seqlens.tolist()[:8]} with {L_new} new tokens",
            )
        if high + added > L_max or low + added < L_new:
            raise bad_argument(
                where,
                "cache_seqlens",
                f"lengths with room for the new tokens (cache_seqlens + new <= {L_max}) "
                f"that hold the {L_new} new queries' positions",
                f"cache_seqlens {cache_seqlens.tolist()[:8]} with {L_new} new tokens",
            )
    if isinstance(layout, KVBlocks):
        check_layout(
            where, layout, B, H, k_cache.shape[2], L_pad // block, L_pad // block, q.device
        )
    if k_new is not None:
        _append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    if L_new == 1 and _decoding_kernels_run(where, q, k_cache, v_cache, backend):
        out, lse = _decode_kernel(
            where,
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            added,
            layout,
            L_pad,
            block,
            scale,
            block_table,
            first_key,
        )
        return (out, lse) if return_lse else out
    n = cache_seqlens.long() + added
    k, v = _contiguous_cache(k_cache, v_cache, block_table, L_pad)
    lists = _rows(where, layout, L_pad, block, q.device)
    _check_heads(where, lists.shape[1], H, k_cache.shape[2])
    nb = -(-n // block)
    if L_new == 1:  # on the cache in place: one query sees every key before n
        row = ((n - 1) // block).clamp(min=0)  # the query's block
        mine = _present(_row_lists(lists, row), nb[:, None, None])
        q4 = torch.nn.functional.pad(q.permute(0, 2, 1, 3), (0, 0, 0, block - 1))
        keys = torch.arange(L_pad, device=q.device)[None, :]
        keep = keys < n[:, None]
        if first_key is not None:
            keep = keep & (keys >= first_key[:, None])
        result = block_sparse_attention(
            q4,
            k.permute(0, 2, 1, 3),
            v.permute(0, 2, 1, 3),
            mine,
            block=block,
            scale=scale,
            key_padding_mask=keep,
            key_padding_mask_mode="mul",
            backend=backend,
            return_lse=return_lse,
        )
        out, lse = result if return_lse else (result, None)
        out = out[:, :, :1].permute(0, 2, 1, 3)
        return (out, lse[:, :, :1].transpose(1, 2)) if return_lse else out
    # several new queries: a packed batch of each sequence's keys (a copy; selecting them
    # reads the lengths on the host)
    cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * L_new
    cu_k = torch.cat([n.new_zeros(1), torch.cumsum(n, 0)]).to(torch.int32)
    keys = torch.arange(L_pad, device=q.device)[None, :] < n[:, None]
    per_seq = _per_sequence(lists, B)
    result = block_sparse_attention_varlen(
        q.reshape(B * L_new, H, D),
        k[keys],
        v[keys],
        cu_q,
        cu_k,
        _present(per_seq, nb[:, None, None]),
        block=block,
        causal=causal,
        scale=scale,
        return_lse=return_lse,
        backend=backend,
    )
    if return_lse:
        out, lse = result
        return out.view(B, L_new, H, D), lse.view(B, L_new, H)
    return result.view(B, L_new, H, D)
