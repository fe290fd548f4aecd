"""Block lists as a layout (index layer): ``KVBlocks``, the format of FlexAttention's
``BlockMask`` and FlashAttention-4's block sparsity.

For each query block-row, the key blocks it attends: ``num_blocks [B|1, H|1, nb_q]`` int32
and ``indices [B|1, H|1, nb_q, max_blocks]`` int32. Entries past a row's ``num_blocks`` are
ignored, the order does not matter, and a key block listed twice is attended once (lists
are merged, not refused: refusing would need to read the lists on the host). A dense
layout and its block lists are the same layout: :meth:`KVBlocks.from_layout` and
:meth:`KVBlocks.to_layout` convert without a host synchronisation.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ._errors import bad_argument, describe


@dataclass(frozen=True)
class KVBlocks:
    """Per query block-row, the key blocks it attends (see the module docstring).

    Args:
        num_blocks: int32 ``[B|1, H|1, nb_q]``, how many leading entries of each row's
            list are used.
        indices: int32 ``[B|1, H|1, nb_q, max_blocks]``, key-block indices.

        trusted: the producer guarantees the values (as :func:`~blocksparse_attn.topk_blocks`
            does), so the attention functions skip :meth:`check` and its host
            synchronisation. An out-of-range index in trusted lists is read out of bounds.

    Shapes, dtypes and devices are checked here; the values (each used index in
    ``[0, nb_k)``, ``0 <= num_blocks <= max_blocks``) by :meth:`check` (a host
    synchronisation), which :func:`~blocksparse_attn.block_sparse_attention` calls unless the
    lists are ``trusted`` or being captured in a CUDA graph.
    """

    num_blocks: torch.Tensor
    indices: torch.Tensor
    trusted: bool = False

    def __post_init__(self):
        where = "KVBlocks"
        n, idx = self.num_blocks, self.indices
        for name, t, rank in (("num_blocks", n, 3), ("indices", idx, 4)):
            if not isinstance(t, torch.Tensor) or t.dim() != rank:
                shape = "[B|1, H|1, nb_q]" if rank == 3 else "[B|1, H|1, nb_q, max_blocks]"
                raise bad_argument(where, name, f"a {rank}-D tensor {shape}", describe(t))
            if t.dtype != torch.int32:
                raise bad_argument(
                    where, name, "an int32 tensor", describe(t), f"pass {name}.to(torch.int32)."
                )
        if tuple(idx.shape[:3]) != tuple(n.shape):
            raise bad_argument(
                where,
                "indices",
                f"of shape [*num_blocks.shape, max_blocks] = [{', '.join(map(str, n.shape))}, .]",
                describe(idx),
            )
        if idx.device != n.device:
            raise bad_argument(
                where, "indices", f"on num_blocks' device ({n.device})", describe(idx)
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B|1, H|1, nb_q)``."""
        return tuple(self.num_blocks.shape)

    @property
    def device(self) -> torch.device:
        return self.num_blocks.device

    def to(self, device) -> KVBlocks:
        return KVBlocks(self.num_blocks.to(device), self.indices.to(device), self.trusted)

    def _used(self) -> torch.Tensor:
        """``[B|1, H|1, nb_q, max_blocks]`` bool: the entries before each row's count."""
        width = self.indices.shape[-1]
        return torch.arange(width, device=self.device) < self.num_blocks[..., None].long()

    def check(self, nb_k: int, where: str = "KVBlocks") -> None:
        """Raise if a count is outside ``[0, max_blocks]`` or a used index outside
        ``[0, nb_k)``. Reads the lists on the host."""
        width = self.indices.shape[-1]
        bad_count = (self.num_blocks < 0) | (self.num_blocks > width)
        if bool(bad_count.any()):
            raise bad_argument(
                where,
                "num_blocks",
                f"in [0, max_blocks = {width}]",
                f"values {self.num_blocks[bad_count].unique()[:8].tolist()}",
            )
        used = self._used()
        bad = used & ((self.indices < 0) | (self.indices >= nb_k))
        if bool(bad.any()):
            raise bad_argument(
                where,
                "indices",
                f"key-block indices in [0, nb_k = {nb_k}) where used",
                f"values {self.indices[bad].unique()[:8].tolist()}",
                "entries past a row's num_blocks are ignored; the used ones must name key blocks.",
            )

    def to_layout(self, nb_k: int) -> torch.Tensor:
        """The dense bool layout ``[B|1, H|1, nb_q, nb_k]`` (duplicates merged; entries past
        ``num_blocks`` ignored; used entries must be in range, see :meth:`check`). No host
        synchronisation."""
        used = self._used()
        idx = torch.where(used, self.indices.long(), nb_k)  # unused entries to a spare column
        grid = torch.zeros((*self.shape, nb_k + 1), dtype=torch.bool, device=self.device)
        grid.scatter_(-1, idx.clamp(0, nb_k), True)
        return grid[..., :nb_k]

    def to_block_mask(self, block: int, *, k_len: int, q_len: int | None = None, causal=False):
        """A FlexAttention ``BlockMask`` (its 128-token tiles) that keeps exactly these
        lists' blocks of ``block`` tokens over ``k_len`` keys (``q_len`` defaults to
        ``nb_q * block``), with ``causal`` as the attention functions mean it (bottom-right
        aligned). Reads the lists on the host (see
        :func:`~blocksparse_attn.flex_block_mask.layout_to_block_mask`)."""
        from .flex_block_mask import layout_to_block_mask

        nb_k = -(-k_len // block)
        return layout_to_block_mask(
            self.to_layout(nb_k), block, q_len=q_len, k_len=k_len, causal=causal
        )

    @classmethod
    def from_layout(cls, layout: torch.Tensor) -> KVBlocks:
        """The block lists of a dense layout (``[nb_q, nb_k]``, ``[H, nb_q, nb_k]`` or
        ``[B, H, nb_q, nb_k]``, non-zero = attend), each row's key blocks in ascending order,
        ``max_blocks = nb_k``. No host synchronisation."""
        from .patterns._checks import layout_tensor

        if isinstance(layout, torch.Tensor) and layout.dim() == 4:
            grid = layout_tensor("KVBlocks.from_layout", layout.flatten(0, 1)).view(layout.shape)
        else:
            grid = layout_tensor("KVBlocks.from_layout", layout).unsqueeze(0)
        keep = grid != 0
        nb_k = keep.shape[-1]
        cols = torch.arange(nb_k, device=keep.device)
        # kept columns first, in order: sort by (not kept, column)
        order = torch.argsort((~keep).long() * nb_k + cols, dim=-1)
        return cls(keep.sum(-1).to(torch.int32), order.to(torch.int32))

    @classmethod
    def from_entries(cls, keep: torch.Tensor, indices: torch.Tensor, trusted=False) -> KVBlocks:
        """Lists of the entries of ``indices [..., width]`` where ``keep`` (same shape) is
        true, each row's kept entries first in their order. No host synchronisation."""
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
        return cls(keep.sum(-1).to(torch.int32), indices.gather(-1, order).to(torch.int32), trusted)

    @classmethod
    def from_block_mask(cls, block_mask) -> KVBlocks:
        """The key blocks (at the mask's ``BLOCK_SIZE``) of a FlexAttention ``BlockMask``:
        its partial and full lists together. Its ``mask_mod`` (token-level masking inside
        partial blocks) is not carried over."""
        n, idx = block_mask.kv_num_blocks, block_mask.kv_indices
        if block_mask.full_kv_num_blocks is not None:
            full_n, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
            width = idx.shape[-1]
            both = torch.cat([idx, full_idx], -1)
            # each row's used entries: partial ones, then full ones
            pos = torch.arange(both.shape[-1], device=both.device)
            used = torch.where(pos < width, pos < n[..., None], pos - width < full_n[..., None])
            return cls.from_entries(used, both)
        return cls(n.to(torch.int32), idx.to(torch.int32))


_CONFIG_LISTS: dict[tuple, tuple[weakref.ref, KVBlocks]] = {}


def config_lists(config, n_tokens: int, device) -> KVBlocks:
    """The block lists ``[1, H_l, nb]`` of ``config.make_layout(n_tokens)`` on ``device``,
    made once per config, length and device (while the config lives): decoding and packed
    batches ask for the same pattern on every call."""
    key = (id(config), n_tokens, str(device))
    held = _CONFIG_LISTS.get(key)
    if held is not None and held[0]() is config:
        return held[1]
    grid = config.make_layout(n_tokens).to(device) != 0
    lists = KVBlocks.from_layout(grid)
    lists = KVBlocks(lists.num_blocks, lists.indices, trusted=True)
    _CONFIG_LISTS[key] = (weakref.ref(config, lambda _, k=key: _CONFIG_LISTS.pop(k, None)), lists)
    return lists


def source_grid(where: str, source, n_tokens: int, block: int, device) -> torch.Tensor:
    """A callable's layout ``(seq_len, device) -> [H_l, nb, nb]`` over ``n_tokens`` tokens
    (a multiple of ``block``), checked: ``[H_l, nb, nb]``, where it was made."""
    from .patterns._checks import layout_tensor

    nb = n_tokens // block
    grid = layout_tensor(where, source(n_tokens, device))
    if grid.dim() == 2:
        grid = grid[None]
    if tuple(grid.shape[1:]) != (nb, nb):
        raise bad_argument(
            where,
            "layout",
            f"a callable giving a [H_l, {nb}, {nb}] layout for {n_tokens} tokens",
            f"a layout of shape {tuple(grid.shape)}",
        )
    return grid


def source_lists(where: str, source, n_tokens: int, block: int, device) -> KVBlocks:
    """The block lists ``[1, H_l, nb]`` of a pattern over ``n_tokens`` tokens (rows =
    absolute query blocks): a ``SparsityConfig`` (:func:`config_lists`, cached) or a
    callable (:func:`source_grid`, asked on every call)."""
    from .patterns import SparsityConfig

    if isinstance(source, SparsityConfig):
        return config_lists(source, n_tokens, device)
    return KVBlocks.from_layout(source_grid(where, source, n_tokens, block, device).to(device) != 0)
