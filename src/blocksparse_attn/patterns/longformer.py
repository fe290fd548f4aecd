"""Block-sparse Longformer: a sliding window plus global rows and columns."""

from __future__ import annotations

import torch

from . import _rules
from ._checks import check_fits, check_global_ranges
from .base import SparsityConfig, _check_positive_int


class BSLongformerSparsityConfig(SparsityConfig):
    """DeepSpeed's ``BSLongformerSparsityConfig``, bit-identical layouts.

    Per head: sliding window, then global blocks (each global index, or range, is a dense
    row and a dense column); ``attention='unidirectional'`` keeps the block-level lower
    triangle, any other value is bidirectional (as in DeepSpeed).

    Args:
        num_heads, block, different_layout_per_head: as :class:`SparsityConfig`.
        num_sliding_window_blocks: window width in blocks (an even width behaves as width+1).
        global_block_indices: global block indices (or range starts); those beyond the
            sequence are ignored.
        global_block_end_indices: range ends (exclusive), one per start, or ``None``.
        attention: ``'bidirectional'`` or ``'unidirectional'``.
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_sliding_window_blocks: int = 3,
        global_block_indices: list[int] | None = None,
        global_block_end_indices: list[int] | None = None,
        attention: str = "bidirectional",
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        where = "BSLongformerSparsityConfig"
        _check_positive_int(where, "num_sliding_window_blocks", num_sliding_window_blocks)
        global_block_indices = [0] if global_block_indices is None else list(global_block_indices)
        check_global_ranges(where, global_block_indices, global_block_end_indices)
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.global_block_indices = global_block_indices
        self.global_block_end_indices = (
            None if global_block_end_indices is None else list(global_block_end_indices)
        )
        self.attention = attention

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        check_fits(
            "BSLongformerSparsityConfig",
            "num_sliding_window_blocks",
            self.num_sliding_window_blocks,
            nb,
        )
        half = self.num_sliding_window_blocks // 2
        layout[h] |= _rules.band(nb, half, half)
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        ends = self.global_block_end_indices
        if ends is None:
            ranges = [(s, s + 1) for s in self.global_block_indices]
        else:
            ranges = list(zip(self.global_block_indices, ends))
        for s, e in ranges:
            if s < nb:
                e = min(e, nb)
                layout[h, s:e, :] = 1
                layout[h, :, s:e] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_sliding_window_layout(h, layout)
            self.set_global_layout(h, layout)
        if self.attention == "unidirectional":
            layout = torch.tril(layout)
        return self.check_and_propagate_first_head_layout(layout)
