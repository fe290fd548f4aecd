"""Experiment (Hopper, sm90): the five-product backward against the seven-product one.
``kernels.sm90_bwd.sm90_dkdvdq`` (the library's ``deterministic=False`` backward) computes
dQ, dK and dV in one kernel per 128-key tile, walking its column list in 64-query steps:
``S = Q K^T`` and ``dP = dO V^T`` as [queries, keys] (the two warpgroups splitting the keys),
P and dS through shared memory, then ``dQ = dS K`` added into an fp32 buffer by a TMA
reduction, ``dV += P^T dO`` and ``dK += dS^T Q``. The deterministic backward instead
computes the scores and dP again in a dQ kernel (seven products, no atomics). Several programs add
into one query tile in no fixed order, so dQ's rounding varies from run to run.

For each case: the largest differences of dQ, dK, dV from the seven-product kernels, and
both backwards' kernel times under the profiler (the five-product one with its buffer's
zero fill and its conversion to the input dtype). Writes ``$OUT/hopper_bwd5.json``. (The
kernel with dQ left out, which priced the products and the writing of dQ apart in NOTES
v16, is this file at commit 25f2d05.)

    python3 benchmarks/experiments/hopper_bwd5.py
"""

from __future__ import annotations

import torch
from hopper_bwd import _kernel_ms, write_rows  # beside this script

from blocksparse_attn import block_sparse_attention
from blocksparse_attn.kernels._common import schedule_args
from blocksparse_attn.kernels.fused_bwd import sm90_backward_plan
from blocksparse_attn.kernels.sm90_bwd import sm90_dkdv, sm90_dkdvdq, sm90_dq
from blocksparse_attn.tools.bench_cases import pattern_layout


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
        index = plan
        args = (q, k, v, grad_out, lse, delta, index, schedule_args(layout, index, B, H))
        kw = dict(causal=causal, scale=scale)

        def seven():
            dk, dv = sm90_dkdv(*args, **kw)
            return sm90_dq(*args, **kw), dk, dv

        def five():
            return sm90_dkdvdq(*args, **kw)

        want, got = seven(), five()
        torch.cuda.synchronize()
        row = dict(case=label, L=L, B=B, H=H, D=D, causal=causal)
        for name, x, y in zip(("dq", "dk", "dv"), got, want):
            row[f"{name}_max_diff"] = float((x.float() - y.float()).abs().max())
            row[f"{name}_max"] = float(y.float().abs().max())
        t7 = _kernel_ms(seven, {"dkdv": "_sm90_dkdv_kernel", "dq": "_sm90_dq"})
        t5 = _kernel_ms(five, {"kernel": "_sm90_dkdvdq", "all": ""})
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
        rows.append(row)
        print(row, flush=True)
    write_rows("hopper_bwd5", rows)


if __name__ == "__main__":
    main()
