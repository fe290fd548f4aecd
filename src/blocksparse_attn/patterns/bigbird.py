"""BigBird: random blocks, a sliding window and leading global blocks."""

from __future__ import annotations

import torch

from . import _rules
from ._checks import check_attention, check_fits
from .base import Seed, SparsityConfig, _check_positive_int


class BigBirdSparsityConfig(SparsityConfig):
    """DeepSpeed's ``BigBirdSparsityConfig``, bit-identical layouts.

    Per head: random, then sliding window, then global ("ITC": the first
    ``num_global_blocks`` rows and columns are dense); unidirectional keeps the block-level
    lower triangle. Unlike DeepSpeed, unidirectional rows draw ``min(num_random_blocks,
    row + 1)`` random blocks from ``[0, row]`` instead of raising for the first rows;
    every draw DeepSpeed makes without error is the same draw here.

    Args:
        num_heads, block, different_layout_per_head: as :class:`SparsityConfig`.
        num_random_blocks: random key blocks per row.
        num_sliding_window_blocks: window width in blocks (an even width behaves as width+1).
        num_global_blocks: leading global blocks.
        attention: ``'bidirectional'`` or ``'unidirectional'``.
        seed: ``None`` (global ``random`` state), an int or a ``torch.Generator``.
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_random_blocks: int = 1,
        num_sliding_window_blocks: int = 3,
        num_global_blocks: int = 1,
        attention: str = "bidirectional",
        *,
        seed: Seed = None,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        where = "BigBirdSparsityConfig"
        _check_positive_int(where, "num_random_blocks", num_random_blocks, minimum=0)
        _check_positive_int(where, "num_sliding_window_blocks", num_sliding_window_blocks)
        _check_positive_int(where, "num_global_blocks", num_global_blocks, minimum=0)
        check_attention(where, attention)
        self.num_random_blocks = num_random_blocks
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention
        self._init_seed(seed)

    def set_random_layout(self, h: int, layout: torch.Tensor, rng=None) -> torch.Tensor:
        nb = layout.shape[1]
        check_fits("BigBirdSparsityConfig", "num_random_blocks", self.num_random_blocks, nb)
        layout[h] |= _rules.random_rows(
            nb,
            self.num_random_blocks,
            rng or self._rng(),
            causal_rows=self.attention == "unidirectional",
        )
        return layout

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        check_fits(
            "BigBirdSparsityConfig", "num_sliding_window_blocks", self.num_sliding_window_blocks, nb
        )
        half = self.num_sliding_window_blocks // 2
        layout[h] |= _rules.band(nb, half, half)
        return layout

    def set_global_layout_itc(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        check_fits("BigBirdSparsityConfig", "num_global_blocks", self.num_global_blocks, nb)
        g = self.num_global_blocks
        layout[h, :g, :] = 1
        layout[h, :, :g] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        rng = self._rng()
        for h in range(self.num_layout_heads):
            self.set_random_layout(h, layout, rng)
            self.set_sliding_window_layout(h, layout)
            self.set_global_layout_itc(h, layout)
        if self.attention == "unidirectional":
            layout = torch.tril(layout)
        return self.check_and_propagate_first_head_layout(layout)
