"""What the argument checks accept, with the values it gives (the refusals are in
``test_bad_inputs.py``): dtype names, floating inputs cast to the model's dtype, keyword
arguments a forward takes, hook replacements of another dtype, hooks given as a dict."""

import pytest
import torch

import hookscope as hs

import builders

TOK = torch.randint(1, 400, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def neox():
    return hs.HookedModel.wrap(builders.tiny_neox(), tokenizer=builders.make_tokenizer())


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("float64", torch.float64),
        (torch.float16, torch.float16),
    ],
)
def test_dtype_names_in_run_with_cache_and_cache_to(neox, name, dtype):
    _, cache = neox.run_with_cache(TOK, ["resid_post.0", "head.1"], dtype=name)
    assert cache["resid_post.0"].dtype == dtype and cache["head.1"].dtype == dtype
    _, plain = neox.run_with_cache(TOK, ["resid_post.0", "head.1"])
    moved = plain.to(dtype=name)
    assert torch.equal(moved["resid_post.0"], plain["resid_post.0"].to(dtype))
    assert moved.to(device="cpu")["head.1"].device.type == "cpu"


@pytest.mark.parametrize("build", [builders.tiny_cnn, builders.tiny_mlp, builders.tiny_vit])
def test_float64_images_are_cast_to_the_model_dtype(build):
    """A float32 vision model given float64 images computes on the images cast to float32:
    the same logits as float32 images, bit for bit."""
    module = build()
    model = hs.HookedModel.wrap(module)
    images = torch.randn(
        3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = module(images.float())
        got = model(images)
        _, cache = model.run_with_cache(images, "resid_post.0")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert cache["resid_post.0"].dtype == torch.float32


def test_float32_images_into_a_float64_model():
    module = builders.tiny_cnn().double()
    model = hs.HookedModel.wrap(module)
    images = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        got = model(images)
        expected = module(images.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_token_ids_are_not_cast(neox):
    """Integer ids stay integers (int32 ids are read as they are)."""
    with torch.no_grad():
        torch.testing.assert_close(neox(TOK.int()), neox(TOK), atol=0, rtol=0)


def test_keywords_the_forward_takes(neox):
    """Named forward parameters and Hugging Face's own switches pass; a tokenizer dict's
    token_type_ids, which GPT-NeoX does not take, is dropped (as transformers does)."""
    with torch.no_grad():
        plain = neox(TOK)
        mask = torch.ones_like(TOK)
        torch.testing.assert_close(neox(TOK, attention_mask=mask), plain, atol=0, rtol=0)
        torch.testing.assert_close(neox(TOK, output_attentions=False), plain, atol=0, rtol=0)
        enc = {"input_ids": TOK, "attention_mask": mask, "token_type_ids": torch.zeros_like(TOK)}
        torch.testing.assert_close(neox(enc), plain, atol=0, rtol=0)
        gpt2 = hs.HookedModel.wrap(builders.tiny_gpt2())
        types = torch.zeros_like(TOK)
        expected = gpt2.model(TOK, token_type_ids=types).logits
        torch.testing.assert_close(gpt2(TOK, token_type_ids=types), expected, atol=0, rtol=0)


def test_unknown_keywords_of_modules_that_take_any_pass_through():
    """A plain module whose forward takes ``**kwargs`` gets every keyword."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3)

        def forward(self, x, **kwargs):
            return self.a(x) * kwargs.get("scale", 1.0)

    model = hs.HookedModel.wrap(Scaled(), adapter="module")
    x = torch.randn(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, scale=2.0), model.model(x) * 2.0)


def test_hook_replacement_of_another_floating_dtype_is_cast(neox):
    """A float64 replacement is cast to the activation's float32 (as Tensor.copy_ does)."""
    target = torch.randn(2, 7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, cache = neox.run_with_cache(
        TOK, "resid_post.0", hooks=[("resid_post.0", lambda act, address: target)]
    )
    assert cache["resid_post.0"].dtype == torch.float32
    torch.testing.assert_close(cache["resid_post.0"], target.float(), atol=0, rtol=0)


def test_hooks_as_a_dict_equal_hooks_as_a_list(neox):
    def zero(act, address):
        return torch.zeros_like(act)

    with torch.no_grad():
        as_list = neox.run_with_hooks(TOK, hooks=[("head.0.1", zero), ("neuron.1.3", zero)])
        as_dict = neox.run_with_hooks(TOK, hooks={"head.0.1": zero, "neuron.1.3": zero})
    torch.testing.assert_close(as_dict, as_list, atol=0, rtol=0)
    assert not torch.equal(as_list, neox(TOK))


def test_partial_and_callable_object_hooks_are_accepted(neox):
    """Hooks are checked by what they can be called with: a partial leaving two arguments,
    an object with ``__call__(self, act, address)``."""
    import functools

    seen = []

    def record(tag, act, address):
        seen.append((tag, str(address), tuple(act.shape)))

    class Recorder:
        def __call__(self, act, address, scale=1.0):
            seen.append(("object", str(address), tuple(act.shape)))

    with torch.no_grad():
        neox.run_with_hooks(TOK, hooks=[("resid_post.1", functools.partial(record, "partial"))])
        neox.run_with_hooks(TOK, hooks=[("resid_post.1", Recorder())])
    assert seen == [("partial", "resid_post.1", (2, 7, 64)), ("object", "resid_post.1", (2, 7, 64))]
