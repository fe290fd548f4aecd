"""Fused block-sparse flash attention, backward. Deterministic, no atomics:

* ``delta = rowsum(dO * O)`` per query;
* dK/dV: one program per (key tile, batch x head) walks the tile's query tiles (the
  index's column lists), recomputing the probabilities from the forward's row statistics;
* dQ: one program per (query tile, batch x head) walks the tile's key tiles (row lists);
  it also writes the score gradient when ``rpe`` or an additive mask needs a gradient.

Tiles are read as in the forward (pointers, or tensor descriptors when ``DESC``). On
Hopper GPUs, the layouts :func:`sm90_backward_plan` accepts take the Gluon kernels of
:mod:`.sm90_bwd` instead (after the same ``delta``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..index import get_density, get_index
from ..kv_blocks import KVBlocks
from ._common import (
    LOG2E,
    _dot,
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
    sum_parts,
    unit_last_stride,
    upcast_dots,
)
from .configs import PROGRAM_GROUP, Tiles, backward_tiles, launch_configs

_KEY = [
    "HEAD_DIM",
    "BLOCK_M",
    "BLOCK_N",
    "SUB",
    "CAUSAL",
    "HAS_RPE",
    "HAS_KPM",
    "HAS_AM",
    "ALLOW_DESC",
    "GRID_CLASS",
]
_PRUNE = {"early_config_prune": prune_descriptors}


@triton.jit
def _bsa_bwd_delta_kernel(
    O,  # O, DO: (pointer, stride_b, stride_h, stride_row)
    DO,
    DLSE,  # the log-sum-exp's gradient [B, H, L_q], when HAS_DLSE
    DELTA,
    H,
    Lq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """``delta = rowsum(dO * O) - dlse`` in fp32, ``[B, H, L_q]``: a score's gradient is
    ``p * (dp - delta)``, and the log-sum-exp adds ``dlse * p`` to it."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    om = _matrix(O, b, h, Lq, HEAD_DIM, BLOCK_M, BLOCK_D, False)
    dom = _matrix(DO, b, h, Lq, HEAD_DIM, BLOCK_M, BLOCK_D, False)
    o = _load_rows(om, pid_m * BLOCK_M, m_ok, O[3], HEAD_DIM, BLOCK_M, BLOCK_D, False)
    do = _load_rows(dom, pid_m * BLOCK_M, m_ok, DO[3], HEAD_DIM, BLOCK_M, BLOCK_D, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh * Lq + offs_m, mask=m_ok, other=0.0)
    tl.store(DELTA + pid_bh * Lq + offs_m, delta, mask=m_ok)


@triton.jit
def _row_statistics(LSE, LOG2L, rows, ok, NATURAL: tl.constexpr):
    """What :func:`_probabilities` needs of each query row, from the forward's statistics:
    base 2, the log-sum-exp; natural units, the row maximum and log2 of the row sum. Rows
    with nothing to attend get ``+inf`` as maximum (their probabilities are 0, not NaN)."""
    m = tl.load(LSE + rows, mask=ok, other=0.0)
    if NATURAL:
        log2_l = tl.load(LOG2L + rows, mask=ok, other=0.0)
        empty_row = m == float("-inf")
        return tl.where(empty_row, float("inf"), m), tl.where(empty_row, 0.0, log2_l)
    else:
        return tl.where(m == float("-inf"), float("inf"), m * LOG2E), tl.zeros_like(m)


@triton.jit
def _probabilities(s, m, log2_l, NATURAL: tl.constexpr):
    """``exp(score - lse)`` from :func:`_row_statistics`."""
    if NATURAL:
        return tl.math.exp2((s - m[:, None]) * LOG2E - log2_l[:, None])
    else:
        return tl.math.exp2(s - m[:, None])


@triton.jit
def _score_gradient(p, dp, delta, guard):
    """``p * (dp - delta)``; on tiles where keys may be hidden (``guard``), exactly 0 where
    ``p`` is 0, so that a NaN ``dp`` from a hidden key's value does not reach the row."""
    ds = p * (dp - delta[:, None])
    if guard:
        ds = tl.where(p == 0.0, 0.0, ds)
    return ds


@triton.autotune(configs=launch_configs("bwd"), key=_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["GRID_CLASS"])
def _bsa_bwd_dkdv_kernel(
    Q,  # Q, K, V, DO, DK, DV: (pointer, stride_b, stride_h, stride_row), see _matrix
    K,
    V,
    DO,
    DK,  # per query head: [B, H, L_k, D]
    DV,
    LSE,  # the forward's row statistics
    LOG2L,
    DELTA,
    COLS,  # the index's column lists: (ptr, idx, bits, partial)
    WORK,  # the programs' items: (items, order), see index.Work
    PARTS,  # where parts of cut columns write dK, dV: [slots, BLOCK_N, BLOCK_D] each
    PARTS_V,
    RPE,  # masks: (pointer, strides), see mask_args
    KPM,
    AM,
    B,
    H,
    Lq,
    Lk,
    col_tiles,
    heads_per_layout_head,
    kv_group,  # query heads per kv head (grouped-query attention)
    qk_scale,
    scale,
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
    GROUP: tl.constexpr,
    ALLOW_DESC: tl.constexpr,
    DESC: tl.constexpr,
    GRID_CLASS,  # the launch's size class, for the autotuner's key only (_common.launch)
):
    col_ptr, col_idx, col_bits, col_partial = COLS
    col, pid_n, b, h, start, end, slot = _schedule(
        WORK, heads_per_layout_head, B, col_tiles, H, GROUP
    )
    hk = h // kv_group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nd_ok = (offs_n < Lk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    km = _matrix(K, b, hk, Lk, HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
    vm = _matrix(V, b, hk, Lk, HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
    qm = _matrix(Q, b, h, Lq, HEAD_DIM, BLOCK_M, BLOCK_D, DESC)
    dom = _matrix(DO, b, h, Lq, HEAD_DIM, BLOCK_M, BLOCK_D, DESC)
    # keys hidden from every query (padding): read as zeros (see _keys_seen)
    padded = _keys_seen(
        0, offs_n, b, Lk, Lk, 0, KPM, BLOCK_N, BLOCK_N, BLOCK_N, False, False, HAS_KPM, KPM_MUL
    )
    k = _load_rows(km, pid_n * BLOCK_N, padded, K[3], HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
    v = _load_rows(vm, pid_n * BLOCK_N, padded, V[3], HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
    row_base = (b * H + h) * Lq
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for t in range(start, end):
        i = tl.load(col_idx + t)
        bits = tl.load(col_bits + t)
        partial = tl.load(col_partial + t)
        offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q = _load_tile(qm, i * BLOCK_M, Lq, Q[3], HEAD_DIM, BLOCK_M, BLOCK_D, DESC, False)
        do = _load_tile(dom, i * BLOCK_M, Lq, DO[3], HEAD_DIM, BLOCK_M, BLOCK_D, DESC, False)
        m, log2_l = _row_statistics(LSE, LOG2L, row_base + offs_m, m_ok, NATURAL)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
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
        p = _probabilities(s, m, log2_l, NATURAL)
        dv = _dot(tl.trans(p.to(do.dtype)), do, INPUT_PRECISION, UPCAST, dv)
        dp = _dot(do, tl.trans(v), INPUT_PRECISION, UPCAST)
        ds = _score_gradient(p, dp, delta, partial != 0)
        dk = _dot(tl.trans(ds.to(q.dtype)), q, INPUT_PRECISION, UPCAST, dk)
    if slot < 0:
        _store_tile(DK, b, h, offs_n, offs_d, dk * scale, nd_ok)
        _store_tile(DV, b, h, offs_n, offs_d, dv, nd_ok)
    else:  # a part of a cut column: summed (and dK scaled) by sum_parts
        _store_part(PARTS, slot, dk, BLOCK_N, BLOCK_D)
        _store_part(PARTS_V, slot, dv, BLOCK_N, BLOCK_D)


@triton.autotune(configs=launch_configs("bwd"), key=_KEY + ["STORE_DS"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["GRID_CLASS"])
def _bsa_bwd_dq_kernel(
    Q,  # Q, K, V, DO, DQ: (pointer, stride_b, stride_h, stride_row), see _matrix
    K,
    V,
    DO,
    DQ,
    DS,  # the score gradient [B, H, L_q, L_k] float32, when STORE_DS
    LSE,  # the forward's row statistics
    LOG2L,
    DELTA,
    ROWS,  # the index's row lists: (ptr, idx, bits, partial)
    WORK,  # the programs' items: (items, order), see index.Work
    PARTS,  # where parts of cut rows write dQ: [slots, BLOCK_M, BLOCK_D]
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
    scale,
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
    STORE_DS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    NATURAL: tl.constexpr,
    GROUP: tl.constexpr,
    ALLOW_DESC: tl.constexpr,
    DESC: tl.constexpr,
    GRID_CLASS,  # the launch's size class, for the autotuner's key only (_common.launch)
):
    row_ptr, row_idx, row_bits, row_partial = ROWS
    row, pid_m, b, h, start, end, slot = _schedule(
        WORK, heads_per_layout_head, B, row_tiles, H, GROUP
    )
    hk = h // kv_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    qm = _matrix(Q, b, h, Lq, HEAD_DIM, BLOCK_M, BLOCK_D, DESC)
    dom = _matrix(DO, b, h, Lq, HEAD_DIM, BLOCK_M, BLOCK_D, DESC)
    km = _matrix(K, b, hk, Lk, HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
    vm = _matrix(V, b, hk, Lk, HEAD_DIM, BLOCK_N, BLOCK_D, DESC)
    q = _load_tile(qm, pid_m * BLOCK_M, Lq, Q[3], HEAD_DIM, BLOCK_M, BLOCK_D, DESC, False)
    do = _load_tile(dom, pid_m * BLOCK_M, Lq, DO[3], HEAD_DIM, BLOCK_M, BLOCK_D, DESC, False)
    row_base = (b * H + h) * Lq
    m, log2_l = _row_statistics(LSE, LOG2L, row_base + offs_m, m_ok, NATURAL)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for t in range(start, end):
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
        p = _probabilities(s, m, log2_l, NATURAL)
        dp = _dot(do, tl.trans(v), INPUT_PRECISION, UPCAST)
        ds = _score_gradient(p, dp, delta, partial != 0)
        if STORE_DS:
            ds_ptr = DS + (row_base + offs_m[:, None]) * Lk + offs_n[None, :]
            tl.store(ds_ptr, ds, mask=m_ok[:, None] & (offs_n < Lk)[None, :])
        dq = _dot(ds.to(k.dtype), k, INPUT_PRECISION, UPCAST, dq)
    if slot < 0:
        _store_tile(
            DQ, b, h, offs_m, offs_d, dq * scale, m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        )
    else:  # a part of a cut row: summed and scaled by sum_parts
        _store_part(PARTS, slot, dq, BLOCK_M, BLOCK_D)


def row_delta(out, grad_out, grad_lse=None):
    """``delta = rowsum(dO * O) - dlse`` in fp32, ``[B, H, L_q]``, by
    :func:`_bsa_bwd_delta_kernel` (``grad_lse``: the log-sum-exp's gradient, or none)."""
    B, H, Lq, D = out.shape
    delta = empty((B, H, Lq), torch.float32, out.device)
    _bsa_bwd_delta_kernel[(triton.cdiv(Lq, 64), B * H)](
        O=matrix_args(out),
        DO=matrix_args(grad_out),
        DLSE=delta if grad_lse is None else grad_lse.float().contiguous(),
        DELTA=delta,
        H=H,
        Lq=Lq,
        HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=64,
        HAS_DLSE=grad_lse is not None,
    )
    return delta


def sm90_backward_plan(q, k, v, grad_out, layout, *, block: int, causal: bool):
    """The index of 128x128 tiles the Hopper backward (:mod:`.sm90_bwd`) walks, or
    ``None`` where the Triton kernels run.

    The Hopper kernels run where they were measured faster (``benchmarks/NOTES.md``, v13):
    an sm90 GPU, fp16/bf16, head dim 128, a block-128 layout (``[H_l, nb, nb]`` shared by
    the batch, or block lists shared or per sample), equal query and key lengths that are
    multiples of 128, any grouping of K/V heads, contiguous inputs, no bias or mask (the
    caller checks those). Lists long enough to be cut into parts run a program a part,
    as in the Triton kernels (v17). ``BLOCKSPARSE_ATTN_SM90=0`` keeps the Triton kernels
    everywhere."""
    from . import availability

    if not (
        availability.sm90_domain(q, k, layout, block, availability.SM90_BACKWARD_HEAD_DIMS)
        and all(t.is_contiguous() for t in (q, k, v, grad_out))
        and descriptors_allowed(q, k, v, grad_out)
    ):
        return None
    L = q.shape[2]
    return get_index(
        layout, block, q_len=L, k_len=L, tile_m=128, tile_n=128, causal=causal, device=q.device
    )


def fused_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
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
    bias_grads: tuple[bool, bool, bool] = (False, False, False),
    grad_lse: torch.Tensor | None = None,
    tiles: tuple[Tiles, Tiles] | None = None,
    configs: tuple[dict, dict] | None = None,
    deterministic: bool = True,
):
    """Gradients of the fused forward, from its output and row statistics ``stats``.

    Returns ``(dq, dk, dv, drpe, dkpm, dam)``. ``bias_grads`` says which of ``rpe``, the key
    padding mask and the attention mask (both in 'add' mode) need a gradient: for those the
    dQ kernel also writes the score gradient ``[B, H, L_q, L_k]`` float32 (zero outside the
    layout; O(L^2) memory), summed to the bias's shape; the others come back ``None``.
    ``grad_lse`` (``[B, H, L_q]``): the gradient of the log-sum-exp as well as ``grad_out``'s
    (rows with nothing to attend take none).
    ``tiles`` (dK/dV, dQ) and ``configs`` (``num_warps``/``num_stages``/``DESC`` each)
    override the tuned choice. ``deterministic=False`` lets the Hopper backward add dQ
    from the dK/dV kernel by reductions (:func:`.sm90_bwd.sm90_dkdvdq`) unless
    ``torch.are_deterministic_algorithms_enabled()``; elsewhere it changes nothing."""
    q, k, v, out, grad_out = (unit_last_stride(t) for t in (q, k, v, out, grad_out))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    delta = row_delta(out, grad_out, grad_lse)
    stats = stats.contiguous()
    masked = rpe is not None or key_padding_mask is not None or attn_mask is not None
    hopper = None
    if not masked and tiles is None and configs is None:
        hopper = sm90_backward_plan(q, k, v, grad_out, layout, block=block, causal=causal)
    if hopper is not None:
        from .sm90_bwd import sm90_dkdv, sm90_dkdvdq, sm90_dq

        args = (q, k, v, grad_out, stats, delta, hopper, schedule_args(layout, hopper, B, H))
        if deterministic or torch.are_deterministic_algorithms_enabled():
            dk, dv = sm90_dkdv(*args, causal=causal, scale=scale)
            dq = sm90_dq(*args, causal=causal, scale=scale)
        else:
            dq, dk, dv = sm90_dkdvdq(*args, causal=causal, scale=scale)
        return dq, dk, dv, None, None, None
    kv_tiles, q_tiles = tiles or backward_tiles(
        D,
        block,
        get_density(layout, Lk // block),
        q.element_size(),
        isinstance(layout, KVBlocks),  # built each step: one index for every kernel
    )
    kv_index = get_index(
        layout,
        block,
        q_len=Lq,
        k_len=Lk,
        tile_m=kv_tiles.m,
        tile_n=kv_tiles.n,
        causal=causal,
        device=q.device,
    )
    q_index = get_index(
        layout,
        block,
        q_len=Lq,
        k_len=Lk,
        tile_m=q_tiles.m,
        tile_n=q_tiles.n,
        causal=causal,
        device=q.device,
    )
    H_kv = k.shape[1]
    kv_group = H // H_kv
    dq = empty((B, H, Lq, D), q.dtype, q.device)
    # grouped-query attention: the kernel writes each query head's share, summed below
    dk = empty((B, H, Lk, D), k.dtype if kv_group == 1 else torch.float32, k.device)
    dv = empty((B, H, Lk, D), v.dtype if kv_group == 1 else torch.float32, v.device)
    store_ds = any(bias_grads)
    ds = torch.zeros((B, H, Lq, Lk), dtype=torch.float32, device=q.device) if store_ds else q
    masks = mask_args(
        rpe, key_padding_mask, attn_mask, key_padding_mask_mode, attn_mask_mode, B, H, Lq, Lk, q
    )
    natural = natural_units(masks)
    common = dict(
        Q=matrix_args(q),
        K=matrix_args(k),
        V=matrix_args(v),
        DO=matrix_args(grad_out),
        LSE=stats[0] if natural else stats,
        LOG2L=stats[1] if natural else stats,
        DELTA=delta,
        H=H,
        Lq=Lq,
        Lk=Lk,
        kv_group=kv_group,
        qk_scale=scale if natural else scale * LOG2E.value,
        scale=scale,
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        CAUSAL=causal,
        GROUP=PROGRAM_GROUP,
        INPUT_PRECISION=input_precision(q.dtype),
        UPCAST=upcast_dots(q.dtype),
        NATURAL=natural,
        ALLOW_DESC=descriptors_allowed(q, k, v, grad_out),
        **masks,
    )
    kv_config, q_config = configs or (None, None)
    idx = kv_index
    sched = schedule_args(layout, idx, B, H)
    rep = programs_per_list(sched)
    parts_k, parts_v = (part_slots(idx.cols, sched, kv_tiles.n, BLOCK_D, delta) for _ in range(2))
    launch(
        _bsa_bwd_dkdv_kernel,
        (idx.cols.items.shape[0] * rep,),
        dict(
            common,
            DK=matrix_args(dk),
            DV=matrix_args(dv),
            COLS=(idx.col_ptr, idx.col_idx, idx.col_bits, idx.col_partial),
            WORK=(idx.cols.items, idx.cols.order),
            PARTS=parts_k,
            PARTS_V=parts_v,
            col_tiles=idx.col_tiles,
            **sched,
            BLOCK_M=kv_tiles.m,
            BLOCK_N=kv_tiles.n,
            SUB=idx.sub,
            HAS_SUB=idx.split_tiles,
        ),
        kv_config,
    )
    sum_parts(parts_k, dk, idx.cols, sched, H, Lk, kv_tiles.n, scale)
    sum_parts(parts_v, dv, idx.cols, sched, H, Lk, kv_tiles.n, 1.0)
    idx = q_index
    sched = schedule_args(layout, idx, B, H)
    rep = programs_per_list(sched)
    parts_q = part_slots(idx.rows, sched, q_tiles.m, BLOCK_D, delta)
    launch(
        _bsa_bwd_dq_kernel,
        (idx.rows.items.shape[0] * rep,),
        dict(
            common,
            DQ=matrix_args(dq),
            DS=ds,
            ROWS=(idx.row_ptr, idx.row_idx, idx.row_bits, idx.row_partial),
            WORK=(idx.rows.items, idx.rows.order),
            PARTS=parts_q,
            row_tiles=idx.row_tiles,
            **sched,
            BLOCK_M=q_tiles.m,
            BLOCK_N=q_tiles.n,
            SUB=idx.sub,
            HAS_SUB=idx.split_tiles,
            STORE_DS=store_ds,
        ),
        q_config,
    )
    sum_parts(parts_q, dq, idx.rows, sched, H, Lq, q_tiles.m, scale)
    if kv_group > 1:
        dk = dk.view(B, H_kv, kv_group, Lk, D).sum(2).to(k.dtype)
        dv = dv.view(B, H_kv, kv_group, Lk, D).sum(2).to(v.dtype)
    rpe_grad, kpm_grad, am_grad = bias_grads
    drpe = ds.sum_to_size(rpe.shape).to(rpe.dtype) if rpe_grad else None
    dkpm = ds.sum((1, 2)).to(key_padding_mask.dtype) if kpm_grad else None
    dam = ds.sum((0, 1)).to(attn_mask.dtype) if am_grad else None
    return dq, dk, dv, drpe, dkpm, dam
