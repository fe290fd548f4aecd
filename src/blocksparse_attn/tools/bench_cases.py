"""Benchmark cases: the anchor patterns and problem sizes (``pattern_layout``), and FLOP
counting."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..patterns import BSLongformerSparsityConfig, FixedSparsityConfig

PATTERNS = ("dense", "causal_dense", "window_global", "causal_fixed", "random")
DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Case:
    pattern: str
    seq_len: int
    batch: int
    heads: int
    head_dim: int
    block: int
    causal: bool = False  # token-level causal inside diagonal blocks
    density: float | None = None  # for the 'random' pattern
    kv_heads: int | None = None  # grouped-query attention: K/V heads (None: ``heads``)

    @property
    def name(self) -> str:
        c = "+causal" if self.causal else ""
        d = f"{self.density:g}" if self.pattern == "random" else ""
        kv = f" Hkv{self.kv_heads}" if self.kv_heads else ""
        return (
            f"{self.pattern}{d}{c} L{self.seq_len} B{self.batch} H{self.heads}{kv} "
            f"D{self.head_dim} block{self.block}"
        )

    def layout(self) -> torch.Tensor:
        return pattern_layout(self.pattern, self.seq_len, self.block, self.density)

    def as_dict(self) -> dict:
        return asdict(self) | {"name": self.name}


def window_global_config(block: int) -> BSLongformerSparsityConfig:
    """``window_global`` as a config (its layout for every length equals
    ``pattern_layout("window_global", ...)``): a pattern given once, whose lists the packed
    and decoding paths cache per length."""
    half, glob = max(1, 256 // block), max(1, 128 // block)
    return BSLongformerSparsityConfig(
        num_heads=1,
        block=block,
        num_sliding_window_blocks=2 * half + 1,
        global_block_indices=list(range(glob)),
    )


def pattern_layout(
    pattern: str, seq_len: int, block: int, density: float | None = None
) -> torch.Tensor:
    """One layout ``[1, nb, nb]`` shared by all heads.

    * ``dense``: every block;
    * ``causal_dense``: blocks on or below the diagonal;
    * ``window_global``: a bidirectional window of 256 tokens each side plus 128 global
      tokens (dense rows and columns);
    * ``causal_fixed``: Sparse Transformer "fixed", unidirectional, 512-token windows with
      the last block of each window as a summary column;
    * ``random``: each block kept with probability ``density`` (seeded), plus the diagonal.
    """
    if seq_len % block:
        raise ValueError(
            f"pattern_layout: seq_len must be a multiple of block={block}, got {seq_len}."
        )
    nb = seq_len // block
    if pattern == "dense":
        return torch.ones(1, nb, nb, dtype=torch.int64)
    if pattern == "causal_dense":
        return torch.ones(1, nb, nb, dtype=torch.int64).tril()
    if pattern == "window_global":  # bool: at a million tokens an int64 grid is 0.5 GB
        half = max(1, 256 // block)
        lay = torch.ones(nb, nb, dtype=torch.bool).triu(-half).tril(half)
        g = max(1, 128 // block)
        lay[:g, :] = True
        lay[:, :g] = True
        return lay.unsqueeze(0)
    if pattern == "causal_fixed":
        window = max(1, 512 // block)
        cfg = FixedSparsityConfig(
            1, block=block, num_local_blocks=window, attention="unidirectional"
        )
        return cfg.make_layout(seq_len)
    if pattern == "random":
        if density is None or not 0 < density <= 1:
            raise ValueError(
                f"pattern_layout: the random pattern needs 0 < density <= 1, got {density!r}."
            )
        g = torch.Generator().manual_seed(0)
        lay = torch.rand(nb, nb, generator=g) < density
        lay |= torch.eye(nb, dtype=torch.bool)
        return lay.to(torch.int64).unsqueeze(0)
    raise ValueError(
        f"pattern_layout: pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}."
    )


def flops(case: Case, layout: torch.Tensor, mode: str) -> float:
    """FLOPs on computed blocks: forward ``4 * B * nnz * block^2 * D`` (nnz over all heads),
    forward+backward 3.5x that."""
    nnz = int((layout != 0).sum()) * (case.heads if layout.shape[0] == 1 else 1)
    f = 4.0 * case.batch * nnz * case.block**2 * case.head_dim
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def dense_flops(case: Case, mode: str) -> float:
    f = 4.0 * case.batch * case.heads * case.seq_len**2 * case.head_dim
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def anchor_cases() -> list[Case]:
    """The anchor cases: dense and block-causal layouts at L8192, window_global at blocks
    128/64/32 (L16384) and 64 (L4096), causal_fixed (L16384), at head dims 128 and 64,
    plus a token-causal block-causal row."""
    return [
        Case("dense", 8192, 4, 8, 128, 128),
        Case("causal_dense", 8192, 4, 8, 128, 128),
        Case("causal_dense", 8192, 4, 8, 128, 128, causal=True),
        Case("window_global", 16384, 2, 8, 128, 128),
        Case("window_global", 16384, 2, 8, 128, 64),
        Case("window_global", 16384, 2, 8, 128, 32),
        Case("causal_fixed", 16384, 2, 8, 128, 64, causal=True),
        Case("window_global", 4096, 8, 8, 128, 64),
        Case("dense", 8192, 4, 16, 64, 128),
        Case("causal_dense", 8192, 4, 16, 64, 128),
        Case("window_global", 4096, 8, 16, 64, 64),
    ]


def density_cases() -> list[Case]:
    """Random layouts from 1% to 100% density at blocks 64 and 128."""
    return [
        Case("random", 8192, 2, 8, 128, block, density=d) for block in (64, 128) for d in DENSITIES
    ]


def gqa_cases() -> list[Case]:
    """Grouped-query attention: 32 query heads over 8 kv heads, D128, L16384, causal
    window_global at blocks 64 and 128."""
    return [
        Case("window_global", 16384, 1, 32, 128, block, causal=True, kv_heads=8)
        for block in (64, 128)
    ]


def select(cases: list[Case], match: list[str] | None) -> list[Case]:
    """The cases whose name contains any of ``match`` (all of them when ``match`` is empty);
    an entry that selects nothing is an error, not an empty run."""
    if not match:
        return cases
    missing = [m for m in match if not any(m in c.name for c in cases)]
    if missing:
        names = "\n  ".join(c.name for c in cases)
        raise ValueError(
            f"bench --match: {', '.join(map(repr, missing))} is in no case name; "
            f"the names are:\n  {names}"
        )
    return [c for c in cases if any(m in c.name for m in match)]


def quick_cases() -> list[Case]:
    return [
        Case("window_global", 1024, 1, 2, 64, 64),
        Case("causal_fixed", 1024, 1, 2, 64, 64, causal=True),
    ]
