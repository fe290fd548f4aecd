"""Experiment (GPU): one dynamic top-k step, B1 H16 D128 L32768, topk 16, causal, bf16, at
blocks 64 and 128: the selection (``topk_blocks``), the index built from its lists (forward
and backward tiles, each distinct tile shape once), attention forward+backward on the lists,
the eager step, and the step replayed from a CUDA graph. Medians of ``do_bench``. Writes
$OUT/dynamic_step.json.

    PYTHONPATH=src python3 benchmarks/experiments/dynamic_step.py
"""

import json
import os

import torch
from triton.testing import do_bench

from blocksparse_attn import block_sparse_attention, topk_blocks
from blocksparse_attn.index_dynamic import build_block_list_index
from blocksparse_attn.kernels.configs import backward_tiles, forward_tiles


def median(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    B, H, D, L, topk = 1, 16, 128, 32768, 16
    rows = []
    for block in (64, 128):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (
            torch.randn(B, H, L, D, device="cuda", generator=g, dtype=torch.bfloat16)
            for _ in range(4)
        )
        for t in (q, k, v):
            t.requires_grad_()

        def select():
            return topk_blocks(q, k, block=block, topk=topk, causal=True, keep_diagonal=True)

        lists = select()
        density = topk / (L // block)

        shapes = {(t.m, t.n) for t in (forward_tiles(D, block, density, 2),)}
        shapes |= {(t.m, t.n) for t in backward_tiles(D, block, density, 2)}

        def index():
            for m, n in shapes:
                build_block_list_index(
                    lists, block, q_len=L, k_len=L, tile_m=m, tile_n=n, causal=True
                )

        def attend(lists=lists):
            out = block_sparse_attention(q, k, v, lists, block=block, causal=True)
            torch.autograd.grad(out, (q, k, v), do)

        def step():
            attend(select())

        step()
        dense = lists.to_layout(L // block)[0]
        row = {
            "block": block,
            "select_ms": median(select),
            "index_ms": median(index),
            "attention_ms": median(attend),
            # the same blocks as a dense layout, its index compiled once and cached
            "attention_cached_index_ms": median(lambda: attend(dense)),
            "step_ms": median(step),
        }
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        row["graph_step_ms"] = median(graph.replay)
        row["index_tile_shapes"] = sorted(shapes)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(out_dir, "dynamic_step.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
