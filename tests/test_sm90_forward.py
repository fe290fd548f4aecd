"""The fused forward's Gluon kernel for Hopper (``kernels/sm90_fwd.py``): it compiles for
sm90 on any machine (head dims 64 and 128); on an sm90 GPU it is the forward of the inputs
``sm90_forward_plan`` accepts (head dims 128 and 64), equal to the fp64 reference (output and
log-sum-exp) and to the Triton forward, deterministic, lists cut into parts merged, and
every other input keeps the Triton forward."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from blocksparse_attn import KVBlocks, block_sparse_attention

from attention_cases import assert_lse_close, assert_within_rule, poison, reference_lse, references
from hopper_cases import (
    compiled_in_a_new_process,
    counting,
    draw_problem,
    inputs,
    layout_of,
    needs_hopper,
    problem_settings,
    short_parts,
    shuffled_lists,
)


def test_forward_compiles_for_sm90_without_spills():
    """The forward, head dims 64 and 128, causal or not, a positive scale or not, lowers
    to sm90 machine code here (no GPU needed), keeps every value in registers (``ptxas
    -v``: no spills, no serialized ``wgmma``) and fits an H100's shared memory per block."""
    found = compiled_in_a_new_process(
        "blocksparse_attn.kernels.sm90_fwd", "compile_forward_for_sm90"
    )
    assert {(r["head_dim"], r["causal"], r["positive_scale"]) for r in found} == {
        (D, causal, positive)
        for D in (64, 128)
        for causal, positive in ((False, True), (True, True), (True, False))
    }
    for r in found:
        assert r["spills"] == 0 and r["serialized"] == 0, r
        assert 0 < r["shared"] <= 227 * 1024, r


def check_forward(monkeypatch, q, k, v, layout, kw, hopper=True):
    """Output and log-sum-exp within the fp64 rule, every element written (NaN-poisoned
    buffers), through the Hopper forward (``hopper``) or not; the output returned."""
    from blocksparse_attn.kernels import sm90_fwd

    poison(monkeypatch)
    calls = counting(monkeypatch, sm90_fwd, "sm90_forward")
    out, lse = block_sparse_attention(q, k, v, layout, backend="fused", return_lse=True, **kw)
    assert len(calls) == int(hopper)
    (ref64, _), (lowp, _) = references(q, k, v, layout, kw, None)
    assert_within_rule("out", out, ref64, lowp)
    assert_lse_close(lse, reference_lse(q, k, v, layout, kw), q.dtype)
    return out


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "pattern,causal",
    [("dense", False), ("block_causal", True), ("random", False), ("random", True)],
)
@pytest.mark.parametrize("H,Hkv,layout_heads", [(3, 3, 1), (4, 2, 2), (4, 1, 4)])
@pytest.mark.parametrize("D", [128, 64])
def test_hopper_forward_matches_fp64(monkeypatch, dtype, pattern, causal, H, Hkv, layout_heads, D):
    """Dense, block-causal and random layouts (empty query and key blocks), token-causal or
    not, one kv head per query head or grouped ones, shared or per-head layouts, head dims
    128 and 64."""
    L = 640
    layout = layout_of(pattern, layout_heads, L // 128).cuda()
    q, k, v = inputs(2, H, Hkv, L, D, dtype)
    check_forward(monkeypatch, q, k, v, layout, dict(block=128, causal=causal))


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_forward_merges_lists_cut_into_parts(monkeypatch, causal):
    """Every list longer than half the mean cut into parts: each part's unnormalised
    result and statistics go to the Triton merge kernel; the output, the log-sum-exp and
    the gradients (the Hopper backward, which cuts the same lists) meet the fp64 rule."""
    from blocksparse_attn.index import get_index

    short_parts(monkeypatch)
    L, nb = 1024, 8
    layout = torch.eye(nb, dtype=torch.long).expand(2, nb, nb).clone()
    layout[:, 0] = 1  # a global row
    layout[1, 5, :6] = 1
    layout = layout.cuda()
    q, k, v = (t.requires_grad_() for t in inputs(2, 2, 2, L, 128, torch.bfloat16))
    kw = dict(block=128, causal=causal)
    idx = get_index(layout, 128, q_len=L, k_len=L, tile_m=128, tile_n=128, causal=causal)
    assert idx.rows.parts > 0
    out = check_forward(monkeypatch, q, k, v, layout, kw)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    (_, g64), (_, glow) = references(q, k, v, layout, kw, grad_out)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, g64, glow):
        assert_within_rule(name, g, r, lo)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_forward_of_block_lists(monkeypatch, per_sample, causal):
    """Block lists shared by the batch or one per sample, shuffled, of unequal lengths
    (an empty one too), grouped K/V heads."""
    B, H, Hkv, L = 2, 4, 2, 768
    nb = L // 128
    g = torch.Generator().manual_seed(5)
    dense = torch.rand(B if per_sample else 1, 2, nb, nb, generator=g) < 0.45
    dense[0, 0, 1] = False
    blocks = shuffled_lists(dense, g)
    q, k, v = inputs(B, H, Hkv, L, 128, torch.bfloat16)
    check_forward(monkeypatch, q, k, v, blocks, dict(block=128, causal=causal))


@needs_hopper
@pytest.mark.gpu
@problem_settings(24)
@given(data=st.data())
def test_random_problems_in_the_hopper_forward(monkeypatch, data):
    """Random problems inside the Hopper forward's domain (batch, heads and their
    grouping, layout heads, 1-8 blocks, density, causal, scale of any sign, input
    magnitude, fp16 or bf16): output and log-sum-exp meet the fp64 rule."""
    q, k, v, layout, kw = draw_problem(data.draw)
    check_forward(monkeypatch, q, k, v, layout, kw)


@needs_hopper
@pytest.mark.gpu
def test_hopper_forward_equals_triton_and_is_deterministic(monkeypatch):
    """The same output and log-sum-exp as the Triton forward (``BLOCKSPARSE_ATTN_SM90=0``)
    within bf16 rounding, and bit for bit the same from one run to the next."""
    B, H, L, D = 2, 4, 1024, 128
    layout = layout_of("random", H, L // 128).cuda()
    q, k, v = inputs(B, H, H, L, D, torch.bfloat16)

    def forward():
        return block_sparse_attention(q, k, v, layout, block=128, return_lse=True)

    first, again = forward(), forward()
    monkeypatch.setenv("BLOCKSPARSE_ATTN_SM90", "0")
    triton_result = forward()
    for a, b, t in zip(first, again, triton_result):
        assert torch.equal(a, b)
        finite = torch.isfinite(t)
        assert torch.equal(finite, torch.isfinite(a))
        scale = t[finite].float().abs().max().item()
        assert (a[finite].float() - t[finite].float()).abs().max().item() <= 2e-2 * scale


@needs_hopper
@pytest.mark.gpu
def test_hopper_forward_plan_keeps_triton_elsewhere():
    """Inputs the Hopper forward does not cover keep the Triton forward: a mask or rpe,
    head dim 96, block lists at head dim 64 (the Triton backward's index serves the step),
    block 64, rectangular lengths, non-contiguous inputs, fp32; the covered cases (head
    dims 128 and 64, grouped heads, block lists at 128) take it."""
    from blocksparse_attn.kernels.fused_fwd import sm90_forward_plan

    def plan(H=2, Hkv=2, Lq=512, Lk=512, D=128, block=128, dtype=torch.bfloat16, **kw):
        q = torch.randn(1, H, Lq, D, device="cuda", dtype=dtype)
        k = torch.randn(1, Hkv, Lk, D, device="cuda", dtype=dtype)
        if kw.get("strided"):
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        layout = kw.get("layout")
        if layout is None:
            layout = torch.ones(H, Lq // block, Lk // block, dtype=torch.long, device="cuda")
        return sm90_forward_plan(q, k, k, layout, block, masked=kw.get("masked", False))

    assert plan() and plan(Hkv=1)
    assert not plan(masked=True)
    assert plan(D=64)
    assert not plan(D=96)
    assert not plan(block=64)
    assert not plan(Lk=640)
    assert not plan(strided=True)
    assert not plan(dtype=torch.float32)
    lists = KVBlocks.from_layout(torch.ones(1, 2, 4, 4, dtype=torch.long, device="cuda"))
    assert plan(layout=lists)
    assert not plan(layout=lists, D=64)
