"""Attention against a KV cache: every backend against a direct computation in fp64 over
each sequence's keys (one new token on the cache in place, several new tokens, without
appending, a paged cache, block lists), the append itself, and the errors."""

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocksparse_attn import FixedSparsityConfig, KVBlocks, block_sparse_decode

from attention_cases import max_err, poison
from helpers import DEVICE, EXPLORE, assert_raises_with, examples

pytestmark = pytest.mark.interpreter

B, H, HKV, D, BLOCK, L_MAX = 3, 4, 2, 16, 16, 128
CONFIG = FixedSparsityConfig(
    num_heads=HKV, block=BLOCK, num_local_blocks=2, attention="unidirectional"
)


def direct(q, k, v, n, grid, causal=True, block=BLOCK, with_lse=False, first=None):
    """Per sequence: its queries at positions n - L_new .., its keys [0, n), the layout row
    of each query's block (``grid [H_l, nb, nb]``, or ``[B, H_l, nb, nb]`` per sequence),
    fp64; with ``with_lse`` also the log-sum-exp ``[B, L_new, H]``; with ``first [B]`` the
    keys before each sequence's first hidden."""
    L_new, H, D = q.shape[1:]
    group = H // k.shape[2]
    outs, lses = [], []
    for b in range(q.shape[0]):
        pos = torch.arange(L_new) + int(n[b]) - L_new
        keys = torch.arange(int(n[b]))
        mine = grid[b] if grid.dim() == 4 else grid
        g = mine.cpu().repeat_interleave(H // mine.shape[0], 0) != 0
        keep = g[:, pos // block][:, :, keys // block]
        if causal:
            keep = keep & (keys[None, :] <= pos[:, None])
        if first is not None:  # the sequence's leading keys hidden
            keep = keep & (keys[None, :] >= int(first[b]))
        qs = q[b].double().transpose(0, 1)  # [H, L_new, D]
        ks = k[b, : int(n[b])].double().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[b, : int(n[b])].double().transpose(0, 1).repeat_interleave(group, 0)
        s = (qs @ ks.transpose(-1, -2)) * D**-0.5
        s = s.masked_fill(~keep.to(s.device), float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1))  # a query with nothing to attend: zeros
        outs.append((p @ vs).transpose(0, 1))
        lses.append(torch.logsumexp(s, -1).transpose(0, 1))
    out = torch.stack(outs)
    return (out, torch.stack(lses)) if with_lse else out


def problem(L_new, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L_new, H, D, generator=g).to(DEVICE)
    k_cache, v_cache = (torch.randn(B, L_MAX, HKV, D, generator=g).to(DEVICE) for _ in range(2))
    k_new, v_new = (torch.randn(B, L_new, HKV, D, generator=g).to(DEVICE) for _ in range(2))
    seqlens = torch.tensor([5, 63 - L_new + 1, 100], dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, k_new, v_new, seqlens


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("L_new", [1, 5])
@pytest.mark.parametrize("form", ["config", "lists", "trusted lists"])
def test_appends_and_attends(monkeypatch, backend, L_new, form):
    # the decoding kernels take a config's and trusted lists whole (the kernel picks each
    # sequence's row) and other lists' rows picked and deduplicated
    poison(monkeypatch)
    q, k_cache, v_cache, k_new, v_new, seqlens = problem(L_new)
    before = k_cache.clone()
    grid = CONFIG.make_layout(L_MAX)
    layout = CONFIG if form == "config" else KVBlocks.from_layout(grid.to(DEVICE))
    if form == "trusted lists":
        layout = KVBlocks(layout.num_blocks, layout.indices, trusted=True)
    out = block_sparse_decode(
        q, k_cache, v_cache, seqlens, layout, block=BLOCK, k_new=k_new, v_new=v_new, backend=backend
    )
    for b in range(B):  # the new keys were written after each sequence's cached ones
        s = int(seqlens[b])
        assert torch.equal(k_cache[b, s : s + L_new], k_new[b])
        assert torch.equal(k_cache[b, :s], before[b, :s])
    want = direct(q, k_cache, v_cache, seqlens.long() + L_new, grid)
    assert out.shape == q.shape and max_err(out, want) < 1e-4


@pytest.mark.parametrize("L_new", [1, 3])
def test_without_appending_the_last_tokens_are_the_queries(monkeypatch, L_new):
    poison(monkeypatch)
    q, k_cache, v_cache, _, _, seqlens = problem(L_new, seed=1)
    out = block_sparse_decode(q, k_cache, v_cache, seqlens, CONFIG, block=BLOCK, backend="fused")
    want = direct(q, k_cache, v_cache, seqlens, CONFIG.make_layout(L_MAX))
    assert max_err(out, want) < 1e-4


@pytest.mark.parametrize("L_new", [1, 3])
def test_paged_cache(monkeypatch, L_new):
    poison(monkeypatch)
    q, k_cache, v_cache, k_new, v_new, seqlens = problem(L_new, seed=2)
    page = 32
    order = torch.randperm(B * L_MAX // page, generator=torch.Generator().manual_seed(3))
    table = order.view(B, L_MAX // page).to(torch.int32).to(DEVICE)
    k_pages, v_pages = (
        torch.empty(B * L_MAX // page, page, HKV, D, device=DEVICE) for _ in range(2)
    )
    for src, dst in ((k_cache, k_pages), (v_cache, v_pages)):
        dst[table.long()] = src.view(B, L_MAX // page, page, HKV, D)
    out = block_sparse_decode(
        q,
        k_pages,
        v_pages,
        seqlens,
        CONFIG,
        block=BLOCK,
        k_new=k_new,
        v_new=v_new,
        block_table=table,
    )
    contiguous = block_sparse_decode(
        q, k_cache, v_cache, seqlens, CONFIG, block=BLOCK, k_new=k_new, v_new=v_new
    )
    assert torch.equal(k_pages[table.long()].view(B, L_MAX, HKV, D), k_cache)
    assert max_err(out, contiguous) < 1e-5


@pytest.mark.parametrize(
    "heads, kv_heads, layout_heads, per_sequence, block, page",
    [
        (4, 2, 2, False, 16, 0),  # a group shares its list: one program per group
        (4, 1, 1, True, 16, 32),  # MQA, lists per sequence, paged
        (4, 2, 4, False, 16, 0),  # a list per query head: one program per head
        (6, 3, 3, True, 48, 0),  # a block that is not a power of two
        (2, 2, 1, False, 160, 160),  # a block of two key tiles, paged
    ],
)
def test_decoding_kernels(monkeypatch, heads, kv_heads, layout_heads, per_sequence, block, page):
    """The decoding kernels (one new token, fused) against the direct computation, output
    and log-sum-exp: grouped heads packed or not, lists per sequence with repeated entries
    and an empty row, keys past each sequence's end poisoned with NaN (they must stay
    hidden), contiguous and paged caches."""
    poison(monkeypatch)
    g = torch.Generator().manual_seed(heads * 100 + block)
    Bn, nb, Dh = 3, 6, 16
    L_max = nb * block
    q = torch.randn(Bn, 1, heads, Dh, generator=g).to(DEVICE)
    k_cache, v_cache = (torch.randn(Bn, L_max, kv_heads, Dh, generator=g) for _ in range(2))
    seqlens = torch.tensor([1, 2 * block + 3, L_max], dtype=torch.int32)
    for t in (k_cache, v_cache):  # what an unwritten cache may hold
        for b in range(Bn):
            t[b, int(seqlens[b]) :] = float("nan")
    grid = (torch.rand(Bn if per_sequence else 1, layout_heads, nb, nb, generator=g) < 0.6).long()
    grid[..., 0] = 1
    grid[1 if per_sequence else 0, 0, 2] = 0  # sequence 1's query row, empty for head 0
    lists = KVBlocks.from_layout(grid)
    idx = torch.cat([lists.indices, lists.indices[..., :2]], -1)  # repeats after the used ones
    num = lists.num_blocks
    idx[..., 1], idx[..., 0] = idx[..., 0].clone(), idx[..., 1].clone()  # any order
    idx = torch.cat([idx[..., :1], idx], -1)  # the first entry twice
    lists = KVBlocks(num + (num > 0).int(), idx).to(DEVICE)
    k_in, v_in, table = k_cache.to(DEVICE), v_cache.to(DEVICE), None
    if page:
        pages = L_max // page
        order = torch.randperm(Bn * pages, generator=g)
        table = order.view(Bn, pages).to(torch.int32).to(DEVICE)
        k_in, v_in = (torch.empty(Bn * pages, page, kv_heads, Dh, device=DEVICE) for _ in range(2))
        for src, dst in ((k_cache, k_in), (v_cache, v_in)):
            dst[table.long()] = src.to(DEVICE).view(Bn, pages, page, kv_heads, Dh)
    out, lse = block_sparse_decode(
        q,
        k_in,
        v_in,
        seqlens.to(DEVICE),
        lists,
        block=block,
        block_table=table,
        return_lse=True,
        backend="fused",
    )
    want, want_lse = direct(  # on the CPU, where the caches were made
        q.cpu(),
        k_cache,
        v_cache,
        seqlens,
        grid if per_sequence else grid[0],
        block=block,
        with_lse=True,
    )
    out, lse = out.cpu(), lse.cpu()
    assert out.shape == q.shape and max_err(out, want) < 1e-4
    hidden = torch.isneginf(want_lse)
    assert hidden.any()  # the empty row is part of the case
    assert torch.equal(torch.isneginf(lse), hidden)
    assert max_err(lse[~hidden], want_lse[~hidden]) < 1e-4


@pytest.mark.parametrize("backend, grad", [("fused", False), ("fused", True), ("reference", False)])
def test_first_key_hides_the_leading_keys(monkeypatch, backend, grad):
    # a left-padded batch: each sequence's keys before first_key are hidden (the decoding
    # kernels, the general kernels when gradients are wanted, the reference)
    poison(monkeypatch)
    q, k_cache, v_cache, k_new, v_new, seqlens = problem(1, seed=7)
    first = torch.tensor([0, 20, 99], dtype=torch.int32, device=DEVICE)
    q = q.clone().requires_grad_(grad)
    append = {} if grad else dict(k_new=k_new, v_new=v_new)
    out = block_sparse_decode(
        q,
        k_cache,
        v_cache,
        seqlens,
        CONFIG,
        block=BLOCK,
        first_key=first,
        backend=backend,
        **append,
    )
    n = seqlens.long() + (0 if grad else 1)
    want = direct(q.detach(), k_cache, v_cache, n, CONFIG.make_layout(L_MAX), first=first.cpu())
    assert max_err(out.detach(), want) < 1e-4
    plain = direct(q.detach(), k_cache, v_cache, n, CONFIG.make_layout(L_MAX))
    assert max_err(want, plain) > 1e-3  # the hidden keys do matter here


def test_first_key_errors():
    q, k_cache, v_cache, k_new, v_new, seqlens = problem(1)

    def call(first, q=q, **kw):
        return block_sparse_decode(
            q, k_cache, v_cache, seqlens, CONFIG, block=BLOCK, first_key=first, **kw
        )

    i32 = dict(dtype=torch.int32, device=DEVICE)
    assert_raises_with(ValueError, ["first_key", "int32 tensor [3]"], call, seqlens.long())
    late = seqlens.clone()  # the newest token itself hidden
    assert_raises_with(ValueError, ["first_key", "the newest token stays visible"], call, late)
    assert_raises_with(
        ValueError, ["first_key", "[0, cache_seqlens"], call, torch.full((3,), -1, **i32)
    )
    several = torch.zeros(B, 2, H, D, device=DEVICE)
    assert_raises_with(
        NotImplementedError, ["first_key", "one new token only"], call, seqlens * 0, q=several
    )


def test_decoding_kernels_clamp_lengths_past_the_cache(monkeypatch):
    # during CUDA-graph capture no length can be checked on the host: the kernel reads a
    # length past the cache as the cache's, never past it (nor past the lists' last row)
    from blocksparse_attn.kernels.decode import decode_attention

    poison(monkeypatch)
    q, k_cache, v_cache, _, _, _ = problem(1, seed=6)
    k_cache, v_cache = k_cache[:, :120], v_cache[:, :120]  # the last block partly past it
    lists = KVBlocks.from_layout(CONFIG.make_layout(L_MAX).to(DEVICE) != 0)
    run = functools.partial(decode_attention, q[:, 0], k_cache, v_cache, block=BLOCK, scale=D**-0.5)
    full = torch.full((B,), 120, dtype=torch.int32, device=DEVICE)
    want = run(full, lists.num_blocks, lists.indices)
    past = full + torch.tensor([1, 40, 1000], dtype=torch.int32, device=DEVICE)
    got = run(past, lists.num_blocks, lists.indices)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_decoding_with_gradients_takes_the_general_kernels(monkeypatch):
    # the decoding kernels have no backward: inputs that require grad get the general fused
    # kernels' gradients, equal to the reference's
    poison(monkeypatch)
    q, k_cache, v_cache, _, _, seqlens = problem(1, seed=4)
    grads = []
    for backend in ("fused", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k_cache, v_cache)]
        out = block_sparse_decode(*leaves, seqlens, CONFIG, block=BLOCK, backend=backend)
        grads.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for got, want in zip(*grads):
        assert max_err(got, want) < 1e-4


@pytest.mark.parametrize(
    "backend, L_new, grad",
    [
        ("fused", 1, False),  # the decoding kernels
        ("fused", 1, True),  # the general fused kernels on the cache (gradients wanted)
        ("reference", 1, False),
        ("fused", 3, False),  # several new tokens: the packed path
    ],
)
def test_cache_length_off_the_block(monkeypatch, backend, L_new, grad):
    """A cache of 120 tokens with block 16 (as a growing cache of a model library is): the
    pattern is taken over 128 tokens, and the result is the direct computation's."""
    poison(monkeypatch)
    q, k_cache, v_cache, k_new, v_new, seqlens = problem(L_new, seed=5)
    k_cache, v_cache = k_cache[:, :120], v_cache[:, :120]  # views: strided in the batch
    q = q.clone().requires_grad_(grad)
    append = {} if grad else dict(k_new=k_new, v_new=v_new)
    out = block_sparse_decode(
        q, k_cache, v_cache, seqlens, CONFIG, block=BLOCK, backend=backend, **append
    )
    n = seqlens.long() + (0 if grad else L_new)
    want = direct(q.detach(), k_cache, v_cache, n, CONFIG.make_layout(128))
    assert max_err(out.detach(), want) < 1e-4


def test_errors():
    q, k_cache, v_cache, k_new, v_new, seqlens = problem(1)

    def call(**kw):
        args = dict(k_new=k_new, v_new=v_new, block=BLOCK)
        args.update(kw)
        seq, layout = args.pop("seqlens", seqlens), args.pop("layout", CONFIG)
        return block_sparse_decode(q, k_cache, v_cache, seq, layout, **args)

    full = torch.full((B,), L_MAX, dtype=torch.int32, device=DEVICE)
    assert_raises_with(ValueError, ["cache_seqlens", "room for the new tokens"], call, seqlens=full)
    assert_raises_with(ValueError, ["cache_seqlens", "int32"], call, seqlens=seqlens.long())
    assert_raises_with(ValueError, ["k_new, v_new", "both or neither"], call, v_new=None)
    assert_raises_with(ValueError, ["scale must be a finite float", "nan"], call, scale=math.nan)
    wrong_rows = KVBlocks.from_layout(torch.ones(1, HKV, 4, 4, dtype=torch.long, device=DEVICE))
    expected = "KVBlocks of shape [1 or 3, 1, 2 or 4, 8]"
    assert_raises_with(ValueError, [expected, "(1, 2, 4)"], call, layout=wrong_rows)
    three = KVBlocks.from_layout(torch.ones(1, 3, 8, 8, dtype=torch.long, device=DEVICE))
    assert_raises_with(ValueError, [expected, "(1, 3, 8)"], call, layout=three)
    assert_raises_with(
        ValueError,
        ["a callable giving a [H_l, 8, 8] layout for 128 tokens", "(2, 4, 4)"],
        call,
        layout=lambda n, device: torch.ones(2, 4, 4, dtype=torch.long),
    )
    assert_raises_with(
        ValueError,
        ["1, H_kv = 2 or H = 4 layout heads", "3 heads"],
        call,
        layout=lambda n, device: torch.ones(3, 8, 8, dtype=torch.long),
    )
    pages = torch.zeros(4, 24, HKV, D, device=DEVICE)
    table = torch.zeros(B, 2, dtype=torch.int32, device=DEVICE)
    assert_raises_with(
        ValueError,
        ["pages of a multiple of block=16", "page size 24"],
        block_sparse_decode,
        q,
        pages,
        pages,
        seqlens,
        CONFIG,
        block=BLOCK,
        block_table=table,
    )
    pages = torch.zeros(4, 32, HKV, D, device=DEVICE)
    assert_raises_with(
        ValueError,
        ["block_table", "page numbers in [0, 4)"],
        block_sparse_decode,
        q,
        pages,
        pages,
        torch.ones(B, dtype=torch.int32, device=DEVICE),
        CONFIG,
        block=BLOCK,
        k_new=k_new,
        v_new=v_new,
        block_table=table + 7,
    )
    assert not pages.any()  # refused before anything was written through the table


@settings(
    max_examples=examples(10 if DEVICE == "cpu" else 25),
    deadline=None,
    derandomize=not EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_caches(monkeypatch, data):
    """Random batch, cache length, new tokens, fill levels, appending or not, contiguous
    or paged: the fused backend against the direct computation."""
    poison(monkeypatch)
    draw = data.draw
    Bn = draw(st.integers(1, 3))
    L_max = BLOCK * draw(st.integers(2, 6))
    L_new = draw(st.integers(1, 4))
    append = draw(st.booleans())
    low = 0 if append else L_new
    high = L_max - L_new if append else L_max
    lens = [draw(st.integers(low, high)) for _ in range(Bn)]
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Bn, L_new, H, D, generator=g).to(DEVICE)
    k_cache, v_cache = (torch.randn(Bn, L_max, HKV, D, generator=g).to(DEVICE) for _ in range(2))
    new = [torch.randn(Bn, L_new, HKV, D, generator=g).to(DEVICE) for _ in range(2)]
    grid = (torch.rand(HKV, L_max // BLOCK, L_max // BLOCK, generator=g) < 0.5).long()
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kw = dict(k_new=new[0], v_new=new[1]) if append else {}
    pages = L_max // BLOCK if draw(st.booleans()) else 0
    k_in, v_in, table = k_cache.clone(), v_cache.clone(), None
    if pages:  # one block per page, pages in a random order
        order = torch.randperm(Bn * pages, generator=g)
        table = order.view(Bn, pages).to(torch.int32).to(DEVICE)
        k_in, v_in = (torch.empty(Bn * pages, BLOCK, HKV, D, device=DEVICE) for _ in range(2))
        for src, dst in ((k_cache, k_in), (v_cache, v_in)):
            dst[table.long()] = src.view(Bn, pages, BLOCK, HKV, D)
    out = block_sparse_decode(
        q,
        k_in,
        v_in,
        seqlens,
        lambda n, device: grid,
        block=BLOCK,
        block_table=table,
        backend="fused",
        **kw,
    )
    if append:  # what the cache holds now
        for b in range(Bn):
            k_cache[b, lens[b] : lens[b] + L_new] = new[0][b]
            v_cache[b, lens[b] : lens[b] + L_new] = new[1][b]
    n = seqlens.long() + (L_new if append else 0)
    want = direct(q, k_cache, v_cache, n, grid)
    assert max_err(out, want) < 1e-4


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("paged", [False, True])
def test_decoding_replays_from_a_cuda_graph(paged):
    """One decoding step (append, then attend) captured once for a fixed batch shape and
    replayed with new tokens, new lengths and new cache contents: each replay equals the
    eager step on the same inputs."""
    lists = KVBlocks.from_layout(CONFIG.make_layout(L_MAX).to(DEVICE))
    lists = KVBlocks(lists.num_blocks, lists.indices, trusted=True)

    def inputs(seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        q = torch.randn(B, 1, H, D, device=DEVICE, generator=g)
        k_cache, v_cache = (torch.randn(B, L_MAX, HKV, D, device=DEVICE, generator=g) for _ in "kv")
        new = [torch.randn(B, 1, HKV, D, device=DEVICE, generator=g) for _ in "kv"]
        lens = torch.randint(0, L_MAX, (B,), device=DEVICE, generator=g).to(torch.int32)
        return [q, k_cache, v_cache, *new, lens]

    table = torch.arange(B * 4, device=DEVICE).view(B, 4).flip(0).to(torch.int32)

    def step(q, k_cache, v_cache, k_new, v_new, lens):
        if paged:  # pages of 32 tokens, the sequences' pages in reverse order
            k_cache, v_cache = (t.view(B * 4, 32, HKV, D) for t in (k_cache, v_cache))
        return block_sparse_decode(
            q,
            k_cache,
            v_cache,
            lens,
            lists,
            block=BLOCK,
            k_new=k_new,
            v_new=v_new,
            block_table=table if paged else None,
            return_lse=True,
        )

    static = inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*[t.clone() for t in static])  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static)
    for seed in (1, 2):
        new = inputs(seed)
        for s, n in zip(static, new):
            s.copy_(n)
        graph.replay()
        eager = step(*new)
        for a, e in zip(captured, eager):
            assert torch.equal(a, e)
