"""DeepSpeed's compressed block-sparse format ``[Z, nnz, block, block]``: the layout's kept
blocks of every head, in ``layout.nonzero()`` order (head, block-row, block-column)."""

from __future__ import annotations

import torch

from ._errors import bad_argument, describe


def _blocks_view(dense: torch.Tensor, block: int) -> torch.Tensor:
    Z, H, M, N = dense.shape
    return dense.view(Z, H, M // block, block, N // block, block).transpose(3, 4)


def to_sparse(dense: torch.Tensor, layout: torch.Tensor, block: int) -> torch.Tensor:
    """``[Z, H, M, N]`` dense -> ``[Z, nnz, block, block]`` (the layout's blocks)."""
    layout = layout if layout.dim() == 3 else layout.unsqueeze(0)
    H, R, C = layout.shape
    if dense.dim() != 4 or tuple(dense.shape[1:]) != (H, R * block, C * block):
        raise bad_argument(
            "to_sparse",
            "dense",
            f"of shape [Z, {H}, {R * block}, {C * block}] (heads and block counts of the layout)",
            describe(dense),
        )
    h, i, j = layout.to(dense.device).nonzero(as_tuple=True)
    return _blocks_view(dense, block)[:, h, i, j].contiguous()


def to_dense(
    sparse: torch.Tensor, layout: torch.Tensor, block: int, fill: float = 0.0
) -> torch.Tensor:
    """``[Z, nnz, block, block]`` -> ``[Z, H, M, N]``; positions outside the layout get
    ``fill`` (0 for products, ``-inf`` for scores)."""
    layout = layout if layout.dim() == 3 else layout.unsqueeze(0)
    H, R, C = layout.shape
    nnz = int((layout != 0).sum())
    if sparse.dim() != 4 or tuple(sparse.shape[1:]) != (nnz, block, block):
        raise bad_argument(
            "to_dense",
            "sparse",
            f"of shape [Z, {nnz}, {block}, {block}] (the layout's kept blocks)",
            describe(sparse),
        )
    out = sparse.new_full((sparse.shape[0], H, R * block, C * block), fill)
    h, i, j = layout.to(sparse.device).nonzero(as_tuple=True)
    _blocks_view(out, block)[:, h, i, j] = sparse
    return out
