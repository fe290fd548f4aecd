"""The reference attention: SDPA agreement, mask semantics, empty rows, gradients, errors."""

import pytest
import torch
import torch.nn.functional as F

from blocksparse_attn import reference_attention
from blocksparse_attn.reference import token_mask

from helpers import assert_raises_with


def qkv(b=2, h=3, lq=64, lk=64, d=16, dtype=torch.float32, grad=False):
    q = torch.randn(b, h, lq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, h, lk, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, h, lk, d, dtype=dtype, requires_grad=grad)
    return q, k, v


def test_dense_matches_sdpa():
    q, k, v = qkv()
    out = reference_attention(q, k, v, torch.ones(1, 4, 4, dtype=torch.int64), block=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lq, lk", [(8, 24), (24, 8), (16, 16)])
def test_causal_is_bottom_right_aligned(lq, lk):
    # query i sees key j when j <= i + lk - lq: the last query sees every key, and with
    # lq > lk the first lq - lk queries see none (zero output, lse -inf)
    q, k, v = qkv(1, 1, lq, lk, 8, torch.float64)
    layout = torch.ones(1, lq // 8, lk // 8, dtype=torch.int64)
    out, lse = reference_attention(q, k, v, layout, block=8, causal=True, return_lse=True)
    for i in range(lq):
        seen = [j for j in range(lk) if j <= i + lk - lq]
        if not seen:
            assert torch.all(out[0, 0, i] == 0) and lse[0, 0, i] == float("-inf")
            continue
        s = (q[0, 0, i] @ k[0, 0, seen].T) * 8**-0.5
        torch.testing.assert_close(out[0, 0, i], torch.softmax(s, 0) @ v[0, 0, seen])
        torch.testing.assert_close(lse[0, 0, i], torch.logsumexp(s, 0))


def test_causal_matches_sdpa():
    q, k, v = qkv()
    out = reference_attention(
        q, k, v, torch.ones(3, 4, 4, dtype=torch.int64), block=16, causal=True
    )
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sparse_layout_and_masks_match_sdpa_with_mask():
    b, h, L, d, block = 2, 3, 64, 16, 16
    q, k, v = qkv(b, h, L, L, d)
    layout = (torch.rand(h, 4, 4) < 0.6).to(torch.int64)
    layout[:, torch.arange(4), torch.arange(4)] = 1
    rpe = torch.randn(b, h, L, L)
    kpm = torch.zeros(b, L)
    kpm[0, -5:] = float("-inf")
    am = (torch.rand(L, L) < 0.8).to(torch.int64)
    am.fill_diagonal_(1)
    out = reference_attention(
        q, k, v, layout, block=block, rpe=rpe, key_padding_mask=kpm, attn_mask=am, scale=0.3
    )
    bias = rpe + kpm[:, None, None, :] + torch.where(am != 0, 0.0, float("-inf"))
    bias = bias.masked_fill(~token_mask(layout, block), float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_mask_modes():
    q, k, v = qkv(1, 1, 32, 32, 8)
    layout = torch.ones(1, 2, 2, dtype=torch.int64)
    keep = torch.ones(1, 32)
    keep[0, 20:] = 0
    additive = torch.zeros(1, 32)
    additive[0, 20:] = float("-inf")
    a = reference_attention(
        q, k, v, layout, block=16, key_padding_mask=keep, key_padding_mask_mode="mul"
    )
    b = reference_attention(q, k, v, layout, block=16, key_padding_mask=additive)
    c = reference_attention(q, k, v, layout, block=16, key_padding_mask=additive.view(1, 1, 1, 32))
    d = reference_attention(
        q[..., :20, :],
        k[..., :20, :],
        v[..., :20, :],
        torch.ones(1, 1, 1, dtype=torch.int64),
        block=20,
    )
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a[..., :20, :], d)
    # 'add' attn_mask with BERT-style -10000 and 'mul' bool attn mask
    am = torch.ones(32, 32, dtype=torch.bool).tril()
    e = reference_attention(q, k, v, layout, block=16, attn_mask=am)
    f = reference_attention(q, k, v, layout, block=16, causal=True)
    torch.testing.assert_close(e, f)


def test_empty_rows_give_zeros_and_zero_grads():
    q, k, v = qkv(1, 2, 32, 32, 8, grad=True)
    layout = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])  # block-row 1 and head 1 empty
    kpm = torch.zeros(1, 32)
    kpm[0, :16] = float("-inf")  # head 0 rows 0..15 only see masked keys
    out, lse = reference_attention(q, k, v, layout, block=16, key_padding_mask=kpm, return_lse=True)
    assert not out.isnan().any()
    assert bool((out == 0).all())
    assert bool(torch.isneginf(lse).all())
    out.sum().backward()
    for t in (q, k, v):
        assert not t.grad.isnan().any() and bool((t.grad == 0).all())


def test_lse():
    q, k, v = qkv(1, 1, 32, 32, 8)
    out, lse = reference_attention(
        q, k, v, torch.ones(1, 2, 2, dtype=torch.int64), block=16, return_lse=True
    )
    ref = torch.logsumexp(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1)
    torch.testing.assert_close(lse, ref)


def test_cross_attention_rectangular():
    q, k, v = qkv(2, 2, 32, 96, 16)
    out = reference_attention(q, k, v, torch.ones(1, 2, 6, dtype=torch.int64), block=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_returns_input_dtype(dtype):
    q, k, v = qkv(dtype=dtype)
    out = reference_attention(q, k, v, torch.ones(1, 4, 4, dtype=torch.int64), block=16)
    assert out.dtype == dtype
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_gradcheck_fp64_with_rpe_and_masks():
    b, h, L, d = 1, 2, 8, 4
    q, k, v = qkv(b, h, L, L, d, dtype=torch.float64, grad=True)
    rpe = torch.randn(1, h, L, L, dtype=torch.float64, requires_grad=True)  # broadcast over batch
    layout = torch.tensor([[[1, 0], [1, 1]], [[0, 1], [1, 0]]])
    kpm = torch.zeros(b, L, dtype=torch.float64)
    kpm[0, 1] = -1.5

    def fn(q, k, v, rpe):
        return reference_attention(
            q, k, v, layout, block=4, rpe=rpe, key_padding_mask=kpm, causal=True
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, rpe))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda a: a.update(q=a["q"][0]), ["q must be a 4-D tensor"]),
        (lambda a: a.update(k=a["k"].double()), ["q, k, v must be of one dtype"]),
        (lambda a: a.update(q=a["q"].int()), ["q must be float16, bfloat16, float32 or float64"]),
        (lambda a: a.update(k=a["k"][:, :, :, :8], v=a["v"][:, :, :, :8]), ["k must be of shape"]),
        (lambda a: a.update(v=a["v"][:, :, :32]), ["v must be of the shape of k"]),
        (
            lambda a: a.update(q=a["q"][:, :, :40]),
            ["q.shape[2] must be a multiple of block=16", "40"],
        ),
        (
            lambda a: a.update(layout=torch.ones(2, 4, 4, dtype=torch.int64)),
            ["layout must be of shape [1 or 3, 4, 4]"],
        ),
        (
            lambda a: a.update(layout=torch.ones(1, 4, 3, dtype=torch.int64)),
            ["layout must be of shape"],
        ),
        (
            lambda a: a.update(layout=torch.ones(1, 4, 4)),
            ["layout must be an integer or bool tensor"],
        ),
        (lambda a: a.update(block=0), ["block must be a positive int"]),
        (lambda a: a.update(scale="x"), ["scale must be a finite float or None"]),
        (lambda a: a.update(scale=float("nan")), ["scale must be a finite float or None", "nan"]),
        (lambda a: a.update(scale=float("inf")), ["scale must be a finite float or None", "inf"]),
        (
            lambda a: a.update(key_padding_mask_mode="sub"),
            ["key_padding_mask_mode must be 'add' or 'mul'"],
        ),
        (lambda a: a.update(attn_mask_mode=None), ["attn_mask_mode must be 'add' or 'mul'"]),
        (
            lambda a: a.update(key_padding_mask=torch.zeros(2, 63)),
            ["key_padding_mask must be of shape"],
        ),
        (
            lambda a: a.update(key_padding_mask=torch.ones(2, 64, dtype=torch.bool)),
            [
                "key_padding_mask must be a floating-point tensor in 'add' mode",
                "key_padding_mask_mode='mul'",
            ],
        ),
        (lambda a: a.update(attn_mask=torch.zeros(2, 64, 64)), ["attn_mask must be of shape"]),
        (lambda a: a.update(rpe=torch.zeros(2, 3, 64, 32)), ["rpe must be broadcastable"]),
        (lambda a: a.update(rpe=torch.zeros(5, 3, 64, 64)), ["rpe must be broadcastable"]),
    ],
)
def test_errors(change, words):
    q, k, v = qkv(2, 3, 64, 64, 16)
    args = dict(q=q, k=k, v=v, layout=torch.ones(1, 4, 4, dtype=torch.int64), block=16)
    change(args)
    assert_raises_with(
        ValueError,
        words,
        reference_attention,
        args.pop("q"),
        args.pop("k"),
        args.pop("v"),
        args.pop("layout"),
        **args,
    )
