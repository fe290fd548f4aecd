"""``BertSparseSelfAttention``: Q/K/V projections around ``SparseSelfAttention``."""

from __future__ import annotations

import torch
from torch import nn

from .._errors import bad_argument
from ..patterns import FixedSparsityConfig, SparsityConfig
from .sparse_self_attention import SparseSelfAttention


class BertSparseSelfAttention(nn.Module):
    """DeepSpeed's ``BertSparseSelfAttention``: a drop-in for a BERT self-attention block.

    Args:
        config: an object with ``hidden_size`` and ``num_attention_heads`` (a Hugging Face
            ``BertConfig`` works); ``max_position_embeddings``, when present and above 2048,
            sets the master layout's length.
        sparsity_config: the pattern; default ``FixedSparsityConfig(num_attention_heads)``
            (DeepSpeed's default had 4 heads whatever the model).

    ``forward(hidden_states, attention_mask=None)`` returns ``[B, L, hidden]``;
    ``attention_mask`` is BERT's additive key-padding mask (``[B, 1, 1, L]`` or ``[B, L]``).
    """

    def __init__(self, config, sparsity_config: SparsityConfig | None = None):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        if hidden % heads != 0:
            raise bad_argument(
                "BertSparseSelfAttention",
                "config.hidden_size",
                f"a multiple of config.num_attention_heads ({heads})",
                hidden,
            )
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.all_head_size = hidden
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        if sparsity_config is None:
            sparsity_config = FixedSparsityConfig(num_heads=heads)
        max_len = max(2048, getattr(config, "max_position_embeddings", 0) or 0)
        max_len = -(-max_len // sparsity_config.block) * sparsity_config.block
        self.sparse_self_attention = SparseSelfAttention(sparsity_config, max_seq_length=max_len)

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def attend(self, hidden_states: torch.Tensor, **mask_kwargs) -> torch.Tensor:
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        out = self.sparse_self_attention(q, k, v, **mask_kwargs)
        B, _, L, _ = out.shape
        return out.transpose(1, 2).reshape(B, L, self.all_head_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.attend(hidden_states, key_padding_mask=attention_mask)
