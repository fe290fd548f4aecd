"""Gradients that are themselves not differentiable, said loudly.

The kernels' backward passes compute first derivatives only. When a caller asks for a graph
of the gradient (``torch.autograd.grad(..., create_graph=True)``, a gradient penalty), the
gradients must not come back looking differentiable while silently dropping the second-order
term: :func:`first_order_only` links them to the inputs through a node whose backward raises.
"""

from __future__ import annotations

import torch


class _FirstOrderOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, where: str, count: int, *tensors):
        ctx.where = where
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(
            f"{ctx.where}: the gradient of this gradient (double backward, e.g. a gradient "
            "penalty through create_graph=True) is not implemented: the kernels compute first "
            "derivatives only. Fix: use backend='reference' for the part of the model whose "
            "second derivative you need."
        )


def first_order_only(where: str, grads: tuple, links: tuple) -> tuple:
    """``grads`` unchanged, unless a graph of them is being recorded (grad mode on inside a
    backward: ``create_graph=True``) and one of ``links`` (the saved inputs and incoming
    gradients) requires grad: then the tensors among them come back attached to a node
    whose backward raises ``NotImplementedError`` naming ``where``."""
    if not torch.is_grad_enabled():
        return grads
    links = tuple(t for t in links if isinstance(t, torch.Tensor) and t.requires_grad)
    present = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not links or not present:
        return grads
    wrapped = _FirstOrderOnly.apply(where, len(present), *(grads[i] for i in present), *links)
    out = list(grads)
    for i, g in zip(present, wrapped):
        out[i] = g
    return tuple(out)
