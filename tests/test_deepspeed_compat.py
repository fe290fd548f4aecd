"""DeepSpeed's sparse-attention contract, as its users rely on it: ``bench=`` in the operator
signatures, ``Softmax`` writing into its input, the module tree under
``blocksparse_attn.deepspeed`` (and ``install()`` for scripts left unchanged), and the
``SparseSelfAttention`` helpers. DeepSpeed's own softmax cases (Z=2, H=4, widths 256 and
576, blocks 16 and 32, scale 0.4, 60% of blocks kept, an additive 0/-inf key padding mask
and a 0/1 attention mask in 'mul' mode) run at full size on a GPU, smaller on CPU."""

import subprocess
import sys
import textwrap

import pytest
import torch

from blocksparse_attn.compressed import to_dense, to_sparse
from blocksparse_attn.deepspeed import MatMul, Softmax

from helpers import DEVICE, ON_GPU, assert_raises_with

pytestmark = pytest.mark.interpreter

TOL = {torch.float32: dict(rtol=5e-4, atol=5e-5), torch.float16: dict(rtol=3e-2, atol=2e-3)}
WIDTHS = (256, 576) if ON_GPU else (64, 96)


def softmax_case(block, width, dtype, Z=2, H=4):
    """DeepSpeed's softmax problem: dense scores ``x`` in [0, 1), a layout keeping 60% of
    the blocks, a 0/-inf additive key padding mask and a 0/1 'mul' attention mask."""
    g = torch.Generator().manual_seed(block + width)
    layout = (torch.rand(H, width // block, width // block, generator=g) >= 0.4).long()
    x = torch.rand(Z, H, width, width, generator=g).to(DEVICE, dtype)
    kpm = torch.where(torch.rand(Z, width, generator=g) < 0.5, 0.0, float("-inf"))
    am = (torch.rand(width, width, generator=g) < 0.5).to(dtype)
    return layout, x, kpm.to(DEVICE, dtype), am.to(DEVICE)


def dense_softmax(x, layout, block, scale, kpm, am, rpe=None):
    keep = layout.bool().repeat_interleave(block, 1).repeat_interleave(block, 2).to(x.device)
    s = x.float() * scale + (0 if rpe is None else rpe.float()) + kpm.float()[:, None, None, :]
    s = s.masked_fill(~keep | (am == 0), float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)  # rows with nothing to attend: 0
    return torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_softmax_in_place_contract(block, width, dtype):
    layout, dense_x, kpm, am = softmax_case(block, width, dtype)
    leaf = to_sparse(dense_x, layout, block).clone().requires_grad_()
    x = leaf * 1  # what produced x gets the gradient, as in DeepSpeed's test
    storage = x.data_ptr()
    y = Softmax(layout, block, bench=False)(
        x,
        scale=0.4,
        key_padding_mask=kpm,
        key_padding_mask_mode="add",
        attn_mask=am,
        attn_mask_mode="mul",
    )
    assert y is x and x.data_ptr() == storage  # written into x and x returned
    ref = dense_softmax(dense_x, layout, block, 0.4, kpm, am)
    torch.testing.assert_close(x, to_sparse(ref, layout, block).to(dtype), **TOL[dtype])
    dy = torch.rand_like(y)
    y.backward(dy)
    dense_leaf = dense_x.float().requires_grad_()
    ref = dense_softmax(dense_leaf, layout, block, 0.4, kpm, am)
    ref.backward(to_dense(dy, layout, block).float())
    torch.testing.assert_close(
        leaf.grad, to_sparse(dense_leaf.grad, layout, block).to(dtype), **TOL[dtype]
    )


@pytest.mark.parametrize("kpm_mode, am_mode", [("add", "add"), ("mul", "mul")])
def test_softmax_rpe_and_mask_modes(kpm_mode, am_mode):
    block, width = 16, 64
    layout, dense_x, kpm, am = softmax_case(block, width, torch.float32)
    rpe = torch.randn(1, 4, width, width, device=DEVICE)
    if kpm_mode == "mul":
        kpm = (kpm == 0).to(torch.int64)
    am_arg = am if am_mode == "mul" else torch.where(am == 0, float("-inf"), 0.0)
    x = to_sparse(dense_x, layout, block)
    y = Softmax(layout, block)(
        x.clone(),
        scale=0.7,
        rpe=rpe,
        key_padding_mask=kpm,
        attn_mask=am_arg,
        key_padding_mask_mode=kpm_mode,
        attn_mask_mode=am_mode,
    )
    additive_kpm = kpm if kpm_mode == "add" else torch.where(kpm != 0, 0.0, float("-inf"))
    ref = dense_softmax(dense_x, layout, block, 0.7, additive_kpm, am, rpe)
    torch.testing.assert_close(y, to_sparse(ref, layout, block), **TOL[torch.float32])


def test_softmax_out_of_place_leaves_x():
    layout, dense_x, kpm, am = softmax_case(16, 64, torch.float32)
    x = to_sparse(dense_x, layout, 16)
    before = x.clone()
    y = Softmax(layout, 16, inplace=False)(x, scale=0.4)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x, before)
    torch.testing.assert_close(
        y,
        to_sparse(
            dense_softmax(dense_x, layout, 16, 0.4, torch.zeros_like(kpm), torch.ones_like(am)),
            layout,
            16,
        ),
    )


def test_softmax_in_place_on_a_strided_input():
    layout, dense_x, _, _ = softmax_case(16, 64, torch.float32)
    x = to_sparse(dense_x, layout, 16)
    base = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], device=DEVICE)[..., ::2].copy_(x)
    assert not base.is_contiguous()
    expect = Softmax(layout, 16, inplace=False)(base, scale=0.5)
    got = Softmax(layout, 16)(base, scale=0.5)
    assert got is base
    torch.testing.assert_close(got, expect)


def test_in_place_on_a_leaf_that_requires_grad_is_torchs_error():
    layout = torch.ones(1, 1, 1, dtype=torch.int64)
    x = torch.rand(1, 1, 16, 16, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        Softmax(layout, 16)(x)


def test_matmul_accepts_bench():
    layout = torch.ones(2, 2, 2, dtype=torch.int64)
    a, b = (torch.randn(1, 2, 32, 32, device=DEVICE) for _ in range(2))
    out = MatMul(layout, 16, "sdd", trans_b=True, bench=False)(a, b)
    torch.testing.assert_close(
        to_dense(out, layout, 16), a @ b.transpose(-1, -2), **TOL[torch.float32]
    )


def test_module_tree_matches_deepspeeds():
    import importlib

    import blocksparse_attn.deepspeed as ds

    names = {
        "sparsity_config": [
            "SparsityConfig",
            "FixedSparsityConfig",
            "BigBirdSparsityConfig",
            "VariableSparsityConfig",
            "BSLongformerSparsityConfig",
            "DenseSparsityConfig",
            "LocalSlidingWindowSparsityConfig",
        ],
        "softmax": ["Softmax"],
        "matmul": ["MatMul"],
        "sparse_self_attention": ["SparseSelfAttention"],
        "bert_sparse_self_attention": ["BertSparseSelfAttention"],
        "sparse_attention_utils": ["SparseAttentionUtils"],
    }
    assert sorted(names) == sorted(ds.SUBMODULES)
    for sub, classes in names.items():
        module = importlib.import_module(f"blocksparse_attn.deepspeed.{sub}")
        for cls in classes:
            assert getattr(module, cls) is getattr(ds, cls)


def test_self_attention_helpers():
    from blocksparse_attn.deepspeed import FixedSparsityConfig, SparseSelfAttention

    attn = SparseSelfAttention(FixedSparsityConfig(num_heads=2, block=16), max_seq_length=64)
    k = torch.randn(1, 2, 64, 8)
    assert attn.transpose_key_for_scores(k, 64) is k
    assert torch.equal(attn.transpose_key_for_scores(k.transpose(-1, -2), 64), k)
    kpm = torch.ones(1, 1, 1, 64, dtype=torch.int64)
    got = attn.transpose_mask_for_sparse(torch.float16, kpm, is_key_padding_mask=True)
    assert got.shape == (1, 64) and got.dtype == torch.float16
    assert attn.transpose_mask_for_sparse(torch.float32, torch.ones(1, 1, 64, 64)).shape == (64, 64)
    SparseSelfAttention.ops.clear()
    triple = attn.get_ops(2, 64)
    assert SparseSelfAttention.ops[64] is triple  # recorded where DeepSpeed code looks


SCRIPT = textwrap.dedent("""
    # A DeepSpeed-style fine-tuning step: BERT's self-attention replaced by sparse
    # self-attention, inputs padded to the block, DeepSpeed's operators used directly.
    import torch
    import transformers
    from deepspeed.ops.sparse_attention import FixedSparsityConfig, SparseAttentionUtils
    from deepspeed.ops.sparse_attention.matmul import MatMul
    from deepspeed.ops.sparse_attention.softmax import Softmax

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: under Triton's interpreter
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(cfg)
    model = SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        model, 64, FixedSparsityConfig(num_heads=2, block=16, num_local_blocks=2)).to(dev)
    ids = torch.randint(3, 100, (2, 40), device=dev)
    mask = torch.ones(2, 40, dtype=torch.long, device=dev)
    pad, ids, mask, types, _, _ = SparseAttentionUtils.pad_to_block_size(
        16, ids, mask, torch.zeros_like(ids), None, None, 0, model.bert.embeddings)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.classifier.weight.detach().clone()
    loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                 labels=torch.tensor([0, 1], device=dev)).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.classifier.weight)

    layout = torch.ones(2, 2, 2, dtype=torch.int64)
    q = torch.randn(1, 2, 32, 16, device=dev)
    sdd = MatMul(layout, 16, "sdd", trans_a=False, trans_b=True, bench=False)
    dsd = MatMul(layout, 16, "dsd", trans_a=False, trans_b=False, bench=False)
    softmax = Softmax(layout, 16, bench=False)
    w = sdd(q, q)
    w2 = softmax(w, scale=0.25)
    assert w2 is w  # in place, as DeepSpeed's
    out = dsd(w, q)
    ref = torch.softmax(q @ q.transpose(-1, -2) * 0.25, -1) @ q
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    print("script ok", round(loss.item(), 4))
""")


def run_script(tmp_path, prefix: str, preamble: str = ""):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("deepspeed.ops.sparse_attention", prefix))
    code = preamble + f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("how", ["prefix", "install"])
def test_deepspeed_script_runs(tmp_path, how):
    pytest.importorskip("transformers")
    if how == "prefix":  # only the import prefix changed
        done = run_script(tmp_path, "blocksparse_attn.deepspeed")
    else:  # the script unchanged, the stand-in installed first
        done = run_script(
            tmp_path,
            "deepspeed.ops.sparse_attention",
            "import blocksparse_attn.deepspeed as d; d.install(); ",
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "script ok" in done.stdout


def test_install_refuses_beside_deepspeed(monkeypatch):
    import types

    import blocksparse_attn.deepspeed as ds

    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    assert_raises_with(
        RuntimeError, ["DeepSpeed is installed", "blocksparse_attn.deepspeed"], ds.install
    )


def test_install_and_uninstall():
    import blocksparse_attn.deepspeed as ds

    if "deepspeed" in sys.modules:
        pytest.skip("a deepspeed module is already imported")
    try:
        ds.install()
        ds.install()  # twice is a no-op
        from deepspeed.ops.sparse_attention import SparseSelfAttention
        from deepspeed.ops.sparse_attention.softmax import Softmax as S

        assert SparseSelfAttention is ds.SparseSelfAttention and S is ds.Softmax
        # libraries probe for DeepSpeed this way (transformers at import): it must answer
        import importlib.util

        for name in ("deepspeed", "deepspeed.ops", "deepspeed.ops.sparse_attention"):
            assert importlib.util.find_spec(name) is not None
    finally:
        ds.uninstall()
    assert "deepspeed" not in sys.modules and "deepspeed.ops.sparse_attention" not in sys.modules
