"""Neuron statistics and their before/after comparison, checked against activations read by
hand-written torch hooks and numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.errors import InputError
from hookscope.units import compare_neurons, neuron_stats, top_activating

N_CLASSES = 10


@pytest.fixture(scope="module")
def digits():
    X, y = hs.data.digits("test", tensors=True)
    return X[:200], y[:200]


def planted_data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features where feature j is positive only for class j (negative elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % N_CLASSES
    onehot = nn.functional.one_hot(y, N_CLASSES).float()
    noise = torch.rand(n, N_CLASSES, generator=g)
    return onehot * (1 + noise) - (1 - onehot) * 0.5 * noise, y


def planted_model() -> nn.Sequential:
    """Hidden unit j < 10 copies feature j (class-j selective after the ReLU); units 10 and
    11 have bias -100 (dead)."""
    net = nn.Sequential(nn.Linear(N_CLASSES, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:N_CLASSES] = torch.eye(N_CLASSES)
        net[0].bias.zero_()
        net[0].bias[N_CLASSES:] = -100.0
    return net.eval()


# ---------------------------------------------------------------------------- neuron stats


def test_planted_selective_and_dead_units():
    X, y = planted_data()
    net = planted_model()
    stats = neuron_stats(net, X, y, site="neuron.0", batch_size=64, progress=False)
    acts = np.maximum(
        X.numpy() @ net[0].weight.detach().numpy().T + net[0].bias.detach().numpy(), 0
    )
    np.testing.assert_allclose(stats.mean.numpy(), acts.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.std.numpy(), acts.std(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.sparsity.numpy(), (acts <= 0).mean(0))
    assert stats.sparsity[:N_CLASSES].tolist() == pytest.approx([0.9] * N_CLASSES)
    assert stats.dead.tolist() == [False] * N_CLASSES + [True, True]
    np.testing.assert_allclose(stats.selectivity[:N_CLASSES].numpy(), 1.0)
    assert stats.selectivity[N_CLASSES:].tolist() == [0.0, 0.0]
    assert stats.preferred_class.tolist() == list(range(N_CLASSES)) + [-1, -1]
    df = stats.to_pandas()
    assert list(df.columns) == [
        "unit",
        "mean",
        "std",
        "sparsity",
        "dead",
        "selectivity",
        "preferred_class",
    ]
    assert df["dead"].sum() == 2
    assert "dead 2 (16.7%)" in repr(stats) and "one sample per input" in repr(stats)
    # the neuron grid: class means per unit (rows) and class (columns)
    means = np.stack([acts[y.numpy() == c].mean(0) for c in range(N_CLASSES)], 1)  # [units, c]
    np.testing.assert_allclose(stats.class_grid(normalize=False), means, rtol=1e-6)
    fig = stats.plot()
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    scale = np.abs(means).max(1, keepdims=True)
    expected = np.divide(means, scale, out=np.zeros_like(means), where=scale > 0)
    np.testing.assert_allclose(drawn, expected, rtol=1e-6)
    np.testing.assert_allclose(np.diag(drawn[:N_CLASSES]), 1.0)


def test_conv_channels_reduced_over_space(cnn, digits, hooked):
    X, y = digits
    acts = hooked(cnn.model[4], lambda: cnn.model(X)).numpy()  # ReLU output [n, 32, 4, 4]
    for reduce, per_input in (("mean", acts.mean((2, 3))), ("max", acts.max((2, 3)))):
        stats = neuron_stats(cnn, X, y, site="neuron.1", reduce=reduce, batch_size=70)
        np.testing.assert_allclose(stats.activations.numpy(), per_input, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.mean.numpy(), per_input.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.std.numpy(), per_input.std(0), rtol=1e-4, atol=1e-6)
        # Morcos et al.'s index written out with numpy
        cm = np.stack([per_input[y.numpy() == c].mean(0) for c in range(N_CLASSES)])
        top = cm.max(0)
        rest = (cm.sum(0) - top) / (N_CLASSES - 1)
        sel = np.where(top + rest > 0, (top - rest) / np.where(top + rest > 0, top + rest, 1), 0)
        np.testing.assert_allclose(stats.selectivity.numpy(), sel, rtol=1e-5, atol=1e-7)
        assert stats.preferred_class.tolist() == [
            -1 if d else int(c) for d, c in zip(stats.dead.tolist(), cm.argmax(0), strict=True)
        ]
    assert f"spatial {reduce}" in repr(stats)


def test_language_model_neurons_use_real_positions_only(lm, hooked):
    texts = ["When Mary and John went to the store", "Bob", "The quick brown fox"]
    ids = lm.to_tokens(texts)
    lengths = [lm.to_tokens(t).shape[1] for t in texts]
    hf = lm.model
    acts = hooked(hf.transformer.h[1].mlp.c_proj, lambda: hf(ids), pre=True)  # [3, pos, 256]
    real = torch.cat([acts[i, :n] for i, n in enumerate(lengths)]).numpy()
    with pytest.warns(UserWarning, match="negative activations"):
        stats = neuron_stats(lm, texts, [0, 1, 0], site="neuron.1", batch_size=2)
    assert stats.n_samples == sum(lengths)
    np.testing.assert_allclose(stats.activations.numpy(), real, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.mean.numpy(), real.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.sparsity.numpy(), (real <= 0).mean(0))
    assert stats.labels.tolist() == [0] * lengths[0] + [1] * lengths[1] + [0] * lengths[2]
    assert torch.isnan(stats.selectivity).all()  # GELU: negative values, no Morcos index


# ------------------------------------------------------------------------------ compare


def test_compare_woke_up_died_changed():
    X, y = planted_data()
    before = planted_model()
    after = copy.deepcopy(before)
    with torch.no_grad():
        after[0].bias[10] = 5.0  # dead before, constant 5 after: woke up
        after[0].bias[3] = -100.0  # class-3 unit: died
        after[0].bias[5] = 2.0  # alive both times, mean up by about 2: changed
    sb = neuron_stats(before, X, y, site="neuron.0")
    sa = neuron_stats(after, X, y, site="neuron.0")
    comp = compare_neurons(sb, sa)
    expected = ["stable"] * 12
    expected[3], expected[5], expected[10], expected[11] = "died", "changed", "woke up", "dead"
    assert list(comp.status) == expected
    assert comp.units("woke up") == [10] and comp.units("died") == [3]
    s = comp.summary()
    assert (s["newly_dead"], s["revived"], s["woke up"], s["died"]) == (1, 1, 1.0, 1.0)
    assert s["dead_fraction_before"] == pytest.approx(2 / 12)
    df = comp.to_pandas()
    assert df.loc[10, "mean_before"] == 0 and df.loc[10, "mean_after"] == pytest.approx(5.0)
    assert df.loc[3, "selectivity_before"] == pytest.approx(1.0)
    assert df.loc[3, "selectivity_after"] == 0.0
    assert "woke up 1" in repr(comp) and "died 1" in repr(comp)
    assert sb.compare(sa).status == comp.status
    assert df["preferred_changed"].tolist() == [i in (3, 10) for i in range(12)]
    fig = comp.plot()
    scatter = {c.get_label(): c.get_offsets() for c in fig.axes[0].collections}
    np.testing.assert_allclose(scatter["woke up"], [[0.0, 5.0]])
    np.testing.assert_allclose(scatter["died"], [[float(sb.mean[3]), 0.0]])
    assert len(scatter["stable"]) == 8


def test_compare_checkpoints(digits):
    X, y = digits
    first = hs.zoo.shipped.checkpoints("digits-cnn")[0]
    sb = neuron_stats(hs.zoo.load("digits-cnn", checkpoint=first), X, y, site="neuron.0")
    sa = neuron_stats(hs.zoo.load("digits-cnn"), X, y, site="neuron.0")
    comp = compare_neurons(sb, sa)
    dead_b, dead_a = sb.dead.numpy(), sa.dead.numpy()
    assert comp.units("woke up") == np.flatnonzero(dead_b & ~dead_a).tolist()
    assert comp.units("died") == np.flatnonzero(~dead_b & dead_a).tolist()
    assert sum(comp.summary()[k] for k in ("dead", "woke up", "died", "changed", "stable")) == 16


def test_compare_refuses_different_inputs():
    X, y = planted_data()
    net = planted_model()
    a = neuron_stats(net, X, y, site="neuron.0")
    b = neuron_stats(net, X[:100], y[:100], site="neuron.0")
    with pytest.raises(InputError, match="same inputs"):
        compare_neurons(a, b)
    with pytest.raises(InputError, match="NeuronStats"):
        compare_neurons(a, X)
    pre = neuron_stats(net, X, site="neuron.0.pre")
    with pytest.raises(InputError, match="same site"):
        compare_neurons(pre, neuron_stats(net, X, site="neuron.0"))


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_choices(cnn, digits, lm):
    X, y = digits
    with pytest.raises(InputError, match=r"whole layer.*neuron\.1\.I with I in 0\.\.31"):
        top_activating(cnn, X, site="neuron.1")
    with pytest.raises(InputError, match=r"out of range.*0-31"):
        top_activating(cnn, X, site="neuron.1.99")
    with pytest.raises(InputError, match="one unit address"):
        top_activating(cnn, X, site="neuron.1.*")
    with pytest.raises(InputError, match=r"k must be an integer >= 1"):
        top_activating(cnn, X, site="neuron.1.7", k=0)
    with pytest.raises(InputError, match="'mean', 'max'|mean, max"):
        top_activating(cnn, X, site="neuron.1.7", reduce="median")
    with pytest.raises(InputError, match=r"labels has 5 entries but inputs hold 200"):
        neuron_stats(cnn, X, y[:5], site="neuron.0")
    with pytest.raises(InputError, match="neuron.0"):
        neuron_stats(cnn, X, y, site="resid_post.0")
    with pytest.raises(InputError, match="batch_size"):
        neuron_stats(cnn, X, y, site="neuron.0", batch_size=0)
    with pytest.raises(InputError, match="token inputs"):
        top_activating(cnn, X, site="neuron.1.7", k=2).text()
    with pytest.raises(InputError, match="window"):
        top_activating(lm, ["Bob"], site="neuron.1.5", k=1).text(window=-1)


def test_one_label_validator_for_every_unit_analysis(cnn, vit, digits):
    """Strings, 2-D and float labels raise one InputError everywhere; one class is an error
    for the class statistics of heads, a warning (NaN selectivity) for neuron_stats."""
    from hookscope.units import head_probe, head_stats

    X, y = digits
    Xv = X[:20]
    for bad, why in (
        ("abc", "string"),
        (np.array(["a", "b"] * 10), "<U1 values"),
        (y[:20].reshape(4, 5), r"shape \(4, 5\)"),
        (y[:20].double(), "torch.float64"),
    ):
        for call in (
            lambda b=bad: neuron_stats(cnn, Xv, b, site="neuron.0"),
            lambda b=bad: head_stats(vit, Xv, b),
            lambda b=bad: head_probe(vit, Xv, b),
        ):
            with pytest.raises(InputError, match=f"labels must be one integer class.*{why}"):
                call()
    one = torch.zeros(20, dtype=torch.long)
    with pytest.warns(UserWarning, match="two classes"):
        res = neuron_stats(cnn, Xv, one, site="neuron.0")
    assert torch.isnan(torch.as_tensor(res.selectivity)).all()
    # numpy integers / floats are accepted where ints / floats are, and equal the Python ones
    a = neuron_stats(
        cnn, Xv, y[:20].numpy(), site="neuron.0", batch_size=np.int64(7),
        threshold=np.float32(0.0),
    )  # fmt: skip
    b = neuron_stats(cnn, Xv, y[:20], site="neuron.0", batch_size=7, threshold=0.0)
    np.testing.assert_allclose(np.asarray(a.selectivity), np.asarray(b.selectivity))
    np.testing.assert_allclose(np.asarray(a.mean), np.asarray(b.mean))
