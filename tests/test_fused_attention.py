"""The fused Triton kernel (forward and backward) against the fp64 reference.

On CPU the kernels run under Triton's interpreter (small shapes, fp32 and fp16); on a GPU
the ``gpu`` grid adds bf16, every head dim and block size, and long sequences."""

import pytest
import torch

from blocksparse_attn import block_sparse_attention
from blocksparse_attn.kernels.configs import Tiles

from attention_cases import (
    assert_lse_close,
    assert_within_rule,
    make_problem,
    max_err,
    poison,
    reference_lse,
    references,
)
from helpers import DEVICE

pytestmark = pytest.mark.interpreter

CPU_DTYPES = [torch.float32, torch.float16]


DESC = {"num_warps": 4, "num_stages": 2, "DESC": 1}


def run_and_check(
    monkeypatch,
    B,
    H,
    Lq,
    Lk,
    D,
    dtype,
    *,
    block,
    backward=True,
    tiles=None,
    bwd_tiles=None,
    config=None,
    **problem,
):
    """``config`` forces every attention kernel onto these launch options (``DESC``: the
    tensor-descriptor path); ``tiles`` forces the Triton kernels' tiles. Either keeps the
    Triton kernels on Hopper GPUs too (``BLOCKSPARSE_ATTN_SM90=0``), as they are what is
    being tested."""
    from blocksparse_attn.kernels import _common, fused_bwd, fused_fwd

    poison(monkeypatch)
    if config or tiles is not None:
        monkeypatch.setenv("BLOCKSPARSE_ATTN_SM90", "0")
    if config:

        def launch(kernel, grid, kwargs, _=None):
            _common.launch(kernel, grid, kwargs, config)

        monkeypatch.setattr(fused_fwd, "launch", launch)
        monkeypatch.setattr(fused_bwd, "launch", launch)
    if tiles is not None:
        monkeypatch.setattr(fused_fwd, "forward_tiles", lambda *_: tiles)
        monkeypatch.setattr(fused_bwd, "backward_tiles", lambda *_: bwd_tiles or (tiles, tiles))
    q, k, v, layout, kw = make_problem(B, H, Lq, Lk, D, dtype, DEVICE, block=block, **problem)
    leaves = [q, k, v] + ([kw["rpe"]] if "rpe" in kw else [])
    if backward:
        for t in leaves:
            t.requires_grad_()
    out, lse = block_sparse_attention(q, k, v, layout, backend="fused", return_lse=True, **kw)
    grad_out = torch.randn_like(out) if backward else None
    (ref64, g64), (lowp, glow) = references(q, k, v, layout, kw, grad_out)
    assert_within_rule("out", out, ref64, lowp)
    assert_lse_close(lse, reference_lse(q.detach(), k.detach(), v.detach(), layout, kw), dtype)
    if backward:
        grads = torch.autograd.grad(out, leaves, grad_out)
        for name, g, r, lo in zip(("dq", "dk", "dv", "drpe"), grads, g64, glow):
            assert g.shape == r.shape and g.dtype == lo.dtype
            assert_within_rule(name, g, r, lo)
    return out


# --- CPU (interpreter) and GPU: the core cases --------------------------------------------
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("density", [0.15, 0.5, 1.0])
@pytest.mark.parametrize("causal", [False, True])
def test_random_layouts(monkeypatch, dtype, density, causal):
    run_and_check(
        monkeypatch,
        2,
        3,
        128,
        128,
        32,
        dtype,
        block=16,
        density=density,
        causal=causal,
        empty_head=True,
    )


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "rpe, kpm, am",
    [
        ("full", "add", "mul"),
        ("broadcast", "mul", "add"),
        (None, "add", None),
        ("full", None, None),
    ],
)
def test_masks_and_rpe(monkeypatch, dtype, rpe, kpm, am):
    run_and_check(
        monkeypatch, 2, 2, 128, 128, 16, dtype, block=32, rpe=rpe, kpm=kpm, am=am, causal=am is None
    )


@pytest.mark.parametrize("block, D", [(16, 64), (32, 16), (64, 32), (128, 16)])
def test_blocks_and_head_dims(monkeypatch, block, D):
    run_and_check(monkeypatch, 1, 2, 256, 256, D, torch.float16, block=block, density=0.6)


@pytest.mark.parametrize(
    "tiles, bwd_tiles",
    [
        (Tiles(64, 32), None),
        (Tiles(32, 64), None),
        (Tiles(16, 16), None),
        (Tiles(64, 32), (Tiles(32, 64), Tiles(64, 32))),
    ],
)
def test_tile_shapes_over_small_blocks(monkeypatch, tiles, bwd_tiles):
    run_and_check(
        monkeypatch,
        1,
        2,
        128,
        128,
        16,
        torch.float32,
        block=16,
        causal=True,
        tiles=tiles,
        bwd_tiles=bwd_tiles,
        kpm="add",
    )


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "Lq, D, causal, kpm",
    [
        (128, 32, True, None),
        (208, 48, False, "mul"),
        (96, 64, False, None),
    ],
)
def test_tensor_descriptor_path(monkeypatch, dtype, Lq, D, causal, kpm):
    # ragged ends and a head dim below the tile width are the descriptors' zero fill
    run_and_check(
        monkeypatch,
        2,
        2,
        Lq,
        Lq,
        D,
        dtype,
        block=16 if Lq % 32 else 32,
        density=0.5,
        causal=causal,
        kpm=kpm,
        config=DESC,
    )


@pytest.mark.parametrize("layout_heads", [None, 1])
def test_programs_in_groups_cover_every_tile(monkeypatch, layout_heads):
    # groups of 4 lists over 6 (a short last group), and over 2 lists shared by 3 heads
    from blocksparse_attn.kernels import fused_bwd, fused_fwd

    monkeypatch.setattr(fused_fwd, "PROGRAM_GROUP", 4)
    monkeypatch.setattr(fused_bwd, "PROGRAM_GROUP", 4)
    run_and_check(
        monkeypatch,
        2,
        3,
        128,
        128,
        16,
        torch.float32,
        block=16,
        density=0.6,
        layout_heads=layout_heads,
        empty_row=False,
    )


@pytest.mark.parametrize(
    "density, causal, kpm, layout_heads, config",
    [
        (0.5, False, None, None, None),
        (1.0, True, None, 1, None),  # the forward's mask-free lead tiles split across parts
        (0.4, True, "add", None, None),  # natural units: maximum and sum kept apart
        (0.7, False, "mul", 1, DESC),
    ],
)
def test_long_lists_cut_into_parts(monkeypatch, density, causal, kpm, layout_heads, config):
    # every list longer than half the mean runs in parts, merged after
    from blocksparse_attn import index
    from blocksparse_attn.kernels import _common, fused_bwd, fused_fwd

    monkeypatch.setattr(index, "PART_MIN", 1)
    monkeypatch.setattr(index, "PART_OVER_MEAN", 0.5)
    cut = []  # parts per launch: the forward's rows, dK/dV's columns (twice), dQ's rows

    def part_slots(work, *args):
        cut.append(work.parts)
        return _common.part_slots(work, *args)

    monkeypatch.setattr(fused_fwd, "part_slots", part_slots)
    monkeypatch.setattr(fused_bwd, "part_slots", part_slots)
    run_and_check(
        monkeypatch,
        2,
        3,
        256,
        256,
        32,
        torch.float32,
        block=16,
        density=density,
        causal=causal,
        kpm=kpm,
        layout_heads=layout_heads,
        config=config,
    )
    assert len(cut) >= 4 and min(cut) > 0, cut  # every kernel ran parts and merged them


@pytest.mark.parametrize(
    "Lq, Lk, block, layout_heads, config",
    [
        (208, 336, 16, None, None),
        (384, 128, 64, 1, DESC),
    ],
)
def test_dense_layout_tiles_of_128_queries(monkeypatch, Lq, Lk, block, layout_heads, config):
    # the GPU's tile for dense layouts (128x64), with its mask-free loop over leading full
    # tiles, over ragged and rectangular lengths and programs grouped over 15 batch-heads
    run_and_check(
        monkeypatch,
        3,
        5,
        Lq,
        Lk,
        48,
        torch.float16,
        block=block,
        density=0.6,
        tiles=Tiles(128, 64),
        config=config,
        layout_heads=layout_heads,
    )


def test_rectangular_cross_attention(monkeypatch):
    run_and_check(monkeypatch, 2, 1, 64, 192, 32, torch.float32, block=32, density=0.7)


def test_ragged_length_and_odd_head_dim(monkeypatch):
    # L = 80 is a multiple of the block (16) but not of the 64-token tile; D = 40 is padded
    run_and_check(monkeypatch, 3, 1, 80, 80, 40, torch.float16, block=16, causal=True)


def test_layout_shared_by_heads(monkeypatch):
    run_and_check(monkeypatch, 1, 3, 128, 128, 16, torch.float32, block=32, layout_heads=1)


def test_fully_masked_rows_are_zero_not_nan(monkeypatch):
    poison(monkeypatch)
    q, k, v, layout, kw = make_problem(1, 2, 64, 64, 16, torch.float32, DEVICE, block=16)
    layout.fill_(1)
    layout[0, 2] = 0  # block-row 2 of head 0 attends nothing
    kpm = torch.zeros(1, 64, device=DEVICE)
    kpm[0, :] = float("-inf")
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = block_sparse_attention(q, k, v, layout, block=16, backend="fused", return_lse=True)
    assert bool((out[0, 0, 32:48] == 0).all()) and bool(torch.isneginf(lse[0, 0, 32:48]).all())
    out.sum().backward()
    assert bool((q.grad[0, 0, 32:48] == 0).all())
    for t in (q, k, v):
        t.grad = None
    out = block_sparse_attention(q, k, v, layout, block=16, backend="fused", key_padding_mask=kpm)
    assert bool((out == 0).all())
    out.sum().backward()
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any() and bool((t.grad == 0).all())


def test_two_dimensional_layout_is_compiled_once():
    from blocksparse_attn.index import _CACHE, frozen

    q, k, v, _, _ = make_problem(1, 2, 64, 64, 16, torch.float32, DEVICE, block=16)
    layout = (torch.rand(4, 4) < 0.7).long()  # [nb_q, nb_k]: one layout for every head
    layout[0, 0] = 1
    outs = [
        block_sparse_attention(q, k, v, layout, block=16, backend=b)
        for b in ("fused", "fused", "unfused", "unfused", "reference")
    ]
    # one private copy of the layout holds its density, index and unfused ops
    assert len([key for key in _CACHE if key[0] == id(frozen(layout))]) == 3
    for out in outs[:4]:
        torch.testing.assert_close(out, outs[4], atol=2e-5, rtol=1e-4)


def test_autotuning_key_holds_the_launch_size():
    """Every autotuned kernel keys its tuning on ``GRID_CLASS``, the bit length of its
    program count, which :func:`~blocksparse_attn.kernels._common.launch` passes: a choice
    made on a short sequence is not reused on one with many more programs."""
    from blocksparse_attn.kernels import blocksparse_matmul, fused_bwd, fused_fwd
    from blocksparse_attn.kernels._common import grid_class

    kernels = [fused_fwd._bsa_fwd_kernel, fused_bwd._bsa_bwd_dkdv_kernel]
    kernels += [fused_bwd._bsa_bwd_dq_kernel, blocksparse_matmul._sdd_kernel]
    kernels += [blocksparse_matmul._dsd_kernel, blocksparse_matmul._dds_kernel]
    for kernel in kernels:
        assert "GRID_CLASS" in kernel.keys and "GRID_CLASS" in kernel.fn.arg_names, kernel
    assert [grid_class(g) for g in ((1,), (2,), (3,), (1023,), (1024,), (8, 4, 2))] == [
        1,
        2,
        2,
        10,
        11,
        7,
    ]


@pytest.mark.gpu
def test_gpu_tuning_choices_per_launch_size(monkeypatch):
    """A short and a long call with the same kernel flags record two tuning choices, one
    for each launch's size class, each under the class of its own program count."""
    from blocksparse_attn.kernels import _common, fused_fwd

    monkeypatch.setattr(_common, "_TUNED", {})
    launched = []
    real = fused_fwd.launch
    monkeypatch.setattr(
        fused_fwd, "launch", lambda k, grid, *a: launched.append((k, grid)) or real(k, grid, *a)
    )
    for L in (256, 8192):
        q = torch.randn(1, 2, L, 64, device="cuda", dtype=torch.float16)
        layout = torch.ones(1, L // 64, L // 64, dtype=torch.long)
        block_sparse_attention(q, q, q, layout, block=64, backend="fused")
    grids = [grid for kernel, grid in launched if kernel.fn.__name__ == "_bsa_fwd_kernel"]
    chosen = [t["key"] for t in _common.tuned_options() if t["kernel"] == "_bsa_fwd_kernel"]
    assert [k["GRID_CLASS"] for k in chosen] == [_common.grid_class(g) for g in grids]
    assert len({k["GRID_CLASS"] for k in chosen}) == 2
    flags = [{n: v for n, v in k.items() if n != "GRID_CLASS"} for k in chosen]
    assert flags[1:] == flags[:1]  # the same kernel flags: only the size class differs


def test_noncontiguous_inputs(monkeypatch):
    poison(monkeypatch)
    x = torch.randn(2, 64, 3, 3, 16, device=DEVICE)  # [B, L, 3, H, D] packed qkv
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    layout = torch.ones(3, 4, 4, dtype=torch.int64)
    out = block_sparse_attention(q, k, v, layout, block=16, backend="fused")
    ref = block_sparse_attention(q, k, v, layout, block=16, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --- backend choice and errors --------------------------------------------------------------
def test_auto_backend_on_cpu_is_reference():
    q, k, v, layout, kw = make_problem(1, 1, 32, 32, 16, torch.float64, "cpu", block=16)
    out = block_sparse_attention(q, k, v, layout, **kw)
    assert out.dtype == torch.float64


def test_fused_refuses_with_every_reason():
    q, k, v, layout, kw = make_problem(1, 1, 32, 32, 512, torch.float64, DEVICE, block=16)
    with pytest.raises(NotImplementedError) as e:
        block_sparse_attention(q, k, v, layout, backend="fused", **kw)
    msg = str(e.value)
    assert "backend='fused' cannot run" in msg
    assert "dtype torch.float64 is not supported" in msg and "head dim 512 > 256" in msg
    assert "backend='reference'" in msg


def test_fused_refuses_backward_head_dim():
    q, k, v, layout, kw = make_problem(1, 1, 32, 32, 256, torch.float16, DEVICE, block=16)
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="head dim 256 > 128 needs a gradient"):
        block_sparse_attention(q, k, v, layout, backend="fused", **kw)


def test_fused_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, layout, kw = make_problem(1, 1, 32, 32, 16, torch.float32, "cpu", block=16)
    with pytest.raises(NotImplementedError, match="Triton's interpreter is off"):
        block_sparse_attention(q, k, v, layout, backend="fused", **kw)


def test_unknown_backend():
    q, k, v, layout, kw = make_problem(1, 1, 32, 32, 16, torch.float32, "cpu", block=16)
    with pytest.raises(
        ValueError, match="backend must be one of 'auto', 'fused', 'unfused', 'reference'"
    ):
        block_sparse_attention(q, k, v, layout, backend="triton", **kw)


def test_deterministic_must_be_a_bool():
    q, k, v, layout, kw = make_problem(1, 1, 32, 32, 16, torch.float32, "cpu", block=16)
    with pytest.raises(TypeError, match="deterministic must be True or False, got 'yes'"):
        block_sparse_attention(q, k, v, layout, deterministic="yes", **kw)


def test_nondeterministic_backward_changes_nothing_outside_hopper():
    """``deterministic=False`` only changes the Hopper backward: elsewhere (here head dim
    16, block 16) the gradients are the deterministic ones, bit for bit."""
    torch.manual_seed(4)
    layout = torch.tensor([[[1, 0, 0], [1, 1, 0], [0, 1, 1]]])
    leaves = [torch.randn(1, 2, 48, 16, device=DEVICE, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(1, 2, 48, 16, device=DEVICE)
    results = []
    for deterministic in (True, False):
        out, lse = block_sparse_attention(
            *leaves,
            layout,
            block=16,
            causal=True,
            backend="fused",
            return_lse=True,
            deterministic=deterministic,
        )
        results.append(torch.autograd.grad((out, lse.sum()), leaves, (grad_out, None)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_custom_op_registered_with_fake():
    import blocksparse_attn.ops.fused_attention  # noqa: F401

    op = torch.ops.blocksparse_attn.fused_attention_fwd
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 64, 16, dtype=torch.float16)
        layout = torch.ones(3, 4, 4, dtype=torch.int64)
        out, lse = op(q, q, q, layout, None, None, None, 16, 0.25, False, False, True)
        assert out.shape == (2, 3, 64, 16) and out.dtype == torch.float16
        assert lse.shape == (2, 3, 64) and lse.dtype == torch.float32
    x = [torch.randn(1, 1, 32, 16, device=DEVICE) for _ in range(3)]
    torch.library.opcheck(
        op,
        (
            *x,
            torch.ones(1, 2, 2, dtype=torch.int64, device=DEVICE),
            None,
            None,
            None,
            16,
            0.25,
            False,
            False,
            True,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(  # the backward's option, kept for it
        op,
        (*x, torch.ones(1, 2, 2, dtype=torch.int64, device=DEVICE), None, None, None)
        + (16, 0.25, False, False, True, False),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_eager_function_matches_custom_op():
    """Eager mode skips the custom-op dispatch; both run the same kernels, so outputs and
    gradients (including rpe's) agree bit for bit."""
    from blocksparse_attn.ops.fused_attention import _EagerFusedAttention, fused_attention_fwd

    torch.manual_seed(0)
    layout = torch.tensor([[[1, 0], [1, 1]]])
    leaves = [torch.randn(1, 1, 32, 16, device=DEVICE, requires_grad=True) for _ in range(3)]
    rpe = torch.randn(1, 1, 32, 32, device=DEVICE, requires_grad=True)
    results = []
    for fn in (fused_attention_fwd, _EagerFusedAttention.apply):
        out, _ = fn(*leaves, layout, rpe, None, None, 16, 0.25, True, False, True)
        grads = torch.autograd.grad(out.square().sum(), (*leaves, rpe))
        results.append((out, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    results = []  # through the row statistics too (the log-sum-exp's gradient)
    for fn in (fused_attention_fwd, _EagerFusedAttention.apply):
        out, stats = fn(*leaves, layout, None, None, None, 16, 0.25, False, False, True)
        results.append(torch.autograd.grad(out.square().sum() + stats.sum(), leaves))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_lse_gradient_under_torch_compile():
    # the custom ops' autograd (what torch.compile traces) takes the log-sum-exp's gradient
    torch.manual_seed(2)
    leaves = [torch.randn(1, 2, 64, 16, device=DEVICE, requires_grad=True) for _ in range(3)]
    layout = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]]])

    def loss(q, k, v):
        out, lse = block_sparse_attention(
            q, k, v, layout, block=16, causal=True, backend="fused", return_lse=True
        )
        return out.square().sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    eager = torch.autograd.grad(loss(*leaves), leaves)
    for a, e in zip(compiled, eager):
        assert max_err(a, e) < 1e-5


@pytest.mark.parametrize(
    "kpm, causal, only_lse",
    [(None, False, False), ("add", True, False), ("mul", False, True), (None, True, True)],
)
def test_lse_gradient(monkeypatch, kpm, causal, only_lse):
    # a loss of the output and the log-sum-exp (or of the log-sum-exp alone), against fp64;
    # with a mask the statistics are kept as maximum and log2 sum (natural units)
    poison(monkeypatch)
    q, k, v, layout, kw = make_problem(
        2, 2, 96, 128, 16, torch.float32, DEVICE, block=16, kpm=kpm, causal=causal
    )
    leaves = [t.requires_grad_() for t in (q, k, v)]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 2, 96, generator=g).to(DEVICE)
    grads = []
    for backend, dtype in (("fused", torch.float32), ("reference", torch.float64)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        out, lse = block_sparse_attention(*inputs, layout, backend=backend, return_lse=True, **kw)
        finite = lse.isfinite()  # rows with nothing to attend: -inf, no gradient
        loss = (torch.where(finite, lse, 0.0) * w).sum()
        if not only_lse:
            loss = loss + out.square().sum()
        got = torch.autograd.grad(loss, inputs, allow_unused=True)  # lse alone: no dv
        grads.append([torch.zeros_like(t) if d is None else d for t, d in zip(inputs, got)])
    for name, got, want in zip("qkv", *grads):
        assert got.isfinite().all(), name
        assert torch.allclose(got.double(), want, atol=2e-4, rtol=1e-3), (
            name,
            (got.double() - want).abs().max(),
        )


# --- GPU grid -------------------------------------------------------------------------------
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("D", [16, 32, 64, 96, 128])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_gpu_grid(monkeypatch, dtype, D, block):
    run_and_check(
        monkeypatch,
        3,
        5,
        512,
        512,
        D,
        dtype,
        block=block,
        density=0.4,
        causal=block in (16, 64),
        kpm="add" if block == 32 else None,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("D", [32, 96, 128])
@pytest.mark.parametrize("block", [16, 128])
def test_gpu_tensor_descriptor_grid(monkeypatch, dtype, D, block):
    run_and_check(
        monkeypatch,
        2,
        3,
        640,
        640,
        D,
        dtype,
        block=block,
        density=0.4,
        causal=block == 16,
        config=DESC,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "D, block, causal, desc", [(128, 128, True, 1), (64, 32, False, 0), (96, 64, True, 0)]
)
def test_gpu_register_capped_configs(monkeypatch, dtype, D, block, causal, desc):
    # 8 warps at 128 registers a thread may spill: the results must not change
    config = {"num_warps": 8, "num_stages": 2, "DESC": desc, "maxnreg": 128}
    run_and_check(
        monkeypatch,
        2,
        3,
        640,
        640,
        D,
        dtype,
        block=block,
        density=0.5,
        causal=causal,
        tiles=Tiles(128, 64),
        bwd_tiles=(Tiles(64, 64), Tiles(128, 64)),
        config=config,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 64, 128])
def test_gpu_head_dim_256_forward(monkeypatch, dtype, block):
    run_and_check(monkeypatch, 1, 3, 512, 512, 256, dtype, block=block, backward=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "L, block, causal", [(2048, 64, True), (8192, 128, False), (4096, 16, True)]
)
def test_gpu_long_sequences(monkeypatch, dtype, L, block, causal):
    run_and_check(
        monkeypatch, 1, 3, L, L, 64, dtype, block=block, density=0.1, causal=causal, layout_heads=1
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_masks_rpe_rectangular(monkeypatch, dtype):
    run_and_check(
        monkeypatch, 3, 3, 384, 640, 64, dtype, block=64, rpe="broadcast", kpm="mul", am="add"
    )


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    q, k, v, layout, kw = make_problem(
        2, 4, 1024, 1024, 64, torch.bfloat16, "cuda", block=64, density=0.3, rpe="broadcast"
    )
    leaves = [
        q.requires_grad_(),
        k.requires_grad_(),
        v.requires_grad_(),
        kw["rpe"].requires_grad_(),
    ]
    grad_out = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = block_sparse_attention(q, k, v, layout, backend="fused", **kw)
        runs.append(torch.autograd.grad(out, leaves, grad_out))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    q, k, v, layout, kw = make_problem(
        2, 4, 512, 512, 64, torch.float16, "cuda", block=64, density=0.5, causal=True
    )
    layout = layout.cuda()

    def f(q, k, v):
        return block_sparse_attention(q, k, v, layout, backend="fused", **kw).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss_c = compiled(*leaves)
    loss_e = f(*eager_leaves)
    torch.testing.assert_close(loss_c, loss_e)
    loss_c.backward()
    loss_e.backward()
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_availability_reasons_name_the_device():
    from blocksparse_attn.kernels.availability import kernel_unavailable_reasons

    assert (
        "device type 'meta' is not supported by the kernels (CUDA only)"
        in kernel_unavailable_reasons("meta")
    )


def test_descriptor_eligibility_and_pruning():
    import triton

    from blocksparse_attn.kernels import _common

    x = torch.randn(2, 3, 64, 32, device=DEVICE, dtype=torch.float16)
    hopper = _common.interpreting() or torch.cuda.get_device_capability()[0] >= 9
    assert _common.descriptors_allowed(x, x) == hopper
    narrow = torch.randn(2, 3, 64, 4, device=DEVICE, dtype=torch.float16)  # 8-byte rows
    shifted = torch.randn(x.numel() + 1, device=DEVICE, dtype=torch.float16)[1:].view(x.shape)
    assert not _common.descriptors_allowed(narrow)
    assert not _common.descriptors_allowed(x, shifted)  # base address off by 2 bytes
    configs = [triton.Config({"DESC": d}, num_warps=4) for d in (0, 1)]
    kept = _common.prune_descriptors(configs, {}, ALLOW_DESC=False)
    assert [c.kwargs["DESC"] for c in kept] == [0]
    assert _common.prune_descriptors(configs, {}, ALLOW_DESC=True) == configs


def test_scratch_allocator_is_set_only_where_none_is():
    import threading

    import triton
    from triton.runtime._allocation import NullAllocator, _allocator

    from blocksparse_attn.kernels import _common

    seen = {}

    def fresh_thread():  # a new thread starts without an allocator (autograd's, for one)
        seen["none"] = isinstance(_allocator.get(), NullAllocator)
        _common._ensure_allocator()
        seen["ours"] = _allocator.get() is _common._scratch

        def mine(size, alignment, stream):
            return None

        triton.set_allocator(mine)
        _common._ensure_allocator()
        seen["kept"] = _allocator.get() is mine

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert seen == {"none": True, "ours": True, "kept": True}
