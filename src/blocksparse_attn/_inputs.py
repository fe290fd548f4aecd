"""Validation and normalisation of attention inputs, shared by the reference and the
functional API. Every rejected input raises with the argument, the expectation, the value
given and a fix."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._errors import bad_argument, describe
from .kv_blocks import KVBlocks
from .patterns._checks import layout_tensor

MASK_MODES = ("add", "mul")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class AttentionInputs:
    """Checked inputs. ``k``, ``v`` have ``H_kv`` heads (``H % H_kv == 0``; query head
    ``h`` reads kv head ``h // (H // H_kv)``). ``layout`` is ``[B_l, H_l, nb_q, nb_k]``
    (integer or bool, non-zero = attend) or block lists ``KVBlocks [B_l, H_l, nb_q]``
    (:func:`dense_layout` makes either dense), with ``B_l`` 1 or ``B`` and ``H_l`` 1,
    ``H_kv`` or ``H``; ``rpe`` is 4-D (broadcastable to ``[B, H, L_q, L_k]``);
    ``key_padding_mask`` is ``[B, L_k]``; ``attn_mask`` is ``[L_q, L_k]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: torch.Tensor | KVBlocks
    block: int
    scale: float
    causal: bool
    rpe: torch.Tensor | None
    key_padding_mask: torch.Tensor | None
    attn_mask: torch.Tensor | None
    key_padding_mask_mode: str
    attn_mask_mode: str


def check_scale(where: str, scale, head_dim: int) -> float:
    """``scale`` as a float: ``head_dim ** -0.5`` for None; a finite number otherwise (NaN
    or inf would turn every score into NaN without an error)."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise bad_argument(where, "scale", "a finite float or None (1/sqrt(D))", repr(scale))
    return float(scale)


def check_block(where: str, block: object) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise bad_argument(where, "block", "a positive int (the layout's block size)", repr(block))


def capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being captured in a CUDA graph (nothing can be read
    back to the host then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_mode(where: str, name: str, mode: object) -> None:
    if mode not in MASK_MODES:
        raise bad_argument(
            where,
            name,
            "'add' or 'mul'",
            repr(mode),
            "'add' adds the mask to the scores (0 keeps, -inf masks); "
            "'mul' keeps non-zero entries and masks zeros.",
        )


def check_deterministic(where: str, deterministic: object) -> None:
    if not isinstance(deterministic, bool):
        raise bad_argument(
            where,
            "deterministic",
            "True or False",
            repr(deterministic),
            "pass deterministic=False for the faster backward whose dQ may differ in its "
            "last bits from run to run",
            TypeError,
        )


def _squeeze_except_first(t: torch.Tensor) -> torch.Tensor:
    keep = [0] + [d for d in range(1, t.dim()) if t.shape[d] != 1]
    if t.dim() > 1 and len(keep) == 1:  # all trailing dims are 1: keep the last one
        keep.append(t.dim() - 1)
    return t.reshape([t.shape[d] for d in keep])


def _check_mask(
    where: str,
    name: str,
    mask: torch.Tensor,
    mode: str,
    expected_shape: tuple,
    shape_text: str,
    device: torch.device,
) -> None:
    """``shape_text``: the expected shape in words, ``{}`` standing for the sizes."""
    if tuple(mask.shape) != expected_shape:
        raise bad_argument(where, name, shape_text.format(list(expected_shape)), describe(mask))
    if mask.device != device:
        raise bad_argument(
            where,
            name,
            f"on the inputs' device ({device})",
            describe(mask),
            f"move it with .to('{device}').",
        )
    if mask.dtype.is_complex:
        raise bad_argument(
            where,
            name,
            "a real (bool, integer or floating-point) tensor",
            describe(mask),
            f"pass the mask's real part ({name}.real) if that is what you mean.",
        )
    if mask.dtype == torch.bool and mode == "add":
        raise bad_argument(
            where,
            name,
            "a floating-point tensor in 'add' mode",
            describe(mask),
            f"pass {name}_mode='mul' for a bool keep-mask, or an additive float "
            "mask (0 keeps, -inf masks).",
        )


def check_attention_inputs(
    where: str,
    q,
    k,
    v,
    layout,
    *,
    block,
    scale=None,
    causal=False,
    rpe=None,
    key_padding_mask=None,
    attn_mask=None,
    key_padding_mask_mode="add",
    attn_mask_mode="mul",
) -> AttentionInputs:
    """Check and normalise; see :func:`blocksparse_attn.block_sparse_attention`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise bad_argument(where, name, "a torch.Tensor [B, H, L, D]", describe(t))
        if t.dim() != 4:
            raise bad_argument(
                where,
                name,
                "a 4-D tensor [B, H, L, D]",
                describe(t),
                "add batch/head dimensions with unsqueeze.",
            )
        if t.dtype not in DTYPES:
            raise bad_argument(where, name, "float16, bfloat16, float32 or float64", describe(t))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if D == 0:
        raise bad_argument(
            where,
            "q.shape[3] (head dim)",
            "at least 1",
            D,
            "attention over empty vectors is undefined.",
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise bad_argument(
            where,
            "q, k, v",
            "of one dtype",
            f"{q.dtype}, {k.dtype}, {v.dtype}",
            "cast them to one dtype.",
        )
    if k.device != q.device or v.device != q.device:
        raise bad_argument(where, "q, k, v", "on one device", f"{q.device}, {k.device}, {v.device}")
    Hkv = k.shape[1]
    if k.shape != (B, Hkv, Lk, D) or Hkv == 0 or H % Hkv:
        raise bad_argument(
            where,
            "k",
            f"of shape [B, H_kv, L_k, D] = [{B}, H_kv, L_k, {D}] with H_kv dividing H = {H} "
            "(batch and head dim of q; grouped-query attention: H_kv key/value heads)",
            describe(k),
        )
    if v.shape != k.shape:
        raise bad_argument(where, "v", f"of the shape of k, {tuple(k.shape)}", describe(v))
    check_block(where, block)
    for name, n in (("q", Lq), ("k", Lk)):
        if n % block != 0:
            raise bad_argument(
                where,
                f"{name}.shape[2]",
                f"a multiple of block={block}",
                n,
                "pad the sequence (SparseAttentionUtils.pad_to_block_size) "
                "and mask the padding with key_padding_mask.",
            )
    layout = check_layout(where, layout, B, H, Hkv, Lq // block, Lk // block, q.device)
    scale = check_scale(where, scale, D)
    check_mode(where, "key_padding_mask_mode", key_padding_mask_mode)
    check_mode(where, "attn_mask_mode", attn_mask_mode)
    rpe = check_rpe(where, rpe, (B, H, Lq, Lk), q.device)
    key_padding_mask = check_key_padding_mask(
        where, key_padding_mask, key_padding_mask_mode, B, Lk, q.device
    )
    attn_mask = check_attn_mask(where, attn_mask, attn_mask_mode, Lq, Lk, q.device)
    return AttentionInputs(
        q,
        k,
        v,
        layout,
        block,
        float(scale),
        bool(causal),
        rpe,
        key_padding_mask,
        attn_mask,
        key_padding_mask_mode,
        attn_mask_mode,
    )


def check_layout(where: str, layout, B: int, H: int, Hkv: int, nbq: int, nbk: int, device):
    """The layout as ``[B_l, H_l, nb_q, nb_k]``: a 2-D or 3-D tensor gains the leading
    dims; a :class:`~blocksparse_attn.KVBlocks` stays block lists (its values checked unless
    a CUDA graph is being captured; :func:`dense_layout` gives its dense form)."""
    heads = f"1 or {H}" if Hkv == H else f"1, {Hkv} or {H}"
    shape = (
        f"[{heads}, {nbq}, {nbk}] (heads, L_q/block, L_k/block), or "
        f"[1 or {B}, {heads}, {nbq}, {nbk}] (a layout per sample)"
    )
    fix = "make the layout for this sequence length, block, batch and head count."
    if isinstance(layout, KVBlocks):
        nb, hb, rows = layout.shape
        if nb not in (1, B) or hb not in (1, Hkv, H) or rows != nbq:
            raise bad_argument(
                where,
                "layout",
                f"KVBlocks of shape [1 or {B}, {heads}, {nbq}] (batch, heads, L_q/block)",
                f"KVBlocks of shape {tuple(layout.shape)}",
                fix,
            )
        if layout.device != device:
            raise bad_argument(
                where,
                "layout",
                f"KVBlocks on the inputs' device ({device})",
                f"KVBlocks on {layout.device}",
                "move them with lists.to(q.device) (block lists are not copied silently).",
            )
        if not (layout.trusted or capturing(layout.device)):
            layout.check(nbk, where)
        return layout
    if isinstance(layout, torch.Tensor) and layout.dim() == 4:
        grid = layout_tensor(where, layout.flatten(0, 1), f"of shape {shape}", fix)
        grid = grid.view(layout.shape)
    else:
        grid = layout_tensor(where, layout, f"of shape {shape}", fix).unsqueeze(0)
    if (
        grid.shape[0] not in (1, B)
        or grid.shape[1] not in (1, Hkv, H)
        or tuple(grid.shape[2:]) != (nbq, nbk)
    ):
        raise bad_argument(where, "layout", f"of shape {shape}", describe(layout), fix)
    return grid


def dense_layout(x: AttentionInputs) -> torch.Tensor:
    """``x.layout`` as a dense ``[B_l, H_l, nb_q, nb_k]`` tensor (block lists scattered into
    a bool grid on their device, without a host synchronisation)."""
    if isinstance(x.layout, torch.Tensor):
        return x.layout
    return x.layout.to_layout(x.k.shape[2] // x.block)


def per_query_head(x: AttentionInputs):
    """``(k, v, layout)`` with one head per query head: grouped K/V repeated over each group
    (the repeat's gradient sums over the group) and a layout of ``H_kv`` heads likewise."""
    H = x.q.shape[1]
    group = H // x.k.shape[1]
    k, v, layout = x.k, x.v, dense_layout(x)
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if layout.shape[1] not in (1, H):
        layout = layout.repeat_interleave(group, 1)
    return k, v, layout


def check_rpe(where: str, rpe, full: tuple, device: torch.device, names: str = "B, H"):
    """``rpe`` (or ``None``) as a 4-D tensor broadcastable to ``full = (B, H, L_q, L_k)``
    (``names`` names the first two dims in messages), on ``device``, floating point."""
    if rpe is None:
        return None
    shape = f"[{names}, L_q, L_k]"
    if not isinstance(rpe, torch.Tensor) or rpe.dim() > 4:
        raise bad_argument(where, "rpe", f"a tensor broadcastable to {shape}", describe(rpe))
    rpe = rpe.reshape((1,) * (4 - rpe.dim()) + tuple(rpe.shape))
    if any(s not in (1, f) for s, f in zip(rpe.shape, full)) or rpe.shape[2:] != full[2:]:
        raise bad_argument(
            where,
            "rpe",
            f"broadcastable to {shape} = {list(full)} with full L_q, L_k",
            describe(rpe),
        )
    if rpe.device != device:
        raise bad_argument(where, "rpe", f"on the inputs' device ({device})", describe(rpe))
    if not rpe.dtype.is_floating_point:
        raise bad_argument(where, "rpe", "a floating-point tensor", describe(rpe))
    return rpe


def check_key_padding_mask(
    where: str, mask, mode: str, B: int, Lk: int, device: torch.device, batch: str = "B"
):
    """The key padding mask (or ``None``) as ``[B, L_k]``: BERT's ``[B, 1, 1, L_k]`` is
    squeezed, a ``[1, L_k]`` mask is expanded over the batch; checked by
    :func:`_check_mask`."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise bad_argument(where, "key_padding_mask", f"a tensor [{batch}, L_k]", describe(mask))
    if mask.dim() > 2:  # BERT's [B, 1, 1, L]
        mask = _squeeze_except_first(mask)
    if mask.dim() == 2 and mask.shape[0] == 1 and B != 1:
        mask = mask.expand(B, -1)
    _check_mask(
        where,
        "key_padding_mask",
        mask,
        mode,
        (B, Lk),
        f"of shape [{batch}, L_k] = {{}} (or [{batch}, 1, 1, L_k])",
        device,
    )
    return mask


def check_attn_mask(where: str, mask, mode: str, Lq: int, Lk: int, device: torch.device):
    """The attention mask (or ``None``) as ``[L_q, L_k]`` (leading size-1 dims dropped),
    checked by :func:`_check_mask`."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise bad_argument(where, "attn_mask", "a tensor [L_q, L_k]", describe(mask))
    if mask.dim() > 2 and all(s == 1 for s in mask.shape[:-2]):
        mask = mask.reshape(mask.shape[-2:])
    _check_mask(
        where,
        "attn_mask",
        mask,
        mode,
        (Lq, Lk),
        "of shape [L_q, L_k] = {} (one mask for all batches and heads)",
        device,
    )
    return mask


def additive(mask: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """The mask in additive form: 'add' as is, 'mul' as 0 where non-zero and -inf where zero."""
    if mode == "add":
        return mask.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(
        mask != 0, zero, torch.full((), float("-inf"), dtype=dtype, device=mask.device)
    )
