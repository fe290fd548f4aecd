"""Experiment (CPU): the PyTorch operations one packed forward+backward dispatches, per
source function. The bench varlen suite's 16 documents packed to 131072 tokens, block 64,
causal window_global per document, but 2 heads of dimension 16 (bf16) on CPU tensors with
the attention kernel launches stubbed out and the tile shapes chosen as on a GPU: only the
work around the kernels runs. Each
operation is counted once (``TorchDispatchMode``) against the innermost blocksparse_attn
function that called it, for a batch not seen before and for the same batch again (a
model's next layer). On a GPU each is a host-side dispatch and most a kernel launch.
The argument ``callable`` passes the pattern as a callable instead of a config.

    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/experiments/varlen_host_ops.py config
"""

import collections
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import blocksparse_attn.kernels.configs as configs
import blocksparse_attn.kernels.fused_bwd as fused_bwd
import blocksparse_attn.kernels.fused_fwd as fused_fwd
import blocksparse_attn.varlen as varlen
from blocksparse_attn.tools.bench_cases import pattern_layout, window_global_config
from blocksparse_attn.tools.bench_serving import document_lengths
from blocksparse_attn.varlen import block_sparse_attention_varlen

TOTAL, DOCS, HEADS, HEAD_DIM, BLOCK = 131072, 16, 2, 16, 64


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class Sites(TorchDispatchMode):
    """Counts dispatched operations by the innermost blocksparse_attn function calling."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for frame in reversed(traceback.extract_stack()[:-1]):
            if "blocksparse_attn" in frame.filename:
                name = frame.filename.split("blocksparse_attn/")[-1]
                self.sites[f"{name} {frame.name}"] += 1
                break
        else:
            self.sites["(outside the package)"] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else "config"
    for module in (fused_fwd, fused_bwd):
        module.launch = lambda *args, **kwargs: None
    configs.interpreting = lambda: False  # tile shapes (and so index builds) as on a GPU
    fused_bwd._bsa_bwd_delta_kernel = _NoLaunch()
    lengths = document_lengths(TOTAL, DOCS, 1024, 16384, BLOCK)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    leaves = [
        torch.randn(TOTAL, HEADS, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    ]
    grad_out = torch.randn(TOTAL, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    if source == "config":
        layout = window_global_config(BLOCK)
    else:

        def layout(n, device):
            return pattern_layout("window_global", n, BLOCK)

    def step():
        out = block_sparse_attention_varlen(
            *leaves, cu, cu, layout, block=BLOCK, causal=True, max_seqlen_q=16384, backend="fused"
        )
        torch.autograd.grad(out, leaves, grad_out)

    step()  # the config's lists made and cached per length, as after a first batch
    for case in ("a new batch", "the same batch again"):
        if case == "a new batch":
            getattr(varlen, "forget_packings", lambda: None)()  # as if the offsets were new
        with Sites() as counter:
            step()
        print(f"{source}, {case}: {sum(counter.sites.values())} operations dispatched")
        for site, count in counter.sites.most_common(8):
            print(f"  {count:4d}  {site}")


if __name__ == "__main__":
    main()
