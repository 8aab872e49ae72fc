"""Saliency, integrated gradients and Grad-CAM against captum, closed forms and direct
torch computations."""

import ast
import re

import numpy as np
import pytest
import torch
from captum.attr import (
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    LayerIntegratedGradients,
    Saliency,
)
from torch import nn

import hookscope as hs
from hookscope import attribution as at
from hookscope.errors import InputError

import builders

TOL = 1e-5


@pytest.fixture(scope="module")
def digits():
    X, y = hs.data.digits("test", tensors=True)
    return X[:24], y[:24]


@pytest.fixture(scope="module")
def cnn():
    return hs.zoo.load("digits-cnn")


@pytest.fixture(scope="module")
def mlp():
    return hs.zoo.load("digits-mlp")


@pytest.fixture(scope="module")
def gpt2():
    return hs.HookedModel.wrap(builders.tiny_gpt2(), tokenizer=builders.make_tokenizer())


# ------------------------------------------------------------------ captum, digits


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
@pytest.mark.parametrize("absolute", [True, False])
def test_saliency_equals_captum(name, absolute, digits):
    X, y = digits
    model = hs.zoo.load(name)
    ours = at.saliency(model, X, target=y, absolute=absolute)
    ref = Saliency(model.model).attribute(X.clone().requires_grad_(), target=y, abs=absolute)
    assert ours.values.shape == X.shape
    torch.testing.assert_close(ours.values, ref, atol=TOL, rtol=0)
    # batched in pieces: the same
    parts = at.saliency(model, X, target=y, absolute=absolute, batch_size=7)
    torch.testing.assert_close(parts.values, ours.values, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
@pytest.mark.parametrize(
    "method", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"]
)
def test_integrated_gradients_equals_captum(name, method, digits):
    X, y = digits
    model = hs.zoo.load(name)
    ours = at.integrated_gradients(model, X, target=y, n_steps=24, method=method)
    ref, delta = IntegratedGradients(model.model).attribute(
        X, target=y, n_steps=24, method=method, return_convergence_delta=True
    )
    torch.testing.assert_close(ours.values, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.delta, delta, atol=TOL, rtol=0)
    # internal batches of any size (not a multiple of the batch) give the same result
    chunked = at.integrated_gradients(
        model, X, target=y, n_steps=24, method=method, internal_batch_size=37
    )
    torch.testing.assert_close(chunked.values, ours.values, atol=TOL, rtol=0)


def test_integrated_gradients_baseline_and_callable_target_equal_captum(cnn, digits):
    X, y = digits
    base = torch.full_like(X[:1], 0.25)
    metric = lambda logits: logits[:, 3] - logits[:, 5]  # noqa: E731
    ours = at.integrated_gradients(cnn, X, target=metric, baseline=base[0], n_steps=16)
    ref = IntegratedGradients(lambda x: metric(cnn.model(x))).attribute(
        X, baselines=base.expand_as(X), n_steps=16
    )
    torch.testing.assert_close(ours.values, ref, atol=TOL, rtol=0)
    assert ours.targets is None


def test_quadrature_weights():
    for method in at.METHODS:
        alphas, weights = at.quadrature(method, 9)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)  # the path has length 1
        assert 0.0 <= alphas.min() and alphas.max() <= 1.0
        # exact for a linear integrand (left/right Riemann: exact up to the 1/(2n) bias)
        integral = (weights * alphas).sum()
        if method in ("riemann_left", "riemann_right"):
            assert integral == pytest.approx(0.5 + (0.5 if method == "riemann_right" else -0.5) / 9)
        else:
            assert integral == pytest.approx(0.5, abs=1e-12)
    alphas, weights = at.quadrature("gausslegendre", 5)
    assert (weights * alphas**9).sum() == pytest.approx(0.1, abs=1e-12)  # degree 2n-1 exact


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_completeness_and_delta_shrinks(name, digits):
    X, y = digits
    model = hs.zoo.load(name)
    with torch.no_grad():
        gap = (
            model(X).gather(1, y[:, None])[:, 0]
            - model(torch.zeros_like(X)).gather(1, y[:, None])[:, 0]
        )
    mean_delta = []
    for n in (4, 16, 128):
        ig = at.integrated_gradients(model, X, target=y, n_steps=n, method="riemann_middle")
        sums = ig.values.sum((1, 2, 3))
        torch.testing.assert_close(sums - gap, ig.delta, atol=1e-5, rtol=0)
        mean_delta.append(float(ig.delta.abs().mean()))
    assert mean_delta[0] > mean_delta[1] > mean_delta[2]
    assert mean_delta[2] < 0.02 * float(gap.abs().mean())


@pytest.mark.parametrize(
    ("site", "index"), [("neuron.0", 1), ("neuron.1", 4), ("resid_post.0", 2), ("neuron.1.pre", 3)]
)
@pytest.mark.parametrize("relu", [True, False])
def test_grad_cam_equals_captum(cnn, digits, site, index, relu):
    X, y = digits
    ours = at.grad_cam(cnn, X, target=y, site=site, relu=relu)
    layer = LayerGradCam(cnn.model, cnn.model[index]).attribute(X, target=y, relu_attributions=relu)
    ref = LayerAttribution.interpolate(layer, (8, 8), "bilinear")[:, 0]
    assert ours.values.shape == (len(X), 8, 8)
    torch.testing.assert_close(ours.values, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.raw, layer[:, 0], atol=TOL, rtol=0)


def test_grad_cam_all_classes_equals_per_class(cnn, digits):
    X, _ = digits
    every = at.grad_cam(cnn, X, target="all", site="neuron.1")
    assert every.values.shape == (len(X), 10, 8, 8)
    gc = LayerGradCam(cnn.model, cnn.model[4])
    for k in range(10):
        ref = LayerAttribution.interpolate(
            gc.attribute(X, target=k, relu_attributions=True), (8, 8), "bilinear"
        )[:, 0]
        torch.testing.assert_close(every.values[:, k], ref, atol=TOL, rtol=0)
    parts = at.grad_cam(cnn, X, target="all", site="neuron.1", batch_size=5)
    torch.testing.assert_close(parts.values, every.values, atol=TOL, rtol=0)


def test_grad_cam_on_a_gap_network_is_the_class_activation_map():
    """Zhou et al.'s CAM: with global average pooling and a linear layer, Grad-CAM at the last
    conv is ReLU(sum_k W_ck A_k) / Z, Z = H * W (the gradient is W_ck / Z everywhere)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    ).eval()
    X = torch.randn(6, 1, 7, 7)
    target = torch.tensor([0, 1, 2, 3, 1, 0])
    cam = at.grad_cam(net, X, target=target, site="neuron.1", upsample=False)
    with torch.no_grad():
        A = net[:4](X)  # [6, 5, 7, 7]
        W = net[6].weight  # [4, 5]
        expected = torch.einsum("bk,bkhw->bhw", W[target], A).relu() / 49
    torch.testing.assert_close(cam.values, expected, atol=1e-6, rtol=1e-5)
    normed = at.grad_cam(net, X, target=target, site="neuron.1", upsample=False, normalize="max")
    top = expected.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    torch.testing.assert_close(normed.values, expected / top, atol=1e-6, rtol=1e-5)
    minmax = at.grad_cam(net, X, target=target, site="neuron.1", normalize="minmax").values
    assert minmax.flatten(1).amin(1).abs().max() < 1e-6
    assert (minmax.flatten(1).amax(1) - 1).abs().max() < 1e-6


def test_grad_cam_on_vit_patch_tokens(digits):
    """ViT: CLS dropped, the 16 patch tokens on their 4x4 grid; a direct computation with
    a torch hook on the block's output."""
    X, y = digits
    vit = hs.zoo.load("digits-vit")
    ours = at.grad_cam(vit, X, target=y, site="resid_post.0", upsample=False)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["a"] = out

    handle = vit.model.blocks[0].register_forward_hook(keep)
    try:
        logits = vit.model(X)
    finally:
        handle.remove()
    logits.gather(1, y[:, None]).sum().backward()
    A, G = seen["a"][:, 1:].detach(), seen["a"].grad[:, 1:]  # [b, 16, 64] without CLS
    weights = G.mean(1)  # the mean over the 16 patches, per channel
    expected = torch.einsum("bc,bpc->bp", weights, A).relu().reshape(-1, 4, 4)
    torch.testing.assert_close(ours.values, expected, atol=TOL, rtol=0)
    up = at.grad_cam(vit, X, target=y, site="resid_post.0").values
    assert up.shape == (len(X), 8, 8)
    torch.testing.assert_close(
        up, torch.nn.functional.interpolate(expected[:, None], (8, 8), mode="bilinear")[:, 0]
    )


# ------------------------------------------------------------------ language models


def test_lm_integrated_gradients_equal_captum_layer_ig(gpt2):
    """IG over the token embeddings (hookscope's embed) against captum's LayerIG on wte, with
    captum's baseline: the embedding of token 0 at every position."""
    hf = gpt2.model
    ids = gpt2.to_tokens(["When Mary and John went to the store"])
    base = hf.transformer.wte.weight[0].detach().expand(ids.shape[1], -1)
    ours = at.integrated_gradients(gpt2, ids, target=5, n_steps=20, baseline=base)
    lig = LayerIntegratedGradients(lambda i: hf(i).logits[:, -1, 5], hf.transformer.wte)
    ref, delta = lig.attribute(ids, n_steps=20, return_convergence_delta=True)
    torch.testing.assert_close(ours.values, ref.sum(-1), atol=TOL, rtol=0)
    torch.testing.assert_close(ours.raw, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.delta, delta, atol=TOL, rtol=0)
    assert ours.tokens[0] == gpt2.to_str_tokens(ids[0])


def test_lm_attributions_ignore_padding(gpt2):
    texts = ["When Mary and John went to the store", "The quick brown fox"]
    for run in (
        lambda t: at.integrated_gradients(gpt2, t, target=7, n_steps=12),
        lambda t: at.saliency(gpt2, t, target=7),
        lambda t: at.saliency(gpt2, t, target=7, absolute=False),
    ):
        both = run(texts)
        alone = run(texts[1])
        n = len(alone.tokens[0])
        assert both.tokens[1] == alone.tokens[0]
        torch.testing.assert_close(both.values[1, :n], alone.values[0], atol=1e-6, rtol=1e-5)
        assert (both.values[1, n:] == 0).all()


def test_lm_saliency_is_the_embedding_gradient(gpt2):
    hf = gpt2.model
    ids = gpt2.to_tokens(["The keys to the cabinet"])
    emb = hf.transformer.wte(ids).detach().requires_grad_(True)
    hf(inputs_embeds=emb).logits[0, -1, 11].backward()
    ours = at.saliency(gpt2, ids, target=11)
    torch.testing.assert_close(ours.values[0], emb.grad[0].norm(dim=-1), atol=TOL, rtol=0)
    signed = at.saliency(gpt2, ids, target=11, absolute=False)
    torch.testing.assert_close(
        signed.values[0], (emb.grad[0] * emb[0].detach()).sum(-1), atol=TOL, rtol=0
    )


def test_token_text_and_html(gpt2):
    ig = at.integrated_gradients(gpt2, ["a <b> & c", "When Mary"], target=3, n_steps=8)
    assert len(ig.text().splitlines()) == 2
    pieces = re.findall(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\[([^\]]+)\]""", ig.text(0))
    assert [ast.literal_eval(tok) for tok, _ in pieces] == ig.tokens[0]
    np.testing.assert_allclose(
        [float(v) for _, v in pieces], ig.values[0].tolist(), rtol=1e-2, atol=1e-3
    )
    page = ig.html()
    assert "<b>" not in page.replace("<b>example", "")  # the token "<b>" is escaped
    assert "&lt;" in page and "&amp;" in page
    # the largest |value| is drawn at full colour
    top = int(ig.values.abs().flatten().argmax())
    row, pos = divmod(top, ig.values.shape[1])
    v = float(ig.values[row, pos])
    assert at.tokens.color(v, abs(v)) in ("rgb(178, 24, 43)", "rgb(33, 102, 172)")
    assert at.tokens.color(v, abs(v)) in page
    frame = ig.to_pandas()
    assert len(frame) == sum(len(t) for t in ig.tokens)
    assert frame.groupby("example")["value"].sum().to_numpy() == pytest.approx(
        ig.values.sum(1).numpy(), abs=1e-6
    )


# ------------------------------------------------------------------ figures, tables, compare


def test_plot_overlays_hold_the_values(cnn, digits):
    X, y = digits
    cam = at.grad_cam(cnn, X[:4], target=y[:4], site="neuron.1")
    fig = at.plot(cam, X[:4])
    axes = fig.axes
    assert len(axes) == 8  # image row + overlay row
    for j in range(4):
        np.testing.assert_allclose(axes[j].images[0].get_array(), X[j, 0].numpy())
        np.testing.assert_allclose(axes[4 + j].images[-1].get_array(), cam.values[j].numpy())
    every = at.grad_cam(cnn, X[:2], target="all", site="neuron.1")
    fig = every.plot(n=2)
    assert len(fig.axes) == 20
    np.testing.assert_allclose(fig.axes[3 * 2 + 1].images[-1].get_array(), every.values[1, 3])


def test_to_pandas_and_repr(cnn, digits):
    X, y = digits
    cam = at.grad_cam(cnn, X[:3], target=y[:3], site="neuron.1")
    frame = cam.to_pandas()
    assert list(frame.columns) == ["example", "target", "row", "col", "value"]
    assert len(frame) == 3 * 64
    row = frame[(frame.example == 2) & (frame.row == 5) & (frame.col == 1)]
    assert float(row.value.iloc[0]) == pytest.approx(float(cam.values[2, 5, 1]))
    assert int(row.target.iloc[0]) == int(y[2])
    text = repr(cam)
    assert "grad_cam at neuron.1" in text and "relu=True" in text
    ig = at.integrated_gradients(cnn, X[:2], target=y[:2], n_steps=8)
    assert set(ig.to_pandas().columns) >= {"delta", "value"}
    assert "delta" in repr(ig)


def test_compare_checkpoints(digits):
    X, y = digits
    early = hs.zoo.load("digits-cnn", checkpoint=16)
    final = hs.zoo.load("digits-cnn")
    cmp = at.compare(early, final, X[:6], method="grad_cam", target=y[:6], site="neuron.1")
    first = at.grad_cam(early, X[:6], target=y[:6], site="neuron.1")
    second = at.grad_cam(final, X[:6], target=y[:6], site="neuron.1")
    torch.testing.assert_close(cmp.difference, second.values - first.values)
    a, b = first.values.flatten(1).double(), second.values.flatten(1).double()
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant map has no correlation
        expected = [np.corrcoef(a[i], b[i])[0, 1] for i in range(6)]
    np.testing.assert_allclose(cmp.similarity().numpy(), expected, atol=1e-9)
    frame = cmp.to_pandas()
    assert frame.mean_abs_difference.to_numpy() == pytest.approx(
        (second.values - first.values).abs().flatten(1).mean(1).numpy()
    )
    fig = cmp.plot(X[:6], n=3)
    np.testing.assert_allclose(fig.axes[6 + 2].images[-1].get_array(), cmp.difference[2].numpy())
    # a plain torch module (what a tracker checkpoint loads into) plugs in as well
    module = hs.zoo.shipped.load_module("digits-cnn", 16)
    again = at.compare(module, final, X[:6], method="saliency", target=y[:6])
    torch.testing.assert_close(
        again.difference,
        at.saliency(final, X[:6], target=y[:6]).values - at.saliency(early, X[:6], y[:6]).values,
    )
    assert "correlation" in repr(cmp)


# ------------------------------------------------------------------ bad input


def test_bad_input(cnn, mlp, digits):
    X, y = digits
    with pytest.raises(InputError, match="spatial.*neuron.0"):
        at.grad_cam(mlp, X, target=y, site="neuron.0")
    with pytest.raises(InputError, match="neuron.0.pre, neuron.0, resid_post.0"):
        at.grad_cam(cnn, X, target=y, site="logits")
    with pytest.raises(InputError, match="has no spatial layer"):
        at.grad_cam(mlp, X, target=y)
    with pytest.raises(InputError, match="out of range.*0..9"):
        at.saliency(cnn, X, target=10)
    with pytest.raises(InputError, match="out of range"):
        at.integrated_gradients(cnn, X, target=torch.full((len(X),), -1))
    with pytest.raises(InputError, match="batch has 24"):
        at.grad_cam(cnn, X, target=y[:3], site="neuron.1")
    with pytest.raises(InputError, match="baseline has shape"):
        at.integrated_gradients(cnn, X, target=y, baseline=torch.zeros(3, 8, 8))
    with pytest.raises(InputError, match="'zeros'"):
        at.integrated_gradients(cnn, X, target=y, baseline="blur")
    with pytest.raises(InputError, match="n_steps must be an integer >= 1"):
        at.integrated_gradients(cnn, X, target=y, n_steps=0)
    with pytest.raises(InputError, match=">= 2"):
        at.integrated_gradients(cnn, X, target=y, n_steps=1, method="riemann_trapezoid")
    with pytest.raises(InputError, match="gausslegendre"):
        at.integrated_gradients(cnn, X, target=y, method="simpson")
    with pytest.raises(InputError, match="normalize"):
        at.grad_cam(cnn, X, target=y, site="neuron.1", normalize="l2")
    with pytest.raises(InputError, match="'all'"):
        at.grad_cam(cnn, X, target="every", site="neuron.1")
    with pytest.raises(InputError, match="not a valid target"):
        at.saliency(cnn, X, target="all")
    with pytest.raises(InputError, match="one value per row"):
        at.saliency(cnn, X, target=lambda out: out.sum())
    with pytest.raises(InputError, match="HookedModel"):
        at.saliency("digits-cnn", X, target=y)
    with pytest.raises(InputError, match="internal_batch_size"):
        at.integrated_gradients(cnn, X, target=y, internal_batch_size=0)
    with pytest.raises(InputError, match="choose one of"):
        at.compare(cnn, cnn, X, method="lime")


def test_no_hooks_left_after_an_error(cnn, digits):
    X, y = digits

    def boom(out):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        at.integrated_gradients(cnn, X, target=boom, site="neuron.0", n_steps=4)
    with pytest.raises(RuntimeError, match="metric failed"):
        at.grad_cam(cnn, X, target=boom, site="neuron.1")
    for module in cnn.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_compare_tracker_checkpoints(digits, tmp_path):
    """The states a Tracker saved during training load into models compare takes."""
    X, y = digits
    module = hs.zoo.shipped.load_module("digits-cnn", 16).train()
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    tracker = hs.Tracker(module, checkpoints=tmp_path / "ck", save_steps=[0, 6], jumps=False)
    with tracker:
        for step in range(7):
            loss = nn.functional.cross_entropy(module(X), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tracker.log(step, loss=loss)
    saved = tracker.checkpoints()
    assert saved.steps == [0, 6]
    before, after = saved.load(0, module).eval(), saved.load(6, module).eval()
    cmp = at.compare(before, after, X[:5], method="integrated_gradients", target=y[:5], n_steps=8)
    expected = (
        at.integrated_gradients(after, X[:5], target=y[:5], n_steps=8).values
        - at.integrated_gradients(before, X[:5], target=y[:5], n_steps=8).values
    )
    torch.testing.assert_close(cmp.difference, expected)
    assert cmp.difference.abs().max() > 1e-3  # six steps at lr 0.5 changed the model


def test_compare_rollout_checkpoints(digits):
    X, _ = digits
    early = hs.zoo.load("digits-vit", checkpoint=hs.zoo.shipped.checkpoints("digits-vit")[3])
    final = hs.zoo.load("digits-vit")
    cmp = at.compare(early, final, X[:4], method="attention_rollout")
    first, second = at.attention_rollout(early, X[:4]), at.attention_rollout(final, X[:4])
    torch.testing.assert_close(cmp.difference, second.grid - first.grid)
    fig = cmp.plot(X[:4], n=2)
    np.testing.assert_allclose(fig.axes[2 + 1].images[-1].get_array(), second.grid[1].numpy())


def test_defaults_predicted_class_and_last_conv_layer(cnn, digits):
    """target=None is each example's predicted class; grad_cam's site=None is the last conv
    layer's output (a ViT: the last block's input); compare explains the after model's
    predictions on both models."""
    X, _ = digits
    with torch.no_grad():
        predicted = cnn(X).argmax(1)
    torch.testing.assert_close(
        at.saliency(cnn, X).values, at.saliency(cnn, X, target=predicted).values
    )
    cam = at.grad_cam(cnn, X)
    assert cam.site == "neuron.1" and cam.conventions["target"] == "predicted class"
    torch.testing.assert_close(cam.values, at.grad_cam(cnn, X, predicted, site="neuron.1").values)
    torch.testing.assert_close(cam.targets, predicted)
    vit = hs.zoo.load("digits-vit")
    assert at.grad_cam(vit, X[:4]).site == "resid_pre.1"
    early = hs.zoo.load("digits-cnn", checkpoint=4)
    cmp = at.compare(early, cnn, X, method="grad_cam")
    torch.testing.assert_close(cmp.before.targets, predicted)
    torch.testing.assert_close(cmp.after.targets, predicted)
    lm = hs.HookedModel.wrap(builders.tiny_gpt2(), tokenizer=builders.make_tokenizer())
    texts = ["When Mary and John went", "The fox"]
    ig = at.integrated_gradients(lm, texts, n_steps=4)
    logits = lm(texts)
    expected = [int(logits[0, 4].argmax()), int(logits[1, len(ig.tokens[1]) - 1].argmax())]
    assert ig.targets.tolist() == expected
