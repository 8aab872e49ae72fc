"""CKA and collapse analysis against independent numpy references and closed forms.

The references below follow Kornblith et al.'s published numpy code: n x n Gram matrices,
centring with an explicit centring matrix H = I - 11'/n, and the unbiased (U-centred)
estimator written as in their ``center_gram(unbiased=True)`` - a different formulation from
the feature-space expansion hookscope uses.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from hookscope import analysis as an
from hookscope.errors import AnalysisError, HookscopeError

matplotlib.use("Agg")


# ----------------------------------------------------------------- independent numpy reference


def np_gram_rbf(x: np.ndarray, threshold: float) -> np.ndarray:
    dot = x @ x.T
    sq = np.diag(dot)
    d2 = -2 * dot + sq[:, None] + sq[None, :]
    return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))


def np_center(g: np.ndarray, unbiased: bool) -> np.ndarray:
    n = g.shape[0]
    g = g.copy()
    if unbiased:  # U-centring (Szekely & Rizzo 2014), as in Kornblith's reference code
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None]
        g -= means[None, :]
        np.fill_diagonal(g, 0)
        return g
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ g @ h


def np_cka(gx: np.ndarray, gy: np.ndarray, debiased: bool = False) -> float:
    gx, gy = np_center(gx, debiased), np_center(gy, debiased)
    return float(gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy)))


def related_pair(n: int, p: int, q: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    y = x @ rng.standard_normal((p, q)) * 0.4 + rng.standard_normal((n, q))
    y[:, 0] += x[:, 0] ** 2  # a little nonlinearity
    return x, y


# ------------------------------------------------------------------------- values vs reference


@pytest.mark.parametrize("n,p,q", [(60, 5, 7), (20, 60, 80), (40, 40, 3)])
def test_linear_cka_matches_gram_reference(n, p, q):
    x, y = related_pair(n, p, q, seed=n + p)
    expected = np_cka(x @ x.T, y @ y.T)
    assert an.linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert an.linear_cka(torch.from_numpy(x).float(), y) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n,p,q", [(60, 5, 7), (12, 30, 40)])
def test_debiased_cka_matches_u_centred_reference(n, p, q):
    x, y = related_pair(n, p, q, seed=3)
    expected = np_cka(x @ x.T, y @ y.T, debiased=True)
    assert an.debiased_cka(x, y) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
def test_rbf_cka_matches_kornblith_reference(threshold):
    x, y = related_pair(50, 6, 9, seed=7)
    expected = np_cka(np_gram_rbf(x, threshold), np_gram_rbf(y, threshold))
    assert an.rbf_cka(x, y, threshold=threshold) == pytest.approx(expected, rel=1e-8)
    expected_u = np_cka(np_gram_rbf(x, threshold), np_gram_rbf(y, threshold), debiased=True)
    assert an.rbf_cka(x, y, threshold, debiased=True) == pytest.approx(expected_u, rel=1e-8)


def test_rbf_median_is_over_the_full_matrix_with_even_count():
    # n = 4: 16 squared distances (4 zeros on the diagonal); numpy averages the middle two
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    y = np.array([[1.0], [2.0], [4.0], [8.0]])
    assert an.rbf_cka(x, y) == pytest.approx(np_cka(np_gram_rbf(x, 0.5), np_gram_rbf(y, 0.5)))


# ------------------------------------------------------------------ closed forms, invariances


@pytest.mark.parametrize("fn", [an.linear_cka, an.debiased_cka, an.rbf_cka])
def test_self_similarity_is_one(fn):
    x, _ = related_pair(40, 8, 8, seed=1)
    assert fn(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fn", [an.linear_cka, an.debiased_cka, an.rbf_cka])
def test_invariances(fn):
    rng = np.random.default_rng(11)
    x, y = related_pair(80, 10, 12, seed=2)
    base = fn(x, y)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    assert fn(x, y @ q) == pytest.approx(base, abs=1e-10)  # orthogonal
    assert fn(3.7 * x, y) == pytest.approx(base, abs=1e-10)  # isotropic scaling
    assert fn(x + rng.standard_normal(10) * 50, y - 20.0) == pytest.approx(base, abs=1e-9)


def test_generic_invertible_map_changes_linear_cka():
    x, y = related_pair(200, 10, 12, seed=4)
    a = np.diag(np.geomspace(1, 100, 10)) @ np.random.default_rng(0).standard_normal((10, 10))
    assert abs(np.linalg.det(a)) > 1e-6
    assert abs(an.linear_cka(x @ a, y) - an.linear_cka(x, y)) > 0.05


def test_independent_gaussians_biased_and_debiased():
    # E[biased linear CKA] ~ p / (n + p) for independent Gaussians with p = q; debiased ~ 0
    n, p = 500, 100
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((n, p)), rng.standard_normal((n, p))
    assert an.linear_cka(x, y) == pytest.approx(p / (n + p), abs=0.01)
    assert abs(an.debiased_cka(x, y)) < 0.01


# ------------------------------------------------------------------------------- minibatches


@pytest.mark.parametrize("batch", [50, 100])
def test_minibatch_cka_close_to_full_debiased(batch):
    x, y = related_pair(3000, 32, 24, seed=9)
    mb = an.MinibatchCKA()
    for i in range(0, 3000, batch):
        mb.update(x[i : i + batch], y[i : i + batch])
    assert mb.n_batches == 3000 // batch and mb.n_samples == 3000
    assert abs(mb.value() - an.debiased_cka(x, y)) < 0.01


def test_minibatch_accumulate_and_matrix_agree_with_pairs():
    x, y = related_pair(400, 6, 5, seed=12)
    z = np.tanh(x[:, :4])
    batches = [(x[i : i + 80], y[i : i + 80]) for i in range(0, 400, 80)]
    pair = an.MinibatchCKA().accumulate(batches, progress=False).value()
    acc = an.MinibatchCKAMatrix().accumulate(
        ([x[i : i + 80], y[i : i + 80], z[i : i + 80]] for i in range(0, 400, 80)), progress=False
    )
    mat = acc.value()
    assert mat[0, 1] == pytest.approx(pair, rel=1e-12)
    assert torch.allclose(mat, mat.T) and torch.all(mat.diagonal() == 1)
    # one batch holding everything = the full debiased CKA
    one = an.MinibatchCKAMatrix()
    one.update({"x": x, "z": z})
    assert one.value()[0, 1] == pytest.approx(an.debiased_cka(x, z), rel=1e-10)
    assert one.report().names == ["x", "z"]


def test_minibatch_errors():
    mb = an.MinibatchCKA()
    with pytest.raises(AnalysisError, match="update"):
        mb.value()
    with pytest.raises(AnalysisError, match="need at least 4 samples per minibatch, got 2"):
        mb.update(np.ones((2, 3)), np.ones((2, 3)))
    rng = np.random.default_rng(0)
    mb.update(rng.standard_normal((10, 3)), rng.standard_normal((10, 4)))
    with pytest.raises(AnalysisError, match=r"\[3, 4\]"):
        mb.update(rng.standard_normal((10, 5)), rng.standard_normal((10, 4)))
    with pytest.raises(AnalysisError, match="X has 10 rows but Y has 9 rows"):
        mb.update(rng.standard_normal((10, 3)), rng.standard_normal((9, 4)))
    mb.reset()
    assert mb.n_batches == 0


# ------------------------------------------------------------------------ layer-by-layer matrix


def layers(seed: int = 0, n: int = 120) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, 8))
    out = [h]
    for width in (10, 12, 6):
        h = np.tanh(h @ rng.standard_normal((h.shape[1], width)) * 0.7)
        out.append(h)
    return out


@pytest.mark.parametrize("kind", ["linear", "debiased", "rbf"])
def test_cka_matrix_equals_pairwise_reference(kind):
    acts = layers()
    mat = an.cka_matrix(acts, kind=kind, progress=False)
    assert mat.dtype == torch.float64 and mat.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            xi, xj = acts[i], acts[j]
            if kind == "rbf":
                ref = np_cka(np_gram_rbf(xi, 0.5), np_gram_rbf(xj, 0.5))
            else:
                ref = np_cka(xi @ xi.T, xj @ xj.T, debiased=kind == "debiased")
            assert float(mat[i, j]) == pytest.approx(ref, rel=1e-8, abs=1e-12)


def test_cka_matrix_accepts_dicts_and_flattens_sample_dims():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 5, 4))  # [batch, pos, d]
    b = np.tanh(a @ rng.standard_normal((4, 3)))
    rep = an.cka_report({"resid.0": a, "mlp.0": b}, sample_dims=2, progress=False)
    assert rep.names == ["resid.0", "mlp.0"]
    expected = an.linear_cka(a.reshape(30, 4), b.reshape(30, 3))
    assert float(rep.matrix[0, 1]) == pytest.approx(expected)
    per_batch = an.cka_matrix([a, b], sample_dims=1, progress=False)  # [6, 20] vs [6, 15]
    assert float(per_batch[0, 1]) == pytest.approx(
        an.linear_cka(a.reshape(6, -1), b.reshape(6, -1))
    )
    df = rep.to_pandas()
    assert df.loc["resid.0", "mlp.0"] == pytest.approx(expected)
    assert "resid.0" in repr(rep) and "CKAMatrix" in repr(rep)
    fig = rep.plot()
    assert isinstance(fig, Figure) and fig.axes[0].images


def test_cka_matrix_errors():
    rng = np.random.default_rng(2)
    with pytest.raises(AnalysisError, match="layer '0' has 10 samples but layer '1' has 9"):
        an.cka_matrix([rng.standard_normal((10, 3)), rng.standard_normal((9, 3))], progress=False)
    with pytest.raises(AnalysisError, match="kind must be one of 'linear', 'debiased', 'rbf'"):
        an.cka_matrix([rng.standard_normal((10, 3))], kind="cosine")
    with pytest.raises(AnalysisError, match="empty"):
        an.cka_matrix([])
    with pytest.raises(AnalysisError, match="list/tuple"):
        an.cka_matrix(rng.standard_normal((10, 3)))


# ------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_analysis_errors():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 3))
    with pytest.raises(AnalysisError, match="X has 3 rows but Y has 5 rows"):
        an.linear_cka(x[:3], x)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(AnalysisError, match="1 NaN"):
        an.linear_cka(bad, x)
    inf = x.copy()
    inf[0, 0] = np.inf
    with pytest.raises(AnalysisError, match="Inf"):
        an.rbf_cka(x, inf)
    with pytest.raises(AnalysisError, match="2-D"):
        an.linear_cka(x[:, 0], x)
    with pytest.raises(AnalysisError, match="need at least 4 samples"):
        an.debiased_cka(x[:3], x[:3])
    with pytest.raises(AnalysisError, match="no variance"):
        an.linear_cka(np.full((5, 3), 7.0), x)
    with pytest.raises(AnalysisError, match="threshold"):
        an.rbf_cka(x, x, threshold=0)
    with pytest.raises(AnalysisError, match="median squared distance"):
        an.rbf_cka(np.array([[0.0], [0.0], [0.0], [1.0]]), x[:4])
    with pytest.raises(HookscopeError):  # the whole tree, and ValueError for generic handlers
        an.linear_cka("abc", x)
    assert issubclass(AnalysisError, ValueError)


# --------------------------------------------------------------------------- collapse analysis


def test_collapse_index_and_drop_points_closed_form():
    curve = [0.2, 0.9, 0.85, 0.5, 0.3]
    assert an.collapse_index(curve) == pytest.approx(0.6)
    assert an.drop_points(curve, 0.1) == [3, 4]
    assert an.collapse_index([0.1, 0.5, 0.9]) == 0.0 and an.drop_points([0.1, 0.5, 0.9]) == []
    rep = an.CollapseReport.from_curve(curve, names=list("abcde"), drop_threshold=0.1)
    assert rep.peak_layer == "b" and rep.drop_points == ["d", "e"]
    assert rep.to_pandas()["drop"].tolist() == [False, False, False, True, True]
    assert "collapse_index=0.6000" in repr(rep)
    assert isinstance(rep.plot(), Figure)
    with pytest.raises(AnalysisError, match="names has 2 entries but curve has 5"):
        an.CollapseReport.from_curve(curve, names=["a", "b"])


def shared_pc1_pair(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two unrelated representations that share one huge common direction."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(n) * 20.0
    x = rng.standard_normal((n, 10)) + np.outer(s, rng.standard_normal(10))
    y = rng.standard_normal((n, 12)) + np.outer(s, rng.standard_normal(12))
    return x, y


def test_pc1_diagnostic_exposes_one_shared_direction():
    x, y = shared_pc1_pair()
    d = an.pc1_diagnostic(x, y)
    assert d.cka > 0.9
    assert d.pc1_fraction_x > 0.9 and d.pc1_fraction_y > 0.9
    # without PC1 what is left is independent noise: CKA ~ sqrt(9*11/(400+9)(400+11)) ~ 0.024
    assert d.cka_without_pc1 < 0.06
    # reference for PC1 removal: sklearn's PCA
    from sklearn.decomposition import PCA

    def remove_pc1(a):
        c = a - a.mean(0)
        v = PCA(1).fit(a).components_
        return c - c @ v.T @ v

    assert d.cka_without_pc1 == pytest.approx(np_cka(*(g @ g.T for g in map(remove_pc1, (x, y)))))
    assert d.to_pandas().shape == (1, 5) and isinstance(d.plot(), Figure)


def test_collapse_report_on_layers():
    x, ref = shared_pc1_pair(seed=1)
    rng = np.random.default_rng(1)
    acts = {
        "l0": ref + 0.1 * rng.standard_normal(ref.shape),
        "l1": x,
        "l2": rng.standard_normal((400, 5)),
    }
    rep = an.collapse_report(acts, ref, progress=False, drop_threshold=0.2)
    expected = [an.linear_cka(a, ref) for a in acts.values()]
    assert rep.curve.tolist() == pytest.approx(expected)
    assert rep.peak_layer == "l0" and rep.drop_points == ["l2"]
    assert rep.collapse_index == pytest.approx(expected[0] - expected[2])
    assert rep.curve_without_pc1[1] < 0.1 < rep.curve[1]  # l1's similarity was PC1 only
    assert rep.pc1_fraction[1] > 0.9
    df = rep.to_pandas()
    assert list(df.columns) == ["layer", "score", "drop", "score_without_pc1", "pc1_fraction"]
    assert isinstance(rep.plot(), Figure)
    no_pc1 = an.cka_matrix(list(acts.values()), remove_pc1=True, progress=False)
    assert float(no_pc1[0, 1]) < 0.1
