"""Pieces shared by the fused kernels: the score tile (with every mask and bias of the
DeepSpeed semantics), the dot product, and launcher helpers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .availability import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32. ``UPCAST`` computes in fp32 (Triton's interpreter
    multiplies bf16 bit patterns in ``tl.dot``)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _score_tile(q, k, offs_m, offs_n, b, h, Lq, Lk, qk_scale, bits, partial,
                RPE, s_rb, s_rh, s_rm, s_rn, KPM, s_kpb, s_kpn, AM, s_amm, s_amn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
                HAS_SUB: tl.constexpr, CAUSAL: tl.constexpr, HAS_RPE: tl.constexpr,
                HAS_KPM: tl.constexpr, KPM_MUL: tl.constexpr, HAS_AM: tl.constexpr,
                AM_MUL: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Scores of one ``BLOCK_M x BLOCK_N`` tile in base-2 units:
    ``log2(e) * (scale * q.k + rpe + key_padding_mask + attn_mask)``, ``-inf`` where masked.
    Element masks (sub-block bits, causal, sequence end) are applied on partial tiles only."""
    s = _dot(q, tl.trans(k), INPUT_PRECISION, UPCAST) * qk_scale
    LOG2E_: tl.constexpr = 1.4426950408889634
    if HAS_RPE:
        r_ptr = RPE + b * s_rb + h * s_rh + offs_m[:, None] * s_rm + offs_n[None, :] * s_rn
        r = tl.load(r_ptr, mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk), other=0.0)
        s += r.to(tl.float32) * LOG2E_
    if HAS_KPM:
        kp = tl.load(KPM + b * s_kpb + offs_n * s_kpn, mask=offs_n < Lk, other=0)
        if KPM_MUL:
            s = tl.where((kp != 0)[None, :], s, float("-inf"))
        else:
            s += kp.to(tl.float32)[None, :] * LOG2E_
    if HAS_AM:
        a_ptr = AM + offs_m[:, None] * s_amm + offs_n[None, :] * s_amn
        am = tl.load(a_ptr, mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk), other=0)
        if AM_MUL:
            s = tl.where(am != 0, s, float("-inf"))
        else:
            s += am.to(tl.float32) * LOG2E_
    if partial != 0:
        keep = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        if HAS_SUB:
            sub_row = tl.arange(0, BLOCK_M) // SUB
            sub_col = tl.arange(0, BLOCK_N) // SUB
            shift = (sub_row[:, None] * (BLOCK_N // SUB) + sub_col[None, :]).to(tl.int64)
            keep = keep & (((bits >> shift) & 1) != 0)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _schedule(ORDER, heads_per_layout_head, batch, tiles):
    """Map this program to (list id, tile, batch, head). Lists are visited longest first
    (``ORDER``, from the index); the programs of one list (every batch, and every head
    sharing the layout) are adjacent."""
    rep = batch * heads_per_layout_head
    pid = tl.program_id(0)
    entry = pid // rep
    k = pid % rep
    list_id = tl.load(ORDER + entry)
    tile = list_id % tiles
    h = list_id // tiles + k % heads_per_layout_head
    b = k // heads_per_layout_head
    return list_id, tile, b.to(tl.int64), h.to(tl.int64)


_TUNED: dict[tuple, dict] = {}  # (kernel, dtype, device, tuning key) -> launch options


def launch(kernel, grid, args, kwargs, config: dict | None = None):
    """Launch an autotuned kernel, or its plain function with an explicit
    ``{"num_warps": .., "num_stages": ..}`` (benchmark sweeps).

    The autotuner picks a configuration the first time it sees a key (its ``key`` names,
    which must be keyword arguments here, the first argument's dtype and device); later
    launches with that key go straight to the compiled function with the chosen options.
    Triton's ``Autotuner.run`` rebuilds its key from every argument on each call, which
    costs more host time than a short kernel runs (``benchmarks/NOTES.md``, v3)."""
    if config is not None:
        kernel.fn[grid](*args, **kwargs, **config)
        return
    if interpreting() or not hasattr(kernel, "keys"):
        kernel[grid](*args, **kwargs)
        return
    key = (kernel, args[0].dtype, args[0].device, *(kwargs[name] for name in kernel.keys))
    options = _TUNED.get(key)
    if options is None:
        kernel[grid](*args, **kwargs)  # tunes on the first sight of this key, then runs
        _TUNED[key] = kernel.best_config.all_kwargs()
    else:
        kernel.fn[grid](*args, **kwargs, **options)


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products unless the caller allowed TF32 through
    ``torch.backends.cuda.matmul.allow_tf32``."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast_dots(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output (tests replace it to NaN-poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def mask_args(rpe, key_padding_mask, attn_mask, key_padding_mask_mode, attn_mask_mode,
              B: int, H: int, Lq: int, Lk: int, dummy: torch.Tensor):
    """Pointers, strides and constexpr flags for rpe / key_padding_mask / attn_mask
    (absent ones get a dummy pointer and zero strides)."""
    rpe_args = (dummy, 0, 0, 0, 0)
    if rpe is not None:
        rpe = rpe.expand(B, H, Lq, Lk)
        rpe_args = (rpe, *rpe.stride())
    kpm_args = (dummy, 0, 0)
    if key_padding_mask is not None:
        kpm_args = (key_padding_mask, *key_padding_mask.stride())
    am_args = (dummy, 0, 0)
    if attn_mask is not None:
        am_args = (attn_mask, *attn_mask.stride())
    flags = dict(HAS_RPE=rpe is not None, HAS_KPM=key_padding_mask is not None,
                 KPM_MUL=key_padding_mask_mode == "mul", HAS_AM=attn_mask is not None,
                 AM_MUL=attn_mask_mode == "mul")
    return (*rpe_args, *kpm_args, *am_args), flags
