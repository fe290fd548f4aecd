"""Sparsity patterns (layer 1): configs that make block layouts. Pure torch, no Triton.

Same class names, constructor arguments and layouts as ``deepspeed.ops.sparse_attention``.
"""

from .base import LayoutSparsityConfig, SparsityConfig
from .bigbird import BigBirdSparsityConfig
from .dense import DenseSparsityConfig
from .fixed import FixedSparsityConfig
from .longformer import BSLongformerSparsityConfig
from .sliding_window import LocalSlidingWindowSparsityConfig
from .variable import VariableSparsityConfig

__all__ = [
    "SparsityConfig",
    "DenseSparsityConfig",
    "FixedSparsityConfig",
    "VariableSparsityConfig",
    "BigBirdSparsityConfig",
    "BSLongformerSparsityConfig",
    "LocalSlidingWindowSparsityConfig",
    "LayoutSparsityConfig",
]
