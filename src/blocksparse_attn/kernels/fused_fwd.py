"""Fused block-sparse flash attention, forward: one program per (query tile, batch x head)
walks that tile's key tiles from the index with an online softmax (base 2, scale folded),
and writes the output and the log-sum-exp. Scores never reach memory.

On dense layouts (``LEAD``) each row list's leading full tiles (``row_lead`` of them) run a
lighter step when there is no rpe or mask: no element mask, no guard for rows that have seen
nothing. Short rows keep one loop: a second loop's pipeline fill costs them more than the
lighter step saves (benchmarks/NOTES.md, v4).

Tiles are read through pointers or, where ``ALLOW_DESC`` (a tuning key: Hopper or newer,
16-byte aligned strides), through tensor descriptors when the autotuner's ``DESC`` wins."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..index import get_density, get_index
from ._common import (
    LN2,
    LOG2E,
    _cut_list,
    _dot,
    _exp_diff,
    _keys_seen,
    _load_rows,
    _load_tile,
    _matrix,
    _schedule,
    _score_tile,
    _store_part,
    _store_tile,
    descriptors_allowed,
    empty,
    input_precision,
    launch,
    mask_args,
    matrix_args,
    natural_units,
    part_slots,
    programs_per_list,
    prune_descriptors,
    schedule_args,
    unit_last_stride,
    upcast_dots,
)
from .configs import DENSE_LAYOUT, PROGRAM_GROUP, Tiles, forward_tiles, launch_configs

_KEY = [
    "HEAD_DIM",
    "BLOCK_M",
    "BLOCK_N",
    "SUB",
    "CAUSAL",
    "HAS_RPE",
    "HAS_KPM",
    "HAS_AM",
    "LEAD",
    "ALLOW_DESC",
    "GRID_CLASS",
]


@triton.autotune(
    configs=launch_configs("fwd"),
    key=_KEY,
    prune_configs_by={"early_config_prune": prune_descriptors},
)
@triton.jit(do_not_specialize=["GRID_CLASS"])
def _bsa_fwd_kernel(
    Q,  # Q, K, V, O: (pointer, stride_b, stride_h, stride_row), see _matrix
    K,
    V,
    O,
    LSE,  # the row statistics (see fused_attention_forward)
    LOG2L,
    ROWS,  # the index's row lists: (ptr, idx, bits, partial, lead)
    WORK,  # the programs' items: (items, order), see index.Work
    PARTS,  # where parts of cut rows write: acc [slots, BLOCK_M, BLOCK_D]
    PART_STATS,  # and (m, l) [slots, 2, BLOCK_M]
    RPE,  # masks: (pointer, strides), see mask_args
    KPM,
    AM,
    B,
    H,
    Lq,
    Lk,
    row_tiles,
    heads_per_layout_head,
    kv_group,  # query heads per kv head (grouped-query attention)
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUB: tl.constexpr,
    HAS_SUB: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_RPE: tl.constexpr,
    HAS_KPM: tl.constexpr,
    KPM_MUL: tl.constexpr,
    HAS_AM: tl.constexpr,
    AM_MUL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    NATURAL: tl.constexpr,
    LEAD: tl.constexpr,
    GROUP: tl.constexpr,
    ALLOW_DESC: tl.constexpr,
    DESC: tl.constexpr,
    GRID_CLASS,  # the launch's size class, for the autotuner's key only (_common.launch)
):
    row_ptr, row_idx, row_bits, row_partial, row_lead = ROWS
    row, pid_m, b, h, start, end, slot = _schedule(
        WORK, heads_per_layout_head, B, row_tiles, H, GROUP
    )
    hk = h // kv_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qm = _matrix(Q, b, h, Lq, HEAD_DIM, BLOCK_M, BLOCK_D, DESC)
    km = _matrix(K, b, hk, Lk, HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
    vm = _matrix(V, b, hk, Lk, HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
    q = _load_tile(qm, pid_m * BLOCK_M, Lq, Q[3], HEAD_DIM, BLOCK_M, BLOCK_D, DESC, False)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    mid = start
    if LEAD and not (HAS_RPE or HAS_KPM or HAS_AM):
        # full tiles, no bias: every score is finite, the running maximum too after the
        # first tile; the scale rides on the exponent's fused multiply-add. The row's
        # leading full tiles, those of them in this item
        lead_end = tl.load(row_ptr + row) + tl.load(row_lead + row)
        mid = tl.minimum(end, tl.maximum(start, lead_end))
        for t in range(start, mid):
            j = tl.load(row_idx + t)
            k = _load_tile(km, j * BLOCK_N, Lk, K[3], HEAD_DIM, BLOCK_N, BLOCK_D, DESC, True)
            v = _load_tile(vm, j * BLOCK_N, Lk, V[3], HEAD_DIM, BLOCK_N, BLOCK_D, DESC, True)
            s = _dot(q, tl.trans(k), INPUT_PRECISION, UPCAST)
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST, acc * alpha[:, None])
            m_i = m_new
    for t in range(mid, end):
        j = tl.load(row_idx + t)
        bits = tl.load(row_bits + t)
        partial = tl.load(row_partial + t)
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        seen = _keys_seen(
            pid_m * BLOCK_M,
            offs_n,
            b,
            Lq,
            Lk,
            bits,
            KPM,
            BLOCK_M,
            BLOCK_N,
            SUB,
            HAS_SUB,
            CAUSAL,
            HAS_KPM,
            KPM_MUL,
        )
        k = _load_rows(km, j * BLOCK_N, seen, K[3], HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
        v = _load_rows(vm, j * BLOCK_N, seen, V[3], HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
        s = _score_tile(
            q,
            k,
            offs_m,
            offs_n,
            b,
            h,
            Lq,
            Lk,
            qk_scale,
            bits,
            partial,
            RPE,
            KPM,
            AM,
            BLOCK_M,
            BLOCK_N,
            SUB,
            HAS_SUB,
            CAUSAL,
            HAS_RPE,
            HAS_KPM,
            KPM_MUL,
            HAS_AM,
            AM_MUL,
            INPUT_PRECISION,
            UPCAST,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
        p = _exp_diff(s, m_use[:, None], NATURAL)
        alpha = _exp_diff(m_i, m_use, NATURAL)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, INPUT_PRECISION, UPCAST, acc * alpha[:, None])
        m_i = m_new

    if slot < 0:
        _finish_rows(O, LSE, LOG2L, acc, m_i, l_i, b, h, H, Lq, offs_m, HEAD_DIM, BLOCK_D, NATURAL)
    else:  # a part of a cut row: unnormalised, merged by _bsa_fwd_merge_kernel
        _store_part(PARTS, slot, acc, BLOCK_M, BLOCK_D)
        stats = PART_STATS + slot * (2 * BLOCK_M) + tl.arange(0, BLOCK_M)
        tl.store(stats, m_i)
        tl.store(stats + BLOCK_M, l_i)


@triton.jit
def _finish_rows(
    O,
    LSE,
    LOG2L,
    acc,
    m_i,
    l_i,
    b,
    h,
    H,
    Lq,
    offs_m,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NATURAL: tl.constexpr,
):
    """Write a query tile's output ``acc / l`` and its row statistics (see
    :func:`fused_attention_forward`) from the running maximum ``m_i`` and sum ``l_i``."""
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    log2_l = tl.math.log2(tl.where(has, l_i, 1.0))
    _store_tile(O, b, h, offs_m, offs_d, out, m_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    if NATURAL:  # the row maximum and log2 of the sum apart: m + ln(l) rounds to m when
        # the maximum is huge (a finfo.min mask), and the backward needs l exactly
        tl.store(LSE + (b * H + h) * Lq + offs_m, tl.where(has, m_i, float("-inf")), mask=m_ok)
        tl.store(LOG2L + (b * H + h) * Lq + offs_m, log2_l, mask=m_ok)
    else:
        lse = tl.where(has, (m_i + log2_l) * LN2, float("-inf"))
        tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _bsa_fwd_merge_kernel(
    O,
    LSE,
    LOG2L,
    PARTS,
    PART_STATS,
    SPLIT,  # the cut rows and where their parts start (index.Work)
    FIRST,
    B,
    H,
    Lq,
    row_tiles,
    heads_per_layout_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NATURAL: tl.constexpr,
):
    """The output and row statistics of each cut row from its parts' unnormalised outputs,
    maxima and sums (one program per cut row and batch-head, as in :func:`_schedule`)."""
    tile, b, h, first, end, rep, k = _cut_list(SPLIT, FIRST, B, heads_per_layout_head, row_tiles, H)
    offs_r = tl.arange(0, BLOCK_M)
    offs = offs_r[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for part in range(first, end):
        slot = (part * rep + k).to(tl.int64)
        m_i = tl.maximum(m_i, tl.load(PART_STATS + slot * (2 * BLOCK_M) + offs_r))
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for part in range(first, end):
        slot = (part * rep + k).to(tl.int64)
        stats = PART_STATS + slot * (2 * BLOCK_M) + offs_r
        w = _exp_diff(tl.load(stats), m_use, NATURAL)  # 0 for a part that saw nothing
        l_i += w * tl.load(stats + BLOCK_M)
        acc += w[:, None] * tl.load(PARTS + slot * (BLOCK_M * BLOCK_D) + offs)
    offs_m = tile * BLOCK_M + offs_r
    _finish_rows(O, LSE, LOG2L, acc, m_i, l_i, b, h, H, Lq, offs_m, HEAD_DIM, BLOCK_D, NATURAL)


def row_statistics_lse(stats: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp ``[B, H, L_q]`` from the forward's row statistics (see
    :func:`fused_attention_forward`)."""
    if stats.dim() == 3:
        return stats
    return stats[0] + stats[1] * LN2.value


def sm90_forward_plan(q, k, v, layout, block: int, masked: bool) -> bool:
    """Whether the Hopper forward (:mod:`.sm90_fwd`) runs these inputs: the Hopper
    kernels' domain (:func:`~.availability.sm90_domain`: an sm90 GPU, fp16/bf16, head dim
    64 or 128, block 128, equal lengths that are multiples of 128, a layout or block
    lists; block lists only at head dims the Hopper backward takes), contiguous aligned
    inputs, and no bias or mask. ``BLOCKSPARSE_ATTN_SM90=0`` keeps the Triton forward
    everywhere. Measured in ``benchmarks/NOTES.md`` (v15, v20)."""
    from ..kv_blocks import KVBlocks
    from . import availability

    # block lists are indexed each step: where the Triton backward follows (a head dim the
    # Hopper backward does not take), a forward on its tiles shares that step's index
    lists_alone = isinstance(layout, KVBlocks) and (
        q.shape[-1] not in availability.SM90_BACKWARD_HEAD_DIMS
    )
    return (
        not masked
        and not lists_alone
        and availability.sm90_domain(q, k, layout, block, availability.SM90_FORWARD_HEAD_DIMS)
        and all(t.is_contiguous() for t in (q, k, v))
        and descriptors_allowed(q, k, v)
    )


def step_forward_tiles(q, k, v, layout, block: int, density: float, masked: bool) -> Tiles:
    """The forward's tiles: :func:`~.configs.forward_tiles`, except where the Hopper
    forward runs (:func:`sm90_forward_plan`), which walks 128x128 tiles, the index the
    Hopper backward reads too (one index per step on block lists; ``benchmarks/NOTES.md``,
    dynamic step)."""
    if sm90_forward_plan(q, k, v, layout, block, masked):
        return Tiles(128, 128)
    return forward_tiles(q.shape[-1], block, density, q.element_size())


def fused_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    *,
    block: int,
    scale: float,
    causal: bool = False,
    rpe: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask_mode: str = "add",
    attn_mask_mode: str = "mul",
    tiles: Tiles | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on checked inputs (see ``block_sparse_attention``).
    ``tiles`` and ``config`` (``num_warps``/``num_stages``/``DESC``) override the tuned
    choice.

    Returns ``out [B, H, L_q, D]`` in the input dtype and the row statistics, float32:
    without bias or mask, ``lse [B, H, L_q]`` (natural log; ``-inf`` for queries with
    nothing to attend); with one, ``[2, B, H, L_q]``, the row maximum (natural units,
    ``-inf`` for empty rows) and log2 of the row sum, which the backward needs apart
    (:func:`row_statistics_lse` gives the log-sum-exp)."""
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    density = get_density(layout, Lk // block)
    masked = rpe is not None or key_padding_mask is not None or attn_mask is not None
    hopper = tiles is None and config is None and sm90_forward_plan(q, k, v, layout, block, masked)
    if hopper:
        tiles = Tiles(128, 128)
    tiles = tiles or forward_tiles(D, block, density, q.element_size())
    index = get_index(
        layout,
        block,
        q_len=Lq,
        k_len=Lk,
        tile_m=tiles.m,
        tile_n=tiles.n,
        causal=causal,
        device=q.device,
    )
    if hopper:
        return _sm90_forward(q, k, v, layout, index, causal=causal, scale=scale)
    out = empty((B, H, Lq, D), q.dtype, q.device)
    masks = mask_args(
        rpe, key_padding_mask, attn_mask, key_padding_mask_mode, attn_mask_mode, B, H, Lq, Lk, q
    )
    natural = natural_units(masks)
    stats = empty((2, B, H, Lq) if natural else (B, H, Lq), torch.float32, q.device)
    rows = (index.row_ptr, index.row_idx, index.row_bits, index.row_partial, index.row_lead)
    sched = schedule_args(layout, index, B, H)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    parts = part_slots(index.rows, sched, tiles.m, BLOCK_D, stats)
    part_stats = part_slots(index.rows, sched, 2, tiles.m, stats)
    kwargs = dict(
        Q=matrix_args(q),
        K=matrix_args(k),
        V=matrix_args(v),
        O=matrix_args(out),
        LSE=stats[0] if natural else stats,
        LOG2L=stats[1] if natural else stats,
        ROWS=rows,
        WORK=(index.rows.items, index.rows.order),
        PARTS=parts,
        PART_STATS=part_stats,
        H=H,
        Lq=Lq,
        Lk=Lk,
        row_tiles=index.row_tiles,
        **sched,
        kv_group=H // k.shape[1],
        qk_scale=scale if natural else scale * LOG2E.value,
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        BLOCK_M=tiles.m,
        BLOCK_N=tiles.n,
        SUB=index.sub,
        HAS_SUB=index.split_tiles,
        CAUSAL=causal,
        INPUT_PRECISION=input_precision(q.dtype),
        UPCAST=upcast_dots(q.dtype),
        NATURAL=natural,
        # the mask-free loop takes the row maximum before scaling: scale > 0
        LEAD=density >= DENSE_LAYOUT and scale > 0,
        GROUP=PROGRAM_GROUP,
        ALLOW_DESC=descriptors_allowed(q, k, v),
        **masks,
    )
    rep = programs_per_list(sched)
    launch(_bsa_fwd_kernel, (index.rows.items.shape[0] * rep,), kwargs, config)
    if index.rows.parts:
        merge = (kwargs["LSE"], kwargs["LOG2L"], parts, part_stats)
        _merge_cut_rows(out, merge, index, sched, H, BLOCK_D, tiles.m, natural)
    return out, stats


def _merge_cut_rows(out, merge, index, sched, H, BLOCK_D, tile_m, natural) -> None:
    """The output and row statistics of every cut row from its parts
    (:func:`_bsa_fwd_merge_kernel`); ``merge``: ``(LSE, LOG2L, parts, part_stats)``."""
    lse, log2l, parts, part_stats = merge
    _bsa_fwd_merge_kernel[(index.rows.split.numel() * programs_per_list(sched),)](
        O=matrix_args(out),
        LSE=lse,
        LOG2L=log2l,
        PARTS=parts,
        PART_STATS=part_stats,
        SPLIT=index.rows.split,
        FIRST=index.rows.first,
        H=H,
        Lq=out.shape[2],
        row_tiles=index.row_tiles,
        **sched,
        HEAD_DIM=out.shape[-1],
        BLOCK_D=BLOCK_D,
        BLOCK_M=tile_m,
        NATURAL=natural,
    )


def _sm90_forward(q, k, v, layout, index, *, causal: bool, scale: float):
    """The Hopper forward (:mod:`.sm90_fwd`) over ``index`` (128x128 tiles), the cut lists'
    parts merged by :func:`_bsa_fwd_merge_kernel`; ``(out, lse)``."""
    from .sm90_fwd import TILE, sm90_forward

    B, H, L, D = q.shape
    sched = schedule_args(layout, index, B, H)
    out, lse, parts, part_stats = sm90_forward(q, k, v, index, sched, causal=causal, scale=scale)
    if parts is not None:
        _merge_cut_rows(out, (lse, lse, parts, part_stats), index, sched, H, D, TILE, False)
    return out, lse
