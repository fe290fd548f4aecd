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

These two use no atomics: the result does not depend on the order programs run in. The
backward that is not deterministic (``deterministic=False``) is one kernel, dK/dV/dQ: the
dK/dV program's steps also compute ``dQ = dS K`` and add it into an fp32 buffer by a TMA
bulk reduction, five matrix products a step where the two kernels take seven (measured in
``benchmarks/NOTES.md``, v16). Where these kernels run and where the Triton backward does
is decided by :func:`~blocksparse_attn.kernels.fused_bwd.sm90_backward_plan`. This module
imports Gluon: load it only where that plan says it runs.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import subprocess
import tempfile

import torch
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._common import empty

KEYS = 128  # key tile per dK/dV program, query tile per dQ program: the layout block
QUERIES = 64  # query tile per dK/dV step
WARPS = 8  # two warpgroups


@builtin
def tma_add(tensor_desc, coord, src, _semantic=None):
    """``global[box at coord] += src``, a shared-memory tile, by one TMA bulk reduction
    (``cp.reduce.async.bulk.tensor``); it reads ``src`` asynchronously, like a TMA store
    (``tma.store_wait`` waits for that)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(
        ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle
    )


@gluon.jit
def load_pair(a_desc, b_desc, a_smem, b_smem, bar, stage, row):
    """Rows ``row`` of two tensors (Q and dO, or K and V) through TMA into ``stage`` of
    their shared-memory rings, both counted on that stage's barrier."""
    mbarrier.expect(bar.index(stage), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [row, 0], bar.index(stage), a_smem.index(stage))
    tma.async_copy_global_to_shared(b_desc, [row, 0], bar.index(stage), b_smem.index(stage))


@gluon.jit
def key_tile(col_ptr, H, L, col_tiles, layout_heads, sample_heads, kv_group, BLOCK_N: gl.constexpr):
    """A dK/dV program's key tile: ``(its index, batch * H + query head, its column list's
    start and end, its first row of K and V)``."""
    pid_n = gl.program_id(0)
    bh = gl.program_id(1)
    h = bh % H
    col = ((bh // H) * sample_heads + h // (H // layout_heads)) * col_tiles + pid_n
    start = gl.load(col_ptr + col)
    end = gl.load(col_ptr + col + 1)
    k_row = ((bh // H) * (H // kv_group) + h // kv_group) * L + pid_n * BLOCK_N
    return pid_n, bh, start, end, k_row


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
def finish_column(dk, dv, descs, smems, out32, kv_bar, bar, k_row, row, GROUPED: gl.constexpr):
    """Write a key tile's ``dk`` (scaled) and ``dv``: with grouped K/V heads this query
    head's share in fp32 at rows ``row`` (int64) of ``out32`` (DK32, DV32; summed over
    the group after), else through the K and V buffers (``smems``, read by now) by TMA at
    ``k_row``."""
    mbarrier.invalidate(kv_bar)
    for st in gl.static_range(2):
        mbarrier.invalidate(bar.index(st))
    if GROUPED:
        layout: gl.constexpr = dk.type.layout
        rows = gl.arange(0, dk.shape[0], layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, dk.shape[1], layout=gl.SliceLayout(0, layout))
        at = (row + rows)[:, None] * dk.shape[1] + cols[None, :]
        gl.store(out32[0] + at, dk)
        gl.store(out32[1] + at, dv)
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
    LSE,  # [B, H, L] fp32, natural log
    DELTA,  # [B, H, L] fp32, rowsum(dO * O)
    col_ptr,
    col_idx,
    H,
    L,
    col_tiles,
    layout_heads,  # per sample
    sample_heads,  # layout heads of the samples before (lists per sample), else 0
    kv_group,  # query heads per kv head
    qk_scale,  # scale * log2(e)
    scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    GROUPED: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_n, bh, start, end, k_row = key_tile(
        col_ptr, H, L, col_tiles, layout_heads, sample_heads, kv_group, BLOCK_N
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
        lse2 = gl.load(LSE + bh * L + offs_m) * 1.4426950408889634
        lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows that see no key
        delta = gl.load(DELTA + bh * L + offs_m)
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
    LSE,  # [B, H, L] fp32, natural log
    DELTA,  # [B, H, L] fp32, rowsum(dO * O)
    col_ptr,
    col_idx,
    H,
    L,
    col_tiles,
    layout_heads,  # per sample
    sample_heads,  # layout heads of the samples before (lists per sample), else 0
    kv_group,  # query heads per kv head
    qk_scale,  # scale * log2(e)
    scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    GROUPED: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_n, bh, start, end, k_row = key_tile(
        col_ptr, H, L, col_tiles, layout_heads, sample_heads, kv_group, BLOCK_N
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
        lse2 = gl.load(LSE + bh * L + offs_m) * 1.4426950408889634
        lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows that see no key
        delta = gl.load(DELTA + bh * L + offs_m)
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
    LSE,
    DELTA,
    row_ptr,
    row_idx,
    H,
    L,
    row_tiles,
    layout_heads,
    sample_heads,
    kv_group,
    qk_scale,
    scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    h = bh % H
    row = ((bh // H) * sample_heads + h // (H // layout_heads)) * row_tiles + pid_m
    start = gl.load(row_ptr + row)
    end = gl.load(row_ptr + row + 1)
    q_row = bh * L + pid_m * BLOCK_M
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
    kv_base = ((bh // H) * (H // kv_group) + h // kv_group) * L
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
    lse2 = gl.load(LSE + bh * L + offs_m) * 1.4426950408889634
    lse2 = gl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows that see no key
    delta = gl.load(DELTA + bh * L + offs_m)
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
    q_smem.store((dq * scale).to(dtype))  # Q is read: its buffer takes dQ
    fence_async_shared()
    tma.async_copy_shared_to_global(dq_desc, [q_row, 0], q_smem)
    tma.store_wait(pendings=0)


@functools.cache
def _shared_layout(rows: int, D: int, dtype: torch.dtype):
    """The shared-memory layout of a ``[rows, D]`` tile (made once: making it costs more
    host time than the rest of a descriptor)."""
    dt = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([rows, D], dt)


def _desc(t, rows):
    """A TMA descriptor of contiguous ``t`` seen as ``[numel / D, D]`` in ``[rows, D]``
    tiles."""
    D = t.shape[-1]
    n = t.numel() // D
    lay = _shared_layout(rows, D, t.dtype)
    return TensorDescriptor(t, [n, D], [D, 1], [rows, D], lay)


def _heads(index, samples: int) -> tuple[int, int]:
    """The kernels' ``layout_heads`` (per sample) and ``sample_heads`` for an index of
    ``samples`` list samples (1: shared by the batch; ``B``: block lists per sample)."""
    per = index.heads // samples
    return per, per if samples > 1 else 0


def sm90_dkdv(q, k, v, grad_out, lse, delta, index, *, causal, scale, samples=1):
    """dK and dV of contiguous inputs ``q [B, H, L, D]``, ``k, v [B, H_kv, L, D]`` (L a
    multiple of 128) over a compiled index of 128x128 tiles, each query tile of a column
    list walked in two 64-row steps; ``samples`` as in :func:`_heads`. With grouped K/V
    heads each query head's share is written in fp32 and summed over its group."""
    B, H, L, D = q.shape
    kv_group = H // k.shape[1]
    if kv_group == 1:
        dk, dv = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
        dk32 = dv32 = lse  # not written
    else:
        dk = dv = k  # not written
        dk32, dv32 = (empty((B, H, L, D), torch.float32, q.device) for _ in range(2))
    _sm90_dkdv_kernel[(L // KEYS, B * H)](
        _desc(q, QUERIES),
        _desc(k, KEYS),
        _desc(v, KEYS),
        _desc(grad_out, QUERIES),
        _desc(dk, KEYS),
        _desc(dv, KEYS),
        dk32,
        dv32,
        lse,
        delta,
        index.col_ptr,
        index.col_idx,
        H,
        L,
        index.col_tiles,
        *_heads(index, samples),
        kv_group,
        scale * math.log2(math.e),
        scale,
        HEAD_DIM=D,
        BLOCK_M=QUERIES,
        BLOCK_N=KEYS,
        CAUSAL=causal,
        GROUPED=kv_group > 1,
        num_warps=WARPS,
    )
    if kv_group > 1:
        H_kv = k.shape[1]
        dk = dk32.view(B, H_kv, kv_group, L, D).sum(2).to(k.dtype)
        dv = dv32.view(B, H_kv, kv_group, L, D).sum(2).to(v.dtype)
    return dk, dv


def sm90_dkdvdq(q, k, v, grad_out, lse, delta, index, *, causal, scale, samples=1):
    """dQ, dK and dV of the inputs of :func:`sm90_dkdv` in one kernel: five matrix
    products a step instead of the seven of :func:`sm90_dkdv` with :func:`sm90_dq`, each
    step's dQ added into an fp32 buffer by a TMA reduction. Several programs add into
    one query tile, in no fixed order: dQ's rounding varies from run to run (dK and dV
    do not)."""
    B, H, L, D = q.shape
    kv_group = H // k.shape[1]
    if kv_group == 1:
        dk, dv = empty(k.shape, k.dtype, k.device), empty(v.shape, v.dtype, v.device)
        dk32 = dv32 = lse  # not written
    else:
        dk = dv = k  # not written
        dk32, dv32 = (empty((B, H, L, D), torch.float32, q.device) for _ in range(2))
    dq32 = torch.zeros((B, H, L, D), dtype=torch.float32, device=q.device)
    _sm90_dkdvdq_kernel[(L // KEYS, B * H)](
        _desc(q, QUERIES),
        _desc(k, KEYS),
        _desc(v, KEYS),
        _desc(grad_out, QUERIES),
        _desc(dk, KEYS),
        _desc(dv, KEYS),
        _desc(dq32, QUERIES),
        dk32,
        dv32,
        lse,
        delta,
        index.col_ptr,
        index.col_idx,
        H,
        L,
        index.col_tiles,
        *_heads(index, samples),
        kv_group,
        scale * math.log2(math.e),
        scale,
        HEAD_DIM=D,
        BLOCK_M=QUERIES,
        BLOCK_N=KEYS,
        CAUSAL=causal,
        GROUPED=kv_group > 1,
        num_warps=WARPS,
    )
    if kv_group > 1:
        H_kv = k.shape[1]
        dk = dk32.view(B, H_kv, kv_group, L, D).sum(2).to(k.dtype)
        dv = dv32.view(B, H_kv, kv_group, L, D).sum(2).to(v.dtype)
    return (dq32 * scale).to(q.dtype), dk, dv


def sm90_dq(q, k, v, grad_out, lse, delta, index, *, causal, scale, samples=1):
    """dQ of the inputs of :func:`sm90_dkdv` over the same index."""
    B, H, L, D = q.shape
    dq = empty(q.shape, q.dtype, q.device)
    _sm90_dq_kernel[(L // KEYS, B * H)](
        _desc(q, KEYS),
        _desc(k, KEYS),
        _desc(v, KEYS),
        _desc(grad_out, KEYS),
        _desc(dq, KEYS),
        lse,
        delta,
        index.row_ptr,
        index.row_idx,
        H,
        L,
        index.row_tiles,
        *_heads(index, samples),
        H // k.shape[1],
        scale * math.log2(math.e),
        scale,
        HEAD_DIM=D,
        BLOCK_M=KEYS,
        BLOCK_N=KEYS,
        CAUSAL=causal,
        num_warps=WARPS,
    )
    return dq


def compile_sm90(fn, signature: dict, constexprs: dict) -> dict:
    """Compile the Gluon kernel ``fn`` for sm90 without a GPU (``signature``: argument
    types, ``constexprs``: their values, ``num_warps`` among them): its shared memory in
    bytes, and what ``ptxas -v`` reports of the machine code: registers a thread, the
    bytes it spills to local memory, and how often it warns that it serialized the
    ``wgmma`` pipeline (an accumulator read while its product may still run)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    src = GluonASTSource(fn, signature=signature, constexprs=constexprs)
    options = dict(num_warps=constexprs["num_warps"])
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run(
            [knobs.nvidia.ptxas.path, "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    serialized = report.count("wgmma.mma_async instructions are serialized")
    spills = re.findall(r"(\d+) bytes spill stores", report)
    registers = re.findall(r"Used (\d+) registers", report)
    if not (spills and registers):
        raise RuntimeError(f"ptxas -v printed no register or spill counts:\n{report}")
    return dict(
        shared=kernel.metadata.shared,
        spills=sum(map(int, spills)),
        registers=max(map(int, registers)),
        serialized=serialized,
    )


def compile_for_sm90(head_dims=(128,)) -> list[dict]:
    """Compile the three kernels for sm90 on any machine (no GPU needed), bf16, causal or
    not, the dK/dV kernels for one and for grouped K/V heads: one entry per variant with
    what :func:`compile_sm90` reports."""
    from triton.runtime.jit import mangle_type

    common = dict(
        DK32="*fp32",
        DV32="*fp32",
        LSE="*fp32",
        DELTA="*fp32",
        H="i32",
        L="i32",
        layout_heads="i32",
        sample_heads="i32",
        kv_group="i32",
        qk_scale="fp32",
        scale="fp32",
    )
    found = []
    for D in head_dims:

        def desc(rows, dtype=torch.bfloat16, D=D):
            return mangle_type(_desc(torch.zeros(4 * KEYS, D, dtype=dtype), rows))

        q64, t128, f64 = desc(QUERIES), desc(KEYS), desc(QUERIES, torch.float32)
        columns = dict(col_ptr="*i32", col_idx="*i32", col_tiles="i32")
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
                | dict(row_ptr="*i32", row_idx="*i32", row_tiles="i32"),
                KEYS,
            ),
        )
        for name, fn, types, block_m in kernels:
            types = dict(types, **common)
            grouping = "GROUPED" in fn.arg_names
            for causal, grouped in itertools.product((False, True), (False, True)[: 1 + grouping]):
                sig = {a: types.get(a, "constexpr") for a in fn.arg_names}
                consts = dict(
                    HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=KEYS, CAUSAL=causal, num_warps=WARPS
                )
                if grouping:
                    consts["GROUPED"] = grouped
                compiled = compile_sm90(fn, sig, consts)
                found.append(
                    dict(kernel=name, head_dim=D, causal=causal, grouped=grouped, **compiled)
                )
    return found
