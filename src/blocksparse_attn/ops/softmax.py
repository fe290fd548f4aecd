"""``Softmax``: DeepSpeed's block-sparse softmax with autograd (gradients for ``x`` and
``rpe``)."""

from __future__ import annotations

import torch

from .._errors import bad_argument, describe
from .._inputs import check_attn_mask, check_key_padding_mask, check_mode, check_rpe
from ..compressed import to_dense
from ..kernels.availability import KERNEL_DTYPES
from ._first_order import first_order_only
from .matmul import MatMul, _Operand, check_layout


class _SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, rpe, kpm, am, operand, scale, kpm_mode, am_mode, causal, out_dtype, inplace
    ):
        from ..kernels.blocksparse_softmax import softmax_forward

        index, _ = operand.on(x.device)
        inplace = inplace and out_dtype in (None, x.dtype)
        args = (index, operand.block, scale, rpe, kpm, am, kpm_mode, am_mode, causal)
        if inplace and x.is_contiguous():
            y = softmax_forward(x, *args, out=x)
        elif inplace:
            y = x.copy_(softmax_forward(x.contiguous(), *args))
        else:
            y = softmax_forward(x.contiguous(), *args, out_dtype=out_dtype)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(y)
        shapes = tuple(None if t is None else t.shape for t in (rpe, kpm, am))
        additive = (True, kpm_mode == "add", am_mode == "add")
        ctx.config = (operand, scale, shapes, additive, x.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..kernels.blocksparse_softmax import softmax_backward

        (y,) = ctx.saved_tensors
        operand, scale, shapes, additive, x_dtype = ctx.config
        index, _ = operand.on(y.device)
        # rpe and additive masks get the score gradient summed to their shapes
        wanted = [
            shape is not None and add and ctx.needs_input_grad[1 + i]
            for i, (shape, add) in enumerate(zip(shapes, additive))
        ]
        dx, ds = softmax_backward(y, dy, index, operand.block, scale, any(wanted), x_dtype)
        biases = [None, None, None]
        if any(wanted):
            full = to_dense(ds, operand.layout, operand.block)  # [Z, H, L_q, L_k], 0 outside
            sums = (
                lambda: full.sum_to_size(shapes[0]),
                lambda: full.sum((1, 2)),
                lambda: full.sum((0, 1)),
            )
            biases = [total() if w else None for w, total in zip(wanted, sums)]
        grads = first_order_only("Softmax", (dx, *biases), (y, dy))
        return (*grads, None, None, None, None, None, None, None)


class Softmax:
    """Block-sparse softmax on the compressed format (DeepSpeed's ``Softmax``).

    ``softmax(x, scale=1.0, rpe=None, key_padding_mask=None, attn_mask=None,
    key_padding_mask_mode='add', attn_mask_mode='add', *, causal=False)`` computes, per row
    of the layout, ``softmax(x * scale + rpe + key_padding_mask + attn_mask)`` over the
    row's kept blocks, in fp32; a row with nothing to attend gives 0. ``x``:
    ``[Z, nnz, block, block]``; ``rpe`` broadcastable to ``[Z, H, L_q, L_k]`` (gets a
    gradient); ``key_padding_mask [Z, L_k]`` (BERT's ``[Z, 1, 1, L_k]`` accepted);
    ``attn_mask [L_q, L_k]``; ``causal`` masks keys after the query (our extension).

    As DeepSpeed's, it writes the result into ``x`` and returns ``x`` (autograd knows: the
    gradient reaches whatever produced ``x``); ``inplace=False`` returns a new tensor and
    leaves ``x`` unchanged, for one more compressed tensor of memory. ``bench`` is accepted
    for DeepSpeed's signature and does nothing (DeepSpeed's never timed anything either);
    time with ``blocksparse-attn bench``.
    """

    def __init__(
        self, layout: torch.Tensor, block: int, bench: bool = False, *, inplace: bool = True
    ):
        self.layout = check_layout("Softmax", layout, block)
        self.block = block
        self.bench = bench
        self.inplace = inplace
        self.spdims = tuple(self.layout.shape)
        self._operand = _Operand(self.layout, block)

    def __call__(
        self,
        x: torch.Tensor,
        scale: float = 1.0,
        rpe: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask_mode: str = "add",
        attn_mask_mode: str = "add",
        *,
        causal: bool = False,
    ) -> torch.Tensor:
        return self.probabilities(
            x,
            scale,
            rpe,
            key_padding_mask,
            attn_mask,
            key_padding_mask_mode,
            attn_mask_mode,
            causal=causal,
        )

    def probabilities(
        self,
        x: torch.Tensor,
        scale: float = 1.0,
        rpe: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask_mode: str = "add",
        attn_mask_mode: str = "add",
        *,
        causal: bool = False,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``self(x, ...)`` with the result stored in ``out_dtype`` (default: ``x``'s dtype,
        in ``x`` itself when in place; the unfused attention reads fp32 scores and writes
        probabilities in the inputs' dtype, a new tensor)."""
        from ..kernels.availability import kernel_unavailable_reasons

        where = "Softmax"
        H, R, C = self.spdims
        bl = self.block
        Lq, Lk = R * bl, C * bl
        nnz = self._operand.nnz
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (nnz, bl, bl):
            raise bad_argument(
                where, "x", f"a compressed tensor [Z, {nnz}, {bl}, {bl}]", describe(x)
            )
        if x.dtype not in KERNEL_DTYPES:
            raise bad_argument(where, "x", "float16, bfloat16 or float32", describe(x))
        reasons = kernel_unavailable_reasons(x.device)
        if reasons:
            raise bad_argument(
                where,
                "x",
                "a tensor the Triton kernels can run on",
                f"a tensor on {x.device}",
                "; ".join(reasons),
            )
        Z = x.shape[0]
        check_mode(where, "key_padding_mask_mode", key_padding_mask_mode)
        check_mode(where, "attn_mask_mode", attn_mask_mode)
        rpe = check_rpe(where, rpe, (Z, H, Lq, Lk), x.device, names="Z, H")
        key_padding_mask = check_key_padding_mask(
            where, key_padding_mask, key_padding_mask_mode, Z, Lk, x.device, batch="Z"
        )
        attn_mask = check_attn_mask(where, attn_mask, attn_mask_mode, Lq, Lk, x.device)
        return _SoftmaxFunction.apply(
            x,
            rpe,
            key_padding_mask,
            attn_mask,
            self._operand,
            float(scale),
            key_padding_mask_mode,
            attn_mask_mode,
            bool(causal),
            out_dtype,
            self.inplace,
        )


def attention_ops(layout: torch.Tensor, block: int) -> tuple[MatMul, Softmax, MatMul]:
    """DeepSpeed's attention as three operators over ``layout``: ``scores = sdd(q, k)``
    (``q @ k^T`` on the layout's blocks), ``probs = softmax(scores, ...)``,
    ``out = dsd(probs, v)``."""
    return (
        MatMul(layout, block, "sdd", trans_b=True),
        Softmax(layout, block),
        MatMul(layout, block, "dsd"),
    )
