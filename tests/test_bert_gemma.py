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
    # (each site against Hugging Face's hidden states and modules: tests/test_contract.py)
    hf, model = bert
    _, cache = model.run_with_cache(TOKS, names=ALL)
    for layer in range(2):
        block = hf.bert.encoder.layer[layer]
        with torch.no_grad():
            mid = block.attention.output.LayerNorm(
                cache[f"attn_out.{layer}"] + cache[f"resid_pre.{layer}"]
            )
            post = block.output.LayerNorm(cache[f"mlp_out.{layer}"] + cache[f"resid_mid.{layer}"])
        assert torch.equal(mid, cache[f"resid_mid.{layer}"])
        assert torch.equal(post, cache[f"resid_post.{layer}"])


def test_bert_pattern_is_bidirectional(bert):
    # (patterns against eager attention: tests/test_contract.py)
    _, model = bert
    _, cache = model.run_with_cache(TOKS, names="head.*.pattern")
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
    # (each site against Hugging Face's hidden states and modules: tests/test_contract.py)
    hf, model = gemma
    assert model.cfg.n_kv_heads == 2
    with torch.no_grad():
        ref = hf(TOKS, output_hidden_states=True, use_cache=False)
    _, cache = model.run_with_cache(TOKS, names=ALL + ["embed"])
    for layer in range(3):
        # attn_out / mlp_out are what joins the residual: the post-norm outputs
        mid = cache[f"resid_pre.{layer}"] + cache[f"attn_out.{layer}"]
        assert torch.equal(cache[f"resid_mid.{layer}"], mid)
        assert torch.equal(cache[f"resid_post.{layer}"], mid + cache[f"mlp_out.{layer}"])
    assert torch.equal(cache["embed"], ref.hidden_states[0])  # scaled by sqrt(d_model)


def test_gemma3_sliding_window_pattern(gemma):
    # (patterns against eager attention: tests/test_contract.py)
    _, model = gemma
    _, cache = model.run_with_cache(TOKS, names="head.*.pattern")
    window = cache["head.0.1.pattern"][0]
    assert torch.all(window.tril(-4) == 0) and (window.diagonal(-3) > 0).all()
    assert (cache["head.2.1.pattern"][0].tril(-4) > 0).any()  # the full-attention layer
