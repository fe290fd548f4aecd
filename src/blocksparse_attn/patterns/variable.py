"""Random blocks, variable-size local windows and arbitrary global blocks."""

from __future__ import annotations

import torch

from .._errors import bad_argument
from . import _rules
from ._checks import check_attention, check_fits, check_global_ranges, check_horizontal
from .base import Seed, SparsityConfig, _check_positive_int


class VariableSparsityConfig(SparsityConfig):
    """DeepSpeed's ``VariableSparsityConfig``, bit-identical layouts.

    Per head: random, then local, then global.

    Args:
        num_heads, block, different_layout_per_head: as :class:`SparsityConfig`.
        num_random_blocks: random key blocks per row, drawn from all blocks (also when
            unidirectional, as DeepSpeed does; ``causal=True`` hides future ones).
        local_window_blocks: sizes of the consecutive local windows; the last size repeats
            until the sequence is covered.
        global_block_indices: global block indices (or range starts).
        global_block_end_indices: range ends (exclusive), one per start, or ``None``.
        attention: ``'bidirectional'`` or ``'unidirectional'``.
        horizontal_global_attention: global blocks also attend every column (bidirectional only).
        seed: ``None`` (draw from the global ``random`` state, DeepSpeed's behaviour), an int
            or a ``torch.Generator`` for a reproducible layout.
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_random_blocks: int = 0,
        local_window_blocks: list[int] | None = None,
        global_block_indices: list[int] | None = None,
        global_block_end_indices: list[int] | None = None,
        attention: str = "bidirectional",
        horizontal_global_attention: bool = False,
        *,
        seed: Seed = None,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        where = "VariableSparsityConfig"
        _check_positive_int(where, "num_random_blocks", num_random_blocks, minimum=0)
        local_window_blocks = [4] if local_window_blocks is None else list(local_window_blocks)
        if not local_window_blocks or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in local_window_blocks
        ):
            raise bad_argument(
                where,
                "local_window_blocks",
                "a non-empty list of ints >= 1",
                repr(local_window_blocks),
            )
        global_block_indices = [0] if global_block_indices is None else list(global_block_indices)
        check_global_ranges(where, global_block_indices, global_block_end_indices)
        check_attention(where, attention)
        check_horizontal(where, attention, horizontal_global_attention)
        self.num_random_blocks = num_random_blocks
        self.local_window_blocks = local_window_blocks
        self.global_block_indices = global_block_indices
        self.global_block_end_indices = (
            None if global_block_end_indices is None else list(global_block_end_indices)
        )
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention
        self._init_seed(seed)

    def set_random_layout(self, h: int, layout: torch.Tensor, rng=None) -> torch.Tensor:
        nb = layout.shape[1]
        check_fits("VariableSparsityConfig", "num_random_blocks", self.num_random_blocks, nb)
        layout[h] |= _rules.random_rows(nb, self.num_random_blocks, rng or self._rng())
        return layout

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        layout[h] |= _rules.local_windows(
            nb, self.local_window_blocks, self.attention == "unidirectional"
        )
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        bidirectional = self.attention == "bidirectional"
        ends = self.global_block_end_indices
        if ends is None:
            ranges = [(s, s + 1) for s in self.global_block_indices]
        else:
            ranges = list(zip(self.global_block_indices, ends))
        for s, e in ranges:
            if s >= nb:
                continue
            e = min(e, nb)
            if self.horizontal_global_attention:
                layout[h, s:e, :] = 1
            layout[h, 0 if bidirectional else s :, s:e] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        rng = self._rng()
        for h in range(self.num_layout_heads):
            self.set_random_layout(h, layout, rng)
            self.set_local_layout(h, layout)
            self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)
