"""Helpers shared by the tests: the device they run on, error-message checks, layout
pictures. (Kernel-test helpers: ``attention_cases.py``.)"""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# property-based tests: their fixed examples by default (derandomised, as CI runs them);
# BLOCKSPARSE_ATTN_EXAMPLES=N draws N fresh random examples per test instead (pick the seed
# with pytest's --hypothesis-seed to repeat a run)
EXPLORE = os.environ.get("BLOCKSPARSE_ATTN_EXAMPLES")


def examples(default: int) -> int:
    """How many examples a property-based test draws: ``default``, or the exploration count."""
    return int(EXPLORE) if EXPLORE else default


def assert_raises_with(error, words, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``error`` and its message holds each of ``words``."""
    with pytest.raises(error) as e:
        fn(*args, **kwargs)
    missing = [w for w in words if w not in str(e.value)]
    assert not missing, f"{missing} not in the message: {e.value}"


def grid(text: str) -> torch.Tensor:
    """Parse an ``X``/``.`` picture into an int64 ``[rows, cols]`` layout."""
    rows = [line.strip() for line in text.strip().splitlines()]
    return torch.tensor([[1 if c == "X" else 0 for c in r] for r in rows], dtype=torch.int64)
