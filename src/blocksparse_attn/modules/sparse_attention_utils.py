"""``SparseAttentionUtils``: DeepSpeed's helpers for BERT/RoBERTa, working on current
Hugging Face ``transformers`` (5.x; 4.x self-attention calls are accepted too)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .._errors import bad_argument, describe
from ..patterns import SparsityConfig
from .bert_sparse_self_attention import BertSparseSelfAttention

_log = logging.getLogger(__name__)


def key_padding_from_hf_mask(mask: torch.Tensor | None, batch: int, length: int):
    """A Hugging Face self-attention mask as an additive ``[B, L]`` key-padding mask.

    Accepts ``None``, ``[B, L]``, the extended ``[B, 1, 1, L]`` and the expanded
    ``[B, 1, L, L]`` forms, additive floats or bool keep-masks. An expanded mask must
    be the same for every query (a padding mask); anything else is not supported."""
    if mask is None:
        return None
    where = "key_padding_from_hf_mask"
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == length and length > 1:
        first = mask[:, :, :1, :]
        if not torch.equal(mask, first.expand_as(mask)):
            raise bad_argument(
                where,
                "attention_mask",
                "a padding mask (one row for all queries)",
                "a mask that differs between queries",
                "block-sparse layers take a key-padding mask and one [L, L] "
                "attn_mask; express per-query masking in the layout or "
                "causal=True.",
                error=NotImplementedError,
            )
        mask = first
    if mask.dim() == 4:
        mask = mask.reshape(mask.shape[0], mask.shape[-1])
    if mask.dim() != 2 or mask.shape[-1] != length or mask.shape[0] not in (1, batch):
        raise bad_argument(
            where,
            "attention_mask",
            f"[B, L], [B, 1, 1, L] or [B, 1, L, L] with B={batch}, L={length}",
            describe(mask),
        )
    if mask.dtype == torch.bool:
        zero = torch.zeros((), device=mask.device)
        return torch.where(mask, zero, torch.full((), float("-inf"), device=mask.device))
    return mask


class HFBertSparseSelfAttention(BertSparseSelfAttention):
    """What ``replace_self_attention_layer_with_sparse_self_attention_layer`` puts at
    ``layer.attention.self``: the call signature and return value of Hugging Face's
    ``BertSelfAttention`` (``(attn_output, None)``: attention weights are never formed)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        # transformers 4.x passes (head_mask, encoder_hidden_states, encoder_attention_mask,
        # past_key_value, output_attentions) positionally: each must be unset here
        if any(a is not None and a is not False for a in args):
            raise NotImplementedError(
                "HFBertSparseSelfAttention: head_mask, cross-attention inputs, a KV cache and "
                "output_attentions are not supported; got positional arguments "
                f"{[type(a).__name__ for a in args]}."
            )
        for name in (
            "head_mask",
            "encoder_hidden_states",
            "past_key_value",
            "past_key_values",
            "cache",
        ):
            if kwargs.get(name) is not None:
                raise NotImplementedError(
                    f"HFBertSparseSelfAttention: {name} is not supported (block-sparse "
                    "self-attention has no cross-attention or KV cache); use it in encoders."
                )
        if kwargs.get("output_attentions"):
            raise NotImplementedError(
                "HFBertSparseSelfAttention: output_attentions=True is not "
                "supported: the fused kernel never forms the weights."
            )
        B, L, _ = hidden_states.shape
        kpm = key_padding_from_hf_mask(attention_mask, B, L)
        return self.attend(hidden_states, key_padding_mask=kpm), None


def _encoder_layers(model):
    """(kind, encoder layers) of a BERT or RoBERTa model (bare or with a head)."""
    for kind in ("bert", "roberta"):
        inner = getattr(model, kind, None)
        if inner is not None:
            return kind, inner.encoder.layer
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in ("bert", "roberta") and hasattr(model, "encoder"):
        return kind, model.encoder.layer
    raise bad_argument(
        "SparseAttentionUtils",
        "model",
        "a BERT or RoBERTa model",
        type(model).__name__,
        error=ValueError,
    )


class SparseAttentionUtils:
    """Static helpers to move a BERT/RoBERTa model to block-sparse self-attention."""

    @staticmethod
    def extend_position_embedding(model: nn.Module, max_position: int) -> nn.Module:
        """Grow the position-embedding table to ``max_position`` positions by tiling the
        pretrained rows (RoBERTa keeps its two reserved rows and gets ``max_position + 2``).
        Every new row is initialised (DeepSpeed left RoBERTa's reserved rows empty), the
        table has exactly the requested size, and the ``position_ids`` buffer grows too."""
        kind, _ = _encoder_layers(model)
        embeddings = (getattr(model, kind, model)).embeddings
        old = embeddings.position_embeddings.weight.data
        reserved = 2 if kind == "roberta" else 0
        original = old.shape[0] - reserved
        if max_position <= original:
            raise bad_argument(
                "extend_position_embedding",
                "max_position",
                f"> the current {original} positions",
                max_position,
            )
        new = old.new_empty((max_position + reserved, old.shape[1]))
        new[:reserved] = old[:reserved]
        reps = -(-max_position // original)
        new[reserved:] = old[reserved:].repeat(reps, 1)[:max_position]
        table = nn.Embedding(
            new.shape[0],
            new.shape[1],
            padding_idx=embeddings.position_embeddings.padding_idx,
            device=old.device,
            dtype=old.dtype,
        )
        table.weight.data.copy_(new)
        embeddings.position_embeddings = table
        if hasattr(embeddings, "position_ids"):
            ids = torch.arange(new.shape[0], device=embeddings.position_ids.device)
            embeddings.register_buffer("position_ids", ids.expand((1, -1)), persistent=False)
        if hasattr(embeddings, "token_type_ids"):
            tt = torch.zeros(
                (1, new.shape[0]), dtype=torch.long, device=embeddings.token_type_ids.device
            )
            embeddings.register_buffer("token_type_ids", tt, persistent=False)
        model.config.max_position_embeddings = max_position + reserved
        _log.info("extend_position_embedding: position embeddings now %s", tuple(new.shape))
        return model

    @staticmethod
    def update_tokenizer_model_max_length(tokenizer, max_position: int):
        """Set the tokenizer's maximum length to ``max_position``; returns the tokenizer."""
        tokenizer.model_max_length = max_position
        tokenizer.init_kwargs["model_max_length"] = max_position
        _log.info("update_tokenizer_model_max_length: model_max_length = %d", max_position)
        return tokenizer

    @staticmethod
    def replace_model_self_attention_with_sparse_self_attention(
        model: nn.Module, max_position: int, sparsity_config: SparsityConfig | None = None
    ) -> nn.Module:
        """Replace every self-attention layer of a BERT/RoBERTa model (bare or with a head)
        by block-sparse self-attention, keeping the pretrained Q/K/V weights."""
        kind, layers = _encoder_layers(model)
        model.config.max_position_embeddings = max_position + (2 if kind == "roberta" else 0)
        SparseAttentionUtils.replace_self_attention_layer_with_sparse_self_attention_layer(
            model.config, layers, sparsity_config
        )
        return model

    @staticmethod
    def replace_self_attention_layer_with_sparse_self_attention_layer(
        config, layers, sparsity_config: SparsityConfig | None = None
    ):
        """Put an :class:`HFBertSparseSelfAttention` at ``layer.attention.self`` of each
        layer, moving the layer's ``query``/``key``/``value`` modules into it."""
        for layer in layers:
            old = layer.attention.self
            new = HFBertSparseSelfAttention(config, sparsity_config)
            new.query, new.key, new.value = old.query, old.key, old.value
            new.to(old.query.weight.device)
            layer.attention.self = new
        return layers

    @staticmethod
    def pad_to_block_size(
        block_size: int,
        input_ids,
        attention_mask,
        token_type_ids,
        position_ids,
        inputs_embeds,
        pad_token_id: int,
        model_embeddings,
    ):
        """Right-pad the inputs to a multiple of ``block_size``; call before the embeddings.

        ``input_ids`` get ``pad_token_id``; ``inputs_embeds`` get the embeddings of pad
        tokens (``model_embeddings(pad_ids)``); ``token_type_ids`` 0; ``position_ids``
        ``pad_token_id`` (as DeepSpeed). ``attention_mask`` padding is masked in its own
        form: 0/False for a ``[B, L]`` 0/1 or bool mask, the dtype's minimum for an additive
        extended ``[B, 1, 1, L]`` mask. Any of them may be ``None``.

        Returns ``(pad_len, input_ids, attention_mask, token_type_ids, position_ids,
        inputs_embeds)``."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise bad_argument(
                "pad_to_block_size", "input_ids / inputs_embeds", "at least one tensor", "both None"
            )
        B, L = ref.shape[0], ref.shape[1]
        pad_len = (block_size - L % block_size) % block_size
        if pad_len == 0:
            return pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds

        def pad(t, value):
            if t is None:
                return None
            return nn.functional.pad(t, (0, pad_len), value=value)

        if inputs_embeds is not None:
            pad_ids = inputs_embeds.new_full((B, pad_len), pad_token_id, dtype=torch.long)
            inputs_embeds = torch.cat([inputs_embeds, model_embeddings(pad_ids)], dim=-2)
        input_ids = pad(input_ids, pad_token_id)
        position_ids = pad(position_ids, pad_token_id)
        token_type_ids = pad(token_type_ids, 0)
        if attention_mask is not None:
            if attention_mask.dim() == 4 and attention_mask.dtype.is_floating_point:
                attention_mask = pad(attention_mask, torch.finfo(attention_mask.dtype).min)
            else:
                attention_mask = pad(attention_mask, 0)
        return pad_len, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds

    @staticmethod
    def unpad_sequence_output(pad_len: int, sequence_output: torch.Tensor) -> torch.Tensor:
        """Drop the ``pad_len`` positions added by :meth:`pad_to_block_size`."""
        return sequence_output[:, :-pad_len] if pad_len > 0 else sequence_output
