"""Experiment (GPU host): what one eager ``block_sparse_attention`` step costs the host,
piece by piece, on the Hopper path (block 128, head dim 128, bf16).

First each piece alone, called in a loop and timed on the host before synchronising
(median and least of seven batches; the GPU work of every piece is shorter than its host
work at these sizes, so the launch queue never fills): the whole step, the library's
layers under it (the kernels' entry points with a built index), one launch through
Triton's ``JITFunction.run`` and straight through the compiled kernel, a TMA descriptor,
an allocation, the index lookup, an empty ``autograd.Function``. Then the same pieces
inside real steps, each wrapped by a timer that adds up its host time, since in a loop of
its own the host runs a piece faster than within the whole step. Last, the step with the
kernels' entry points returning results made before (the layers above the kernels).
``CASE=random`` (default: random 2% plus the diagonal, L8192 B2 H8, the bench row) or
``CASE=window`` (window_global L16384 B2 H8). Prints one line a piece (microseconds).

    CASE=window PYTHONPATH=src python3 benchmarks/experiments/host_costs.py
"""

import os
import time

import torch

from blocksparse_attn import block_sparse_attention
from blocksparse_attn.index import frozen, get_index
from blocksparse_attn.kernels import fused_bwd, fused_fwd, sm90_fwd
from blocksparse_attn.kernels._common import schedule_args
from blocksparse_attn.kernels.sm90_bwd import sm90_dkdv, sm90_dq
from blocksparse_attn.kernels.sm90_common import descriptor
from blocksparse_attn.kernels.sm90_fwd import _sm90_fwd_kernel, sm90_forward
from blocksparse_attn.tools.bench_cases import pattern_layout

N = int(os.environ.get("N", "300"))
CASE = os.environ.get("CASE", "random")
torch.manual_seed(0)
if CASE == "random":
    B, H, L = 2, 8, 8192
    nb = L // 128
    LAYOUT = (torch.rand(H, nb, nb) < 0.02).long()
    LAYOUT[:, torch.arange(nb), torch.arange(nb)] = 1
else:
    B, H, L = 2, 8, 16384
    LAYOUT = pattern_layout("window_global", L, 128)
D, BLOCK = 128, 128
SCALE = D**-0.5
q, k, v = (
    torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(3)
)
grad_out = torch.randn_like(q)


def host_us(fn) -> tuple[float, float]:
    """Median and least of 7 batches' issue time a call (microseconds)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    batches = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(N // 7):
            fn()
        batches.append((time.perf_counter() - t) / (N // 7) * 1e6)
        torch.cuda.synchronize()
    batches.sort()
    return batches[3], batches[0]


def row(name, fn):
    median, least = host_us(fn)
    print(f"{name:58s} {median:8.1f} us (least {least:7.1f})", flush=True)


def step():
    out = block_sparse_attention(q, k, v, LAYOUT, block=BLOCK)
    torch.autograd.grad(out, (q, k, v), grad_out)


with torch.no_grad():
    row(
        "block_sparse_attention, no grad",
        lambda: block_sparse_attention(q, k, v, LAYOUT, block=BLOCK),
    )
row(
    "block_sparse_attention, inputs need grad",
    lambda: block_sparse_attention(q, k, v, LAYOUT, block=BLOCK),
)
row("forward + backward step", step)

lay = frozen(LAYOUT)
qd, kd, vd = (t.detach() for t in (q, k, v))
out, lse = fused_fwd.fused_attention_forward(qd, kd, vd, lay, block=BLOCK, scale=SCALE)
index = get_index(lay, BLOCK, q_len=L, k_len=L, tile_m=128, tile_n=128, device=q.device)
sched = schedule_args(lay, index, B, H)
delta = torch.empty(B, H, L, device="cuda")
print(
    f"index: row items {index.rows.items.shape[0]}, parts {index.rows.parts}, "
    f"col items {index.cols.items.shape[0]}, parts {index.cols.parts}"
)
row(
    "fused_attention_forward (kernels layer)",
    lambda: fused_fwd.fused_attention_forward(qd, kd, vd, lay, block=BLOCK, scale=SCALE),
)
row(
    "fused_attention_backward (kernels layer)",
    lambda: fused_bwd.fused_attention_backward(
        grad_out, qd, kd, vd, out, lse, lay, block=BLOCK, scale=SCALE
    ),
)
row(
    "sm90_forward (one launch, descriptors, buffers)",
    lambda: sm90_forward(qd, kd, vd, index, sched, causal=False, scale=SCALE),
)
bwd_args = (qd, kd, vd, grad_out, lse, delta, index, sched)
row("sm90_dkdv", lambda: sm90_dkdv(*bwd_args, causal=False, scale=SCALE))
row("sm90_dq", lambda: sm90_dq(*bwd_args, causal=False, scale=SCALE))
row(
    "get_index (cached)",
    lambda: get_index(lay, BLOCK, q_len=L, k_len=L, tile_m=128, tile_n=128, device=q.device),
)
row("frozen (CPU layout compared)", lambda: frozen(LAYOUT))
row(
    "sm90_backward_plan",
    lambda: fused_bwd.sm90_backward_plan(qd, kd, vd, grad_out, lay, block=BLOCK, causal=False),
)
row("descriptor", lambda: descriptor(qd, 128))
row("torch.empty [B, H, L] fp32", lambda: torch.empty(B, H, L, device="cuda"))
row(
    "torch.empty [B, H, L, D] bf16",
    lambda: torch.empty(B, H, L, D, device="cuda", dtype=torch.bfloat16),
)

# one forward launch, its arguments as sm90_forward passes them: Triton's
# JITFunction.run against the compiled kernel's launcher
captured = {}


class Recorder:
    def __getitem__(self, grid):
        def record(*args, **kwargs):
            captured.update(grid=grid, args=args, kwargs=kwargs)
            return _sm90_fwd_kernel[grid](*args, **kwargs)

        return record


sm90_fwd._sm90_fwd_kernel = Recorder()
sm90_forward(qd, kd, vd, index, sched, causal=False, scale=SCALE)
sm90_fwd._sm90_fwd_kernel = _sm90_fwd_kernel
grid, fwd_args, consts = captured["grid"], captured["args"], captured["kwargs"]
compiled = _sm90_fwd_kernel[grid](*fwd_args, **consts)
row("forward launch: kernel[grid](...)", lambda: _sm90_fwd_kernel[grid](*fwd_args, **consts))
stream = torch.cuda.current_stream().cuda_stream
all_args = (*fwd_args, *consts.values())
assert len(all_args) == len(_sm90_fwd_kernel.arg_names)


def direct():
    compiled.run(
        grid[0],
        1,
        1,
        stream,
        compiled.function,
        compiled.packed_metadata,
        None,
        None,
        None,
        *all_args,
    )


row("forward launch: compiled.run(...) directly", direct)
row(
    "forward launch: 4 descriptors + compiled.run",
    lambda: ([descriptor(t, 128) for t in (qd, kd, vd, out)], direct()),
)


def delta_launch():
    fused_bwd.row_delta(out, grad_out)


row("row_delta (one Triton launch, 4 tensors by matrix_args)", delta_launch)


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def identity_step():
    o = Identity.apply(q, k, v)
    torch.autograd.grad(o, (q,), grad_out)


row("empty autograd.Function forward + backward", identity_step)

# the same pieces inside real steps: each wrapped by a timer that adds up its calls'
# host time (inclusive), so that they are measured where the step runs them (in a loop of
# their own the host runs a piece faster than within the whole step)
spent = {}


def timed(owner, name, label):
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t

    setattr(owner, name, wrapper)
    return fn


from triton.backends.nvidia.driver import CudaLauncher  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from blocksparse_attn.kernels import _common, sm90_bwd  # noqa: E402
from blocksparse_attn.ops import fused_attention as ops  # noqa: E402

saved = [
    (owner, name, timed(owner, name, label))
    for owner, name, label in (
        (torch.autograd, "grad", "torch.autograd.grad (the backward)"),
        (ops, "_forward", "ops._forward"),
        (fused_fwd, "fused_attention_forward", "fused_attention_forward"),
        (fused_fwd, "_merge_cut_rows", "fwd merge of cut rows"),
        (sm90_fwd, "sm90_forward", "sm90_forward"),
        (ops, "_gradients", "ops._gradients"),
        (fused_bwd, "fused_attention_backward", "fused_attention_backward"),
        (sm90_bwd, "sm90_dkdv", "sm90_dkdv"),
        (sm90_bwd, "sm90_dq", "sm90_dq"),
        (sm90_bwd, "_sum_columns", "sm90_bwd._sum_columns"),
        (sm90_bwd, "sum_parts", "sum_parts (all)"),
        (JITFunction, "run", "JITFunction.run (all launches)"),
        (CudaLauncher, "__call__", "CudaLauncher.__call__ (all launches)"),
        (sm90_fwd, "descriptor", "descriptor (all)"),
        (sm90_bwd, "descriptor", "descriptor (all)"),
        (sm90_fwd, "empty", "_common.empty (all)"),
        (sm90_bwd, "empty", "_common.empty (all)"),
        (fused_fwd, "empty", "_common.empty (all)"),
        (fused_bwd, "empty", "_common.empty (all)"),
        (_common, "empty", "_common.empty (all)"),
    )
]
for _ in range(5):
    step()
torch.cuda.synchronize()
spent.clear()
t0 = time.perf_counter()
for _ in range(N):
    step()
total = time.perf_counter() - t0
torch.cuda.synchronize()
print(f"in place, {N} steps: {total / N * 1e6:.1f} us a step")
for label, secs in spent.items():
    print(f"    {label:54s} {secs / N * 1e6:8.1f} us a step")
for owner, name, fn in saved:
    setattr(owner, name, fn)


# the layers above the kernels: the step with the kernels' entry points returning
# results made before
grads = fused_bwd.fused_attention_backward(
    grad_out, qd, kd, vd, out, lse, lay, block=BLOCK, scale=SCALE
)
fused_fwd.fused_attention_forward = lambda *a, **kw: (out, lse)
with torch.no_grad():
    row(
        "block_sparse_attention, no grad, kernels layer stubbed",
        lambda: block_sparse_attention(q, k, v, LAYOUT, block=BLOCK),
    )
fused_bwd.fused_attention_backward = lambda *a, **kw: grads
row("forward + backward step, kernels layer stubbed", step)
torch.cuda.synchronize()
print("card:", torch.cuda.get_device_name(), "torch", torch.__version__)
