"""Forward kernel for Hopper (sm90) in Gluon (``triton.experimental.gluon``): the fused
attention over the compiled index's row lists of 128x128 tiles, in the FlashAttention-3
schedule.

A program holds a 128-query tile (or a part of its row list, for a list cut into parts)
and runs three partitions (``warp_specialize``):

* a producer warp loads K and V of each listed key tile through TMA into a shared-memory
  ring (3 stages at head dim 128, 4 at 64), K and V
  each on their own barrier, a stage at a time once both consumers let it go;
* two consumer warpgroups, 64 query rows each, take turns to issue their matrix products
  (an mbarrier per warpgroup passes the turn): a warpgroup issues tile ``i``'s scores and
  tile ``i - 1``'s ``P V`` together, hands the turn over, computes tile ``i``'s softmax
  while its ``P V`` runs, and rescales the accumulator once that product is done. So one
  warpgroup's softmax overlaps the other's matrix products, and the tensor cores rarely
  wait for the exponentials.

Programs follow the index's work items as the Triton forward does (longest first, in
groups that share their batch-head's keys in L2; :func:`~._common._schedule`); a part of a
cut list writes its unnormalised result and row statistics for the Triton merge kernel.

Where this kernel runs and where the Triton forward does is decided by
:func:`~blocksparse_attn.kernels.fused_fwd.sm90_forward_plan` (measured in
``benchmarks/NOTES.md``, v15 and v20). This module imports Gluon: load it only where that plan
says it runs.
"""

from __future__ import annotations

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

from ._common import empty, part_slots, programs_per_list
from .configs import PROGRAM_GROUP
from .sm90_common import compile_sm90, descriptor, work_item

TILE = 128  # query tile per program, key tile per step: the layout block
ROWS = 64  # query rows of each consumer warpgroup


@gluon.jit
def _larger(a, b):
    return gl.maximum(a, b)


@gluon.jit
def _added(a, b):
    return a + b


@gluon.jit
def _softmax_scores(
    s,
    m_i,
    l_i,
    offs_m,
    j,
    qk_scale,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    SCALE_POS: gl.constexpr,
):
    """One key tile's online-softmax statistics, the accumulator left alone: ``p`` (fp32,
    the scores' layout), the new running maximum (base 2, scaled) and sum, and ``alpha``,
    the factor the accumulator takes once the product still reading it is done. With a
    positive scale (``SCALE_POS``) the maximum is taken before scaling and the scale rides
    on the exponent's fused multiply-add; otherwise the scores are scaled first."""
    if not SCALE_POS:
        s = s * qk_scale
    if CAUSAL:
        offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    if SCALE_POS:
        m_new = gl.maximum(m_i, gl.reduce(s, 1, _larger) * qk_scale)
    else:
        m_new = gl.maximum(m_i, gl.reduce(s, 1, _larger))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    if SCALE_POS:
        p = gl.exp2(s * qk_scale - m_use[:, None])
    else:
        p = gl.exp2(s - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + gl.reduce(p, 1, _added), alpha


@gluon.jit
def _consumer(
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    k_ready,
    v_ready,
    empty,
    turn,
    o_desc,
    LSE,
    PARTS,
    PART_STATS,
    row_idx,
    start,
    n,
    slot,
    q_row,
    lse_row,
    m0,
    qk_scale,
    WG: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    SCALE_POS: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Consumer warpgroup ``WG`` (0 or 1): query rows ``m0 .. m0 + BLOCK_M`` over the
    ``n`` listed key tiles from ``start`` (see the module's description); writes their
    output and log-sum-exp, or for a part (``slot >= 0``) the unnormalised accumulator, the
    running maximum (base 2) and sum."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    my_q = q_smem.index(WG)
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    offs_m = m0 + rows
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar.index(WG), 0)
    if n > 0:
        mbarrier.wait(k_ready.index(0), 0)
        mbarrier.wait(turn.index(WG), 0)
        s = warpgroup_mma(
            my_q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        mbarrier.arrive(turn.index(1 - WG))
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        j = gl.load(row_idx + start)
        p, m_i, l_i, alpha = _softmax_scores(
            s, m_i, l_i, offs_m, j, qk_scale, BLOCK_N, CAUSAL, SCALE_POS
        )
        p = gl.convert_layout(p.to(dtype), p_layout)
        for i in range(1, n):
            stage = i % STAGES
            prev = (i - 1) % STAGES
            mbarrier.wait(k_ready.index(stage), (i // STAGES) & 1)
            mbarrier.wait(turn.index(WG), i & 1)
            s = warpgroup_mma(
                my_q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            mbarrier.wait(v_ready.index(prev), ((i - 1) // STAGES) & 1)
            acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            mbarrier.arrive(turn.index(1 - WG))
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
            j = gl.load(row_idx + start + i)
            p_next, m_i, l_i, alpha = _softmax_scores(
                s, m_i, l_i, offs_m, j, qk_scale, BLOCK_N, CAUSAL, SCALE_POS
            )
            acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
            mbarrier.arrive(empty.index(prev))  # this warpgroup is done with tile i - 1
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p = gl.convert_layout(p_next.to(dtype), p_layout)
        last = (n - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p))
        mbarrier.arrive(empty.index(last))
    if slot < 0:
        has = l_i > 0
        l_safe = gl.where(has, l_i, 1.0)
        out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
        my_q.store(out.to(dtype))  # this warpgroup's Q is read: its buffer takes the output
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [q_row, 0], my_q)
        lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        gl.store(LSE + lse_row + rows, lse)
        tma.store_wait(pendings=0)
    else:  # a part of a cut list: its half of the slot's 2 * BLOCK_M rows
        o_rows = WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        part = PARTS + slot * (2 * BLOCK_M * HEAD_DIM)
        gl.store(part + o_rows[:, None] * HEAD_DIM + o_cols[None, :], acc)
        stats = PART_STATS + slot * (4 * BLOCK_M) + WG * BLOCK_M + rows
        gl.store(stats, m_i)
        gl.store(stats + 2 * BLOCK_M, l_i)


@gluon.jit
def _producer(
    k_desc,
    v_desc,
    k_smem,
    v_smem,
    k_ready,
    v_ready,
    empty,
    row_idx,
    start,
    n,
    kv_base,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    """One warp: K and V of each listed key tile into the ring, K and V on their own
    barriers (the scores need only K), a stage at a time once both consumers let it go."""
    for i in range(0, n):
        stage = i % STAGES
        # the first pass over the ring waits on the phase before the barrier's first
        mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
        row = kv_base + gl.load(row_idx + start + i) * BLOCK_N
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, 0], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _sm90_fwd_kernel(
    q_desc,  # [B * H * L, D], block [BLOCK_M, D]: one consumer warpgroup's rows
    k_desc,  # [B * H_kv * L, D], block [BLOCK_N, D]
    v_desc,
    o_desc,  # like q_desc
    LSE,  # [B, H, L] fp32, natural log
    PARTS,  # [slots, 2 * BLOCK_M, D] fp32: the parts of cut lists (any tensor when none)
    PART_STATS,  # [slots, 2, 2 * BLOCK_M] fp32: their maxima (base 2) and sums
    row_idx,
    items,  # the index's row work (index.Work): items and their order
    order,
    B,  # the schedule's batch and heads per layout head (_common.schedule_args)
    heads_per_layout_head,
    H,
    L,
    row_tiles,
    kv_group,  # query heads per kv head
    qk_scale,  # scale * log2(e)
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    SCALE_POS: gl.constexpr,  # scale > 0
    STAGES: gl.constexpr,
    GROUP: gl.constexpr,
    num_warps: gl.constexpr,
):
    tile, b, h, start, end, slot = work_item(
        items, order, heads_per_layout_head, B, row_tiles, H, GROUP
    )
    n = end - start
    bh = b * H + h
    q_row = (bh * L + tile * 2 * BLOCK_M).to(gl.int32)
    kv_base = ((b * (H // kv_group) + h // kv_group) * L).to(gl.int32)
    dtype: gl.constexpr = q_desc.dtype

    q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(2):
        mbarrier.init(q_bar.index(w), count=1)
        mbarrier.init(turn.index(w), count=1)
    for st in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(st), count=1)
        mbarrier.init(v_ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=2)  # both consumer warpgroups
    for w in gl.static_range(2):
        mbarrier.expect(q_bar.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            q_desc, [q_row + w * BLOCK_M, 0], q_bar.index(w), q_smem.index(w)
        )
    mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first

    lse_row = bh * L + tile * 2 * BLOCK_M
    m0 = tile * 2 * BLOCK_M
    gl.warp_specialize(
        [
            (
                _consumer,
                (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, turn, o_desc, LSE,
                 PARTS, PART_STATS, row_idx, start, n, slot, q_row, lse_row, m0, qk_scale,
                 0, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, SCALE_POS, STAGES),
            ),
            (
                _consumer,
                (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, turn, o_desc, LSE,
                 PARTS, PART_STATS, row_idx, start, n, slot, q_row + BLOCK_M,
                 lse_row + BLOCK_M, m0 + BLOCK_M, qk_scale,
                 1, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, SCALE_POS, STAGES),
            ),
            (
                _producer,
                (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, empty, row_idx, start, n,
                 kv_base, BLOCK_N, STAGES),
            ),
        ],
        [4, 1],
        [240, 24],  # registers per thread: 240 for each consumer warpgroup, 24 the producer
    )  # fmt: skip
    for w in gl.static_range(2):
        mbarrier.invalidate(q_bar.index(w))
        mbarrier.invalidate(turn.index(w))
    for st in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(st))
        mbarrier.invalidate(v_ready.index(st))
        mbarrier.invalidate(empty.index(st))


def stages(head_dim: int) -> int:
    """K/V ring depth: what fits beside the two Q tiles in shared memory (227 KiB)."""
    return 3 if head_dim > 64 else 4


def sm90_forward(q, k, v, index, sched: dict, *, causal: bool, scale: float):
    """Forward of contiguous ``[B, H, L, D]`` inputs (``L`` a multiple of 128, head dim 64
    or 128) over an index of 128x128 tiles;
    ``sched``: :func:`~._common.schedule_args`.
    Returns ``(out, lse, parts, part_stats)``: the output, the log-sum-exp ``[B, H, L]``
    (natural log, ``-inf`` for rows with nothing to attend), and the buffers the parts of
    cut lists wrote (``None`` when no list is cut), for the Triton merge kernel."""
    B, H, L, D = q.shape
    out = empty(q.shape, q.dtype, q.device)
    lse = empty((B, H, L), torch.float32, q.device)
    parts = part_slots(index.rows, sched, TILE, D, lse)
    part_stats = part_slots(index.rows, sched, 2, TILE, lse)
    grid = (index.rows.items.shape[0] * programs_per_list(sched),)
    _sm90_fwd_kernel[grid](
        descriptor(q, ROWS),
        descriptor(k, TILE),
        descriptor(v, TILE),
        descriptor(out, ROWS),
        lse,
        parts,
        part_stats,
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
        HEAD_DIM=D,
        BLOCK_M=ROWS,
        BLOCK_N=TILE,
        CAUSAL=causal,
        SCALE_POS=scale > 0,
        STAGES=stages(D),
        GROUP=PROGRAM_GROUP,
        num_warps=4,
    )
    cut = index.rows.parts > 0
    return out, lse, (parts if cut else None), (part_stats if cut else None)


def compile_forward_for_sm90(head_dims=(64, 128)) -> list[dict]:
    """Compile the forward for sm90 on any machine (no GPU needed), bf16, causal or not, a
    positive scale or not: one entry per variant with its shared memory and the local-memory (spill)
    instructions in its PTX."""
    from triton.runtime.jit import mangle_type

    found = []
    for D in head_dims:

        def desc(rows, D=D):
            return mangle_type(descriptor(torch.zeros(4 * TILE, D, dtype=torch.bfloat16), rows))

        types = dict(q_desc=desc(ROWS), k_desc=desc(TILE), v_desc=desc(TILE), o_desc=desc(ROWS))
        types.update(LSE="*fp32", PARTS="*fp32", PART_STATS="*fp32", row_idx="*i32")
        types.update(items="*i32", order="*i32", B="i32", heads_per_layout_head="i32")
        types.update(H="i32", L="i32", row_tiles="i32", kv_group="i32", qk_scale="fp32")
        # a negative or zero scale takes the scores scaled before the maximum
        for causal, positive in ((False, True), (True, True), (True, False)):
            sig = {a: types.get(a, "constexpr") for a in _sm90_fwd_kernel.arg_names}
            consts = dict(HEAD_DIM=D, BLOCK_M=ROWS, BLOCK_N=TILE, CAUSAL=causal)
            consts.update(SCALE_POS=positive, STAGES=stages(D), GROUP=PROGRAM_GROUP, num_warps=4)
            compiled = compile_sm90(_sm90_fwd_kernel, sig, consts)
            found.append(
                dict(kernel="forward", head_dim=D, causal=causal, positive_scale=positive)
                | compiled
            )
    return found
