"""One sequence split across processes: each rank holds a shard, attention runs on the
whole sequence, each rank gets its shard of the output and of the gradients. Both
strategies, then the key/value exchange with the balanced shard order, which evens out the
causal layout's work between the ranks.

    torchrun --nproc-per-node 2 examples/context_parallel.py

NCCL on GPUs (one per rank), gloo on CPUs.
"""

import torch
import torch.distributed as dist

from blocksparse_attn import FixedSparsityConfig
from blocksparse_attn.distributed import (
    context_parallel_attention,
    shard_sequence,
    shard_work,
    unshard_sequence,
)


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    L, H, D, block = 4096, 8, 64, 64
    layout = FixedSparsityConfig(H, block, num_local_blocks=4, attention="unidirectional")
    layout = layout.make_layout(L)  # the whole layout, the same on every rank
    torch.manual_seed(0)  # the same full tensors everywhere; each rank keeps its shard
    whole = [torch.randn(1, H, L, D, device=device) for _ in range(3)]
    P = dist.get_world_size()
    runs = [("all_to_all", "contiguous"), ("kv_exchange", "contiguous")]
    runs.append(("kv_exchange", "balanced"))
    for strategy, order in runs:
        q, k, v = (shard_sequence(t, order=order).requires_grad_() for t in whole)
        out = context_parallel_attention(
            q, k, v, layout, block=block, causal=True, strategy=strategy, order=order
        )
        out.square().mean().backward()
        full = unshard_sequence(out.detach(), order=order)
        if rank == 0:
            line = (
                f"{strategy}, {order} shards: output {tuple(full.shape)}, |out| {full.norm():.4f}"
            )
            if strategy == "kv_exchange":  # each rank computes its own rows' kept blocks
                line += f", blocks per rank {shard_work(layout, P, order, causal=True)}"
            print(line)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
