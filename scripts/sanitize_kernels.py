"""Run every attention kernel once on odd shapes, for ``compute-sanitizer`` (memcheck):
lengths that are not multiples of the tile, L_q != L_k, head dims 96 and 40, block 16
(sub-block masks) and 64, grouped K/V heads, every mask in both modes, rpe with its
gradient, causal, long lists cut into parts, top-k block lists (the index built by its
Triton kernel), packed variable-length sequences, a paged KV cache, the Gluon forward and
backward on sm90; the fused kernels through pointers and through tensor descriptors
(Hopper), the unfused operators.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_kernels.py

Run from the repository root with ``PYTHONPATH=src`` on a CUDA machine; name sections
(``fused parts topk hopper varlen decode``) to run only those. Prints one line per case and
exits non-zero if a result is not finite (the sanitizer reports memory errors).
"""

from __future__ import annotations

import sys

import torch

from blocksparse_attn import block_sparse_attention
from blocksparse_attn._inputs import check_attention_inputs
from blocksparse_attn.kernels.fused_bwd import fused_attention_backward
from blocksparse_attn.kernels.fused_fwd import fused_attention_forward

CASES = [  # B, H, H_kv, L_q, L_k, D, block, causal
    (2, 3, 3, 80, 80, 96, 16, True),
    (1, 2, 1, 208, 336, 40, 16, False),
    (2, 1, 1, 192, 320, 64, 64, False),
    (1, 4, 2, 144, 144, 128, 16, True),
]


def problem(B, H, Hkv, Lq, Lk, D, block, causal, dtype, modes):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B, h, n, D, device="cuda", generator=g).to(dtype)
        for h, n in ((H, Lq), (Hkv, Lk), (Hkv, Lk))
    )
    layout = (torch.rand(H, Lq // block, Lk // block, device="cuda", generator=g) < 0.5).long()
    layout[:, :, 0] = 1
    kpm_mode, am_mode = modes
    kpm = torch.zeros(B, Lk, device="cuda")
    kpm[:, -7:] = float("-inf")
    if kpm_mode == "mul":
        kpm = (kpm == 0).to(torch.int32)
    am = torch.randn(Lq, Lk, device="cuda").clamp(max=0.5)
    if am_mode == "mul":
        am = am > -1.0
    rpe = torch.randn(1, H, Lq, Lk, device="cuda", dtype=dtype)
    return (
        q,
        k,
        v,
        layout,
        dict(
            block=block,
            causal=causal,
            rpe=rpe,
            key_padding_mask=kpm,
            attn_mask=am,
            key_padding_mask_mode=kpm_mode,
            attn_mask_mode=am_mode,
        ),
    )


def fused_case(case, dtype, modes) -> bool:
    """Both fused kernels through pointers and descriptors, then the unfused operators."""
    q, k, v, layout, kw = problem(*case, dtype, modes)
    x = check_attention_inputs("sanitize", q, k, v, layout, **kw)
    args = dict(
        block=x.block,
        scale=x.scale,
        causal=x.causal,
        rpe=x.rpe,
        key_padding_mask=x.key_padding_mask,
        attn_mask=x.attn_mask,
        key_padding_mask_mode=x.key_padding_mask_mode,
        attn_mask_mode=x.attn_mask_mode,
    )
    results = []
    for desc in (0, 1):
        config = {"num_warps": 4, "num_stages": 2, "DESC": desc}
        out, stats = fused_attention_forward(q, k, v, layout, config=config, **args)
        grads = fused_attention_backward(
            torch.randn_like(out),
            q,
            k,
            v,
            out,
            stats,
            layout,
            bias_grads=(True, modes[0] == "add", modes[1] == "add"),
            configs=(config, config),
            **args,
        )
        results += [out, *(g for g in grads if g is not None)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_sparse_attention(*leaves, layout, backend="unfused", **kw)
    results += [out, *torch.autograd.grad(out.float().sum(), leaves)]
    torch.cuda.synchronize()
    return all(bool(torch.isfinite(r).all()) for r in results)


def _fused() -> int:
    """Both fused kernels and the unfused operators on every case, fp16 and bf16 in turn,
    the masks in both modes."""
    bad = 0
    for n, case in enumerate(CASES):
        for dtype in (torch.float16, torch.bfloat16)[n % 2 :][:1]:  # fp16 and bf16 in turn
            for modes in (("add", "mul"), ("mul", "add")):
                finite = fused_case(case, dtype, modes)
                bad += not finite
                print(
                    f"{case} {dtype} masks {modes}: {'ok' if finite else 'NOT FINITE'}", flush=True
                )
    return bad


def _parts() -> int:
    """Every list longer than half the mean cut into parts (partial results, merge
    kernels)."""
    from blocksparse_attn import index

    bad = 0
    index.PART_MIN, index.PART_OVER_MEAN = 1, 0.5
    for case in (CASES[0], CASES[3]):
        finite = fused_case(case, torch.float16, ("add", "mul"))
        bad += not finite
        print(f"{case} lists in parts: {'ok' if finite else 'NOT FINITE'}", flush=True)
    index.PART_MIN, index.PART_OVER_MEAN = 64, 4
    return bad


def _topk() -> int:
    """Top-k lists per sample, their index built by the Triton builder (block 128,
    64-tiles)."""
    from blocksparse_attn import topk_blocks
    from blocksparse_attn.index_dynamic import build_block_list_index

    q, k, v = (
        torch.randn(2, 3, 640, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    lists = topk_blocks(q, k, block=128, topk=2, causal=True, keep_diagonal=True)
    kw = dict(q_len=640, k_len=640, tile_m=64, tile_n=64, causal=True)
    build_block_list_index(lists, 128, kernel=True, **kw)
    out = block_sparse_attention(q, k, v, lists, block=128, causal=True)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    torch.cuda.synchronize()
    finite = all(bool(torch.isfinite(r).all()) for r in (out, *grads))
    print(f"top-k lists, index by the Triton builder: {'ok' if finite else 'NOT FINITE'}")
    return int(not finite)


def _hopper() -> int:
    """The Gluon forward and backward (sm90 only): lists whole and cut into parts, empty
    query and key blocks, causal, shared and per-head layouts, block lists per sample,
    grouped K/V heads, both backwards."""
    if torch.cuda.get_device_capability() != (9, 0):
        print("Hopper kernels: not an sm90 GPU, skipped", flush=True)
        return 0
    bad = 0
    from blocksparse_attn import KVBlocks
    from blocksparse_attn.kernels.fused_bwd import sm90_backward_plan

    def hopper_case(label, q, k, v, layout, causal, deterministic=True) -> int:
        """One step through the Hopper backward (the dK/dV/dQ kernel where not
        ``deterministic``): 1 if it did not run or is not finite."""
        taken = sm90_backward_plan(q, k, v, q, layout, block=128, causal=causal) is not None
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = block_sparse_attention(
            q, k, v, layout, block=128, causal=causal, deterministic=deterministic
        )
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        torch.cuda.synchronize()
        ok = taken and all(bool(torch.isfinite(r).all()) for r in (out, *grads))
        verdict = "ok" if ok else "NOT FINITE or not taken"
        kind = "" if deterministic else ", dK/dV/dQ kernel"
        print(f"Hopper backward ({label}{kind}): {verdict}", flush=True)
        return int(not ok)

    def inputs(heads, kv_heads):
        return (
            torch.randn(2, h, 384, 128, device="cuda", dtype=torch.bfloat16)
            for h in (heads, kv_heads, kv_heads)
        )

    # the Hopper forward, its lists whole and cut into parts (the merge kernel after
    # it; the Hopper backward, which cuts the same lists)
    from blocksparse_attn import index

    for cut, D in ((False, 128), (True, 128), (False, 64)):
        if cut:
            index.PART_MIN, index.PART_OVER_MEAN = 1, 0.5
        q, k, v = (
            torch.randn(2, 3, 512, D, device="cuda", dtype=torch.float16, requires_grad=True)
            for _ in range(3)
        )
        lay = (torch.rand(3, 4, 4, device="cuda") < 0.5).long()
        lay[:, 0], lay[1, 2] = 1, 0  # a global row, an empty one
        out = block_sparse_attention(q, k, v, lay, block=128, causal=cut)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        torch.cuda.synchronize()
        index.PART_MIN, index.PART_OVER_MEAN = 64, 4
        ok = all(bool(torch.isfinite(r).all()) for r in (out, *grads))
        bad += not ok
        label = f"lists in parts, head dim {D}" if cut else f"lists whole, head dim {D}"
        print(f"Hopper forward ({label}): {'ok' if ok else 'NOT FINITE'}", flush=True)
    for deterministic in (True, False):
        for heads, causal in ((1, True), (3, False)):
            lay = (torch.rand(heads, 3, 3, device="cuda") < 0.5).long()
            lay[0, 1], lay[:, :, 2] = 0, 0
            label = f"{heads} layout heads, causal={causal}"
            bad += hopper_case(label, *inputs(3, 3), lay, causal, deterministic)
        # block lists per sample, grouped K/V heads, an empty list
        lay = (torch.rand(2, 2, 3, 3, device="cuda") < 0.5).long()
        lay[0, 0, 1], lay[1, :, :, 0] = 0, 1
        label = "block lists per sample, GQA, causal"
        lists = KVBlocks.from_layout(lay)
        bad += hopper_case(label, *inputs(4, 2), lists, True, deterministic)
        # lists cut into parts (a global row and column), grouped K/V heads
        index.PART_MIN, index.PART_OVER_MEAN = 1, 0.5
        lay = (torch.rand(2, 3, 3, device="cuda") < 0.4).long()
        lay[:, 0], lay[:, :, 1], lay[1, 2] = 1, 1, 0
        label = "lists cut into parts, GQA, causal"
        bad += hopper_case(label, *inputs(4, 2), lay, True, deterministic)
        index.PART_MIN, index.PART_OVER_MEAN = 64, 4
    return bad


def _varlen() -> int:
    """Packed sequences (block lists compiled on the device): ragged lengths, chunked
    prefill."""
    bad = 0
    # packed sequences (block lists compiled on the device): ragged lengths, chunked prefill
    from blocksparse_attn import FixedSparsityConfig, block_sparse_attention_varlen

    cu_q = torch.tensor([0, 37, 40, 140], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 37, 121, 221], dtype=torch.int32, device="cuda")
    q = torch.randn(140, 4, 40, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(221, 2, 40, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2)
    )
    config = FixedSparsityConfig(num_heads=2, block=16, num_local_blocks=2)
    out = block_sparse_attention_varlen(q, k, v, cu_q, cu_k, config, block=16, causal=True)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    torch.cuda.synchronize()
    finite = all(bool(torch.isfinite(r).all()) for r in (out, *grads))
    bad += not finite
    print(f"varlen (3 sequences, GQA, D 40, bf16): {'ok' if finite else 'NOT FINITE'}", flush=True)
    return bad


def _decode() -> int:
    """One new token per sequence against a paged cache and against a contiguous cache
    of odd length."""
    bad = 0
    # one new token per sequence against a paged cache (its layout row gathered on the GPU)
    from blocksparse_attn import FixedSparsityConfig, block_sparse_decode

    config = FixedSparsityConfig(num_heads=2, block=16, num_local_blocks=2)
    pages = torch.randn(12, 32, 2, 64, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(12, device="cuda").view(3, 4).to(torch.int32)
    lens = torch.tensor([0, 57, 127], dtype=torch.int32, device="cuda")
    new = torch.randn(3, 1, 2, 64, device="cuda", dtype=torch.bfloat16)
    q1 = torch.randn(3, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    out = block_sparse_decode(
        q1, pages, pages.clone(), lens, config, block=16, k_new=new, v_new=new, block_table=table
    )
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(out).all())
    bad += not finite
    print(f"decode (paged, 3 sequences): {'ok' if finite else 'NOT FINITE'}", flush=True)
    # a contiguous cache of 140 tokens (not whole blocks), head dim 40, block 48 (a key tile
    # of 64, partly masked), a list per query head
    cache = torch.randn(2, 3, 140, 2, 40, device="cuda", dtype=torch.float16)
    lens = torch.tensor([1, 100, 140], dtype=torch.int32, device="cuda")
    q1 = torch.randn(3, 1, 4, 40, device="cuda", dtype=torch.float16)
    grid = (torch.rand(4, 3, 3) < 0.6).long()
    grid[..., 0] = 1
    out = block_sparse_decode(q1, cache[0], cache[1], lens, lambda n, device: grid, block=48)
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(out).all())
    bad += not finite
    print(
        f"decode (contiguous, 140 tokens, block 48, D 40): {'ok' if finite else 'NOT FINITE'}",
        flush=True,
    )
    return bad


SECTIONS = {
    "fused": _fused,
    "parts": _parts,
    "topk": _topk,
    "hopper": _hopper,
    "varlen": _varlen,
    "decode": _decode,
}


def main(argv: list[str]) -> int:
    unknown = [a for a in argv if a not in SECTIONS]
    if unknown:
        print(
            f"sanitize_kernels: unknown sections {unknown}; expected some of "
            f"{', '.join(SECTIONS)} (none: all)",
            file=sys.stderr,
        )
        return 2
    bad = sum(SECTIONS[name]() for name in (argv or SECTIONS))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
