"""ActivationCache: lookups, views, stacking, moving, memory, gradients, and no model reference."""

import gc
import weakref

import pytest
import torch

import hookscope as hs

import builders

TOKS = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def neox():
    return hs.HookedModel.wrap(builders.tiny_neox())


def test_per_head_and_neuron_entries_are_views(neox):
    _, cache = neox.run_with_cache(
        TOKS, names=["head.1", "head.1.q", "head.1.k", "head.1.v", "neuron.0"]
    )
    assert (
        cache["head.1.2"].untyped_storage().data_ptr()
        == cache["head.1"].untyped_storage().data_ptr()
    )
    assert (
        cache["neuron.0.5"].untyped_storage().data_ptr()
        == cache["neuron.0"].untyped_storage().data_ptr()
    )
    # q, k, v are views of one fused projection output: stored once
    ptrs = {cache[f"head.1.{s}"].untyped_storage().data_ptr() for s in "qkv"}
    assert len(ptrs) == 1
    fused = 2 * 6 * 3 * 64 * 4
    z = 2 * 6 * 64 * 4
    neurons = 2 * 6 * 128 * 4
    assert cache.nbytes == fused + z + neurons


def test_keys_follow_the_request(neox):
    _, cache = neox.run_with_cache(TOKS, names=["head.0.*", "resid_post.1"])
    assert list(cache) == [hs.AttentionHead(0, h) for h in range(4)] + [hs.Residual(1)]
    assert len(cache) == 5
    assert set(cache.select("head.0.1-2")) == {hs.AttentionHead(0, 1), hs.AttentionHead(0, 2)}
    _, everything = neox.run_with_cache(TOKS)
    assert (
        hs.Residual(0, "pre") in everything.keys()
        and hs.AttentionHead(1, None, "pattern") in everything.keys()
    )
    assert hs.AttentionHead(1, None, "result") not in everything.keys()  # per-head result is opt-in


def test_stack(neox):
    _, cache = neox.run_with_cache(TOKS, names=["resid_post.*", "head.*"])
    stacked = cache.stack("resid_post")
    assert stacked.shape == (2, 2, 6, 64)
    assert torch.equal(stacked[1], cache["resid_post.1"])
    assert torch.equal(cache.stack("head")[0], cache["head.0"])
    assert torch.equal(cache.stack("resid_post", layers=[1])[0], cache["resid_post.1"])


def test_to_device_and_dtype(neox):
    _, cache = neox.run_with_cache(TOKS, names=["resid_post.*", "head.0.q"])
    half = cache.to(dtype=torch.float16)
    assert half["resid_post.0"].dtype == torch.float16
    torch.testing.assert_close(
        half["resid_post.0"].float(), cache["resid_post.0"], atol=1e-2, rtol=1e-2
    )
    assert torch.equal(half["head.0.3.q"].float(), cache["head.0.3.q"].half().float())
    _, direct = neox.run_with_cache(TOKS, names="resid_post.0", dtype=torch.float64)
    assert direct["resid_post.0"].dtype == torch.float64


def test_text_and_dataframe(neox):
    _, cache = neox.run_with_cache(TOKS, names=["resid_post.0", "head.1.pattern"])
    text = repr(cache)
    assert (
        "ActivationCache: 2 tensors" in text and "head.1.pattern" in text and "[2, 4, 6, 6]" in text
    )
    df = cache.to_pandas()
    assert list(df["address"]) == ["resid_post.0", "head.1.pattern"]  # forward order
    assert df.loc[df.address == "resid_post.0", "bytes"].item() == 2 * 6 * 64 * 4


def test_cache_does_not_keep_the_model_alive():
    hf = builders.tiny_neox()
    model = hs.HookedModel.wrap(hf)
    _, cache = model.run_with_cache(
        TOKS, names=["resid_post.*", "head.*.*", "head.0.pattern"], backward=lambda x: x.sum()
    )
    ref = weakref.ref(hf)
    del hf, model
    gc.collect()
    assert ref() is None
    assert cache["resid_post.1"].shape == (2, 6, 64)


def test_backward_cache_matches_hf_retain_grad():
    hf = builders.tiny_neox().double()
    model = hs.HookedModel.wrap(hf)

    def metric(logits):
        return logits[:, -1, 7].sum() - logits[:, -1, 3].sum()

    out = hf(TOKS, output_hidden_states=True)
    for h in out.hidden_states:
        h.retain_grad()
    metric(out.logits).backward()
    hf.zero_grad(set_to_none=True)
    _, cache = model.run_with_cache(TOKS, names=["resid_pre.*"], backward=metric)
    for layer in range(2):
        torch.testing.assert_close(
            cache.grad(f"resid_pre.{layer}"), out.hidden_states[layer].grad, atol=1e-12, rtol=1e-9
        )
    torch.testing.assert_close(cache.backward_value, metric(out.logits).detach())
    assert all(p.grad is None for p in hf.parameters())  # no parameter gradient accumulated


@pytest.mark.parametrize(
    "address",
    [
        "head.1.2",
        "head.0.3.q",
        "head.1.0.pattern",
        "head.0.1.result",
        "neuron.1.17",
        "neuron.0.5.pre",
        "attn_out.1",
        "embed",
    ],
)
def test_gradients_match_finite_differences(address):
    hf = builders.tiny_neox().double()
    model = hs.HookedModel.wrap(hf)

    def metric(logits):
        return logits[:, -1, 7].sum()

    _, cache = model.run_with_cache(TOKS, names=[address], backward=metric)
    grad = cache.grad(address)
    direction = torch.randn(
        grad.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    eps = 1e-5

    def shifted(sign):
        with torch.no_grad():
            out = model.run_with_hooks(
                TOKS, hooks=[(address, lambda act, a: act + sign * eps * direction)]
            )
        return metric(out)

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    torch.testing.assert_close((grad * direction).sum(), numeric, atol=1e-6, rtol=1e-5)


def test_gradients_with_frozen_weights():
    hf = builders.tiny_neox().double().requires_grad_(False)
    model = hs.HookedModel.wrap(hf)
    _, cache = model.run_with_cache(
        TOKS, names=["resid_pre.0", "resid_post.1"], backward=lambda x: x[:, -1, 7].sum()
    )
    assert cache.grad("resid_pre.0").abs().sum() > 0
    assert cache.grads["resid_post.1"].shape == (2, 6, 64)
