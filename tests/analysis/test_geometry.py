"""PCA, clustering, separability, subspaces and neuron statistics against references."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from hookscope import analysis as an
from hookscope.errors import AnalysisError

matplotlib.use("Agg")


def anisotropic(n: int, p: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, p)) @ np.diag(np.geomspace(5, 0.2, p)) + rng.standard_normal(p) * 3
    )


# ---------------------------------------------------------------------------------------- PCA


@pytest.mark.parametrize("shape", [(200, 12), (15, 40)])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_pca_matches_sklearn(shape, method):
    a = anisotropic(*shape, seed=shape[0])
    k = 5
    ours = an.pca(a, k=k, method=method)
    ref = PCA(n_components=k).fit(a)
    np.testing.assert_allclose(ours.explained_variance.numpy(), ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(
        ours.explained_variance_ratio.numpy(), ref.explained_variance_ratio_, rtol=1e-8
    )
    # the same components up to sign; our sign: largest-magnitude entry positive
    dots = np.sum(ours.components.numpy() * ref.components_, axis=1)
    np.testing.assert_allclose(np.abs(dots), 1.0, atol=1e-8)
    comps = ours.components.numpy()
    assert np.all(comps[np.arange(k), np.abs(comps).argmax(1)] > 0)
    proj = ours.transform(a).numpy()
    np.testing.assert_allclose(np.abs(proj), np.abs(ref.transform(a)), atol=1e-7)


def test_pca_default_keeps_the_numerical_rank_and_reports():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 3)) @ rng.standard_normal((3, 20))  # rank 3
    res = an.pca(a)
    assert res.components.shape == (3, 20)
    assert float(res.explained_variance_ratio.sum()) == pytest.approx(1.0)
    with pytest.raises(AnalysisError, match="k=4 components but A has numerical rank 3"):
        an.pca(a, k=4)
    df = res.to_pandas()
    assert df["cumulative_ratio"].iloc[-1] == pytest.approx(1.0)
    assert "PCAResult(3 components" in repr(res) and isinstance(res.plot(), Figure)
    layers = an.pca_by_layer({"a": a, "b": anisotropic(50, 8, 1)}, k=5)
    assert list(layers) == ["a", "b"]
    assert layers["a"].components.shape == (3, 20) and layers["b"].components.shape == (5, 8)
    with pytest.raises(AnalysisError, match="has 20 features but the PCA was fit on 20|features"):
        res.transform(np.ones((2, 7)))


# ------------------------------------------------------------------------- clusters, probes


def blobs(seed: int = 0, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    labels = np.repeat(np.arange(3), n)
    return centers[labels] + rng.standard_normal((3 * n, 3)), labels


def naive_silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Rousseeuw's definition with explicit loops over samples."""
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    scores = []
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() == 1:
            scores.append(0.0)
            continue
        a = dist[i, own].sum() / (own.sum() - 1)
        b = min(dist[i, labels == c].mean() for c in np.unique(labels) if c != labels[i])
        scores.append((b - a) / max(a, b))
    return float(np.mean(scores))


def test_kmeans_recovers_blobs_and_silhouette_matches_definition():
    x, labels = blobs()
    res = an.kmeans(x, 3)
    assert adjusted_rand_score(labels, res.labels.numpy()) == 1.0
    assert res.silhouette == pytest.approx(naive_silhouette(x, res.labels.numpy()), rel=1e-10)
    assert an.silhouette(x, labels) == pytest.approx(naive_silhouette(x, labels), rel=1e-10)
    assert sorted(res.to_pandas()["size"]) == [60, 60, 60]
    assert "silhouette" in repr(res) and isinstance(res.plot(), Figure)
    with pytest.raises(AnalysisError, match="k must be smaller than the number of samples"):
        an.kmeans(x[:3], 3)


def test_linear_separability_separable_and_xor():
    x, labels = blobs(1)
    assert an.linear_separability(x, labels) > 0.97
    rng = np.random.default_rng(2)
    pts = rng.uniform(-1, 1, size=(400, 2))
    xor = ((pts[:, 0] > 0) ^ (pts[:, 1] > 0)).astype(int)
    assert an.linear_separability(pts, xor) < 0.7  # chance is 0.5; XOR is not linear
    with pytest.raises(AnalysisError, match="1 distinct class"):
        an.linear_separability(pts, np.zeros(400))
    with pytest.raises(AnalysisError, match="smallest class has 2 samples"):
        an.linear_separability(pts, np.r_[np.zeros(398), 1, 1])


# ------------------------------------------------------------------------------- subspaces


def test_principal_angles_match_scipy_on_pca_bases():
    a, b = anisotropic(300, 10, 3), anisotropic(250, 10, 4)
    k = 4
    ref = np.sort(subspace_angles(PCA(k).fit(a).components_.T, PCA(k).fit(b).components_.T))
    ours = an.principal_angles(a, b, k=k).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-7)
    assert an.subspace_overlap(a, b, k) == pytest.approx(np.mean(np.cos(ref) ** 2), abs=1e-10)


def test_identical_and_orthogonal_subspaces():
    rng = np.random.default_rng(5)
    x = np.zeros((100, 10))
    x[:, :3] = rng.standard_normal((100, 3)) * [3, 2, 1]
    y = np.zeros((80, 10))
    y[:, 5:8] = rng.standard_normal((80, 3)) * [3, 2, 1]
    same = x[::-1] * 2.0 + 1.0
    assert an.subspace_overlap(x, same, 3) == pytest.approx(1.0)
    np.testing.assert_allclose(an.principal_angles(x, same, 3).numpy(), 0.0, atol=1e-6)
    assert an.subspace_overlap(x, y, 3) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(an.principal_angles(x, y, 3).numpy(), np.pi / 2, atol=1e-7)
    with pytest.raises(AnalysisError, match="X has 10 features but Y has 4 features"):
        an.principal_angles(x, y[:, :4])


# ------------------------------------------------------------------------ neuron statistics


def morcos_selectivity(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = []
    for j in range(x.shape[1]):
        means = [x[labels == c, j].mean() for c in np.unique(labels)]
        top = max(means)
        rest = (sum(means) - top) / (len(means) - 1)
        out.append(0.0 if top + rest == 0 else (top - rest) / (top + rest))
    return np.array(out)


def test_dead_neurons_and_class_selectivity():
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(4), 25)
    x = np.maximum(rng.standard_normal((100, 6)), 0)
    x[:, 1] = 0.0  # dead
    x[:, 2] = np.where(labels == 2, 1.5, 0.0)  # fires only for class 2
    x[:, 3] = 0.7  # constant, not selective
    dead = an.dead_neurons(x)
    assert dead.tolist() == [False, True, False, False, False, False]
    sel = an.class_selectivity(x, labels)
    np.testing.assert_allclose(sel.numpy(), morcos_selectivity(x, labels), rtol=1e-12)
    assert sel[2] == pytest.approx(1.0) and sel[3] == pytest.approx(0.0) and sel[1] == 0.0
    with pytest.raises(AnalysisError, match="non-negative"):
        an.class_selectivity(x - 1.0, labels)
    with pytest.raises(AnalysisError, match="labels has 99 entries but the activations have 100"):
        an.class_selectivity(x, labels[:99])
    with pytest.raises(AnalysisError, match="integer class ids"):
        an.class_selectivity(x, labels + 0.5)


def test_compare_neuron_stats_before_after():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 30)
    before = np.maximum(rng.standard_normal((90, 5)), 0)
    before[:, 0] = 0.0  # dead before, revived after
    after = before.copy()
    after[:, 0] = np.where(labels == 1, 2.0, 0.0)
    after[:, 4] = 0.0  # newly dead
    cmp_ = an.compare_neuron_stats(before, after, labels)
    s = cmp_.summary()
    assert s["newly_dead"] == 1 and s["revived"] == 1
    assert s["dead_fraction_before"] == pytest.approx(0.2) and s[
        "dead_fraction_after"
    ] == pytest.approx(0.2)
    assert s["mean_selectivity_after"] == pytest.approx(morcos_selectivity(after, labels).mean())
    df = cmp_.to_pandas()
    assert df.shape == (5, 5) and df["selectivity_after"].iloc[0] == pytest.approx(1.0)
    assert "newly_dead" in repr(cmp_) and isinstance(cmp_.plot(), Figure)
    with pytest.raises(AnalysisError, match=r"before has shape \(90, 5\) but after has \(90, 4\)"):
        an.compare_neuron_stats(before, after[:, :4], labels)
    assert isinstance(an.dead_neurons(torch.zeros(3, 2)), torch.Tensor)
