"""Backward kernels for Hopper (sm90) in Gluon (``triton.experimental.gluon``): the
gradients of the fused attention on block-128 layouts, with TMA loads into shared-memory
rings and asynchronous ``warpgroup_mma``.

dK/dV: one program holds a 128-key tile (K and V read once through TMA, dK and dV
accumulated in registers by two warpgroups) and walks its column list of the compiled index
(128x128 tiles, the one index both kernels read) in 64-query steps, two per listed tile:
Q and dO arrive through TMA into a two-stage ring, one step ahead; ``S^T = K Q^T`` and
``dP^T = V dO^T`` are issued together, then ``dV += P^T dO`` and ``dK += dS^T Q`` with
``P^T`` and ``dS^T`` kept in registers.

dQ: one program holds a 128-query tile and walks its row list of 128-key tiles: K and V
through TMA into a two-stage ring; ``S = Q K^T`` and ``dP = dO V^T`` together, then
``dQ += dS K``.

Programs follow the index's work items as the forward's do (longest first, in groups that
share their batch-head's tensors in L2; :func:`~.sm90_common.work_item`). A list cut into
parts (a global row or column) runs as one program a part, each writing its share in fp32
to a slot that the Triton kernel :func:`~._common.sum_parts` adds up after, in a fixed
order.

These two use no atomics: the result does not depend on the order programs run in. The
backward that is not deterministic (``deterministic=False``) is one kernel, dK/dV/dQ: the
dK/dV program's steps also compute ``dQ = dS K`` and add it into an fp32 buffer by a TMA
bulk reduction, five matrix products a step where the two kernels take seven (measured in
``benchmarks/NOTES.md``, v16). Where these kernels run and where the Triton backward does
is decided by :func:`~blocksparse_attn.kernels.fused_bwd.sm90_backward_plan`. This module
imports Gluon: load it only where that plan says it runs.
"""

from __future__ import annotations

import itertools
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from ._common import empty, part_slots, programs_per_list, sum_parts
from .configs import PROGRAM_GROUP
from .sm90_common import compile_sm90, descriptor, load_pair, tma_add, work_item

KEYS = 128  # key tile per dK/dV program, query tile per dQ program: the layout block
QUERIES = 64  # query tile per dK/dV step
WARPS = 8  # two warpgroups


@gluon.jit
def key_tile(
    items,
    order,
    heads_per_layout_head,
    batch,
    H,
    L,
    col_tiles,
    kv_group,
    BLOCK_N: gl.constexpr,
    GROUP: gl.constexpr,
):
    """A dK/dV program's work (:func:`~.sm90_common.work_item` over the column lists):
    ``(its key tile, batch * H + query head, its entries' start and end, the slot of a
    part of a cut list or -1, its first row of K and V)``."""
    tile, b, h, start, end, slot = work_item(
        items, order, heads_per_layout_head, batch, col_tiles, H, GROUP
    )
    k_row = ((b * (H // kv_group) + h // kv_group) * L + tile * BLOCK_N).to(gl.int32)
    return tile, b * H + h, start, end, slot, k_row


@gluon.jit
def start_column(descs, smems, kv_bar, bar, k_row, entries, n, q_base, BLOCK_M: gl.constexpr):
    """K and V (``descs``/``smems``: K, V, Q, dO) through TMA on ``kv_bar``, and the first
    two of the ``n`` 64-query steps (``entries``: the column list, two steps an entry) into
    the two stages of the Q/dO ring; returns once K and V have arrived."""
    k_desc, v_desc, q_desc, do_desc = descs
    k_smem, v_smem, q_smem, do_smem = smems
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [k_row, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [k_row, 0], kv_bar, v_smem)
    if n > 0:
        r0 = gl.load(entries) * 2
        load_pair(q_desc, do_desc, q_smem, do_smem, bar, 0, q_base + r0 * BLOCK_M)
        load_pair(q_desc, do_desc, q_smem, do_smem, bar, 1, q_base + (r0 + 1) * BLOCK_M)
    mbarrier.wait(kv_bar, 0)


@gluon.jit
def row_stats(lse_row, delta_row, offs_m):
    """The log-sum-exp in base 2 and ``delta = rowsum(dO * O)`` of query rows ``offs_m``
    of one batch-head (``lse_row``, ``delta_row``: its first rows); a row that sees no key
    (log-sum-exp -inf) gets +inf, so its probabilities are 0."""
    lse2 = gl.load(lse_row + offs_m) * 1.4426950408889634
    lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)
    return lse2, gl.load(delta_row + offs_m)


@gluon.jit
def store_rows(ptrs, row, tiles):
    """Store the fp32 ``tiles`` (of one layout) at rows ``row`` (int64) onward of the
    ``[rows, D]`` tensors ``ptrs``."""
    layout: gl.constexpr = tiles[0].type.layout
    rows = gl.arange(0, tiles[0].shape[0], layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, tiles[0].shape[1], layout=gl.SliceLayout(0, layout))
    at = (row + rows)[:, None] * tiles[0].shape[1] + cols[None, :]
    for i in gl.static_range(len(ptrs)):
        gl.store(ptrs[i] + at, tiles[i])


@gluon.jit
def finish_column(
    dk, dv, descs, smems, out32, parts, slot, kv_bar, bar, k_row, row, GROUPED: gl.constexpr
):
    """Write a key tile's ``dk`` (scaled) and ``dv``: a part of a cut column list (``slot``
    >= 0) in fp32 into that slot of ``parts`` (summed after); with grouped K/V heads this
    query head's share in fp32 at rows ``row`` (int64) of ``out32`` (DK32, DV32; summed over
    the group after); else through the K and V buffers (``smems``, read by now) by TMA at
    ``k_row``."""
    mbarrier.invalidate(kv_bar)
    for st in gl.static_range(2):
        mbarrier.invalidate(bar.index(st))
    if slot >= 0:
        store_rows(parts, slot * dk.shape[0], (dk, dv))
    elif GROUPED:
        store_rows(out32, row, (dk, dv))
    else:
        dk_desc, dv_desc = descs
        k_smem, v_smem = smems
        k_smem.store(dk.to(dk_desc.dtype))
        v_smem.store(dv.to(dv_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(dk_desc, [k_row, 0], k_smem)
        tma.async_copy_shared_to_global(dv_desc, [k_row, 0], v_smem)
        tma.store_wait(pendings=0)


@gluon.jit
def _sm90_dkdv_kernel(
    q_desc,  # [B * H * L, D], block [QUERIES, D]
    k_desc,  # [B * H_kv * L, D], block [KEYS, D]
    v_desc,
    do_desc,  # like q_desc
    dk_desc,  # like k_desc (one kv head per query head)
    dv_desc,
    DK32,  # [B, H, L, D] fp32: each query head's share (grouped K/V heads), summed after
    DV32,
    PARTS,  # [slots, BLOCK_N, D] fp32: dK of the parts of cut column lists, summed after
    PARTS_V,  # the same for dV
    LSE,  # [B, H, L] fp32, natural log
    DELTA,  # [B, H, L] fp32, rowsum(dO * O)
    col_idx,
    items,  # the index's column work (index.Work): items and their order
    order,
    B,  # the schedule's batch and heads per layout head (_common.schedule_args)
    heads_per_layout_head,
    H,
    L,
    col_tiles,
    kv_group,  # query heads per kv head
    qk_scale,  # scale * log2(e)
    scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    GROUPED: gl.constexpr,
    GROUP: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_n, bh, start, end, slot, k_row = key_tile(
        items, order, heads_per_layout_head, B, H, L, col_tiles, kv_group, BLOCK_N, GROUP
    )
    dtype: gl.constexpr = q_desc.dtype

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16]
    )
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    col_vec: gl.constexpr = gl.SliceLayout(0, s_layout)

    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2] + do_desc.block_type.shape, do_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for st in gl.static_range(2):
        mbarrier.init(bar.index(st), count=1)

    # each entry of the column list is a query tile of 2 * BLOCK_M rows: two steps
    n = 2 * (end - start)
    start_column(
        (k_desc, v_desc, q_desc, do_desc),
        (k_smem, v_smem, q_smem, do_smem),
        kv_bar,
        bar,
        k_row,
        col_idx + start,
        n,
        bh * L,
        BLOCK_M,
    )

    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
    for i in range(0, n):
        stage = i % 2
        r = gl.load(col_idx + start + i // 2) * 2 + stage
        offs_m = r * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_vec)
        lse2, delta = row_stats(LSE + bh * L, DELTA + bh * L, offs_m)
        mbarrier.wait(bar.index(stage), (i // 2) & 1)
        q_t = q_smem.index(stage)
        do_t = do_smem.index(stage)
        s_t = warpgroup_mma(k_smem, q_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp_t = warpgroup_mma(v_smem, do_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t,))
        p_t = gl.exp2(s_t * qk_scale - lse2[None, :])
        if CAUSAL:
            p_t = gl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        p16 = gl.convert_layout(p_t.to(dtype), a_layout)
        dv = warpgroup_mma(p16, do_t, dv, is_async=True)
        dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t,))
        ds_t = p_t * (dp_t - delta[None, :])
        ds16 = gl.convert_layout(ds_t.to(dtype), a_layout)
        dk = warpgroup_mma(ds16, q_t, dk, is_async=True)
        dv, dk, p16, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, p16, ds16))
        # this stage's Q and dO are read: the tile after next goes there
        if i + 2 < n:
            r2 = gl.load(col_idx + start + i // 2 + 1) * 2 + stage
            load_pair(q_desc, do_desc, q_smem, do_smem, bar, stage, bh * L + r2 * BLOCK_M)

    finish_column(
        dk * scale,
        dv,
        (dk_desc, dv_desc),
        (k_smem, v_smem),
        (DK32, DV32),
        (PARTS, PARTS_V),
        slot,
        kv_bar,
        bar,
        k_row,
        bh.to(gl.int64) * L + pid_n * BLOCK_N,
        GROUPED,
    )


@gluon.jit
def _sm90_dkdvdq_kernel(
    q_desc,  # [B * H * L, D], block [QUERIES, D]
    k_desc,  # [B * H_kv * L, D], block [KEYS, D]
    v_desc,
    do_desc,  # like q_desc
    dk_desc,  # like k_desc (one kv head per query head)
    dv_desc,
    dq_desc,  # [B * H * L, D] fp32, zeroed, block [QUERIES, D]: dQ / scale added here
    DK32,  # [B, H, L, D] fp32: each query head's share (grouped K/V heads), summed after
    DV32,
    PARTS,  # [slots, BLOCK_N, D] fp32: dK of the parts of cut column lists, summed after
    PARTS_V,  # the same for dV
    LSE,  # [B, H, L] fp32, natural log
    DELTA,  # [B, H, L] fp32, rowsum(dO * O)
    col_idx,
    items,  # the index's column work (index.Work): items and their order
    order,
    B,  # the schedule's batch and heads per layout head (_common.schedule_args)
    heads_per_layout_head,
    H,
    L,
    col_tiles,
    kv_group,  # query heads per kv head
    qk_scale,  # scale * log2(e)
    scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    GROUPED: gl.constexpr,
    GROUP: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_n, bh, start, end, slot, k_row = key_tile(
        items, order, heads_per_layout_head, B, H, L, col_tiles, kv_group, BLOCK_N, GROUP
    )
    dtype: gl.constexpr = q_desc.dtype

    # S = Q K^T and dP = dO V^T as [queries, keys], the two warpgroups splitting the keys
    # (a query's log-sum-exp and delta then take two registers a thread); dQ as [queries,
    # D], the warpgroups splitting D; dK and dV as [keys, D], splitting the keys
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, BLOCK_N // 2, 16]
    )
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, HEAD_DIM // 2, 16]
    )
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    row_vec: gl.constexpr = gl.SliceLayout(1, s_layout)
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)

    # K, V, P and dS sit at fixed places, read in every step through views indexed by a
    # zero the compiler cannot see (``pin``): their wgmma descriptors are then made in the
    # loop, where hoisted out of it they would hold about 80 registers all along
    k_all = gl.allocate_shared_memory(dtype, [1] + k_desc.block_type.shape, k_desc.layout)
    v_all = gl.allocate_shared_memory(dtype, [1] + v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2] + do_desc.block_type.shape, do_desc.layout)
    # P and dS of a step: the A of dV = P^T dO, dK = dS^T Q (transposed) and dQ = dS K
    p_all = gl.allocate_shared_memory(dtype, [1, BLOCK_M, BLOCK_N], p_layout)
    ds_all = gl.allocate_shared_memory(dtype, [1, BLOCK_M, BLOCK_N], p_layout)
    # two dQ buffers: a step's reduction has the next step's time to read its buffer
    dq_smem = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape, dq_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for st in gl.static_range(2):
        mbarrier.init(bar.index(st), count=1)

    # each entry of the column list is a query tile of 2 * BLOCK_M rows: two steps
    n = 2 * (end - start)
    start_column(
        (k_desc, v_desc, q_desc, do_desc),
        (k_all.index(0), v_all.index(0), q_smem, do_smem),
        kv_bar,
        bar,
        k_row,
        col_idx + start,
        n,
        bh * L,
        BLOCK_M,
    )

    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout)
    for i in range(0, n):
        stage = i % 2
        r = gl.load(col_idx + start + i // 2) * 2 + stage
        pin = r >> 31  # 0: a query tile's index is not negative
        k_smem = k_all.index(pin)
        v_smem = v_all.index(pin)
        p_smem = p_all.index(pin)
        ds_smem = ds_all.index(pin)
        offs_m = r * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_vec)
        lse2, delta = row_stats(LSE + bh * L, DELTA + bh * L, offs_m)
        mbarrier.wait(bar.index(stage), (i // 2) & 1)
        q_t = q_smem.index(stage)
        do_t = do_smem.index(stage)
        s = warpgroup_mma(q_t, k_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_t, v_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        p = gl.exp2(s * qk_scale - lse2[:, None])
        if CAUSAL:
            p = gl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
        p_smem.store(p.to(dtype))
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
        ds_smem.store((p * (dp - delta[:, None])).to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        # dQ first and alone: its share goes out before dV and dK are issued (issuing all
        # three and writing dQ under dV and dK measured slower)
        dq = warpgroup_mma(ds_smem, k_smem, dq_zero, use_acc=False, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
        tma.store_wait(pendings=1)  # the reduction before last has read this buffer
        gl.thread_barrier()
        dq_smem.index(stage).store(dq)
        fence_async_shared()
        tma_add(dq_desc, [bh * L + r * BLOCK_M, 0], dq_smem.index(stage))
        dv = warpgroup_mma(p_smem.permute((1, 0)), do_t, dv, is_async=True)
        dk = warpgroup_mma(ds_smem.permute((1, 0)), q_t, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
        # this stage's Q and dO are read: the tile after next goes there
        if i + 2 < n:
            r2 = gl.load(col_idx + start + i // 2 + 1) * 2 + stage
            load_pair(q_desc, do_desc, q_smem, do_smem, bar, stage, bh * L + r2 * BLOCK_M)

    tma.store_wait(pendings=0)
    finish_column(
        dk * scale,
        dv,
        (dk_desc, dv_desc),
        (k_all.index(0), v_all.index(0)),
        (DK32, DV32),
        (PARTS, PARTS_V),
        slot,
        kv_bar,
        bar,
        k_row,
        bh.to(gl.int64) * L + pid_n * BLOCK_N,
        GROUPED,
    )


@gluon.jit
def _sm90_dq_kernel(
    q_desc,  # [B * H * L, D], block [BLOCK_M, D]
    k_desc,  # [B * H_kv * L, D], block [BLOCK_N, D]
    v_desc,
    do_desc,  # like q_desc
    dq_desc,  # like q_desc
    PARTS,  # [slots, BLOCK_M, D] fp32: dQ of the parts of cut row lists, summed after
    LSE,
    DELTA,
    row_idx,
    items,  # the index's row work (index.Work): items and their order
    order,
    B,
    heads_per_layout_head,
    H,
    L,
    row_tiles,
    kv_group,
    qk_scale,
    scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    GROUP: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_m, b, h, start, end, slot = work_item(
        items, order, heads_per_layout_head, B, row_tiles, H, GROUP
    )
    bh = b * H + h
    q_row = (bh * L + pid_m * BLOCK_M).to(gl.int32)
    dtype: gl.constexpr = q_desc.dtype

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    q_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=q_layout, k_width=2)
    row_vec: gl.constexpr = gl.SliceLayout(1, s_layout)

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(2):
        mbarrier.init(bar.index(st), count=1)

    n = end - start
    kv_base = ((b * (H // kv_group) + h // kv_group) * L).to(gl.int32)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [q_row, 0], q_bar, do_smem)
    if n > 0:
        j0 = gl.load(row_idx + start)
        load_pair(k_desc, v_desc, k_smem, v_smem, bar, 0, kv_base + j0 * BLOCK_N)
    if n > 1:
        j1 = gl.load(row_idx + start + 1)
        load_pair(k_desc, v_desc, k_smem, v_smem, bar, 1, kv_base + j1 * BLOCK_N)

    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_vec)
    lse2, delta = row_stats(LSE + bh * L, DELTA + bh * L, offs_m)
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=q_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)
    for i in range(0, n):
        stage = i % 2
        j = gl.load(row_idx + start + i)
        mbarrier.wait(bar.index(stage), (i // 2) & 1)
        k_t = k_smem.index(stage)
        s = warpgroup_mma(q_smem, k_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp = warpgroup_mma(
            do_smem, v_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        p = gl.exp2(s * qk_scale - lse2[:, None])
        if CAUSAL:
            offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            p = gl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp,))
        ds16 = gl.convert_layout((p * (dp - delta[:, None])).to(dtype), a_layout)
        dq = warpgroup_mma(ds16, k_t, dq, is_async=True)
        dq, ds16 = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ds16))
        # this stage's K and V are read: the tile after next goes there
        if i + 2 < n:
            j2 = gl.load(row_idx + start + i + 2)
            load_pair(k_desc, v_desc, k_smem, v_smem, bar, stage, kv_base + j2 * BLOCK_N)

    mbarrier.invalidate(q_bar)
    for st in gl.static_range(2):
        mbarrier.invalidate(bar.index(st))
    if slot >= 0:  # a part of a cut row list
        store_rows((PARTS,), slot * BLOCK_M, (dq * scale,))
    else:
        q_smem.store((dq * scale).to(dtype))  # Q is read: its buffer takes dQ
        fence_async_shared()
        tma.async_copy_shared_to_global(dq_desc, [q_row, 0], q_smem)
        tma.store_wait(pendings=0)


def _kv_grads(q, k, spare):
    """Where the dK/dV kernels write: ``(dk, dv, dk32, dv32)``, the outputs themselves
    with one kv head per query head, else each query head's fp32 share (summed over its
    group by :func:`_sum_columns`); stand-ins (``k``, the fp32 ``spare``) for the
    tensors not written."""
    B, H, L, D = q.shape
    if H == k.shape[1]:
        return empty(k.shape, k.dtype, k.device), empty(k.shape, k.dtype, k.device), spare, spare
    dk32, dv32 = (empty((B, H, L, D), torch.float32, q.device) for _ in range(2))
    return k, k, dk32, dv32


def _sum_columns(parts, kv32, k, index, sched, *, grouped: bool):
    """dK and dV from the dK/dV kernel's outputs: the cut column lists' parts summed into
    their rows (``parts``: the two part buffers), the query heads' fp32 shares summed over
    each kv head's group."""
    kv = kv32[2:] if grouped else kv32[:2]
    B, H, L, _ = kv[0].shape
    for part, out in zip(parts, kv):
        sum_parts(part, out, index.cols, sched, H, L, KEYS, 1.0)
    if not grouped:
        return kv
    H_kv = k.shape[1]
    return tuple(t.view(B, H_kv, H // H_kv, L, -1).sum(2).to(k.dtype) for t in kv)


def _launch_columns(kernel, q, k, v, grad_out, lse, delta, index, sched, causal, scale, *dq):
    """Launch a dK/dV kernel (``kernel``: :func:`_sm90_dkdv_kernel`, or
    :func:`_sm90_dkdvdq_kernel` with ``dq``, its fp32 buffer) over the column work of
    ``index``; returns dK and dV, the parts of cut lists summed and grouped heads' shares
    summed over their group."""
    B, H, L, D = q.shape
    kv_group = H // k.shape[1]
    out = _kv_grads(q, k, lse)
    parts = tuple(part_slots(index.cols, sched, KEYS, D, lse) for _ in range(2))
    kernel[(index.cols.items.shape[0] * programs_per_list(sched),)](
        descriptor(q, QUERIES),
        descriptor(k, KEYS),
        descriptor(v, KEYS),
        descriptor(grad_out, QUERIES),
        descriptor(out[0], KEYS),
        descriptor(out[1], KEYS),
        *(descriptor(t, QUERIES) for t in dq),
        *out[2:],
        *parts,
        lse,
        delta,
        index.col_idx,
        index.cols.items,
        index.cols.order,
        sched["B"],
        sched["heads_per_layout_head"],
        H,
        L,
        index.col_tiles,
        kv_group,
        scale * math.log2(math.e),
        scale,
        HEAD_DIM=D,
        BLOCK_M=QUERIES,
        BLOCK_N=KEYS,
        CAUSAL=causal,
        GROUPED=kv_group > 1,
        GROUP=PROGRAM_GROUP,
        num_warps=WARPS,
    )
    return _sum_columns(parts, out, k, index, sched, grouped=kv_group > 1)


def sm90_dkdv(q, k, v, grad_out, lse, delta, index, sched, *, causal, scale):
    """dK and dV of contiguous inputs ``q [B, H, L, D]``, ``k, v [B, H_kv, L, D]`` (L a
    multiple of 128) over a compiled index of 128x128 tiles, each query tile of a column
    list walked in two 64-row steps; ``sched``: :func:`~._common.schedule_args`. A column
    list cut into parts runs as one program a part, each writing its share in fp32,
    summed after; with grouped K/V heads each query head's share is written in fp32 and
    summed over its group."""
    args = (q, k, v, grad_out, lse, delta, index, sched, causal, scale)
    return _launch_columns(_sm90_dkdv_kernel, *args)


def sm90_dkdvdq(q, k, v, grad_out, lse, delta, index, sched, *, causal, scale):
    """dQ, dK and dV of the inputs of :func:`sm90_dkdv` in one kernel: five matrix
    products a step instead of the seven of :func:`sm90_dkdv` with :func:`sm90_dq`, each
    step's dQ added into an fp32 buffer by a TMA reduction. Several programs add into
    one query tile, in no fixed order: dQ's rounding varies from run to run (dK and dV
    do not)."""
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    args = (q, k, v, grad_out, lse, delta, index, sched, causal, scale, dq32)
    dk, dv = _launch_columns(_sm90_dkdvdq_kernel, *args)
    return (dq32 * scale).to(q.dtype), dk, dv


def sm90_dq(q, k, v, grad_out, lse, delta, index, sched, *, causal, scale):
    """dQ of the inputs of :func:`sm90_dkdv` over the same index; a row list cut into
    parts runs as one program a part, each writing its share in fp32, summed after."""
    B, H, L, D = q.shape
    dq = empty(q.shape, q.dtype, q.device)
    parts = part_slots(index.rows, sched, KEYS, D, lse)
    _sm90_dq_kernel[(index.rows.items.shape[0] * programs_per_list(sched),)](
        descriptor(q, KEYS),
        descriptor(k, KEYS),
        descriptor(v, KEYS),
        descriptor(grad_out, KEYS),
        descriptor(dq, KEYS),
        parts,
        lse,
        delta,
        index.row_idx,
        index.rows.items,
        index.rows.order,
        sched["B"],
        sched["heads_per_layout_head"],
        H,
        L,
        index.row_tiles,
        H // k.shape[1],
        scale * math.log2(math.e),
        scale,
        HEAD_DIM=D,
        BLOCK_M=KEYS,
        BLOCK_N=KEYS,
        CAUSAL=causal,
        GROUP=PROGRAM_GROUP,
        num_warps=WARPS,
    )
    sum_parts(parts, dq, index.rows, sched, H, L, KEYS, 1.0)
    return dq


def compile_for_sm90(head_dims=(128,)) -> list[dict]:
    """Compile the three kernels for sm90 on any machine (no GPU needed), bf16, causal or
    not, the dK/dV kernels for one and for grouped K/V heads: one entry per variant with
    what :func:`compile_sm90` reports."""
    from triton.runtime.jit import mangle_type

    common = dict(
        DK32="*fp32",
        DV32="*fp32",
        PARTS="*fp32",
        PARTS_V="*fp32",
        LSE="*fp32",
        DELTA="*fp32",
        items="*i32",
        order="*i32",
        B="i32",
        heads_per_layout_head="i32",
        H="i32",
        L="i32",
        kv_group="i32",
        qk_scale="fp32",
        scale="fp32",
    )
    found = []
    for D in head_dims:

        def desc(rows, dtype=torch.bfloat16, D=D):
            return mangle_type(descriptor(torch.zeros(4 * KEYS, D, dtype=dtype), rows))

        q64, t128, f64 = desc(QUERIES), desc(KEYS), desc(QUERIES, torch.float32)
        columns = dict(col_idx="*i32", col_tiles="i32")
        kv = dict(k_desc=t128, v_desc=t128, do_desc=q64, dk_desc=t128, dv_desc=t128)
        kernels = (
            ("dK/dV", _sm90_dkdv_kernel, dict(q_desc=q64, **kv, **columns), QUERIES),
            (
                "dK/dV/dQ",
                _sm90_dkdvdq_kernel,
                dict(q_desc=q64, dq_desc=f64, **kv, **columns),
                QUERIES,
            ),
            (
                "dQ",
                _sm90_dq_kernel,
                dict(q_desc=t128, k_desc=t128, v_desc=t128, do_desc=t128, dq_desc=t128)
                | dict(row_idx="*i32", row_tiles="i32"),
                KEYS,
            ),
        )
        for name, fn, types, block_m in kernels:
            types = dict(types, **common)
            grouping = "GROUPED" in fn.arg_names
            for causal, grouped in itertools.product((False, True), (False, True)[: 1 + grouping]):
                sig = {a: types.get(a, "constexpr") for a in fn.arg_names}
                consts = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=KEYS, CAUSAL=causal)
                consts.update(GROUP=PROGRAM_GROUP, num_warps=WARPS)
                if grouping:
                    consts["GROUPED"] = grouped
                compiled = compile_sm90(fn, sig, consts)
                found.append(
                    dict(kernel=name, head_dim=D, causal=causal, grouped=grouped, **compiled)
                )
    return found
