"""Kernel tile shapes and launch configurations, keyed by head dim, block and dtype.

The tile shape fixes the compiled index (:mod:`blocksparse_attn.index`), so it is chosen
here, not by the autotuner; the autotuner picks ``num_warps``/``num_stages`` on a GPU (for
the attention kernels also tensor-descriptor loads and a register cap).
Under Triton's interpreter a single configuration is used (autotuning needs a GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..index import MAX_SUB_BLOCKS, sub_block_size
from .availability import interpreting


@dataclass(frozen=True)
class Tiles:
    m: int  # query rows per program
    n: int  # keys per step


def _fits(block: int, m: int, n: int) -> bool:
    g = sub_block_size(block, m, n)
    return (m // g) * (n // g) <= MAX_SUB_BLOCKS


def _shrink(block: int, m: int, n: int) -> Tiles:
    """Largest tiles not above ``m x n`` whose sub-block mask fits in 64 bits."""
    while not _fits(block, m, n):
        if m >= n:
            m //= 2
        else:
            n //= 2
    return Tiles(m, n)


# Layouts at least this dense use large forward tiles (more reuse per program: 128x128 at
# head dim <= 64, 128x64 above, where 128x64 through tensor descriptors with 8 warps won);
# sparser ones use 64x64 tiles, which shortens the longest row's program (the critical path
# when a few global rows attend everything). Measured on an H100: benchmarks/NOTES.md, v2
# and v4 sweeps.
DENSE_LAYOUT = 0.3


# Attention programs run in groups of this many row (column) lists, batch-head by
# batch-head: see ``_common._schedule``. Measured on an H100: benchmarks/NOTES.md, v4.
PROGRAM_GROUP = 16


def forward_tiles(head_dim: int, block: int, density: float = 1.0, itemsize: int = 2) -> Tiles:
    """Forward tiles. Four-byte inputs (fp32) take the smaller tiles: 128x128 fp32 tiles at
    head dim 128 exceed a Hopper SM's shared memory."""
    if interpreting():
        return _shrink(block, 64, 64)
    if head_dim > 128:
        return _shrink(block, 64, 32)
    if density >= DENSE_LAYOUT and itemsize <= 2:
        return _shrink(block, 128, 128 if head_dim <= 64 else 64)
    return _shrink(block, 64, 64)


def backward_tiles(
    head_dim: int, block: int, density: float = 1.0, itemsize: int = 2, lists: bool = False
) -> tuple[Tiles, Tiles]:
    """(dK/dV tiles, dQ tiles): dK/dV programs own ``n`` keys and step over ``m`` queries;
    dQ programs own ``m`` queries and step over ``n`` keys. ``lists``: the layout is block
    lists whose index is built each step; dQ then takes the dK/dV tiles, so that one index
    serves the backward (and the forward, whose sparse tiles are the same). On top-k
    layouts the 64x64 dQ was also the faster one at block 64 (backward 2.41 against
    3.16 ms) and within 4% at block 128 (4.30 against 4.15 ms), where one index build
    fewer saves more (benchmarks/NOTES.md, dynamic step)."""
    if interpreting():
        return _shrink(block, 64, 64), _shrink(block, 64, 64)
    if itemsize > 2 or lists:
        return _shrink(block, 64, 64), _shrink(block, 64, 64)
    return _shrink(block, 64, 64), _shrink(block, 128, 64)


def launch_configs(kind: str):
    """``triton.Config`` list for the autotuner (one entry under the interpreter)."""
    import triton

    # attention kernels: DESC reads tiles through tensor descriptors (the launcher's
    # ALLOW_DESC prunes those where they may not run); the matmuls have no such option
    fixed = {} if kind == "matmul" else {"DESC": 0}
    if interpreting():
        return [triton.Config(fixed, num_warps=4, num_stages=1)]
    if os.environ.get("BLOCKSPARSE_ATTN_AUTOTUNE", "1") == "0":  # tests: one config
        return [triton.Config(fixed, num_warps=4, num_stages=2)]
    if kind == "matmul":  # one operand pair per step: deeper pipelines can pay
        return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]
    # the combinations that won somewhere in the v2 and v4 sweeps (benchmarks/NOTES.md;
    # descriptors never won with 3 stages)
    options = [(0, w, s, None) for w in (4, 8) for s in (2, 3)] + [(1, 4, 2, None), (1, 8, 2, None)]
    # 8 warps capped at 128 registers a thread: two programs fit an SM's 65536 registers.
    # Uncapped, the token-causal forward takes 153 and runs one program per SM: 1.78 ms
    # against 1.07 ms for the same tiles without the mask at 126 (H100, NOTES.md v5)
    options += [(d, w, s, 128) for d, w, s, _ in options if w == 8]
    return [
        triton.Config({"DESC": d}, num_warps=w, num_stages=s, maxnreg=r) for d, w, s, r in options
    ]


def matmul_tile(size: int, block: int, itemsize: int, widest: int = 128) -> int:
    """Width of a block-sparse matmul's dense tile (the inner K of ``sdd``, the N of
    ``dsd``, the M of ``dds``): up to ``widest``, halved while a two-stage pipeline of one
    ``block x block`` operand and one ``block x tile`` operand would pass 200 KB of shared
    memory. ``sdd`` passes ``widest=64``: its tile is the reduction step, and a reduction of
    one step leaves nothing to pipeline (measured on the H100: 124 against 203 TF/s at
    block 128, K 128)."""
    tile = max(16, min(widest, 1 << max(0, size - 1).bit_length()))
    while tile > 16 and 2 * itemsize * block * (block + tile) > 200 * 1024:
        tile //= 2
    return tile
