"""The benchmark's harness: the environment, the backends as functions of ``(q, k, v)``,
their inputs, and the timing of one backend on one case (median time, effective TFLOP/s,
peak memory, or the reason it cannot run). ``time_backend`` and ``environment`` are looked
up through this module by the suites, so tests replace them in one place."""

from __future__ import annotations

import math
import platform
import time

import torch

from .bench_cases import Case, dense_flops, flops

BACKENDS = (
    "fused",
    "fused_nondet",  # the fused backend with deterministic=False (asked for by name)
    "unfused",
    "flex",
    "fa4",
    "fa4_det",  # FlashAttention-4 with its deterministic backward (asked for by name)
    "sdpa_cudnn",
    "sdpa_flash",
    "sdpa_mask",
)
# grouped-query cases also time our kernel on K/V repeated to the query heads (the repeat
# included), the way to run them without native support
GQA_BACKENDS = ("fused", "fused_repeat", "flex", "sdpa_cudnn", "sdpa_flash")
MODES = ("fwd", "fwd+bwd")
MASK_LIMIT_BYTES = 4 << 30  # dense boolean masks larger than this are not tried


def environment() -> dict:
    from ..kernels.availability import triton_version

    env = {
        "torch": torch.__version__,
        "triton": triton_version() or "not installed",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = f"{platform.machine()}, {torch.get_num_threads()} threads"
    return env


def _inputs(case: Case, dtype, device, sets: int, grad: bool):
    out = []
    for _ in range(sets):
        qkv = [
            torch.randn(
                case.batch,
                heads,
                case.seq_len,
                case.head_dim,
                device=device,
                dtype=dtype,
                requires_grad=grad,
            )
            for heads in (case.heads, case.kv_heads or case.heads, case.kv_heads or case.heads)
        ]
        out.append(qkv)
    return out


def _attention_fn(backend: str, case: Case, layout: torch.Tensor, device):
    """A function ``(q, k, v) -> out`` for ``backend``, or raise with the reason."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = case.heads // (case.kv_heads or case.heads)
    if backend in ("fused", "fused_nondet", "unfused", "reference", "fused_repeat"):
        from ..functional import block_sparse_attention

        if backend == "fused_repeat":

            def fused_repeat(q, k, v):
                k, v = (t.repeat_interleave(group, 1) for t in (k, v))
                return block_sparse_attention(
                    q, k, v, layout, block=case.block, causal=case.causal, backend="fused"
                )

            return fused_repeat
        # a CPU layout, as the patterns make them: each call checks it for edits with a
        # host comparison (a CUDA layout would be compared on the device, waiting for it)
        kw = dict(block=case.block, causal=case.causal, backend=backend)
        if backend == "fused_nondet":
            kw.update(backend="fused", deterministic=False)
        return lambda q, k, v: block_sparse_attention(q, k, v, layout, **kw)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        from ..flex_block_mask import layout_to_block_mask

        bm = layout_to_block_mask(layout, case.block, causal=case.causal, device=device)
        # a fresh compile per case: past dynamo's recompile limit flex would run eagerly
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: flex(q, k, v, block_mask=bm, enable_gqa=group > 1)
    if backend in ("fa4", "fa4_det"):
        return _fa4_fn(case, layout, device, deterministic=backend == "fa4_det")
    if backend in ("sdpa_cudnn", "sdpa_flash"):
        kind = SDPBackend.CUDNN_ATTENTION if backend == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION

        def fn(q, k, v):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)

        return fn
    if backend == "sdpa_mask":
        L = case.seq_len
        if layout.shape[0] * L * L > MASK_LIMIT_BYTES:
            raise RuntimeError(
                f"dense mask of {layout.shape[0] * L * L / 2**30:.1f} GiB exceeds the 4 GiB limit"
            )
        from ..reference import token_mask

        mask = token_mask(layout.to(device), case.block, case.causal).unsqueeze(0)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    raise ValueError(f"bench: backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")


def fa4_attention():
    """FlashAttention-4's ``(flash_attn_func, BlockSparseTensorsTorch)``, or raise with the
    reason it is not importable."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except ImportError as e:
        raise RuntimeError(
            f"flash_attn.cute is not importable ({e}); ../shared/tools/fa4-wheels.sh fetches "
            "FlashAttention-4's wheels"
        ) from None
    return flash_attn_func, BlockSparseTensorsTorch


def fa4_block_sparse(block_mask, causal: bool = False, deterministic: bool = False):
    """``fn(q, k, v) -> out`` running FlashAttention-4's block-sparse kernels (forward and
    backward) on a block-128 FlexAttention ``BlockMask``: its key lists for the forward,
    its query lists for the backward, partial tiles masked by ``causal`` (token-causal,
    FlashAttention's own mask) and full tiles unmasked. ``deterministic``: FlashAttention-4's
    deterministic backward (dQ added by the key tiles in a fixed order, each waiting for
    the one before on a semaphore; the order from its ``compute_dq_write_order``)."""
    flash_attn_func, BlockSparseTensorsTorch = fa4_attention()
    bm, size = block_mask, (128, 128)
    fwd = BlockSparseTensorsTorch(
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, block_size=size
    )
    order = {}
    if deterministic:
        from flash_attn.cute.block_sparsity import compute_dq_write_order_from_block_mask

        partial, full = compute_dq_write_order_from_block_mask(bm, spt=False)
        order = dict(dq_write_order=partial, dq_write_order_full=full, spt=False)
    bwd = BlockSparseTensorsTorch(
        bm.q_num_blocks,
        bm.q_indices,
        bm.full_q_num_blocks,
        bm.full_q_indices,
        block_size=size,
        **order,
    )

    def fn(q, k, v):  # FlashAttention's [B, L, H, D] as views of ours
        out, _ = flash_attn_func(
            *(t.transpose(1, 2) for t in (q, k, v)),
            causal=causal,
            deterministic=deterministic,
            block_sparse_tensors=fwd,
            block_sparse_tensors_bwd=bwd,
        )
        return out.transpose(1, 2)

    return fn


def _fa4_fn(case: Case, layout: torch.Tensor, device, deterministic: bool = False):
    """FlashAttention-4's block-sparse attention on the layout's block-128 lists, forward
    and backward (``deterministic``: its deterministic backward); raise with the reason
    where it cannot run the case."""
    if case.block != 128:
        raise RuntimeError(
            f"FlashAttention-4 block sparsity is run at block 128 (block {case.block})"
        )
    if case.causal:
        raise RuntimeError(
            "token-causal diagonal blocks would need a CuTe mask_mod for FlashAttention-4"
        )
    fa4_attention()
    from ..flex_block_mask import layout_to_block_mask

    # every kept tile is full
    mask = layout_to_block_mask(layout, case.block, device=device)
    return fa4_block_sparse(mask, deterministic=deterministic)


def error_text(e: Exception) -> str:
    """What a row records of a backend or peer that could not run: the exception's type and
    its first line, at most 160 characters."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def gpu_median_ms(fn) -> float:
    """Median ms of ``fn`` by ``triton.testing.do_bench`` (the sections' timer on a GPU)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def graph_ms(step, timer) -> float:
    """``step`` captured in a CUDA graph (after a warm-up on a side stream), its replay
    timed by ``timer``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return timer(graph.replay)


def _median_ms(fn, reps: int = 7) -> float:
    """Median wall time of ``fn`` in ms, for CPU runs (``do_bench`` needs a GPU)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[reps // 2]


def time_backend(
    backend: str, case: Case, layout: torch.Tensor, mode: str, dtype, device="cuda", graph=True
) -> dict:
    """Median ms, TFLOP/s and peak memory of one backend on one case (or its failure). On
    the CPU the median of a few wall-clock runs, and no memory figure.

    On a GPU ``ms`` times eager calls, host work included (where the host takes longer to
    issue a call than the GPU to run it, that is what it measures), and ``graph_ms`` the
    same call captured in a CUDA graph and replayed: the GPU's time alone, what a step
    replayed from a graph (``torch.compile``'s "reduce-overhead") would take. A backend
    that cannot be captured keeps its ``ms`` and records ``graph_error``. ``graph=False``
    leaves the graph out (the longest-sequence search, whose graph would hold a second
    copy of the step's memory)."""
    cuda = torch.device(device).type == "cuda"
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
        if cuda:
            from triton.testing import do_bench

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak_total = torch.cuda.max_memory_allocated() / 2**20
            peak = peak_total - base / 2**20
            ms = do_bench(step, warmup=25, rep=100, return_mode="median")
            if graph:
                try:
                    row["graph_ms"] = graph_ms(
                        step, lambda f: do_bench(f, warmup=25, rep=100, return_mode="median")
                    )
                except Exception as e:  # not capturable: the eager time stands alone
                    row["graph_error"] = error_text(e)
        else:
            peak = peak_total = None
            ms = _median_ms(step)
        work = (
            dense_flops(case, mode)
            if backend.startswith("sdpa_") and backend != "sdpa_mask"
            else flops(case, layout, mode)
        )
        row.update(ms=ms, tflops=work / ms / 1e9, peak_mib=peak, peak_total_mib=peak_total)
    except Exception as e:  # a backend that cannot run this case: record why
        row.update(
            ms=None,
            tflops=None,
            peak_mib=None,
            error=error_text(e),
        )
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row
