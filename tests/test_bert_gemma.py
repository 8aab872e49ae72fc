"""BERT (post-LN encoder) and Gemma 3 (sandwich norms, sliding window) against Hugging Face."""

import pytest
import torch

import hookscope as hs

import builders

TOKS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(4))
ALL = [
    "resid_pre.*",
    "resid_mid.*",
    "resid_post.*",
    "attn_out.*",
    "mlp_out.*",
    "head.*",
    "neuron.*",
]


@pytest.fixture(scope="module")
def bert():
    hf = builders.tiny_bert()
    return hf, hs.HookedModel.wrap(hf)


@pytest.fixture(scope="module")
def gemma():
    hf = builders.tiny_gemma3()
    return hf, hs.HookedModel.wrap(hf)


def test_bert_residual_stream_is_post_layernorm(bert):
    hf, model = bert
    assert model.adapter.name == "bert"
    with torch.no_grad():
        ref = hf(TOKS, output_hidden_states=True)
    logits, cache = model.run_with_cache(TOKS, names=ALL)
    assert torch.equal(logits, ref.logits)
    for layer in range(2):
        assert torch.equal(cache[f"resid_pre.{layer}"], ref.hidden_states[layer])
        block = hf.bert.encoder.layer[layer]
        with torch.no_grad():
            mid = block.attention.output.LayerNorm(
                cache[f"attn_out.{layer}"] + cache[f"resid_pre.{layer}"]
            )
            post = block.output.LayerNorm(cache[f"mlp_out.{layer}"] + cache[f"resid_mid.{layer}"])
        assert torch.equal(mid, cache[f"resid_mid.{layer}"])
        assert torch.equal(post, cache[f"resid_post.{layer}"])
    assert torch.equal(cache["resid_post.1"], ref.hidden_states[2])


def test_bert_pattern_is_bidirectional(bert):
    hf, model = bert
    with torch.no_grad():
        ref = builders.eager_copy(hf)(TOKS, output_attentions=True)
    logits, cache = model.run_with_cache(TOKS, names="head.*.pattern")
    assert torch.equal(logits, ref.logits)
    assert torch.equal(cache["head.1.pattern"], ref.attentions[1])
    assert (cache["head.0.2.pattern"].triu(1) > 0).any()  # attends forwards too


def test_bert_resid_mid_write_is_a_module_output(bert):
    hf, model = bert
    _, after = model.run_with_cache(
        TOKS, names=["resid_mid.0", "mlp_out.0"], hooks=[("resid_mid.0", lambda act, a: act * 0)]
    )
    dense = hf.bert.encoder.layer[0].output.dense
    inter = hf.bert.encoder.layer[0].intermediate
    with torch.no_grad():
        expected = dense(inter(torch.zeros(2, 9, 32)))
    torch.testing.assert_close(after["mlp_out.0"], expected)


def test_gemma3_sites(gemma):
    hf, model = gemma
    assert model.adapter.name == "gemma3" and model.cfg.n_kv_heads == 2
    with torch.no_grad():
        ref = hf(TOKS, output_hidden_states=True, use_cache=False)
    logits, cache = model.run_with_cache(TOKS, names=ALL + ["embed"])
    assert torch.equal(logits, ref.logits)
    for layer in range(3):
        assert torch.equal(cache[f"resid_pre.{layer}"], ref.hidden_states[layer])
        # attn_out / mlp_out are what joins the residual: the post-norm outputs
        mid = cache[f"resid_pre.{layer}"] + cache[f"attn_out.{layer}"]
        assert torch.equal(cache[f"resid_mid.{layer}"], mid)
        assert torch.equal(cache[f"resid_post.{layer}"], mid + cache[f"mlp_out.{layer}"])
    assert torch.equal(cache["embed"], ref.hidden_states[0])  # scaled by sqrt(d_model)


def test_gemma3_sliding_window_pattern(gemma):
    hf, model = gemma
    with torch.no_grad():
        ref = builders.eager_copy(hf)(TOKS, output_attentions=True, use_cache=False)
    logits, cache = model.run_with_cache(TOKS, names="head.*.pattern")
    assert torch.equal(logits, ref.logits)
    for layer in range(3):
        assert torch.equal(cache[f"head.{layer}.pattern"], ref.attentions[layer])
    window = cache["head.0.1.pattern"][0]
    assert torch.all(window.tril(-4) == 0) and (window.diagonal(-3) > 0).all()
    assert (cache["head.2.1.pattern"][0].tril(-4) > 0).any()  # the full-attention layer
