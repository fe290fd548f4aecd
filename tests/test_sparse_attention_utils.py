"""SparseAttentionUtils on current Hugging Face BERT and RoBERTa models (built from configs
in code, no downloads)."""

import pytest
import torch

from blocksparse_attn import DenseSparsityConfig, FixedSparsityConfig, SparseAttentionUtils
from blocksparse_attn.modules import HFBertSparseSelfAttention
from blocksparse_attn.modules.sparse_attention_utils import key_padding_from_hf_mask

transformers = pytest.importorskip("transformers")

BLOCK = 16


def tiny(kind, impl="eager"):
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=impl,
    )
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(
            transformers.BertConfig(max_position_embeddings=128, **common)
        ).eval()
    return transformers.RobertaModel(
        transformers.RobertaConfig(max_position_embeddings=130, pad_token_id=1, **common)
    ).eval()


def padded_inputs(model, L=50):
    ids = torch.randint(3, 100, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 37:] = 0
    pad_id = model.config.pad_token_id
    ids[1, 37:] = pad_id
    return SparseAttentionUtils.pad_to_block_size(
        BLOCK, ids, mask, torch.zeros_like(ids), None, None, pad_id, model.embeddings
    )


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_dense_config_reproduces_original_model(kind, impl):
    model = tiny(kind, impl)
    pad_len, ids, mask, types, _, _ = padded_inputs(model)
    assert pad_len == 14 and ids.shape == (2, 64) and mask[:, 50:].eq(0).all()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    q_weight = model.encoder.layer[0].attention.self.query.weight
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        model, 128, DenseSparsityConfig(num_heads=2, block=BLOCK)
    )
    new = model.encoder.layer[0].attention.self
    assert isinstance(new, HFBertSparseSelfAttention)
    assert new.query.weight is q_weight  # pretrained weights kept
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    out = SparseAttentionUtils.unpad_sequence_output(pad_len, got)
    assert out.shape == (2, 50, 32)


def test_sparse_config_trains_one_step():
    model = tiny("bert").train()
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
        model, 128, FixedSparsityConfig(num_heads=2, block=BLOCK, num_local_blocks=2)
    )
    _, ids, mask, types, _, _ = padded_inputs(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q = model.encoder.layer[0].attention.self.query.weight
    before = q.detach().clone()
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    loss = (hidden * torch.randn_like(hidden)).sum()  # LayerNorm output: its mean square is 1
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, q.detach())


def test_bert_with_head_and_unsupported_model():
    model = transformers.BertForMaskedLM(tiny("bert").config)
    SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(model, 256)
    assert model.config.max_position_embeddings == 256
    assert isinstance(model.bert.encoder.layer[1].attention.self, HFBertSparseSelfAttention)
    with pytest.raises(ValueError, match="model must be a BERT or RoBERTa model"):
        SparseAttentionUtils.replace_model_self_attention_with_sparse_self_attention(
            torch.nn.Linear(2, 2), 256
        )


def test_extend_position_embedding_bert():
    model = tiny("bert")
    old = model.embeddings.position_embeddings.weight.detach().clone()  # 128 rows
    SparseAttentionUtils.extend_position_embedding(model, 300)
    new = model.embeddings.position_embeddings.weight
    assert new.shape == (300, 32) and model.config.max_position_embeddings == 300
    assert torch.equal(new[:128], old) and torch.equal(new[128:256], old)
    assert torch.equal(new[256:], old[:44])
    assert model.embeddings.position_ids.shape == (1, 300)
    model(input_ids=torch.randint(3, 100, (1, 300)))  # long inputs run
    with pytest.raises(ValueError, match="max_position must be > the current 300 positions"):
        SparseAttentionUtils.extend_position_embedding(model, 200)


def test_extend_position_embedding_roberta_has_no_uninitialised_rows():
    model = tiny("roberta")
    old = model.embeddings.position_embeddings.weight.detach().clone()  # 2 reserved + 128
    SparseAttentionUtils.extend_position_embedding(model, 320)
    new = model.embeddings.position_embeddings.weight
    assert new.shape == (322, 32) and model.config.max_position_embeddings == 322
    assert torch.equal(new[:2], old[:2])  # reserved rows kept
    assert torch.equal(new[2:130], old[2:]) and torch.equal(new[130:258], old[2:])
    assert torch.equal(new[258:], old[2:66])
    assert torch.isfinite(new).all()


def test_update_tokenizer_model_max_length():
    class Tok:
        model_max_length = 512
        init_kwargs = {"model_max_length": 512}

    tok = SparseAttentionUtils.update_tokenizer_model_max_length(Tok(), 4096)
    assert tok.model_max_length == 4096 and tok.init_kwargs["model_max_length"] == 4096


def test_pad_to_block_size_forms():
    emb = torch.nn.Embedding(10, 4)
    ids = torch.randint(0, 10, (2, 5))
    # 0/1 mask padded with 0; additive extended mask padded with the dtype's minimum
    _, pids, m01, tt, pos, _ = SparseAttentionUtils.pad_to_block_size(
        8,
        ids,
        torch.ones(2, 5),
        torch.zeros(2, 5, dtype=torch.long),
        torch.arange(5).expand(2, 5),
        None,
        0,
        emb,
    )
    assert pids[:, 5:].eq(0).all() and m01[:, 5:].eq(0).all() and m01[:, :5].eq(1).all()
    assert tt.shape == (2, 8) and pos[:, 5:].eq(0).all()
    ext = torch.zeros(2, 1, 1, 5)
    _, _, mext, _, _, _ = SparseAttentionUtils.pad_to_block_size(
        8, ids, ext, None, None, None, 0, emb
    )
    assert mext.shape == (2, 1, 1, 8) and mext[..., 5:].eq(torch.finfo(torch.float32).min).all()
    embeds = torch.randn(2, 5, 4)
    pad_len, none_ids, _, _, _, e = SparseAttentionUtils.pad_to_block_size(
        8, None, None, None, None, embeds, 3, emb
    )
    assert pad_len == 3 and none_ids is None and torch.equal(e[:, 5:], emb(torch.full((2, 3), 3)))
    # already a multiple: unchanged
    assert SparseAttentionUtils.pad_to_block_size(5, ids, None, None, None, None, 0, emb)[0] == 0
    with pytest.raises(ValueError, match="input_ids / inputs_embeds"):
        SparseAttentionUtils.pad_to_block_size(8, None, None, None, None, None, 0, emb)


def test_hf_mask_forms():
    L = 4
    keep = torch.tensor([[True, True, True, False]])
    add = key_padding_from_hf_mask(keep[:, None, None, :].expand(1, 1, L, L), 1, L)
    assert add.shape == (1, L) and add[0, 3] == float("-inf") and add[0, 0] == 0
    assert key_padding_from_hf_mask(None, 1, L) is None
    with pytest.raises(NotImplementedError, match="padding mask"):
        key_padding_from_hf_mask(torch.ones(1, 1, L, L, dtype=torch.bool).tril(), 1, L)
    with pytest.raises(ValueError, match="attention_mask must be"):
        key_padding_from_hf_mask(torch.zeros(2, 3), 2, L)


def test_hf_layer_rejects_cache_and_cross_attention():
    layer = HFBertSparseSelfAttention(tiny("bert").config, DenseSparsityConfig(2, BLOCK))
    x = torch.randn(1, 16, 32)
    out, weights = layer(x)
    assert out.shape == (1, 16, 32) and weights is None
    with pytest.raises(NotImplementedError, match="encoder_hidden_states is not supported"):
        layer(x, encoder_hidden_states=x)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        layer(x, output_attentions=True)
    # transformers 4.x call: (hidden, mask, head_mask, enc_hidden, enc_mask, past, output_attn)
    out4, _ = layer(x, None, None, None, None, None, False)
    torch.testing.assert_close(out4, out)
    with pytest.raises(NotImplementedError, match="positional arguments"):
        layer(x, None, torch.ones(2))
    with pytest.raises(NotImplementedError, match="head_mask is not supported"):
        layer(x, head_mask=torch.ones(2))
