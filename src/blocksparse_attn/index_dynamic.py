"""The compiled layout from block lists, built on the device with no host synchronisation
(index layer).

:func:`blocksparse_attn.index.build_index` sizes its arrays by the number of kept tiles,
which it must read back (``nonzero``, ``unique``). Here every array has a size known from
the shapes alone: the lists' capacity ``heads * nb_q * max_blocks`` (times the sub-blocks
per block when a block is split across tiles). The kept tiles come first, in the order
``build_index`` gives them, and the padding after them is never read: the kernels walk
``row_ptr[r] .. row_ptr[r + 1]`` and ``col_ptr``, which end at the number of kept tiles. So
a layout chosen on the GPU each step (top-k selection) is compiled without waiting for the
GPU, and the whole step can be captured in a CUDA graph.

Duplicated entries in a list are merged (a key block listed twice is attended once).

On a GPU, square tiles that divide the block (the 64x64 tiles of top-k steps at blocks 64
and 128) are compiled by a Triton kernel in two launches plus one sort
(:mod:`blocksparse_attn.kernels.index_build`); other tiles by the PyTorch operations here.
Both give the same index.
"""

from __future__ import annotations

import torch

from ._errors import bad_argument
from .index import MAX_SUB_BLOCKS, SparseIndex, assemble, causal_visible, tiling, whole_lists
from .kv_blocks import KVBlocks


def _previous(t: torch.Tensor, fill: int) -> torch.Tensor:
    """``t`` shifted right by one, ``fill`` first."""
    return torch.cat([t.new_full((1,), fill), t[:-1]])


def build_block_list_index(
    blocks: KVBlocks,
    block: int,
    *,
    q_len: int,
    k_len: int,
    tile_m: int,
    tile_n: int,
    causal: bool = False,
    kernel: bool | None = None,
) -> SparseIndex:
    """Compile block lists ``[B_l, H_l, nb_q]`` (their first two dims as ``B_l * H_l``
    layout heads) for ``tile_m x tile_n`` tiles, with the meaning of
    :func:`~blocksparse_attn.index.build_index` (``causal`` bottom-right aligned). The used
    entries must be valid key blocks (:meth:`KVBlocks.check`). Arrays past ``row_ptr[-1]``
    are padding. Runs on the lists' device; no host synchronisation.

    ``kernel``: build with the two-launch Triton builder
    (:mod:`blocksparse_attn.kernels.index_build`), which takes square tiles that divide the
    block and lists of at most ``MAX_WIDTH`` entries; ``None`` (default) uses it for CUDA
    lists it takes and PyTorch operations otherwise (the same index)."""
    where = "build_block_list_index"
    counts = blocks.num_blocks.flatten(0, 1)  # [H, nb_q]
    lists = blocks.indices.flatten(0, 1)  # [H, nb_q, M]
    H, nbq, width = lists.shape
    if q_len != nbq * block:
        raise bad_argument(
            where,
            "blocks",
            f"lists for {q_len} // {block} query blocks",
            f"{nbq} rows",
            "make the lists for this sequence length and block.",
        )
    g, sm, sn, rt, ct = tiling(where, block, q_len, k_len, tile_m, tile_n)
    if kernel is None:
        kernel = lists.is_cuda and _kernel_takes(block, tile_m, tile_n, width)
    if kernel:
        if not _kernel_takes(block, tile_m, tile_n, width):
            raise bad_argument(
                where,
                "kernel",
                "square tiles that divide the block, lists of at most 256 entries",
                f"tiles {tile_m}x{tile_n} over block {block}, {width} entries per list",
                "pass kernel=None: PyTorch operations build what the kernel does not take.",
            )
        return _built_by_kernel(counts, lists, block, q_len, k_len, tile_m, causal)
    e = block // g
    dev = lists.device

    # every list entry, used or not, at sub-block granularity, one row per sub-row of
    # queries ([H, sub-rows, entries]), padded to whole tile rows
    used = torch.arange(width, device=dev) < counts[..., None].long()  # [H, nb_q, M]
    j = lists.long()
    if e > 1:  # a block is e x e sub-blocks: sub-rows i * e + d, sub-columns j * e + d
        d = torch.arange(e, device=dev)
        j = (j[:, :, None, :, None] * e + d).expand(H, nbq, e, width, e)
        used = used[:, :, None, :, None].expand(H, nbq, e, width, e)
    j, used = j.reshape(H, nbq * e, -1), used.reshape(H, nbq * e, -1)
    spare = rt * sm - nbq * e  # sub-rows past the sequence, in the last tile row
    if spare:
        j = torch.nn.functional.pad(j, (0, 0, 0, spare))
        used = torch.nn.functional.pad(used, (0, 0, 0, spare))
    a = torch.arange(rt * sm, device=dev)[None, :, None] % sm  # sub-row within its tile
    ti = torch.arange(rt * sm, device=dev)[None, :, None] // sm
    tj = j // sn
    if causal:  # tiles wholly after the diagonal are dropped
        used = used & causal_visible(ti, tj, tile_m, tile_n, q_len, k_len)
    # sort each tile row's entries by (key tile, sub-block): a tile's entries become one
    # run, repeats are merged; the tile rows are already in order (no global sort)
    unused = ct * MAX_SUB_BLOCKS
    local = torch.where(used, tj * MAX_SUB_BLOCKS + a * sn + j % sn, unused)
    local = local.reshape(H * rt, -1)  # lists of any strides
    local = torch.sort(local.to(torch.int32) if unused < 2**31 else local, dim=-1)[0].long()
    none = H * rt * ct  # the key of unused entries: after every tile
    row = torch.arange(H * rt, device=dev)[:, None]
    key = torch.where(local < unused, row * ct + local // MAX_SUB_BLOCKS, none).reshape(-1)
    bit = (local % MAX_SUB_BLOCKS).reshape(-1)
    entry = key * MAX_SUB_BLOCKS + bit
    real = key < none
    new_bit = real & (entry != _previous(entry, -1))
    first = real & (key != _previous(key, -1))
    cap = entry.numel()
    slot = torch.where(real, torch.cumsum(first, 0) - 1, cap)  # the run's place; cap: spare
    tile = torch.full((cap + 1,), none, dtype=torch.int64, device=dev)
    tile.scatter_(0, torch.where(first, slot, cap), key)
    tile = tile[:cap]
    bits = torch.zeros(cap + 1, dtype=torch.int64, device=dev)
    bits.scatter_add_(0, slot, torch.where(new_bit, torch.ones_like(bit) << bit, 0))
    kept = torch.zeros(cap + 1, dtype=torch.int64, device=dev)
    kept.scatter_add_(0, slot, new_bit.long())
    bits, kept = bits[:cap], kept[:cap]

    th, ti, tj = tile // (rt * ct), (tile // ct) % rt, tile % ct  # padding: th = H
    full = kept == sm * sn
    return assemble(
        th, ti, tj, bits, full, tile < none, H, block, q_len, k_len, tile_m, tile_n, g, causal
    )


def _kernel_takes(block: int, tile_m: int, tile_n: int, width: int) -> bool:
    from .kernels.index_build import MAX_WIDTH

    return tile_m == tile_n and block % tile_m == 0 and width <= MAX_WIDTH


def _built_by_kernel(counts, lists, block, q_len, k_len, tile, causal) -> SparseIndex:
    """:func:`build_block_list_index` by :func:`~blocksparse_attn.kernels.index_build.list_tiles`:
    every kept tile is one sub-block, so its mask is one bit."""
    from .kernels.index_build import list_tiles

    arrays = list_tiles(counts, lists, block, tile, q_len, k_len, causal)
    bits = torch.ones_like(arrays["row_idx"], dtype=torch.int64)
    return SparseIndex(
        heads=lists.shape[0],
        block=block,
        q_len=q_len,
        k_len=k_len,
        tile_m=tile,
        tile_n=tile,
        sub=tile,
        causal=causal,
        row_tiles=-(-q_len // tile),
        col_tiles=-(-k_len // tile),
        row_bits=bits,
        col_bits=bits,
        rows=whole_lists(arrays["row_ptr"]),
        cols=whole_lists(arrays["col_ptr"]),
        **arrays,
    )
