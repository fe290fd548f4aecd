"""Modules (layer 7): DeepSpeed's ``SparseSelfAttention``, ``BertSparseSelfAttention`` and
``SparseAttentionUtils``."""

from .bert_sparse_self_attention import BertSparseSelfAttention
from .sparse_attention_utils import HFBertSparseSelfAttention, SparseAttentionUtils
from .sparse_self_attention import SparseSelfAttention

__all__ = [
    "SparseSelfAttention",
    "BertSparseSelfAttention",
    "HFBertSparseSelfAttention",
    "SparseAttentionUtils",
]
