"""Ridge composition against scikit-learn and a planted composition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from torch import nn

import hookscope as hs
from hookscope.errors import InputError
from hookscope.units import composition


def hooked_outputs(modules: list[nn.Module], run) -> list[torch.Tensor]:
    """The outputs of ``modules`` during ``run()``, through torch forward hooks."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [
        m.register_forward_hook(lambda _m, _a, out, i=i: seen[i].append(out.detach()))
        for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_composition_equals_sklearn_ridge(cnn, X, reduce):
    early, late = hooked_outputs([cnn.model[1], cnn.model[4]], lambda: cnn.model(X))
    dims = (2, 3)
    F0 = (early.mean(dims) if reduce == "mean" else early.amax(dims)).double().numpy()
    F1 = (late.mean(dims) if reduce == "mean" else late.amax(dims)).double().numpy()
    comp = composition(
        cnn, X, early="neuron.0", late="neuron.1", alpha=0.1, reduce=reduce, batch_size=128
    )
    ref = Ridge(alpha=0.1).fit(F0, F1)
    np.testing.assert_allclose(comp.coef.numpy(), ref.coef_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(comp.intercept.numpy(), ref.intercept_, rtol=1e-6, atol=1e-7)
    pred = ref.predict(F0)
    r2 = [r2_score(F1[:, j], pred[:, j]) for j in range(F1.shape[1])]
    np.testing.assert_allclose(comp.r2.numpy(), r2, rtol=1e-6, atol=1e-8)
    std = ref.coef_ * F0.std(0)[None, :] / F1.std(0)[:, None]
    np.testing.assert_allclose(comp.standardized.numpy(), std, rtol=1e-6, atol=1e-8)
    for j, contributors in enumerate(comp.top):
        assert contributors == np.argsort(-np.abs(std[j]), kind="stable")[:3].tolist()
    assert comp.n_samples == len(X) and f"spatial {reduce}" in repr(comp)


def test_composition_mlp_matches_ridge():
    mlp = hs.zoo.load("digits-mlp")
    X = hs.data.digits("test", tensors=True)[0]
    h0, h1 = hooked_outputs([mlp.model[2], mlp.model[4]], lambda: mlp.model(X))
    comp = composition(mlp, X, early="neuron.0", late="neuron.1", alpha=2.5)
    ref = Ridge(alpha=2.5).fit(h0.double().numpy(), h1.double().numpy())
    np.testing.assert_allclose(comp.coef.numpy(), ref.coef_, rtol=1e-6, atol=1e-7)
    pred = ref.predict(h0.double().numpy())
    F1 = h1.double().numpy()
    constant = F1.std(0) == 0  # dead late units: R^2 undefined (NaN), sklearn says 1 or 0
    assert np.isnan(comp.r2.numpy()[constant]).all()
    r2 = [r2_score(F1[:, j], pred[:, j]) for j in np.flatnonzero(~constant)]
    np.testing.assert_allclose(comp.r2.numpy()[~constant], r2, rtol=1e-6, atol=1e-8)


def planted() -> nn.Sequential:
    """Late unit 0 = early 1 + early 3, unit 1 = early 0 + early 5, unit 2 = early 2 + 4
    exactly (non-negative sums pass the ReLU unchanged); late unit 3 is dead."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)
    ).eval()
    w = torch.zeros(4, 6)
    w[0, [1, 3]] = 1.0
    w[1, [0, 5]] = 1.0
    w[2, [2, 4]] = 1.0
    with torch.no_grad():
        net[2].weight.copy_(w)
        net[2].bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0]))
    return net


def test_planted_composition():
    inputs = torch.randn(400, 5, generator=torch.Generator().manual_seed(1))
    comp = composition(planted(), inputs, early="neuron.0", late="neuron.1", alpha=1e-4, top=2)
    assert comp.r2[:3].min() > 0.99999
    assert torch.isnan(comp.r2[3])  # a dead (constant) late unit has no R^2
    assert [set(t) for t in comp.top] == [{1, 3}, {0, 5}, {2, 4}, set()]
    np.testing.assert_allclose(comp.coef[0, [1, 3]].numpy(), 1.0, atol=1e-3)
    np.testing.assert_allclose(comp.intercept[:3].numpy(), 0.0, atol=1e-3)
    df = comp.to_pandas()
    assert set(df.loc[1, "top_early"]) == {0, 5} and np.isnan(df.loc[3, "r2"])
    # the graph: one edge per top contributor, from early unit e to late unit j
    edges = comp.edges()
    assert sorted(zip(edges["early"], edges["late"], strict=True)) == sorted(
        [(1, 0), (3, 0), (0, 1), (5, 1), (2, 2), (4, 2)]
    )
    fig = comp.plot()
    lines = fig.axes[0].collections[0]
    y_early, y_late = np.linspace(1, 0, 6), np.linspace(1, 0, 4)
    for seg, e, j in zip(lines.get_segments(), edges["early"], edges["late"], strict=True):
        np.testing.assert_allclose(seg, [[0, y_early[e]], [1, y_late[j]]])
    weights = np.abs(edges["weight"].to_numpy())
    np.testing.assert_allclose(lines.get_linewidths(), 0.3 + 3.7 * weights / weights.max())


def test_composition_bad_input(cnn, X):
    with pytest.raises(InputError, match="must come before"):
        composition(cnn, X, early="neuron.1", late="neuron.0")
    with pytest.raises(InputError, match="alpha"):
        composition(cnn, X, early="neuron.0", late="neuron.1", alpha=-1)
    with pytest.raises(InputError, match="neuron.0"):
        composition(cnn, X, early="head.0", late="neuron.1")


def test_composition_alpha0_singular_equals_least_squares(X):
    """Dead early units make the alpha=0 system singular: the minimum-norm least-squares fit."""
    from sklearn.linear_model import LinearRegression

    mlp = hs.zoo.load("digits-mlp")
    sites = [a for a in mlp.addresses("neuron") if str(a) in ("neuron.0", "neuron.1")]
    assert len(sites) == 2
    _, cache = mlp.run_with_cache(X, sites)
    F0, F1 = (cache[a].detach().double().numpy() for a in sites)
    comp = composition(mlp, X, early="neuron.0", late="neuron.1", alpha=0, progress=False)
    ref = LinearRegression().fit(F0, F1)
    pred = ref.predict(F0)
    r2 = np.array(
        [
            r2_score(F1[:, j], pred[:, j]) if F1[:, j].std() > 0 else np.nan
            for j in range(F1.shape[1])
        ]
    )
    np.testing.assert_allclose(comp.r2.numpy(), r2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        comp.coef.numpy() @ F0.T + comp.intercept.numpy()[:, None], pred.T, atol=1e-5
    )
