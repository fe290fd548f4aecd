"""Vectorised building blocks shared by the patterns: windows, bands and random rows.

Each function returns a bool ``[nb, nb]`` grid for one head; the configs OR them together.
"""

from __future__ import annotations

import torch


def window_ids(nb: int, sizes: list[int]) -> torch.Tensor:
    """Window number of each block when ``[0, nb)`` is cut into consecutive windows of
    ``sizes[0], sizes[1], ...`` blocks, the last size repeating until ``nb`` is covered."""
    ids = torch.empty(nb, dtype=torch.int64)
    start, k = 0, 0
    while start < nb and k < len(sizes):
        end = min(start + sizes[k], nb)
        ids[start:end] = k
        start, k = end, k + 1
    if start < nb:  # tile the rest with the last size
        last = sizes[-1]
        ids[start:] = k + torch.arange(nb - start) // last
    return ids


def local_windows(nb: int, sizes: list[int], unidirectional: bool) -> torch.Tensor:
    """Dense squares (or their lower triangles) on the diagonal, one per window."""
    ids = window_ids(nb, sizes)
    grid = ids[:, None] == ids[None, :]
    return grid.tril() if unidirectional else grid


def band(nb: int, before: int, after: int) -> torch.Tensor:
    """Row ``r`` attends ``[r - before, r + after]``, clipped to the grid."""
    r = torch.arange(nb)
    d = r[None, :] - r[:, None]  # col - row
    return (d >= -before) & (d <= after)


def random_rows(nb: int, k: int, rng, causal_rows: bool = False) -> torch.Tensor:
    """For each row top to bottom, ``rng.sample`` of ``k`` distinct columns from ``[0, nb)``
    (or ``[0, row]`` when ``causal_rows``, taking at most ``row + 1``). One ``sample`` call
    per row in row order, so a seeded ``random`` reproduces DeepSpeed's draws."""
    grid = torch.zeros((nb, nb), dtype=torch.bool)
    if k == 0:
        return grid
    for row in range(nb):
        population = row + 1 if causal_rows else nb
        cols = rng.sample(range(population), min(k, population))
        grid[row, cols] = True
    return grid
