"""``SparseSelfAttention``: DeepSpeed's module, on current PyTorch, any dtype, any device."""

from __future__ import annotations

import torch
from torch import nn

from .._errors import bad_argument, describe
from .._inputs import check_deterministic, check_mode
from ..functional import BACKENDS
from ..patterns import SparsityConfig


class SparseSelfAttention(nn.Module):
    """Block-sparse self-attention with DeepSpeed's constructor and forward.

    Args:
        sparsity_config: a :class:`~blocksparse_attn.SparsityConfig` subclass instance; its
            ``num_heads`` must match the inputs' head count.
        key_padding_mask_mode: ``'add'`` (default) or ``'mul'``.
        attn_mask_mode: ``'mul'`` (default) or ``'add'``.
        max_seq_length: length of the master layout, made once here; shorter sequences use
            its top-left crop (as DeepSpeed does), longer ones are an error.
        causal: token-level causal masking inside diagonal blocks. ``None`` (default) means
            ``True`` when the config's ``attention`` is ``'unidirectional'``.
        backend: ``'auto'``, ``'fused'``, ``'unfused'`` or ``'reference'``
            (see :func:`~blocksparse_attn.block_sparse_attention`).
        deterministic: ``False`` asks for the faster Hopper backward whose dQ varies in its
            last bits from run to run (see :func:`~blocksparse_attn.block_sparse_attention`);
            with context parallelism the backward stays deterministic.
        context_parallel_group: a ``torch.distributed`` process group (or
            ``torch.distributed.group.WORLD``) across which each sequence is sharded: the
            inputs, ``key_padding_mask`` and the output are this rank's shard,
            ``rpe`` its query rows (see
            :func:`~blocksparse_attn.distributed.context_parallel_attention`).
        context_parallel_strategy: ``'auto'``, ``'all_to_all'`` or ``'kv_exchange'``.
        context_parallel_order: the shard order, ``'contiguous'`` or ``'balanced'`` (even
            causal work under ``'kv_exchange'``; see :mod:`blocksparse_attn.distributed`).

    The layout is the buffer ``master_layout`` (saved in ``state_dict``, moved by ``.to()``).
    When ``torch.distributed`` is initialised, rank 0's layout is broadcast to every rank
    once, before first use, so random patterns agree. Layout crops are cached per instance
    (DeepSpeed's cache was shared by every instance in the process).

    ``SparseSelfAttention.ops`` is DeepSpeed's class-level dict of operator triples by
    sequence length: :meth:`get_ops` records each triple it builds there, for code that
    reads or clears it, but never looks anything up in it.
    """

    ops: dict = {}

    def __init__(
        self,
        sparsity_config: SparsityConfig | None = None,
        key_padding_mask_mode: str = "add",
        attn_mask_mode: str = "mul",
        max_seq_length: int = 2048,
        *,
        causal: bool | None = None,
        backend: str = "auto",
        deterministic: bool = True,
        context_parallel_group=None,
        context_parallel_strategy: str = "auto",
        context_parallel_order: str = "contiguous",
    ):
        super().__init__()
        where = "SparseSelfAttention"
        if not isinstance(sparsity_config, SparsityConfig):
            raise bad_argument(
                where,
                "sparsity_config",
                "a SparsityConfig subclass instance",
                describe(sparsity_config),
                "pass e.g. FixedSparsityConfig(num_heads=...).",
            )
        check_mode(where, "key_padding_mask_mode", key_padding_mask_mode)
        check_mode(where, "attn_mask_mode", attn_mask_mode)
        if backend not in BACKENDS:
            raise bad_argument(
                where, "backend", "one of " + ", ".join(map(repr, BACKENDS)), repr(backend)
            )
        self.sparsity_config = sparsity_config
        self.key_padding_mask_mode = key_padding_mask_mode
        self.attn_mask_mode = attn_mask_mode
        self.max_seq_length = max_seq_length
        self.backend = backend
        check_deterministic(where, deterministic)
        self.deterministic = deterministic
        if causal is None:
            causal = getattr(sparsity_config, "attention", None) == "unidirectional"
        self.causal = bool(causal)
        self.register_buffer("master_layout", sparsity_config.make_layout(max_seq_length))
        self.context_parallel_group = context_parallel_group
        self.context_parallel_strategy = context_parallel_strategy
        self.context_parallel_order = context_parallel_order
        self._need_layout_synchronization = True
        self._layouts: dict[int, torch.Tensor] = {}
        self._ops: dict[tuple, tuple] = {}

    @property
    def block(self) -> int:
        return self.sparsity_config.block

    def _synchronize_layout(self) -> None:
        """Broadcast rank 0's master layout to every rank (once per instance)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            layout = self.master_layout
            if dist.get_backend() == "nccl" and layout.device.type != "cuda":
                on_gpu = layout.to(f"cuda:{torch.cuda.current_device()}")
                dist.broadcast(on_gpu, src=0)
                layout.copy_(on_gpu.cpu())
            else:
                dist.broadcast(layout, src=0)
        self._need_layout_synchronization = False

    def get_layout(self, L: int) -> torch.Tensor:
        """The ``[num_heads, L // block, L // block]`` crop of the master layout."""
        if self._need_layout_synchronization:
            self._synchronize_layout()
        if L % self.block != 0:
            raise bad_argument(
                "SparseSelfAttention",
                "sequence length",
                f"a multiple of block={self.block}",
                L,
                "pad with SparseAttentionUtils.pad_to_block_size and mask the "
                "padding with key_padding_mask.",
            )
        if L > self.max_seq_length:
            raise bad_argument(
                "SparseSelfAttention",
                "sequence length",
                f"<= max_seq_length={self.max_seq_length}",
                L,
                "build the module with a larger max_seq_length.",
            )
        cached = self._layouts.get(L)
        if cached is None or cached._base is not self.master_layout:
            nb = L // self.block
            cached = self.master_layout[:, :nb, :nb]
            self._layouts[L] = cached
        return cached

    def get_ops(self, H: int, L: int):
        """DeepSpeed's operator triple for length ``L``: ``(sdd_nt, dsd_nn, softmax)`` =
        ``MatMul(layout, block, 'sdd', trans_b=True)``, ``MatMul(layout, block, 'dsd')`` and
        ``Softmax(layout, block)`` on this instance's layout crop (cached per instance)."""
        from ..ops.softmax import attention_ops

        if H != self.sparsity_config.num_heads:
            raise bad_argument(
                "SparseSelfAttention.get_ops",
                "H",
                f"sparsity_config.num_heads = {self.sparsity_config.num_heads}",
                H,
            )
        layout = self.get_layout(L)
        key = (L, str(layout.device), layout._version)
        if key not in self._ops:
            sdd, softmax, dsd = attention_ops(layout, self.block)
            self._ops[key] = (sdd, dsd, softmax)
            SparseSelfAttention.ops[L] = self._ops[key]
        return self._ops[key]

    def transpose_key_for_scores(self, x: torch.Tensor, L: int) -> torch.Tensor:
        """DeepSpeed's helper: ``x`` ``[B, H, ., .]`` as ``[B, H, L, D]``, transposing its last
        two dims when its third is not ``L`` (a key passed pre-transposed)."""
        return x.transpose(-1, -2) if x.shape[2] != L else x

    def transpose_mask_for_sparse(
        self, qtype: torch.dtype, x: torch.Tensor, is_key_padding_mask: bool = False
    ) -> torch.Tensor:
        """DeepSpeed's helper: the mask in ``qtype`` with its size-1 dims dropped; a key
        padding mask keeps its first (batch) dim, so BERT's ``[B, 1, 1, L]`` gives
        ``[B, L]`` even for ``B = 1``."""
        x = x.to(qtype)
        if not is_key_padding_mask:
            return x.squeeze()
        for d in range(x.dim() - 1, 0, -1):
            x = x.squeeze(d)
        return x

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rpe: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query``, ``key``, ``value``: ``[B, H, L, D]`` (a key pre-transposed to
        ``[B, H, D, L]`` is accepted, as in DeepSpeed). Masks and ``rpe`` as in
        :func:`~blocksparse_attn.block_sparse_attention`. Returns ``[B, H, L, D]``."""
        from ..functional import block_sparse_attention

        where = "SparseSelfAttention"
        if not isinstance(query, torch.Tensor) or query.dim() != 4:
            raise bad_argument(where, "query", "a 4-D tensor [B, H, L, D]", describe(query))
        L = query.shape[2]
        if isinstance(key, torch.Tensor) and key.dim() == 4 and key.shape[2] != L:
            key = key.transpose(-1, -2)  # pre-transposed key [B, H, D, L]
        if not (
            isinstance(key, torch.Tensor)
            and isinstance(value, torch.Tensor)
            and query.shape == key.shape == value.shape
        ):
            raise bad_argument(
                where,
                "query, key, value",
                "of one shape [B, H, L, D] (self-attention)",
                f"{describe(query)}; {describe(key)}; {describe(value)}",
                "for cross-attention call blocksparse_attn.block_sparse_attention "
                "with a rectangular layout.",
                error=NotImplementedError,
            )
        H = query.shape[1]
        if H != self.sparsity_config.num_heads:
            raise bad_argument(
                where,
                "query.shape[1] (heads)",
                f"sparsity_config.num_heads = {self.sparsity_config.num_heads}",
                H,
                "build the config with the number of heads of this layer "
                "(heads per model-parallel partition).",
            )
        if self.context_parallel_group is not None:
            return self._context_parallel(query, key, value, rpe, key_padding_mask, attn_mask)
        layout = self.get_layout(L)
        return block_sparse_attention(
            query,
            key,
            value,
            layout,
            block=self.block,
            causal=self.causal,
            rpe=rpe,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            key_padding_mask_mode=self.key_padding_mask_mode,
            attn_mask_mode=self.attn_mask_mode,
            backend=self.backend,
            deterministic=self.deterministic,
        )

    def _context_parallel(self, query, key, value, rpe, key_padding_mask, attn_mask):
        """Forward on this rank's shard of a sequence split across
        ``context_parallel_group``."""
        import torch.distributed as dist

        from ..distributed import context_parallel_attention

        if attn_mask is not None:
            raise NotImplementedError(
                "SparseSelfAttention: attn_mask with context parallelism is not supported. "
                "Fix: express it in the layout, or use key_padding_mask and rpe."
            )
        if key_padding_mask is not None and key_padding_mask.dim() == 4:  # BERT's [B,1,1,S]
            key_padding_mask = key_padding_mask.reshape(key_padding_mask.shape[0], -1)
        P = dist.get_world_size(self.context_parallel_group)
        return context_parallel_attention(
            query,
            key,
            value,
            self.get_layout(query.shape[2] * P),
            block=self.block,
            group=self.context_parallel_group,
            strategy=self.context_parallel_strategy,
            order=self.context_parallel_order,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            key_padding_mask_mode=self.key_padding_mask_mode,
            rpe=rpe,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.sparsity_config!r}, max_seq_length={self.max_seq_length}, "
            f"causal={self.causal}, backend={self.backend!r}"
            + ("" if self.deterministic else ", deterministic=False")
        )
