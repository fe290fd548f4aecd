"""SparseSelfAttention and BertSparseSelfAttention: DeepSpeed's behaviour, our fixes."""

import pytest
import torch

from blocksparse_attn import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LayoutSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparseSelfAttention,
    SparsityConfig,
    VariableSparsityConfig,
    reference_attention,
)
from blocksparse_attn.modules import BertSparseSelfAttention

from helpers import DEVICE, assert_raises_with

H, BLOCK, MAX = 2, 16, 256

CONFIGS = {
    "dense": lambda: DenseSparsityConfig(H, BLOCK),
    "fixed": lambda: FixedSparsityConfig(H, BLOCK, num_local_blocks=2),
    "fixed_uni": lambda: FixedSparsityConfig(H, BLOCK, attention="unidirectional"),
    "variable": lambda: VariableSparsityConfig(
        H, BLOCK, num_random_blocks=1, seed=1, local_window_blocks=[1, 2]
    ),
    "bigbird": lambda: BigBirdSparsityConfig(H, BLOCK, different_layout_per_head=True, seed=2),
    "bslongformer": lambda: BSLongformerSparsityConfig(H, BLOCK, global_block_indices=[1, 3]),
    "sliding": lambda: LocalSlidingWindowSparsityConfig(H, BLOCK),
    "custom": lambda: LayoutSparsityConfig((torch.rand(H, 16, 16) < 0.4).long(), BLOCK),
}


def qkv(B=2, L=128, D=16, dtype=torch.float32, grad=True):
    return [
        torch.randn(B, H, L, D, device=DEVICE, dtype=dtype, requires_grad=grad) for _ in range(3)
    ]


@pytest.mark.interpreter
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_module_matches_reference(name):
    config = CONFIGS[name]()
    module = SparseSelfAttention(config, max_seq_length=MAX, backend="fused").to(DEVICE)
    q, k, v = qkv()
    out = module(q, k, v)
    expected_layout = config.make_layout(MAX)[:, :8, :8]
    causal = getattr(config, "attention", None) == "unidirectional"
    ref = reference_attention(q, k, v, expected_layout, block=BLOCK, causal=causal)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g_out = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    g_ref = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.interpreter
@pytest.mark.parametrize("kpm_mode, am_mode", [("add", "mul"), ("mul", "add")])
@pytest.mark.parametrize("causal", [False, True])
def test_module_masks_rpe_causal(kpm_mode, am_mode, causal):
    config = FixedSparsityConfig(H, BLOCK, num_local_blocks=2)
    module = SparseSelfAttention(
        config, kpm_mode, am_mode, max_seq_length=MAX, causal=causal, backend="fused"
    )
    q, k, v = qkv(L=64)
    rpe = torch.randn(1, H, 64, 64, device=DEVICE, requires_grad=True)
    kpm = torch.ones(2, 64, device=DEVICE)
    kpm[1, 50:] = 0
    if kpm_mode == "add":
        kpm = torch.where(kpm > 0, 0.0, -10000.0)
    am = torch.rand(64, 64, device=DEVICE) < 0.8
    am = am.float() if am_mode == "mul" else torch.where(am, 0.0, float("-inf"))
    out = module(q, k, v, rpe=rpe, key_padding_mask=kpm.view(2, 1, 1, 64), attn_mask=am[None, None])
    ref = reference_attention(
        q,
        k,
        v,
        config.make_layout(MAX)[:, :4, :4],
        block=BLOCK,
        causal=causal,
        rpe=rpe,
        key_padding_mask=kpm,
        attn_mask=am,
        key_padding_mask_mode=kpm_mode,
        attn_mask_mode=am_mode,
    )
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    (g,) = torch.autograd.grad(out.sum(), rpe)
    (r,) = torch.autograd.grad(ref.sum(), rpe)
    torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_causal_defaults_from_config():
    assert SparseSelfAttention(FixedSparsityConfig(H, attention="unidirectional")).causal
    assert not SparseSelfAttention(FixedSparsityConfig(H)).causal
    assert SparseSelfAttention(LocalSlidingWindowSparsityConfig(H)).causal  # its default is uni
    assert not SparseSelfAttention(
        FixedSparsityConfig(H, attention="unidirectional"), causal=False
    ).causal


def test_deterministic_option_reaches_the_attention(monkeypatch):
    """``deterministic=False`` is handed to every call (the Hopper backward reads it); a
    value that is not a bool is refused."""
    from blocksparse_attn import functional

    seen = []
    real = functional.block_sparse_attention

    def spy(*args, **kw):
        seen.append(kw["deterministic"])
        return real(*args, **kw)

    monkeypatch.setattr(functional, "block_sparse_attention", spy)
    x = torch.randn(1, H, 2 * BLOCK, 8)
    for deterministic in (True, False):
        module = SparseSelfAttention(FixedSparsityConfig(H, BLOCK), deterministic=deterministic)
        module(x, x, x)
    assert seen == [True, False]
    assert "deterministic=False" in repr(module)
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        SparseSelfAttention(FixedSparsityConfig(H, BLOCK), deterministic=1)


def test_master_layout_crop_not_remade():
    # a 6-block crop of the 2048 master has only global column 3 (spec 1.9)
    module = SparseSelfAttention(FixedSparsityConfig(1, BLOCK))
    crop = module.get_layout(96)
    assert torch.equal(crop, module.master_layout[:, :6, :6])
    assert not torch.equal(crop, FixedSparsityConfig(1, BLOCK).make_layout(96))
    assert module.get_layout(96) is crop  # cached


def test_pre_transposed_key():
    module = SparseSelfAttention(DenseSparsityConfig(H, BLOCK), max_seq_length=MAX)
    q, k, v = qkv(L=32, D=8, grad=False)
    torch.testing.assert_close(module(q, k.transpose(-1, -2), v), module(q, k, v))


def test_state_dict_round_trip_restores_random_layout():
    a = SparseSelfAttention(
        BigBirdSparsityConfig(H, BLOCK, num_random_blocks=2, seed=1), max_seq_length=MAX
    )
    b = SparseSelfAttention(
        BigBirdSparsityConfig(H, BLOCK, num_random_blocks=2, seed=9), max_seq_length=MAX
    )
    assert not torch.equal(a.master_layout, b.master_layout)
    q, k, v = qkv(L=128, grad=False)
    before = b(q, k, v)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.master_layout, b.master_layout)
    after = b(q, k, v)  # the cached crop follows the loaded layout
    torch.testing.assert_close(after, a(q, k, v))
    assert not torch.allclose(before, after)


def test_instances_do_not_share_layouts():
    # DeepSpeed's class-level cache would give the second instance the first one's layout
    a = SparseSelfAttention(LocalSlidingWindowSparsityConfig(H, BLOCK), max_seq_length=MAX)
    b = SparseSelfAttention(DenseSparsityConfig(H, BLOCK), max_seq_length=MAX)
    q, k, v = qkv(L=128, grad=False)
    a(q, k, v)
    out_b = b(q, k, v)
    ref_b = reference_attention(q, k, v, torch.ones(H, 8, 8, dtype=torch.long), block=BLOCK)
    torch.testing.assert_close(out_b, ref_b)
    assert a.get_layout(128) is not b.get_layout(128)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: SparseSelfAttention(), ValueError, ["sparsity_config", "SparsityConfig subclass"]),
        (lambda: SparseSelfAttention(SparsityConfig(4)), NotImplementedError, ["abstract base"]),
        (
            lambda: SparseSelfAttention(DenseSparsityConfig(H), "sub"),
            ValueError,
            ["key_padding_mask_mode"],
        ),
        (
            lambda: SparseSelfAttention(DenseSparsityConfig(H), attn_mask_mode="x"),
            ValueError,
            ["attn_mask_mode"],
        ),
        (
            lambda: SparseSelfAttention(DenseSparsityConfig(H), backend="triton"),
            ValueError,
            ["backend"],
        ),
    ],
)
def test_constructor_errors(make, error, words):
    assert_raises_with(error, words, make)


@pytest.mark.parametrize(
    "shape_q, shape_k, error, words",
    [
        ((2, H, 40, 8), (2, H, 40, 8), ValueError, ["multiple of block=16", "pad_to_block_size"]),
        ((2, H, 512, 8), (2, H, 512, 8), ValueError, ["max_seq_length=256"]),
        ((2, 3, 64, 8), (2, 3, 64, 8), ValueError, ["sparsity_config.num_heads = 2", "3"]),
        (
            (2, H, 64, 8),
            (2, H, 32, 4),
            NotImplementedError,
            ["self-attention", "rectangular layout"],
        ),
    ],
)
def test_forward_errors(shape_q, shape_k, error, words):
    module = SparseSelfAttention(DenseSparsityConfig(H, BLOCK), max_seq_length=MAX)
    q = torch.randn(*shape_q)
    k = torch.randn(*shape_k)
    assert_raises_with(error, words, module, q, k, k)


class TinyConfig:
    hidden_size, num_attention_heads, max_position_embeddings = 32, 2, 512


def test_bert_sparse_self_attention_matches_manual():
    layer = BertSparseSelfAttention(TinyConfig(), DenseSparsityConfig(2, BLOCK))
    x = torch.randn(2, 64, 32)
    mask = torch.zeros(2, 1, 1, 64)
    mask[1, ..., 40:] = -10000.0
    out = layer(x, mask)
    q, k, v = (layer.transpose_for_scores(m(x)) for m in (layer.query, layer.key, layer.value))
    scores = q @ k.transpose(-1, -2) / 4 + mask
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 64, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert layer.sparse_self_attention.sparsity_config.num_heads == 2


def test_bert_sparse_self_attention_errors_and_defaults():
    class Bad(TinyConfig):
        hidden_size = 33

    with pytest.raises(ValueError, match="config.hidden_size must be a multiple"):
        BertSparseSelfAttention(Bad())
    layer = BertSparseSelfAttention(TinyConfig())
    assert isinstance(layer.sparse_self_attention.sparsity_config, FixedSparsityConfig)
    assert layer.sparse_self_attention.max_seq_length == 2048


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["fixed_uni", "bigbird", "bslongformer"])
def test_gpu_module_low_precision(dtype, name):
    config = CONFIGS[name]()
    module = SparseSelfAttention(config, max_seq_length=MAX).cuda()
    assert module.master_layout.is_cuda
    q, k, v = qkv(L=256, D=64, dtype=dtype)
    out = module(q, k, v)
    causal = getattr(config, "attention", None) == "unidirectional"
    ref = reference_attention(
        q.double(), k.double(), v.double(), config.make_layout(MAX), block=BLOCK, causal=causal
    )
    assert (out.double() - ref).abs().max().item() < 2e-2
    out.float().sum().backward()
    assert not torch.isnan(q.grad).any()
