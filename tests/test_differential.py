"""Property-based differential tests: random problems (shapes with L_q != L_k, grouped-query
K/V, layouts shared or per sample, dense or as block lists, with empty rows and columns,
masks in both modes with extreme values, rpe of every broadcast shape, causal, scales of
either sign, strided inputs, long lists cut into parts), every backend against the
reference in fp64: output, gradients (q, k, v, rpe, additive masks; of a loss of the output
and, where a backend returns it, the log-sum-exp) and the log-sum-exp.

Kernel error in dtype X must stay within a small factor of plain PyTorch's error in dtype X
(``attention_cases.assert_within_rule``). On CPU the kernels run under Triton's interpreter
on small problems with a fixed, derandomised example count; on a GPU the same properties run
at full size with bf16 added."""

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from blocksparse_attn import KVBlocks, block_sparse_attention, reference_attention

from attention_cases import assert_lse_close, assert_within_rule, poison, recomputation_floor
from helpers import DEVICE, EXPLORE, ON_GPU, examples

pytestmark = pytest.mark.interpreter

if ON_GPU:  # each example compiles kernel variants: a few seconds apiece
    BLOCKS, MAX_BLOCKS, HEAD_DIMS = (16, 32, 64, 128), 12, (16, 40, 64, 96, 128)
    DTYPES, EXAMPLES = (torch.float16, torch.bfloat16, torch.float32), 15
    # no shrinking: every smaller example compiles kernels anew; the failing one is reported
    PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
else:
    BLOCKS, MAX_BLOCKS, HEAD_DIMS = (16, 32), 4, (8, 16, 24, 40)
    DTYPES, EXAMPLES = (torch.float32, torch.float16), 12
    PHASES = tuple(Phase)

MASK_VALUES = (0.0, -1.5, 2.0, torch.finfo(torch.float32).min, -math.inf)
SCALES = (None, 0.3, 2.0, -0.5, 0.0)


@st.composite
def problems(draw, dtype):
    """A random attention problem in ``dtype``: ``(q, k, v, layout, kw, masks)``; ``masks``
    names the additive masks whose gradients are compared (beside q, k, v and rpe)."""
    block = draw(st.sampled_from(BLOCKS))
    B, H = draw(st.integers(1, 2)), draw(st.sampled_from((1, 2, 3, 4)))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 3, 4) if H % d == 0]))  # GQA when < H
    nbq, nbk = draw(st.integers(1, MAX_BLOCKS)), draw(st.integers(1, MAX_BLOCKS))
    Lq, Lk = nbq * block, nbk * block
    D = draw(st.sampled_from(HEAD_DIMS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    # strided q, k, v: slices of packed tensors
    if draw(st.booleans()):
        qx = randn(B, Lq, 2, H, D)
        kvx = randn(B, Lk, 2, Hkv, D)
        q = qx[:, :, 1].transpose(1, 2)
        k, v = kvx[:, :, 0].transpose(1, 2), kvx[:, :, 1].transpose(1, 2)
    else:
        q, k, v = randn(B, H, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, D)
    magnitude = draw(st.sampled_from((1.0, 1.0, 4.0)))
    q, k, v = ((t * magnitude).to(dtype) for t in (q, k, v))
    lh = draw(st.sampled_from(sorted({1, Hkv, H})))
    lb = draw(st.sampled_from(sorted({1, B})))  # one layout, or one per sample
    density = draw(st.sampled_from((0.2, 0.5, 0.9, 1.0)))
    layout = (torch.rand(lb, lh, nbq, nbk, generator=g) < density).to(torch.int64)
    if lb == 1 and draw(st.booleans()):
        layout = layout[0]
    elif draw(st.booleans()):
        layout = KVBlocks.from_layout(layout).to(DEVICE)  # block lists
    kw = dict(block=block, causal=draw(st.booleans()), scale=draw(st.sampled_from(SCALES)))
    masks = []
    kpm_mode = draw(st.sampled_from((None, "add", "mul")))
    if kpm_mode == "mul":
        kw["key_padding_mask"] = (torch.rand(B, Lk, generator=g) < 0.8).to(DEVICE)
        kw["key_padding_mask_mode"] = "mul"
    elif kpm_mode == "add":
        values = torch.tensor(MASK_VALUES)[torch.randint(0, len(MASK_VALUES), (B, Lk), generator=g)]
        kw["key_padding_mask"] = values.to(DEVICE)
        kw["key_padding_mask_mode"] = "add"
        if draw(st.booleans()):
            masks.append("key_padding_mask")
    am_mode = draw(st.sampled_from((None, "add", "mul")))
    if am_mode == "mul":
        kw["attn_mask"] = (torch.rand(Lq, Lk, generator=g) < 0.85).to(DEVICE)
        kw["attn_mask_mode"] = "mul"
    elif am_mode == "add":
        values = torch.tensor(MASK_VALUES)[
            torch.randint(0, len(MASK_VALUES), (Lq, Lk), generator=g)
        ]
        kw["attn_mask"] = torch.where(
            torch.rand(Lq, Lk, generator=g) < 0.7, randn(Lq, Lk).cpu(), values
        ).to(DEVICE)
        kw["attn_mask_mode"] = "add"
        if draw(st.booleans()):
            masks.append("attn_mask")
    rpe_shape = draw(
        st.sampled_from((None, (B, H, Lq, Lk), (1, H, Lq, Lk), (B, 1, Lq, Lk), (Lq, Lk)))
    )
    if rpe_shape is not None:
        kw["rpe"] = randn(*rpe_shape).to(dtype)
    return q, k, v, layout, kw, masks


def _summary(q, k, layout, kw, masks) -> str:
    """The example in one line (the drawn tensors themselves print as values)."""
    form = (
        f"KVBlocks {tuple(layout.indices.shape)}"
        if isinstance(layout, KVBlocks)
        else f"dense {tuple(layout.shape)}"
    )
    options = {
        name: (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value
        for name, value in kw.items()
    }
    return (
        f"q {tuple(q.shape)} {q.dtype} strides {q.stride()}, k {tuple(k.shape)}, layout {form}, "
        f"{options}, mask gradients {masks}"
    )


def _run(backend, q, k, v, layout, kw, masks, with_lse):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = dict(kw)
    names = ["q", "k", "v"]
    for name in ["rpe", *masks]:
        if name in kw:
            kw[name] = kw[name].detach().clone().requires_grad_()
            leaves.append(kw[name])
            names.append(name)
    result = block_sparse_attention(*leaves[:3], layout, backend=backend, return_lse=with_lse, **kw)
    out, lse = result if with_lse else (result, None)
    return out, lse, leaves, names


def _finite(lse):
    """The log-sum-exp where finite, 0 elsewhere (rows with nothing to attend)."""
    return torch.where(lse.isfinite(), lse, 0.0)


def _past_float32(kw):
    """Where the additive terms (``rpe``, masks in 'add' mode), summed in float32 as the
    backends sum them, pass float32's range though none of them is ``-inf`` (two
    ``finfo.min`` entries meet): masked keys by the library's rule, finite in fp64. A bool
    tensor broadcastable to ``[B, H, L_q, L_k]``, or None."""
    terms = []
    if kw.get("rpe") is not None:
        terms.append(kw["rpe"].float())
    if kw.get("key_padding_mask") is not None and kw.get("key_padding_mask_mode") == "add":
        terms.append(kw["key_padding_mask"].float()[:, None, None, :])
    if kw.get("attn_mask") is not None and kw.get("attn_mask_mode") == "add":
        terms.append(kw["attn_mask"].float())
    if len(terms) < 2:
        return None
    total = sum(terms[1:], terms[0])
    hidden = torch.stack(torch.broadcast_tensors(*(t.isneginf() for t in terms))).any(0)
    past = total.isneginf() & ~hidden
    return past if past.any() else None


def _reference(q, k, v, layout, kw, masks, grad_out, compute_dtype, grad_lse=None):
    """Reference output, lse and gradients, computed in ``compute_dtype`` (fp64: the
    oracle, every tensor in fp64; the input dtype: plain PyTorch's own error). Gradients
    of ``out * grad_out`` plus, with ``grad_lse``, ``lse * grad_lse`` (finite rows)."""
    oracle = compute_dtype == torch.float64

    def leaf(t):
        return (t.detach().double() if oracle else t.detach().clone()).requires_grad_()

    leaves = [leaf(t) for t in (q, k, v)]
    past = _past_float32(kw) if oracle else None
    kw = dict(kw)
    for name in ["rpe", *masks]:
        if name in kw:
            kw[name] = leaf(kw[name])
            leaves.append(kw[name])
    if past is not None:  # the float32 sum's -inf, through rpe (its gradient is 0 there)
        rpe = kw.get("rpe", torch.zeros((), dtype=torch.float64, device=q.device))
        kw["rpe"] = torch.where(past.to(q.device), float("-inf"), rpe)
    out, lse = reference_attention(
        *leaves[:3], layout, return_lse=True, compute_dtype=compute_dtype, **kw
    )
    outputs, seeds = [out], [grad_out.to(out.dtype)]
    if grad_lse is not None:
        outputs.append(_finite(lse))
        seeds.append(grad_lse.to(lse.dtype))
    grads = torch.autograd.grad(outputs, leaves, seeds, allow_unused=True)
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize("backend", ["fused", "unfused", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@settings(
    max_examples=examples(EXAMPLES),
    phases=PHASES,
    deadline=None,
    derandomize=not EXPLORE,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_backend_matches_fp64_reference(monkeypatch, backend, dtype, data):
    q, k, v, layout, kw, masks = data.draw(problems(dtype))
    # the index's long lists cut into parts at any length (merge kernels on every walk)
    part_min = data.draw(st.sampled_from((None, 1, 2)))
    note(_summary(q, k, layout, kw, masks) + f", lists cut from {part_min or 'default'} tiles")
    if part_min is not None:
        from blocksparse_attn import index

        monkeypatch.setattr(index, "PART_MIN", part_min)
        monkeypatch.setattr(index, "PART_OVER_MEAN", 0.5)
    poison(monkeypatch)
    with_lse = backend != "unfused"
    out, lse, leaves, names = _run(backend, q, k, v, layout, kw, masks, with_lse)
    grad_out = torch.randn_like(out)
    # with the log-sum-exp, the loss takes it too (its gradient reaches q and k)
    grad_lse = torch.randn(lse.shape, dtype=torch.float32).to(DEVICE) if with_lse else None
    ref, ref_lse, ref_grads = _reference(
        q, k, v, layout, kw, masks, grad_out, torch.float64, grad_lse
    )
    low, _, low_grads = _reference(q, k, v, layout, kw, masks, grad_out, q.dtype, grad_lse)
    assert_within_rule("out", out, ref, low)
    if with_lse:
        assert_lse_close(lse, ref_lse, q.dtype)
        grads = torch.autograd.grad(
            (out, _finite(lse)), leaves, (grad_out, grad_lse), allow_unused=True
        )
    else:
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    # the fused backward recomputes the probabilities (attention_cases.recomputation_floor)
    recomputed = recomputation_floor(q, k, kw) if backend == "fused" else 0.0
    for name, g, r, lo in zip(names, grads, ref_grads, low_grads):
        assert g is not None and g.shape == r.shape, name
        assert_within_rule(f"d{name}", g, r, lo, relative_floor=recomputed)
