"""``blocksparse-attn bench``: our kernels beside FlexAttention and SDPA, same run, same GPU.

For each case and backend: median time (``triton.testing.do_bench``, warm-up excluded,
inputs rotated so the L2 cache does not flatter small cases), effective TFLOP/s (computed
blocks for block-sparse backends, the full square for dense SDPA), peak memory, and the
ratio of FlexAttention's time to ours. A backend that cannot run a case gets its reason.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from contextlib import nullcontext

import torch

from .bench_cases import Case, anchor_cases, dense_flops, flops, pattern_layout, quick_cases

BACKENDS = ("fused", "unfused", "flex", "sdpa_cudnn", "sdpa_flash", "sdpa_mask")
MODES = ("fwd", "fwd+bwd")
MASK_LIMIT_BYTES = 4 << 30  # dense boolean masks larger than this are not tried


def environment() -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _inputs(case: Case, dtype, device, sets: int, grad: bool):
    out = []
    for _ in range(sets):
        qkv = [torch.randn(case.batch, case.heads, case.seq_len, case.head_dim, device=device,
                           dtype=dtype, requires_grad=grad) for _ in range(3)]
        out.append(qkv)
    return out


def _attention_fn(backend: str, case: Case, layout: torch.Tensor, device):
    """A function ``(q, k, v) -> out`` for ``backend``, or raise with the reason."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend in ("fused", "unfused"):
        from ..functional import block_sparse_attention

        lay = layout.to(device)
        return lambda q, k, v: block_sparse_attention(q, k, v, lay, block=case.block,
                                                      causal=case.causal, backend=backend)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        from ..flex_block_mask import layout_to_block_mask

        bm = layout_to_block_mask(layout, case.block, causal=case.causal, device=device)
        # a fresh compile per case: past dynamo's recompile limit flex would run eagerly
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: flex(q, k, v, block_mask=bm)
    if backend in ("sdpa_cudnn", "sdpa_flash"):
        kind = SDPBackend.CUDNN_ATTENTION if backend == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION

        def fn(q, k, v):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v)
        return fn
    if backend == "sdpa_mask":
        L = case.seq_len
        if layout.shape[0] * L * L > MASK_LIMIT_BYTES:
            raise RuntimeError(f"dense mask of {layout.shape[0] * L * L / 2**30:.1f} GiB "
                               "exceeds the 4 GiB limit")
        from ..reference import token_mask

        mask = token_mask(layout.to(device), case.block, case.causal).unsqueeze(0)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    raise ValueError(f"bench: backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")


def time_backend(backend: str, case: Case, layout: torch.Tensor, mode: str, dtype,
                 device="cuda") -> dict:
    """Median ms, TFLOP/s and peak memory of one backend on one case (or its failure)."""
    from triton.testing import do_bench

    row = {"backend": backend, "mode": mode, "dtype": str(dtype).replace("torch.", "")}
    try:
        fn = _attention_fn(backend, case, layout, device)
        bytes_per_set = 4 * case.batch * case.heads * case.seq_len * case.head_dim * 2
        sets = max(1, min(4, math.ceil(200e6 / bytes_per_set)))
        grad = mode == "fwd+bwd"
        data = _inputs(case, dtype, device, sets, grad)
        grad_out = torch.randn_like(data[0][0])
        counter = [0]

        def step():
            q, k, v = data[counter[0] % sets]
            counter[0] += 1
            out = fn(q, k, v)
            if grad:
                torch.autograd.grad(out, (q, k, v), grad_out)
            return out

        step()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(step, warmup=25, rep=100, return_mode="median")
        work = dense_flops(case, mode) if backend.startswith("sdpa_") and backend != "sdpa_mask" \
            else flops(case, layout, mode)
        row.update(ms=ms, tflops=work / ms / 1e9, peak_mib=peak / 2**20)
    except Exception as e:  # a backend that cannot run this case: record why
        row.update(ms=None, tflops=None, peak_mib=None,
                   error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        torch.cuda.empty_cache()
    return row


def run(cases: list[Case], backends=BACKENDS, modes=MODES, dtypes=(torch.bfloat16,),
        progress=True) -> dict:
    """Time every (case, dtype, mode, backend); returns ``{"env":..., "results": [...]}``."""
    results = []
    total = len(cases) * len(dtypes) * len(modes)
    n = 0
    for case in cases:
        layout = pattern_layout(case.pattern, case.seq_len, case.block)
        density = float((layout != 0).float().mean())
        for dtype in dtypes:
            for mode in modes:
                n += 1
                rows = [time_backend(b, case, layout, mode, dtype) for b in backends]
                flex = next((r["ms"] for r in rows if r["backend"] == "flex"), None)
                for r in rows:
                    r.update(case.as_dict(), density=density)
                    r["flex_over_this"] = (flex / r["ms"]) if flex and r["ms"] else None
                results.extend(rows)
                if progress:
                    ours = next((r for r in rows if r["backend"] == "fused"), {})
                    msg = f"[{n}/{total}] {case.name} {mode} {rows[0]['dtype']}: " + ", ".join(
                        f"{r['backend']} {r['ms']:.3f} ms" if r["ms"] else f"{r['backend']} -"
                        for r in rows)
                    if ours.get("flex_over_this"):
                        msg += f" | fused vs flex {ours['flex_over_this']:.2f}x"
                    print(msg, file=sys.stderr, flush=True)
    return {"env": environment(), "results": results}


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"{env.get('gpu', 'CPU')}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}. Median ms (do_bench); TF = effective TFLOP/s; "
             "'flex/this' = FlexAttention time over this backend's time.", "",
             "| case | dtype | mode | backend | ms | TF | peak MiB | flex/this |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if r["ms"] is None:
            lines.append(f"| {r['name']} | {r['dtype']} | {r['mode']} | {r['backend']} | "
                         f"{r['error']} | | | |")
            continue
        ratio = f"{r['flex_over_this']:.2f}" if r["flex_over_this"] else ""
        lines.append(f"| {r['name']} | {r['dtype']} | {r['mode']} | {r['backend']} | "
                     f"{r['ms']:.3f} | {r['tflops']:.0f} | {r['peak_mib']:.0f} | {ratio} |")
    return "\n".join(lines)


def bench_main(args) -> int:
    if not torch.cuda.is_available():
        return _cpu_quick(args)
    dtypes = tuple(getattr(torch, d) for d in args.dtype)
    cases = quick_cases() if args.quick else anchor_cases()
    modes = MODES if args.mode == "both" else (args.mode,)
    report = run(cases, tuple(args.backends), modes, dtypes)
    text = markdown(report)
    print(text)
    if args.out:
        import os

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}/bench.json and bench.md", file=sys.stderr)
    return 0


def _cpu_quick(args) -> int:
    from ..functional import block_sparse_attention

    print("No CUDA GPU: GPU figures (fused kernel, FlexAttention, SDPA) need CUDA. "
          "Timing the PyTorch reference backend on a tiny CPU case instead.")
    case = quick_cases()[0]
    layout = pattern_layout(case.pattern, case.seq_len, case.block)
    q, k, v = (torch.randn(case.batch, case.heads, case.seq_len, case.head_dim) for _ in range(3))
    block_sparse_attention(q, k, v, layout, block=case.block, backend="reference")
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        block_sparse_attention(q, k, v, layout, block=case.block, backend="reference")
    ms = (time.perf_counter() - t) / reps * 1e3
    print(f"{case.name}: reference fwd {ms:.2f} ms on CPU "
          f"({flops(case, layout, 'fwd') / ms / 1e9:.3f} effective TFLOP/s)")
    return 0
