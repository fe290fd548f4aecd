"""The fused backward's Gluon kernels for Hopper (``kernels/sm90_bwd.py``): they compile
for sm90 on any machine; on an sm90 GPU they are the backward of the layouts
``sm90_backward_plan`` accepts, equal to the fp64 reference (gradients of the output and
of the log-sum-exp) and to the Triton backward, deterministic by default (the dK/dV and
dQ kernels) and with ``deterministic=False`` the one dK/dV/dQ kernel, and every other
input keeps the Triton kernels."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from blocksparse_attn import block_sparse_attention, reference_attention

from attention_cases import assert_within_rule, poison
from hopper_cases import (
    compiled_in_a_new_process,
    counting,
    draw_problem,
    layout_of,
    needs_hopper,
    problem_settings,
    short_parts,
    shuffled_lists,
)


def test_kernels_compile_for_sm90_without_spills():
    """The three kernels, causal or not, lower to sm90 machine code here (no GPU needed) and
    keep every value in registers (``ptxas -v``: no spills) without serializing their
    ``wgmma`` pipelines."""
    found = compiled_in_a_new_process("blocksparse_attn.kernels.sm90_bwd", "compile_for_sm90")
    assert {(r["kernel"], r["causal"]) for r in found} == {
        (kernel, causal) for kernel in ("dK/dV", "dK/dV/dQ", "dQ") for causal in (False, True)
    }
    for r in found:
        assert r["spills"] == 0 and r["serialized"] == 0, r
        assert 0 < r["shared"] <= 227 * 1024, r  # within an H100's shared memory per block


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "pattern,causal",
    [("dense", False), ("block_causal", True), ("random", False), ("random", True)],
)
@pytest.mark.parametrize("H,Hkv,layout_heads", [(3, 3, 1), (3, 3, 3), (4, 2, 2), (4, 1, 4)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_hopper_backward_matches_fp64(
    monkeypatch, dtype, pattern, causal, H, Hkv, layout_heads, deterministic
):
    """Gradients of the output and of the log-sum-exp through the Hopper kernels (the
    deterministic pair, or the dK/dV/dQ kernel), within the rule the Triton kernels meet
    (against fp64, relative to plain PyTorch in the dtype), with one kv head per query
    head or grouped ones; every output element written (NaN-poisoned buffers)."""
    poison(monkeypatch)
    B, L, D = 2, 640, 128
    layout = layout_of(pattern, layout_heads, L // 128).cuda()
    q, k, v = (
        torch.randn(B, h, L, D, device="cuda", dtype=dtype, requires_grad=True)
        for h in (H, Hkv, Hkv)
    )
    kw = dict(block=128, causal=causal, deterministic=deterministic)
    check_gradients(monkeypatch, q, k, v, layout, kw)


def check_gradients(monkeypatch, q, k, v, layout, kw):
    """The gradients of the output and of the log-sum-exp went through the Hopper kernels
    (the dK/dV/dQ kernel where ``kw`` says ``deterministic=False``) and meet the fp64
    rule."""
    from blocksparse_attn.kernels import sm90_bwd

    calls = counting(monkeypatch, sm90_bwd, "sm90_dkdv", "sm90_dq", "sm90_dkdvdq")
    out, lse = block_sparse_attention(q, k, v, layout, backend="fused", return_lse=True, **kw)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse).masked_fill(torch.isneginf(lse), 0.0)
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
    deterministic = kw.pop("deterministic", True)
    assert calls == (["sm90_dkdv", "sm90_dq"] if deterministic else ["sm90_dkdvdq"])
    refs = []
    for ct in (torch.float64, q.dtype):
        leaves = [t.detach().to(ct).requires_grad_() for t in (q, k, v)]
        o, s = reference_attention(*leaves, layout, compute_dtype=ct, return_lse=True, **kw)
        keep = ~torch.isneginf(s)
        loss = (o * grad_out.to(ct)).sum() + (s[keep] * grad_lse.to(s.dtype)[keep]).sum()
        refs.append(torch.autograd.grad(loss, leaves))
    for name, g, r64, lowp in zip(("dq", "dk", "dv"), grads, *refs):
        assert g.dtype == q.dtype
        assert_within_rule(name, g, r64, lowp)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv,layout_heads", [(2, 2, 2), (4, 2, 1), (4, 2, 2)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_hopper_backward_of_block_lists(
    monkeypatch, per_sample, causal, H, Hkv, layout_heads, deterministic
):
    """Block lists (:class:`~blocksparse_attn.KVBlocks`), shared by the batch or one per
    sample, in any order and of unequal lengths (empty ones too), go through the Hopper
    kernels (both backwards) and meet the fp64 rule."""
    poison(monkeypatch)
    B, L, D = 2, 768, 128
    nb = L // 128
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(B if per_sample else 1, layout_heads, nb, nb, generator=g) < 0.45
    dense[0, 0, 1] = False  # a query block with nothing to attend
    dense[-1, -1, 2] = True
    blocks = shuffled_lists(dense, g)
    q, k, v = (
        torch.randn(B, h, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (H, Hkv, Hkv)
    )
    kw = dict(block=128, causal=causal, deterministic=deterministic)
    check_gradients(monkeypatch, q, k, v, blocks, kw)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_hopper_backward_of_lists_cut_into_parts(monkeypatch, causal, H, Hkv, deterministic):
    """Row and column lists cut into parts (a global row and a global column, the rest a
    window): each part's dK/dV (and, deterministic, dQ) goes to its fp32 slot and the
    slots are summed; the gradients meet the fp64 rule, with one kv head per query head
    or grouped ones (each query head's share summed over its group after its parts)."""
    from blocksparse_attn.index import get_index

    poison(monkeypatch)
    short_parts(monkeypatch)
    L, nb = 1024, 8
    window = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs() <= 1
    layout = window.long().expand(2, nb, nb).clone()
    layout[:, 0] = 1  # a global row
    layout[:, :, 3] = 1  # a global column
    layout[1, 6, :] = 0  # a query block with nothing to attend
    layout = layout.cuda()
    idx = get_index(layout, 128, q_len=L, k_len=L, tile_m=128, tile_n=128, causal=causal)
    assert idx.rows.parts > 0 and idx.cols.parts > 0
    q, k, v = (
        torch.randn(2, h, L, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (H, Hkv, Hkv)
    )
    kw = dict(block=128, causal=causal, deterministic=deterministic)
    check_gradients(monkeypatch, q, k, v, layout, kw)


@needs_hopper
@pytest.mark.gpu
@problem_settings(20)
@given(data=st.data())
def test_random_problems_in_the_hopper_backward(monkeypatch, data):
    """Random problems inside the Hopper backward's domain (batch, heads and their
    grouping, layout heads, 1-8 blocks, density, causal, scale, input magnitude, fp16 or
    bf16, lists whole or cut into short parts), through either backward: its gradients
    meet the fp64 rule."""
    poison(monkeypatch)
    q, k, v, layout, kw = draw_problem(data.draw)
    kw["deterministic"] = data.draw(st.booleans())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with monkeypatch.context() as m:
        if data.draw(st.booleans(), label="cut"):
            short_parts(m)
        check_gradients(m, q, k, v, layout, kw)


def random_step():
    """The gradients of q, k, v for one random problem (bf16, B 2, H 4, L 1024, D 128, a
    random block-128 layout) as a function of ``block_sparse_attention``'s keywords."""
    B, H, L, D = 2, 4, 1024, 128
    layout = layout_of("random", H, L // 128).cuda()
    q, k, v = (
        torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    grad_out = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)

    def grads(**kw):
        out = block_sparse_attention(q, k, v, layout, block=128, backend="fused", **kw)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    return grads


def assert_bf16_close(got, want):
    """Each gradient within bf16 rounding of the other's (2% of its largest element)."""
    for a, t in zip(got, want):
        scale = t.float().abs().max().item()
        assert (a.float() - t.float()).abs().max().item() <= 2e-2 * scale


@needs_hopper
@pytest.mark.gpu
def test_hopper_backward_equals_triton_and_is_deterministic(monkeypatch):
    """The same gradients as the Triton backward (``BLOCKSPARSE_ATTN_SM90=0``) within bf16
    rounding, and bit for bit the same from one run to the next."""
    grads = random_step()
    first, again = grads(), grads()
    monkeypatch.setenv("BLOCKSPARSE_ATTN_SM90", "0")
    assert_bf16_close(first, grads())
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@needs_hopper
@pytest.mark.gpu
def test_faster_backward_is_asked_for(monkeypatch):
    """``deterministic=False`` takes the dK/dV/dQ kernel, whose gradients are within bf16
    rounding of the deterministic ones; the default, and
    ``torch.use_deterministic_algorithms``, keep the deterministic kernels."""
    from blocksparse_attn.kernels import sm90_bwd

    grads = random_step()
    calls = counting(monkeypatch, sm90_bwd, "sm90_dkdv", "sm90_dq", "sm90_dkdvdq")
    exact = grads()
    assert calls == ["sm90_dkdv", "sm90_dq"]
    calls.clear()
    faster = grads(deterministic=False)
    assert calls == ["sm90_dkdvdq"]
    assert_bf16_close(faster, exact)
    calls.clear()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    grads(deterministic=False)
    assert calls == ["sm90_dkdv", "sm90_dq"]


@needs_hopper
@pytest.mark.gpu
def test_hopper_backward_plan_keeps_triton_elsewhere():
    """The inputs the Hopper kernels do not cover, or were not measured faster on, keep
    the Triton kernels: head dim 64, block 64, rectangular lengths, a 4-D layout (the
    functional layer folds it into heads first), non-contiguous inputs; the covered cases
    (block lists too, shared or per sample, and lists cut into parts) take the Hopper
    kernels."""
    from blocksparse_attn.kernels.fused_bwd import sm90_backward_plan

    def plan(B=1, H=2, Hkv=2, Lq=512, Lk=512, D=128, block=128, layout=None, t=False):
        q = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, Lk, D, device="cuda", dtype=torch.bfloat16)
        if t:
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        if layout is None:
            layout = torch.ones(H, Lq // block, Lk // block, dtype=torch.long, device="cuda")
        return sm90_backward_plan(q, k, k, q, layout, block=block, causal=False)

    assert plan() is not None
    assert plan(D=64) is None
    assert plan(block=64) is None
    assert plan(Hkv=1) is not None  # grouped K/V heads
    assert plan(Lk=640) is None
    assert plan(layout=torch.ones(1, 2, 4, 4, dtype=torch.long, device="cuda")) is None
    from blocksparse_attn import KVBlocks

    lists = KVBlocks.from_layout(torch.ones(2, 2, 4, 4, dtype=torch.long, device="cuda"))
    assert plan(B=2, layout=lists) is not None  # block lists per sample
    assert plan(B=2, layout=KVBlocks.from_layout(lists.to_layout(4)[:1])) is not None
    assert plan(t=True) is None
    # window and global rows at 16k tokens: the global lists are cut into parts
    from blocksparse_attn.tools.bench_cases import pattern_layout

    wg = pattern_layout("window_global", 16384, 128, None).cuda()
    index = plan(H=1, Hkv=1, Lq=16384, Lk=16384, layout=wg)
    assert index.rows.parts > 0 and index.cols.parts > 0


def test_forward_tiles_are_the_hopper_forwards_where_it_runs(monkeypatch):
    """Where the Hopper forward runs (the Hopper kernels' domain, no bias or mask,
    contiguous inputs) the forward walks 128x128 tiles, dense layouts and block lists alike
    (the index the Hopper backward reads too); a masked call, non-contiguous inputs and
    inputs outside the domain keep the Triton forward's tiles. The domain is never claimed
    for CPU tensors."""
    from blocksparse_attn import KVBlocks
    from blocksparse_attn.kernels import availability, fused_fwd
    from blocksparse_attn.kernels.configs import Tiles, forward_tiles
    from blocksparse_attn.kernels.fused_fwd import sm90_forward_plan, step_forward_tiles

    q = torch.randn(1, 2, 256, 128, dtype=torch.bfloat16)
    lists = KVBlocks.from_layout(torch.ones(1, 2, 2, 2, dtype=torch.long))
    dense = torch.ones(2, 2, 2, dtype=torch.long)
    assert not availability.sm90_domain(q, q, dense, 128)
    assert not sm90_forward_plan(q, q, q, dense, 128, masked=False)
    own = forward_tiles(128, 128, 0.1, 2)
    assert step_forward_tiles(q, q, q, lists, 128, 0.1, masked=False) == own
    monkeypatch.setattr(availability, "sm90_domain", lambda *args: True)
    monkeypatch.setattr(fused_fwd, "descriptors_allowed", lambda *args: True)
    for layout in (lists, dense):
        assert step_forward_tiles(q, q, q, layout, 128, 0.1, masked=False) == Tiles(128, 128)
        assert step_forward_tiles(q, q, q, layout, 128, 0.1, masked=True) == own
    strided = torch.randn(1, 256, 2, 128, dtype=torch.bfloat16).transpose(1, 2)
    assert step_forward_tiles(q, q, strided, dense, 128, 0.1, masked=False) == own
