"""``deepspeed.ops.sparse_attention.sparse_attention_utils``."""

from ..modules.sparse_attention_utils import SparseAttentionUtils

__all__ = ["SparseAttentionUtils"]
