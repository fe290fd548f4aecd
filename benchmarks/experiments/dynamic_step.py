"""Experiment (GPU): one dynamic top-k step, B1 H16 D128 L32768, topk 16, causal, bf16, at
blocks 64 and 128: the selection (``topk_blocks``), the index built from its lists (forward
and backward tiles), attention forward+backward on the lists, the eager step, and the step
replayed from a CUDA graph; beside FlexAttention given the same selection as a ``BlockMask``
(``BlockMask.from_kv_blocks`` at its tile, block 128 only: a block-64 selection needs an
in-tile mask). Medians of ``do_bench``. Writes $OUT/dynamic_step.json.

    PYTHONPATH=src python3 benchmarks/experiments/dynamic_step.py
"""

import json
import os

import torch
from triton.testing import do_bench

from blocksparse_attn import block_sparse_attention, topk_blocks
from blocksparse_attn.index import get_index
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

        def index():
            ft = forward_tiles(D, block, density, 2)
            kv, qt = backward_tiles(D, block, density, 2)
            for t in (ft, kv, qt):
                get_index(lists, block, q_len=L, k_len=L, tile_m=t.m, tile_n=t.n, causal=True)

        def attend(lists=lists):
            out = block_sparse_attention(q, k, v, lists, block=block, causal=True)
            torch.autograd.grad(out, (q, k, v), do)

        def step():
            attend(select())

        step()
        row = {
            "block": block,
            "select_ms": median(select),
            "index_ms": median(index),
            "attention_ms": median(attend),
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
        if block == 128:
            try:
                from torch.nn.attention.flex_attention import BlockMask, flex_attention

                mask = BlockMask.from_kv_blocks(
                    lists.num_blocks, lists.indices, BLOCK_SIZE=128, seq_lengths=(L, L)
                )
                flex = torch.compile(flex_attention)

                def flex_step():
                    out = flex(q, k, v, block_mask=mask)
                    torch.autograd.grad(out, (q, k, v), do)

                flex_step()
                row["flex_attention_ms"] = median(flex_step)
                row["flex_note"] = "no causal mask_mod inside the diagonal tile"
            except Exception as e:  # record why FlexAttention could not run it
                row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(out_dir, "dynamic_step.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
