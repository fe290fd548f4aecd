"""The benchmark's packed-sequence and decoding suites: ``block_sparse_attention_varlen``
on documents packed without padding, beside the same tokens as a padded batch and beside
FlexAttention with a document mask; ``block_sparse_decode`` of one new token against a long
KV cache, with the memory bandwidth it reaches on the key/value bytes its layout selects,
beside FlexAttention on the same block mask."""

from __future__ import annotations

import sys

import torch

from ..kv_blocks import KVBlocks
from .bench_cases import pattern_layout, window_global_config
from .bench_harness import error_text, gpu_median_ms, graph_ms


def document_lengths(total: int, docs: int, low: int, high: int, block: int, seed: int = 0):
    """``docs`` lengths in ``[low, high]`` (seeded), scaled to sum to ``total``; not
    multiples of the block."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(low, high + 1, (docs,), generator=g).double()
    lengths = (raw / raw.sum() * total).long().clamp(1, None)
    lengths[-1] += total - int(lengths.sum())
    return [int(n) for n in lengths]


def varlen_steps(
    total: int = 131072,
    docs: int = 16,
    heads: int = 16,
    head_dim: int = 128,
    block: int = 64,
    dtype=torch.bfloat16,
    device="cuda",
) -> dict:
    """The varlen suite's problem: ``docs`` documents of 1k-16k tokens packed to ``total``
    (causal window_global per document, given as a config). Returns the document
    ``lengths``, the packed tensors (``leaves``, ``grad_out``, ``cu``) and three
    forward+backward steps: ``packed`` (the batch seen before, as by a model's later
    layers), ``packed_new_batch`` (packed and compiled in the call) and ``padded`` (the same
    documents as a padded batch with a key padding mask)."""
    from ..functional import block_sparse_attention
    from ..varlen import block_sparse_attention_varlen, forget_packings

    lengths = document_lengths(total, docs, 1024, 16384, block)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu = cu.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, go = (
        torch.randn(total, heads, head_dim, device=device, generator=g).to(dtype) for _ in range(4)
    )
    leaves = [t.requires_grad_() for t in (q, k, v)]

    # the pattern given once, as FlexAttention's mask is made once (its lists are cached
    # per document length; a batch's packing is kept for its next calls)
    pattern = window_global_config(block)

    def packed():
        out = block_sparse_attention_varlen(
            *leaves, cu, cu, pattern, block=block, causal=True, max_seqlen_q=16384
        )
        torch.autograd.grad(out, leaves, go)

    def packed_new_batch():  # a model's first layer on a batch: packed and compiled anew
        forget_packings()
        packed()

    longest = -(-max(lengths) // block) * block
    batch = [
        torch.zeros(docs, heads, longest, head_dim, device=device, dtype=dtype) for _ in range(4)
    ]
    keep = torch.zeros(docs, longest, dtype=torch.bool, device=device)
    for d, n in enumerate(lengths):
        keep[d, :n] = True
        for t in batch:
            t[d, :, :n] = torch.randn(heads, n, head_dim, device=device, generator=g).to(dtype)
    padded_leaves = [t.requires_grad_() for t in batch[:3]]
    layout = pattern_layout("window_global", longest, block)

    def padded():
        out = block_sparse_attention(
            *padded_leaves,
            layout,
            block=block,
            causal=True,
            key_padding_mask=keep,
            key_padding_mask_mode="mul",
        )
        torch.autograd.grad(out, padded_leaves, batch[3])

    return dict(
        lengths=lengths,
        leaves=leaves,
        grad_out=go,
        cu=cu,
        packed=packed,
        packed_new_batch=packed_new_batch,
        padded=padded,
    )


def varlen_suite(
    total: int = 131072,
    docs: int = 16,
    heads: int = 16,
    head_dim: int = 128,
    block: int = 64,
    dtype=torch.bfloat16,
    device="cuda",
    timer=None,
    progress: bool = True,
) -> list[dict]:
    """Forward+backward over the documents of :func:`varlen_steps`: ours packed (the batch
    seen before, and new), ours on the same documents as a padded batch, and FlexAttention
    with a document mask and the same pattern (its mask made once)."""
    timer = timer or gpu_median_ms
    cuda = torch.device(device).type == "cuda"
    steps = varlen_steps(total, docs, heads, head_dim, block, dtype, device)
    lengths = steps["lengths"]
    steps["packed"]()
    steps["padded"]()
    row = {
        "suite": "varlen",
        "total": total,
        "docs": docs,
        "lengths": lengths,
        "heads": heads,
        "head_dim": head_dim,
        "block": block,
        "dtype": str(dtype).replace("torch.", ""),
        "packed_ms": timer(steps["packed"]),
        "packed_new_batch_ms": timer(steps["packed_new_batch"]),
        "padded_ms": timer(steps["padded"]),
    }
    row["packed_over_padded"] = row["packed_ms"] / row["padded_ms"]
    if cuda:
        try:
            flex = _flex_documents(
                steps["leaves"], steps["grad_out"], steps["cu"], lengths, block, total, timer
            )
            row.update(flex)
            row["flex_over_ours"] = row["flex_ms"] / row["packed_ms"]
        except Exception as e:  # record why FlexAttention could not run it
            row["flex_error"] = error_text(e)
    if progress:
        print(f"[varlen] {row}", file=sys.stderr, flush=True)
    return [row]


def _flex_documents(leaves, go, cu, lengths, block, total, timer=None):
    """FlexAttention on the packed documents: a document mask with the causal
    window_global pattern in each document's positions (its block mask made once)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    timer = timer or gpu_median_ms
    dev = cu.device
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev)
    )
    start = cu[:-1].long()[doc]
    half, glob = max(1, 256 // block), max(1, 128 // block)

    def mask_mod(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        qb, kb = (q_idx - start[q_idx]) // block, (kv_idx - start[kv_idx]) // block
        pattern = ((qb - kb).abs() <= half) | (qb < glob) | (kb < glob)
        return same & (kv_idx <= q_idx) & pattern

    mask = create_block_mask(mask_mod, 1, 1, total, total, device=dev, _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in leaves)

    def step():
        out = flex(q, k, v, block_mask=mask)
        torch.autograd.grad(out, leaves, go.transpose(0, 1).unsqueeze(0))

    step()
    return {"flex_ms": timer(step)}


def decode_suite(
    batch: int = 8,
    context: int = 131072,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    block: int = 64,
    dtype=torch.bfloat16,
    device="cuda",
    timer=None,
    progress: bool = True,
) -> list[dict]:
    """One new token per sequence against a KV cache of ``context`` tokens (window_global
    pattern): time called eagerly and replayed from a CUDA graph (as a server runs its
    decoding step), and GB/s on the key/value bytes the layout selects; FlexAttention's
    decoding on the same block mask beside it, both ways."""
    from ..decode import block_sparse_decode

    timer = timer or gpu_median_ms
    cuda = torch.device(device).type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, 1, heads, head_dim, device=device, generator=g).to(dtype)
    k_cache, v_cache = (
        torch.randn(batch, context, kv_heads, head_dim, device=device, generator=g).to(dtype)
        for _ in range(2)
    )
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    layout = pattern_layout("window_global", context, block)
    # the pattern as block lists made once (a server's static pattern); trusted: the
    # library made them, so no host-side value check per call
    made = KVBlocks.from_layout(layout.to(device))
    lists = KVBlocks(made.num_blocks, made.indices, trusted=True)

    def step():
        return block_sparse_decode(q, k_cache, v_cache, lens, lists, block=block)

    step()
    row_blocks = int((layout[0, -1] != 0).sum())  # the last position's row
    selected = batch * kv_heads * row_blocks * block * head_dim * 2 * q.element_size()
    row = {
        "suite": "decode",
        "batch": batch,
        "context": context,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "block": block,
        "dtype": str(dtype).replace("torch.", ""),
        "ms": timer(step),
        "selected_mib": selected / 2**20,
    }
    row["gb_per_s"] = selected / row["ms"] / 1e6
    if cuda:
        row["graph_ms"] = graph_ms(step, timer)
        row["graph_gb_per_s"] = selected / row["graph_ms"] / 1e6
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            last = layout[0, -1].to(device)  # the new token's row of the pattern

            def mask_mod(b, h, q_idx, kv_idx):
                return last[kv_idx // block]

            mask = create_block_mask(mask_mod, None, None, 1, context, device=device)
            flex = torch.compile(flex_attention, dynamic=False)
            fq = q.transpose(1, 2)
            fk, fv = (t.transpose(1, 2) for t in (k_cache, v_cache))

            def flex_step():
                return flex(fq, fk, fv, block_mask=mask, enable_gqa=True)

            flex_step()
            row["flex_ms"] = timer(flex_step)
            row["flex_over_ours"] = row["flex_ms"] / row["ms"]
            row["flex_graph_ms"] = graph_ms(flex_step, timer)
            row["flex_over_ours_graph"] = row["flex_graph_ms"] / row["graph_ms"]
        except Exception as e:  # record why FlexAttention could not run it
            row["flex_error"] = error_text(e)
    if progress:
        print(f"[decode] {row}", file=sys.stderr, flush=True)
    return [row]
