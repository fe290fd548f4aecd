"""Context parallelism over gloo (CPU processes): each strategy's output, log-sum-exp and
gradient shards, in both shard orders, equal the single-process result, for window+global,
BigBird, causal fixed, random and per-sample layouts with grouped K/V heads, a key padding
mask and rpe; shards round-trip; the balanced order evens causal work; and every rank
raises, none hangs, on bad input."""

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksparse_attn import (
    BigBirdSparsityConfig,
    FixedSparsityConfig,
    block_sparse_attention,
    reference_attention,
)
from blocksparse_attn.distributed import (
    context_parallel_attention,
    shard_positions,
    shard_sequence,
    shard_work,
    unshard_sequence,
)

from helpers import EXPLORE, ON_GPU, examples

STRATEGIES, ORDERS = ("all_to_all", "kv_exchange"), ("contiguous", "balanced")

B, H, HKV, L, D, BLOCK = 2, 8, 4, 256, 8, 16

kernels_in_cpu_processes = pytest.mark.skipif(
    not dist.is_available() or ON_GPU,
    reason="CPU processes over gloo: the Triton kernels take CPU tensors only under Triton's "
    "interpreter, which is off on a GPU machine (the NCCL tests run there)",
)


def window_global(nb: int) -> torch.Tensor:
    """A bool ``[nb, nb]`` layout: a window of one block each side, block 0 global."""
    window = torch.ones(nb, nb, dtype=torch.bool).triu(-1).tril(1)
    window[:, :1] = window[:1, :] = True
    return window


def layouts():
    nb = L // BLOCK
    window = window_global(nb)
    g = torch.Generator().manual_seed(5)
    random = torch.rand(HKV, nb, nb, generator=g) < 0.2
    per_sample = torch.rand(B, HKV, nb, nb, generator=g) < 0.03
    per_sample[0, 0, nb // 2 + 1] = True  # a global row in one sample and head
    per_sample[1, :, :, 3] = True  # a global column in the other sample
    return {
        "window_global": (window.long(), False),
        "bigbird": (BigBirdSparsityConfig(H, BLOCK, seed=3).make_layout(L), False),
        "causal_fixed": (
            FixedSparsityConfig(
                1, BLOCK, num_local_blocks=4, attention="unidirectional"
            ).make_layout(L),
            True,
        ),
        "random": (random.long(), True),
        "per_sample": (per_sample.long(), False),
    }


def _join(rank, P, init_file, gpu=False):
    """Join the ``P``-process group through ``init_file``: gloo on CPU, or NCCL with one GPU
    per rank."""
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if gpu else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=P
    )


def assert_shards_equal(got, want, tol, label):
    """This rank's output, log-sum-exp and gradient shards (as many as ``got`` holds, in the
    order out, lse, dq, dk, dv, drpe) equal the single-process ones within ``tol``; a
    log-sum-exp is -inf at the same rows."""
    for what, a, e in zip(("out", "lse", "dq", "dk", "dv", "drpe"), got, want):
        ok = torch.allclose(a, e, atol=tol) or (
            what == "lse"
            and torch.equal(torch.isinf(a), torch.isinf(e))
            and torch.allclose(a[a.isfinite()], e[e.isfinite()], atol=tol)
        )
        assert ok, f"{label} {what}: {(a - e).abs().max()}"


def _exact(rank, P, init_file, gpu=False):
    """Every strategy against one process's result: fp64 on the reference backend over
    gloo, or fp32 on the fused kernels over NCCL (one GPU per rank)."""
    _join(rank, P, init_file, gpu)
    dtype, dev = (torch.float32, "cuda") if gpu else (torch.float64, "cpu")
    tol = 2e-4 if gpu else 1e-9
    try:
        torch.manual_seed(0)
        q = torch.randn(B, H, L, D, dtype=dtype).to(dev)
        k, v = (torch.randn(B, HKV, L, D, dtype=dtype).to(dev) for _ in range(2))
        kpm = torch.zeros(B, L, dtype=dtype).to(dev)
        kpm[1, -7:] = -math.inf
        rpe = 0.1 * torch.randn(1, H, L, L, dtype=dtype).to(dev)
        grad_out = torch.randn(B, H, L, D, dtype=dtype).to(dev)
        for name, (layout, causal) in layouts().items():
            leaves = [t.clone().requires_grad_() for t in (q, k, v, rpe)]
            kw = dict(block=BLOCK, causal=causal, backend="fused" if gpu else "reference")
            out, lse = block_sparse_attention(
                *leaves[:3], layout, key_padding_mask=kpm, rpe=leaves[3], return_lse=True, **kw
            )
            full = (out, lse, *torch.autograd.grad(out, leaves, grad_out))
            for strategy, order in itertools.product(STRATEGIES, ORDERS):
                shards = [shard_sequence(t, order=order).requires_grad_() for t in (q, k, v)]
                rows = shard_positions(L, P, rank, order).to(dev)  # my query rows of rpe
                rpe_rows = rpe[:, :, rows].clone().requires_grad_()
                out, lse = context_parallel_attention(
                    *shards,
                    layout,
                    strategy=strategy,
                    order=order,
                    key_padding_mask=shard_sequence(kpm, dim=1, order=order),
                    rpe=rpe_rows,
                    return_lse=True,
                    **kw,
                )
                grads = torch.autograd.grad(
                    out, [*shards, rpe_rows], shard_sequence(grad_out, order=order)
                )
                mine = (
                    *(shard_sequence(t, order=order) for t in full[:5]),
                    full[5][:, :, rows],
                )
                got = (out, lse, *grads)
                assert_shards_equal(got, mine, tol, f"{name} {strategy} {order} rank {rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("P", [2, 4])
def test_strategies_equal_one_process(tmp_path, P):
    mp.spawn(_exact, args=(P, str(tmp_path / "rendezvous")), nprocs=P, join=True)


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= 2),
    reason="needs two CUDA GPUs and NCCL",
)
def test_strategies_on_two_gpus_with_nccl(tmp_path):
    mp.spawn(_exact, args=(2, str(tmp_path / "rendezvous"), True), nprocs=2, join=True)


def _unfused(rank, P, init_file, gpu=False):
    """``kv_exchange`` on the unfused operators (no log-sum-exp: all keys in one call): CPU
    tensors over gloo (the kernels under Triton's interpreter), or one GPU per rank over NCCL."""
    _join(rank, P, init_file, gpu)
    try:
        torch.manual_seed(0)
        dev = "cuda" if gpu else "cpu"
        q, k, v = (torch.randn(1, 2, 128, 16).to(dev) for _ in range(3))
        layout = torch.ones(8, 8, dtype=torch.long).tril()
        kw = dict(block=16, causal=True, backend="unfused")
        full = block_sparse_attention(q, k, v, layout, **kw)
        for order in ORDERS:
            shards = [shard_sequence(t, order=order) for t in (q, k, v)]
            got = context_parallel_attention(
                *shards, layout, strategy="kv_exchange", order=order, **kw
            )
            want = shard_sequence(full, order=order)
            # fp32 products on the GPU may round through tf32
            tol = 1e-3 if gpu else 1e-5
            assert torch.allclose(got, want, atol=tol), (order, (got - want).abs().max())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@kernels_in_cpu_processes
def test_key_exchange_on_the_unfused_backend(tmp_path):
    mp.spawn(_unfused, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= 2),
    reason="needs two CUDA GPUs and NCCL",
)
def test_key_exchange_on_the_unfused_backend_with_nccl(tmp_path):
    mp.spawn(_unfused, args=(2, str(tmp_path / "rendezvous"), True), nprocs=2, join=True)


def _visits_on_the_kernels(rank, P, init_file):
    """``kv_exchange`` on the fused kernels (Triton's interpreter, fp32) with query blocks
    that visit the ranks holding their keys: a global row (non-causal) and a last row that
    attends every block before it (causal), a key padding mask; output, log-sum-exp and
    gradients equal one process's."""
    _join(rank, P, init_file)
    try:
        torch.manual_seed(0)
        b, h, hkv, n, d, block = 1, 4, 2, 128, 16, 16
        nb = n // block
        q = torch.randn(b, h, n, d)
        k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
        kpm = torch.zeros(b, n)
        kpm[0, 37:41] = -math.inf
        grad_out = torch.randn(b, h, n, d)
        window = window_global(nb)
        causal = torch.ones(nb, nb, dtype=torch.bool).tril().triu(-1)
        causal[-1] = True
        for layout, is_causal in ((window.long(), False), (causal.long(), True)):
            kw = dict(block=block, causal=is_causal, backend="fused", key_padding_mask=kpm)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out, lse = block_sparse_attention(*leaves, layout, return_lse=True, **kw)
            want = (out, lse, *torch.autograd.grad(out, leaves, grad_out))
            shards = [shard_sequence(t).requires_grad_() for t in (q, k, v)]
            kw["key_padding_mask"] = shard_sequence(kpm, dim=1)
            out, lse = context_parallel_attention(
                *shards, layout, strategy="kv_exchange", return_lse=True, **kw
            )
            got = (out, lse, *torch.autograd.grad(out, shards, shard_sequence(grad_out)))
            for what, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want):
                e = shard_sequence(e, dim=2)
                assert torch.allclose(a, e, atol=1e-5), (is_causal, what, (a - e).abs().max())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@kernels_in_cpu_processes
def test_visiting_rows_on_the_fused_kernels(tmp_path):
    mp.spawn(_visits_on_the_kernels, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def test_global_rows_visit_instead_of_fetching_every_key():
    """Under ``kv_exchange`` a global query row visits the ranks holding its keys, so the
    keys fetched are the window's edges and the global column, the same at every ``L``;
    without the log-sum-exp (``can_visit=False``, the unfused backend) the rank holding the
    global row fetches every other shard. Rows that share their fetched blocks (a dense or
    causal layout) fetch."""
    from blocksparse_attn.distributed import _bytes_kv_exchange, _key_plan

    for nb, P in ((16, 2), (64, 2), (64, 4)):
        window = window_global(nb)[None, None]
        own = [shard_positions(nb, P, r) for r in range(P)]
        plan = _key_plan(window, own, False, H, HKV, True)
        assert plan.wide[0].tolist() == [0] and all(len(w) == 0 for w in plan.wide[1:])
        assert [b.tolist() for b in plan.visits[0]] == [[]] + [[0]] * (P - 1)
        per = nb // P
        assert plan.needed[0].tolist() == [per]  # the next shard's first block
        for r in range(1, P):  # the global column and the neighbours' edges
            edges = [r * per - 1] + ([(r + 1) * per] if r < P - 1 else [])
            assert plan.needed[r].tolist() == sorted({0, *edges})
        fetching = _key_plan(window, own, False, H, HKV, False)
        assert len(fetching.needed[0]) == nb - per and not fetching.visiting
        args = (BLOCK, B, H, HKV, D, P)
        assert _bytes_kv_exchange(plan, *args) < _bytes_kv_exchange(fetching, *args)
        # a dense or causal layout's rows share every fetched block: they fetch
        dense = torch.ones(1, 1, nb, nb, dtype=torch.bool)
        for causal in (False, True):
            assert not _key_plan(dense, own, causal, H, HKV, True).visiting


def _module(rank, P, init_file):
    _join(rank, P, init_file)
    try:
        from blocksparse_attn import SparseSelfAttention

        config = FixedSparsityConfig(H, BLOCK, num_local_blocks=4, attention="unidirectional")
        whole = SparseSelfAttention(config, max_seq_length=L, backend="reference")
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
        kpm = torch.zeros(B, L, dtype=torch.float64)
        kpm[0, -3:] = -math.inf
        for order in ORDERS:
            sharded = SparseSelfAttention(
                config,
                max_seq_length=L,
                backend="reference",
                context_parallel_group=dist.group.WORLD,
                context_parallel_strategy="kv_exchange",
                context_parallel_order=order,
            )
            want = shard_sequence(whole(q, k, v, key_padding_mask=kpm), order=order)
            got = sharded(
                *(shard_sequence(t, order=order) for t in (q, k, v)),
                key_padding_mask=shard_sequence(kpm, dim=1, order=order),
            )
            assert torch.allclose(got, want, atol=1e-9), (order, (got - want).abs().max())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_module_with_a_context_parallel_group(tmp_path):
    mp.spawn(_module, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def _bad(rank, P, init_file, errors):
    _join(rank, P, init_file)
    try:
        layout = torch.ones(L // BLOCK, L // BLOCK, dtype=torch.long)
        S = L // P if rank == 0 else L // P - BLOCK  # rank 1's shard is a block short
        q = torch.randn(1, H, S, D)
        try:
            context_parallel_attention(q, q[:, :HKV], q[:, :HKV], layout, block=BLOCK)
        except (ValueError, RuntimeError) as e:
            errors[rank] = str(e)
        q = torch.randn(1, H, L // P, D)
        bad_layout = layout.float() if rank == 1 else layout  # a float layout on rank 1
        try:
            context_parallel_attention(q, q, q, bad_layout, block=BLOCK)
        except (ValueError, RuntimeError) as e:
            errors[rank + P] = str(e)
        try:  # 3 heads over 2 ranks
            context_parallel_attention(
                q[:, :3], q[:, :3], q[:, :3], layout, block=BLOCK, strategy="all_to_all"
            )
        except ValueError as e:
            errors[rank + 2 * P] = str(e)
        try:  # rank 1 says balanced, rank 0 contiguous
            order = "balanced" if rank == 1 else "contiguous"
            context_parallel_attention(q, q, q, layout, block=BLOCK, order=order)
        except (ValueError, RuntimeError) as e:
            errors[rank + 3 * P] = str(e)
        try:  # rank 1 says causal, rank 0 not: their exchanges would differ
            context_parallel_attention(q, q, q, layout, block=BLOCK, causal=rank == 1)
        except (ValueError, RuntimeError) as e:
            errors[rank + 5 * P] = str(e)
        try:  # balanced halves of a shard are not whole blocks: 64 rows of block 128
            coarse = torch.ones(2, 2, dtype=torch.long)
            context_parallel_attention(q, q, q, coarse, block=128, order="balanced")
        except ValueError as e:
            errors[rank + 4 * P] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_bad_input_raises_on_every_rank(tmp_path):
    errors = mp.Manager().dict()
    mp.spawn(_bad, args=(2, str(tmp_path / "rendezvous"), errors), nprocs=2, join=True)
    assert "shards of one shape" in errors[0] and "shards of one shape" in errors[1]
    assert "must be an integer or bool tensor" in errors[3]  # the rank with the float layout
    assert "rank(s) [1] refused their inputs" in errors[2]
    assert all("'kv_exchange' or 'auto' when H (3)" in errors[i] for i in (4, 5))
    assert all("the same shard order on every rank" in errors[i] for i in (6, 7))
    assert all("balanced shards of whole blocks" in errors[i] for i in (8, 9))
    assert all("the same block, causal, strategy" in errors[i] for i in (10, 11))


def test_unknown_shard_order_is_an_error():
    with pytest.raises(ValueError, match="order must be 'contiguous' or 'balanced'.*'zigzag'"):
        shard_positions(8, 2, 0, "zigzag")
    with pytest.raises(ValueError, match="shard_work: order"):
        shard_work(torch.ones(4, 4, dtype=torch.long), 2, "zigzag")


def test_not_initialised_is_an_error():
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        context_parallel_attention(q, q, q, torch.ones(2, 2, dtype=torch.long), block=16)


def _round_trip(rank, P, init_file):
    _join(rank, P, init_file)
    try:
        x = torch.arange(2 * 48, dtype=torch.float64).view(2, 48).requires_grad_()
        for order in ORDERS:
            mine = shard_sequence(x, dim=1, order=order)
            assert torch.equal(mine, x[:, shard_positions(48, P, rank, order)])
            whole = unshard_sequence(mine, dim=1, order=order)
            assert torch.equal(whole, x)
            (g,) = torch.autograd.grad(whole.sum(), x)  # every rank's sum reaches each shard
            want = torch.zeros_like(x)
            want[:, shard_positions(48, P, rank, order)] = P
            assert torch.equal(g, want), order
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_shard_orders_round_trip(tmp_path):
    mp.spawn(_round_trip, args=(3, str(tmp_path / "rendezvous")), nprocs=3, join=True)


def test_balanced_order_evens_causal_work():
    # rank r of P holds chunks r and 2P - 1 - r of 2P: (chunk 0 + chunk 3) and (1 + 2)
    assert shard_positions(8, 2, 0, "balanced").tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 2, 1, "balanced").tolist() == [2, 3, 4, 5]
    dense = torch.ones(32, 32, dtype=torch.long)
    total = 32 * 33 // 2
    contiguous = shard_work(dense, 2, "contiguous", causal=True)
    assert contiguous == [16 * 17 // 2, total - 16 * 17 // 2]  # about 1 : 3
    assert shard_work(dense, 2, "balanced", causal=True) == [total // 2] * 2
    four = shard_work(dense, 4, "balanced", causal=True)
    assert max(four) - min(four) == 0
    assert sum(shard_work(dense, 4, "contiguous")) == 32 * 32  # without causal, every block


def test_key_blocks_in_one_run_are_a_view():
    """``kv_exchange`` takes the key blocks a rank attends as a view of its gathered keys
    when they form one ascending run, and gathers them otherwise; both equal the gather."""
    from blocksparse_attn.distributed import _take_blocks

    k, v = torch.randn(2, 3, 6 * 4, 5), torch.randn(2, 3, 6 * 4, 5)

    def gathered(t, at):
        token = (at[:, None] * 4 + torch.arange(4)).flatten()
        return t.index_select(2, token)

    for at, view in ((torch.tensor([1, 2, 3]), True), (torch.tensor([0, 2, 5]), False)):
        kt, vt = _take_blocks(k, v, at, 4)
        assert torch.equal(kt, gathered(k, at)) and torch.equal(vt, gathered(v, at))
        assert (kt.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()) == view


@settings(max_examples=examples(25), deadline=None, derandomize=not EXPLORE, database=None)
@given(data=st.data())
def test_partials_merged_by_log_sum_exp_equal_the_whole(data):
    """What a visiting row's owner does (``distributed._merge``): its own partial result
    over its keys merged with partials over the other ranks' keys (a group of key blocks
    each, empty ones among them) equals attention over all keys, in output, log-sum-exp and
    gradients (fp64, any layout: rows that see no key anywhere stay 0 and -inf, NaN-free)."""
    from blocksparse_attn.distributed import _merge

    nb, block, groups = data.draw(st.integers(2, 6)), 4, data.draw(st.integers(2, 4))
    b, h, d, n = data.draw(st.integers(1, 2)), 2, 4, nb * 4
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    density = data.draw(st.sampled_from((0.2, 0.5, 0.9)))
    layout = (torch.rand(h, nb, nb, generator=g) < density).long()
    group = torch.randint(0, groups, (nb,), generator=g)  # the rank holding each key block
    wide = torch.rand(nb, generator=g) < 0.5  # the query blocks that visit
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    grad_out, grad_lse = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, generator=g)

    def loss(out, lse):  # the log-sum-exp's gradient too, where it is finite
        finite = lse.isfinite()
        return (out * grad_out).sum() + torch.where(finite, lse * grad_lse, 0).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, layout, block=block, return_lse=True)
    want = (out, lse, *torch.autograd.grad(loss(out, lse), leaves))

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    own = layout.clone()
    own[:, wide] *= (group == 0).long()  # visiting rows attend only the keys of group 0 here
    out, lse = reference_attention(*leaves, own, block=block, return_lse=True)
    rows = (wide.nonzero().flatten()[:, None] * block + torch.arange(block)).flatten()
    parts = []  # the visiting rows against each other group's keys
    for other in range(1, groups if len(rows) else 1):
        part = layout[:, wide] * (group == other).long()
        visit = leaves[0].index_select(2, rows)
        parts.append(reference_attention(visit, *leaves[1:], part, block=block, return_lse=True))
    part_rows = rows.repeat(groups - 1)
    part_out = torch.cat([p[0] for p in parts], 2) if parts else out[:, :, :0]
    part_lse = torch.cat([p[1] for p in parts], 2) if parts else lse[:, :, :0]
    out, lse = _merge(out, lse, rows, part_rows, part_out, part_lse)
    got = (out, lse, *torch.autograd.grad(loss(out, lse), leaves))
    for what, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert torch.equal(a.isfinite(), e.isfinite()), what
        finite = e.isfinite()
        assert torch.allclose(a[finite], e[finite], atol=1e-10), (what, (a - e).abs().max())


@settings(max_examples=examples(50), deadline=None, derandomize=not EXPLORE, database=None)
@given(data=st.data())
def test_key_plan_covers_every_kept_block(data):
    """``kv_exchange``'s plan on random layouts, 2-4 ranks, both orders, causal or not:
    every kept (query block, key block on another rank) pair is reached once, by fetching
    the key block (the query block does not visit) or by the query block's visit to the
    key's rank; nothing is fetched or visited that no pair needs."""
    from blocksparse_attn.distributed import _key_plan

    P = data.draw(st.integers(2, 4))
    order = data.draw(st.sampled_from(ORDERS))
    nb = 2 * P * data.draw(st.integers(1, 3))
    causal = data.draw(st.booleans())
    heads, hkv = data.draw(st.sampled_from(((1, 1), (2, 1), (2, 2))))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    density = data.draw(st.sampled_from((0.05, 0.2, 0.6)))
    grid = torch.rand(1, heads, nb, nb, generator=g) < density
    grid[..., data.draw(st.integers(0, nb - 1)), :] = data.draw(st.booleans())  # a global row
    own = [shard_positions(nb, P, r, order) for r in range(P)]
    owner = torch.empty(nb, dtype=torch.long)
    for p, blocks in enumerate(own):
        owner[blocks] = p
    plan = _key_plan(grid, own, causal, 2 * hkv, hkv, data.draw(st.booleans()))
    kept = grid.any((0, 1))
    if causal:
        kept &= torch.ones(nb, nb, dtype=torch.bool).tril()
    for r in range(P):
        wide = set(plan.wide[r].tolist())
        fetched = set(plan.needed[r].tolist())
        visited = {p: set(plan.visits[r][p].tolist()) for p in range(P)}
        assert not (fetched & set(own[r].tolist())) and not visited[r]
        assert all(visited[p] <= wide for p in range(P))
        used = set()
        for i in own[r].tolist():
            for j in kept[i].nonzero().flatten().tolist():
                if owner[j] == r:
                    continue
                if i in wide:
                    assert i in visited[int(owner[j])], (r, i, j)
                else:
                    assert j in fetched, (r, i, j)
                    used.add(j)
        assert used == fetched  # no block fetched that no narrow row attends
        for p in range(P):  # each visit reaches a key it needs
            for i in visited[p]:
                assert bool((kept[i] & (owner == p)).any()), (r, p, i)


def _problem_equals_one_process(rank, P, spec):
    """One drawn problem (``spec``, the same on every rank) through
    ``context_parallel_attention`` on the reference backend in fp64 against the whole
    sequence in one process: output, log-sum-exp and the gradients of a loss of both."""
    g = torch.Generator().manual_seed(spec["seed"])
    b, hkv, group, d, block = (spec[n] for n in ("B", "Hkv", "group", "D", "block"))
    h, L, order = hkv * group, P * spec["blocks_per_rank"] * block, spec["order"]
    nb = L // block

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = randn(b, h, L, d), randn(b, hkv, L, d), randn(b, hkv, L, d)
    lead = (b,) if spec["per_sample"] else ()
    layout = torch.rand(*lead, spec["layout_heads"], nb, nb, generator=g) < spec["density"]
    if spec["global_row"] is not None:
        layout[..., spec["global_row"] % nb, :] = True
    if spec["global_col"] is not None:
        layout[..., spec["global_col"] % nb] = True
    layout = layout.long()
    kpm, kw = None, {}
    if spec["kpm"]:
        hidden = torch.rand(b, L, generator=g) < 0.3
        add = spec["kpm"] == "add"
        kpm = torch.where(hidden, -math.inf if add else 0.0, 0.0 if add else 1.0).double()
        kw["key_padding_mask_mode"] = spec["kpm"]
    rpe = 0.1 * randn(1, h, L, L) if spec["rpe"] else None
    grad_out, grad_lse = randn(b, h, L, d), randn(b, h, L)

    def loss(out, lse, go, gl):  # the log-sum-exp's gradient too, where it is finite
        return (out * go).sum() + torch.where(lse.isfinite(), lse * gl, 0).sum()

    kw.update(block=block, causal=spec["causal"], backend="reference", return_lse=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((rpe,) if spec["rpe"] else ())]
    out, lse = block_sparse_attention(
        *leaves[:3], layout, key_padding_mask=kpm, rpe=leaves[3] if spec["rpe"] else None, **kw
    )
    want = (out, lse, *torch.autograd.grad(loss(out, lse, grad_out, grad_lse), leaves))
    rows = shard_positions(L, P, rank, order)
    mine = [shard_sequence(t, order=order) for t in want[:5]]
    mine += [want[5][:, :, rows]] if spec["rpe"] else []

    shards = [shard_sequence(t, order=order).requires_grad_() for t in (q, k, v)]
    rpe_rows = rpe[:, :, rows].clone().requires_grad_() if spec["rpe"] else None
    out, lse = context_parallel_attention(
        *shards,
        layout,
        strategy=spec["strategy"],
        order=order,
        key_padding_mask=None if kpm is None else shard_sequence(kpm, dim=1, order=order),
        rpe=rpe_rows,
        **kw,
    )
    leaves = shards + ([rpe_rows] if spec["rpe"] else [])
    mine_grads = [shard_sequence(t, order=order) for t in (grad_out, grad_lse)]
    got = (out, lse, *torch.autograd.grad(loss(out, lse, *mine_grads), leaves))
    assert_shards_equal(got, mine, 1e-9, f"{spec} rank {rank}")


def _problems(rank, P, init_file, specs):
    _join(rank, P, init_file)
    try:
        for spec in specs:
            _problem_equals_one_process(rank, P, spec)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@st.composite
def problem_specs(draw, P):
    """A context-parallel problem for ``P`` ranks: sizes, grouped heads, a random layout
    (per head or per sample, with a global row or column or not), causal or not, a key
    padding mask in either mode or none, rpe or none, a strategy (``all_to_all`` only
    where the heads divide among the ranks) and a shard order."""
    hkv = draw(st.sampled_from((1, P)))
    group = draw(st.sampled_from((1, 2)))
    strategies = ("kv_exchange", "auto") + (("all_to_all",) if hkv % P == 0 else ())
    order = draw(st.sampled_from(ORDERS))
    return dict(
        seed=draw(st.integers(0, 2**16)),
        B=draw(st.integers(1, 2)),
        Hkv=hkv,
        group=group,
        D=draw(st.sampled_from((4, 8))),
        block=draw(st.sampled_from((4, 8))),
        blocks_per_rank=draw(st.sampled_from((2, 4) if order == "balanced" else (1, 2, 3))),
        per_sample=draw(st.booleans()),
        layout_heads=draw(st.sampled_from((1, hkv * group))),
        density=draw(st.sampled_from((0.1, 0.3, 0.7))),
        global_row=draw(st.none() | st.integers(0, 63)),
        global_col=draw(st.none() | st.integers(0, 63)),
        causal=draw(st.booleans()),
        kpm=draw(st.sampled_from((None, "add", "mul"))),
        rpe=draw(st.booleans()),
        strategy=draw(st.sampled_from(strategies)),
        order=order,
    )


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@settings(max_examples=examples(4), deadline=None, derandomize=not EXPLORE, database=None)
@given(data=st.data())
def test_random_problems_equal_one_process(tmp_path_factory, data):
    """Property-based, end to end over gloo: each example draws 2 or 3 ranks and four
    problems (:func:`problem_specs`), run in one set of processes; on every rank the
    output, log-sum-exp and gradient shards equal the single-process result in fp64."""
    P = data.draw(st.integers(2, 3))
    specs = [data.draw(problem_specs(P)) for _ in range(4)]
    init_file = tmp_path_factory.mktemp("rendezvous") / "file"
    mp.spawn(_problems, args=(P, str(init_file), specs), nprocs=P, join=True)
