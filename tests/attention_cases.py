"""Shared helpers for kernel tests: random problems, fp64 references and the error rule."""

from __future__ import annotations

import math

import torch

from blocksparse_attn import reference_attention


def random_layout(h, nq, nk, density, *, empty_row=True, empty_head=False, device="cpu"):
    lay = (torch.rand(h, nq, nk, device=device) < density).to(torch.int64)
    if empty_row and nq > 2:
        lay[:, 1] = 0
    if empty_head and h > 1:
        lay[-1] = 0
    return lay


def make_problem(
    B,
    H,
    Lq,
    Lk,
    D,
    dtype,
    device,
    *,
    block,
    density=0.5,
    layout_heads=None,
    causal=False,
    rpe=None,
    kpm=None,
    am=None,
    empty_row=True,
    empty_head=False,
):
    """Fresh random inputs. ``rpe``: None, 'full' or 'broadcast'; ``kpm``/``am``: None,
    'add' or 'mul'."""
    g = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    q, k, v = g(B, H, Lq, D), g(B, H, Lk, D), g(B, H, Lk, D)
    lh = H if layout_heads is None else layout_heads
    layout = random_layout(
        lh, Lq // block, Lk // block, density, empty_row=empty_row, empty_head=empty_head
    )
    kw = dict(block=block, causal=causal)
    if rpe == "full":
        kw["rpe"] = torch.randn(B, H, Lq, Lk, device=device, dtype=dtype)
    elif rpe == "broadcast":
        kw["rpe"] = torch.randn(1, H, Lq, Lk, device=device, dtype=dtype)
    if kpm == "add":
        m = torch.zeros(B, Lk, device=device)
        m[:, -Lk // 5 :] = float("-inf")
        m[0, : Lk // 3] = -2.0
        kw["key_padding_mask"], kw["key_padding_mask_mode"] = m, "add"
    elif kpm == "mul":
        kw["key_padding_mask"] = (torch.rand(B, Lk, device=device) < 0.8).to(torch.int64)
        kw["key_padding_mask_mode"] = "mul"
    if am == "add":
        kw["attn_mask"] = torch.randn(Lq, Lk, device=device).clamp(max=0.5)
        kw["attn_mask_mode"] = "add"
    elif am == "mul":
        kw["attn_mask"] = torch.rand(Lq, Lk, device=device) < 0.85
        kw["attn_mask_mode"] = "mul"
    return q, k, v, layout, kw


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def references(q, k, v, layout, kw, grad_out=None):
    """(fp64 reference, plain low-precision PyTorch) outputs and, with ``grad_out``,
    gradients of q, k, v (and rpe)."""
    results = []
    for ct in (torch.float64, q.dtype):
        leaves = [
            t.detach().to(ct if ct == torch.float64 else q.dtype).requires_grad_()
            for t in (q, k, v)
        ]
        kw2 = dict(kw)
        if "rpe" in kw2:
            kw2["rpe"] = kw2["rpe"].detach().to(ct if ct == torch.float64 else q.dtype)
            kw2["rpe"].requires_grad_()
            leaves.append(kw2["rpe"])
        out = reference_attention(*leaves[:3], layout, compute_dtype=ct, **kw2)
        grads = []
        if grad_out is not None:
            grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
        results.append((out.detach(), grads))
    return results


def recomputation_floor(q, k, kw) -> float:
    """The relative error of probabilities recomputed from the log-sum-exp, as the fused
    backward (FlashAttention's) recomputes them: half an fp32 ulp of the largest scaled
    logit in base 2, the rounding of the scaled score and of the log-sum-exp at that
    magnitude. PyTorch's softmax keeps its probabilities, so its own error has no such
    term. Under the fp32 floor of :func:`assert_within_rule` for logits below about 120;
    with logits in the hundreds (large inputs times a large scale) it is the larger."""
    group = q.shape[1] // k.shape[1]
    keys = k.detach().double().repeat_interleave(group, 1)
    scores = (q.detach().double() @ keys.transpose(-1, -2)).abs().max().item()
    scale = kw.get("scale")
    scale = q.shape[-1] ** -0.5 if scale is None else abs(scale)
    bias = kw["rpe"].abs().max().item() if kw.get("rpe") is not None else 0.0
    return torch.finfo(torch.float32).eps / 2 * (scale * scores + bias) * math.log2(math.e)


def assert_within_rule(name, got, ref64, lowp, factor=2.0, floor=None, relative_floor=0.0):
    """FlashAttention's rule: the kernel's error against fp64 stays within ``factor`` x the
    error of plain PyTorch math in the same dtype, plus a small floor (relative to the
    largest reference value: the dtype's, or ``relative_floor`` where larger); never NaN."""
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    if floor is None:
        floor = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[got.dtype]
        floor = max(floor, relative_floor) * max(1.0, ref64.abs().max().item())
    err = max_err(got, ref64)
    base = max_err(lowp, ref64)
    assert err <= factor * base + floor, (
        f"{name}: kernel error {err:.3e} > {factor} x PyTorch {got.dtype} error {base:.3e} "
        f"+ {floor:.1e}"
    )


def poison(monkeypatch):
    """NaN-fill every kernel output buffer before launch (fused and unfused kernels), so an
    unwritten element fails."""
    from blocksparse_attn.kernels import (
        blocksparse_matmul,
        blocksparse_softmax,
        decode,
        fused_bwd,
        fused_fwd,
    )

    def nan_empty(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    for module in (fused_fwd, fused_bwd, decode, blocksparse_matmul, blocksparse_softmax):
        monkeypatch.setattr(module, "empty", nan_empty)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        from blocksparse_attn.kernels.availability import gluon_hopper_reasons

        if not gluon_hopper_reasons():  # the Hopper kernels' outputs too
            from blocksparse_attn.kernels import sm90_bwd, sm90_fwd

            monkeypatch.setattr(sm90_bwd, "empty", nan_empty)
            monkeypatch.setattr(sm90_fwd, "empty", nan_empty)


def reference_lse(q, k, v, layout, kw):
    """The fp64 reference's log-sum-exp."""
    return reference_attention(
        q.double(),
        k.double(),
        v.double(),
        layout,
        return_lse=True,
        **{n: (t.double() if n == "rpe" else t) for n, t in kw.items()},
    )[1]


def assert_lse_close(lse, ref, dtype):
    """Log-sum-exp against the fp64 reference: the same rows empty (-inf), the rest within
    the precision of the products that formed it."""
    assert lse.dtype == torch.float32 and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "empty rows differ"
    ok = ~torch.isneginf(ref)
    if not ok.any():
        return
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    err = (lse[ok].double() - ref[ok]).abs().max().item()
    assert err <= tol * max(1.0, ref[ok].abs().max().item()), f"lse error {err:.3e}"
