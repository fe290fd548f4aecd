"""Conversion of our layouts to FlexAttention's BlockMask (used by the benchmark)."""

import pytest
import torch

from blocksparse_attn.flex_block_mask import block_mask_to_layout, layout_to_block_mask
from blocksparse_attn.reference import token_mask

pytest.importorskip("torch.nn.attention.flex_attention")


def test_block_128_round_trip_all_full():
    layout = (torch.rand(3, 4, 4) < 0.5).long()
    bm = layout_to_block_mask(layout, 128)
    assert torch.equal(block_mask_to_layout(bm), layout)
    assert int(bm.kv_num_blocks.sum()) == 0  # every kept tile is full: no mask_mod calls
    assert int(bm.full_kv_num_blocks.sum()) == int(layout.sum())


@pytest.mark.parametrize("block, causal", [(64, False), (32, True), (16, False), (128, True)])
def test_small_blocks_coarsen_and_mask_exactly(block, causal):
    L, H = 512, 2
    layout = (torch.rand(H, L // block, L // block) < 0.3).long()
    bm = layout_to_block_mask(layout, block, causal=causal)
    f = 128 // block
    coarse = layout.view(H, L // 128, f, L // 128, f).amax(dim=(2, 4))
    if causal:
        coarse = coarse.tril()
    assert torch.equal(block_mask_to_layout(bm), coarse)
    # the mask_mod, evaluated on every (query, key), is exactly the token-level layout
    q = torch.arange(L)[:, None].expand(L, L)
    k = torch.arange(L)[None, :].expand(L, L)
    expected = token_mask(layout, block, causal)
    for h in range(H):
        got = bm.mask_mod(torch.zeros((), dtype=torch.long), torch.tensor(h), q, k)
        keep = torch.as_tensor(got, dtype=torch.bool)
        tiles = (
            block_mask_to_layout(bm)[h].bool().repeat_interleave(128, 0).repeat_interleave(128, 1)
        )
        assert torch.equal(keep & tiles, expected[h])


def test_shared_layout_broadcasts_over_heads():
    layout = torch.tensor([[[1, 0], [1, 1]]])
    bm = layout_to_block_mask(layout, 64)
    q = torch.arange(128)[:, None].expand(128, 128)
    k = torch.arange(128)[None, :].expand(128, 128)
    for h in (0, 5):
        keep = torch.as_tensor(
            bm.mask_mod(torch.tensor(0), torch.tensor(h), q, k), dtype=torch.bool
        )
        assert torch.equal(keep, token_mask(layout, 64)[0])


@pytest.mark.parametrize("block", [32, 128])
def test_block_lists_to_block_mask_per_sample_rectangular_causal(block):
    # lists per sample and head, a repeated entry, L_q != L_k: the BlockMask keeps exactly
    # the pairs the lists keep, causal bottom-right aligned
    from blocksparse_attn import KVBlocks

    Lq, Lk, B, H = 256, 512, 2, 2
    layout = torch.rand(B, H, Lq // block, Lk // block) < 0.4
    lists = KVBlocks.from_layout(layout)
    idx = torch.cat([lists.indices, lists.indices[..., :1]], -1)
    n = torch.where(lists.num_blocks > 0, lists.num_blocks + 1, 0).to(torch.int32)
    idx.scatter_(-1, lists.num_blocks.long()[..., None], lists.indices[..., :1])
    bm = KVBlocks(n, idx).to_block_mask(block, k_len=Lk, causal=True)
    q = torch.arange(Lq)[:, None].expand(Lq, Lk)
    k = torch.arange(Lk)[None, :].expand(Lq, Lk)
    dense = bm.to_dense().bool().repeat_interleave(128, -2).repeat_interleave(128, -1)
    expected = token_mask(layout, block, causal=True)
    for b in range(B):
        for h in range(H):
            got = bm.mask_mod(torch.tensor(b), torch.tensor(h), q, k)
            keep = torch.as_tensor(got, dtype=torch.bool) & dense[b, h]
            assert torch.equal(keep, expected[b, h]), (b, h)
