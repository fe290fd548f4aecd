"""``MatMul``: DeepSpeed's block-sparse matmul (``sdd``, ``dsd``, ``dds``) with autograd."""

from __future__ import annotations

import torch

from .._errors import bad_argument, describe
from ..index import as_bool_layout, build_index
from ..kernels.availability import KERNEL_DTYPES, UNFUSED_BLOCKS
from ._first_order import first_order_only

MODES = ("sdd", "dsd", "dds")


def check_layout(where: str, layout, block) -> torch.Tensor:
    if block not in UNFUSED_BLOCKS:
        raise bad_argument(
            where,
            "block",
            "one of 16, 32, 64, 128",
            repr(block),
            "the kernels' tensor-core tiles need at least 16.",
        )
    return as_bool_layout(layout, where).long()


class _Operand:
    """A layout with its block lists, built once per device."""

    def __init__(self, layout: torch.Tensor, block: int):
        self.layout, self.block = layout, block
        self.nnz = int((layout != 0).sum())
        self._per_device: dict[str, tuple] = {}

    def on(self, device: torch.device):
        key = str(device)
        if key not in self._per_device:
            lay = self.layout.to(device)
            self._per_device[key] = (build_index(lay, self.block), lay.nonzero().to(torch.int32))
        return self._per_device[key]


def _run(mode: str, a, b, trans_a: bool, trans_b: bool, operand: _Operand, out_dtype=None):
    from ..kernels import blocksparse_matmul as k

    index, blocks = operand.on(a.device)
    if mode == "sdd":
        return k.sdd(a, b, trans_a, trans_b, blocks, operand.block, out_dtype)
    if mode == "dsd":
        return k.dsd(a, b, trans_a, trans_b, index, operand.block)
    return k.dds(a, b, trans_a, trans_b, index, operand.block)


class _MatMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, mode, trans_a, trans_b, operand, out_dtype):
        ctx.save_for_backward(a, b)
        ctx.config = (mode, trans_a, trans_b, operand)
        return _run(mode, a, b, trans_a, trans_b, operand, out_dtype)

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        mode, ta, tb, op = ctx.config
        dc = dc.to(a.dtype).contiguous()  # an sdd may have stored fp32 products
        da = db = None
        # each gradient is a product in another mode over the same stored layout
        if mode == "sdd":
            if ctx.needs_input_grad[0]:
                da = (
                    _run("dds", b, dc, tb, True, op)
                    if ta
                    else _run("dsd", dc, b, False, not tb, op)
                )
            if ctx.needs_input_grad[1]:
                db = (
                    _run("dsd", dc, a, True, ta, op)
                    if tb
                    else _run("dds", a, dc, not ta, False, op)
                )
        elif mode == "dsd":
            if ctx.needs_input_grad[0]:
                da = (
                    _run("sdd", b, dc, tb, True, op)
                    if ta
                    else _run("sdd", dc, b, False, not tb, op)
                )
            if ctx.needs_input_grad[1]:
                db = (
                    _run("dds", dc, a, True, ta, op)
                    if tb
                    else _run("dsd", a, dc, not ta, False, op)
                )
        else:
            if ctx.needs_input_grad[0]:
                da = (
                    _run("dsd", b, dc, tb, True, op)
                    if ta
                    else _run("dds", dc, b, False, not tb, op)
                )
            if ctx.needs_input_grad[1]:
                db = (
                    _run("sdd", dc, a, True, ta, op)
                    if tb
                    else _run("sdd", a, dc, not ta, False, op)
                )
        da, db = first_order_only(f"MatMul({mode!r})", (da, db), (a, b, dc))
        return da, db, None, None, None, None, None


class MatMul:
    """Block-sparse matrix product (DeepSpeed's ``MatMul``).

    Args:
        layout: ``[H, rows, cols]`` (or ``[rows, cols]``) of the sparse operand *as stored*
            (for ``sdd``, of the output).
        block: 16, 32, 64 or 128.
        mode: ``'sdd'`` (sparse = dense x dense), ``'dsd'`` (dense = sparse x dense) or
            ``'dds'`` (dense = dense x sparse).
        trans_a, trans_b: multiply by the transpose of the stored operand.
        bench: accepted for DeepSpeed's signature; does nothing (DeepSpeed's never timed
            anything either): time with ``blocksparse-attn bench``.

    ``matmul(a, b)`` takes dense ``[Z, H, rows, cols]`` tensors (fewer leading dims are
    accepted and restored on the output) and compressed ``[Z, nnz, block, block]`` tensors.
    fp16, bf16 and fp32 (exact fp32 products unless TF32 is allowed through
    ``torch.backends.cuda.matmul.allow_tf32``); CUDA tensors, or CPU tensors under
    Triton's interpreter. Differentiable in both operands; deterministic.
    """

    def __init__(
        self,
        layout: torch.Tensor,
        block: int,
        mode: str,
        trans_a: bool = False,
        trans_b: bool = False,
        bench: bool = False,
    ):
        if mode not in MODES:
            raise bad_argument(
                "MatMul", "mode", "'sdd', 'dsd' or 'dds'", repr(mode), error=NotImplementedError
            )
        self.layout = check_layout("MatMul", layout, block)
        self.block, self.mode, self.trans_a, self.trans_b = block, mode, trans_a, trans_b
        self.bench = bench
        self.spdims = tuple(self.layout.shape)
        self._operand = _Operand(self.layout, block)

    def _check(self, a, b):
        from ..kernels.availability import kernel_unavailable_reasons

        where = f"MatMul({self.mode!r})"
        for name, t in (("a", a), ("b", b)):
            if not isinstance(t, torch.Tensor) or t.dim() > 4 or t.dim() < 2:
                raise bad_argument(where, name, "a tensor of 2 to 4 dims", describe(t))
            if t.dtype not in KERNEL_DTYPES:
                raise bad_argument(where, name, "float16, bfloat16 or float32", describe(t))
        if a.device != b.device:
            raise bad_argument(where, "a, b", "on one device", f"{a.device} and {b.device}")
        if a.dtype != b.dtype:
            raise bad_argument(where, "a, b", "of one dtype", f"{a.dtype} and {b.dtype}")
        reasons = kernel_unavailable_reasons(a.device)
        if reasons:
            raise bad_argument(
                where,
                "a, b",
                "tensors the Triton kernels can run on",
                f"tensors on {a.device}",
                "; ".join(reasons),
            )
        H, R, C = self.spdims
        bl = self.block
        sparse_shape = (self._operand.nnz, bl, bl)
        if self.mode == "sdd":
            dense = [("a", a, (R * bl, None), self.trans_a), ("b", b, (None, C * bl), self.trans_b)]
        elif self.mode == "dsd":
            inner = (R if self.trans_a else C) * bl
            dense = [("b", b, (inner, None), self.trans_b)]
        else:
            inner = (C if self.trans_b else R) * bl
            dense = [("a", a, (None, inner), self.trans_a)]
        for name, t, (rows, cols), trans in dense:
            shape = tuple(t.shape[-2:])[::-1] if trans else tuple(t.shape[-2:])
            heads = t.shape[-3] if t.dim() >= 3 else 1
            if (
                heads != H
                or (rows is not None and shape[0] != rows)
                or (cols is not None and shape[1] != cols)
            ):
                want = f"[Z, {H}, {rows or '.'}, {cols or '.'}]" + (
                    " before its transpose" if trans else ""
                )
                raise bad_argument(where, name, f"a dense tensor {want}", describe(t))
        if self.mode != "sdd":
            name, t = ("a", a) if self.mode == "dsd" else ("b", b)
            if tuple(t.shape[-3:]) != sparse_shape:
                raise bad_argument(
                    where,
                    name,
                    f"a compressed tensor [Z, {sparse_shape[0]}, {bl}, {bl}]",
                    describe(t),
                )
        if self.mode == "sdd":
            k_a = a.shape[-2] if self.trans_a else a.shape[-1]
            k_b = b.shape[-1] if self.trans_b else b.shape[-2]
            if k_a != k_b:
                raise bad_argument(where, "a, b", "of matching inner sizes", f"{k_a} and {k_b}")

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.product(a, b)

    def product(
        self, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``self(a, b)``, with the result stored in ``out_dtype`` (default: the inputs'
        dtype). The sums are fp32 either way; an ``sdd`` with ``out_dtype=torch.float32``
        keeps fp16 scores from overflowing (the unfused attention does so)."""
        self._check(a, b)
        dims = max(a.dim(), b.dim())
        a4 = a.reshape((1,) * (4 - a.dim()) + tuple(a.shape))
        b4 = b.reshape((1,) * (4 - b.dim()) + tuple(b.shape))
        out = _MatMulFunction.apply(
            a4, b4, self.mode, self.trans_a, self.trans_b, self._operand, out_dtype
        )
        for _ in range(4 - dims):  # drop the leading dims added above (size-1 ones only)
            out = out.squeeze(0)
        return out
