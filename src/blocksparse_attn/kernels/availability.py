"""Can the Triton kernels run here? Reasons, never a silent answer."""

from __future__ import annotations

import importlib.metadata
import os

import torch

# What the Triton kernels support, in one place (the functional API, the ops and the
# benchmarks read these).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED_MAX_HEAD_DIM_FWD = 256  # the forward's head-dim tile is at most 256 wide
FUSED_MAX_HEAD_DIM_BWD = 128  # the backward keeps dK, dV (or dQ) and K, V tiles in registers
UNFUSED_BLOCKS = (16, 32, 64, 128)  # the block-sparse matmul and softmax tiles


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU
    tensors, slowly, for testing."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _installed_triton() -> str | None:
    try:  # read the installed version without importing triton
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


TRITON_VERSION = _installed_triton()


def triton_version() -> str | None:
    return TRITON_VERSION


def kernel_unavailable_reasons(device: torch.device | str) -> list[str]:
    """Why the Triton kernels cannot run on tensors of ``device`` (empty list: they can)."""
    device = torch.device(device)
    reasons = []
    version = TRITON_VERSION
    if version is None:
        reasons.append("Triton is not installed (pip install 'triton>=3.2')")
    elif tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (3, 2):
        reasons.append(f"Triton {version} is older than 3.2")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reasons.append("CUDA is not available")
    elif device.type == "cpu":
        if not interpreting():
            reasons.append(
                "tensors are on the CPU and Triton's interpreter is off "
                "(the kernels need a CUDA GPU, or TRITON_INTERPRET=1 for testing)"
            )
    else:
        reasons.append(f"device type {device.type!r} is not supported by the kernels (CUDA only)")
    return reasons


def sm90_switched_off() -> bool:
    """Whether ``BLOCKSPARSE_ATTN_SM90=0`` keeps the Triton kernels (forward and backward)
    on Hopper GPUs."""
    return os.environ.get("BLOCKSPARSE_ATTN_SM90", "1") == "0"


_GLUON_REASONS: list[str] | None = None


# Head dims each Hopper direction takes; the others run the Triton kernels. Measured in
# ``benchmarks/NOTES.md``, v20: at head dim 64 the Gluon forward is at parity with Triton's
# on dense layouts and faster on sparse ones; the Gluon backward is not faster there.
SM90_FORWARD_HEAD_DIMS = (64, 128)
SM90_BACKWARD_HEAD_DIMS = (128,)


def sm90_domain(
    q: torch.Tensor, k: torch.Tensor, layout, block: int, head_dims: tuple[int, ...] = (128,)
) -> bool:
    """Whether the Hopper kernels (``kernels/sm90_fwd.py``, ``kernels/sm90_bwd.py``) cover
    inputs of these shapes, dtypes, device and layout kind: an sm90 GPU with Gluon,
    fp16/bf16, a head dim in ``head_dims``, block 128, equal query and key lengths that
    are multiples of 128, any grouping of K/V heads, a layout ``[H_l, nb, nb]`` or block
    lists, and ``BLOCKSPARSE_ATTN_SM90`` not ``0``. The plans
    (:func:`~blocksparse_attn.kernels.fused_fwd.sm90_forward_plan`,
    :func:`~blocksparse_attn.kernels.fused_bwd.sm90_backward_plan`) add what only a call
    tells: contiguous, aligned inputs, no bias or mask, and pass their direction's head
    dims (:data:`SM90_FORWARD_HEAD_DIMS`, :data:`SM90_BACKWARD_HEAD_DIMS`)."""
    from ..kv_blocks import KVBlocks

    B, H, L, D = q.shape
    return not (
        sm90_switched_off()
        or not q.is_cuda
        or q.dtype not in (torch.float16, torch.bfloat16)
        or D not in head_dims
        or block != 128
        or L % 128
        or k.shape[2] != L
        or H % k.shape[1]
        or (not isinstance(layout, KVBlocks) and layout.dim() != 3)
        or torch.cuda.get_device_capability(q.device) != (9, 0)
        or gluon_hopper_reasons()
    )


def gluon_hopper_reasons() -> list[str]:
    """Why the Gluon kernels for Hopper (``kernels/sm90_bwd.py``) cannot be loaded here
    (empty list: they can). Imports Gluon once; the GPU's architecture is checked by the
    caller."""
    global _GLUON_REASONS
    if _GLUON_REASONS is None:
        reasons = []
        if interpreting():
            reasons.append("Triton's interpreter is on (Gluon kernels do not run under it)")
        else:
            try:
                from .sm90_bwd import sm90_dkdv  # noqa: F401
            except (ImportError, AttributeError) as e:  # a Triton without Gluon for Hopper
                reasons.append(f"Gluon's Hopper modules cannot be imported ({e})")
        _GLUON_REASONS = reasons
    return _GLUON_REASONS
