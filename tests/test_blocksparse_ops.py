"""DeepSpeed-compatible MatMul (sdd, dsd, dds) and Softmax, the compressed-format helpers,
and the unfused attention backend, against dense PyTorch references.

DeepSpeed's contract (matmul Z=3, H=2, M=128, N=256, K=192; softmax Z=2, H=4, widths 256 and
576) runs at full size on a GPU; under Triton's interpreter the shapes are smaller."""

import pytest
import torch

from blocksparse_attn import block_sparse_attention, reference_attention
from blocksparse_attn.compressed import to_dense, to_sparse
from blocksparse_attn.modules import SparseSelfAttention
from blocksparse_attn.ops.matmul import MatMul
from blocksparse_attn.ops.softmax import Softmax
from blocksparse_attn.patterns import FixedSparsityConfig

from helpers import DEVICE, assert_raises_with

pytestmark = pytest.mark.interpreter

TOL = {
    torch.float32: dict(rtol=5e-4, atol=5e-5),
    torch.float16: dict(rtol=3e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=2e-2),
}


def random_layout(h, r, c, rho=0.5):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(h, r, c, generator=g) < rho).long()


def op(t, trans):
    return t.transpose(-1, -2) if trans else t


def matmul_case(mode, trans_a, trans_b, block, dtype, Z, H, M, N, K):
    """Inputs, the MatMul and a dense reference function for one case."""
    torch.manual_seed(1)
    dev = DEVICE
    if mode == "sdd":
        layout = random_layout(H, M // block, N // block)
        a = torch.randn(Z, H, *((K, M) if trans_a else (M, K)), device=dev)
        b = torch.randn(Z, H, *((N, K) if trans_b else (K, N)), device=dev)
        ref = lambda a, b: to_sparse(op(a, trans_a) @ op(b, trans_b), layout, block)  # noqa: E731
    elif mode == "dsd":
        layout = random_layout(
            H, *((K // block, M // block) if trans_a else (M // block, K // block))
        )
        a = to_sparse(
            torch.randn(Z, H, layout.shape[1] * block, layout.shape[2] * block, device=dev),
            layout,
            block,
        )
        b = torch.randn(Z, H, *((N, K) if trans_b else (K, N)), device=dev)
        ref = lambda a, b: op(to_dense(a, layout, block), trans_a) @ op(b, trans_b)  # noqa: E731
    else:
        layout = random_layout(
            H, *((N // block, K // block) if trans_b else (K // block, N // block))
        )
        a = torch.randn(Z, H, *((K, M) if trans_a else (M, K)), device=dev)
        b = to_sparse(
            torch.randn(Z, H, layout.shape[1] * block, layout.shape[2] * block, device=dev),
            layout,
            block,
        )
        ref = lambda a, b: op(a, trans_a) @ op(to_dense(b, layout, block), trans_b)  # noqa: E731
    return layout, a.to(dtype), b.to(dtype), ref


def check_matmul(mode, trans_a, trans_b, block, dtype, Z, H, M, N, K):
    layout, a, b, ref = matmul_case(mode, trans_a, trans_b, block, dtype, Z, H, M, N, K)
    mm = MatMul(layout, block, mode, trans_a=trans_a, trans_b=trans_b)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = mm(a1, b1)
    dy = torch.rand_like(y)
    y.backward(dy)
    a2, b2 = a.double().requires_grad_(), b.double().requires_grad_()
    r = ref(a2, b2)
    r.backward(dy.double())
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), r, **tol)
    torch.testing.assert_close(a1.grad.double(), a2.grad, **tol)
    torch.testing.assert_close(b1.grad.double(), b2.grad, **tol)


@pytest.mark.parametrize("mode", ["sdd", "dsd", "dds"])
@pytest.mark.parametrize(
    "trans_a, trans_b", [(False, False), (False, True), (True, False), (True, True)]
)
def test_matmul_modes_and_transposes(mode, trans_a, trans_b):
    # K = 40 is not a multiple of 16: the kernels mask the reduction
    K = 40 if mode == "sdd" else 48
    check_matmul(mode, trans_a, trans_b, 16, torch.float32, 2, 2, 64, 96, K)


@pytest.mark.parametrize("mode", ["sdd", "dsd", "dds"])
@pytest.mark.parametrize("block", [32, 64])
def test_matmul_blocks_fp16(mode, block):
    check_matmul(mode, False, False, block, torch.float16, 2, 2, 128, 128, 64)


def test_matmul_fewer_dims_and_compressed_helpers():
    layout = random_layout(1, 4, 4)
    a = torch.randn(64, 32, device=DEVICE)
    b = torch.randn(32, 64, device=DEVICE)
    y = MatMul(layout, 16, "sdd")(a, b)
    assert y.shape == (int(layout.sum()), 16, 16)
    torch.testing.assert_close(
        to_dense(y[None], layout, 16)[0, 0],
        (a @ b) * layout[0].repeat_interleave(16, 0).repeat_interleave(16, 1).to(DEVICE),
    )
    dense = torch.randn(2, 1, 64, 64, device=DEVICE)
    back = to_dense(to_sparse(dense, layout, 16), layout, 16, fill=float("-inf"))
    keep = layout[0].bool().repeat_interleave(16, 0).repeat_interleave(16, 1).to(DEVICE)
    assert torch.equal(back[:, 0][:, keep], dense[:, 0][:, keep])
    assert bool(torch.isneginf(back[:, 0][:, ~keep]).all())


def dense_softmax(x, layout, block, scale, rpe, kpm, am):
    """DeepSpeed's test reference: -inf outside the layout, scale, + rpe + kp + 'mul' am."""
    d = to_dense(x, layout, block, fill=float("-inf")) * scale
    if rpe is not None:
        d = d + rpe
    if kpm is not None:
        d = d + kpm[:, None, None, :]
    if am is not None:
        d = d.masked_fill(am == 0, float("-inf"))
    m = d.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # rows with nothing: p = 0
    e = torch.exp(d - m)
    total = e.sum(-1, keepdim=True)
    return to_sparse(e / torch.where(total == 0, torch.ones_like(total), total), layout, block)


@pytest.mark.parametrize(
    "block, width, dtype",
    [(16, 64, torch.float32), (32, 96, torch.float16), (16, 80, torch.float16)],
)
def test_softmax_matches_deepspeed_reference(block, width, dtype):
    Z, H = 2, 2
    layout = random_layout(H, width // block, width // block, rho=0.6)
    layout[:, 0] = 0  # an empty row: zeros, no NaN
    x = torch.rand(Z, int(layout.sum()), block, block, device=DEVICE).to(dtype)
    rpe = torch.randn(1, H, width, width, device=DEVICE, dtype=dtype)
    kpm = torch.where(torch.rand(Z, width, device=DEVICE) < 0.2, float("-inf"), 0.0).to(dtype)
    am = (torch.rand(width, width, device=DEVICE) < 0.8).to(dtype)
    sm = Softmax(layout, block, inplace=False)
    x1, rpe1 = x.clone().requires_grad_(), rpe.clone().requires_grad_()
    y = sm(x1, scale=0.4, rpe=rpe1, key_padding_mask=kpm, attn_mask=am, attn_mask_mode="mul")
    assert not torch.isnan(y).any()
    dy = torch.rand_like(y)
    y.backward(dy)
    x2, rpe2 = x.double().requires_grad_(), rpe.double().requires_grad_()
    r = dense_softmax(x2, layout, block, 0.4, rpe2, kpm.double(), am.double())
    r.backward(dy.double())
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), r, **tol)
    torch.testing.assert_close(x1.grad.double(), x2.grad, **tol)
    torch.testing.assert_close(rpe1.grad.double(), rpe2.grad, **tol)
    torch.testing.assert_close(x, x1.detach())  # out of place: x unchanged


@pytest.mark.parametrize("causal, masks", [(False, True), (True, False), (True, True)])
def test_unfused_backend_equals_reference(causal, masks):
    torch.manual_seed(3)
    B, H, L, D = 2, 2, 96, 16
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, requires_grad=True) for _ in range(3))
    layout = random_layout(1, 6, 6, rho=0.5)  # shared by the heads
    kw = dict(block=16, causal=causal)
    if masks:
        kw["rpe"] = torch.randn(B, H, L, L, device=DEVICE, requires_grad=True)
        kpm = torch.zeros(B, L, device=DEVICE)
        kpm[1, -20:] = float("-inf")
        kw["key_padding_mask"] = kpm
        kw["attn_mask"] = torch.rand(L, L, device=DEVICE) < 0.9
    leaves = [q, k, v] + ([kw["rpe"]] if masks else [])
    out = block_sparse_attention(q, k, v, layout, backend="unfused", **kw)
    ref = reference_attention(q, k, v, layout, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g_out = torch.autograd.grad(out.square().sum(), leaves)
    g_ref = torch.autograd.grad(ref.square().sum(), leaves)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_module_get_ops_is_deepspeeds_triple():
    module = SparseSelfAttention(FixedSparsityConfig(2, 16, num_local_blocks=2), max_seq_length=128)
    sdd, dsd, softmax = module.get_ops(2, 64)
    assert module.get_ops(2, 64)[0] is sdd  # cached per instance
    q, k, v = (torch.randn(1, 2, 64, 16, device=DEVICE) for _ in range(3))
    out = dsd(softmax(sdd(q, k), scale=0.25), v)
    ref = reference_attention(q, k, v, module.get_layout(64), block=16)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="H must be sparsity_config.num_heads = 2"):
        module.get_ops(3, 64)


@pytest.mark.parametrize(
    "make, error, words",
    [
        (
            lambda: MatMul(torch.ones(1, 2, 2, dtype=torch.long), 16, "ssd"),
            NotImplementedError,
            ["mode must be 'sdd', 'dsd' or 'dds'"],
        ),
        (
            lambda: MatMul(torch.ones(1, 2, 2, dtype=torch.long), 8, "sdd"),
            ValueError,
            ["block must be one of 16, 32, 64, 128"],
        ),
        (lambda: MatMul(torch.ones(1, 2, 2), 16, "sdd"), ValueError, ["integer or bool"]),
        (
            lambda: MatMul(torch.ones(1, 2, 2, dtype=torch.long), 16, "sdd")(
                torch.randn(1, 1, 32, 16, device=DEVICE), torch.randn(1, 1, 8, 32, device=DEVICE)
            ),
            ValueError,
            ["matching inner sizes", "16 and 8"],
        ),
        (
            lambda: MatMul(torch.ones(1, 2, 2, dtype=torch.long), 16, "sdd")(
                torch.randn(1, 1, 48, 16, device=DEVICE), torch.randn(1, 1, 16, 32, device=DEVICE)
            ),
            ValueError,
            ["a must be a dense tensor [Z, 1, 32, .]"],
        ),
        (
            lambda: MatMul(torch.ones(1, 2, 2, dtype=torch.long), 16, "dsd")(
                torch.randn(1, 3, 16, 16, device=DEVICE), torch.randn(1, 1, 32, 8, device=DEVICE)
            ),
            ValueError,
            ["a must be a compressed tensor [Z, 4, 16, 16]"],
        ),
        (
            lambda: MatMul(torch.ones(1, 2, 2, dtype=torch.long), 16, "dds")(
                torch.randn(1, 1, 8, 32, device=DEVICE),
                torch.randn(1, 4, 16, 16, device=DEVICE).half(),
            ),
            ValueError,
            ["a, b must be of one dtype"],
        ),
        (
            lambda: Softmax(torch.ones(1, 2, 2, dtype=torch.long), 16)(
                torch.randn(1, 3, 16, 16, device=DEVICE)
            ),
            ValueError,
            ["x must be a compressed tensor"],
        ),
        (
            lambda: Softmax(torch.ones(1, 2, 2, dtype=torch.long), 16)(
                torch.randn(1, 4, 16, 16, device=DEVICE), key_padding_mask=torch.zeros(1, 31)
            ),
            ValueError,
            ["key_padding_mask must be of shape [Z, L_k] = [1, 32]"],
        ),
        (
            lambda: Softmax(torch.ones(1, 2, 2, dtype=torch.long), 16)(
                torch.randn(1, 4, 16, 16, device=DEVICE), attn_mask_mode="x"
            ),
            ValueError,
            ["attn_mask_mode"],
        ),
        (
            lambda: Softmax(torch.ones(1, 2, 2, dtype=torch.long), 16)(
                torch.randn(1, 4, 16, 16, device=DEVICE), rpe=torch.zeros(1, 2, 32, 32)
            ),
            ValueError,
            ["rpe must be broadcastable to [Z, H, L_q, L_k] = [1, 1, 32, 32]"],
        ),
    ],
)
def test_errors(make, error, words):
    assert_raises_with(error, words, make)


def test_unfused_refuses_with_reasons():
    q = torch.randn(1, 1, 32, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(NotImplementedError) as e:
        block_sparse_attention(
            q,
            q,
            q,
            torch.ones(1, 4, 4, dtype=torch.long),
            block=8,
            backend="unfused",
            return_lse=True,
        )
    msg = str(e.value)
    assert "dtype torch.float64" in msg and "block 8 is not one of" in msg
    assert "return_lse=True" in msg


# --- GPU: DeepSpeed's test contract at full size ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("mode", ["sdd", "dsd", "dds"])
@pytest.mark.parametrize(
    "trans_a, trans_b", [(False, False), (False, True), (True, False), (True, True)]
)
def test_gpu_matmul_contract(dtype, block, mode, trans_a, trans_b):
    # DeepSpeed's sizes; block 128 (beyond its grid) needs the sparse inner size K = 384
    check_matmul(mode, trans_a, trans_b, block, dtype, 3, 2, 128, 256, 192 if block < 128 else 384)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("width", [256, 576])
def test_gpu_softmax_contract(dtype, block, width):
    if width % block:
        pytest.skip("width must be a multiple of the block")
    Z, H = 2, 4
    layout = random_layout(H, width // block, width // block, rho=0.6)
    x = torch.rand(Z, int(layout.sum()), block, block, device="cuda").to(dtype)
    kpm = torch.where(torch.rand(Z, width, device="cuda") < 0.2, float("-inf"), 0.0).to(dtype)
    am = (torch.rand(width, width, device="cuda") < 0.6).to(dtype)
    x0 = x.clone().requires_grad_()
    x1 = x0 * 1  # in place, as DeepSpeed's: the gradient reaches what produced x1
    y = Softmax(layout, block)(
        x1, scale=0.4, key_padding_mask=kpm, attn_mask=am, attn_mask_mode="mul"
    )
    assert y is x1
    dy = torch.rand_like(y)
    y.backward(dy)
    x2 = x.double().requires_grad_()
    r = dense_softmax(x2, layout, block, 0.4, None, kpm.double(), am.double())
    r.backward(dy.double())
    torch.testing.assert_close(y.double(), r, **TOL[dtype])
    torch.testing.assert_close(x0.grad.double(), x2.grad, **TOL[dtype])
