"""Every block kept: full attention through the block-sparse machinery."""

from __future__ import annotations

import torch

from .base import SparsityConfig


class DenseSparsityConfig(SparsityConfig):
    """All blocks set (DeepSpeed's ``DenseSparsityConfig``). For testing and comparison.

    Args:
        num_heads, block, different_layout_per_head: as :class:`SparsityConfig`
            (``different_layout_per_head`` is accepted and has no effect).
    """

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        layout.fill_(1)
        return layout
