"""``blocksparse-attn demo``: train a small causal language model whose attention is
``SparseSelfAttention`` (Fixed pattern, unidirectional) on a long-range recall task, then the
same model with dense attention at the same length.

The task, generated on the fly: the sequence is four windows of the Fixed pattern (unless
``--window`` says otherwise). A table of key->value pairs (one token per pair, repeated to
fill the block) sits in the summary block of the first window; the last window opens with
queried keys, and the model must output each key's value; everything else is noise. In the
Fixed pattern a row attends its own window and the summary blocks (global columns) of the
earlier windows, so the answer is one hop away, thousands of tokens back on a GPU; loss is
measured on the answers only.
"""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
from torch import nn

from ..modules import SparseSelfAttention
from ..patterns import DenseSparsityConfig, FixedSparsityConfig

N_NOISE = 64  # noise tokens: [0, N_NOISE); values reuse the first n_keys of them


def vocab_size(n_keys: int) -> int:
    """Noise tokens, then key tokens, then one token per (key, value) pair."""
    return N_NOISE + n_keys + n_keys * n_keys


def recall_batch(
    batch: int,
    seq_len: int,
    block: int,
    window: int,
    queries: int,
    n_keys: int,
    generator: torch.Generator,
    device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, targets)`` of shape ``[batch, seq_len]``; targets are -100 except at the
    first ``queries`` positions of the last window, whose target is the queried key's
    value."""
    key0, pair0 = N_NOISE, N_NOISE + n_keys
    tokens = torch.randint(0, N_NOISE, (batch, seq_len), generator=generator)
    targets = torch.full((batch, seq_len), -100, dtype=torch.long)
    memory = (window - 1) * block  # the summary (global) block of window 0
    values = torch.randint(0, n_keys, (batch, n_keys), generator=generator)
    order = torch.argsort(torch.rand(batch, n_keys, generator=generator), dim=1)
    stored = min(block, n_keys)  # keys in the table; it repeats to fill the block
    keys = order[:, torch.arange(block) % stored]
    tokens[:, memory : memory + block] = pair0 + keys * n_keys + values.gather(1, keys)
    asked = order.gather(1, torch.randint(0, stored, (batch, queries), generator=generator))
    ask = seq_len - window * block  # the queries open the last window
    tokens[:, ask : ask + queries] = key0 + asked
    targets[:, ask : ask + queries] = values.gather(1, asked)
    return tokens.to(device), targets.to(device)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attention: SparseSelfAttention):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = attention
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(B, L, 3, self.heads, C // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = self.attn(q.contiguous(), k.contiguous(), v.contiguous())
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, config, seq_len: int, dim: int, layers: int, vocab: int, backend: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.num_heads,
                SparseSelfAttention(config, max_seq_length=seq_len, causal=True, backend=backend),
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


class Progress:
    """A one-line progress bar on a terminal; a line every 10% otherwise."""

    def __init__(self, total: int, label: str, stream=sys.stdout):
        self.total, self.label, self.stream = total, label, stream
        self.tty = stream.isatty()
        self.next_print = 0

    def update(self, step: int, text: str) -> None:
        frac = step / self.total
        if self.tty:
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r{self.label} [{bar:<30}] {step}/{self.total} {text}")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step >= self.next_print or step == self.total:
            print(f"{self.label} {step}/{self.total} {text}", file=self.stream, flush=True)
            self.next_print = step + max(1, self.total // 10)


def train(name: str, config, args, device, dtype) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    vocab = vocab_size(args.keys)
    model = TinyLM(config, args.seq_len, args.dim, args.layers, vocab, "auto").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    progress = Progress(args.steps, f"{name:>6}")
    losses, tokens_seen = [], 0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if step == 2:  # the first step compiles and tunes the kernels: not in the rate
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, tokens_seen = time.perf_counter(), 0
        tokens, targets = recall_batch(
            args.batch,
            args.seq_len,
            config.block,
            args.window,
            args.queries,
            args.keys,
            gen,
            device,
        )
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens_seen += tokens.numel()
        rate = tokens_seen / max(time.perf_counter() - start, 1e-9)
        progress.update(step, f"loss {losses[-1]:.3f}  {rate:,.0f} tok/s")
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB (CUDA)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB (process RSS)"
    k = max(1, args.steps // 10)
    return {
        "name": name,
        "losses": losses,
        "first": sum(losses[:k]) / k,
        "last": sum(losses[-k:]) / k,
        "tok_s": tokens_seen / elapsed,
        "peak": peak,
        "seconds": elapsed,
    }


def demo_main(args) -> int:
    from .layout_view import layout_text, save_layout_png

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.seq_len is None:
        args.seq_len = 8192 if gpu else 256
    if args.block is None:
        args.block = 64 if gpu else 16
    if args.steps is None:
        args.steps = 1000 if gpu else 250
    if args.batch is None:
        args.batch = 16
    if args.window is None:
        if args.seq_len % (4 * args.block):
            raise SystemExit(
                f"blocksparse-attn demo: --seq-len must be a multiple of "
                f"4*block = {4 * args.block} (four windows), got {args.seq_len}; "
                "or give --window."
            )
        args.window = args.seq_len // (4 * args.block)
    dtype = torch.bfloat16 if gpu else torch.float32
    span = args.window * args.block
    if args.seq_len % span or args.seq_len < 2 * span:
        raise SystemExit(
            f"blocksparse-attn demo: --seq-len must be a multiple of "
            f"window*block = {span} and at least {2 * span}, got {args.seq_len}."
        )
    heads = args.heads
    sparse = FixedSparsityConfig(
        heads, args.block, num_local_blocks=args.window, attention="unidirectional"
    )
    layout = sparse.make_layout(args.seq_len)
    density = layout[0].float().mean().item()
    backend = "fused Triton kernel" if gpu else "PyTorch reference backend"
    print(f"blocksparse-attn demo on {device} ({backend}, {str(dtype).replace('torch.', '')})")
    distance = args.seq_len - span - (args.window - 1) * args.block
    print(
        f"task: recall the value of a key stored {distance:,} tokens earlier; "
        f"chance loss ln({args.keys}) = {math.log(args.keys):.2f}"
    )
    print(
        f"model: {args.layers} layers, dim {args.dim}, {heads} heads; sequence {args.seq_len}, "
        f"batch {args.batch}, {args.steps} steps"
    )
    print(
        f"layout: Fixed unidirectional, window {args.window} blocks of {args.block}, "
        f"density {density:.3f} (block-level); head 0:"
    )
    print(layout_text(layout[0], max_width=48))
    if args.png:
        save_layout_png(layout[:1], args.png, title=f"Fixed, L={args.seq_len}, block {args.block}")
        print(f"wrote {args.png}")
    runs = [train("sparse", sparse, args, device, dtype)]
    if not args.no_dense:
        runs.append(train("dense", DenseSparsityConfig(heads, args.block), args, device, dtype))
    print("\n| attention | loss first 10% -> last 10% | tokens/s | peak memory | time |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['name']} | {r['first']:.3f} -> {r['last']:.3f} | {r['tok_s']:,.0f} | "
            f"{r['peak']} | {r['seconds']:.1f} s |"
        )
    if not gpu:
        print(
            "(on CPU the reference backend computes every block densely: the speed and memory "
            "gains of the sparse layout show with the fused kernel on a CUDA GPU)"
        )
    return runs
