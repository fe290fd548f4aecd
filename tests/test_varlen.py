"""Packed variable-length batches: every backend against a sequence-by-sequence
computation in fp64 (output, gradients, log-sum-exp), for training (L_q = L_k), chunked
prefill (fewer queries than keys, bottom-right causal), grouped-query heads, lengths that
are not multiples of the block, and each form of layout; the errors."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocksparse_attn import FixedSparsityConfig, KVBlocks, block_sparse_attention_varlen

from attention_cases import max_err, poison
from helpers import DEVICE, EXPLORE, assert_raises_with, examples

pytestmark = pytest.mark.interpreter


def cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=DEVICE)


def square_layout(layout, n_keys, block):
    """Sequence layout ``[H_l, nb, nb]`` for ``n_keys`` keys, from any layout form."""
    n = -(-n_keys // block) * block
    if n == 0:  # an empty sequence: no blocks (the layout source is not asked)
        return torch.zeros(1, 0, 0, dtype=torch.long)
    if isinstance(layout, FixedSparsityConfig):
        return layout.make_layout(n)
    return layout(n, "cpu")


def independent(q, k, v, lens_q, lens_k, grids, block, causal):
    """Sequence by sequence, dense fp64 softmax with the token mask written out: query i of
    a sequence is at position L_k - L_q + i and sees key j when its grid row keeps j's
    block (and j <= that position when causal)."""
    H, Hkv = q.shape[1], k.shape[1]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    outs, lses = [], []
    oq = ok = 0
    for s, (Lq, Lk) in enumerate(zip(lens_q, lens_k)):
        qs = leaves[0][oq : oq + Lq].transpose(0, 1)  # [H, Lq, D]
        ks = leaves[1][ok : ok + Lk].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        vs = leaves[2][ok : ok + Lk].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        grid = grids[s] != 0
        grid = grid.repeat_interleave(H // grid.shape[0], 0)
        pos = torch.arange(Lq) + Lk - Lq
        keys = torch.arange(Lk)
        keep = grid[:, pos // block][:, :, keys // block]
        if causal:
            keep = keep & (keys[None, :] <= pos[:, None])
        scores = (qs @ ks.transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~keep.to(scores.device), float("-inf"))
        lse = torch.logsumexp(scores, -1)
        p = torch.where(keep.to(scores.device), torch.exp(scores - lse[..., None]), 0.0)
        p = torch.nan_to_num(p)
        outs.append((p @ vs).transpose(0, 1))
        lses.append(lse.transpose(0, 1))
        oq, ok = oq + Lq, ok + Lk
    return torch.cat(outs), torch.cat(lses), leaves


def lists_for(grids, n_seq, block, lens_k):
    """The sequences' grids as KVBlocks [n_seq, H_l, nb_max] (shuffled, padded rows)."""
    rows = max(g.shape[-1] for g in grids)
    heads = max(g.shape[0] for g in grids)
    dense = torch.zeros(n_seq, heads, rows, rows, dtype=torch.bool)
    for s, g in enumerate(grids):
        dense[s, :, : g.shape[1], : g.shape[2]] = g != 0
    return KVBlocks.from_layout(dense.to(DEVICE))


CASES = {  # lens_q, lens_k, H, Hkv, block, causal
    "training": ([37, 64, 0, 5, 100], [37, 64, 0, 5, 100], 4, 2, 16, True),
    "chunked_prefill": ([16, 3, 0], [50, 80, 7], 2, 1, 16, True),
    "bidirectional": ([20, 33], [20, 33], 2, 2, 16, False),
}


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("form", ["config", "callable", "callable_one_by_one", "lists"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_sequence_by_sequence(monkeypatch, backend, form, case):
    poison(monkeypatch)
    if form == "callable_one_by_one":  # layouts too large to gather into one grid
        import blocksparse_attn.varlen

        monkeypatch.setattr(blocksparse_attn.varlen, "_GRID_ENTRIES", 0)
        form = "callable"
    lens_q, lens_k, H, Hkv, block, causal = CASES[case]
    torch.manual_seed(0)
    q = torch.randn(sum(lens_q), H, 16, device=DEVICE)
    k, v = (torch.randn(sum(lens_k), Hkv, 16, device=DEVICE) for _ in range(2))
    config = FixedSparsityConfig(num_heads=Hkv, block=block, num_local_blocks=2)
    g = torch.Generator().manual_seed(1)

    def random_layout(n, device):
        nb = n // block
        grid = torch.rand(Hkv, nb, nb, generator=g) < 0.5
        return grid | torch.eye(nb, dtype=torch.bool)

    source = config if form == "config" else random_layout
    grids = [square_layout(source, n, block) for n in lens_k]
    layout = source if form == "config" else lists_for(grids, len(lens_k), block, lens_k)
    if form == "callable":  # the grids drawn above, for the non-empty sequences in order
        made = iter([grid for grid, n in zip(grids, lens_k) if n])
        layout = lambda n, device: next(made)  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = block_sparse_attention_varlen(
        *leaves,
        cu(lens_q),
        cu(lens_k),
        layout,
        block=block,
        causal=causal,
        return_lse=True,
        backend=backend,
    )
    want, want_lse, ref_leaves = independent(q, k, v, lens_q, lens_k, grids, block, causal)
    assert out.shape == q.shape and max_err(out, want) < 1e-4
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse.float()))
    finite = torch.isfinite(want_lse)
    assert max_err(lse[finite], want_lse[finite]) < 1e-4
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    ref = torch.autograd.grad(want, ref_leaves, grad_out.double())
    for name, a, e in zip(("dq", "dk", "dv"), got, ref):
        assert max_err(a, e) < 1e-4, name


def test_a_batch_seen_again_reuses_its_packing(monkeypatch):
    """Layers attend the same batch one after another: with a config, a call with the
    offsets of a recent call reuses its packed lists and their compiled index (no build);
    new offsets, also written into the same tensor in place, are packed afresh. Every
    result equals the sequence-by-sequence computation."""
    import blocksparse_attn.index_dynamic as index_dynamic

    builds = []
    build = index_dynamic.build_block_list_index

    def counted(*args, **kw):
        builds.append(kw["tile_m"])
        return build(*args, **kw)

    monkeypatch.setattr(index_dynamic, "build_block_list_index", counted)
    config = FixedSparsityConfig(num_heads=2, block=16, num_local_blocks=2)
    torch.manual_seed(3)
    q, k, v = (torch.randn(120, 2, 16, device=DEVICE) for _ in range(3))

    def run(offsets, lengths):
        out = block_sparse_attention_varlen(
            q, k, v, offsets, offsets, config, block=16, causal=True, backend="fused"
        )
        grids = [square_layout(config, n, 16) for n in lengths]
        want = independent(q, k, v, lengths, lengths, grids, 16, True)[0]
        assert max_err(out, want) < 1e-4

    offsets = cu([50, 70])
    run(offsets, [50, 70])
    assert builds
    builds.clear()
    run(offsets, [50, 70])  # the same batch: packing and index reused
    run(cu([50, 70]), [50, 70])  # equal offsets in another tensor
    assert not builds
    offsets.copy_(cu([90, 30]))  # the same tensor, new documents
    run(offsets, [90, 30])
    assert builds


def test_errors():
    q = torch.randn(10, 2, 8, device=DEVICE)
    config = FixedSparsityConfig(num_heads=2, block=4)
    good = cu([4, 6])

    def call(cq, ck, layout=config, **kw):
        return block_sparse_attention_varlen(q, q, q, cq, ck, layout, block=4, **kw)

    assert_raises_with(ValueError, ["cu_seqlens_q", "int32"], call, good.long(), good)
    assert_raises_with(
        ValueError, ["cu_seqlens_k", "from 0 to the packed length 10"], call, good, cu([4, 5])
    )
    bad = torch.tensor([0, 7, 4, 10], dtype=torch.int32, device=DEVICE)
    assert_raises_with(ValueError, ["non-decreasing"], call, bad, bad)
    assert_raises_with(
        ValueError, ["max_seqlen = 5", "a sequence of 6"], call, good, good, max_seqlen_k=5
    )
    shifted = torch.tensor([0, 5, 10], dtype=torch.int32, device=DEVICE)
    assert_raises_with(ValueError, ["no more queries than keys"], call, shifted, good)
    n = torch.ones(2, 2, 2, dtype=torch.int32, device=DEVICE)
    lists = KVBlocks(n, torch.ones(2, 2, 2, 1, dtype=torch.int32, device=DEVICE))  # block 1
    assert_raises_with(ValueError, ["sequence 0 (1 key blocks)"], call, good, good, lists)
    assert_raises_with(
        ValueError, ["backend", "'fused' or 'reference'"], call, good, good, backend="unfused"
    )
    assert_raises_with(  # a layout for another length than the sequence's 4 tokens (1 block)
        ValueError,
        ["a callable giving a [H_l, 1, 1] layout for 4 tokens", "(1, 2, 2)"],
        call,
        good,
        good,
        lambda n, device: torch.ones(1, 2, 2, dtype=torch.long),
    )

    def heads_by_length(n, device):  # 2 heads for the 4-token sequence, 3 for the other
        nb = n // 4
        return torch.ones(2 if n == 4 else 3, nb, nb, dtype=torch.long)

    for gathered in (True, False):  # the grids gathered into one, or converted one by one
        with pytest.MonkeyPatch.context() as m:
            if not gathered:
                import blocksparse_attn.varlen

                m.setattr(blocksparse_attn.varlen, "_GRID_ENTRIES", 0)
            assert_raises_with(
                ValueError,
                ["1 or 3 layout heads for every sequence", "with 2 heads"],
                call,
                good,
                good,
                heads_by_length,
            )


@settings(
    max_examples=examples(10 if DEVICE == "cpu" else 25),
    deadline=None,
    derandomize=not EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_packed_batches(monkeypatch, data):
    """Random sequence counts and lengths (empty ones, lengths off the block, fewer
    queries than keys), heads, blocks and layouts: the fused backend against the
    sequence-by-sequence computation."""
    poison(monkeypatch)
    draw = data.draw
    block = draw(st.sampled_from((16, 32)))
    n_seq = draw(st.integers(1, 4))
    lens_k = [draw(st.integers(0, 3 * block + 5)) for _ in range(n_seq)]
    lens_q = [draw(st.sampled_from((n, draw(st.integers(0, n))))) for n in lens_k]
    Hkv = draw(st.sampled_from((1, 2)))
    H = Hkv * draw(st.sampled_from((1, 2)))
    heads = draw(st.sampled_from(sorted({1, Hkv, H})))
    causal = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), H, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(sum(lens_k), Hkv, 16, generator=g).to(DEVICE) for _ in range(2))
    grids = []
    for n in lens_k:
        nb = -(-n // block)
        grids.append((torch.rand(heads, nb, nb, generator=g) < 0.5).long())
    layout = lists_for(grids, n_seq, block, lens_k) if all(lens_k) else None
    if layout is None:  # an empty sequence: the drawn grids of the others, in order
        made = iter([grid for grid, n in zip(grids, lens_k) if n])

        def layout(n, device):
            return next(made)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention_varlen(
        *leaves, cu(lens_q), cu(lens_k), layout, block=block, causal=causal, backend="fused"
    )
    want, _, ref_leaves = independent(q, k, v, lens_q, lens_k, grids, block, causal)
    assert max_err(out, want) < 1e-4
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    ref = torch.autograd.grad(want, ref_leaves, grad_out.double(), allow_unused=True)
    for name, a, e in zip(("dq", "dk", "dv"), got, ref):
        e = torch.zeros_like(a) if e is None else e
        assert max_err(a, e) < 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packing_copies_the_kernel_and_pytorch_agree(monkeypatch, dtype):
    """The packing's row copy (Triton kernel where the kernels run, PyTorch indexing
    elsewhere): both give the same rows, zeros where nothing goes, in both formats, and
    the gradient back along the inverse (zero for rows that went nowhere)."""
    import blocksparse_attn.ops.gather_rows as gr

    g = torch.Generator().manual_seed(0)
    N, P, H, D = 37, 64, 3, 24  # a head dim that is not a power of two
    pos = torch.randperm(P, generator=g)[:N].to(torch.int32)  # where each source row goes
    at = torch.full((P,), -1, dtype=torch.int32)
    at[pos.long()] = torch.arange(N, dtype=torch.int32)
    src = torch.randn(N, H, D, generator=g).to(dtype)
    grad = torch.randn(1, H, P, D, generator=g).to(dtype)

    def both_ways():
        leaf = src.clone().to(DEVICE).requires_grad_()
        packed = gr.gather_rows(leaf, at.to(DEVICE), pos.to(DEVICE), P, head_major=True)
        back = gr.gather_rows(packed, pos.to(DEVICE), at.to(DEVICE), N, head_major=False)
        (dsrc,) = torch.autograd.grad(packed, leaf, grad.to(DEVICE))
        return packed.detach().cpu(), back.detach().cpu(), dsrc.cpu()

    kernel = both_ways()
    monkeypatch.setattr(gr, "kernel_unavailable_reasons", lambda device: ["no kernels"])
    pytorch = both_ways()
    want = torch.zeros(1, H, P, D, dtype=dtype)
    want[0, :, pos.long()] = src.transpose(0, 1)
    for made in (kernel, pytorch):
        packed, back, dsrc = made
        assert packed.shape == (1, H, P, D) and packed.is_contiguous()
        assert torch.equal(packed, want)
        assert back.shape == (N, H, D) and torch.equal(back, src)
        assert torch.equal(dsrc, grad[0, :, pos.long()].transpose(0, 1))
