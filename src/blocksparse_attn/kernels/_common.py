"""Pieces shared by the fused kernels: tile loads (pointers or tensor descriptors), the score
tile (with every mask and bias of the DeepSpeed semantics), the dot product, and launcher
helpers.

Units of the scores. Without a bias or mask the kernels work in base 2: the launcher folds
``log2(e)`` into the scale (``qk_scale = scale * log2(e)``), so ``exp2(s - m)`` is the
softmax weight with one multiply per score, and the log-sum-exp is turned back into natural
log (``* ln 2``) when it is stored. With a bias or mask (``NATURAL``) the scores stay in
natural units, ``scale * q.k + bias``, and the base changes after the row maximum is
subtracted, ``exp2((s - m) * log2(e))``: a mask of ``finfo(float32).min`` times ``log2(e)``
would overflow to ``-inf``; the forward then stores the row maximum and ``log2`` of the row
sum apart (their sum rounds to the maximum when it is that large).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .availability import interpreting

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e); ``LOG2E.value`` on the host
LN2 = tl.constexpr(0.6931471805599453)  # ln(2) = 1 / log2(e)


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, acc=None):
    """``acc + a @ b`` (``acc`` absent: zero) accumulated in fp32. ``UPCAST`` computes in
    fp32 (Triton's interpreter multiplies bf16 bit patterns in ``tl.dot``)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _matrix(
    T,
    b,
    h,
    rows,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DESC: tl.constexpr,
):
    """What :func:`_load_tile` reads batch ``b``, head ``h`` of ``T`` through, a
    ``[B, H, rows, HEAD_DIM]`` tensor given as ``(pointer, stride_b, stride_h, stride_row)``
    (:func:`matrix_args`): a tensor descriptor (Hopper's tensor memory accelerator) when
    ``DESC``, else the pointer."""
    ptr, s_b, s_h, s_row = T
    base = ptr + b * s_b + h * s_h
    if DESC:
        m = tl.make_tensor_descriptor(
            base, shape=[rows, HEAD_DIM], strides=[s_row, 1], block_shape=[BLOCK, BLOCK_D]
        )
    else:
        m = base
    return m


@triton.jit
def _store_tile(T, b, h, offs, offs_d, value, ok):
    """Store ``value`` at rows ``offs``, columns ``offs_d`` of batch ``b``, head ``h`` of
    ``T`` (as in :func:`_matrix`), in ``T``'s dtype, where ``ok``."""
    ptr, s_b, s_h, s_row = T
    tl.store(
        ptr + b * s_b + h * s_h + offs[:, None] * s_row + offs_d[None, :],
        value.to(ptr.dtype.element_ty),
        mask=ok,
    )


@triton.jit
def _load_tile(
    m,
    first,
    rows,
    stride,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DESC: tl.constexpr,
    INSIDE: tl.constexpr,
):
    """Rows ``first .. first + BLOCK`` of the matrix ``m`` (from :func:`_matrix`) as a
    ``BLOCK x BLOCK_D`` tile, zero past its last row and column. ``INSIDE`` promises that
    every row lies inside (the pointer path then loads without a row mask)."""
    if DESC:
        tile = m.load([first, 0])
    else:
        offs = first + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        ptr = m + offs[:, None] * stride + offs_d[None, :]
        if INSIDE and BLOCK_D == HEAD_DIM:
            tile = tl.load(ptr)
        elif INSIDE:
            tile = tl.load(ptr, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            tile = tl.load(
                ptr, mask=(offs < rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0
            )
    return tile


@triton.jit
def _load_rows(
    m,
    first,
    row_ok,
    stride,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DESC: tl.constexpr,
):
    """Rows ``first .. first + BLOCK`` of the matrix ``m`` (from :func:`_matrix`) as a
    ``BLOCK x BLOCK_D`` tile, zero in the rows where ``row_ok`` is false (which must
    include every row past the matrix's end) and past the last column."""
    if DESC:
        tile = m.load([first, 0])
        tile = tl.where(row_ok[:, None], tile, 0.0)
    else:
        offs = first + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        tile = tl.load(
            m + offs[:, None] * stride + offs_d[None, :],
            mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
            other=0.0,
        )
    return tile


@triton.jit
def _keys_seen(
    first_m,
    offs_n,
    b,
    Lq,
    Lk,
    bits,
    KPM,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUB: tl.constexpr,
    HAS_SUB: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    KPM_MUL: tl.constexpr,
):
    """``[BLOCK_N]``: which keys of the tile some query of the tile (rows ``first_m ..
    first_m + BLOCK_M``) may attend. The others (past the sequence, in sub-blocks no query
    row of the tile keeps, after every query of the tile, hidden by the key padding mask)
    are read as zeros, so that a NaN or inf stored there contributes nothing (``0 * NaN``
    would be NaN). Scalar arithmetic on the tile's bits: no reduction in the loop."""
    seen = offs_n < Lk
    if HAS_SUB:
        cols = bits  # bit c: some sub-row keeps sub-column c
        for a in tl.static_range(1, BLOCK_M // SUB):
            cols = cols | (bits >> (a * (BLOCK_N // SUB)))
        sub_col = (tl.arange(0, BLOCK_N) // SUB).to(tl.int64)
        seen = seen & (((cols >> sub_col) & 1) != 0)
    if CAUSAL:  # bottom-right aligned: key n is visible from query m when n <= m + Lk - Lq
        seen = seen & (offs_n <= tl.minimum(first_m + BLOCK_M - 1, Lq - 1) + (Lk - Lq))
    if HAS_KPM:
        kp = _key_padding(KPM, b, offs_n, Lk)
        if KPM_MUL:
            seen = seen & (kp != 0)
        else:
            seen = seen & (kp != float("-inf"))
    return seen


@triton.jit
def _add_bias(s, bias):
    """``s + bias``, where a ``-inf`` bias masks: it replaces the score (NaN included)."""
    return tl.where(bias == float("-inf"), float("-inf"), s + bias)


@triton.jit
def _key_padding(KPM, b, offs_n, Lk):
    """The key padding mask of batch ``b`` at keys ``offs_n``; ``KPM`` is
    ``(pointer, stride_b, stride_key)`` (:func:`mask_args`)."""
    ptr, s_b, s_n = KPM
    return tl.load(ptr + b * s_b + offs_n * s_n, mask=offs_n < Lk, other=0)


@triton.jit
def _add_masks(
    s,
    offs_m,
    offs_n,
    b,
    h,
    Lq,
    Lk,
    RPE,
    KPM,
    AM,
    HAS_RPE: tl.constexpr,
    HAS_KPM: tl.constexpr,
    KPM_MUL: tl.constexpr,
    HAS_AM: tl.constexpr,
    AM_MUL: tl.constexpr,
):
    """``s + rpe + key_padding_mask + attn_mask`` at queries ``offs_m``, keys ``offs_n``
    (DeepSpeed's semantics): 'add' masks are added (``-inf`` replaces the score), 'mul'
    masks keep where non-zero. ``RPE``, ``KPM``, ``AM``: pointer and strides from
    :func:`mask_args`; read only where the flag says the tensor exists."""
    inside = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if HAS_RPE:
        r_ptr, s_rb, s_rh, s_rm, s_rn = RPE
        r_ptr = r_ptr + b * s_rb + h * s_rh + offs_m[:, None] * s_rm + offs_n[None, :] * s_rn
        s = _add_bias(s, tl.load(r_ptr, mask=inside, other=0.0).to(tl.float32))
    if HAS_KPM:
        kp = _key_padding(KPM, b, offs_n, Lk)
        if KPM_MUL:
            s = tl.where((kp != 0)[None, :], s, float("-inf"))
        else:
            s = _add_bias(s, kp.to(tl.float32)[None, :])
    if HAS_AM:
        a_ptr, s_am, s_an = AM
        am = tl.load(a_ptr + offs_m[:, None] * s_am + offs_n[None, :] * s_an, mask=inside, other=0)
        if AM_MUL:
            s = tl.where(am != 0, s, float("-inf"))
        else:
            s = _add_bias(s, am.to(tl.float32))
    return s


@triton.jit
def _score_tile(
    q,
    k,
    offs_m,
    offs_n,
    b,
    h,
    Lq,
    Lk,
    qk_scale,
    bits,
    partial,
    RPE,
    KPM,
    AM,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUB: tl.constexpr,
    HAS_SUB: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_RPE: tl.constexpr,
    HAS_KPM: tl.constexpr,
    KPM_MUL: tl.constexpr,
    HAS_AM: tl.constexpr,
    AM_MUL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Scores of one ``BLOCK_M x BLOCK_N`` tile, ``-inf`` where masked:
    ``qk_scale * q.k`` plus the masks of :func:`_add_masks`. With a bias or a mask
    (:func:`natural_units`) the launcher passes ``qk_scale = scale`` and the scores are in
    natural units, so that a mask of ``torch.finfo(float32).min`` stays finite; without,
    ``qk_scale = scale * log2(e)`` and they are in base-2 units. Element masks (sub-block
    bits, causal, sequence end) are applied on partial tiles only."""
    s = _dot(q, tl.trans(k), INPUT_PRECISION, UPCAST) * qk_scale
    s = _add_masks(
        s, offs_m, offs_n, b, h, Lq, Lk, RPE, KPM, AM, HAS_RPE, HAS_KPM, KPM_MUL, HAS_AM, AM_MUL
    )
    if partial != 0:
        keep = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        if HAS_SUB:
            sub_row = tl.arange(0, BLOCK_M) // SUB
            sub_col = tl.arange(0, BLOCK_N) // SUB
            shift = (sub_row[:, None] * (BLOCK_N // SUB) + sub_col[None, :]).to(tl.int64)
            keep = keep & (((bits >> shift) & 1) != 0)
        if CAUSAL:  # bottom-right aligned (see _keys_seen)
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _exp_diff(s, m, NATURAL: tl.constexpr):
    """``exp(s - m)`` for scores ``s`` and maxima ``m`` in natural or base-2 units. The
    difference is taken before the change of base, so that two huge finite scores (a
    ``finfo.min`` mask) give ``exp(0) = 1``, not ``exp2(-inf - -inf)``."""
    if NATURAL:
        return tl.math.exp2((s - m) * LOG2E)
    else:
        return tl.math.exp2(s - m)


@triton.jit
def _list_head(list_id, k, heads_per_layout_head, tiles, H):
    """The tile, batch and head that the ``k``-th program of a list (of ``batch *
    heads_per_layout_head``, see :func:`_schedule`) serves."""
    tile = list_id % tiles
    h = list_id // tiles * heads_per_layout_head + k % heads_per_layout_head
    b = k // heads_per_layout_head + h // H
    return tile, b.to(tl.int64), (h % H).to(tl.int64)


@triton.jit
def _schedule(WORK, heads_per_layout_head, batch, tiles, H, GROUP: tl.constexpr):
    """Map this program to its work: ``(list id, tile, batch, head, start, end, slot)``.

    ``WORK`` is the index's :class:`~blocksparse_attn.index.Work` as ``(items, order)``.
    Items (a whole list or a part of a long one) are visited longest first in groups of
    ``GROUP``: the programs of a group run batch by batch and head by head, so the programs
    running at once share their batch-head's keys and values in the L2 cache, and a long
    item never waits for more than a group. Lists of every sample (``B * H_l`` list heads,
    see :func:`schedule_args`) come with ``batch = 1``: their head number runs over
    ``B * H`` and is split here. ``start .. end`` are the item's entries; ``slot`` is where
    a part writes its partial result (``part * batch * heads_per_layout_head + k``), ``-1``
    for a whole list."""
    items, order = WORK
    rep = batch * heads_per_layout_head
    pid = tl.program_id(0)
    n_items = tl.num_programs(0) // rep
    first = pid // (GROUP * rep) * GROUP
    size = tl.minimum(n_items - first, GROUP)
    r = pid - first * rep
    k = r // size
    item = items + 4 * tl.load(order + first + r % size).to(tl.int64)
    list_id = tl.load(item)
    start = tl.load(item + 1)
    end = tl.load(item + 2)
    part = tl.load(item + 3)
    tile, b, h = _list_head(list_id, k, heads_per_layout_head, tiles, H)
    slot = tl.where(part < 0, -1, part.to(tl.int64) * rep + k)
    return list_id, tile, b, h, start, end, slot


@triton.jit
def _cut_list(SPLIT, FIRST, B, heads_per_layout_head, tiles, H):
    """A merge program's cut list (one program per cut list and batch-head, in the order of
    :func:`_schedule`): ``(tile, batch, head, first part, end part, rep, k)``; the slot of
    part ``p`` is ``p * rep + k``."""
    rep = B * heads_per_layout_head
    s = tl.program_id(0) // rep
    k = tl.program_id(0) % rep
    tile, b, h = _list_head(tl.load(SPLIT + s), k, heads_per_layout_head, tiles, H)
    return tile, b, h, tl.load(FIRST + s), tl.load(FIRST + s + 1), rep, k


@triton.jit
def _store_part(PARTS, slot, value, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a part's ``[BLOCK_R, BLOCK_D]`` fp32 result in its ``slot`` of ``PARTS``."""
    offs = tl.arange(0, BLOCK_R)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    tl.store(PARTS + slot * (BLOCK_R * BLOCK_D) + offs, value)


@triton.jit
def _sum_parts_kernel(
    PARTS,  # [slots, BLOCK_R, BLOCK_D] float32
    OUT,  # (pointer, stride_b, stride_h, stride_row), see _matrix
    SPLIT,  # the split lists and where their parts start (index.Work)
    FIRST,
    B,
    H,
    L,
    tiles,
    heads_per_layout_head,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``OUT`` rows of each split list = ``scale *`` the sum of its parts (one program per
    split list and batch-head, in the order of :func:`_schedule`)."""
    tile, b, h, first, end, rep, k = _cut_list(SPLIT, FIRST, B, heads_per_layout_head, tiles, H)
    offs = tl.arange(0, BLOCK_R)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for part in range(first, end):
        acc += tl.load(PARTS + (part * rep + k).to(tl.int64) * (BLOCK_R * BLOCK_D) + offs)
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < L)[:, None] & (cols < HEAD_DIM)[None, :]
    _store_tile(OUT, b, h, rows, cols, acc * scale, ok)


def programs_per_list(sched: dict) -> int:
    """How many programs run each list (its batch-heads), from :func:`schedule_args`."""
    return sched["B"] * sched["heads_per_layout_head"]


def part_slots(work, sched: dict, rows: int, cols: int, spare: torch.Tensor) -> torch.Tensor:
    """The float32 buffer the parts of a launch write to, ``[slots, rows, cols]``
    (``sched``: :func:`schedule_args`); ``spare``, never written, when no list is cut."""
    if not work.parts:
        return spare
    slots = work.parts * programs_per_list(sched)
    return empty((slots, rows, cols), torch.float32, spare.device)


def sum_parts(parts, out, work, sched: dict, H: int, L: int, rows: int, scale) -> None:
    """``out``'s rows of every cut list from the sum of its parts (:func:`_sum_parts_kernel`;
    nothing when no list is cut)."""
    if not work.parts:
        return
    _sum_parts_kernel[(work.split.numel() * programs_per_list(sched),)](
        PARTS=parts,
        OUT=matrix_args(out),
        SPLIT=work.split,
        FIRST=work.first,
        H=H,
        L=L,
        tiles=-(-L // rows),
        scale=scale,
        HEAD_DIM=out.shape[-1],
        BLOCK_R=rows,
        BLOCK_D=parts.shape[-1],
        **sched,
    )


def schedule_args(layout, index, B: int, H: int) -> dict:
    """The schedule's ``B`` and ``heads_per_layout_head`` (see :func:`_schedule`): a layout
    shared by the batch has ``H_l`` list heads, each run for every sample; block lists per
    sample (:class:`~blocksparse_attn.KVBlocks` of ``B > 1`` rows) have ``B * H_l``, each
    run for its own sample only, so one launch serves the batch with per-sample key
    padding masks read as they are."""
    from ..kv_blocks import KVBlocks

    per_sample = B if isinstance(layout, KVBlocks) and layout.shape[0] > 1 else 1
    return dict(B=B // per_sample, heads_per_layout_head=per_sample * H // index.heads)


def grid_class(grid: tuple[int, ...]) -> int:
    """The size class of a launch in the autotuner's key: the bit length of its number of
    programs (1 for one program, 11 for 1024-2047)."""
    return math.prod(grid).bit_length()


_TUNED: dict[tuple, dict] = {}  # (kernel, dtype, device, tuning key) -> launch options


def launch(kernel, grid, kwargs: dict, config: dict | None = None):
    """Launch an autotuned kernel with every argument by keyword, or its plain function
    with an explicit ``{"num_warps": .., "num_stages": ..}`` (benchmark sweeps).

    The autotuner picks a configuration the first time it sees a key (its ``key`` names,
    the first argument's dtype and device); later launches with that key go straight to
    the compiled function with the chosen options. Triton's ``Autotuner.run`` rebuilds its
    key from every argument on each call, which costs more host time than a short kernel
    runs (``benchmarks/NOTES.md``, v3).

    Every launched kernel takes ``GRID_CLASS``, the bit length of its program count, in
    its tuning key: a configuration chosen on a short sequence is not reused on a long
    one, whose best configuration differs (``benchmarks/NOTES.md``, v20), and a new
    sequence length re-tunes only when its program count doubles or halves."""
    kwargs = dict(kwargs, GRID_CLASS=grid_class(grid))
    if kwargs.get("ALLOW_DESC") or (config or {}).get("DESC"):
        _ensure_allocator()
    if config is not None:
        kernel.fn[grid](**kwargs, **config)
        return
    if interpreting() or not hasattr(kernel, "keys"):
        kernel[grid](**kwargs)
        return
    first = kwargs[kernel.fn.arg_names[0]]
    first = first[0] if isinstance(first, tuple) else first
    key = (kernel, first.dtype, first.device, *(kwargs[name] for name in kernel.keys))
    options = _TUNED.get(key)
    if options is None:
        kernel[grid](**kwargs)  # tunes on the first sight of this key, then runs
        _TUNED[key] = kernel.best_config.all_kwargs()
    else:
        kernel.fn[grid](**kwargs, **options)


def tuned_options() -> list[dict]:
    """What the autotuner chose in this process, one entry per kernel and tuning key:
    ``{"kernel", "dtype", "key": {name: value}, "options": {...}}`` (the benchmark reports
    them)."""
    return [
        {
            "kernel": kernel.fn.__name__,
            "dtype": str(dtype).removeprefix("torch."),
            "key": dict(zip(kernel.keys, values)),
            "options": dict(options),
        }
        for (kernel, dtype, _device, *values), options in _TUNED.items()
    ]


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cpu" if interpreting() else "cuda")


def _ensure_allocator() -> None:
    """Kernels that build tensor descriptors need Triton's scratch allocator; set one that
    takes torch memory unless the caller has set their own (per thread: autograd's backward
    runs in its own)."""
    from triton.runtime._allocation import NullAllocator, _allocator

    if isinstance(_allocator.get(), NullAllocator):
        triton.set_allocator(_scratch)


@functools.lru_cache
def _capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def descriptors_allowed(*tensors: torch.Tensor) -> bool:
    """Whether the kernels may read ``tensors`` (``[B, H, L, D]``, unit last stride) through
    tensor descriptors: a GPU of compute capability 9 or newer (or the interpreter), and
    every base address and leading stride a multiple of 16 bytes."""
    if not interpreting() and _capability(tensors[0].device.index) < 9:
        return False
    return all(
        t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
        for t in tensors
    )


def prune_descriptors(configs, named_args, **kwargs):
    """Autotuner hook: drop the tensor-descriptor configurations where they may not run."""
    return [c for c in configs if kwargs.get("ALLOW_DESC") or not c.kwargs.get("DESC")]


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


def natural_units(masks: dict) -> bool:
    """Whether the attention kernels keep scores in natural units (see :func:`_score_tile`),
    from :func:`mask_args`: when a bias or mask meets the scores. Without one, base-2
    scores save a multiply per score."""
    return masks["HAS_RPE"] or masks["HAS_KPM"] or masks["HAS_AM"]


def matrix_args(t: torch.Tensor) -> tuple:
    """A ``[B, H, L, D]`` tensor with unit last stride as the kernels take it:
    ``(pointer, stride_b, stride_h, stride_row)`` (see :func:`_matrix`)."""
    return (t, t.stride(0), t.stride(1), t.stride(2))


def mask_args(
    rpe,
    key_padding_mask,
    attn_mask,
    key_padding_mask_mode,
    attn_mask_mode,
    B: int,
    H: int,
    Lq: int,
    Lk: int,
    dummy: torch.Tensor,
) -> dict:
    """The kernels' mask arguments, by keyword: ``RPE`` ``(pointer, stride_b, stride_h,
    stride_q, stride_k)``, ``KPM`` ``(pointer, stride_b, stride_k)``, ``AM`` ``(pointer,
    stride_q, stride_k)`` (absent ones: a dummy pointer and zero strides) and the
    constexpr flags ``HAS_RPE``, ``HAS_KPM``, ``KPM_MUL``, ``HAS_AM``, ``AM_MUL``, the
    one place they are derived."""
    if rpe is not None:
        rpe = rpe.expand(B, H, Lq, Lk)
    return dict(
        RPE=(dummy, 0, 0, 0, 0) if rpe is None else (rpe, *rpe.stride()),
        KPM=(dummy, 0, 0)
        if key_padding_mask is None
        else (key_padding_mask, *key_padding_mask.stride()),
        AM=(dummy, 0, 0) if attn_mask is None else (attn_mask, *attn_mask.stride()),
        HAS_RPE=rpe is not None,
        HAS_KPM=key_padding_mask is not None,
        KPM_MUL=key_padding_mask_mode == "mul",
        HAS_AM=attn_mask is not None,
        AM_MUL=attn_mask_mode == "mul",
    )
