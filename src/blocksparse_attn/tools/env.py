"""``blocksparse-attn env``: versions and whether the kernels will run, for bug reports."""

from __future__ import annotations

import platform

import torch

from .._version import __version__
from ..kernels.availability import interpreting, kernel_unavailable_reasons, triton_version


def env_report() -> str:
    import numpy

    lines = [
        f"blocksparse-attn {__version__}",
        f"python           {platform.python_version()} ({platform.machine()})",
        f"torch            {torch.__version__}",
        f"triton           {triton_version() or 'not installed'}",
        f"numpy            {numpy.__version__}",
        f"TRITON_INTERPRET {'on' if interpreting() else 'off'}",
    ]
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        lines.append(
            f"gpu              {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), "
            f"CUDA {torch.version.cuda}"
        )
        device = "cuda"
    else:
        lines.append("gpu              none (CUDA not available)")
        device = "cpu"
    reasons = kernel_unavailable_reasons(device)
    if reasons:
        lines.append("kernels          will not run here: " + "; ".join(reasons))
        lines.append("backend='auto'   uses the PyTorch reference (exact, O(L^2) memory)")
    else:
        lines.append(
            f"kernels          will run on {device}"
            + (" (interpreted: slow, for testing)" if device == "cpu" else "")
        )
        lines.append(
            "backend='auto'   uses the fused Triton kernel on CUDA tensors, "
            "the PyTorch reference on CPU tensors"
        )
    if device == "cuda" and not reasons:
        lines.append("hopper kernels   " + _hopper_kernels())
    return "\n".join(lines)


def _hopper_kernels() -> str:
    """Whether the fused attention's Gluon kernels for Hopper (forward and backward) can
    run here."""
    from ..kernels.availability import gluon_hopper_reasons, sm90_switched_off

    if torch.cuda.get_device_capability() != (9, 0):
        return "not used (the GPU is not sm_90)"
    if sm90_switched_off():
        return "off (BLOCKSPARSE_ATTN_SM90=0)"
    why = gluon_hopper_reasons()
    if why:
        return "not available: " + "; ".join(why)
    return "on for the layouts they cover (README: Hopper kernels)"
