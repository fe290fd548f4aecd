"""The benchmark's suites: the case table (anchors, density sweep), the longest length
each backend trains, the index build cost beside FlexAttention's ``create_block_mask``, and
the unfused path's block-sparse products beside dense ``torch.matmul``."""

from __future__ import annotations

import sys
import time

import torch

from . import bench_harness as harness
from .bench_cases import Case
from .bench_harness import BACKENDS, MODES

# the density sweep's comparison (fused_nondet and fa4_det where asked for)
DENSITY_BACKENDS = ("fused", "fused_nondet", "flex", "fa4", "fa4_det", "sdpa_cudnn")


def _ratios(rows: list[dict], r: dict, key: str) -> None:
    """``r``'s FlexAttention and FlashAttention-4 ratios by ``key`` (``ms``: eager calls,
    ``graph_ms``: replayed from a CUDA graph): their time over ``r``'s, ``None`` where
    either is missing."""
    suffix = "" if key == "ms" else "_graph"
    for peer in ("flex", "fa4"):
        theirs = next((x.get(key) for x in rows if x["backend"] == peer), None)
        ours = r.get(key)
        r[f"{peer}_over_this{suffix}"] = theirs / ours if theirs and ours else None


def run(
    cases: list[Case],
    backends=BACKENDS,
    modes=MODES,
    dtypes=(torch.bfloat16,),
    progress=True,
    on_step=None,
    device="cuda",
) -> dict:
    """Time every (case, dtype, mode, backend) on ``device``; returns ``{"env":...,
    "results": [...]}``. ``on_step(rows)`` receives each (case, dtype, mode)'s rows as soon
    as they are timed."""
    results = []
    start = time.perf_counter()
    total = len(cases) * len(dtypes) * len(modes)
    n = 0
    for case in cases:
        layout = case.layout()
        density = float((layout != 0).float().mean())
        for dtype in dtypes:
            for mode in modes:
                n += 1
                rows = [
                    harness.time_backend(b, case, layout, mode, dtype, device) for b in backends
                ]
                for r in rows:
                    r.update(case.as_dict(), density=density)
                    for key in ("ms", "graph_ms"):
                        _ratios(rows, r, key)
                results.extend(rows)
                if on_step is not None:
                    on_step(rows)
                if progress:
                    ours = next((r for r in rows if r["backend"] == "fused"), {})
                    elapsed = time.perf_counter() - start
                    msg = (
                        f"[{n}/{total} {elapsed:.0f}s] {case.name} {mode} {rows[0]['dtype']}: "
                        + ", ".join(
                            f"{r['backend']} {r['ms']:.3f} ms"
                            + (f" ({r['graph_ms']:.3f} graph)" if r.get("graph_ms") else "")
                            if r["ms"]
                            else f"{r['backend']} -"
                            for r in rows
                        )
                    )
                    if ours.get("flex_over_this"):
                        msg += f" | fused vs flex {ours['flex_over_this']:.2f}x"
                    if ours.get("fa4_over_this"):
                        msg += f", vs fa4 {ours['fa4_over_this']:.2f}x"
                    print(msg, file=sys.stderr, flush=True)
    return {"env": harness.environment(), "results": results}


def max_length_search(
    backends=("fused", "flex", "sdpa_cudnn"),
    start: int = 65536,
    stop: int = 1 << 22,
    time_limit_ms: float = 2000.0,
    progress: bool = True,
) -> list[dict]:
    """Per backend, forward+backward at doubling lengths (window_global, B1 H16 D64,
    block 128, bf16) until it fails or needs more than 80% of the GPU's memory. A backend
    whose step takes longer than ``time_limit_ms`` (dense attention is quadratic in L) stops
    there too, with that reason, so the suite keeps its time budget."""
    limit = 0.8 * torch.cuda.get_device_properties(0).total_memory / 2**20
    rows = []
    for backend in backends:
        L = start
        while L <= stop:
            case = Case("window_global", L, 1, 16, 64, 128)
            row = harness.time_backend(
                backend, case, case.layout(), "fwd+bwd", torch.bfloat16, graph=False
            )
            row.update(case.as_dict(), suite="max_length")
            row["fits"] = row["ms"] is not None and row["peak_total_mib"] <= limit
            if row["fits"] and row["ms"] > time_limit_ms:
                row["stop"] = f"step > {time_limit_ms / 1e3:g} s"
            rows.append(row)
            if progress:
                state = (
                    f"{row['ms']:.2f} ms, {row['peak_total_mib']:,.0f} MiB"
                    if row["ms"]
                    else row["error"]
                )
                print(f"[max length] {backend} L={L:,}: {state}", file=sys.stderr, flush=True)
            if not row["fits"] or "stop" in row:
                break
            L *= 2
    return rows


def index_cost(
    lengths=(4096, 16384, 65536, 262144), heads: int = 16, block: int = 64, progress: bool = True
) -> list[dict]:
    """Median ms to compile a window_global layout (one per head) into our index, beside
    FlexAttention's ``create_block_mask`` (compiled) for the same pattern, both timed by
    ``do_bench`` (median of many calls, after a first call that compiles)."""
    from triton.testing import do_bench

    from ..index import build_index
    from ..kernels.configs import forward_tiles

    rows = []
    for L in lengths:
        layout = Case("window_global", L, 1, heads, 64, block).layout().expand(heads, -1, -1)
        layout = layout.contiguous().cuda()
        tiles = forward_tiles(64, block, 0.0)
        ours = do_bench(
            lambda: build_index(layout, block, tile_m=tiles.m, tile_n=tiles.n),
            warmup=5,
            rep=50,
            return_mode="median",
        )
        row = {
            "suite": "index_cost",
            "seq_len": L,
            "heads": heads,
            "block": block,
            "ours_ms": ours,
            "flex_ms": None,
        }
        try:
            from torch.nn.attention.flex_attention import create_block_mask

            grid = layout[0]

            def mask_mod(b, h, q, k):
                return grid[q // block, k // block]

            make = torch.compile(create_block_mask)
            make(mask_mod, 1, heads, L, L, device="cuda")  # compile outside the timing
            row["flex_ms"] = do_bench(  # timed as ours is: the median of many calls
                lambda: make(mask_mod, 1, heads, L, L, device="cuda"),
                warmup=5,
                rep=50,
                return_mode="median",
            )
        except Exception as e:  # record why FlexAttention could not build it
            row["flex_error"] = harness.error_text(e)
        finally:
            torch.cuda.empty_cache()
        rows.append(row)
        if progress:
            flex = f"{row['flex_ms']:.2f} ms" if row["flex_ms"] is not None else row["flex_error"]
            print(f"[index] L={L:,}: ours {ours:.3f} ms, flex {flex}", file=sys.stderr, flush=True)
    return rows


def matmul_throughput(
    blocks=(64, 128),
    seq_len: int = 8192,
    batch: int = 2,
    heads: int = 8,
    head_dim: int = 128,
    density: float = 0.1,
    dtype=torch.bfloat16,
    device="cuda",
    progress: bool = True,
) -> list[dict]:
    """The three block-sparse products of the unfused path on a random layout, each beside
    ``torch.matmul`` on the dense product of the same shapes: TFLOP/s per computed block
    against dense TFLOP/s. ``sdd`` is ``Q K^T`` ([L, D] x [D, L]), ``dsd`` is ``P V``
    ([L, L] x [L, D]), ``dds`` is ``A P`` ([D, L] x [L, L])."""
    from triton.testing import do_bench

    from ..ops.matmul import MatMul

    rows = []
    for block in blocks:
        case = Case("random", seq_len, batch, heads, head_dim, block, density=density)
        layout = case.layout().expand(heads, -1, -1).contiguous()
        nnz = int(layout.sum())
        q, k, at = (
            torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype)
            for _ in range(3)
        )
        a = at.transpose(-1, -2).contiguous()  # [Z, H, D, L]
        sdd = MatMul(layout, block, "sdd", trans_b=True)
        p = sdd(q, k)
        products = {
            "sdd": (sdd, q, k),
            "dsd": (MatMul(layout, block, "dsd"), p, k),
            "dds": (MatMul(layout, block, "dds"), a, p),
        }
        dense_p = torch.randn(batch, heads, seq_len, seq_len, device=device, dtype=dtype)
        dense = {"sdd": (q, k.transpose(-1, -2)), "dsd": (dense_p, k), "dds": (a, dense_p)}
        work = 2.0 * batch * nnz * block * block * head_dim
        dense_work = 2.0 * batch * heads * seq_len * seq_len * head_dim
        for mode, (op, x, y) in products.items():
            ms = do_bench(lambda: op(x, y), warmup=25, rep=100, return_mode="median")
            dx, dy = dense[mode]
            dense_ms = do_bench(
                lambda: torch.matmul(dx, dy), warmup=25, rep=100, return_mode="median"
            )
            row = {
                "suite": "matmul",
                "op": mode,
                "seq_len": seq_len,
                "batch": batch,
                "heads": heads,
                "head_dim": head_dim,
                "block": block,
                "density": nnz / layout.numel(),
                "dtype": str(dtype).replace("torch.", ""),
                "ms": ms,
                "tflops": work / ms / 1e9,
                "dense_ms": dense_ms,
                "dense_tflops": dense_work / dense_ms / 1e9,
            }
            row["of_dense"] = row["tflops"] / row["dense_tflops"]
            rows.append(row)
            if progress:
                print(
                    f"[matmul] {mode} block {block}: {ms:.3f} ms, {row['tflops']:.0f} TF "
                    f"= {row['of_dense']:.0%} of dense torch.matmul ({row['dense_tflops']:.0f} "
                    "TF)",
                    file=sys.stderr,
                    flush=True,
                )
        del dense_p, p
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _fa4_selection_step(select, leaves, grad_out, seq_len: int, timer) -> dict:
    """FlashAttention-4's block-sparse kernels given the same selection each step, the way
    its user feeds one: the lists as a FlexAttention ``BlockMask`` (diagonal tiles partial
    under FlashAttention's causal mask, the others full; its query lists for the
    backward). The step's time and the largest output difference from ours on one
    selection; or why it could not run."""
    from ..functional import block_sparse_attention

    def fa4(lists):
        return harness.fa4_block_sparse(_flex_selection_mask(lists, 128, seq_len), causal=True)

    def fa4_step():
        return torch.autograd.grad(fa4(select())(*leaves), leaves, grad_out)

    try:
        lists = select()
        with torch.no_grad():
            mine = block_sparse_attention(*leaves, lists, block=128, causal=True)
            diff = float((fa4(lists)(*leaves).float() - mine.float()).abs().max())
        fa4_step()
        return {"fa4_step_ms": timer(fa4_step), "fa4_max_diff": diff}
    except Exception as e:  # record why FlashAttention-4 could not run it
        return {"fa4_error": harness.error_text(e)}


def _flex_selection_mask(lists, block: int, seq_len: int):
    """A FlexAttention ``BlockMask`` holding a top-k selection, the way a FlexAttention user
    feeds one each step: at block 128 the lists directly (``BlockMask.from_kv_blocks``, the
    diagonal blocks partial under a causal ``mask_mod``, the others full); at smaller
    blocks the selection coarsened to Flex's 128-token tiles with a ``mask_mod`` reading the
    fine grid (:meth:`KVBlocks.to_block_mask`, which reads the lists on the host)."""
    from torch.nn.attention.flex_attention import BlockMask

    if block != 128:
        return lists.to_block_mask(block, k_len=seq_len, causal=True)
    from ..kv_blocks import KVBlocks

    n, idx = lists.num_blocks, lists.indices
    used = torch.arange(idx.shape[-1], device=idx.device) < n[..., None]
    row = torch.arange(idx.shape[-2], device=idx.device)[:, None]
    diag = used & (idx == row)
    partial, full = KVBlocks.from_entries(diag, idx), KVBlocks.from_entries(used & ~diag, idx)
    # from_kv_blocks takes the width of its index tensors for the number of key blocks (it
    # builds the transposed lists from a dense grid that wide): pad them to nb_k
    widen = (0, seq_len // block - idx.shape[-1])

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return BlockMask.from_kv_blocks(
        partial.num_blocks,
        torch.nn.functional.pad(partial.indices, widen),
        full.num_blocks,
        torch.nn.functional.pad(full.indices, widen),
        BLOCK_SIZE=128,
        mask_mod=causal,
        seq_lengths=(seq_len, seq_len),
    )


def dynamic_step(
    blocks=(64, 128),
    seq_len: int = 32768,
    heads: int = 16,
    head_dim: int = 128,
    topk: int = 16,
    dtype=torch.bfloat16,
    device="cuda",
    progress: bool = True,
    timer=None,
) -> list[dict]:
    """A training step whose layout is chosen each call: ``topk_blocks`` (causal, the
    diagonal kept) then fused attention forward+backward on the lists (B1, causal). Times
    the eager step, the step replayed from a CUDA graph, the selection, the index build
    (every tile shape the step compiles, the Hopper backward's too where it runs, eager and
    in a graph), and FlexAttention given the
    same selection (its ``BlockMask`` made each step, see ``_flex_selection_mask``).
    Then the same attention with a layout per sample (B2) beside one shared layout of the
    same density. ``timer(fn) -> ms`` defaults to ``do_bench``'s median."""
    from ..functional import block_sparse_attention
    from ..index_dynamic import build_block_list_index
    from ..kernels.configs import backward_tiles
    from ..kernels.fused_bwd import sm90_backward_plan
    from ..kernels.fused_fwd import step_forward_tiles
    from ..kv_blocks import KVBlocks
    from ..selection import topk_blocks

    timer = timer or harness.gpu_median_ms
    cuda = torch.device(device).type == "cuda"

    def one(block: int) -> dict:  # its tensors go when it returns
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad_out = (
            torch.randn(1, heads, seq_len, head_dim, device=device, generator=g).to(dtype)
            for _ in range(4)
        )
        leaves = [t.requires_grad_() for t in (q, k, v)]

        def select():
            return topk_blocks(q, k, block=block, topk=topk, causal=True, keep_diagonal=True)

        def attend(lists, batch=(q, k, v), out_grad=grad_out):
            out = block_sparse_attention(*batch, lists, block=block, causal=True)
            return torch.autograd.grad(out, batch, out_grad)

        def step():
            return attend(select())

        lists = select()
        density = topk / (seq_len // block)
        size = q.element_size()
        fwd = step_forward_tiles(q, k, v, lists, block, density, masked=False)
        shapes = {(fwd.m, fwd.n)}
        if sm90_backward_plan(q, k, v, grad_out, lists, block=block, causal=True):
            shapes.add((128, 128))  # the Hopper backward's index
        else:
            shapes |= {(t.m, t.n) for t in backward_tiles(head_dim, block, density, size, True)}

        def index():
            for m, n in sorted(shapes):
                build_block_list_index(
                    lists, block, q_len=seq_len, k_len=seq_len, tile_m=m, tile_n=n, causal=True
                )

        step()  # compile and tune outside the timing
        row = {
            "suite": "dynamic",
            "block": block,
            "seq_len": seq_len,
            "heads": heads,
            "head_dim": head_dim,
            "topk": topk,
            "dtype": str(dtype).replace("torch.", ""),
            "step_ms": timer(step),
            "select_ms": timer(select),
            "index_ms": timer(index),
            "index_tiles": sorted(shapes),
        }
        # the same blocks as a dense layout, its index compiled once and cached: the kernels
        dense = lists.to_layout(seq_len // block)[0]
        row["attention_cached_index_ms"] = timer(lambda: attend(dense))
        if cuda:
            row["step_graph_ms"] = harness.graph_ms(step, timer)
            row["index_graph_ms"] = harness.graph_ms(index, timer)
            row["index_share"] = row["index_graph_ms"] / row["step_graph_ms"]
            try:
                from torch.nn.attention.flex_attention import flex_attention

                torch._dynamo.reset()
                flex = torch.compile(flex_attention, dynamic=False)

                def flex_step():
                    mask = _flex_selection_mask(select(), block, seq_len)
                    out = flex(q, k, v, block_mask=mask)
                    return torch.autograd.grad(out, leaves, grad_out)

                flex_step()
                row["flex_step_ms"] = timer(flex_step)
                row["flex_over_ours"] = row["flex_step_ms"] / row["step_ms"]
            except Exception as e:  # record why FlexAttention could not run it
                row["flex_error"] = harness.error_text(e)
            if block == 128:
                row.update(_fa4_selection_step(select, leaves, grad_out, seq_len, timer))
                if "fa4_step_ms" in row:
                    row["fa4_over_ours"] = row["fa4_step_ms"] / row["step_ms"]
        # a layout per sample against one shared layout of the same density (B2)
        g2 = torch.Generator(device=device).manual_seed(1)
        q2, k2, v2, go2 = (
            torch.randn(2, heads, seq_len, head_dim, device=device, generator=g2).to(dtype)
            for _ in range(4)
        )
        batch = tuple(t.requires_grad_() for t in (q2, k2, v2))
        per_sample = topk_blocks(q2, k2, block=block, topk=topk, causal=True, keep_diagonal=True)
        shared = KVBlocks(per_sample.num_blocks[:1], per_sample.indices[:1], trusted=True)
        attend(per_sample, batch, go2)
        attend(shared, batch, go2)
        row["per_sample_ms"] = timer(lambda: attend(per_sample, batch, go2))
        row["shared_ms"] = timer(lambda: attend(shared, batch, go2))
        row["per_sample_over_shared"] = row["per_sample_ms"] / row["shared_ms"]
        return row

    rows = []
    for block in blocks:
        row = one(block)
        rows.append(row)
        if progress:
            print(
                f"[dynamic] block {block}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)),
                file=sys.stderr,
                flush=True,
            )
        if cuda:
            torch.cuda.empty_cache()
    return rows
