"""Experiment (Hopper, sm90): is a Gluon forward with TMA loads and asynchronous warpgroup
matrix products faster than the Triton forward on block-128 layouts? A first step toward
Hopper-native kernels.

Three variants walk a query tile's row list of the compiled index (128x128 tiles, the
layout block 128, so no sub-block masks):

* ``pipelined``: two warpgroups share the 128 query rows. Q once through TMA; K and V
  through TMA into a two-stage ring, one tile ahead; the scores of tile ``i + 1`` (an
  asynchronous ``warpgroup_mma``) run while tile ``i``'s softmax is computed, and
  ``P V`` of tile ``i`` after it.
* ``specialised``: the same consumer, its K and V loads moved to a producer warp
  (``warp_specialize``) that runs up to 2 (head dim 128) or 3 (head dim 64) tiles ahead
  through ready/empty barriers.
* ``pingpong`` (the FlashAttention-3 schedule): two consumer warpgroups in partitions of
  their own, 64 query rows each, and a producer warp. A warpgroup issues tile ``i``'s
  scores and tile ``i - 1``'s ``P V`` together, hands the turn to the other warpgroup
  (an mbarrier each), and computes tile ``i``'s softmax while its ``P V`` runs; so one
  warpgroup's softmax overlaps the other's matrix products. It is now the library's Hopper
  forward (``kernels/sm90_fwd.py``, 3 K/V stages at head dim 128, 4 at 64), run here on
  the index with every list whole; the first measurement (v15) also ran it with 2 and 3
  stages at head dim 128 (``pingpong`` and ``pingpong_deep`` in its results).

Covered: fp16/bf16, head dims 64 and 128, sequence lengths that are multiples of 128,
causal (square), grouped K/V heads; no masks, no rpe, lists not cut into parts (the
script checks each case's index).

Each case prints each variant's largest difference from the Triton forward, the forward
times (each kernel's CUDA time by the profiler; the Triton forward's whole call also by
``do_bench``) and the effective TFLOP/s on the computed tiles. Writes
``$OUT/hopper_fwd_<variants>.json``. Run each variant in its own process (a barrier
mistake hangs rather than fails). Compiles on any machine for sm90 with
``--compile-only`` (no GPU needed); runs only on a Hopper GPU.

    python3 benchmarks/experiments/hopper_fwd.py [pipelined] [specialised] [pingpong]
        [--compile-only]
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import triton
from hopper_bwd import _kernel_ms, _whole_lists_index  # beside this script
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from blocksparse_attn.kernels.sm90_common import compile_sm90, descriptor, load_pair

TILE = 128  # query and key tile: the layout block
WARPS = 8  # two warpgroups of 64 query rows each
STAGES = 2  # K and V buffers


@gluon.jit
def _softmax_step(
    s,
    m_i,
    l_i,
    acc,
    offs_m,
    j,
    causal_shift,
    qk_scale,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    s_layout: gl.constexpr,
    o_layout: gl.constexpr,
):
    """One key tile's online-softmax update: the probabilities ``p`` (fp32, ``s_layout``),
    the running maximum and sum, and the accumulator rescaled (``o_layout``)."""
    if CAUSAL:
        offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = offs_n[None, :] <= offs_m[:, None] + causal_shift
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, 1)
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
    acc = acc * alpha_o[:, None]
    return p, m_new, l_i, acc


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, stage, kv_row):
    mbarrier.expect(k_bar.index(stage), k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_row, 0], k_bar.index(stage), k_smem.index(stage))
    mbarrier.expect(v_bar.index(stage), v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [kv_row, 0], v_bar.index(stage), v_smem.index(stage))


@gluon.jit
def _hopper_fwd_kernel(
    q_desc,  # [B * H * L, D], block [BLOCK_M, D]
    k_desc,  # [B * H_kv * L, D], block [BLOCK_N, D]
    v_desc,
    o_desc,  # like q_desc
    LSE,  # [B, H, L] fp32, natural log
    row_ptr,
    row_idx,
    H,
    L,
    row_tiles,
    layout_heads,
    kv_group,
    qk_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // kv_group
    H_kv = H // kv_group
    row = (h // (H // layout_heads)) * row_tiles + pid_m
    start = gl.load(row_ptr + row)
    end = gl.load(row_ptr + row + 1)
    q_row = bh * L + pid_m * BLOCK_M
    kv_base = (b * H_kv + hk) * L

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_desc.dtype

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(2):
        mbarrier.init(k_bar.index(st), count=1)
        mbarrier.init(v_bar.index(st), count=1)

    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    n = end - start
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    if n > 0:
        j0 = gl.load(row_idx + start)
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, 0, kv_base + j0 * BLOCK_N)
    if n > 1:
        j1 = gl.load(row_idx + start + 1)
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, 1, kv_base + j1 * BLOCK_N)
    mbarrier.wait(q_bar, 0)

    if n > 0:
        # the scores of the first tile
        mbarrier.wait(k_bar.index(0), 0)
        s = warpgroup_mma(
            q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        j = gl.load(row_idx + start)
        for i in range(0, n - 1):
            stage = i % 2
            nxt = (i + 1) % 2
            # the next tile's scores start while this tile's softmax runs
            mbarrier.wait(k_bar.index(nxt), ((i + 1) // 2) & 1)
            s_next = warpgroup_mma(
                q_smem, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            p, m_i, l_i, acc = _softmax_step(
                s, m_i, l_i, acc, offs_m, j, 0, qk_scale, BLOCK_N, CAUSAL, s_layout, o_layout
            )
            p = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_bar.index(stage), (i // 2) & 1)
            acc = warpgroup_mma(p, v_smem.index(stage), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
            acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))  # p: read by the MMA
            # this stage's K and V are read: the tile after next goes there
            if i + 2 < n:
                j2 = gl.load(row_idx + start + i + 2)
                _load_kv(
                    k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, stage, kv_base + j2 * BLOCK_N
                )
            j = gl.load(row_idx + start + i + 1)
        last = n - 1
        p, m_i, l_i, acc = _softmax_step(
            s, m_i, l_i, acc, offs_m, j, 0, qk_scale, BLOCK_N, CAUSAL, s_layout, o_layout
        )
        p = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_bar.index(last % 2), (last // 2) & 1)
        acc = warpgroup_mma(p, v_smem.index(last % 2), acc, is_async=True)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))  # p: read by the MMA

    mbarrier.invalidate(q_bar)
    for st in gl.static_range(2):
        mbarrier.invalidate(k_bar.index(st))
        mbarrier.invalidate(v_bar.index(st))

    has = l_i > 0
    l_safe = gl.where(has, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    q_smem.store(out.to(dtype))  # Q is read: its buffer takes the output
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    gl.store(LSE + bh * L + offs_m, lse)
    tma.store_wait(pendings=0)


@gluon.jit
def _ws_producer(
    k_desc,
    v_desc,
    k_smem,
    v_smem,
    ready,
    empty,
    row_idx,
    start,
    n,
    kv_base,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    """One warp: K and V of each tile of the row list into the ring, a stage at a time once
    the consumers have let it go."""
    for i in range(0, n):
        stage = i % STAGES
        # the first pass over the ring waits on the phase before the barrier's first
        mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
        j = gl.load(row_idx + start + i)
        load_pair(k_desc, v_desc, k_smem, v_smem, ready, stage, kv_base + j * BLOCK_N)


@gluon.jit
def _ws_consumer(
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    ready,
    empty,
    row_idx,
    start,
    n,
    offs_m,
    qk_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Two warpgroups: each tile's scores, softmax and ``P V`` as it arrives (the next
    tile's scores issued before this tile's softmax); returns the accumulator and row
    statistics."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)
    if n > 0:
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma(
            q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        j = gl.load(row_idx + start)
        for i in range(0, n - 1):
            stage = i % STAGES
            nxt = (i + 1) % STAGES
            mbarrier.wait(ready.index(nxt), ((i + 1) // STAGES) & 1)
            s_next = warpgroup_mma(
                q_smem, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            p, m_i, l_i, acc = _softmax_step(
                s, m_i, l_i, acc, offs_m, j, 0, qk_scale, BLOCK_N, CAUSAL, s_layout, o_layout
            )
            p = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma(p, v_smem.index(stage), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
            acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
            mbarrier.arrive(empty.index(stage), count=1)  # this stage's K and V are read
            j = gl.load(row_idx + start + i + 1)
        last = (n - 1) % STAGES
        p, m_i, l_i, acc = _softmax_step(
            s, m_i, l_i, acc, offs_m, j, 0, qk_scale, BLOCK_N, CAUSAL, s_layout, o_layout
        )
        p = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
        mbarrier.arrive(empty.index(last), count=1)
    return acc, m_i, l_i


@gluon.jit
def _hopper_fwd_ws_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    LSE,
    row_ptr,
    row_idx,
    H,
    L,
    row_tiles,
    layout_heads,
    kv_group,
    qk_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    """The forward of :func:`_hopper_fwd_kernel` with its loads in a producer warp (warp
    specialisation): K and V run ``STAGES`` tiles ahead through ready/empty barriers."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    H_kv = H // kv_group
    row = (h // (H // layout_heads)) * row_tiles + pid_m
    start = gl.load(row_ptr + row)
    n = gl.load(row_ptr + row + 1) - start
    q_row = bh * L + pid_m * BLOCK_M
    kv_base = (b * H_kv + h // kv_group) * L
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=1)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))

    acc, m_i, l_i = gl.warp_specialize(
        [
            (
                _ws_consumer,
                (
                    q_smem,
                    k_smem,
                    v_smem,
                    q_bar,
                    ready,
                    empty,
                    row_idx,
                    start,
                    n,
                    offs_m,
                    qk_scale,
                    HEAD_DIM,
                    BLOCK_M,
                    BLOCK_N,
                    CAUSAL,
                    STAGES,
                    num_warps,
                ),
            ),
            (
                _ws_producer,
                (
                    k_desc,
                    v_desc,
                    k_smem,
                    v_smem,
                    ready,
                    empty,
                    row_idx,
                    start,
                    n,
                    kv_base,
                    BLOCK_N,
                    STAGES,
                ),
            ),
        ],
        [1],
        [40],
    )

    mbarrier.invalidate(q_bar)
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(st))
        mbarrier.invalidate(empty.index(st))
    has = l_i > 0
    l_safe = gl.where(has, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    q_smem.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    gl.store(LSE + bh * L + offs_m, lse)
    tma.store_wait(pendings=0)


def stages(head_dim: int) -> int:
    """K/V ring depth of the warp-specialised kernel: what fits beside Q in shared memory."""
    return 2 if head_dim > 64 else 3


def hopper_forward(q, k, v, index, *, causal, scale, variant="pipelined"):
    """Forward of ``[B, H, L, D]`` inputs (contiguous, L a multiple of 128) over a compiled
    index of 128x128 tiles; ``(out, lse)``. ``variant``: ``"pipelined"``,
    ``"specialised"`` (loads in a producer warp) or ``"pingpong"`` (the library's Hopper
    forward, ``kernels/sm90_fwd.py``: two consumer warpgroups taking turns)."""
    B, H, L, D = q.shape
    if variant == "pingpong":
        from blocksparse_attn.kernels.sm90_fwd import sm90_forward

        sched = dict(B=B, heads_per_layout_head=H // index.heads)  # a layout of the batch
        out, lse, _, _ = sm90_forward(q, k, v, index, sched, causal=causal, scale=scale)
        return out, lse
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    qd, kd, vd, od = (descriptor(t, TILE) for t in (q, k, v, out))
    args = (
        qd,
        kd,
        vd,
        od,
        lse,
        index.row_ptr,
        index.row_idx,
        H,
        L,
        index.row_tiles,
        index.heads,
        H // k.shape[1],
        scale * math.log2(math.e),
    )
    meta = dict(HEAD_DIM=D, BLOCK_M=TILE, BLOCK_N=TILE, CAUSAL=causal, num_warps=WARPS)
    grid = (L // TILE, B * H)
    if variant == "specialised":
        _hopper_fwd_ws_kernel[grid](*args, STAGES=stages(D), **meta)
    else:
        _hopper_fwd_kernel[grid](*args, **meta)
    return out, lse


def compile_only() -> None:
    """Compile both kernels for sm90 without a GPU (bf16, head dims 64 and 128, causal or
    not): the layouts, shared memory and pipeline type-check and lower to a cubin."""
    from triton.runtime.jit import mangle_type

    for D in (64, 128):
        desc = mangle_type(descriptor(torch.zeros(4 * TILE, D, dtype=torch.bfloat16), TILE))
        types = dict(
            k_desc=desc,
            v_desc=desc,
            LSE="*fp32",
            row_ptr="*i32",
            row_idx="*i32",
            H="i32",
            L="i32",
            row_tiles="i32",
            layout_heads="i32",
            kv_group="i32",
            qk_scale="fp32",
        )
        variants = (
            ("pipelined", _hopper_fwd_kernel),
            ("specialised", _hopper_fwd_ws_kernel),
        )
        for name, fn in variants:
            for causal in (False, True):
                consts = dict(
                    HEAD_DIM=D, BLOCK_M=TILE, BLOCK_N=TILE, CAUSAL=causal, num_warps=WARPS
                )
                if fn is not _hopper_fwd_kernel:
                    consts["STAGES"] = stages(D)
                sig = {a: types.get(a, "constexpr") for a in fn.arg_names}
                sig.update(q_desc=desc, o_desc=desc)
                r = compile_sm90(fn, sig, consts)
                print(
                    f"{name} D={D} causal={causal}: compiled, shared memory "
                    f"{r['shared']} bytes, {r['spills']} bytes spilled, {r['registers']} registers",
                    flush=True,
                )


def main(variants) -> None:
    from triton.testing import do_bench

    # the baseline is the Triton forward: the library's own Hopper forward kept off
    os.environ["BLOCKSPARSE_ATTN_SM90"] = "0"

    from blocksparse_attn import block_sparse_attention
    from blocksparse_attn.tools.bench_cases import pattern_layout

    cases = [  # name, pattern, density, L, B, H, D, causal
        ("dense", "dense", None, 8192, 4, 8, 128, False),
        ("causal (token)", "causal_dense", None, 8192, 4, 8, 128, True),
        ("window_global", "window_global", None, 16384, 2, 8, 128, False),
        ("random 11%", "random", 0.11, 8192, 4, 8, 128, False),
        ("dense D64", "dense", None, 8192, 4, 16, 64, False),
        ("window_global D64", "window_global", None, 16384, 2, 16, 64, False),
    ]
    rows = []
    name = torch.cuda.get_device_name()
    for label, pattern, density, L, B, H, D, causal in cases:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        layout = pattern_layout(pattern, L, TILE, density).cuda()
        scale = D**-0.5
        # this kernel walks each row list whole: an index of its own with no list cut
        index = _whole_lists_index(layout, L, TILE, causal, q.device)
        want = block_sparse_attention(q, k, v, layout, block=TILE, causal=causal, backend="fused")
        tiles = index.nnz * (H // index.heads) * B
        flops = 4 * tiles * TILE * TILE * D

        def call():
            return block_sparse_attention(
                q, k, v, layout, block=TILE, causal=causal, backend="fused"
            )

        t_call = do_bench(call)
        t_triton = _kernel_ms(call, {"t": "_bsa_fwd"})["t"]  # with the merge of cut lists
        row = dict(
            case=label,
            L=L,
            B=B,
            H=H,
            D=D,
            causal=causal,
            triton_call_ms=t_call,
            triton_ms=t_triton,
            triton_tf=flops / t_triton * 1e-9,
        )
        for variant in variants:

            def step(variant=variant):
                return hopper_forward(q, k, v, index, causal=causal, scale=scale, variant=variant)

            try:
                got, _ = step()
                torch.cuda.synchronize()
            except Exception as e:  # record why this variant could not run
                row[f"{variant}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            kernel = "_sm90_fwd" if variant == "pingpong" else "_hopper_fwd"
            t = _kernel_ms(step, {"t": kernel})["t"]
            row[f"{variant}_max_diff"] = float((got.float() - want.float()).abs().max())
            row[f"{variant}_ms"] = t
            row[f"{variant}_tf"] = flops / t * 1e-9
            row[f"triton_over_{variant}"] = t_triton / t
        rows.append(row)
        print(row, flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"hopper_fwd_{'_'.join(variants)}.json"), "w") as f:
        json.dump(
            dict(gpu=name, torch=torch.__version__, triton=triton.__version__, rows=rows),
            f,
            indent=1,
        )


if __name__ == "__main__":
    if "--compile-only" in sys.argv:
        compile_only()
    else:  # the variants to run, each in its own process where one might hang
        known = ("pipelined", "specialised", "pingpong")
        chosen = [a for a in sys.argv[1:] if a in known]
        main(chosen or ["pipelined"])
