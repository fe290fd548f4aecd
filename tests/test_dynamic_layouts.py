"""Layouts chosen at run time: the index built from block lists on the device (equal to the
index of the same dense layout, array by array), top-k block selection against a direct
computation, attention on selected and on shuffled, repeated lists against the reference,
and (on a GPU) no host synchronisation and CUDA-graph capture of a whole step."""

import itertools

import pytest
import torch

from blocksparse_attn import KVBlocks, block_sparse_attention, topk_blocks
from blocksparse_attn.index import build_index
from blocksparse_attn.index_dynamic import build_block_list_index

from attention_cases import max_err, poison
from helpers import DEVICE, ON_GPU, assert_raises_with

ARRAYS = ("row_idx", "row_bits", "row_partial", "col_idx", "col_bits", "col_partial", "col_pos")
OFFSETS = ("row_ptr", "col_ptr", "row_lead")
WORK = ("items", "order", "split", "first")


def shuffled_with_repeats(layout: torch.Tensor, g: torch.Generator) -> KVBlocks:
    """The block lists of ``layout`` in a random order, each non-empty row's first block
    listed a second time, the indices not contiguous."""
    lists = KVBlocks.from_layout(layout)
    n, idx = lists.num_blocks, lists.indices
    used = torch.arange(idx.shape[-1], device=idx.device) < n[..., None]
    noise = torch.rand(idx.shape, generator=g).to(idx.device)
    idx = idx.gather(-1, torch.argsort(torch.where(used, noise, 2.0), -1))
    idx = torch.cat([idx, idx[..., :1]], -1)  # room for one more entry per row
    idx.scatter_(-1, n.long()[..., None], idx[..., :1])
    idx = idx.to(torch.int32).transpose(1, 2).contiguous().transpose(1, 2)  # other strides
    return KVBlocks(torch.where(n > 0, n + 1, n).to(torch.int32), idx)


@pytest.mark.parametrize(
    "block, tiles, causal, nbq",
    list(
        itertools.product((16, 32, 64), ((16, 16), (64, 64), (128, 64), (32, 64)), (0, 1), (6, 9))
    ),
)
def test_index_from_lists_equals_index_from_layout(block, tiles, causal, nbq):
    g = torch.Generator().manual_seed(block + 7 * causal + nbq)
    layout = torch.rand(1, 3, nbq, 7, generator=g) < 0.4
    layout[0, 0, 2] = False  # an empty row
    lists = shuffled_with_repeats(layout, g).to(DEVICE)
    kw = dict(q_len=nbq * block, k_len=7 * block, tile_m=tiles[0], tile_n=tiles[1], causal=causal)
    want = build_index(layout[0], block, **kw)  # causal and L_q != L_k: bottom-right
    # both builders where the Triton one takes the tiles (square, dividing the block)
    builders = (False, True) if tiles[0] == tiles[1] and block % tiles[0] == 0 else (False,)
    for kernel in builders:
        got = build_block_list_index(lists, block, kernel=kernel, **kw)
        check_same_index(got, want)


def check_same_index(got, want):
    """``got`` (any device) holds ``want``'s index, padded past its kept tiles."""
    assert got.nnz == want.nnz
    for name in ARRAYS:  # the kept tiles, then padding nothing reads
        assert torch.equal(getattr(got, name)[: want.nnz].cpu(), getattr(want, name)), name
    for name in OFFSETS:
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name)), name
    for walk in ("rows", "cols"):  # short lists: each runs whole
        for name in WORK:
            mine, theirs = getattr(getattr(got, walk), name), getattr(getattr(want, walk), name)
            assert torch.equal(mine.cpu(), theirs), (walk, name)
    assert torch.equal(got.to_layout().cpu(), want.to_layout())


@pytest.mark.parametrize("block, tile", [(128, 64), (128, 128), (64, 32)])
def test_index_kernel_on_selected_lists(block, tile):
    # top-k lists per sample (sorted, the diagonal and first block kept), causal
    g = torch.Generator().manual_seed(block + tile)
    q, k = (torch.randn(2, 2, 8 * block, 16, generator=g).to(DEVICE) for _ in range(2))
    lists = topk_blocks(q, k, block=block, topk=3, causal=True, keep_diagonal=True)
    layout = lists.to_layout(8).flatten(0, 1).cpu()  # [B * H, nb, nb]
    kw = dict(q_len=8 * block, k_len=8 * block, tile_m=tile, tile_n=tile, causal=True)
    want = build_index(layout, block, **kw)
    check_same_index(build_block_list_index(lists, block, kernel=True, **kw), want)


def test_index_kernel_refuses_what_it_does_not_take():
    lists = KVBlocks.from_layout(torch.ones(1, 1, 4, 4, dtype=torch.bool))
    kw = dict(q_len=256, k_len=256, causal=False, kernel=True)
    assert_raises_with(
        ValueError,
        ["kernel", "square tiles", "128x64", "kernel=None"],
        build_block_list_index,
        lists,
        64,
        tile_m=128,
        tile_n=64,
        **kw,
    )


def pooled_scores(q, k, block):
    B, H, L, D = q.shape
    qp = q.double().view(B, H, L // block, block, D).mean(3)
    kp = k.double().view(B, k.shape[1], k.shape[2] // block, block, D).mean(3)
    return qp, kp


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("share_group", [False, True])
def test_topk_blocks_keeps_the_highest_pooled_scores(causal, share_group):
    torch.manual_seed(0)
    B, H, Hkv, block, topk = 2, 4, 2, 8, 3
    q, k = torch.randn(B, H, 64, 16), torch.randn(B, Hkv, 48, 16)
    lists = topk_blocks(q, k, block=block, topk=topk, causal=causal, share_group=share_group)
    qp, kp = pooled_scores(q, k, block)
    if share_group:
        s = qp.view(B, Hkv, 2, 8, 16).sum(2) @ kp.transpose(-1, -2)
    else:
        s = qp @ kp.repeat_interleave(2, 1).transpose(-1, -2)
    assert lists.shape == (B, Hkv if share_group else H, 8) and lists.trusted
    assert lists.indices.shape[-1] == topk and lists.indices.dtype == torch.int32
    for b, h, i in itertools.product(range(B), range(lists.shape[1]), range(8)):
        row = s[b, h, i, : (max(0, i + 1 + 6 - 8) if causal else 6)]  # bottom-right
        want = set(torch.topk(row, min(topk, row.numel())).indices.tolist())
        n = int(lists.num_blocks[b, h, i])
        assert set(lists.indices[b, h, i, :n].tolist()) == want, (b, h, i)


def test_topk_blocks_keeps_first_and_diagonal():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    lists = topk_blocks(q, k, block=8, topk=3, causal=True, keep_first=True, keep_diagonal=True)
    for h, i in itertools.product(range(2), range(8)):
        kept = set(lists.indices[0, h, i, : int(lists.num_blocks[0, h, i])].tolist())
        assert {0, i} <= kept and len(kept) == min(3, i + 1) and max(kept) <= i


def test_topk_blocks_errors():
    q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 3, 32, 8)
    assert_raises_with(ValueError, ["k", "dividing H = 4"], topk_blocks, q, k, block=8, topk=2)
    k = torch.randn(1, 2, 32, 8)
    assert_raises_with(ValueError, ["topk", "positive int"], topk_blocks, q, k, block=8, topk=0)
    assert_raises_with(
        ValueError, ["q.shape[2]", "multiple of block=12"], topk_blocks, q, k, block=12, topk=1
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["fused", "unfused", "reference"])
def test_selected_blocks_attend_as_their_dense_layout(monkeypatch, backend):
    """Top-k lists (grouped-query, per sample and head) and the same lists shuffled with
    repeats give the output and gradients of their dense layout."""
    poison(monkeypatch)
    torch.manual_seed(2)
    B, H, Hkv, L, D, block = 2, 4, 2, 64, 16, 16
    q = torch.randn(B, H, L, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, Hkv, L, D, device=DEVICE, requires_grad=True) for _ in range(2))
    lists = topk_blocks(q, k, block=block, topk=2, causal=True, keep_diagonal=True)
    dense = lists.to_layout(L // block)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(B, H, L, D, device=DEVICE)
    results = []
    for layout in (lists, shuffled_with_repeats(dense, g), dense):
        out = block_sparse_attention(q, k, v, layout, block=block, causal=True, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for got in results[:2]:
        for a, e in zip(got, results[2]):
            assert max_err(a, e) < 1e-4


@pytest.mark.interpreter
def test_selection_and_attention_compile_without_graph_breaks(monkeypatch):
    """``torch.compile(fullgraph=True)`` traces selection and fused attention on block
    lists; the custom ops receive the lists (packed with their counts) and compile them on
    the device, not a dense layout."""
    import blocksparse_attn.index_dynamic as index_dynamic

    builds = []
    build = index_dynamic.build_block_list_index

    def counted(*args, **kwargs):
        builds.append(args[0].shape)
        return build(*args, **kwargs)

    monkeypatch.setattr(index_dynamic, "build_block_list_index", counted)

    def step(q, k, v):
        lists = topk_blocks(q, k, block=16, topk=2, causal=True)
        return block_sparse_attention(q, k, v, lists, block=16, causal=True, backend="fused")

    torch.manual_seed(4)
    q = torch.randn(1, 4, 64, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, 2, 64, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert builds  # the lists reached the index builder
    eager = step(q, k, v)
    for a, e in zip((out, *grads), (eager, *torch.autograd.grad(eager.sum(), (q, k, v)))):
        assert max_err(a, e) < 1e-5


def _step(q, k, v, grad_out, block, topk):
    lists = topk_blocks(q, k, block=block, topk=topk, causal=True, keep_diagonal=True)
    out = block_sparse_attention(q, k, v, lists, block=block, causal=True, backend="fused")
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _inputs(seed, B=1, H=4, Hkv=2, L=1024, D=64, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, L, D, device="cuda", generator=g).to(dtype).requires_grad_()
    k, v = (
        torch.randn(B, Hkv, L, D, device="cuda", generator=g).to(dtype).requires_grad_()
        for _ in range(2)
    )
    return q, k, v, torch.randn(B, H, L, D, device="cuda", generator=g).to(dtype)


# head dim 128 at block 128: the Hopper backward's domain on an sm90 GPU
BLOCK_AND_HEAD_DIM = [(64, 64), (128, 64), (128, 128)]


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("block,D", BLOCK_AND_HEAD_DIM)
def test_selection_and_attention_do_not_synchronise(block, D):
    q, k, v, grad_out = _inputs(0, D=D)
    _step(q, k, v, grad_out, block, 4)  # compile and tune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(q, k, v, grad_out, block, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("block,D", BLOCK_AND_HEAD_DIM)
def test_a_step_with_new_selections_replays_from_a_cuda_graph(block, D):
    q, k, v, grad_out = _inputs(0, D=D)
    static = [t.detach().clone().requires_grad_(t.requires_grad) for t in (q, k, v, grad_out)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _step(*static, block, 4)  # warm up (compile, tune) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(*static, block, 4)
    for seed in (1, 2):  # new inputs: a new selection every replay
        new = _inputs(seed, D=D)
        with torch.no_grad():
            for s, n in zip(static, new):
                s.copy_(n)
        graph.replay()
        eager = _step(*new, block, 4)
        for a, e in zip(captured, eager):
            assert torch.equal(a, e)
