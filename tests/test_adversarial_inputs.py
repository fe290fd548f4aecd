"""Inputs that once gave silently wrong answers: each backend against the fp64 reference (or
exact math) on second derivatives, negative scales, layouts edited behind autograd's back,
masked non-finite keys, mask gradients, finfo.min padding, fp16 overflow and degenerate
shapes. On CPU the kernels run under Triton's interpreter."""

import math

import numpy as np
import pytest
import torch

from blocksparse_attn import block_sparse_attention, reference_attention
from blocksparse_attn.ops.softmax import Softmax

from attention_cases import max_err, poison
from helpers import DEVICE, assert_raises_with

pytestmark = pytest.mark.interpreter

BACKENDS = ["fused", "unfused", "reference"]
KERNELS = ["fused", "unfused"]


def qkv(B, H, L, D, dtype=torch.float32, grad=False, scale=1.0):
    return [
        (torch.randn(B, H, L, D, device=DEVICE) * scale).to(dtype).requires_grad_(grad)
        for _ in range(3)
    ]


def ref64(q, k, v, layout, **kw):
    """fp64 reference output (and lse) on detached copies."""
    return reference_attention(
        q.detach().double(), k.detach().double(), v.detach().double(), layout, return_lse=True, **kw
    )


# --- 1. double backward ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNELS)
def test_second_derivative_is_refused_not_dropped(backend):
    q, k, v = qkv(1, 2, 64, 16, grad=True)
    layout = torch.ones(1, 4, 4, dtype=torch.int64)
    out = block_sparse_attention(q, k, v, layout, block=16, backend=backend)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    assert dq.requires_grad  # a graph was asked for: the gradient must not pretend to be final
    assert_raises_with(
        NotImplementedError,
        ["double backward", "backend='reference'"],
        lambda: dq.square().sum().backward(),
    )


@pytest.mark.parametrize("backend", KERNELS)
def test_first_derivatives_with_create_graph_are_right(backend):
    # create_graph=True for a first derivative alone (the gradient is not differentiated)
    q, k, v = qkv(1, 2, 64, 16, grad=True)
    layout = torch.tensor([[[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]]])
    out = block_sparse_attention(q, k, v, layout, block=16, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, layout, block=16)
    expect = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    for g, e in zip(grads, expect):
        assert max_err(g, e) < 1e-4


def test_reference_second_derivative():
    q, k, v = (torch.randn(1, 1, 32, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    layout = torch.tensor([[[1, 0], [1, 1]]])
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: reference_attention(q, k, v, layout, block=16, causal=True), (q, k, v)
    )


# --- 2. scale sign ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-0.125, 0.0, -3.0])
def test_negative_and_zero_scale(monkeypatch, backend, scale):
    poison(monkeypatch)
    q, k, v = qkv(1, 2, 128, 16, scale=10.0)  # dense layout, no mask: the mask-free loop
    layout = torch.ones(2, 2, 2, dtype=torch.int64)
    out = block_sparse_attention(q, k, v, layout, block=64, scale=scale, backend=backend)
    ref, _ = ref64(q, k, v, layout, block=64, scale=scale)
    assert not torch.isnan(out).any()
    assert max_err(out, ref) < 1e-4 * max(1.0, ref.abs().max().item())


# --- 3. layouts edited where the version counter does not see -------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["data", "numpy"])
def test_layout_edited_behind_autograd(backend, how):
    q, k, v = qkv(1, 1, 64, 16)
    layout = torch.ones(1, 4, 4, dtype=torch.int64)
    before = block_sparse_attention(q, k, v, layout, block=16, backend=backend)
    assert before[0, 0, 16:32].abs().max() > 0.1
    version = layout._version
    if how == "data":
        layout.data[0, 1] = 0
    else:
        np.asarray(layout.numpy())[0, 1] = 0
    assert layout._version == version  # the edit is invisible to the version counter
    after = block_sparse_attention(q, k, v, layout, block=16, backend=backend)
    assert bool((after[0, 0, 16:32] == 0).all()), "the old layout's index was served"
    ref, _ = ref64(q, k, v, layout, block=16)
    assert max_err(after, ref) < 1e-5


def test_backward_uses_the_forwards_layout():
    # editing the layout between forward and backward must not mix two layouts
    q, k, v = qkv(1, 1, 64, 16, grad=True)
    layout = torch.ones(1, 4, 4, dtype=torch.int64)
    out = block_sparse_attention(q, k, v, layout, block=16, backend="fused")
    layout.data[0, 2] = 0
    (dq,) = torch.autograd.grad(out.sum(), q)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, torch.ones(1, 4, 4, dtype=torch.int64), block=16)
    assert max_err(dq, torch.autograd.grad(ref.sum(), q64)[0]) < 1e-5


# --- 4 and 9. non-finite keys and values where no query may look ---------------------------
def padding_mask(mode, B, L, hidden):
    if mode == "mul":
        m = torch.ones(B, L, dtype=torch.int64, device=DEVICE)
        m[:, hidden] = 0
    else:
        m = torch.zeros(B, L, device=DEVICE)
        m[:, hidden] = float("-inf")
        m[0, :8] = -1.5  # finite entries still add
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["mul", "add"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_keys_hidden_by_padding(monkeypatch, backend, mode, bad):
    poison(monkeypatch)
    B, H, L = 2, 2, 128
    q, k, v = qkv(B, H, L, 16)
    hidden = torch.arange(100, 128)
    kpm = padding_mask(mode, B, L, hidden)
    layout = (torch.rand(H, 8, 8) < 0.7).long()
    layout[:, :, 0] = 1
    kw = dict(block=16, key_padding_mask=kpm, key_padding_mask_mode=mode, causal=True)
    clean = [t.clone().requires_grad_() for t in (q, k, v)]
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[:, :, hidden] = bad
    dirty_v[:, :, hidden] = bad
    dirty = [t.clone().requires_grad_() for t in (q, dirty_k, dirty_v)]
    out_clean = block_sparse_attention(*clean, layout, backend=backend, **kw)
    out_dirty = block_sparse_attention(*dirty, layout, backend=backend, **kw)
    assert torch.isfinite(out_dirty).all()
    assert max_err(out_dirty, out_clean) == 0.0
    g = torch.randn_like(out_clean)
    for a, b in zip(
        torch.autograd.grad(out_clean, clean, g), torch.autograd.grad(out_dirty, dirty, g)
    ):
        assert torch.isfinite(b).all() and max_err(a, b) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_values_in_blocks_no_query_attends(monkeypatch, backend):
    poison(monkeypatch)
    q, k, v = qkv(1, 2, 128, 16)
    layout = (torch.rand(2, 8, 8) < 0.6).long()
    layout[:, :, 0] = 1
    layout[:, :, 5] = 0  # key block 5: no query attends it
    v[:, :, 80:96] = math.nan
    k[:, :, 80:96] = math.inf
    out = block_sparse_attention(q, k, v, layout, block=16, backend=backend)
    ref, _ = ref64(q, k, v, layout, block=16)
    assert torch.isfinite(out).all() and max_err(out, ref) < 1e-5


def test_reference_keeps_nonfinite_values_to_the_queries_that_see_them():
    q, k, v = qkv(1, 1, 64, 8)
    v[:, :, 40] = math.nan
    out = reference_attention(
        q, k, v, torch.ones(1, 4, 4, dtype=torch.int64), block=16, causal=True
    )
    assert torch.isfinite(out[:, :, :40]).all() and torch.isnan(out[:, :, 40:]).all()


def test_reference_log_sum_exp_of_nan_and_empty_rows():
    """A NaN key score makes the log-sum-exp of the queries that see it NaN; a query with
    nothing to attend gets -inf; the others stay finite."""
    q, k, v = qkv(1, 1, 64, 8)
    k[:, :, 40] = math.nan
    am = torch.zeros(64, 64, device=DEVICE)
    am[5] = -math.inf  # query 5 sees nothing
    _, lse = reference_attention(
        q,
        k,
        v,
        torch.ones(1, 4, 4, dtype=torch.int64),
        block=16,
        causal=True,
        attn_mask=am,
        attn_mask_mode="add",
        return_lse=True,
    )
    lse = lse[0, 0]
    assert lse[5].isneginf() and torch.isnan(lse[40:]).all()
    assert torch.isfinite(lse[:40][torch.arange(40) != 5]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["attn_mask_mul", "attn_mask_add", "kpm_add_nan_score"])
def test_masked_scores_are_replaced(backend, which):
    # NaN keys under a mask that hides them from the queries that would see them
    q, k, v = qkv(1, 2, 64, 16)
    layout = torch.ones(1, 4, 4, dtype=torch.int64)
    k[:, :, 20] = math.nan
    kw = dict(block=16)
    if which == "attn_mask_mul":
        kw.update(
            attn_mask=torch.ones(64, 64, dtype=torch.bool, device=DEVICE), attn_mask_mode="mul"
        )
        kw["attn_mask"][:, 20] = False
    elif which == "attn_mask_add":
        kw.update(attn_mask=torch.zeros(64, 64, device=DEVICE), attn_mask_mode="add")
        kw["attn_mask"][:, 20] = -math.inf
    else:
        kw.update(key_padding_mask=torch.zeros(1, 64, device=DEVICE))
        kw["key_padding_mask"][:, 20] = -math.inf
    out = block_sparse_attention(q, k, v, layout, backend=backend, **kw)
    k[:, :, 20] = 0.0
    ref, _ = ref64(q, k, v, layout, **kw)
    assert torch.isfinite(out).all() and max_err(out, ref) < 1e-5


# --- 5. gradients of additive masks ----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_additive_mask_gradients_agree(backend):
    q, k, v = qkv(2, 2, 64, 16)
    layout = (torch.rand(2, 4, 4) < 0.7).long()
    layout[:, :, 0] = 1
    kpm = (torch.randn(2, 64, device=DEVICE) * 0.5).requires_grad_()
    am = (torch.randn(64, 64, device=DEVICE) * 0.5).requires_grad_()
    kw = dict(block=16, key_padding_mask_mode="add", attn_mask_mode="add")
    out = block_sparse_attention(
        q, k, v, layout, key_padding_mask=kpm, attn_mask=am, backend=backend, **kw
    )
    g = torch.randn_like(out)
    dkpm, dam = torch.autograd.grad(out, (kpm, am), g)
    kpm64, am64 = (t.detach().double().requires_grad_() for t in (kpm, am))
    ref = reference_attention(
        q.double(), k.double(), v.double(), layout, key_padding_mask=kpm64, attn_mask=am64, **kw
    )
    e_kpm, e_am = torch.autograd.grad(ref, (kpm64, am64), g.double())
    assert dkpm.shape == kpm.shape and dam.shape == am.shape
    assert max_err(dkpm, e_kpm) < 1e-4 and max_err(dam, e_am) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiplicative_masks_have_no_gradient(backend):
    q, k, v = qkv(1, 1, 32, 16, grad=True)
    am = torch.ones(32, 32, device=DEVICE).tril().requires_grad_()
    out = block_sparse_attention(
        q,
        k,
        v,
        torch.ones(1, 2, 2, dtype=torch.int64),
        block=16,
        attn_mask=am,
        attn_mask_mode="mul",
        backend=backend,
    )
    out.sum().backward()
    assert am.grad is None and q.grad is not None


# --- 6. finfo.min as additive padding ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_finfo_min_padding_of_a_whole_row(monkeypatch, backend):
    poison(monkeypatch)
    q, k, v = qkv(2, 2, 64, 16, grad=True)
    kpm = torch.zeros(2, 64, device=DEVICE)
    kpm[0] = torch.finfo(torch.float32).min  # batch 0: every key padded (what HF builds)
    kpm[1, 40:] = torch.finfo(torch.float32).min
    layout = torch.ones(1, 4, 4, dtype=torch.int64)
    out = block_sparse_attention(q, k, v, layout, block=16, key_padding_mask=kpm, backend=backend)
    mean_v = v[0].detach().mean(1, keepdim=True).expand(-1, 64, -1)
    assert max_err(out[0], mean_v) < 1e-5, "a fully padded row is the mean of V, as the math"
    ref, _ = ref64(q, k, v, layout, block=16, key_padding_mask=kpm)
    assert max_err(out, ref) < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r = reference_attention(*leaves, layout, block=16, key_padding_mask=kpm)
    for a, e in zip(got, torch.autograd.grad(r, leaves, g.double())):
        assert max_err(a, e) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_summing_past_float32(monkeypatch, backend):
    """Two finfo.min entries on one key (a padded key under a masked attn_mask entry) sum to
    -inf in float32, so the key is masked; a row left with only such keys has nothing to
    attend: zero output, log-sum-exp -inf and no gradient, also through a loss of the
    log-sum-exp guarded by ``where(isfinite)`` (the reference's was NaN there)."""
    poison(monkeypatch)
    lowest = torch.finfo(torch.float32).min
    q, k, v = qkv(1, 2, 32, 16, grad=True)
    kpm = torch.full((1, 32), lowest, device=DEVICE)
    kpm[0, :4] = 0.0  # keys 0-3 not padded
    am = torch.zeros(32, 32, device=DEVICE)
    am[3, :4] = -math.inf  # row 3: keys 0-3 masked, the padded keys under finfo.min too
    am[3, 4:] = lowest
    kpm.requires_grad_()
    am.requires_grad_()
    layout = torch.ones(1, 2, 2, dtype=torch.int64)
    kw = dict(block=16, key_padding_mask=kpm, attn_mask=am, attn_mask_mode="add")
    with_lse = backend != "unfused"
    result = block_sparse_attention(q, k, v, layout, backend=backend, return_lse=with_lse, **kw)
    out, lse = result if with_lse else (result, None)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    go = torch.randn_like(out)
    outputs, seeds = [out], [go]
    if with_lse:
        assert lse[:, :, 3].isneginf().all() and lse[:, :, [0, 1, 2, 4]].isfinite().all()
        glse = torch.randn_like(lse)
        outputs.append(torch.where(lse.isfinite(), lse, 0.0))
        seeds.append(glse)
    got = torch.autograd.grad(outputs, (q, k, v, kpm, am), seeds)
    # the fp64 rule: the float32 sum's -inf written into the mask
    am64 = torch.where(torch.isneginf(kpm.detach() + am.detach()), -math.inf, am.detach())
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, kpm, am64)]
    ref, ref_lse = reference_attention(
        *leaves[:3],
        layout,
        block=16,
        key_padding_mask=leaves[3],
        attn_mask=leaves[4],
        attn_mask_mode="add",
        return_lse=True,
    )
    assert max_err(out, ref) < 1e-5
    ref_out = [ref, torch.where(ref_lse.isfinite(), ref_lse, 0.0)][: len(outputs)]
    want = torch.autograd.grad(ref_out, leaves, [t.double() for t in seeds])
    for name, a, e in zip(("q", "k", "v", "kpm", "am"), got, want):
        assert not a.isnan().any(), name
        assert max_err(a, e) < 1e-4, name


# --- 7. fp16 overflow and rounding of the scores on the unfused path ------------------------
def test_unfused_fp16_large_products(monkeypatch):
    poison(monkeypatch)
    q, k, v = qkv(1, 2, 64, 16, scale=100.0)  # q.k ~ 1e5 > fp16's 65504
    q, k, v = q.half(), k.half(), v.half()
    layout = (torch.rand(2, 4, 4) < 0.7).long()
    layout[:, :, 0] = 1
    ref, _ = ref64(q, k, v, layout, block=16)
    for backend in KERNELS:
        out = block_sparse_attention(q, k, v, layout, block=16, backend=backend)
        assert torch.isfinite(out).all(), backend
        assert max_err(out, ref) < 0.02 * max(1.0, ref.abs().max().item()), backend


def test_unfused_fp16_large_scale(monkeypatch):
    # q.k of two keys: 8 and 8 + 2**-8, one value in fp16 (spacing 2**-7 at 8); with
    # scale 1e4 the second key takes all the weight, so scores rounded to fp16 before the
    # scale would give the mean of the two values instead
    poison(monkeypatch)
    q = torch.zeros(1, 1, 16, 16, dtype=torch.float16, device=DEVICE)
    k, v = torch.zeros_like(q), torch.zeros_like(q)
    q[..., 0], q[..., 1] = 1.0, 1.0
    k[..., 0, 0], k[..., 1, 0], k[..., 1, 1] = 8.0, 8.0, 2.0**-8
    v[..., 1, :] = 1.0
    layout = torch.ones(1, 1, 1, dtype=torch.int64)
    for backend in KERNELS:
        out = block_sparse_attention(q, k, v, layout, block=16, scale=1e4, backend=backend)
        assert max_err(out, torch.ones_like(out)) < 1e-3, backend


# --- 8. degenerate shapes ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq, Lk", [(0, 0), (32, 0), (0, 32)])
def test_empty_sequences(backend, Lq, Lk):
    q = torch.randn(2, 3, Lq, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, 3, Lk, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    layout = torch.ones(3, Lq // 16, Lk // 16, dtype=torch.int64)
    if backend == "unfused":
        out = block_sparse_attention(q, k, v, layout, block=16, backend=backend)
        lse = None
    else:
        out, lse = block_sparse_attention(
            q, k, v, layout, block=16, backend=backend, return_lse=True
        )
        assert lse.shape == (2, 3, Lq) and bool(torch.isneginf(lse).all())
    assert out.shape == (2, 3, Lq, 16) and bool((out == 0).all())
    out.sum().backward()
    assert q.grad is None or bool((q.grad == 0).all())


def test_zero_head_dim_is_refused():
    q = torch.randn(1, 1, 16, 0)
    assert_raises_with(
        ValueError,
        ["q.shape[3] (head dim)", "at least 1"],
        block_sparse_attention,
        q,
        q,
        q,
        torch.ones(1, 1, 1, dtype=torch.int64),
        block=16,
    )


def test_meta_layout_is_refused():
    q = torch.randn(1, 1, 16, 8)
    layout = torch.ones(1, 1, 1, device="meta")
    for backend in BACKENDS:
        assert_raises_with(
            ValueError,
            ["layout must be a tensor with data", "meta"],
            block_sparse_attention,
            q,
            q,
            q,
            layout,
            block=16,
            backend=backend,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
def test_complex_masks_are_refused(backend, name):
    q = torch.randn(1, 1, 16, 8, device=DEVICE)
    mask = (
        torch.ones(1, 16, dtype=torch.complex64)
        if name == "key_padding_mask"
        else torch.ones(16, 16, dtype=torch.complex64)
    )
    assert_raises_with(
        ValueError,
        [name, "real"],
        block_sparse_attention,
        q,
        q,
        q,
        torch.ones(1, 1, 1, dtype=torch.int64),
        block=16,
        backend=backend,
        **{name: mask.to(DEVICE)},
    )


def test_softmax_refuses_complex_masks():
    softmax = Softmax(torch.ones(1, 1, 1, dtype=torch.int64), 16)
    x = torch.randn(1, 1, 16, 16, device=DEVICE)
    assert_raises_with(
        ValueError,
        ["attn_mask", "real"],
        softmax,
        x,
        attn_mask=torch.ones(16, 16, dtype=torch.complex64, device=DEVICE),
    )
