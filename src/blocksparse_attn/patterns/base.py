"""The sparsity-config base class and the wrapper for a layout the user already has.

A *layout* is an ``int64`` tensor ``[num_heads, nb, nb]`` with ``nb = seq_len // block``;
``layout[h, i, j] == 1`` means query block-row ``i`` of head ``h`` attends key block-column
``j``. Configs build it with :meth:`SparsityConfig.make_layout`.
"""

from __future__ import annotations

import random

import torch

from .._errors import bad_argument, describe
from ._checks import layout_tensor

Seed = int | torch.Generator | None


def _check_positive_int(where: str, name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_argument(where, name, f"an int >= {minimum}", repr(value))


class SparsityConfig:
    """Abstract base of all sparsity patterns (DeepSpeed's ``SparsityConfig``).

    Args:
        num_heads: number of attention heads the layout is made for.
        block: block size in tokens (the layout granularity).
        different_layout_per_head: generate a pattern per head; otherwise head 0's pattern
            is copied to every head.

    Subclasses implement :meth:`make_layout`. Random patterns draw with Python's
    ``random.sample`` in DeepSpeed's order, from the global ``random`` state unless the
    config was given a ``seed`` (an ``int`` or a ``torch.Generator``), in which case every
    ``make_layout`` call starts from ``random.Random(seed)`` and is reproducible.
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False):
        name = type(self).__name__
        _check_positive_int(name, "num_heads", num_heads)
        _check_positive_int(name, "block", block)
        self.num_heads = num_heads
        self.block = block
        self.different_layout_per_head = different_layout_per_head
        self.num_layout_heads = num_heads if different_layout_per_head else 1

    # -- DeepSpeed's helpers -------------------------------------------------------------
    def setup_layout(self, seq_len: int) -> torch.Tensor:
        """Zero ``int64`` layout ``[num_heads, seq_len // block, seq_len // block]``."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise bad_argument(type(self).__name__, "seq_len", "a positive int", repr(seq_len))
        if seq_len % self.block != 0:
            raise ValueError(
                f"Sequence Length, {seq_len}, needs to be dividable by Block size {self.block}! "
                f"Fix: pad the sequence to a multiple of {self.block} "
                "(SparseAttentionUtils.pad_to_block_size) or choose another block."
            )
        nb = seq_len // self.block
        return torch.zeros((self.num_heads, nb, nb), dtype=torch.int64)

    def check_and_propagate_first_head_layout(self, layout: torch.Tensor) -> torch.Tensor:
        """Copy head 0 into every other head unless each head has its own layout."""
        if not self.different_layout_per_head:
            layout[1:] = layout[0]
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__}.make_layout: SparsityConfig is the abstract base and has no "
            "pattern. Fix: use a concrete config (DenseSparsityConfig, FixedSparsityConfig, "
            "VariableSparsityConfig, BigBirdSparsityConfig, BSLongformerSparsityConfig, "
            "LocalSlidingWindowSparsityConfig) or LayoutSparsityConfig for a layout you have."
        )

    # -- helpers for subclasses ----------------------------------------------------------
    def _init_seed(self, seed: Seed) -> None:
        if isinstance(seed, bool) or not (seed is None or isinstance(seed, (int, torch.Generator))):
            raise bad_argument(
                type(self).__name__, "seed", "None, an int or a torch.Generator", repr(seed)
            )
        if isinstance(seed, torch.Generator):
            seed = int(torch.randint(0, 2**62, (1,), generator=seed).item())
        self.seed = seed

    def _rng(self):
        """The sampler for this ``make_layout`` call: global ``random`` or a seeded one."""
        seed = getattr(self, "seed", None)
        return random if seed is None else random.Random(seed)

    def __repr__(self) -> str:
        skip = {"num_layout_heads"}
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in skip)
        return f"{type(self).__name__}({args})"


class LayoutSparsityConfig(SparsityConfig):
    """A config around a layout the caller already has.

    Args:
        layout: ``[num_heads, nb, nb]`` (or ``[nb, nb]`` for one head) tensor of 0/1 values,
            integer or bool.
        block: block size in tokens.

    ``make_layout(seq_len)`` returns the top-left ``seq_len // block`` crop, as
    ``SparseSelfAttention`` does with its master layout.
    """

    def __init__(self, layout: torch.Tensor, block: int = 16):
        where = "LayoutSparsityConfig"
        square = "a square [num_heads, nb, nb] or [nb, nb] tensor"
        layout = layout_tensor(where, layout, square)
        if layout.shape[1] != layout.shape[2]:
            raise bad_argument(where, "layout", square, describe(layout))
        if layout.numel() and not bool(((layout == 0) | (layout == 1)).all()):
            raise bad_argument(
                where,
                "layout",
                "a tensor of 0/1 values",
                f"values {torch.unique(layout)[:8].tolist()}",
            )
        super().__init__(
            num_heads=layout.shape[0], block=block, different_layout_per_head=layout.shape[0] > 1
        )
        self.layout = layout.detach().to("cpu", torch.int64).clone()

    def make_layout(self, seq_len: int) -> torch.Tensor:
        nb = self.setup_layout(seq_len).shape[-1]
        if nb > self.layout.shape[-1]:
            raise bad_argument(
                "LayoutSparsityConfig.make_layout",
                "seq_len",
                f"<= {self.layout.shape[-1] * self.block} (the layout's size)",
                seq_len,
                "build the config from a larger layout.",
            )
        return self.layout[:, :nb, :nb].clone()

    def __repr__(self) -> str:
        return (
            f"LayoutSparsityConfig(num_heads={self.num_heads}, block={self.block}, "
            f"nb={self.layout.shape[-1]})"
        )
