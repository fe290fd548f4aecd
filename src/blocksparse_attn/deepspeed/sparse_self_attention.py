"""``deepspeed.ops.sparse_attention.sparse_self_attention``."""

from ..modules.sparse_self_attention import SparseSelfAttention

__all__ = ["SparseSelfAttention"]
