"""Experiment (Hopper, sm90): the Gluon backward kernels of
``blocksparse_attn.kernels.sm90_bwd`` against the Triton backward kernels on block-128
layouts, each list walked whole (the index built with no list cut into parts, whatever
the library would choose). Head dims 64 and 128, one kv head per query head.

Each case prints the largest differences from the Triton backward's dK, dV and dQ, and
the Gluon and Triton kernels' times (their CUDA time under ``torch.profiler``, averaged
over the steps). Writes ``$OUT/hopper_bwd.json``.
``--compile-only`` compiles for sm90 on any machine.

    python3 benchmarks/experiments/hopper_bwd.py [--compile-only]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton

from blocksparse_attn.kernels.sm90_bwd import KEYS, compile_for_sm90, sm90_dkdv, sm90_dq


def compile_only() -> None:
    """Compile both kernels for sm90 without a GPU; prints shared memory and local-memory
    (spill) instructions in the PTX."""
    for r in compile_for_sm90((64, 128)):
        print(
            f"{r['kernel']} D={r['head_dim']} causal={r['causal']}: compiled, shared memory "
            f"{r['shared']} bytes, {r['spills']} bytes spilled, {r['registers']} registers",
            flush=True,
        )


def write_rows(name: str, rows: list) -> None:
    """``rows`` with the GPU's name and the versions, to ``$OUT/<name>.json``."""
    with open(os.path.join(os.environ.get("OUT", "."), f"{name}.json"), "w") as f:
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


def _kernel_ms(step, names: dict, steps: int = 10) -> dict:
    """Mean CUDA time per ``step()`` of the kernels whose name holds each of ``names``'
    values, ms, under ``torch.profiler`` (the kernels alone, no host work)."""
    from torch.autograd import DeviceType

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times = dict.fromkeys(names, 0.0)
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        for key, part in names.items():
            if part in e.name:
                times[key] += e.self_device_time_total / steps / 1e3
    return times


def _whole_lists_index(layout, L, tile_m, causal, device):
    """The index these kernels walk (128x128 tiles over a block-128 layout): each list
    whole (no list cut into parts)."""
    from blocksparse_attn import index as index_module
    from blocksparse_attn.index import get_index

    whole, index_module.PART_MIN = index_module.PART_MIN, 1 << 30
    try:
        index = get_index(
            layout.clone(),
            KEYS,
            q_len=L,
            k_len=L,
            tile_m=tile_m,
            tile_n=KEYS,
            causal=causal,
            device=device,
        )
    finally:
        index_module.PART_MIN = whole
    # each tile lies inside one layout block (tile_m divides it), so a kept tile keeps all
    # its sub-blocks: the kernels read no sub-block bits
    assert KEYS % tile_m == 0 and not index.cols.parts and not index.rows.parts
    return index


def main() -> None:

    from blocksparse_attn.kernels._common import schedule_args
    from blocksparse_attn.kernels.fused_bwd import fused_attention_backward
    from blocksparse_attn.kernels.fused_fwd import fused_attention_forward
    from blocksparse_attn.tools.bench_cases import pattern_layout

    cases = [  # name, pattern, density, L, B, H, D, causal
        ("dense", "dense", None, 8192, 4, 8, 128, False),
        ("causal (token)", "causal_dense", None, 8192, 4, 8, 128, True),
        ("window_global", "window_global", None, 16384, 2, 8, 128, False),
        ("random 11%", "random", 0.11, 8192, 4, 8, 128, False),
        ("dense D64", "dense", None, 8192, 4, 16, 64, False),
    ]
    rows = []
    for label, pattern, density, L, B, H, D, causal in cases:
        torch.manual_seed(0)
        q, k, v, go = (
            torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)
        )
        layout = pattern_layout(pattern, L, KEYS, density).cuda()
        scale = D**-0.5
        out, lse = fused_attention_forward(q, k, v, layout, block=KEYS, scale=scale, causal=causal)
        delta = (out.float() * go.float()).sum(-1)
        index = _whole_lists_index(layout, L, KEYS, causal, q.device)  # both kernels
        args = (q, k, v, go, lse, delta)
        sched = schedule_args(layout, index, B, H)

        def ours():
            return fused_attention_backward(
                go, q, k, v, out, lse, layout, block=KEYS, scale=scale, causal=causal
            )

        def gluon_dkdv():
            return sm90_dkdv(*args, index, sched, causal=causal, scale=scale)

        def gluon_dq():
            return sm90_dq(*args, index, sched, causal=causal, scale=scale)

        dq_want, dk_want, dv_want, *_ = ours()
        (dk, dv), dq = gluon_dkdv(), gluon_dq()
        torch.cuda.synchronize()

        def diff(a, b):
            return float((a.float() - b.float()).abs().max())

        triton_ms = _kernel_ms(ours, {"dkdv": "_bsa_bwd_dkdv", "dq": "_bsa_bwd_dq"})
        t_dkdv = _kernel_ms(gluon_dkdv, {"t": "_sm90_dkdv"})["t"]
        t_dq = _kernel_ms(gluon_dq, {"t": "_sm90_dq"})["t"]
        tiles = index.nnz * (H // index.heads) * B * KEYS * KEYS  # score elements
        row = dict(
            case=label,
            L=L,
            B=B,
            H=H,
            D=D,
            causal=causal,
            dk_max_diff=diff(dk, dk_want),
            dv_max_diff=diff(dv, dv_want),
            dq_max_diff=diff(dq, dq_want),
            grad_max=max(float(t.float().abs().max()) for t in (dq_want, dk_want, dv_want)),
            gluon_dkdv_ms=t_dkdv,
            triton_dkdv_ms=triton_ms["dkdv"],
            gluon_dq_ms=t_dq,
            triton_dq_ms=triton_ms["dq"],
            # four products of 2 * D flops per score for dK/dV, three for dQ
            gluon_dkdv_tf=8 * tiles * D / t_dkdv * 1e-9,
            gluon_dq_tf=6 * tiles * D / t_dq * 1e-9,
            triton_over_gluon=(triton_ms["dkdv"] + triton_ms["dq"]) / (t_dkdv + t_dq),
        )
        rows.append(row)
        print(row, flush=True)
    write_rows("hopper_bwd", rows)


if __name__ == "__main__":
    if "--compile-only" in sys.argv:
        compile_only()
    else:
        main()
