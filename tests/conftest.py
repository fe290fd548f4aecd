"""Test set-up. Without a GPU the Triton kernels run under Triton's interpreter, which must
be switched on before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


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


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
