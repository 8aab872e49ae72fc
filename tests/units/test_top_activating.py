"""Top-activating examples, checked against activations read by hand-written torch hooks
and numpy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import hookscope as hs
from hookscope.units import top_activating


@pytest.fixture(scope="module")
def digits():
    X, y = hs.data.digits("test", tensors=True)
    return X[:200], y[:200]


def test_top_activating_conv_unit(cnn, digits, hooked):
    X, _ = digits
    maps = hooked(cnn.model[4], lambda: cnn.model(X))[:, 7]  # channel 7 [n, 4, 4]
    flat = maps.reshape(len(X), -1).numpy()
    for reduce, value in (("max", flat.max(1)), ("mean", flat.mean(1))):
        top = top_activating(cnn, X, site="neuron.1.7", k=7, reduce=reduce, batch_size=64)
        order = np.argsort(-value, kind="stable")[:7]
        assert top.indices.tolist() == order.tolist()
        np.testing.assert_allclose(top.values.numpy(), value[order], rtol=1e-5)
        peaks = flat[order].argmax(1)
        assert top.locations.tolist() == [[p // 4, p % 4] for p in peaks]
        assert top.map_shape == (4, 4)
    fig = top.plot(columns=4)
    drawn = [np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images]
    assert len(drawn) == 7
    for image, i in zip(drawn, order, strict=True):
        ref = X[i, 0].double().numpy()
        np.testing.assert_allclose(image, (ref - ref.min()) / (ref.max() - ref.min()))
    df = top.to_pandas()
    assert df["index"].tolist() == order.tolist() and list(df.columns[-2:]) == ["row", "col"]


def test_top_activating_mlp_unit(hooked):
    mlp = hs.zoo.load("digits-mlp")
    X, _ = hs.data.digits("test", tensors=True)
    value = hooked(mlp.model[2], lambda: mlp.model(X))[:, 3].numpy()
    top = top_activating(mlp, X, site="neuron.0.3", k=5)
    order = np.argsort(-value, kind="stable")[:5]
    assert top.indices.tolist() == order.tolist()
    np.testing.assert_allclose(top.values.numpy(), value[order], rtol=1e-5)
    assert top.locations is None and top.positions is None
    big = top_activating(mlp, X[:3], site="neuron.0.3", k=50)
    assert big.k == 3  # fewer samples than k: all of them


def test_top_activating_token_contexts(lm, hooked):
    texts = ["When Mary <went> to the store", "Bob & Alice", "a<b"]
    ids = lm.to_tokens(texts)
    lengths = [lm.to_tokens(t).shape[1] for t in texts]
    hf = lm.model
    acts = hooked(hf.transformer.h[1].mlp.c_proj, lambda: hf(ids), pre=True)[..., 5]
    pairs = [(i, p) for i, n in enumerate(lengths) for p in range(n)]
    values = np.array([float(acts[i, p]) for i, p in pairs])
    order = np.argsort(-values, kind="stable")
    k = len(pairs)
    top = top_activating(lm, texts, site="neuron.1.5", k=k + 10, batch_size=2)
    assert top.k == k
    assert list(zip(top.indices.tolist(), top.positions.tolist(), strict=True)) == [
        pairs[o] for o in order
    ]
    np.testing.assert_allclose(top.values.numpy(), values[order], rtol=1e-4, atol=1e-6)
    # text: the marked token is the token at the top position
    for r, line in enumerate(top.text(window=2).splitlines()[1:]):
        i, p = pairs[order[r]]
        token = lm.to_str_tokens(ids[i, : lengths[i]])[p]
        assert line.count("[[") == 1 and f"[[{token}]]" in line
        assert f"#{i}@{p}:" in line
    assert top.to_pandas()["token"].tolist() == [
        lm.to_str_tokens(ids[i, : lengths[i]])[p] for i, p in (pairs[o] for o in order)
    ]
    # html: escaped, intensity proportional to the activation (top token = 1)
    page = top.html(window=1)
    assert "&lt;" in page and "<b>neuron" in page
    for raw in re.findall(r'title="[^"]*">([^<]*)</span>', page):
        assert (
            "<" not in raw
            and ">" not in raw
            and "&" not in raw.replace("&lt;", "").replace("&gt;", "").replace("&amp;", "")
        )
    first = re.search(r"outline:2px solid black;\" title=\"[^\"]*\"", page)
    assert first is not None and "rgba(214,39,40,1.000)" in page[first.start() - 40 : first.end()]
    i0, _ = pairs[order[0]]
    opacity = top.token_opacity(0)
    expected = np.clip(acts[i0, : lengths[i0]].numpy() / values[order[0]], -1, 1)
    np.testing.assert_allclose(opacity, expected, rtol=1e-4, atol=1e-6)
    fig = top.plot()
    np.testing.assert_allclose(
        [p.get_width() for p in fig.axes[0].patches], values[order], rtol=1e-4, atol=1e-6
    )


def test_token_ids_without_tokenizer(lm, hooked):
    bare = hs.HookedModel.wrap(lm.model)  # no tokenizer: tokens shown as <id>, escaped
    ids = torch.tensor([[5, 17, 99, 3], [42, 8, 7, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # row 1 padded on the left
    acts = hooked(
        lm.model.transformer.h[0].mlp.c_proj,
        lambda: lm.model(ids, attention_mask=mask),
        pre=True,
    )[..., 9]
    real = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    values = np.array([float(acts[i, p]) for i, p in real])
    top = top_activating(bare, {"input_ids": ids, "attention_mask": mask}, site="neuron.0.9", k=6)
    order = np.argsort(-values, kind="stable")
    assert list(zip(top.indices.tolist(), top.positions.tolist(), strict=True)) == [
        real[o] for o in order
    ]
    np.testing.assert_allclose(top.values.numpy(), values[order], rtol=1e-4, atol=1e-6)
    i, p = real[order[0]]
    assert top.tokens[0] == [f"<{t}>" for t in ids[i].tolist()]
    lines = top.text(window=3).splitlines()[1:]
    assert f"[[<{int(ids[i, p])}>]]" in lines[0]
    context = {real[o]: line for o, line in zip(order, lines, strict=True)}
    assert context[(1, 2)].endswith("#1@2: [[<7>]]<1>")  # the padding (<42>, <8>) is never
    assert context[(1, 3)].endswith("#1@3: <7>[[<1>]]")  # part of a context
    page = top.html()
    assert f"&lt;{int(ids[i, p])}&gt;" in page and f"><{int(ids[i, p])}><" not in page
    assert "&lt;42&gt;" not in page and "&lt;8&gt;" not in page


def test_plot_scales_standardised_rgb_images():
    """Standardised RGB inputs (outside [0, 1]) are drawn min-max scaled per image, not
    clipped by matplotlib."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model = hs.HookedModel.wrap(net)
    X = torch.randn(10, 3, 8, 8) * 2.0  # standardised: values well outside [0, 1]
    top = top_activating(model, X, site="neuron.0.1", k=3)
    fig = top.plot(columns=3)
    drawn = [np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images]
    assert len(drawn) == 3
    for image, i in zip(drawn, top.indices.tolist(), strict=True):
        rgb = np.moveaxis(X[i].double().numpy(), 0, -1)
        np.testing.assert_allclose(image, (rgb - rgb.min()) / (rgb.max() - rgb.min()))
        assert image.min() == 0 and image.max() == 1
