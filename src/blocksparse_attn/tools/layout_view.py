"""Layouts as text grids and PNG pictures."""

from __future__ import annotations

import torch


def layout_text(layout: torch.Tensor, max_width: int = 64) -> str:
    """One head ``[nb, nb]`` as a text grid: ``X`` kept, ``.`` empty. Larger grids are
    shown downsampled by an integer factor, each cell a square of blocks: ``X`` all kept,
    ``+`` some kept, ``.`` none."""
    grid = layout != 0
    nq, nk = grid.shape
    f = max(1, -(-max(nq, nk) // max_width))
    lines = []
    if f > 1:
        rq, rk = -(-nq // f) * f, -(-nk // f) * f
        padded = torch.zeros((rq, rk), dtype=torch.float32)
        padded[:nq, :nk] = grid.float()
        cells = (
            padded.reshape(rq // f, f, rk // f, f).permute(0, 2, 1, 3).reshape(rq // f, rk // f, -1)
        )
        full = torch.zeros_like(padded)
        full[:nq, :nk] = 1
        area = (
            full.reshape(rq // f, f, rk // f, f).permute(0, 2, 1, 3).reshape(rq // f, rk // f, -1)
        )
        frac = cells.sum(-1) / area.sum(-1)
        lines.append(f"(each cell is {f}x{f} blocks: X all kept, + some kept, . none)")
        for row in frac.tolist():
            lines.append("".join("X" if x >= 1 else ("+" if x > 0 else ".") for x in row))
    else:
        for row in grid.tolist():
            lines.append("".join("X" if x else "." for x in row))
    return "\n".join(lines)


def layout_summary(layout: torch.Tensor) -> str:
    """Density and non-zero blocks per head."""
    lay = layout != 0
    per_head = lay.flatten(1).sum(1).tolist()
    total = lay[0].numel()
    lines = [
        f"layout {list(lay.shape)}: {int(lay.sum())} blocks kept of {lay.numel()} "
        f"(density {lay.float().mean().item():.4f})"
    ]
    for h, n in enumerate(per_head):
        lines.append(f"  head {h}: nnz {n} ({n / total:.4f})")
    return "\n".join(lines)


def save_layout_png(layout: torch.Tensor, path: str, title: str = "") -> None:
    """Picture of every head of ``layout`` (kept blocks dark) written to ``path``. Needs
    matplotlib (``pip install 'blocksparse-attn[bench]'``)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "blocksparse-attn: --png needs matplotlib, which is not installed. "
            "Fix: pip install 'blocksparse-attn[bench]' (or pip install "
            "matplotlib)."
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lay = (layout != 0).cpu()
    heads = lay.shape[0]
    cols = min(heads, 4)
    rows = -(-heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        ax.axis("off")
        if h < heads:
            ax.imshow(lay[h].numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
            ax.set_title(f"head {h}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
