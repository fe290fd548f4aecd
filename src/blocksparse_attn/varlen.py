"""Packed variable-length batches (functional layer): ``block_sparse_attention_varlen``.

Sequences of different lengths are concatenated without padding, FlashAttention's way
(``q [total_q, H, D]``, ``cu_seqlens``). Each sequence has its own pattern; its queries are
the last ``L_q`` positions of its ``L_k`` keys (``L_q = L_k`` in training, fewer in chunked
prefill), and a query uses the layout row of its absolute position.

The fused backend runs all sequences in one launch: keys are placed block-aligned one
sequence after another, each query at its absolute key position, and the sequences' block
lists, shifted to those places, form one set of lists (a block never mixes sequences, and
causality is the ordinary ``key <= query`` in those coordinates). Padding keys are masked;
padding queries are dropped. With block lists given, nothing is read on the host except
the value checks, which are skipped for trusted lists or during CUDA-graph capture. With a
config, the offsets are read once per call, and the packing of the last few batches (lists
and their compiled index) is kept by the offsets' values: a model's layers on one batch
pack it once.
"""

from __future__ import annotations

import weakref

import torch

from ._errors import bad_argument, describe
from ._inputs import capturing, check_block
from .index import private_lists
from .kv_blocks import KVBlocks, config_lists, source_grid
from .ops.gather_rows import gather_rows
from .patterns import SparsityConfig


def _check_cu(where, name, cu, total, device, max_len, host_checks) -> list[int] | None:
    """Checks ``cu``; with ``host_checks``, reads it once and returns the sequence lengths
    (None without)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise bad_argument(where, name, "a 1-D int32 tensor [n_seq + 1]", describe(cu))
    if cu.dtype != torch.int32:
        raise bad_argument(where, name, "int32", describe(cu), f"pass {name}.to(torch.int32).")
    if cu.device != device:
        raise bad_argument(where, name, f"on the inputs' device ({device})", describe(cu))
    if not host_checks:
        return None
    values = cu.tolist()
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or values[-1] != total or min(lengths) < 0:
        raise bad_argument(
            where,
            name,
            f"non-decreasing offsets from 0 to the packed length {total}",
            values if len(values) <= 12 else f"{values[:6]} ... {values[-3:]}",
        )
    if max_len is not None and max(lengths) > max_len:
        raise bad_argument(
            where,
            name,
            f"sequences of at most max_seqlen = {max_len} tokens",
            f"a sequence of {max(lengths)}",
        )
    return lengths


def _check_sequence_lists(where, lists: KVBlocks, len_k: torch.Tensor, block: int) -> None:
    """Each sequence's lists name only its own key blocks, and cover its query blocks
    (host reads)."""
    nb = -(-len_k.long() // block)
    rows = lists.shape[2]
    if int(nb.max()) > rows:
        raise bad_argument(
            where,
            "layout",
            f"lists for every key block of the longest sequence ({int(nb.max())} rows)",
            f"{rows} rows",
        )
    width = lists.indices.shape[-1]
    used = torch.arange(width, device=lists.device) < lists.num_blocks[..., None]
    bad_count = (lists.num_blocks < 0) | (lists.num_blocks > width)
    bad = used & ((lists.indices < 0) | (lists.indices >= nb[:, None, None, None]))
    if bool(bad_count.any()) or bool(bad.any()):
        s = int((bad.flatten(1).any(1) | bad_count.flatten(1).any(1)).long().argmax())
        raise bad_argument(
            where,
            "layout",
            "per sequence, counts in [0, max_blocks] and used indices below its number of "
            "key blocks",
            f"sequence {s} ({int(nb[s])} key blocks) with counts or indices out of range",
        )


# a callable's layouts are gathered into one dense grid of at most this many entries (one
# copy to the device, one conversion to lists); larger sets are converted one by one
_GRID_ENTRIES = 1 << 26


def _sequence_lists(where, layout, lengths_k: list[int], block: int, device) -> KVBlocks:
    """Block lists ``[n_seq, H_l, nb_k_max]`` of every sequence's square layout (rows =
    the sequence's absolute query blocks), from a config (its lists cached per length) or
    a callable (asked once per sequence, its layouts gathered and converted together)."""
    sizes = [-(-Lk // block) for Lk in lengths_k]
    if not isinstance(layout, SparsityConfig):
        # an empty sequence asks nothing of the source
        grids = [source_grid(where, layout, n * block, block, device) if n else None for n in sizes]
        heads = max([g.shape[0] for g in grids if g is not None], default=1)
        _check_layout_heads(where, [g.shape[0] for g in grids if g is not None], heads)
        rows = max(sizes)
        if len(sizes) * heads * rows * rows <= _GRID_ENTRIES:
            on = next((g.device for g in grids if g is not None), torch.device("cpu"))
            dense = torch.zeros(len(sizes), heads, rows, rows, dtype=torch.bool, device=on)
            for s, g in enumerate(grids):
                if g is not None:
                    dense[s, :, : sizes[s], : sizes[s]] = g.to(on) != 0
            lists = KVBlocks.from_layout(dense.to(device))
            return KVBlocks(lists.num_blocks, lists.indices, trusted=True)
        per_seq = [
            _empty_lists(device) if g is None else KVBlocks.from_layout(g.to(device) != 0)
            for g in grids
        ]
    else:
        per_seq = [
            _empty_lists(device) if nb == 0 else config_lists(layout, nb * block, device)
            for nb in sizes
        ]
    return _stacked(where, per_seq, device)


def _check_layout_heads(where, counts: list[int], heads: int) -> None:
    """Every sequence's layout has 1 or ``heads`` heads (the most any has)."""
    odd = [h for h in counts if h not in (1, heads)]
    if odd:
        raise bad_argument(
            where,
            "layout",
            f"1 or {heads} layout heads for every sequence (the most any sequence's has)",
            f"a sequence's layout with {odd[0]} heads",
            "give every sequence's layout the same heads.",
        )


def _stacked(where, per_seq: list[KVBlocks], device) -> KVBlocks:
    """Lists ``[1, H_l or 1, r_s, w_s]`` of each sequence as one ``[n_seq, H_l, r, w]``
    (zeros past each sequence's rows and widths): the lists concatenated flat, then one
    gather, whatever the number of sequences."""
    heads = max(b.shape[1] for b in per_seq)
    rows = max(b.shape[2] for b in per_seq)
    width = max(b.indices.shape[-1] for b in per_seq)
    _check_layout_heads(where, [b.shape[1] for b in per_seq], heads)
    zero = torch.zeros(1, dtype=torch.int32, device=device)  # read past every sequence's lists
    flat_num = torch.cat([b.num_blocks.reshape(-1) for b in per_seq] + [zero])
    flat_idx = torch.cat([b.indices.reshape(-1) for b in per_seq] + [zero])
    meta, num_at, idx_at = [], 0, 0  # per sequence: heads, rows, width, offsets
    for b in per_seq:
        meta.append((b.shape[1], b.shape[2], b.indices.shape[-1], num_at, idx_at))
        num_at, idx_at = num_at + b.num_blocks.numel(), idx_at + b.indices.numel()
    h_s, r_s, w_s, num_off, idx_off = (
        torch.tensor(meta, dtype=torch.int64).to(device).T[:, :, None, None]
    )
    head = torch.arange(heads, device=device)[:, None] % h_s  # [n_seq, H_l, 1]: 0 or h
    row = torch.arange(rows, device=device)
    entry = head * r_s + row  # [n_seq, H_l, r]: the row's place in its sequence's lists
    inside = row < r_s
    num = flat_num[torch.where(inside, num_off + entry, num_at)]  # past the rows: the zero
    col = torch.arange(width, device=device)
    keep = inside[..., None] & (col < w_s[..., None])
    idx = flat_idx[
        torch.where(keep, idx_off[..., None] + entry[..., None] * w_s[..., None] + col, idx_at)
    ]
    return KVBlocks(num, idx, trusted=True)


def _empty_lists(device) -> KVBlocks:
    """The lists of an empty sequence: no blocks (nothing is asked of the layout source)."""
    empty = torch.zeros(1, 1, 0, dtype=torch.int32, device=device)
    return KVBlocks(empty, empty[..., None], trusted=True)


def block_sparse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    layout,
    *,
    block: int,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over packed sequences of different lengths, each with its own layout.

    Args:
        q: ``[total_q, H, D]``; ``k``, ``v``: ``[total_k, H_kv, D]`` (grouped-query heads
            as in :func:`~blocksparse_attn.block_sparse_attention`).
        cu_seqlens_q, cu_seqlens_k: int32 ``[n_seq + 1]``, the offsets of each sequence
            (FlashAttention's convention). Sequence ``s`` has ``L_q <= L_k``: its queries
            are the last ``L_q`` positions of its ``L_k`` keys. Lengths need not be
            multiples of ``block`` (the last block is partial and masked).
        layout: each sequence's pattern over its key blocks, rows by absolute query block:
            a :class:`~blocksparse_attn.SparsityConfig` (made per sequence length), a
            callable ``(seq_len, device) -> [H_l, nb, nb]`` for a sequence of ``seq_len``
            (a multiple of the block) tokens, or :class:`~blocksparse_attn.KVBlocks`
            ``[n_seq, H_l, nb_k_max]`` in each sequence's block coordinates.
        block: layout block size in tokens.
        max_seqlen_q, max_seqlen_k: bounds on the lengths (checked when given).
        causal: key ``j`` visible from query ``i`` of the same sequence when ``j`` is not
            after ``i``'s position (bottom-right aligned).
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``[total_q, H]``.
        backend: ``'fused'``, ``'reference'`` or ``'auto'`` (as in
            :func:`~blocksparse_attn.block_sparse_attention`; the unfused backend does
            not take varlen inputs).

    Returns ``out [total_q, H, D]`` (and ``lse``).
    """
    from .functional import block_sparse_attention

    where = "block_sparse_attention_varlen"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise bad_argument(where, name, "a 3-D tensor [total, heads, D]", describe(t))
    if backend not in ("auto", "fused", "reference"):
        raise bad_argument(where, "backend", "'auto', 'fused' or 'reference'", repr(backend))
    check_block(where, block)
    host_checks = not capturing(q.device)
    lens_q = _check_cu(
        where, "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, max_seqlen_q, host_checks
    )
    lens_k = _check_cu(
        where, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, max_seqlen_k, host_checks
    )
    n_seq = cu_seqlens_q.numel() - 1
    if cu_seqlens_k.numel() - 1 != n_seq:
        raise bad_argument(
            where,
            "cu_seqlens_k",
            f"{n_seq + 1} offsets, as cu_seqlens_q",
            describe(cu_seqlens_k),
        )
    len_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    if host_checks:  # the lengths were read above
        if any(a > b for a, b in zip(lens_q, lens_k)):
            raise bad_argument(
                where,
                "cu_seqlens_q",
                "sequences with no more queries than keys (queries are the last positions)",
                f"query lengths {lens_q[:8]} for key lengths {lens_k[:8]}",
            )
    held = None
    if isinstance(layout, SparsityConfig) and host_checks:  # the same batch as a recent call?
        key = (tuple(lens_q), tuple(lens_k), id(layout), block, str(q.device))
        held = _PACKINGS.pop(key, None)
        if held is not None and held[0]() is layout:
            _PACKINGS[key] = held  # the most recent last
        else:
            held = None
    if held is not None:
        packing = held[1]
    elif isinstance(layout, KVBlocks):
        lists = layout
        if lists.shape[0] != n_seq or lists.device != q.device:
            raise bad_argument(
                where,
                "layout",
                f"KVBlocks [{n_seq}, H_l, nb_k_max] (one set of lists per sequence) on {q.device}",
                f"KVBlocks of shape {tuple(lists.shape)} on {lists.device}",
            )
        if host_checks and not lists.trusted:
            _check_sequence_lists(where, lists, len_k, block)
    elif isinstance(layout, SparsityConfig) or callable(layout):
        lengths_k = lens_k if host_checks else len_k.tolist()
        lists = _sequence_lists(where, layout, lengths_k, block, q.device)
    else:
        raise bad_argument(
            where,
            "layout",
            "a SparsityConfig, a callable (seq_len, device) -> layout, or KVBlocks",
            describe(layout),
        )
    if held is None:
        packing = _packing(cu_seqlens_q, cu_seqlens_k, lists, block, q.shape[0], k.shape[0])
        if isinstance(layout, SparsityConfig) and host_checks:
            _PACKINGS[key] = (weakref.ref(layout), packing)
            while len(_PACKINGS) > _PACKINGS_KEPT:
                _PACKINGS.pop(next(iter(_PACKINGS)))
    plists, keep, q_pos, k_pos, q_at, k_at, P = packing
    pq, pk, pv = (
        gather_rows(t, at, pos, P, head_major=True)
        for t, at, pos in ((q, q_at, q_pos), (k, k_at, k_pos), (v, k_at, k_pos))
    )
    out = block_sparse_attention(
        pq,
        pk,
        pv,
        plists,
        block=block,
        scale=scale,
        causal=causal,
        key_padding_mask=keep,
        key_padding_mask_mode="mul",
        backend=backend,
        return_lse=return_lse,
    )
    if return_lse:
        out, lse = out
    out = gather_rows(out, q_pos, q_at, q.shape[0], head_major=False)
    if return_lse:
        return out, lse[0, :, q_pos.long()].transpose(0, 1)
    return out


def _packing(cu_q, cu_k, lists: KVBlocks, block: int, total_q: int, total_k: int):
    """Where the packed, block-aligned problem puts everything (see the module docstring):
    block lists ``[1, H_l, P // block]`` (private: the attention functions neither copy
    them nor rebuild their index while they live), the key padding mask ``[1, P]`` (True at
    real keys), each query's and key's packed position (int32 ``[total_q]``,
    ``[total_k]``), the query and key at each packed position (int32 ``[P]``, ``-1`` at
    none), and ``P``, a bound known from the shapes: ``(ceil(total_k / block) + n_seq) *
    block``."""
    dev = cu_q.device
    n_seq = cu_q.numel() - 1
    len_q = (cu_q[1:] - cu_q[:-1]).long()
    len_k = (cu_k[1:] - cu_k[:-1]).long()
    nb = -(-len_k // block)
    first = torch.cumsum(nb, 0) - nb  # each sequence's first packed block
    n_blocks = -(-total_k // block) + n_seq
    P = n_blocks * block

    def owner(cu, n):  # the sequence of each of n packed tokens
        return torch.searchsorted(cu[1:].long(), torch.arange(n, device=dev), right=True)

    sq, sk = owner(cu_q, total_q), owner(cu_k, total_k)
    k_pos = first[sk] * block + torch.arange(total_k, device=dev) - cu_k[:-1].long()[sk]
    q_pos = (
        first[sq] * block
        + (len_k - len_q)[sq]
        + torch.arange(total_q, device=dev)
        - cu_q[:-1].long()[sq]
    )
    keep = torch.zeros(1, P, dtype=torch.bool, device=dev)
    keep[0, k_pos] = True

    def at(pos, n):  # the token at each packed position
        found = torch.full((P,), -1, dtype=torch.int32, device=dev)
        return found.index_put_((pos,), torch.arange(n, dtype=torch.int32, device=dev))

    # each packed block's sequence and block within it; blocks past the last sequence
    # (the bound's spare) belong to none and attend nothing
    starts = first
    blk = torch.arange(n_blocks, device=dev)
    seq = torch.searchsorted(starts, blk, right=True) - 1
    local = blk - starts[seq]
    inside = local < nb[seq]
    _, Hl, rows = lists.shape
    if rows == 0 or lists.indices.shape[-1] == 0:  # no key blocks anywhere: nothing attends
        num = torch.zeros(Hl, n_blocks, dtype=torch.int32, device=dev)
        idx = torch.zeros(Hl, n_blocks, 1, dtype=torch.long, device=dev)
    else:
        row = torch.clamp(local, max=rows - 1)
        num = lists.num_blocks[seq, :, row].transpose(0, 1)  # [H_l, n_blocks]
        idx = lists.indices[seq, :, row].transpose(0, 1).long() + first[seq][None, :, None]
    # only blocks that hold a query of their sequence attend (chunked prefill: the
    # earlier blocks hold keys only)
    q_lo = (first + (len_k - len_q) // block)[seq]
    num = torch.where(inside & (blk >= q_lo), num, 0)
    plists = private_lists(
        KVBlocks(
            num[None].to(torch.int32).contiguous(),
            idx[None].to(torch.int32).contiguous(),
            lists.trusted,
        )
    )
    q_at, k_at = at(q_pos, total_q), at(k_pos, total_k)
    return plists, keep, q_pos.to(torch.int32), k_pos.to(torch.int32), q_at, k_at, P


# the packing of the most recent batches by their offsets and config (a model's layers
# attend the same batch one after another); each holds its lists' compiled index too
_PACKINGS: dict[tuple, tuple] = {}
_PACKINGS_KEPT = 4


def forget_packings() -> None:
    """Drop the packings kept for recent batches (their memory; a benchmark of the first
    layer's cost)."""
    _PACKINGS.clear()
