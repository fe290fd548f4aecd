"""Grouped-query attention, a layout per sample and block lists (``KVBlocks``): every backend
against an independent computation (per sample, ordinary attention on K/V repeated to the
query heads, in fp64): output, gradients and log-sum-exp; the ``KVBlocks`` conversions;
the errors."""

import math

import pytest
import torch

from blocksparse_attn import KVBlocks, block_sparse_attention, reference_attention
from blocksparse_attn.flex_block_mask import layout_to_block_mask

from attention_cases import max_err, poison
from helpers import DEVICE, assert_raises_with

pytestmark = pytest.mark.interpreter

BACKENDS = ["fused", "unfused", "reference"]


def independent(q, k, v, layout4, kw):
    """Sample by sample, K/V repeated to the query heads, the layout expanded to them: the
    plain multi-head reference in fp64, with gradients of q, k, v."""
    B, H = q.shape[:2]
    group = H // k.shape[1]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    outs, lses = [], []
    for b in range(B):
        lay = layout4[b if layout4.shape[0] == B else 0]
        if lay.shape[0] not in (1, H):
            lay = lay.repeat_interleave(group, 0)
        one = dict(kw)
        if "key_padding_mask" in one:
            one["key_padding_mask"] = one["key_padding_mask"][b : b + 1]
        out, lse = reference_attention(
            leaves[0][b : b + 1],
            leaves[1][b : b + 1].repeat_interleave(group, 1),
            leaves[2][b : b + 1].repeat_interleave(group, 1),
            lay,
            return_lse=True,
            **one,
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), leaves


def problem(B, H, Hkv, layout_batch, layout_heads, L=64, D=16, block=16):
    q = torch.randn(B, H, L, D, device=DEVICE)
    k, v = (torch.randn(B, Hkv, L, D, device=DEVICE) for _ in range(2))
    nb = L // block
    layout = (torch.rand(layout_batch, layout_heads, nb, nb) < 0.6).long()
    layout[..., 0] = 1
    layout[0, 0, 1] = 0  # an empty row
    return q, k, v, layout


@pytest.mark.parametrize("form", ["dense", "lists"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B, H, Hkv, layout_batch, layout_heads, padding",
    [
        (2, 4, 2, 2, 2, False),  # GQA, a layout per sample and kv head: one launch
        (2, 4, 2, 2, 4, True),  # per query head, with padding (dense: sample by sample)
        (3, 4, 1, 1, 1, True),  # MQA, one shared layout
        (2, 2, 2, 2, 1, False),  # MHA, a layout per sample
        (1, 6, 3, 1, 3, False),  # a layout per kv head, shared by the batch
    ],
)
def test_matches_independent_computation(
    monkeypatch, form, backend, B, H, Hkv, layout_batch, layout_heads, padding
):
    poison(monkeypatch)
    q, k, v, layout = problem(B, H, Hkv, layout_batch, layout_heads)
    # block lists per sample: the fused kernels schedule each sample's lists and masks in
    # one launch (dense per-sample layouts are folded or run sample by sample)
    kw = dict(block=16, causal=True)
    if padding:
        kw["key_padding_mask"] = torch.zeros(B, 64, device=DEVICE)
        kw["key_padding_mask"][:, 50:] = -math.inf
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    arg = layout if layout_batch > 1 else layout[0]
    if form == "lists":
        arg = KVBlocks.from_layout(layout).to(DEVICE)
    if backend == "unfused":
        out, lse = block_sparse_attention(*leaves, arg, backend=backend, **kw), None
    else:
        out, lse = block_sparse_attention(*leaves, arg, backend=backend, return_lse=True, **kw)
    ref, ref_lse, ref_leaves = independent(q, k, v, layout, kw)
    assert out.shape == q.shape and max_err(out, ref) < 1e-5
    if lse is not None:
        ok = ~torch.isneginf(ref_lse)
        assert torch.equal(torch.isneginf(lse), ~ok)
        assert max_err(lse[ok], ref_lse[ok]) < 1e-4
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    expect = torch.autograd.grad(ref, ref_leaves, g.double())
    for name, a, e in zip("qkv", got, expect):
        assert a.shape == e.shape and max_err(a, e) < 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_lists_equal_their_dense_layout(backend):
    q, k, v, layout = problem(2, 4, 2, 2, 2)
    lists = KVBlocks.from_layout(layout).to(q.device)
    dense = block_sparse_attention(q, k, v, layout, block=16, backend=backend)
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, lists, block=16, backend=backend), dense
    )


def test_block_list_conversions():
    layout = (torch.rand(2, 3, 5, 7) < 0.5).long()
    lists = KVBlocks.from_layout(layout)
    assert lists.num_blocks.dtype == torch.int32 and lists.indices.shape == (2, 3, 5, 7)
    assert torch.equal(lists.num_blocks, layout.sum(-1).int())
    assert torch.equal(lists.to_layout(7), layout.bool())
    shared = KVBlocks.from_layout(layout[0])  # [H, nb_q, nb_k] gains a batch dim of 1
    assert shared.shape == (1, 3, 5) and torch.equal(shared.to_layout(7)[0], layout[0].bool())
    # any order, duplicates merged, entries past num_blocks ignored (any value there)
    n = torch.tensor([[[3, 0, 1]]], dtype=torch.int32)
    idx = torch.tensor([[[[4, 1, 4, 99], [-5, 7, 7, 7], [0, 0, 2, 2]]]], dtype=torch.int32)
    got = KVBlocks(n, idx).to_layout(5)[0, 0]
    assert got.tolist() == [
        [False, True, False, False, True],
        [False] * 5,
        [True, False, False, False, False],
    ]


def test_block_lists_from_a_flex_block_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = (torch.rand(2, 4, 4) < 0.5).long()
    layout[:, :, 0] = 1
    mask = layout_to_block_mask(layout, 128, device="cpu")  # full and partial lists
    lists = KVBlocks.from_block_mask(mask)
    assert torch.equal(lists.to_layout(4)[0], layout.bool())


@pytest.mark.parametrize(
    "num_blocks, indices, words",
    [
        (
            torch.ones(1, 1, 2, dtype=torch.int64),
            torch.zeros(1, 1, 2, 3, dtype=torch.int32),
            ["num_blocks must be an int32 tensor"],
        ),
        (
            torch.ones(1, 2, dtype=torch.int32),
            torch.zeros(1, 1, 2, 3, dtype=torch.int32),
            ["num_blocks must be a 3-D tensor [B|1, H|1, nb_q]"],
        ),
        (
            torch.ones(1, 1, 2, dtype=torch.int32),
            torch.zeros(1, 1, 3, 3, dtype=torch.int32),
            ["indices must be of shape [*num_blocks.shape, max_blocks] = [1, 1, 2, .]"],
        ),
    ],
)
def test_block_list_shape_errors(num_blocks, indices, words):
    assert_raises_with(ValueError, words, KVBlocks, num_blocks, indices)


def test_block_list_value_errors():
    q = torch.randn(1, 1, 32, 8, device=DEVICE)
    bad_index = KVBlocks(
        torch.tensor([[[1, 2]]], dtype=torch.int32),
        torch.tensor([[[[0, 0], [1, 2]]]], dtype=torch.int32),
    ).to(DEVICE)
    assert_raises_with(
        ValueError,
        ["indices must be key-block indices in [0, nb_k = 2)", "[2]"],
        block_sparse_attention,
        q,
        q,
        q,
        bad_index,
        block=16,
    )
    bad_count = KVBlocks(
        torch.tensor([[[3, 0]]], dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    ).to(DEVICE)
    assert_raises_with(
        ValueError,
        ["num_blocks must be in [0, max_blocks = 2]"],
        block_sparse_attention,
        q,
        q,
        q,
        bad_count,
        block=16,
    )
    wrong_rows = KVBlocks(
        torch.ones(1, 1, 3, dtype=torch.int32), torch.zeros(1, 1, 3, 1, dtype=torch.int32)
    ).to(DEVICE)
    assert_raises_with(
        ValueError,
        ["KVBlocks of shape [1 or 1, 1 or 1, 2]"],
        block_sparse_attention,
        q,
        q,
        q,
        wrong_rows,
        block=16,
    )


def test_grouped_query_and_layout_errors():
    q = torch.randn(2, 4, 32, 8, device=DEVICE)
    k3 = torch.randn(2, 3, 32, 8, device=DEVICE)
    assert_raises_with(
        ValueError,
        ["k must be of shape [B, H_kv, L_k, D]", "dividing H = 4"],
        block_sparse_attention,
        q,
        k3,
        k3,
        torch.ones(1, 2, 2, dtype=torch.long),
        block=16,
    )
    k2 = torch.randn(2, 2, 32, 8, device=DEVICE)
    for layout in (torch.ones(3, 2, 2, dtype=torch.long), torch.ones(3, 4, 2, 2, dtype=torch.long)):
        assert_raises_with(
            ValueError,
            [
                "layout must be of shape [1, 2 or 4, 2, 2]",
                "[1 or 2, 1, 2 or 4, 2, 2] (a layout per sample)",
            ],
            block_sparse_attention,
            q,
            k2,
            k2,
            layout,
            block=16,
        )


def test_block_lists_on_another_device_than_the_inputs_are_refused():
    q = torch.randn(1, 2, 32, 8, device=DEVICE)
    n = torch.ones(1, 2, 2, dtype=torch.int32, device="meta")
    lists = KVBlocks(n, torch.zeros(1, 2, 2, 1, dtype=torch.int32, device="meta"))
    assert_raises_with(
        ValueError,
        ["layout must be KVBlocks on the inputs' device", "lists.to(q.device)"],
        block_sparse_attention,
        q,
        q,
        q,
        lists,
        block=16,
    )


def test_block_lists_on_two_devices_are_refused():
    n = torch.ones(1, 1, 2, dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32, device="meta")
    assert_raises_with(
        ValueError, ["indices must be on num_blocks' device (cpu)"], KVBlocks, n, idx
    )
