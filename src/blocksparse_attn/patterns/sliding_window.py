"""A purely local sliding window."""

from __future__ import annotations

import torch

from . import _rules
from ._checks import check_fits
from .base import SparsityConfig, _check_positive_int


class LocalSlidingWindowSparsityConfig(SparsityConfig):
    """DeepSpeed's ``LocalSlidingWindowSparsityConfig``, bit-identical layouts.

    With ``half = num_sliding_window_blocks // 2``, row ``r`` attends
    ``[r - half, r + half]`` (bidirectional) or ``[r - half, r]`` (any other ``attention``
    value, as in DeepSpeed; the default is unidirectional). One layout for all heads.

    Args:
        num_heads, block: as :class:`SparsityConfig`.
        num_sliding_window_blocks: window width in blocks.
        attention: ``'unidirectional'`` (default) or ``'bidirectional'``.
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        num_sliding_window_blocks: int = 3,
        attention: str = "unidirectional",
    ):
        super().__init__(num_heads, block)
        _check_positive_int(
            "LocalSlidingWindowSparsityConfig",
            "num_sliding_window_blocks",
            num_sliding_window_blocks,
        )
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.attention = attention

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        check_fits(
            "LocalSlidingWindowSparsityConfig",
            "num_sliding_window_blocks",
            self.num_sliding_window_blocks,
            nb,
        )
        half = self.num_sliding_window_blocks // 2
        after = half if self.attention == "bidirectional" else 0
        layout[h] |= _rules.band(nb, half, after)
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_sliding_window_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)
