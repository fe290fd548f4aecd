"""One format for every user-facing error: which argument, what was expected, what was
given, and how to fix it."""

from __future__ import annotations


def bad_argument(
    where: str,
    argument: str,
    expected: str,
    given: object,
    fix: str = "",
    error: type[Exception] = ValueError,
) -> Exception:
    """Build (not raise) an exception whose message names the argument, the expectation,
    the value given and a fix, e.g.

    ``FixedSparsityConfig: num_local_blocks must be divisible by num_global_blocks, got
    num_local_blocks=4, num_global_blocks=3. Fix: choose num_global_blocks from the divisors
    of num_local_blocks.``
    """
    msg = f"{where}: {argument} must be {expected}, got {given}."
    if fix:
        msg += f" Fix: {fix}"
    return error(msg)


def describe(t: object) -> str:
    """Short description of a value for error messages (tensors by shape/dtype/device)."""
    shape = getattr(t, "shape", None)
    if shape is not None and hasattr(t, "dtype"):
        return f"a tensor of shape {tuple(shape)}, dtype {t.dtype}, device {t.device}"
    return repr(t)
