"""GPT-2 and a grouped-query-attention Llama against plain Hugging Face, via raw torch hooks.

Sites, patterns, one-unit writes and hook removal on tiny GPT-2 and Llama (GQA) are in
tests/test_contract.py; this file keeps what is specific to these architectures."""

import pytest
import torch

import hookscope as hs

import builders


def _capture(hf, paths, inputs=True):
    """Record, with plain torch hooks, the input (or output) of each module path."""
    seen, handles = {}, []
    for path in paths:
        mod = hf.get_submodule(path)
        if inputs:
            handles.append(
                mod.register_forward_pre_hook(lambda m, args, p=path: seen.setdefault(p, args[0]))
            )
        else:
            handles.append(
                mod.register_forward_hook(lambda m, args, out, p=path: seen.setdefault(p, out))
            )
    return seen, handles


@pytest.fixture(scope="module")
def gpt2():
    hf = builders.tiny_gpt2()
    return hf, hs.HookedModel.wrap(hf)


@pytest.fixture(scope="module")
def llama():
    hf = builders.tiny_llama_gqa()
    return hf, hs.HookedModel.wrap(hf)


TOKS = torch.randint(0, 500, (2, 11), generator=torch.Generator().manual_seed(3))


def test_gpt2_result_uses_conv1d_layout(gpt2):
    hf, model = gpt2
    _, cache = model.run_with_cache(TOKS, names=["head.0", "head.0.result", "attn_out.0"])
    w = hf.transformer.h[0].attn.c_proj.weight  # Conv1D: [in, out]
    torch.testing.assert_close(
        cache["head.0.3.result"], cache["head.0.3"] @ w[48:64], atol=1e-6, rtol=1e-6
    )


def test_llama_gqa_sizes(llama):
    # (sites, k/v grouping and patterns against Hugging Face: tests/test_contract.py)
    _, model = llama
    assert model.cfg.n_heads == 4 and model.cfg.n_kv_heads == 2


def test_llama_gqa_key_write_reaches_its_query_group(llama):
    hf, model = llama
    _, clean = model.run_with_cache(TOKS, names="head.1.pattern")
    _, after = model.run_with_cache(
        TOKS, names="head.1.pattern", hooks=[("head.1.1.k", lambda act, a: act * 2)]
    )
    changed = [
        not torch.equal(after[f"head.1.{h}.pattern"], clean[f"head.1.{h}.pattern"])
        for h in range(4)
    ]
    assert changed == [True, True, False, False]  # k/v head 0 serves query heads 0 and 1


def test_llama_resid_mid_write(llama):
    hf, model = llama
    _, after = model.run_with_cache(
        TOKS,
        names=["resid_mid.0", "resid_post.0", "mlp_out.0"],
        hooks=[("resid_mid.0", lambda act, a: act * 0)],
    )
    assert torch.all(after["resid_mid.0"] == 0)
    # the MLP then reads zeros: RMSNorm(0) = 0, so the block output is the MLP's bias-free output of 0
    torch.testing.assert_close(after["mlp_out.0"], torch.zeros_like(after["mlp_out.0"]))
    torch.testing.assert_close(after["resid_post.0"], after["mlp_out.0"])


def _family_member(kind):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=500,
        max_position_embeddings=64,
    )
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()  # Qwen2: biases on q/k/v


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_llama_family_members(kind):
    hf = _family_member(kind)
    model = hs.HookedModel.wrap(hf)
    assert model.adapter.name == "llama" and model.cfg.n_kv_heads == 1
    seen, handles = _capture(hf, ["model.layers.1.self_attn.v_proj"], inputs=False)
    try:
        with torch.no_grad():
            ref = hf(TOKS, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    logits, cache = model.run_with_cache(TOKS, names=["resid_pre.*", "head.1.v"])
    assert torch.equal(logits, ref.logits)
    assert torch.equal(cache["resid_pre.1"], ref.hidden_states[1])
    for h in range(4):  # one k/v head shared by all four query heads
        assert torch.equal(cache[f"head.1.{h}.v"], seen["model.layers.1.self_attn.v_proj"])
    with torch.no_grad():
        eager = builders.eager_copy(hf)(TOKS, output_attentions=True, use_cache=False)
    _, pat = model.run_with_cache(TOKS, names="head.*.pattern")
    assert torch.equal(pat["head.1.pattern"], eager.attentions[1])


def test_from_pretrained_dtype_and_offline_hub_name(pythia_dir, monkeypatch):
    model = hs.HookedModel.from_pretrained(str(pythia_dir), dtype="float64")
    assert model.dtype == torch.float64
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), names="resid_post.0")
    assert cache["resid_post.0"].dtype == torch.float64
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        hs.ModelLoadError, match="could not load a model config from 'EleutherAI/pythia-70m'"
    ):
        hs.HookedModel.from_pretrained("EleutherAI/pythia-70m")
