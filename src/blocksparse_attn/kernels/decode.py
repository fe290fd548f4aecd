"""Decoding kernels: one new query per sequence against a KV cache, reading the query's
block list directly (no compiled index).

The row of sequence ``b`` is the list of key blocks its newest token attends: the kernel
picks it from the pattern's lists by the token's block, ``(n_b - 1) // block``, or is given
it already picked. The keys at or past the sequence length ``n_b`` are hidden (the cache
holds whatever was there before).
A program takes one sequence and one kv head and packs the query heads that share the kv
head and the list (a grouped-query group, when the layout has 1 or ``H_kv`` heads) into the
rows of its tiles, so each K/V block is read once per group. The list of a row is split
across ``splits`` programs, each keeping its own running maximum, sum and output; a second
kernel merges them by log-sum-exp. So one long row keeps the GPU busy and a batch of short
rows needs no index. Caches are contiguous ``[B, L_max, H_kv, D]`` or paged
``[pages, page_size, H_kv, D]`` read through a block table (pages of whole blocks).

Scores are kept in base 2 (see ``_common``): ``qk_scale = scale * log2(e)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LN2, LOG2E, _dot, empty, input_precision, interpreting, upcast_dots


@triton.jit
def _bsa_decode_split_kernel(
    Q,  # (pointer, stride_b, stride_h): [B, H, D]
    K,  # (pointer, stride_b or stride_page, stride_row, stride_h): the cache
    V,
    TABLE,  # (pointer, stride_b): the block table (paged caches)
    N,  # [B] int32: keys in each sequence before ``added`` more
    FIRST,  # [B] int32: each sequence's first visible key (with HAS_FIRST; left padding)
    NUM,  # (pointer, stride_b, stride_h, stride_row): [B|1, H_l, R] entries used per row
    IDX,  # (pointer, stride_b, stride_h, stride_row): [B|1, H_l, R, W] key blocks
    ACC,  # [B, H, S, D] float32 partial outputs (unnormalised)
    STATS,  # [2, B, H, S] float32: running maximum (base 2) and sum
    added,  # keys appended after N (the sequence has N + added)
    n_keys,  # the cache's capacity per sequence: lengths past it are read as it
    last_row,  # R - 1: the last list row (rows past it are read as it)
    H,
    S,
    stats_size,  # B * H * S
    group,  # query heads per kv head
    pack,  # query heads per program (group, or 1 when each has its own list)
    heads_per_layout_head,
    page_size,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK: tl.constexpr,  # the layout block
    BLOCK_N: tl.constexpr,  # keys per tile: a power of two, 16 to 128
    CHUNKS: tl.constexpr,  # tiles per block
    PAGED: tl.constexpr,
    HAS_FIRST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    programs_per_batch = H // pack
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // programs_per_batch).to(tl.int64)
    h0 = (pid % programs_per_batch) * pack  # first query head of this program
    hk = h0 // group
    lh = h0 // heads_per_layout_head
    # lengths are checked on the host, except during CUDA-graph capture: clamped here, so a
    # wrong one never reads past the cache or the lists
    n = tl.minimum(tl.load(N + b) + added, n_keys)
    row = tl.minimum(tl.maximum(n - 1, 0) // BLOCK, last_row)  # the newest token's block
    lo = 0
    if HAS_FIRST:  # keys before it are hidden
        lo = tl.load(FIRST + b)

    num_ptr, num_sb, num_sh, num_sr = NUM
    idx_ptr, idx_sb, idx_sh, idx_sr = IDX
    count = tl.load(num_ptr + b * num_sb + lh * num_sh + row * num_sr)
    idx_row = idx_ptr + b * idx_sb + lh * idx_sh + row.to(tl.int64) * idx_sr
    share = tl.cdiv(count, S)
    start = split * share
    end = tl.minimum(start + share, count)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < pack
    d_ok = offs_d < HEAD_DIM
    q_ptr, q_sb, q_sh = Q
    q = tl.load(
        q_ptr + b * q_sb + (h0 + offs_g)[:, None] * q_sh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_ptr, k_s0, k_row, k_sh = K
    v_ptr, v_s0, v_row, v_sh = V
    t_ptr, t_sb = TABLE

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for t in range(start, end):
        j = tl.load(idx_row + t).to(tl.int64)
        first = j * BLOCK
        if (first < n) & (first + BLOCK > lo):  # blocks with a key to attend
            if PAGED:  # a block lies inside one page
                page = tl.load(t_ptr + b * t_sb + first // page_size).to(tl.int64)
                k_base = k_ptr + page * k_s0 + (first % page_size) * k_row + hk * k_sh
                v_base = v_ptr + page * v_s0 + (first % page_size) * v_row + hk * v_sh
            else:
                k_base = k_ptr + b * k_s0 + first * k_row + hk * k_sh
                v_base = v_ptr + b * v_s0 + first * v_row + hk * v_sh
            for c in tl.static_range(CHUNKS):  # the block in tiles of BLOCK_N keys
                within = c * BLOCK_N + offs_n
                key = first + within
                seen = (within < BLOCK) & (key < n) & (key >= lo)
                ok = seen[:, None] & d_ok[None, :]
                k = tl.load(k_base + within[:, None] * k_row + offs_d[None, :], mask=ok, other=0.0)
                v = tl.load(v_base + within[:, None] * v_row + offs_d[None, :], mask=ok, other=0.0)
                s = _dot(q, tl.trans(k), INPUT_PRECISION, UPCAST) * qk_scale
                s = tl.where(seen[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(s - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = _dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST, acc * alpha[:, None])
                m_i = m_new

    heads = h0 + offs_g
    part = (b * H + heads) * S + split  # [B, H, S] position of each row's partial
    tl.store(
        ACC + part[:, None] * HEAD_DIM + offs_d[None, :],
        acc,
        mask=g_ok[:, None] & d_ok[None, :],
    )
    tl.store(STATS + part, m_i, mask=g_ok)
    tl.store(STATS + stats_size + part, l_i, mask=g_ok)


@triton.jit
def _bsa_decode_merge_kernel(
    ACC,
    STATS,
    O,  # (pointer, stride_b, stride_h): [B, H, D]
    LSE,  # [B, H] float32 (natural log; -inf for a query with nothing to attend)
    H,
    S,
    stats_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S
    part = bh * S + offs_s
    m = tl.load(STATS + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(STATS + stats_size + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_safe)  # 0 for empty splits
    total = tl.sum(w * l_s, 0)
    acc = tl.load(
        ACC + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_ptr, o_sb, o_sh = O
    b = bh // H
    h = bh % H
    tl.store(
        o_ptr + b * o_sb + h * o_sh + offs_d,
        out.to(o_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )
    lse = tl.where(total > 0, (m_safe + tl.math.log2(total)) * LN2, float("-inf"))
    tl.store(LSE + bh, lse)


def _batch_stride(t: torch.Tensor) -> int:
    """Lists shared by the batch (leading dim 1) are read at batch stride 0."""
    return t.stride(0) if t.shape[0] > 1 else 0


def _row_stride(t: torch.Tensor) -> int:
    """A row given (one row, ``R = 1``) is read whatever the token's block: stride 0."""
    return t.stride(2) if t.shape[2] > 1 else 0


def _splits(rows: int, width: int, device: torch.device) -> int:
    """Programs per row: enough for about two waves of the GPU's multiprocessors, at most
    one per list entry, a power of two up to 16 (2 under the interpreter, which has no
    multiprocessors to fill but must exercise the merge)."""
    if interpreting() or device.type != "cuda":
        return max(1, min(2, width))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.next_power_of_2(max(1, -(-2 * sms // max(rows, 1))))
    return max(1, min(want, 16, triton.next_power_of_2(max(width, 1))))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    num: torch.Tensor,
    idx: torch.Tensor,
    *,
    block: int,
    scale: float,
    added: int = 0,
    block_table: torch.Tensor | None = None,
    first_key: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, D], lse [B, H])`` of one query per sequence.

    Args:
        q: ``[B, H, D]`` (unit last stride).
        k_cache, v_cache: ``[B, L_max, H_kv, D]``, or ``[pages, page_size, H_kv, D]`` with
            ``block_table``; unit last stride.
        lengths: int32 ``[B]``; sequence ``b`` has ``lengths[b] + added`` keys, the query
            being the last of them.
        num: int32 ``[B|1, H_l, R]``, entries used in each list: ``R`` = the pattern's
            block rows (the kernel takes row ``(n_b - 1) // block``) or 1 (the row given).
        idx: int32 ``[B|1, H_l, R, W]``, the key blocks of each list, each at most once
            among the used entries (blocks at or past a sequence's length are skipped).
        block: layout block size (any; read in tiles of up to 128 keys).
        scale: score scale.
        added: keys appended after ``lengths`` (0, or the new token's 1).
        first_key: int32 ``[B]``, each sequence's first visible key (keys before it, a
            left-padded batch's padding, are hidden).
        block_table: int32 ``[B, max_pages]`` (paged caches; page size a multiple of
            ``block``).
    """
    B, H, D = q.shape
    H_kv = k_cache.shape[2]
    group = H // H_kv
    H_l = num.shape[1]
    per_layout_head = H // H_l
    pack = group if per_layout_head >= group else 1  # the group shares its list
    rows = B * (H // pack)
    S = _splits(rows, idx.shape[-1], q.device)
    acc = empty((B, H, S, D), torch.float32, q.device)
    stats = empty((2, B, H, S), torch.float32, q.device)
    paged = block_table is not None
    table = block_table if paged else lengths
    precision = input_precision(q.dtype)
    upcast = upcast_dots(q.dtype)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    block_n = min(128, max(16, triton.next_power_of_2(block)))
    _bsa_decode_split_kernel[(rows, S)](
        Q=(q, q.stride(0), q.stride(1)),
        K=(k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)),
        V=(v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)),
        TABLE=(table, table.stride(0) if paged else 0),
        N=lengths,
        FIRST=first_key if first_key is not None else lengths,
        NUM=(num, _batch_stride(num), num.stride(1), _row_stride(num)),
        IDX=(idx, _batch_stride(idx), idx.stride(1), _row_stride(idx)),
        added=added,
        n_keys=k_cache.shape[1] * (block_table.shape[1] if paged else 1),
        last_row=num.shape[2] - 1,
        ACC=acc,
        STATS=stats,
        H=H,
        S=S,
        stats_size=B * H * S,
        group=group,
        pack=pack,
        heads_per_layout_head=per_layout_head,
        page_size=k_cache.shape[1] if paged else 1,
        qk_scale=scale * LOG2E.value,
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        BLOCK_G=max(16, triton.next_power_of_2(pack)),
        BLOCK=block,
        BLOCK_N=block_n,
        CHUNKS=-(-block // block_n),
        PAGED=paged,
        HAS_FIRST=first_key is not None,
        INPUT_PRECISION=precision,
        UPCAST=upcast,
    )
    out = empty((B, H, D), q.dtype, q.device)
    lse = empty((B, H), torch.float32, q.device)
    _bsa_decode_merge_kernel[(B * H,)](
        ACC=acc,
        STATS=stats,
        O=(out, out.stride(0), out.stride(1)),
        LSE=lse,
        H=H,
        S=S,
        stats_size=B * H * S,
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        BLOCK_S=triton.next_power_of_2(S),
    )
    return out, lse
