"""hookscope.probes.mdl: the online code recomputed with scikit-learn, closed forms, a planted
task against a Hewitt-Liang control task, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from hookscope.errors import ProbeError
from hookscope.probes.linear import LinearProbe
from hookscope.probes.mdl import DEFAULT_PORTIONS, MDLResult, block_bounds, mdl


def reference_online_code(X, y, portions, seed, C=1.0):
    """The online code written out independently: shuffle with the documented permutation,
    cut at max(1, floor(p n)), send the first block uniformly and every later block with a
    scikit-learn LogisticRegression trained on the rows before it (uniformly when those rows
    lack a class). Returns (total bits, bits per block)."""
    n = len(y)
    classes, codes = np.unique(y, return_inverse=True)
    k = len(classes)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    Xs, ys = X[perm], codes[perm]
    bounds = sorted({max(1, int(np.floor(p * n + 1e-9))) for p in portions})
    blocks = [bounds[0] * math.log2(k)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if len(np.unique(ys[:start])) < k:
            blocks.append((end - start) * math.log2(k))
            continue
        model = LogisticRegression(C=C, tol=1e-12, max_iter=20_000).fit(Xs[:start], ys[:start])
        p = model.predict_proba(Xs[start:end])[np.arange(end - start), ys[start:end]]
        blocks.append(float(-np.log2(p).sum()))
    return sum(blocks), blocks


def linear_task(n, d, k, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((d, k))
    y = np.argmax(X @ W + rng.gumbel(size=(n, k)), 1)
    return X, y


@pytest.mark.parametrize(
    "k,portions",
    [(2, DEFAULT_PORTIONS), (3, DEFAULT_PORTIONS), (3, (0.05, 0.1, 0.2, 0.4, 0.7, 1.0))],
)
def test_codelength_equals_an_explicit_sklearn_computation(k, portions):
    X, y = linear_task(600, 5, k, seed=k)
    res = mdl(torch.as_tensor(X), torch.as_tensor(y), portions=portions, seed=4, C=0.5)
    total, blocks = reference_online_code(X, y, portions, seed=4, C=0.5)
    # both solvers stop near the same optimum; the codelength is flat there (tolerance 1e-5,
    # agreement is about 1e-7)
    assert res.online_codelength == pytest.approx(total, rel=1e-5)
    np.testing.assert_allclose(res.block_codelengths, blocks, rtol=1e-5, atol=1e-9)
    assert res.uniform_codelength == pytest.approx(600 * math.log2(k))
    assert res.compression == pytest.approx(600 * math.log2(k) / total, rel=1e-5)
    # the default portions cut 600 rows into 1, 1, 2, 4, 8, 15, ...: the first prefixes lack
    # a class and are sent uniformly, as the reference does
    if portions == DEFAULT_PORTIONS:
        assert "uniform" in res.block_codes[1:]


def test_an_estimator_probe_gives_the_same_code_as_the_batched_solve():
    X, y = linear_task(400, 4, 3, seed=9)
    portions = (0.1, 0.25, 0.5, 1.0)
    batched = mdl(X, y, portions=portions, seed=1)
    with_sklearn = mdl(
        X, y, portions=portions, seed=1, probe=LogisticRegression(tol=1e-12, max_iter=20_000)
    )
    with_probe = mdl(X, y, portions=portions, seed=1, probe=LinearProbe())
    np.testing.assert_allclose(batched.block_codelengths, with_sklearn.block_codelengths, rtol=1e-6)
    # separate solves of the same objective, each to its own tolerance
    np.testing.assert_allclose(batched.block_codelengths, with_probe.block_codelengths, rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_uniform_codelength_and_block_bookkeeping(k):
    rng = np.random.default_rng(k)
    n = 1000
    names = np.array(["cat", "dog", "eel", "fox", "gnu"][:k])
    y = names[np.r_[np.arange(k), rng.integers(0, k, n - k)]]  # string labels, all present
    X = rng.standard_normal((n, 3))
    res = mdl(X, y)
    assert res.uniform_codelength == pytest.approx(n * math.log2(k))
    assert res.n_classes == k and res.n_rows == n
    assert sum(res.block_sizes) == n
    assert res.block_sizes[0] == 1  # floor(0.001 * 1000)
    assert res.online_codelength == pytest.approx(sum(res.block_codelengths))
    assert res.compression == pytest.approx(res.uniform_codelength / res.online_codelength)
    for size, bits, code in zip(res.block_sizes, res.block_codelengths, res.block_codes):
        if code == "uniform":
            assert bits == pytest.approx(size * math.log2(k))
    # labels independent of X: the online code cannot beat the uniform one by much
    assert res.compression < 1.05


def test_standardize_equals_mdl_of_standardised_features():
    X, y = linear_task(500, 6, 2, seed=2)
    X = X * np.array([1, 10, 0.1, 5, 1, 2]) + 3.0
    got = mdl(X, y, standardize=True, seed=5)
    want = mdl(StandardScaler().fit_transform(X), y, seed=5)
    np.testing.assert_allclose(got.block_codelengths, want.block_codelengths, rtol=1e-8)


def test_a_planted_direction_compresses_far_better_than_a_control_task():
    """d=32, n=4000. Every row has one of 200 types (its embedding is part of X) and a label
    written along a fixed direction u. The Hewitt-Liang control task gives each type a fixed
    random label: a linear probe can only partly memorise 200 types in 32 dimensions, so
    its online code stays near the uniform one, while the planted label compresses well."""
    rng = np.random.default_rng(0)
    n, d, n_types = 4000, 32, 200
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    embedding = rng.standard_normal((n_types, d))
    types = rng.integers(0, n_types, n)
    y = rng.integers(0, 2, n)
    X = embedding[types] + 2.0 * (2 * y - 1)[:, None] * u + 0.5 * rng.standard_normal((n, d))
    control = rng.integers(0, 2, n_types)[types]
    planted = mdl(torch.as_tensor(X, dtype=torch.float32), y)
    ctrl = mdl(torch.as_tensor(X, dtype=torch.float32), control)
    assert planted.compression > 3 * ctrl.compression
    assert planted.compression > 4.0 and ctrl.compression < 1.3
    # a probe sees more data in later blocks: the planted code per row falls
    per_row = np.array(planted.block_codelengths[1:]) / np.array(planted.block_sizes[1:])
    assert per_row[-1] < per_row[:3].mean()


def test_result_table_text_and_plot():
    X, y = linear_task(300, 3, 2, seed=3)
    res = mdl(X, y)
    assert isinstance(res, MDLResult)
    df = res.to_pandas()
    assert list(df.columns) == [
        "block", "start", "end", "rows", "code", "bits", "bits_per_row", "cumulative_bits"
    ]  # fmt: skip
    assert len(df) == len(res.block_sizes)
    assert df["bits"].sum() == pytest.approx(res.online_codelength)
    assert (df["end"] - df["start"] == df["rows"]).all() and df["end"].iloc[-1] == 300
    text = str(res)
    assert f"{res.online_codelength:.1f} bits" in text and "compression" in text
    assert "uniform" in text and "probe" in text
    fig = res.plot()
    assert isinstance(fig, Figure) and len(fig.axes) == 2


def test_bad_input_raises_probe_errors_that_name_the_problem():
    X, y = linear_task(200, 3, 2, seed=0)
    with pytest.raises(ProbeError, match="single class"):
        mdl(X, np.zeros(200, dtype=int))
    with pytest.raises(ProbeError, match="199 labels but X has 200 rows"):
        mdl(X, y[:-1])
    with pytest.raises(ProbeError, match="strictly increasing"):
        mdl(X, y, portions=(0.1, 0.05, 1.0))
    with pytest.raises(ProbeError, match="must end at 1.0"):
        mdl(X, y, portions=(0.1, 0.5, 0.9))
    with pytest.raises(ProbeError, match="lie in \\(0, 1\\]"):
        mdl(X, y, portions=(0.0, 0.5, 1.0))
    with pytest.raises(ProbeError, match="at least two timesteps"):
        mdl(X, y, portions=(1.0,))
    bad = X.copy()
    bad[17, 1] = np.nan
    with pytest.raises(ProbeError, match="NaN or infinite values in 1 rows \\(first: \\[17\\]\\)"):
        mdl(bad, y)
    with pytest.raises(ProbeError, match="for classification.*float64"):
        mdl(X, X[:, 0])
    with pytest.raises(ProbeError, match="with probe= set it on the probe"):
        mdl(X, y, C=0.5, probe=LinearProbe())
    with pytest.raises(ProbeError, match="fit and predict_proba"):
        mdl(X, y, probe=object())
    with pytest.raises(ProbeError, match="C must be a positive number"):
        mdl(X, y, C=0)
    with pytest.raises(ProbeError, match="at least 2 rows"):
        block_bounds(1)
    assert block_bounds(1000) == (1, 2, 4, 8, 16, 32, 62, 125, 250, 500, 1000)
    assert block_bounds(3) == (1, 3)
