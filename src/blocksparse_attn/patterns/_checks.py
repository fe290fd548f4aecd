"""Constructor checks shared by the patterns, with DeepSpeed's exception types."""

from __future__ import annotations

import torch

from .._errors import bad_argument, describe

ATTENTION_KINDS = ("unidirectional", "bidirectional")


def check_attention(where: str, attention: object) -> None:
    if attention not in ATTENTION_KINDS:
        raise bad_argument(
            where,
            "attention",
            "'unidirectional' or 'bidirectional'",
            repr(attention),
            error=NotImplementedError,
        )


def check_horizontal(where: str, attention: str, horizontal_global_attention: bool) -> None:
    if attention != "bidirectional" and horizontal_global_attention:
        raise bad_argument(
            where,
            "horizontal_global_attention",
            "False unless attention='bidirectional'",
            f"horizontal_global_attention=True with attention={attention!r}",
            "use attention='bidirectional' or drop horizontal_global_attention.",
        )


def check_global_ranges(where: str, starts: list[int], ends: list[int] | None) -> None:
    if ends is None:
        return
    if len(starts) != len(ends):
        raise bad_argument(
            where,
            "global_block_end_indices",
            "as long as global_block_indices",
            f"{len(ends)} end(s) for {len(starts)} start(s)",
            "give one end index per start index.",
        )
    for s, e in zip(starts, ends):
        if s >= e:
            raise bad_argument(
                where,
                "global_block_end_indices",
                "greater than the matching global_block_indices entry",
                f"start {s} with end {e}",
                "each global range [start, end) must be non-empty.",
            )


def check_fits(where: str, name: str, value: int, nb: int) -> None:
    """Layout-time check that a pattern parameter fits in ``nb`` blocks (ValueError)."""
    if nb < value:
        raise bad_argument(
            where,
            name,
            f"<= the number of blocks in a row ({nb})",
            value,
            f"use a longer sequence or a smaller {name}.",
        )


def layout_tensor(
    where: str,
    layout: object,
    shape: str = "a 3-D tensor [H, nb_q, nb_k] (or 2-D [nb_q, nb_k])",
    fix: str = "",
) -> torch.Tensor:
    """The checks every taker of a layout shares: a tensor with data (not on the meta
    device), 2-D (one head, which gains a head dim) or 3-D (else: ``shape``, ``fix``), of
    an integer or bool dtype. Returns the 3-D tensor; each caller checks its own sizes."""
    if not isinstance(layout, torch.Tensor):
        raise bad_argument(
            where,
            "layout",
            "a torch.Tensor [H, nb_q, nb_k]",
            describe(layout),
            "pass torch.as_tensor(your_layout).",
        )
    if layout.device.type == "meta":
        raise bad_argument(
            where,
            "layout",
            "a tensor with data (the index is built from its values)",
            describe(layout),
            "make the layout on the CPU or the inputs' device.",
        )
    if layout.dim() == 2:
        layout = layout.unsqueeze(0)
    if layout.dim() != 3:
        raise bad_argument(where, "layout", shape, describe(layout), fix)
    if layout.dtype.is_floating_point or layout.dtype.is_complex:
        raise bad_argument(
            where,
            "layout",
            "an integer or bool tensor",
            describe(layout),
            "convert with layout.to(torch.int64) (non-zero means 'attend').",
        )
    return layout
