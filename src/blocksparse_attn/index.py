"""The compiled layout (layer 2): what kernels read, built once per layout and cached.

A layout ``[H, nb_q, nb_k]`` of ``block``-token blocks is compiled for a kernel tile of
``tile_m x tile_n`` tokens. The tile may be larger than the block (tensor-core tiles over a
block-16 layout) or smaller (64-wide tiles over a block-128 layout). Both are expressed at
the *sub-block* granularity ``g = gcd(block, tile_m, tile_n)``: a tile holds
``(tile_m // g) x (tile_n // g)`` sub-blocks, and a 64-bit mask records which of them the
layout keeps. A tile is

* **absent** when none of its sub-blocks is kept (never loaded by a kernel), or when
  ``causal`` and every key lies after every query of the tile;
* **full** when all its sub-blocks are kept, it lies inside the sequence, and (with
  ``causal``) no key lies after a query of the tile: no element mask is needed;
* **partial** otherwise: the kernel masks elements with the sub-block bits, the causal
  diagonal and the sequence end.

Two orderings of the kept tiles are stored: row-major ``(h, i, j)`` with row offsets (CSR,
the forward walk and DeepSpeed's compressed-format order when ``tile == block``), and
column-major ``(h, j, i)`` with column offsets (CSC, the backward walk over query tiles).

A list much longer than the others (a global row or column: every tile of the sequence)
would keep its one program running long after the rest finish. :func:`build_index` cuts
such lists into parts (:class:`Work`): each part runs as its own program and writes a
partial result, which a merge kernel combines. Short lists run whole, as one part.

Building is vectorised torch on the layout's device, O(nnz) memory: no Python loop over
blocks and no token-level tensor.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import torch

from ._errors import bad_argument
from .patterns._checks import layout_tensor

MAX_SUB_BLOCKS = 64  # bits in the per-tile mask

# A list is cut into parts when it is longer than this many times the mean non-empty list,
# and longer than PART_MIN tiles; its parts are about that long.
PART_OVER_MEAN = 4
PART_MIN = 64


def part_length(counts: torch.Tensor) -> int:
    """The longest list :func:`build_index` runs whole, from the list lengths ``counts``:
    ``PART_OVER_MEAN`` times the mean non-empty list, at least ``PART_MIN`` tiles.
    (A dense or causal layout has no list that long: nothing is cut.)"""
    used = counts[counts > 0]
    mean = float(used.float().mean()) if used.numel() else 0.0
    return max(PART_MIN, math.ceil(PART_OVER_MEAN * mean))


@dataclass(frozen=True)
class Work:
    """How the programs of one walk (the row lists or the column lists) divide the lists.

    Attributes:
        items: ``[n_items, 4]`` int32, one program's work per row: the list (``head *
            tiles + tile``), the first and the end of its entries (offsets into the CSR or
            CSC arrays), and its part number (``-1``: the whole list, written in place;
            otherwise the slot of its partial result).
        order: ``[n_items]`` int32, the items longest first (kernels start the long ones
            first so they do not finish last).
        split: ``[n_split]`` int32, the lists cut into parts.
        first: ``[n_split + 1]`` int32, where each split list's parts start: the parts of
            ``split[s]`` are ``first[s] .. first[s + 1]``.
        parts: the number of parts (``first[-1]``), known on the host.
    """

    items: torch.Tensor
    order: torch.Tensor
    split: torch.Tensor
    first: torch.Tensor
    parts: int


def whole_lists(ptr: torch.Tensor) -> Work:
    """Every list of offsets ``ptr`` as one item, longest first (no host synchronisation)."""
    ptr = ptr.to(torch.int32)
    n = ptr.numel() - 1
    lists = torch.arange(n, device=ptr.device, dtype=torch.int32)
    items = torch.stack([lists, ptr[:-1], ptr[1:], ptr.new_full((n,), -1)], 1)
    order = torch.argsort(ptr.diff(), descending=True, stable=True).to(torch.int32)
    return Work(items, order, split=ptr[:0], first=ptr[:1], parts=0)  # ptr[0] is 0


def cut_lists(ptr: torch.Tensor, longest: int) -> Work:
    """The lists of offsets ``ptr``, each longer than ``longest`` entries cut into
    ``ceil(n / longest)`` parts of near-equal length (synchronises: sizes from the data)."""
    counts = ptr.diff().long()
    n_parts = torch.where(counts > longest, (counts + longest - 1) // longest, 1)
    if not bool((n_parts > 1).any()):
        return whole_lists(ptr)
    dev = ptr.device
    lists = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), n_parts)
    first_item = torch.cumsum(n_parts, 0) - n_parts
    j = torch.arange(lists.numel(), device=dev) - first_item[lists]  # part within its list
    c, n, base = counts[lists], n_parts[lists], ptr.long()[lists]
    start, end = base + j * c // n, base + (j + 1) * c // n
    cut = n > 1
    part = torch.where(cut, torch.cumsum(cut, 0) - 1, -1)
    items = torch.stack([lists, start, end, part], 1).to(torch.int32)
    order = torch.argsort(end - start, descending=True, stable=True).to(torch.int32)
    split = (n_parts > 1).nonzero().flatten()
    first = torch.cat([n_parts.new_zeros(1), torch.cumsum(n_parts[split], 0)])
    return Work(items, order, split.to(torch.int32), first.to(torch.int32), int(first[-1]))


@dataclass(frozen=True)
class SparseIndex:
    """A layout compiled for one tile shape. Offsets are ``int32``, bits ``int64``.

    Attributes:
        heads: layout heads (1 means the layout is shared by all heads).
        block: layout block size in tokens.
        q_len, k_len: sequence lengths in tokens.
        tile_m, tile_n: kernel tile in tokens (queries x keys).
        sub: sub-block size ``gcd(block, tile_m, tile_n)``.
        causal: whether token-level causality was folded in.
        row_tiles, col_tiles: tiles along queries and keys.
        row_ptr: ``[heads * row_tiles + 1]`` start of each (head, query tile) in the CSR lists.
        row_idx: ``[nnz]`` key-tile index of each kept tile, CSR order.
        row_bits: ``[nnz]`` sub-block mask of each tile, CSR order (bit ``a * (tile_n//sub) + b``
            is sub-block row ``a``, column ``b``).
        row_partial: ``[nnz]`` 1 where the tile needs element masking, CSR order.
        row_lead: ``[heads * row_tiles]`` how many of each row list's first tiles are full
            (the forward kernel runs those without element masks).
        col_ptr, col_idx, col_bits, col_partial: the same tiles in CSC order (per key tile,
            the query tiles).
        col_pos: ``[nnz]`` position in the CSR order of each CSC entry (with ``tile ==
            block``: its index in the compressed format).
        rows, cols: how the programs divide the row lists and the column lists
            (:class:`Work`).
    """

    heads: int
    block: int
    q_len: int
    k_len: int
    tile_m: int
    tile_n: int
    sub: int
    causal: bool
    row_tiles: int
    col_tiles: int
    row_ptr: torch.Tensor
    row_idx: torch.Tensor
    row_bits: torch.Tensor
    row_partial: torch.Tensor
    row_lead: torch.Tensor
    col_ptr: torch.Tensor
    col_idx: torch.Tensor
    col_bits: torch.Tensor
    col_partial: torch.Tensor
    col_pos: torch.Tensor
    rows: Work
    cols: Work

    @property
    def nnz(self) -> int:
        """Number of kept tiles over all heads (reads ``row_ptr[-1]``: the arrays of an
        index built from block lists are longer, padded past it)."""
        return int(self.row_ptr[-1])

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    @property
    def split_tiles(self) -> bool:
        """Whether a tile holds more than one sub-block (kernels then test its bits)."""
        return (self.tile_m // self.sub) * (self.tile_n // self.sub) > 1

    def to_layout(self) -> torch.Tensor:
        """Rebuild the kept sub-blocks as a bool ``[heads, q_len // sub, k_len // sub]`` grid
        (inverse of :func:`build_index` for ``causal=False``)."""
        sm, sn = self.tile_m // self.sub, self.tile_n // self.sub
        grid = torch.zeros(
            (self.heads, self.row_tiles * sm, self.col_tiles * sn),
            dtype=torch.bool,
            device=self.device,
        )
        counts = self.row_ptr[1:] - self.row_ptr[:-1]
        owner = torch.repeat_interleave(
            torch.arange(counts.numel(), device=self.device), counts.long()
        )
        n = owner.numel()
        h, ti, tj = owner // self.row_tiles, owner % self.row_tiles, self.row_idx[:n].long()
        bit = torch.arange(sm * sn, device=self.device)
        on = ((self.row_bits[:n, None] >> bit) & 1).bool()  # [nnz, sm*sn]
        t, b = on.nonzero(as_tuple=True)
        grid[h[t], ti[t] * sm + b // sn, tj[t] * sn + b % sn] = True
        return grid[:, : self.q_len // self.sub, : self.k_len // self.sub]


def as_bool_layout(layout: torch.Tensor, where: str) -> torch.Tensor:
    """``layout`` as a bool ``[H, nb_q, nb_k]`` tensor (2-D means one head), after the
    shared checks (:func:`blocksparse_attn.patterns._checks.layout_tensor`)."""
    return layout_tensor(where, layout) != 0


def sub_block_size(block: int, tile_m: int, tile_n: int) -> int:
    return math.gcd(block, math.gcd(tile_m, tile_n))


def build_index(
    layout: torch.Tensor,
    block: int,
    *,
    q_len: int | None = None,
    k_len: int | None = None,
    tile_m: int | None = None,
    tile_n: int | None = None,
    causal: bool = False,
) -> SparseIndex:
    """Compile ``layout`` (``[H, nb_q, nb_k]``, non-zero = attend) for ``tile_m x tile_n``
    tiles (default: the block). ``q_len``/``k_len`` default to ``nb * block``. ``causal``
    drops tiles wholly after the diagonal (bottom-right aligned: key ``c`` is visible from
    query ``r`` when ``c <= r + k_len - q_len``, so the last query sees the last key) and
    marks the diagonal's tiles partial. Runs on the layout's device.
    """
    where = "build_index"
    grid = as_bool_layout(layout, where)
    H, nbq, nbk = grid.shape
    q_len = nbq * block if q_len is None else q_len
    k_len = nbk * block if k_len is None else k_len
    tile_m = block if tile_m is None else tile_m
    tile_n = block if tile_n is None else tile_n
    if q_len != nbq * block or k_len != nbk * block:
        raise bad_argument(
            where,
            "layout",
            f"of shape [H, {q_len} // {block}, {k_len} // {block}]",
            f"shape {tuple(grid.shape)}",
            "make the layout for these sequence lengths and this block.",
        )
    g, sm, sn, rt, ct = tiling(where, block, q_len, k_len, tile_m, tile_n)
    dev = grid.device

    h, i, j = grid.nonzero(as_tuple=True)
    e = block // g
    if e == 1 and sm == 1 and sn == 1:  # tile == block: one tile per kept block, already sorted
        th, ti, tj = h, i, j
        bits = torch.ones_like(h)
        partial = torch.zeros_like(h, dtype=torch.bool)
    else:
        if e > 1:  # split each block into e x e sub-blocks
            d = torch.arange(e, device=dev)
            i = (i[:, None, None] * e + d[None, :, None]).expand(-1, e, e).reshape(-1)
            j = (j[:, None, None] * e + d[None, None, :]).expand(-1, e, e).reshape(-1)
            h = h[:, None].expand(-1, e * e).reshape(-1)
        key = (h * rt + i // sm) * ct + j // sn
        bit = (i % sm) * sn + (j % sn)
        tiles, inverse = torch.unique(key, sorted=True, return_inverse=True)
        n = tiles.numel()
        # bits are distinct within a tile, so their sum is their bitwise or
        bits = torch.zeros(n, dtype=torch.int64, device=dev).scatter_add_(
            0, inverse, torch.ones_like(bit) << bit
        )
        kept = torch.zeros(n, dtype=torch.int64, device=dev).scatter_add_(
            0, inverse, torch.ones_like(bit)
        )
        th, ti, tj = tiles // (rt * ct), (tiles // ct) % rt, tiles % ct
        partial = kept < sm * sn
    if causal:  # tiles wholly after the diagonal are dropped
        visible = causal_visible(ti, tj, tile_m, tile_n, q_len, k_len)
        th, ti, tj, bits, partial = (x[visible] for x in (th, ti, tj, bits, partial))
    index = assemble(
        th, ti, tj, bits, ~partial, None, H, block, q_len, k_len, tile_m, tile_n, g, causal
    )
    return replace(
        index,
        rows=cut_lists(index.row_ptr, part_length(index.row_ptr.diff())),
        cols=cut_lists(index.col_ptr, part_length(index.col_ptr.diff())),
    )


def causal_visible(ti, tj, tile_m: int, tile_n: int, q_len: int, k_len: int):
    """Whether tile ``(ti, tj)`` holds a key some query of it sees under bottom-right causal
    alignment (key ``c`` visible from query ``r`` when ``c <= r + k_len - q_len``)."""
    last_query = torch.clamp(ti * tile_m + tile_m, max=q_len) - 1
    return tj * tile_n <= last_query + k_len - q_len


def tiling(where: str, block: int, q_len: int, k_len: int, tile_m: int, tile_n: int):
    """``(sub, sm, sn, rt, ct)`` of ``tile_m x tile_n`` tiles over a layout of ``block``:
    the sub-block size, sub-blocks per tile row and column, tile rows and columns."""
    g = sub_block_size(block, tile_m, tile_n)
    sm, sn = tile_m // g, tile_n // g
    if sm * sn > MAX_SUB_BLOCKS:
        raise bad_argument(
            where,
            "tile_m x tile_n",
            f"at most {MAX_SUB_BLOCKS} sub-blocks of {g} tokens",
            f"{tile_m}x{tile_n} over block {block} ({sm}x{sn} sub-blocks)",
            "use a smaller tile for this block.",
        )
    return g, sm, sn, -(-q_len // tile_m), -(-k_len // tile_n)


def assemble(th, ti, tj, bits, full, real, H, block, q_len, k_len, tile_m, tile_n, sub, causal):
    """The index from its kept tiles, sorted by (head, tile row, key tile): their
    coordinates ``th, ti, tj``, sub-block ``bits``, and ``full`` (every sub-block kept).
    ``real`` (``None``: all) marks the kept tiles among padding entries, which come last
    with ``th = H``; the offsets end before them. Every list runs whole
    (:func:`whole_lists`). No host synchronisation."""
    dev = th.device
    rt, ct = -(-q_len // tile_m), -(-k_len // tile_n)
    partial = ~full
    # ragged ends: a tile reaching past the sequence needs element masks
    if q_len % tile_m:
        partial = partial | (ti == rt - 1)
    if k_len % tile_n:
        partial = partial | (tj == ct - 1)
    if causal:  # the diagonal's tiles: key c is visible from query r when c <= r + shift
        partial = partial | (tj * tile_n + tile_n - 1 > ti * tile_m + k_len - q_len)
    if real is not None:
        partial = partial & real
    partial = partial.to(torch.int32)

    # offsets by binary search over the sorted keys; padding rows (H * rt) sort last
    rows = th * rt + ti
    row_ptr = torch.searchsorted(rows, torch.arange(H * rt + 1, device=dev))
    cols = th * ct + tj
    col_order = torch.argsort(cols * rt + ti, stable=True)
    col_ptr = torch.searchsorted(cols[col_order], torch.arange(H * ct + 1, device=dev))
    # a tile leads its row when no partial tile comes before it or is it
    seen = partial.cumsum(0)
    lead = seen == (seen - partial)[row_ptr[rows]]
    if real is not None:
        lead = lead & real
    row_lead = torch.zeros(H * rt + 1, dtype=torch.int32, device=dev)
    row_lead.scatter_add_(0, rows, lead.to(torch.int32))
    return SparseIndex(
        heads=H,
        block=block,
        q_len=q_len,
        k_len=k_len,
        tile_m=tile_m,
        tile_n=tile_n,
        sub=sub,
        causal=causal,
        row_tiles=rt,
        col_tiles=ct,
        row_ptr=row_ptr.to(torch.int32),
        row_idx=tj.to(torch.int32),
        row_bits=bits,
        row_partial=partial,
        row_lead=row_lead[: H * rt],
        col_ptr=col_ptr.to(torch.int32),
        col_idx=ti[col_order].to(torch.int32),
        col_bits=bits[col_order],
        col_partial=partial[col_order],
        col_pos=col_order.to(torch.int32),
        rows=whole_lists(row_ptr),
        cols=whole_lists(col_ptr),
    )


_CACHE: dict[tuple, tuple[weakref.ref, int, object]] = {}
_FROZEN: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(layout) -> (ref, copy)
_COPIES: dict[int, weakref.ref] = {}  # id(copy) -> copy, for the copies frozen() made


def _unchanged(layout: torch.Tensor, copy: torch.Tensor) -> bool:
    """Whether ``layout`` still holds ``copy``'s values. A CUDA layout is compared on the
    device, which waits for the stream (keep static layouts on the CPU, as the patterns
    make them); during CUDA-graph capture nothing can be read back, and the graph replays
    the index it captured."""
    if layout.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    if layout.shape != copy.shape or layout.dtype != copy.dtype:
        return False
    if layout.is_contiguous() and copy.is_contiguous() and not layout.is_floating_point():
        # the bytes as 8-byte words: several times faster on the host than bool by bool
        a, b = layout.reshape(-1).view(torch.uint8), copy.reshape(-1).view(torch.uint8)
        if a.numel() % 8 == 0:
            return torch.equal(a.view(torch.int64), b.view(torch.int64))
    return torch.equal(layout, copy)


def frozen(layout: torch.Tensor) -> torch.Tensor:
    """A private copy of ``layout`` that nothing edits, the same copy (with its compiled
    entries) for as long as ``layout`` holds the same values. Each call compares the values,
    so an edit the version counter does not see (through ``.data``, a NumPy view, DLPack)
    gives a new copy, compiled afresh, instead of the index of the old layout. The
    attention functions freeze the caller's layout once per call; the backward reuses the
    forward's copy."""
    if is_private(layout):
        return layout
    lid = id(layout)
    held = _FROZEN.get(lid)
    if held is not None and held[0]() is layout and _unchanged(layout, held[1]):
        return held[1]
    copy = layout.detach().clone()
    _FROZEN[lid] = (weakref.ref(layout, lambda _, i=lid: _drop(_FROZEN, i)), copy)
    _register(copy)
    return copy


def _register(copy: torch.Tensor) -> None:
    """Mark ``copy`` as the library's own (see :func:`frozen`), while it lives."""
    cid = id(copy)
    _COPIES[cid] = weakref.ref(copy, lambda _, i=cid: _drop(_COPIES, i))


def is_private(t: torch.Tensor) -> bool:
    """Whether ``t`` is a copy :func:`frozen` or :func:`private_lists` made."""
    mine = _COPIES.get(id(t))
    return mine is not None and mine() is t


def is_private_lists(blocks) -> bool:
    """Whether both tensors of ``blocks`` were marked by :func:`private_lists`."""
    return is_private(blocks.num_blocks) and is_private(blocks.indices)


def private_lists(blocks):
    """``blocks`` (:class:`~blocksparse_attn.KVBlocks` the library made and never edits)
    marked as private: the attention functions take them without a copy, so their
    compiled index is cached on them for as long as they live."""
    _register(blocks.num_blocks)
    _register(blocks.indices)
    return blocks


def _drop(table: dict, key: int) -> None:
    """Forget a freed tensor's entry (unless a newer tensor has taken its id)."""
    held = table.get(key)
    ref = held[0] if isinstance(held, tuple) else held
    if ref is not None and ref() is None:
        del table[key]


def _cached(layout: torch.Tensor, key: tuple, build):
    """``build()`` cached by the layout tensor's identity and version plus ``key``; the
    entry goes when the layout tensor is freed. Callers pass a :func:`frozen` copy when the
    tensor comes from a user (its version counter misses some edits)."""
    key = (id(layout), *key)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is layout and hit[1] == layout._version:
        return hit[2]
    value = build()
    ref = weakref.ref(layout, lambda _, k=key: _CACHE.pop(k, None))
    _CACHE[key] = (ref, layout._version, value)
    return value


def get_index(
    layout: torch.Tensor,
    block: int,
    *,
    q_len: int | None = None,
    k_len: int | None = None,
    tile_m: int | None = None,
    tile_n: int | None = None,
    causal: bool = False,
    device: torch.device | str | None = None,
) -> SparseIndex:
    """:func:`build_index`, cached per layout tensor (see :func:`_cached`), block, tile,
    ``causal`` and the device the index is wanted on. Block lists
    (:class:`~blocksparse_attn.KVBlocks`, chosen anew each step) are compiled by
    :func:`~blocksparse_attn.index_dynamic.build_block_list_index`, on their device and
    without a host synchronisation, and cached on their ``indices`` tensor (which must not
    be edited in place while cached: the attention functions pass private copies)."""
    from .kv_blocks import KVBlocks

    if isinstance(layout, KVBlocks):
        from .index_dynamic import build_block_list_index

        lists = layout.to(device) if device is not None else layout
        tile_m, tile_n = tile_m or block, tile_n or block
        # cached on the lists tensor: the forward and the backward of one call share the
        # private copy the attention function made, and the tiles they have in common
        return _cached(
            layout.indices,
            ("lists", id(layout.num_blocks), block, q_len, k_len, tile_m, tile_n, causal),
            lambda: build_block_list_index(
                lists, block, q_len=q_len, k_len=k_len, tile_m=tile_m, tile_n=tile_n, causal=causal
            ),
        )
    device = torch.device(device) if device is not None else layout.device
    return _cached(
        layout,
        ("index", block, q_len, k_len, tile_m, tile_n, causal, str(device)),
        lambda: build_index(
            layout.to(device),
            block,
            q_len=q_len,
            k_len=k_len,
            tile_m=tile_m,
            tile_n=tile_n,
            causal=causal,
        ),
    )


def get_density(layout, nb_k: int | None = None) -> float:
    """Fraction of kept blocks, cached per layout tensor. For block lists
    (:class:`~blocksparse_attn.KVBlocks`, ``nb_k`` key blocks) the bound
    ``max_blocks / nb_k``, known without reading the lists."""
    from .kv_blocks import KVBlocks

    if isinstance(layout, KVBlocks):
        return min(1.0, layout.indices.shape[-1] / max(nb_k or 1, 1))
    return _cached(layout, ("density",), lambda: float((layout != 0).float().mean()))
