"""Two PERF.md targets that the anchor table does not cover, on a GPU:

* index build time for L=16384, H=16 (a layout per head), block 64, window_global, against
  FlexAttention's ``create_block_mask`` for the same pattern;
* forward+backward at L = 1,048,576 tokens (B1 H16 D64, window_global, one layout shared by
  all heads, block 128).

    PYTHONPATH=src python3 benchmarks/long_and_index.py [--flex]
"""

from __future__ import annotations

import time

import torch
from triton.testing import do_bench

from blocksparse_attn import block_sparse_attention
from blocksparse_attn.index import build_index
from blocksparse_attn.kernels.configs import forward_tiles
from blocksparse_attn.tools.bench_cases import Case, flops, pattern_layout


def index_build(with_flex: bool):
    L, H, block = 16384, 16, 64
    layout = pattern_layout("window_global", L, block).expand(H, -1, -1).contiguous().cuda()
    tiles = forward_tiles(64, block, 0.05)
    fn = lambda: build_index(layout, block, tile_m=tiles.m, tile_n=tiles.n)  # noqa: E731
    ms = do_bench(fn, warmup=5, rep=50, return_mode="median")
    print(f"index build, L={L} H={H} block {block} window_global (layout on GPU, "
          f"{tiles.m}x{tiles.n} tiles): {ms:.3f} ms")
    if not with_flex:
        return
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        r = torch.arange(L // block, device="cuda")
        nb_ok = ((r[:, None] - r[None, :]).abs() <= 256 // block)

        def mask_mod(b, h, q, k):
            qb, kb = q // block, k // block
            return nb_ok[qb, kb] | (q < 128) | (k < 128)

        cbm = lambda: create_block_mask(mask_mod, 1, H, L, L, device="cuda",  # noqa: E731
                                        _compile=True)
        cbm()
        t = time.perf_counter()
        cbm()
        torch.cuda.synchronize()
        print(f"FlexAttention create_block_mask (compiled mask_mod), same pattern: "
              f"{(time.perf_counter() - t) * 1e3:.1f} ms")
    except Exception as e:  # report, do not fail the other measurement
        print(f"FlexAttention create_block_mask: {type(e).__name__}: {str(e)[:120]}")


def million_tokens():
    case = Case("window_global", 1 << 20, 1, 16, 64, 128)
    layout = pattern_layout(case.pattern, case.seq_len, case.block).bool().cuda()
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def fwd():
        return block_sparse_attention(q, k, v, layout, block=case.block, backend="fused")

    def fwd_bwd():
        torch.autograd.grad(fwd(), (q, k, v), do)

    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    f_ms = do_bench(fwd, warmup=2, rep=10, return_mode="median")
    fb_ms = do_bench(fwd_bwd, warmup=2, rep=10, return_mode="median")
    lay = layout.cpu()
    print(f"L=1,048,576 B1 H16 D64 window_global block 128 (density "
          f"{lay.float().mean().item():.5f}): fwd {f_ms:.2f} ms "
          f"({flops(case, lay, 'fwd') / f_ms / 1e9:.0f} TF), fwd+bwd {fb_ms:.2f} ms "
          f"({flops(case, lay, 'fwd+bwd') / fb_ms / 1e9:.0f} TF), peak {peak:.1f} GiB")


if __name__ == "__main__":
    import sys

    print(torch.cuda.get_device_name())
    index_build(with_flex="--flex" in sys.argv)  # FlexAttention's compile takes a minute
    million_tokens()
