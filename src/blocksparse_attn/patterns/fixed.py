"""OpenAI Sparse Transformer "fixed" pattern: local windows plus summary (global) blocks."""

from __future__ import annotations

import torch

from .._errors import bad_argument
from . import _rules
from ._checks import check_attention, check_horizontal
from .base import SparsityConfig, _check_positive_int


class FixedSparsityConfig(SparsityConfig):
    """DeepSpeed's ``FixedSparsityConfig``, bit-identical layouts.

    The sequence is cut into windows of ``num_local_blocks`` blocks; inside a window every
    block attends every block (bidirectional) or every earlier block (unidirectional). In
    each window, ``num_global_blocks`` blocks (the last ones for pattern 0, moving left for
    patterns 1, 2, ...) are global columns attended by all rows (bidirectional) or by the
    rows from the global block downwards (unidirectional); with
    ``horizontal_global_attention`` they also attend every column. A partial trailing
    window gets a global group clamped to fit the sequence.

    Args:
        num_heads, block, different_layout_per_head: as :class:`SparsityConfig`.
        num_local_blocks: window size in blocks.
        num_global_blocks: global blocks per window; must divide ``num_local_blocks``.
        attention: ``'bidirectional'`` or ``'unidirectional'``.
        horizontal_global_attention: global blocks also attend all columns (bidirectional only).
        num_different_global_patterns: number of global positions cycled over the heads
            (needs ``different_layout_per_head``; at most
            ``num_local_blocks // num_global_blocks``).
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_local_blocks: int = 4,
        num_global_blocks: int = 1,
        attention: str = "bidirectional",
        horizontal_global_attention: bool = False,
        num_different_global_patterns: int = 1,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        where = "FixedSparsityConfig"
        _check_positive_int(where, "num_local_blocks", num_local_blocks)
        _check_positive_int(where, "num_global_blocks", num_global_blocks)
        _check_positive_int(where, "num_different_global_patterns", num_different_global_patterns)
        if num_local_blocks % num_global_blocks != 0:
            raise bad_argument(
                where,
                "num_local_blocks",
                "divisible by num_global_blocks",
                f"num_local_blocks={num_local_blocks}, num_global_blocks={num_global_blocks}",
                "choose num_global_blocks among the divisors of num_local_blocks.",
            )
        check_attention(where, attention)
        check_horizontal(where, attention, horizontal_global_attention)
        if num_different_global_patterns > 1 and not different_layout_per_head:
            raise bad_argument(
                where,
                "num_different_global_patterns",
                "1 unless different_layout_per_head=True",
                num_different_global_patterns,
                "set different_layout_per_head=True to vary the pattern by head.",
            )
        most = num_local_blocks // num_global_blocks
        if num_different_global_patterns > most:
            raise bad_argument(
                where,
                "num_different_global_patterns",
                f"<= num_local_blocks // num_global_blocks = {most}",
                num_different_global_patterns,
            )
        self.num_local_blocks = num_local_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention
        self.num_different_global_patterns = num_different_global_patterns

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        grid = _rules.local_windows(nb, [self.num_local_blocks], self.attention == "unidirectional")
        layout[h] |= grid
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        w, g = self.num_local_blocks, self.num_global_blocks
        first = w - (1 + h % self.num_different_global_patterns) * g
        full = nb - nb % w
        starts = list(range(first, full, w))
        if full < nb:  # partial trailing window: its global group is clamped inside the grid
            starts.append(min(full + first, nb - g))
        bidirectional = self.attention == "bidirectional"
        for s in starts:
            layout[h, 0 if bidirectional else s :, s : s + g] = 1
            if self.horizontal_global_attention:
                layout[h, s : s + g, :] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_local_layout(h, layout)
            self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)
