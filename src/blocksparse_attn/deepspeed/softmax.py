"""``deepspeed.ops.sparse_attention.softmax``: the block-sparse softmax (in place)."""

from ..ops.softmax import Softmax

__all__ = ["Softmax"]
