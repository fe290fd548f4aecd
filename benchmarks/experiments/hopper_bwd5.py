"""Experiment (Hopper, sm90): the five-product backward. ``sm90_dkdvdq`` below computes
dQ, dK and dV in one kernel per 128-key tile, walking its column list in 64-query steps:
``S = Q K^T`` and ``dP = dO V^T`` as [queries, keys] (the two warpgroups splitting the keys),
P and dS through shared memory, then ``dQ = dS K`` added into an fp32 buffer by a TMA
reduction, ``dV += P^T dO`` and ``dK += dS^T Q``. The library's backward instead computes
the scores and dP again in a dQ kernel (seven products, no atomics). Several programs add
into one query tile in no fixed order, so dQ's rounding varies from run to run.

For each case: the largest differences of dQ, dK, dV from the seven-product kernels, and
both backwards' kernel times under the profiler (the five-product one with its buffer's
zero fill and its conversion to the input dtype); on the dense row also the kernel with
dQ left out (``dq_write`` 1: put in shared memory only; 0: neither), which prices the
products and the writing of dQ apart. Writes ``$OUT/hopper_bwd5.json``.

    python3 benchmarks/experiments/hopper_bwd5.py
"""

from __future__ import annotations

import json
import math
import os

import torch
import triton
from hopper_bwd import _kernel_ms  # beside this script
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

from blocksparse_attn import block_sparse_attention
from blocksparse_attn.kernels._common import empty
from blocksparse_attn.kernels.fused_bwd import sm90_backward_plan
from blocksparse_attn.kernels.sm90_bwd import (
    KEYS,
    QUERIES,
    WARPS,
    _desc,
    _heads,
    load_pair,
    sm90_dkdv,
    sm90_dq,
)
from blocksparse_attn.tools.bench_cases import pattern_layout


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
    DQ_WRITE: gl.constexpr,  # 2: dQ added; 1: only put in shared memory; 0: neither
):
    pid_n = gl.program_id(0)
    bh = gl.program_id(1)
    h = bh % H
    col = ((bh // H) * sample_heads + h // (H // layout_heads)) * col_tiles + pid_n
    start = gl.load(col_ptr + col)
    end = gl.load(col_ptr + col + 1)
    k_row = ((bh // H) * (H // kv_group) + h // kv_group) * L + pid_n * BLOCK_N
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
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [k_row, 0], kv_bar, k_all.index(0))
    tma.async_copy_global_to_shared(v_desc, [k_row, 0], kv_bar, v_all.index(0))
    if n > 0:
        r0 = gl.load(col_idx + start) * 2
        load_pair(q_desc, do_desc, q_smem, do_smem, bar, 0, bh * L + r0 * BLOCK_M)
        load_pair(q_desc, do_desc, q_smem, do_smem, bar, 1, bh * L + (r0 + 1) * BLOCK_M)
    mbarrier.wait(kv_bar, 0)

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
        if DQ_WRITE > 0:
            tma.store_wait(pendings=1)  # the reduction before last has read this buffer
            gl.thread_barrier()
            dq_smem.index(stage).store(dq)
            fence_async_shared()
            if DQ_WRITE > 1:
                tma_add(dq_desc, [bh * L + r * BLOCK_M, 0], dq_smem.index(stage))
        dv = warpgroup_mma(p_smem.permute((1, 0)), do_t, dv, is_async=True)
        dk = warpgroup_mma(ds_smem.permute((1, 0)), q_t, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
        # this stage's Q and dO are read: the tile after next goes there
        if i + 2 < n:
            r2 = gl.load(col_idx + start + i // 2 + 1) * 2 + stage
            load_pair(q_desc, do_desc, q_smem, do_smem, bar, stage, bh * L + r2 * BLOCK_M)

    tma.store_wait(pendings=0)
    mbarrier.invalidate(kv_bar)
    for st in gl.static_range(2):
        mbarrier.invalidate(bar.index(st))
    if GROUPED:  # this query head's share, in fp32 (summed over the group after)
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
        at = (bh.to(gl.int64) * L + pid_n * BLOCK_N + rows)[:, None] * HEAD_DIM + cols[None, :]
        gl.store(DK32 + at, dk * scale)
        gl.store(DV32 + at, dv)
    else:  # K and V are read: their buffers take dK and dV
        k_all.index(0).store((dk * scale).to(dtype))
        v_all.index(0).store(dv.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(dk_desc, [k_row, 0], k_all.index(0))
        tma.async_copy_shared_to_global(dv_desc, [k_row, 0], v_all.index(0))
        tma.store_wait(pendings=0)


def sm90_dkdvdq(q, k, v, grad_out, lse, delta, index, *, causal, scale, samples=1, dq_write=2):
    """dQ, dK and dV of the inputs of :func:`sm90_dkdv` in one kernel: five matrix
    products a step instead of the seven of :func:`sm90_dkdv` with :func:`sm90_dq`, each
    step's dQ added into an fp32 buffer by a TMA reduction. Several programs add into
    one query tile, in no fixed order: dQ's rounding varies from run to run (dK and dV
    do not). ``dq_write`` below 2 leaves dQ out (1: still put in shared memory), to
    measure what adding it costs: dQ is then wrong."""
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
        DQ_WRITE=dq_write,
    )
    if kv_group > 1:
        H_kv = k.shape[1]
        dk = dk32.view(B, H_kv, kv_group, L, D).sum(2).to(k.dtype)
        dv = dv32.view(B, H_kv, kv_group, L, D).sum(2).to(v.dtype)
    return (dq32 * scale).to(q.dtype), dk, dv


def main() -> None:
    cases = [  # name, pattern, density, L, B, H, causal
        ("dense", "dense", None, 8192, 4, 8, False),
        ("causal (token)", "causal_dense", None, 8192, 4, 8, True),
        ("random 11%", "random", 0.11, 8192, 4, 8, False),
        ("random 30%", "random", 0.3, 8192, 4, 8, False),
    ]
    rows = []
    for label, pattern, density, L, B, H, causal in cases:
        torch.manual_seed(0)
        D = 128
        q, k, v, grad_out = (
            torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)
        )
        layout = pattern_layout(pattern, L, 128, density).cuda()
        scale = D**-0.5
        out, lse = block_sparse_attention(
            q, k, v, layout, block=128, causal=causal, return_lse=True
        )
        delta = (grad_out.float() * out.float()).sum(-1)
        plan = sm90_backward_plan(q, k, v, grad_out, layout, block=128, causal=causal)
        if plan is None:
            rows.append(dict(case=label, error="outside the Hopper backward's plan"))
            continue
        index, samples = plan
        args = (q, k, v, grad_out, lse, delta, index)
        kw = dict(causal=causal, scale=scale, samples=samples)

        def seven():
            dk, dv = sm90_dkdv(*args, **kw)
            return sm90_dq(*args, **kw), dk, dv

        def five(dq_write=2):
            return lambda: sm90_dkdvdq(*args, **kw, dq_write=dq_write)

        want, got = seven(), five()()
        torch.cuda.synchronize()
        row = dict(case=label, L=L, B=B, H=H, D=D, causal=causal)
        for name, x, y in zip(("dq", "dk", "dv"), got, want):
            row[f"{name}_max_diff"] = float((x.float() - y.float()).abs().max())
            row[f"{name}_max"] = float(y.float().abs().max())
        t7 = _kernel_ms(seven, {"dkdv": "_sm90_dkdv_kernel", "dq": "_sm90_dq"})
        t5 = _kernel_ms(five(), {"kernel": "_sm90_dkdvdq", "all": ""})
        tiles = index.nnz * (H // index.heads) * B
        flops = 4 * tiles * 128 * 128 * D * 2.5  # the backward's useful work: 2.5x forward
        row.update(
            seven_ms=t7["dkdv"] + t7["dq"],
            five_ms=t5["all"],
            five_kernel_ms=t5["kernel"],
            seven_over_five=(t7["dkdv"] + t7["dq"]) / t5["all"],
            seven_tf=flops / (t7["dkdv"] + t7["dq"]) * 1e-9,
            five_tf=flops / t5["all"] * 1e-9,
        )
        if label == "dense":
            for write in (1, 0):
                t = _kernel_ms(five(write), {"kernel": "_sm90_dkdvdq"})
                row[f"five_kernel_dq_write{write}_ms"] = t["kernel"]
        rows.append(row)
        print(row, flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "hopper_bwd5.json"), "w") as f:
        json.dump(
            dict(
                gpu=torch.cuda.get_device_name(),
                torch=torch.__version__,
                triton=triton.__version__,
                rows=rows,
            ),
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
