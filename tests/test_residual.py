"""Weights, readout, residual decomposition and direct logit attribution.

References: TransformerLens 4.3's TransformerBridge on the same ``save_pretrained`` folder
(booted raw, and in ``enable_compatibility_mode`` where its weights are folded), Hugging
Face's own forward, and closed-form identities (components summing to the stream, heads plus
bias summing to ``attn_out``, DLA summing to the logit difference). Every model here has
random final-norm weights and biases (the default init of ones would hide a missing weight).
"""

from __future__ import annotations

import gc

import pytest
import torch

import hookscope as hs
from hookscope.adapters.base import submodule

import builders

ATOL = 1e-5
T, INC = torch.tensor([3, 4]), torch.tensor([5, 6])


def close(a, b, what="", atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def randomise_norms(model, seed=5):
    """Give every LayerNorm/RMSNorm a random weight (0.5-1.5) and bias (where it has one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in model.named_modules():
            if "norm" in type(mod).__name__.lower():
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    return model


BUILD = {
    "gpt_neox": lambda: builders.tiny_neox(parallel=True),
    "gpt_neox_seq": lambda: builders.tiny_neox(parallel=False),
    "gpt2": builders.tiny_gpt2,
    "llama_gqa": builders.tiny_llama_gqa,
    "gemma3": lambda: builders.tiny_gemma3(softcap=2.0),
}
TL_ARCHS = ["gpt_neox", "gpt2", "llama_gqa"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, build in BUILD.items():
        path = tmp_path_factory.mktemp(name)
        randomise_norms(build()).save_pretrained(path)
        builders.make_tokenizer().save_pretrained(path)
        out[name] = path
    return out


def _tokens(vocab):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list(BUILD))
def run(request, folders):
    """(name, HookedModel, tokens, logits, full cache)."""
    model = hs.HookedModel.from_pretrained(str(folders[request.param]))
    tokens = _tokens(model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    return request.param, model, tokens, logits, cache


def _bias_constant(model):
    """What the final norm's bias and b_U add to every logit: no component owns it."""
    b = model.weights.norm_bias()
    return (b @ model.W_U if b is not None else 0) + model.b_U


# ------------------------------------------------------------------ closed forms, every LM


def test_unembed_and_final_norm_are_the_models_readout(run):
    name, model, tokens, logits, cache = run
    last = cache[f"resid_post.{model.n_layers - 1}"]
    close(model.unembed(last), logits, "unembed(resid_post.last) = logits (soft-cap included)")
    close(cache["final_norm"], model.final_norm(last), "final_norm address")
    close(cache["ln_final"], cache["final_norm"], "alias")
    if name == "gemma3":  # the soft-cap is applied: logits lie inside (-cap, cap)
        assert model.weights.softcap == 2.0 and logits.abs().max() < 2.0
        raw = cache["final_norm"] @ model.W_U
        close(torch.tanh(raw / 2.0) * 2.0, logits, "cap * tanh(x / cap)")


def test_decompose_resid_sums_to_the_stream(run):
    _, model, _, _, cache = run
    stack, labels = cache.decompose_resid(return_labels=True)
    L = model.n_layers
    close(stack.sum(0), cache[f"resid_post.{L - 1}"], "sum of components")
    assert labels[-2:] == [f"attn_out.{L - 1}", f"mlp_out.{L - 1}"]
    part = cache.decompose_resid(1)  # before layer 1's input
    close(part.sum(0), cache["resid_pre.1"], "decompose_resid(1) sums to resid_pre.1")
    attn_only = cache.decompose_resid(mode="attn", incl_embeds=False)
    close(attn_only.sum(0), sum(cache[f"attn_out.{i}"] for i in range(L)), "mode=attn")


def test_head_results_plus_bias_sum_to_attn_out(run):
    name, model, _, _, cache = run
    stack, labels = cache.stack_head_results(return_labels=True)
    h = model.cfg.n_heads
    assert labels[: h + 1] == [f"head.0.{i}" for i in range(h)] + ["head.1.0"]
    for layer in range(model.n_layers):
        heads = stack[layer * h : (layer + 1) * h].sum(0)
        bias = 0 if name == "gemma3" else model.b_O[layer]  # Gemma: heads pass its post-norm
        close(heads + bias, cache[f"attn_out.{layer}"], f"{name} layer {layer}")


def test_head_results_from_z_equal_the_cached_result(run):
    _, model, tokens, _, cache = run
    _, with_result = model.run_with_cache(tokens, names=["head.*.result", "head.*", "resid_post.*"])
    for layer in range(model.n_layers):
        w_o = model.W_O[layer]
        close(
            torch.einsum("bphd,hdm->bphm", cache[f"head.{layer}"], w_o),
            with_result[f"head.{layer}.result"],
            "z @ W_O",
        )
    if run[0] != "gemma3":
        close(cache.stack_head_results(), with_result.stack_head_results(), "from z vs cached")


def test_dla_sums_to_the_logit_difference(run):
    name, model, _, logits, cache = run
    true = logits[torch.arange(2), :, T] - logits[torch.arange(2), :, INC]  # [batch, pos]
    const = _bias_constant(model)
    attrs = cache.logit_attrs(cache.decompose_resid(), T, INC)  # [component, batch, pos]
    if name == "gemma3":  # the soft-cap is not linear: DLA explains the logits before it
        raw = cache["final_norm"] @ model.W_U
        true = raw[torch.arange(2), :, T] - raw[torch.arange(2), :, INC]
    close(attrs.sum(0) + (const[T] - const[INC])[:, None], true, "sum of DLA + bias constant")
    # the same through the head stack: heads + every other component
    heads = cache.logit_attrs(cache.stack_head_results(apply_ln=True), T, INC).sum(0)
    rest = cache.decompose_resid(return_labels=True)
    keep = [i for i, lab in enumerate(rest[1]) if not lab.startswith("attn_out")]
    others = cache.logit_attrs(rest[0][keep], T, INC, apply_ln=True).sum(0)
    bias_o = cache.logit_attrs(
        torch.stack([model.b_O[i].expand_as(cache["resid_pre.0"]) for i in range(model.n_layers)]),
        T,
        INC,
        apply_ln=True,
    ).sum(0)
    if name != "gemma3":
        close(heads + others + bias_o + (const[T] - const[INC])[:, None], true, "heads + rest")


def test_accumulated_resid_is_the_logit_lens(run):
    _, model, _, logits, cache = run
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    L = model.n_layers
    assert labels == [f"resid_pre.{i}" for i in range(L)] + [f"resid_post.{L - 1}"]
    raw = cache.accumulated_resid()
    close(raw[1], cache["resid_post.0"], "resid_pre.1 = resid_post.0")
    close(stack, model.final_norm(raw), "each component through the real final norm")
    lens = hs.logit_lens(model, run[2], k=3)
    close(lens.logits(-1), logits, "the lens' last readout is the model's output", atol=1e-4)
    top = logits.softmax(-1).topk(3, dim=-1)
    close(lens.top_probs[-1], top.values, "top-k probabilities of the last readout", atol=1e-5)
    probs = torch.stack([model.unembed(r).softmax(-1) for r in raw])
    close(lens.prob(7), probs[..., 7], "prob of token 7 at every layer", atol=1e-6)
    ranks = (probs > probs[..., 7:8]).sum(-1)
    assert torch.equal(lens.rank(7), ranks)


def test_accumulated_resid_pos_and_mid(run):
    name, model, _, _, cache = run
    at = cache.accumulated_resid(pos=-1)
    close(at, cache.accumulated_resid()[:, :, -1], "pos=-1 drops the axis")
    if name in ("gpt2", "llama_gqa", "gpt_neox_seq", "gemma3"):
        stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
        assert labels[:3] == ["resid_pre.0", "resid_mid.0", "resid_pre.1"]
        close(stack[1], cache["resid_mid.0"], "resid_mid.0")


def test_weights_reproduce_the_cached_activations(run):
    name, model, _, _, cache = run
    hf = model.model
    layer_path = model.adapter.layer_path
    norm1 = {
        "gpt2": "ln_1",
        "gemma3": "input_layernorm",
        "llama_gqa": "input_layernorm",
    }.get(name, "input_layernorm")
    x = submodule(hf, layer_path(1, norm1))(cache["resid_pre.1"])
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    for site in "qkv":
        pred = torch.einsum("bpd,hde->bphe", x, getattr(model, f"W_{site.upper()}")[1])
        pred = pred + getattr(model, f"b_{site.upper()}")[1]
        ref = cache[f"head.1.{site}"]
        if site != "q":
            ref = ref.repeat_interleave(group, dim=2)  # head h reads k/v head h // group
        close(pred, ref, f"{site} = x @ W_{site.upper()} + b")
    out = cache["neuron.1"] @ model.W_out[1] + model.b_out[1]
    mlp_out = cache["mlp_out.1"]
    if name == "gemma3":  # the MLP output passes a post-norm before joining the stream
        mlp_out = submodule(hf, layer_path(1, "post_feedforward_layernorm"))(out)
        close(mlp_out, cache["mlp_out.1"], "post-norm(neuron @ W_out)")
    else:
        close(out, mlp_out, "mlp_out = neuron @ W_out + b_out")
    assert model.W_O.shape == (
        model.n_layers,
        model.cfg.n_heads,
        model.cfg.d_head,
        model.cfg.d_model,
    )
    assert model.W_O[1, 2].shape == (model.cfg.d_head, model.cfg.d_model)
    close(model.W_O.stack()[1], model.W_O[1], "stack")
    gated = name in ("llama_gqa", "gemma3")
    assert (model.W_gate is not None) == gated
    mlp_in = {"gemma3": "pre_feedforward_layernorm", "llama_gqa": "post_attention_layernorm"}
    if gated:
        x2 = submodule(hf, layer_path(1, mlp_in[name]))(
            cache["resid_mid.1"] if "resid_mid.1" in cache else None
        )
        close(x2 @ model.W_gate[1], cache["neuron.1.pre"], "neuron pre = x @ W_gate")
        act = submodule(hf, layer_path(1, "mlp.act_fn"))
        close(act(cache["neuron.1.pre"]) * (x2 @ model.W_in[1]), cache["neuron.1"], "gated")


def test_embedding_weights(run):
    name, model, tokens, _, cache = run
    emb = model.W_E[tokens]
    if name == "gemma3":
        emb = emb * torch.tensor(model.cfg.d_model**0.5, dtype=emb.dtype)  # Gemma's scale
    close(emb, cache["embed"], "W_E[ids] = embed")
    if name == "gpt2":
        close(model.W_pos[: tokens.shape[1]], cache["resid_pre.0"][0] - cache["embed"][0], "W_pos")
        assert model.cfg.d_model == model.W_pos.shape[1]
    else:
        assert model.W_pos is None  # rotary
    assert model.W_U.shape == (model.cfg.d_model, model.cfg.d_vocab)
    assert model.W_U.data_ptr() == model.model.get_output_embeddings().weight.data_ptr()  # a view


# ------------------------------------------------------------------ TransformerLens 4.x


@pytest.fixture(scope="module", params=TL_ARCHS)
def bridged(request, folders):
    """(hookscope cache, raw bridge cache, compatibility-mode bridge cache, model, logits)."""
    from transformer_lens.model_bridge import TransformerBridge

    path = str(folders[request.param])
    model = hs.HookedModel.from_pretrained(path)
    tokens = _tokens(model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    raw = TransformerBridge.boot_transformers(path, device="cpu")
    _, raw_cache = raw.run_with_cache(tokens)
    folded = TransformerBridge.boot_transformers(path, device="cpu")
    folded.enable_compatibility_mode(disable_warnings=True, fold_value_biases=False)
    _, folded_cache = folded.run_with_cache(tokens)
    yield cache, raw_cache, folded_cache, model, logits
    del raw, folded
    gc.collect()


def test_stacks_equal_transformerlens(bridged):
    cache, tl, _, _, _ = bridged
    close(cache.accumulated_resid(), tl.accumulated_resid(), "accumulated_resid")
    close(
        cache.accumulated_resid(apply_ln=True),
        tl.accumulated_resid(apply_ln=True),
        "accumulated_resid(apply_ln=True): the real final norm, own statistics",
    )
    ours, our_labels = cache.decompose_resid(return_labels=True)
    theirs, their_labels = tl.decompose_resid(return_labels=True)
    close(ours, theirs, "decompose_resid")
    assert len(our_labels) == len(their_labels)
    close(cache.stack_head_results(), tl.stack_head_results(), "stack_head_results")
    close(cache.stack_head_results(pos=-1), tl.stack_head_results(pos_slice=-1), "pos=-1")


def test_logit_attrs_equal_transformerlens_with_folded_norm(bridged):
    """With the final norm's weight folded into W_U (compatibility mode), TransformerLens'
    logit_attrs of raw stacks equal hookscope's, which apply the weight explicitly."""
    cache, _, folded, _, _ = bridged
    for ours, theirs, what in [
        (cache.decompose_resid(), folded.decompose_resid(), "decompose_resid"),
        (cache.stack_head_results(), folded.stack_head_results(), "stack_head_results"),
    ]:
        close(cache.logit_attrs(ours, T, INC), folded.logit_attrs(theirs, T, INC), what)
    close(
        cache.logit_attrs(cache.decompose_resid(pos=-1), T, INC, pos=-1),
        folded.logit_attrs(folded.decompose_resid(pos_slice=-1), T, INC, pos_slice=-1),
        "at the last position",
    )


def test_where_transformerlens_differs(bridged):
    """The two conventions behind the issue's 0.043-vs-2.855 on SmolLM2 head 23.3.

    1. The raw bridge's apply_ln_to_stack divides by the cached scale but leaves out the final
       norm's weight (TransformerLens expects it folded into W_U), so its normalised stacks
       are hookscope's divided by the weight.
    2. TransformerLens' logit_attrs applies the final norm itself, so passing a stack made with
       apply_ln=True divides by the scale twice. hookscope's logit_attrs applies it once.
    """
    cache, tl, _, model, logits = bridged
    w = model.weights.norm_weight()
    ours = cache.stack_head_results(apply_ln=True)
    close(tl.stack_head_results(apply_ln=True), ours / w, "TL omits the norm weight")
    scale = model.weights.scale(cache[f"resid_post.{model.n_layers - 1}"])
    direction = model.W_U[:, T].T - model.W_U[:, INC].T  # [batch, d_model]
    twice = ((ours / w / scale) * direction[:, None]).sum(-1)
    close(tl.logit_attrs(tl.stack_head_results(apply_ln=True), T, INC), twice, "twice")
    once = cache.logit_attrs(ours, T, INC)
    close(once, (ours * direction[:, None]).sum(-1), "hookscope: once")
    close(cache.logit_attrs(cache.stack_head_results(), T, INC), once, "raw stack: same")


# ------------------------------------------------------------------ provenance and errors


def test_logit_attrs_knows_which_stacks_are_normalised(run):
    _, model, _, _, cache = run
    normed = cache.decompose_resid(apply_ln=True)
    raw = cache.decompose_resid()
    ref = cache.logit_attrs(raw, T, INC)
    close(cache.logit_attrs(normed, T, INC), ref, "normalised stack used as is")
    close(cache.logit_attrs(normed[:, :, -1], T, INC, pos=-1), ref[:, :, -1], "a view of it")
    close(cache.logit_attrs(normed.clone(), T, INC, apply_ln=False), ref, "told: normalised")
    close(cache.logit_attrs(raw.clone(), T, INC, apply_ln=True), ref, "told: raw")
    close(cache.apply_ln_to_stack(raw), normed, "apply_ln_to_stack")
    with pytest.raises(hs.InputError, match="cannot tell whether this stack is normalised"):
        cache.logit_attrs(raw.clone(), T, INC)
    with pytest.raises(hs.InputError, match="twice"):
        cache.logit_attrs(normed, T, INC, apply_ln=True)
    with pytest.raises(hs.InputError, match="already normalised"):
        cache.apply_ln_to_stack(normed)
    one = cache.logit_attrs(cache["attn_out.0"][None], 3)  # a cached activation: raw
    close(one, cache.logit_attrs(raw, 3)[2 if model.W_pos is not None else 1][None], "cached")


def test_logit_attrs_token_forms(run):
    name, model, tokens, _, cache = run
    stack = cache.decompose_resid(apply_ln=True)
    tok = model.tokenizer
    text = next(
        t for t in (" the", " and", "e") if len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    )
    tid = tok(text, add_special_tokens=False)["input_ids"][0]
    close(cache.logit_attrs(stack, text), cache.logit_attrs(stack, tid), "text = id")
    per_pos = torch.full(tokens.shape, tid)
    close(cache.logit_attrs(stack, per_pos), cache.logit_attrs(stack, tid), "[batch, pos] ids")
    with pytest.raises(hs.InputError, match="exactly one token"):
        cache.logit_attrs(stack, " the keys to the cabinet")
    with pytest.raises(hs.InputError, match="same shape"):
        cache.logit_attrs(stack, T, 5)
    with pytest.raises(hs.InputError, match="vocabulary size"):
        cache.logit_attrs(stack, model.cfg.d_vocab)


def test_argument_errors(run):
    _, model, tokens, _, cache = run
    L = model.n_layers
    with pytest.raises(hs.InputError, match="apply_ln=True applies the final norm"):
        cache.decompose_resid(1, apply_ln=True)
    with pytest.raises(hs.InputError, match=f"0-{L}"):
        cache.accumulated_resid(L + 1)
    with pytest.raises(hs.InputError, match="mode must be one of all, attn, mlp"):
        cache.decompose_resid(mode="heads")
    with pytest.raises(hs.InputError, match="pos must be None, an int or a slice"):
        cache.decompose_resid(pos="last")
    _, partial = model.run_with_cache(tokens, names="attn_out.*")
    with pytest.raises(hs.CacheKeyError, match=f"needs resid_post.{L - 1}"):
        partial.logit_attrs(partial["attn_out.0"][None], 3)
    with pytest.raises(hs.CacheKeyError, match="per-head results .* are opt-in"):
        cache["head.0.1.result"]


def test_a_cache_does_not_keep_its_model_alive_and_says_so():
    hf = builders.tiny_llama_gqa()
    _, cache = hs.HookedModel.wrap(hf).run_with_cache(_tokens(500))
    gc.collect()
    with pytest.raises(hs.InputError, match="keep the HookedModel alive, or call cache.bind"):
        cache.decompose_resid()
    model = hs.HookedModel.wrap(hf)
    assert cache.bind(model).decompose_resid().shape[0] == 1 + 2 * 2


def test_models_without_a_readout_say_why():
    cnn = hs.HookedModel.wrap(builders.tiny_cnn())
    with pytest.raises(hs.SiteUnavailableError, match="not a transformer.*output head is module:8"):
        cnn.W_U
    with pytest.raises(hs.SiteUnavailableError, match="not a transformer"):
        hs.logit_lens(cnn, torch.randn(1, 1, 8, 8))
    bert = hs.HookedModel.wrap(builders.tiny_bert())
    with pytest.raises(hs.SiteUnavailableError, match="post-LayerNorm"):
        bert.final_norm(torch.zeros(1, 2, 32))
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(0))
    logits, cache = bert.run_with_cache(ids)
    close(bert.unembed(cache["resid_post.1"]), logits, "BERT: MLM transform + decoder")
    with pytest.raises(hs.SiteUnavailableError, match="post-LayerNorm"):
        cache.decompose_resid()


def test_vit_reads_out_through_its_classifier_head():
    vit = hs.HookedModel.wrap(builders.tiny_vit())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    logits, cache = vit.run_with_cache(x)
    assert vit.W_U.shape == (32, 10)  # the classifier head: [d_model, n_classes]
    close(vit.unembed(cache["resid_post.1"])[:, 0], logits, "head(ln_final(CLS))")
    assert vit.W_pos.shape == (1 + 16, 32)
    stack = cache.decompose_resid()
    close(stack.sum(0), cache["resid_post.1"], "ViT components sum to the stream")
    with pytest.raises(hs.SiteUnavailableError, match="patches, not a lookup table"):
        vit.W_E


def test_final_norm_is_a_hook_site(run):
    name, model, tokens, logits, _ = run
    zeroed = model.run_with_hooks(tokens, hooks=[("ln_final", lambda act, address: act * 0)])
    expected = model.b_U.expand_as(logits)
    if name == "gemma3":
        expected = torch.tanh(expected / 2.0) * 2.0
    close(zeroed, expected, "zero final norm output -> logits = b_U")
    assert hs.parse("ln_final.hook_normalized") == hs.FinalNorm()
    assert hs.FinalNorm() in model.addresses()
    from hookscope import interventions as iv

    corrupted = tokens.flip(1)
    res = iv.activation_patching(
        model, tokens, corrupted, iv.logit_diff(3, 5), sites="final_norm", progress=False
    )
    assert float(res.scores.reshape(-1)[0]) == pytest.approx(1.0, abs=1e-4)  # restores clean


@pytest.mark.optional_model
def test_smollm2_head_23_3_against_transformerlens():
    """The issue's numbers: TransformerLens' raw bridge gives 0.043 for head 23.3 with
    stack_head_results(apply_ln=True) + logit_attrs (the norm applied twice, its weight left
    out); hookscope gives 2.855, what the cache gives by hand."""
    from transformer_lens.model_bridge import TransformerBridge

    from hookscope.zoo import packaged

    try:
        model = hs.zoo.load("smollm2-135m")
    except hs.ModelLoadError:
        pytest.skip("smollm2-135m is not installed (make models)")
    toks = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    _, cache = model.run_with_cache(toks)
    ours = cache.logit_attrs(
        cache.stack_head_results(apply_ln=True, pos=-1), " Mary", " John", pos=-1
    )
    bridge = TransformerBridge.boot_transformers(str(packaged.prepared_folder("smollm2-135m")))
    _, tl = bridge.run_with_cache(toks)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    theirs = tl.logit_attrs(
        tl.stack_head_results(apply_ln=True, pos_slice=-1), mary, john, pos_slice=-1
    )
    head = 23 * 9 + 3
    assert float(ours[head, 0]) == pytest.approx(2.855, abs=1e-3)
    assert float(theirs[head, 0]) == pytest.approx(0.043, abs=1e-3)
    # by hand: the head's result through the frozen final RMSNorm, dotted with W_U[Mary - John]
    z = cache["head.23.3"][0, -1]
    result = z @ model.W_O[23, 3]
    scale = model.weights.scale(cache["resid_post.29"])[0, -1]
    by_hand = (result / scale * model.weights.norm_weight()) @ (
        model.W_U[:, mary] - model.W_U[:, john]
    )
    assert float(by_hand) == pytest.approx(float(ours[head, 0]), abs=1e-4)


# ------------------------------------------------------------------ review findings


def test_lens_stacks_and_the_final_norm_output_are_used_as_they_are(run):
    name, model, _, logits, cache = run
    acc = cache.accumulated_resid(apply_ln=True)
    raw = logits if name != "gemma3" else cache["final_norm"] @ model.W_U + model.b_U
    got = cache.logit_attrs(acc, 3)[-1]  # the lens' last row: normalised with the bias
    close(got + model.b_U[3], raw[..., 3], "accumulated_resid(apply_ln=True) is not re-normalised")
    close(cache.logit_attrs(cache["final_norm"], 3) + model.b_U[3], raw[..., 3], "final_norm")
    with pytest.raises(hs.InputError, match="already normalised"):
        cache.apply_ln_to_stack(acc)
    with pytest.raises(hs.InputError, match="head.0 is not a residual-stream vector"):
        cache.logit_attrs(cache["head.0.3"], 3)
    with pytest.raises(hs.InputError, match="logits is not a residual-stream vector"):
        cache.logit_attrs(cache["logits"], 3)


def test_accumulated_resid_counts_layers_as_transformerlens(run):
    _, model, _, _, cache = run
    L = model.n_layers
    for layer in range(L):
        _, labels = cache.accumulated_resid(layer, return_labels=True)
        assert labels == [f"resid_pre.{i}" for i in range(layer + 1)]
    _, labels = cache.accumulated_resid(L, return_labels=True)
    assert labels[-1] == f"resid_post.{L - 1}" and len(labels) == L + 1


def test_per_position_tokens_follow_the_pos_slice(run):
    _, model, tokens, _, cache = run
    stack = cache.decompose_resid(apply_ln=True)
    ids = torch.randint(
        0, model.cfg.d_vocab, tokens.shape, generator=torch.Generator().manual_seed(2)
    )
    full = cache.logit_attrs(stack, ids)
    close(
        cache.logit_attrs(
            cache.decompose_resid(apply_ln=True, pos=slice(-1, None)), ids, pos=slice(-1, None)
        ),
        full[..., -1:],
        "slice",
    )
    close(
        cache.logit_attrs(cache.decompose_resid(apply_ln=True, pos=-1), ids, pos=-1),
        full[..., -1],
        "int",
    )
    with pytest.raises(hs.InputError, match="tokens give directions for"):
        cache.logit_attrs(stack, torch.tensor([1, 2, 3]))
    with pytest.raises(hs.InputError, match="tokens give directions for"):
        cache.logit_attrs(stack, torch.zeros(3, tokens.shape[1], dtype=torch.long))


def test_mistakes_get_hookscope_errors(run):
    name, model, tokens, _, cache = run
    with pytest.raises(hs.AddressRangeError, match="head 9 out of range"):
        model.W_Q[0, 9]
    lens = hs.logit_lens(model, tokens, k=2)
    with pytest.raises(hs.InputError, match="one token per row needs 2 ids"):
        lens.prob(torch.tensor([1, 2, 3]))
    with pytest.raises(hs.InputError, match="batch must be an int in 0-1"):
        lens.plot(batch=5)
    with pytest.raises(hs.InputError, match="positions must be a slice"):
        lens.plot(positions=[1, 2])
    if name == "gpt_neox":  # parallel residual: no resid_mid
        with pytest.raises(hs.InputError, match="this model does not have"):
            cache.accumulated_resid(incl_mid=True)


def test_vision_and_mlp_caches_say_why():
    mlp = hs.HookedModel.wrap(builders.tiny_mlp())
    _, cache = mlp.run_with_cache(torch.randn(2, 64))
    with pytest.raises(hs.SiteUnavailableError, match="not a transformer"):
        cache.accumulated_resid()
    vit = hs.HookedModel.wrap(builders.tiny_vit())
    lens = hs.logit_lens(vit, torch.randn(2, 1, 8, 8))
    assert lens.str_tokens() == ["CLS"] + [f"patch {i}" for i in range(16)]
    assert lens.plot().axes[0].images[0].get_array().shape == (3, 17)
