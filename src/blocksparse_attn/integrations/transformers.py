"""Block-sparse attention for Hugging Face ``transformers`` decoder models (Llama, Qwen,
Mistral-class: grouped-query heads, causal, padding masks, KV-cache generation).

``register(layout_source)`` adds an attention function to ``transformers``' attention
interface and, under the same name, a mask function to its mask interface: ``transformers``
5 gives an attention function of a new name no mask at all unless such a mask function
exists, which would let queries attend padding. Then::

    register(FixedSparsityConfig(num_heads=8, block=64, attention="unidirectional"))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="blocksparse")

Lengths need not be multiples of the block: queries and keys are padded so that every
token keeps its absolute position's block (queries at the front by ``(L_k - L_q) % block``,
both at the end to the block) and the padding is masked, so the layout's blocks are the
same in prefill and in every decoding step; causal attention is bottom-right aligned (the
newest token is the last query). A decoding step (one new token per sequence, no padding
in the batch, no gradient, a fixed pattern) goes to
:func:`~blocksparse_attn.block_sparse_decode`, which reads the cache's keys in place (on the
fused backend, the decoding kernels); other calls pad and copy as above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._errors import bad_argument, describe
from .._inputs import capturing, check_block
from ..decode import block_sparse_decode
from ..functional import block_sparse_attention
from ..patterns import SparsityConfig
from ..selection import topk_blocks


@dataclass(frozen=True)
class TopK:
    """A layout chosen per call by :func:`~blocksparse_attn.topk_blocks` (the other
    arguments as there; the block comes from ``register``'s ``block``)."""

    topk: int
    keep_first: bool = True
    keep_diagonal: bool = True
    share_group: bool = False


def _padded(t: torch.Tensor, front: int, total: int) -> torch.Tensor:
    """``t [B, H, L, D]`` with ``front`` zero rows before and zeros after, to ``total``."""
    return F.pad(t, (0, 0, front, total - front - t.shape[2]))


class _BlockSparseAttention:
    """The attention function ``transformers`` calls (see :func:`register`)."""

    def __init__(self, layout_source, block: int, backend: str):
        self.source, self.block, self.backend = layout_source, block, backend
        self._layouts: dict[tuple, torch.Tensor] = {}  # (key blocks, device) -> layout
        self._mask_seen: torch.Tensor | None = None  # the last padding mask looked at
        self._mask_read: tuple[bool, torch.Tensor | None] = (False, None)  # what it says

    def _left_padding(self, mask: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
        """Whether the padding mask ``[B, L_k]`` is left padding or none (every row's
        padding before its tokens, its newest key a token), and then each row's first
        token (int32 ``[B]``), None without padding. One read-back per mask:
        ``transformers`` hands every layer of a forward the same mask tensor."""
        if mask is not self._mask_seen:
            L = mask.shape[1]
            first = (L - mask.sum(1)).to(torch.int32)
            left = torch.arange(L, device=mask.device)[None, :] >= first[:, None]
            facts = torch.stack([(left == mask).all(), mask[:, -1].all(), (first > 0).any()])
            is_left, newest_real, padded = facts.tolist()
            ok = bool(is_left and newest_real)
            self._mask_seen, self._mask_read = mask, (ok, first if ok and padded else None)
        return self._mask_read

    def _decodes(self, query, attention_mask, causal: bool) -> bool:
        """Whether this call is a decoding step for :func:`block_sparse_decode`: one new
        query per sequence, causal, a fixed pattern, no gradient, no padding or left
        padding."""
        return (
            query.shape[2] == 1
            and causal
            and not isinstance(self.source, TopK)
            and not (torch.is_grad_enabled() and query.requires_grad)
            and not capturing(query.device)
            and (attention_mask is None or self._left_padding(attention_mask)[0])
        )

    def _decode(self, query, key, value, scaling, attention_mask):
        """One new query per sequence against the cache's keys ``[B, H_kv, L_k, D]``, read
        in place (the newest key is the query's own; a left-padded row's padding hidden);
        returns ``[B, 1, H, D]``."""
        B, Lk = query.shape[0], key.shape[2]
        if isinstance(self.source, SparsityConfig):
            layout = self.source
        else:  # the callable's layout, made once per length

            def layout(n_tokens, device):
                return self._layout(n_tokens, device)

        lengths = torch.full((B,), Lk, dtype=torch.int32, device=query.device)
        first = None if attention_mask is None else self._left_padding(attention_mask)[1]
        return block_sparse_decode(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            lengths,
            layout,
            block=self.block,
            scale=scaling,
            first_key=first,
            backend=self.backend,
        )

    def _layout(self, n_keys: int, device) -> torch.Tensor:
        """The square layout ``[H_l, nb, nb]`` for ``n_keys`` padded keys on ``device``,
        made once per length (so its compiled index is cached too)."""
        key = (n_keys, str(device))
        if key not in self._layouts:
            if isinstance(self.source, SparsityConfig):
                layout = self.source.make_layout(n_keys)
            else:
                layout = self.source(n_keys, device)
            self._layouts[key] = layout.to(device) if isinstance(layout, torch.Tensor) else layout
        return self._layouts[key]

    def __call__(
        self,
        module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ):
        where = "blocksparse attention (transformers)"
        if dropout and module.training:
            raise NotImplementedError(
                f"{where}: attention dropout ({dropout}) is not supported. Fix: set the "
                "model config's attention_dropout to 0."
            )
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError(
                f"{where}: this layer uses a sliding window ({kwargs['sliding_window']}); "
                "express it in the layout instead (LocalSlidingWindowSparsityConfig) and "
                "turn the model's sliding window off."
            )
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
        block = self.block
        B, H, Lq, D = query.shape
        Lk = key.shape[2]
        if not causal and Lq != Lk:
            raise NotImplementedError(f"{where}: non-causal attention with L_q != L_k")
        if self._decodes(query, attention_mask, causal):
            return self._decode(query, key, value, scaling, attention_mask), None
        # every token at its absolute position's block: queries are the last L_q positions
        front = (Lk - Lq) % block
        Lq_pad = -(-(front + Lq) // block) * block
        Lk_pad = -(-Lk // block) * block
        keep = torch.ones(B, Lk, dtype=torch.bool, device=query.device)
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
        keep = F.pad(keep, (0, Lk_pad - Lk), value=False)
        q = _padded(query, front, Lq_pad)
        k, v = (_padded(t, 0, Lk_pad) for t in (key, value))
        first_row = Lk_pad // block - Lq_pad // block  # the query blocks' place in the layout
        if isinstance(self.source, TopK):
            rule = self.source
            layout = topk_blocks(
                q,
                k,
                block=block,
                topk=rule.topk,
                causal=causal,
                keep_first=rule.keep_first,
                keep_diagonal=rule.keep_diagonal,
                share_group=rule.share_group,
            )
        else:
            layout = self._layout(Lk_pad, query.device)[:, first_row:]
        out = block_sparse_attention(
            q,
            k,
            v,
            layout,
            block=block,
            scale=scaling,
            causal=causal,
            key_padding_mask=keep,
            key_padding_mask_mode="mul",
            backend=self.backend,
        )
        out = out[:, :, front : front + Lq]
        return out.transpose(1, 2).contiguous(), None


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """The mask ``transformers`` hands the attention function: the padding of the keys
    ``[B, kv_length]`` (True = a token), or None without padding. Causality is the attention
    function's own (bottom-right aligned). Mask patterns it cannot express (packed
    sequences, sliding windows, custom mask functions) are refused, not dropped."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function not in (None, causal_mask_function, bidirectional_mask_function):
        name = getattr(mask_function, "__name__", repr(mask_function))
        raise NotImplementedError(
            f"blocksparse attention (transformers): the model asks for the mask {name} "
            "(packed sequences, a sliding window or a custom mask function), which this "
            "attention does not apply. Fix: pass one sequence per row with an attention "
            "mask, and express local attention in the layout."
        )
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def register(
    layout_source,
    *,
    name: str = "blocksparse",
    block: int | None = None,
    backend: str = "auto",
) -> str:
    """Register block-sparse attention with ``transformers`` under ``name`` (an attention
    function and its mask function); returns ``name`` for ``attn_implementation=``.

    Args:
        layout_source: a :class:`~blocksparse_attn.SparsityConfig` (its ``make_layout`` for
            the padded key length; heads 1, ``H_kv`` or ``H``), a callable ``(seq_len,
            device) -> layout [H_l, nb, nb]`` for a square pattern over ``seq_len`` tokens
            (the rows of the current queries are used), or :class:`TopK` (blocks chosen
            per call from the queries and keys).
        name: the ``attn_implementation`` name.
        block: the layout's block size (taken from a ``SparsityConfig``; required
            otherwise).
        backend: as in :func:`~blocksparse_attn.block_sparse_attention`.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            "blocksparse_attn.integrations.transformers needs transformers >= 5. Fix: "
            "pip install 'transformers>=5'."
        ) from e
    where = "blocksparse_attn.integrations.transformers.register"
    if isinstance(layout_source, SparsityConfig):
        block = layout_source.block if block is None else block
        if block != layout_source.block:
            raise bad_argument(where, "block", f"the config's block ({layout_source.block})", block)
    elif not (isinstance(layout_source, TopK) or callable(layout_source)):
        raise bad_argument(
            where,
            "layout_source",
            "a SparsityConfig, a callable (seq_len, device) -> layout, or TopK",
            describe(layout_source),
        )
    check_block(where, block)
    if not isinstance(name, str) or not name:
        raise bad_argument(where, "name", "a non-empty string", repr(name))
    AttentionInterface.register(name, _BlockSparseAttention(layout_source, block, backend))
    AttentionMaskInterface.register(name, _padding_mask)
    return name
