"""Autograd wiring of :func:`~blocksparse_attn.kernels.gather_rows.gather_rows` (the
packing of variable-length batches): rows moved by an index one way, their gradients moved
back by the inverse index. The Triton kernel runs where the kernels can; elsewhere the
same copy is made with PyTorch indexing."""

from __future__ import annotations

import torch

from ..kernels.availability import kernel_unavailable_reasons


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[n, H, D]`` view of a row-major ``[n, H, D]`` or a head-major ``[1, H, n, D]``
    tensor, unit last stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t[0].transpose(0, 1) if t.dim() == 4 else t


def _gather(src: torch.Tensor, idx: torch.Tensor, n: int, head_major: bool) -> torch.Tensor:
    src3 = _rows(src)
    _, H, D = src3.shape
    if head_major:
        dst = src3.new_empty(1, H, n, D)
    else:
        dst = src3.new_empty(n, H, D)
    dst3 = _rows(dst)
    if not kernel_unavailable_reasons(src.device):
        from ..kernels.gather_rows import gather_rows

        gather_rows(src3, idx, dst3)
    else:
        found = src3[idx.clamp(min=0).long()]
        dst3.copy_(torch.where((idx >= 0)[:, None, None], found, 0))
    return dst


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, idx, inverse, n, head_major):
        ctx.save_for_backward(inverse)
        ctx.source = (src.shape[0] if src.dim() == 3 else src.shape[2], src.dim() == 4)
        return _gather(src, idx, n, head_major)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        n, head_major = ctx.source
        return _gather(grad, inverse, n, head_major), None, None, None, None


def gather_rows(
    src: torch.Tensor, idx: torch.Tensor, inverse: torch.Tensor, n: int, *, head_major: bool
) -> torch.Tensor:
    """Rows ``src[idx[r]]`` for ``r < n`` (zeros where ``idx[r] = -1``), differentiable.

    ``src``: row-major ``[N, H, D]`` or head-major ``[1, H, N, D]``; the result is
    head-major ``[1, H, n, D]`` with ``head_major``, else row-major ``[n, H, D]``.
    ``idx`` names each source row at most once; ``inverse`` (int32 ``[N]``) is its
    inverse: the result row each source row went to, ``-1`` where it went nowhere (its
    gradient is zero). Gradients flow back along it, with no sums."""
    return _GatherRows.apply(src, idx, inverse, n, head_major)
