"""Hugging Face decoder models on block-sparse attention: a small Llama built from a config
(grouped-query heads, lengths that are not multiples of the block, left padding) against
the same weights on SDPA (forward, a training step, greedy generation with a KV cache); a
sparse layout decoding with the cache as without it; the refusals."""

import pytest
import torch

from blocksparse_attn import DenseSparsityConfig, FixedSparsityConfig
from blocksparse_attn.integrations.transformers import TopK, register

from helpers import DEVICE, assert_raises_with

transformers = pytest.importorskip("transformers")


def llama(attn: str, seed: int = 0):
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attn)
    return model.to(DEVICE).eval()


def batch(lengths, total, seed=1):
    """Left-padded token ids and attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
        ids[row, : total - n] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.fixture(scope="module")
def dense_name():
    return register(DenseSparsityConfig(num_heads=4, block=16), name="bs-dense-test")


def test_dense_layout_equals_sdpa_forward_and_training_step(dense_name):
    ours, sdpa = llama(dense_name), llama("sdpa")
    ids, mask = batch([37, 29], 37)
    real = mask.bool()
    a = ours(input_ids=ids, attention_mask=mask).logits
    b = sdpa(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[real], b[real], atol=2e-5, rtol=1e-4)
    labels = torch.where(real, ids, -100)
    for model in (ours, sdpa):
        model.train()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(ours.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=5e-5, rtol=1e-4, msg=name)


def test_generation_with_a_cache_gives_the_tokens_of_sdpa(dense_name):
    ours, sdpa = llama(dense_name, seed=3), llama("sdpa", seed=3)
    ids, mask = batch([21, 13], 21, seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), sdpa.generate(ids, **kw))


def test_sparse_layout_decodes_with_the_cache_as_without():
    """Each decoding step sees the blocks of its absolute position: generating with the
    KV cache (one query against a growing key list) gives the tokens of re-running the
    whole sequence each step."""
    source = FixedSparsityConfig(
        num_heads=2, block=8, num_local_blocks=2, attention="unidirectional"
    )
    model = llama(register(source, name="bs-fixed-test"), seed=5)
    ids, mask = batch([19, 11], 19, seed=6)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    dense = llama(register(DenseSparsityConfig(num_heads=2, block=8), name="bs-d8-test"), seed=5)
    assert not torch.equal(cached, dense.generate(ids, **kw))  # the layout does matter


def test_top_k_keeping_every_block_generates_as_sdpa():
    # the selection itself is tested in test_dynamic_layouts; here the wiring: a top-k rule
    # that keeps every block is dense attention, in prefill and in each decoding step
    ours = llama(register(TopK(topk=64), name="bs-topk-test", block=8), seed=7)
    sdpa = llama("sdpa", seed=7)
    ids, mask = batch([23, 16], 23, seed=8)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), sdpa.generate(ids, **kw))


def test_register_refuses_bad_sources():
    where = "register"
    assert_raises_with(ValueError, [where, "layout_source"], register, 3)
    assert_raises_with(
        ValueError, ["block", "positive int"], register, lambda n, d: torch.ones(1, 1, 1)
    )
    cfg = DenseSparsityConfig(num_heads=1, block=16)
    assert_raises_with(ValueError, ["block", "the config's block (16)"], register, cfg, block=8)


def test_packed_sequences_are_refused_not_ignored(dense_name):
    model = llama(dense_name)
    ids = torch.randint(3, 97, (1, 12), device=DEVICE)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]], device=DEVICE)
    assert_raises_with(  # transformers looks for packing without a cache (training)
        NotImplementedError,
        ["packed sequences"],
        model,
        input_ids=ids,
        position_ids=position_ids,
        use_cache=False,
    )


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_decoding_steps_read_the_cache_in_place(monkeypatch, backend):
    """Without padding or with left padding, each decoding step (one new token) goes to
    ``block_sparse_decode`` (on the fused backend, the decoding kernels; the padding as
    hidden leading keys) and the tokens are those of re-running the whole sequence each
    step; padding inside a row keeps the general path."""
    import blocksparse_attn.integrations.transformers as integration

    calls = []

    def counted(*args, **kw):
        calls.append(args[0].shape)
        return integration.block_sparse_decode.__wrapped__(*args, **kw)

    counted.__wrapped__ = integration.block_sparse_decode
    monkeypatch.setattr(integration, "block_sparse_decode", counted)
    source = FixedSparsityConfig(
        num_heads=2, block=8, num_local_blocks=2, attention="unidirectional"
    )
    name = register(source, name=f"bs-decode-{backend}", backend=backend)
    model = llama(name, seed=9)
    ids, mask = batch([19, 19], 19, seed=10)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * 5 and all(shape[:2] == (2, 1) for shape in calls)
    calls.clear()
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kw))
    assert not calls  # without a cache every step is a prefill
    padded, padded_mask = batch([19, 12], 19, seed=10)
    kw["attention_mask"] = padded_mask
    cached = model.generate(padded, use_cache=True, **kw)
    assert len(calls) == layers * 5
    assert torch.equal(cached, model.generate(padded, use_cache=False, **kw))
    calls.clear()
    hole = mask.clone()
    hole[0, 5] = 0  # padding inside a row: not left padding
    prefill = model(input_ids=ids, attention_mask=hole, use_cache=True)
    new = prefill.logits[:, -1:].argmax(-1)
    step_mask = torch.cat([hole, torch.ones_like(hole[:, :1])], 1)
    model(input_ids=new, attention_mask=step_mask, past_key_values=prefill.past_key_values)
    assert not calls


def test_decoding_steps_with_a_callable_layout_match_sdpa():
    # a callable source on the decoding path (its layout asked once per length): dense
    # blocks, so the tokens are SDPA's
    def dense(n_tokens, device):
        nb = n_tokens // 8
        return torch.ones(1, nb, nb, dtype=torch.long, device=device)

    ours = llama(register(dense, name="bs-callable-test", block=8), seed=11)
    sdpa = llama("sdpa", seed=11)
    ids, mask = batch([17, 17], 17, seed=12)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), sdpa.generate(ids, **kw))
