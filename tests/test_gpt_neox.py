"""GPT-NeoX (pythia-70m-shaped, random weights) against the plain Hugging Face model."""

import pytest
import torch

import hookscope as hs

import builders


@pytest.fixture(scope="module")
def hf_eager(pythia_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(pythia_dir), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def clean(pythia):
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 50304, (2, 9), generator=g)
    no_pattern = [
        "embed",
        "resid_pre.*",
        "resid_post.*",
        "attn_out.*",
        "mlp_out.*",
        "head.*",
        "head.*.q",
    ]
    no_pattern += ["head.*.k", "head.*.v", "neuron.*", "neuron.*.pre", "logits"]
    logits, cache = pythia.run_with_cache(toks, names=no_pattern)
    eager_logits, full = pythia.run_with_cache(toks)  # names=None: pattern too (eager attention)
    return toks, logits, cache, eager_logits, full


def test_config_is_pythia_70m(pythia):
    c = pythia.model.config
    assert (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
        c.vocab_size,
    ) == (
        512,
        6,
        8,
        2048,
        50304,
    )
    assert c.rope_parameters["partial_rotary_factor"] == 0.25 and c.use_parallel_residual
    assert pythia.adapter.name == "gpt_neox"


def test_logits_equal_hf_exactly(pythia, pythia_hf, clean):
    toks, logits, *_ = clean
    with torch.no_grad():
        ref = pythia_hf(toks).logits
    assert torch.equal(logits, ref)
    assert torch.equal(pythia(toks), ref)


def test_residual_stream_matches_hf_hidden_states(pythia_hf, clean):
    toks, _, cache, *_ = clean
    with torch.no_grad():
        hs_ = pythia_hf(toks, output_hidden_states=True).hidden_states
    assert len(hs_) == 7
    for layer in range(6):
        assert torch.equal(cache[f"resid_pre.{layer}"], hs_[layer])
    for layer in range(5):
        assert torch.equal(cache[f"resid_post.{layer}"], hs_[layer + 1])
    # HF's last hidden state has the final layer norm applied; ours is the raw block output
    final_ln = pythia_hf.gpt_neox.final_layer_norm
    with torch.no_grad():
        assert torch.equal(final_ln(cache["resid_post.5"]), hs_[6])
    assert not torch.allclose(cache["resid_post.5"], hs_[6])
    assert torch.equal(cache["embed"], hs_[0])  # pythia has no positional embedding


def test_block_output_is_the_parallel_sum(clean):
    _, _, cache, *_ = clean
    for layer in range(6):
        total = cache[f"mlp_out.{layer}"] + cache[f"attn_out.{layer}"] + cache[f"resid_pre.{layer}"]
        assert torch.equal(total, cache[f"resid_post.{layer}"])


def test_heads_through_w_o_sum_to_attention_output(pythia_hf, clean):
    _, _, cache, *_ = clean
    for layer in range(6):
        dense = pythia_hf.gpt_neox.layers[layer].attention.dense
        z = cache[f"head.{layer}"]  # [batch, pos, 8, 64]
        per_head = [z[:, :, h] @ dense.weight[:, h * 64 : (h + 1) * 64].T for h in range(8)]
        torch.testing.assert_close(
            sum(per_head) + dense.bias, cache[f"attn_out.{layer}"], atol=1e-5, rtol=1e-5
        )
        assert torch.equal(cache[f"head.{layer}.3"], z[:, :, 3])


def test_result_site_is_per_head_output(pythia, pythia_hf, clean):
    toks, _, cache, *_ = clean
    _, res = pythia.run_with_cache(toks, names=["head.2.result", "head.2"])
    dense = pythia_hf.gpt_neox.layers[2].attention.dense
    for h in (0, 5):
        expected = cache[f"head.2.{h}"] @ dense.weight[:, h * 64 : (h + 1) * 64].T
        torch.testing.assert_close(res[f"head.2.{h}.result"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        res["head.2.result"].sum(2) + dense.bias, cache["attn_out.2"], atol=1e-5, rtol=1e-5
    )


def test_qkv_are_the_interleaved_projection(pythia_hf, clean):
    _, _, cache, *_ = clean
    qkv_mod = pythia_hf.gpt_neox.layers[1].attention.query_key_value
    with torch.no_grad():
        fused = qkv_mod(pythia_hf.gpt_neox.layers[1].input_layernorm(cache["resid_pre.1"]))
    per_head = fused.view(2, 9, 8, 3 * 64)  # GPT-NeoX: per head [q k v]
    assert torch.equal(cache["head.1.q"], per_head[..., :64])
    assert torch.equal(cache["head.1.k"], per_head[..., 64:128])
    assert torch.equal(cache["head.1.v"], per_head[..., 128:])


def test_pattern_equals_hf_attention_probabilities(hf_eager, clean):
    toks, _, _, eager_logits, full = clean
    with torch.no_grad():
        out = hf_eager(toks, output_attentions=True)
    assert torch.equal(eager_logits, out.logits)
    for layer in range(6):
        assert torch.equal(full[f"head.{layer}.pattern"], out.attentions[layer])
    p = full["head.3.5.pattern"]
    assert p.shape == (2, 9, 9)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 9))
    assert torch.all(p.triu(1) == 0)


def test_attention_implementation_is_restored(pythia, clean):
    assert pythia.model.config._attn_implementation == "sdpa"


def _self_patch_addresses(model):
    found = model.addresses()
    found += [hs.AttentionHead(2, 3, site) for site in ("z", "q", "k", "v", "pattern", "result")]
    found += [hs.MLPNeuron(4, 100), hs.MLPNeuron(4, 100, "pre")]
    return found


def test_patching_any_site_with_its_own_value_changes_nothing(pythia, clean):
    toks, logits, _, eager_logits, _ = clean
    # caching a pattern switches attention to eager, so values come from a run on the same path
    _, fast = pythia.run_with_cache(
        toks,
        names=[
            a for a in pythia.addresses() if getattr(a, "site", "") not in ("pattern", "result")
        ],
    )
    _, eager = pythia.run_with_cache(toks, names="head.*.pattern")
    _, result = pythia.run_with_cache(toks, names="head.*.result")
    for address in _self_patch_addresses(pythia):
        site = getattr(address, "site", None)
        value = {"pattern": eager, "result": result}.get(site, fast)[address]
        patched = pythia.run_with_hooks(toks, hooks=[(address, lambda act, a, v=value: v.clone())])
        reference = eager_logits if site == "pattern" else logits
        if site == "result":
            torch.testing.assert_close(patched, logits, atol=1e-4, rtol=1e-5)  # sum order differs
        else:
            assert torch.equal(patched, reference), str(address)


def test_writing_one_head_changes_only_that_head(pythia, pythia_hf, clean):
    toks, _, cache, *_ = clean
    _, after = pythia.run_with_cache(
        toks,
        names=["head.3", "attn_out.3", "resid_pre.3"],
        hooks=[("head.3.5", lambda act, a: torch.zeros_like(act))],
    )
    assert torch.equal(after["resid_pre.3"], cache["resid_pre.3"])
    for h in range(8):
        if h == 5:
            assert torch.all(after["head.3.5"] == 0)
        else:
            assert torch.equal(after[f"head.3.{h}"], cache[f"head.3.{h}"])
    dense = pythia_hf.gpt_neox.layers[3].attention.dense
    removed = cache["head.3.5"] @ dense.weight[:, 5 * 64 : 6 * 64].T
    torch.testing.assert_close(
        after["attn_out.3"], cache["attn_out.3"] - removed, atol=1e-5, rtol=1e-5
    )


def test_writing_one_query_changes_only_that_heads_pattern(pythia, clean):
    toks, _, _, _, full = clean
    _, after = pythia.run_with_cache(
        toks, names=["head.1.pattern"], hooks=[("head.1.2.q", lambda act, a: act * 3)]
    )
    for h in range(8):
        same = torch.equal(after[f"head.1.{h}.pattern"], full[f"head.1.{h}.pattern"])
        assert same == (h != 2), h


def test_writing_one_neuron_changes_only_that_neuron(pythia, pythia_hf, clean):
    toks, _, cache, *_ = clean
    _, after = pythia.run_with_cache(
        toks,
        names=["neuron.2", "mlp_out.2"],
        hooks=[(hs.MLPNeuron(2, 187), lambda act, a: act * 0)],
    )
    mask = torch.ones(2048, dtype=torch.bool)
    mask[187] = False
    assert torch.equal(after["neuron.2"][..., mask], cache["neuron.2"][..., mask])
    assert torch.all(after["neuron.2.187"] == 0)
    w_out = pythia_hf.gpt_neox.layers[2].mlp.dense_4h_to_h.weight[:, 187]
    expected = cache["mlp_out.2"] - cache["neuron.2.187"][..., None] * w_out
    torch.testing.assert_close(after["mlp_out.2"], expected, atol=1e-5, rtol=1e-5)


def test_neuron_post_is_gelu_of_pre(clean):
    _, _, cache, *_ = clean
    torch.testing.assert_close(cache["neuron.3"], torch.nn.functional.gelu(cache["neuron.3.pre"]))


def test_resid_mid_does_not_exist_on_pythia(pythia):
    with pytest.raises(hs.SiteUnavailableError, match="resid_mid.L does not exist.*parallel"):
        pythia.run_with_cache(torch.zeros(1, 3, dtype=torch.long), names="resid_mid.0")


def test_sequential_neox_resid_mid_write():
    # (reading resid_mid against the model's own tensor: tests/test_contract.py)
    hf = builders.tiny_neox(parallel=False)
    model = hs.HookedModel.wrap(hf)
    toks = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    # writing resid_mid moves the block output by the same amount (through attention's output)
    delta = torch.randn(64, generator=torch.Generator().manual_seed(2))
    _, a = model.run_with_cache(toks, names=["resid_mid.1", "mlp_out.1", "resid_post.1"])
    _, b = model.run_with_cache(
        toks,
        names=["resid_mid.1", "mlp_out.1", "resid_post.1"],
        hooks=[("resid_mid.1", lambda act, _: act + delta)],
    )
    torch.testing.assert_close(b["resid_mid.1"], a["resid_mid.1"] + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        b["resid_post.1"], b["resid_mid.1"] + b["mlp_out.1"], atol=1e-6, rtol=0
    )


def test_string_input_and_tokenizer_round_trip(pythia):
    text = "When Mary and John went to the store, John gave a drink to"
    toks = pythia.to_tokens(text)
    assert toks.shape[0] == 1 and toks.dtype == torch.long
    assert pythia.to_string(toks[0]) == text
    logits, cache = pythia.run_with_cache(text, names="resid_post.3")
    assert torch.equal(logits, pythia(toks))
    assert cache["resid_post.3"].shape == (1, toks.shape[1], 512)


def test_batch_of_strings_is_padded_and_masked(pythia):
    texts = ["When Mary and John went to the store", "The quick brown fox"]
    batch = pythia(texts)
    single = pythia(texts[1])
    n = single.shape[1]
    torch.testing.assert_close(batch[1, :n], single[0], atol=1e-5, rtol=1e-5)


def test_any_sequence_of_strings_and_right_padding(pythia):
    from datasets import Dataset

    texts = ["When Mary and John went to the store", "The quick brown fox"]
    column = Dataset.from_dict({"text": texts})["text"]
    assert torch.equal(pythia(column), pythia(texts))
    tok = pythia.tokenizer
    tok.padding_side = "left"
    try:
        ids = pythia.to_tokens(texts)
        assert tok.padding_side == "left"  # the tokenizer's own setting is left as it was
    finally:
        tok.padding_side = "right"
    short = pythia.to_tokens(texts[1])[0]
    assert torch.equal(ids[1, : len(short)], short)  # right-padded: the text starts at position 0
