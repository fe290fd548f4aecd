"""Constructor checks shared by the patterns, with DeepSpeed's exception types."""

from __future__ import annotations

from .._errors import bad_argument

ATTENTION_KINDS = ("unidirectional", "bidirectional")


def check_attention(where: str, attention: object) -> None:
    if attention not in ATTENTION_KINDS:
        raise bad_argument(where, "attention", "'unidirectional' or 'bidirectional'",
                           repr(attention), error=NotImplementedError)


def check_horizontal(where: str, attention: str, horizontal_global_attention: bool) -> None:
    if attention != "bidirectional" and horizontal_global_attention:
        raise bad_argument(where, "horizontal_global_attention",
                           "False unless attention='bidirectional'",
                           f"horizontal_global_attention=True with attention={attention!r}",
                           "use attention='bidirectional' or drop horizontal_global_attention.")


def check_global_ranges(where: str, starts: list[int], ends: list[int] | None) -> None:
    if ends is None:
        return
    if len(starts) != len(ends):
        raise bad_argument(where, "global_block_end_indices",
                           "as long as global_block_indices",
                           f"{len(ends)} end(s) for {len(starts)} start(s)",
                           "give one end index per start index.")
    for s, e in zip(starts, ends):
        if s >= e:
            raise bad_argument(where, "global_block_end_indices",
                               "greater than the matching global_block_indices entry",
                               f"start {s} with end {e}",
                               "each global range [start, end) must be non-empty.")


def check_fits(where: str, name: str, value: int, nb: int) -> None:
    """Layout-time check that a pattern parameter fits in ``nb`` blocks (ValueError)."""
    if nb < value:
        raise bad_argument(where, name, f"<= the number of blocks in a row ({nb})", value,
                           f"use a longer sequence or a smaller {name}.")
