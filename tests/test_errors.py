"""Every user mistake raises a HookscopeError that names what was wrong and the valid choices."""

import pytest
import torch
from torch import nn

import hookscope as hs

import builders


@pytest.fixture(scope="module")
def neox():
    return hs.HookedModel.wrap(builders.tiny_neox())


TOKS = torch.randint(0, 500, (1, 5), generator=torch.Generator().manual_seed(0))

CACHE_NAME_ERRORS = [
    (
        "resid_post.2",
        hs.AddressRangeError,
        r"layer 2 out of range: this gpt_neox model has 2 layers \(0-1\)",
    ),
    (
        "head.0.4",
        hs.AddressRangeError,
        r"head 4 out of range in head.0.4: layer 0 has 4 heads \(0-3\)",
    ),
    (
        "neuron.1.128",
        hs.AddressRangeError,
        r"neuron 128 out of range in neuron.1.128: layer 1 has 128 neurons \(0-127\)",
    ),
    ("head.*.2-9", hs.AddressRangeError, r"head 9 out of range: valid heads are 0-3"),
    ("resid_post.0-5", hs.AddressRangeError, r"layer 5 out of range: valid layers are 0-1"),
    (
        "resid_mid.0",
        hs.SiteUnavailableError,
        r"resid_mid.L does not exist on this gpt_neox model; available here: .*resid_pre.L",
    ),
    (
        "module:gpt_neox.layers.7",
        hs.SiteUnavailableError,
        r"module 'gpt_neox.layers.7' does not exist .* Did you mean 'gpt_neox.layers.1'",
    ),
    ("resid_pots.0", hs.AddressParseError, r"Did you mean 'resid_post'"),
    (
        "head.0.1.patern",
        hs.AddressParseError,
        r"valid sites: z, q, k, v, pattern, result. Did you mean 'pattern'",
    ),
    (
        42,
        hs.AddressParseError,
        r"expected an address, a selection string or a list of them, got int",
    ),
]


@pytest.mark.parametrize("names, error, message", CACHE_NAME_ERRORS)
def test_bad_names(neox, names, error, message):
    with pytest.raises(error, match=message):
        neox.run_with_cache(TOKS, names=names)
    with pytest.raises(hs.HookscopeError):
        neox.run_with_hooks(TOKS, hooks=[(names, lambda a, _: None)])


INPUT_ERRORS = [
    (
        torch.zeros(1, 5),
        r"token ids must be an integer tensor \(torch.long\), got dtype torch.float32",
    ),
    (
        torch.zeros(1, 2, 5, dtype=torch.long),
        r"token ids must be \[batch, pos\] or \[pos\], got shape \(1, 2, 5\)",
    ),
    (
        torch.tensor([[1, 2, 500]]),
        r"token ids must lie in 0-499 \(vocabulary size 500\); found 1..500",
    ),
    (torch.tensor([[-1, 2]]), r"found -1..2"),
    (torch.zeros(1, 0, dtype=torch.long), r"empty"),
    ("some text", r"this model has no tokenizer; pass token ids"),
    (3.5, r"model input must be a tensor, a string or a list of strings, got float"),
    ({"attention_mask": torch.ones(1, 3)}, r"a dict input needs 'input_ids'"),
]


@pytest.mark.parametrize("inputs, message", INPUT_ERRORS)
def test_bad_inputs(neox, inputs, message):
    with pytest.raises(hs.InputError, match=message):
        neox(inputs)
    with pytest.raises(hs.InputError, match=message):
        neox.run_with_cache(inputs)


def test_bad_hook_specs(neox):
    with pytest.raises(hs.InputError, match=r"each hook must be an \(address, fn\) pair"):
        neox.run_with_hooks(TOKS, hooks=["resid_post.0"])
    with pytest.raises(hs.InputError, match="hooks must be a list of"):
        neox.run_with_hooks(TOKS, hooks=5)


def test_token_lists_and_position_limit():
    gpt2 = hs.HookedModel.wrap(builders.tiny_gpt2())
    assert torch.equal(gpt2([[1, 2, 3]]), gpt2(torch.tensor([[1, 2, 3]])))
    with pytest.raises(
        hs.InputError, match="65 positions exceed this gpt2 model's 64 learned position embeddings"
    ):
        gpt2(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(hs.InputError, match="must be a tensor"):
        gpt2([[1, 2], [3]])  # ragged


def test_vision_shape_errors():
    cnn = hs.HookedModel.wrap(builders.tiny_cnn())
    with pytest.raises(
        hs.InputError,
        match=r"cnn expects input \[batch, 1, ...\] with 4 dimensions, got shape \(2, 3, 8, 8\)",
    ):
        cnn(torch.zeros(2, 3, 8, 8))
    with pytest.raises(hs.InputError, match="input must be a float tensor, got torch.int64"):
        cnn(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    mlp = hs.HookedModel.wrap(builders.tiny_mlp())
    with pytest.raises(
        hs.InputError,
        match=r"mlp expects \[batch, 64\] input \(after flattening\), got shape \(2, 1, 7, 7\)",
    ):
        mlp(torch.zeros(2, 1, 7, 7))
    vit = hs.HookedModel.wrap(builders.tiny_vit())
    with pytest.raises(
        hs.InputError,
        match=r"vit expects a float image tensor \[batch, 1, 8, 8\], got shape \(2, 1, 6, 6\)",
    ):
        vit(torch.zeros(2, 1, 6, 6))


def test_cache_lookup_errors(neox):
    _, cache = neox.run_with_cache(TOKS, names=["resid_post.0", "head.1"])
    with pytest.raises(
        hs.CacheKeyError,
        match=r"resid_post.1 was not cached; cached: resid_post.0, head.1. Did you mean 'resid_post.0'",
    ):
        cache["resid_post.1"]
    with pytest.raises(KeyError):  # also a KeyError, for generic code
        cache["resid_post.1"]
    with pytest.raises(
        hs.CacheKeyError, match=r"is a selection, not one address; use cache.select"
    ):
        cache["head.1.*"]
    with pytest.raises(
        hs.CacheKeyError, match=r"cannot stack 'resid_pre': cached kinds are resid_post, z"
    ):
        cache.stack("resid_pre")
    with pytest.raises(hs.CacheKeyError, match="pass backward=metric"):
        cache.grad("resid_post.0")
    assert "resid_post.1" not in cache and "head.1.3" in cache


def test_model_level_errors(neox):
    with pytest.raises(hs.AddressError, match="unknown kind 'heads'.*Did you mean 'head'"):
        neox.addresses("heads")
    with pytest.raises(
        hs.AdapterError,
        match="unknown adapter 'gtp2'; choose one of: auto, gpt_neox, gpt2.*Did you mean 'gpt2'",
    ):
        hs.HookedModel.wrap(nn.Linear(2, 2), adapter="gtp2")
    with pytest.raises(hs.AdapterError, match="can only wrap a torch.nn.Module, got str"):
        hs.HookedModel.wrap("gpt2")  # type: ignore[arg-type]
    with pytest.raises(hs.AdapterError, match="does not look like a gpt2 model"):
        hs.HookedModel.wrap(builders.tiny_cnn(), adapter="gpt2")
    with pytest.raises(
        hs.InputError, match="backward must return a scalar tensor, got \\(1, 5, 500\\)"
    ):
        neox.run_with_cache(TOKS, names="resid_post.0", backward=lambda logits: logits)


def test_load_errors(tmp_path):
    with pytest.raises(
        hs.ModelLoadError, match="could not load a model config from .*save_pretrained"
    ):
        hs.HookedModel.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(hs.InputError, match="unknown dtype 'fp33'; choose one of float32"):
        hs.HookedModel.from_pretrained(str(tmp_path), dtype="fp33")


def test_unknown_module_gets_module_adapter():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.emb = nn.Embedding(4, 3)

        def forward(self, x):
            return self.a(x)

    model = hs.HookedModel.wrap(Odd())
    assert model.adapter.name == "module"
    with pytest.raises(
        hs.SiteUnavailableError,
        match="resid_post.L does not exist on this module model; available here: module:<path>",
    ):
        model.run_with_cache(torch.zeros(2, 3), names="resid_post.0")
    x = torch.randn(2, 3)
    out, cache = model.run_with_cache(x, names="module:a")
    assert torch.equal(cache["module:a"], out)
