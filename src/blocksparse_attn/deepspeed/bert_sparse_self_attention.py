"""``deepspeed.ops.sparse_attention.bert_sparse_self_attention``."""

from ..modules.bert_sparse_self_attention import BertSparseSelfAttention

__all__ = ["BertSparseSelfAttention"]
