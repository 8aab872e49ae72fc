"""LinearProbe and the batched solvers against scikit-learn's optima and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone, is_classifier, is_regressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_score

from hookscope.errors import ProbeError
from hookscope.probes import LinearProbe, fit_logistic, fit_ridge


def anisotropic(n: int, d: int, seed: int, classes: int = 2):
    """Features on very different scales (as residual streams are) and a planted label."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * np.exp(rng.standard_normal(d))
    w = rng.standard_normal(d) / X.std(0) / np.sqrt(d) * 3
    score = X @ w + rng.logistic(size=n)
    y = (score > 0).astype(int) if classes == 2 else np.digitize(score, [-1.0, 1.0])
    return X, y


def objective(coef, intercept, X, y, C, sample_weight=None):
    """scikit-learn's penalised objective, computed with its own log_loss."""
    lr = LogisticRegression()
    lr.classes_ = np.unique(y)
    lr.coef_, lr.intercept_ = coef, intercept
    p = lr.predict_proba(X)
    data = log_loss(y, p, normalize=False, sample_weight=sample_weight)
    return C * data + 0.5 * np.square(coef).sum()


def reference(X, y, C, **kw):
    return LogisticRegression(C=C, tol=1e-12, max_iter=100_000, **kw).fit(X, y)


@pytest.mark.parametrize("classes", [2, 3])
def test_logistic_probe_equals_sklearn_optimum(classes):
    X, y = anisotropic(1500, 40, seed=classes, classes=classes)
    ref = reference(X, y, C=0.3)
    probe = LinearProbe(C=0.3, tol=1e-10).fit(torch.tensor(X), y)
    coef, intercept = probe.coef_.numpy(), probe.intercept_.numpy()
    assert coef.shape == ref.coef_.shape
    rel = np.abs(coef - ref.coef_).max() / np.abs(ref.coef_).max()
    assert rel < 1e-4
    # the multinomial intercept is defined up to a common shift: compare centred
    assert np.allclose(
        intercept - intercept.mean() * (classes > 2),
        ref.intercept_ - ref.intercept_.mean() * (classes > 2),
        atol=1e-4,
    )
    ours, theirs = (
        objective(coef, intercept, X, y, 0.3),
        objective(ref.coef_, ref.intercept_, X, y, 0.3),
    )
    assert abs(ours - theirs) / theirs < 1e-6
    assert abs(probe.loss_ - theirs) / theirs < 1e-6
    assert np.array_equal(probe.predict(X), ref.predict(X)) or (
        np.mean(probe.predict(X) != ref.predict(X)) < 1e-3
    )
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=1e-5)
    assert probe.converged_


def test_without_intercept_and_with_sample_weights():
    X, y = anisotropic(800, 12, seed=5)
    sw = np.random.default_rng(0).uniform(0.2, 3.0, size=len(y))
    ref = reference(X, y, C=2.0, fit_intercept=False)
    probe = LinearProbe(C=2.0, fit_intercept=False, tol=1e-10).fit(X, y)
    np.testing.assert_allclose(probe.coef_.numpy(), ref.coef_, rtol=1e-4, atol=1e-7)
    assert probe.intercept_.abs().max() == 0
    ref_w = LogisticRegression(C=2.0, tol=1e-12, max_iter=100_000).fit(X, y, sample_weight=sw)
    probe_w = LinearProbe(C=2.0, tol=1e-10).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(probe_w.coef_.numpy(), ref_w.coef_, rtol=1e-4, atol=1e-7)


def test_string_labels_and_classes():
    X, y = anisotropic(600, 8, seed=1, classes=3)
    names = np.array(["neg", "neu", "pos"])[y]
    probe = LinearProbe(tol=1e-10).fit(X, names)
    ref = reference(X, names, C=1.0)
    assert list(probe.classes_) == ["neg", "neu", "pos"]
    assert (probe.predict(X) == ref.predict(X)).mean() > 0.999
    assert probe.score(X, names) == pytest.approx(ref.score(X, names), abs=2e-3)


def test_batched_problems_with_row_masks_equal_separate_fits():
    """One solve over several problems sharing X: each equals its own sklearn fit."""
    X, y = anisotropic(900, 20, seed=7)
    rng = np.random.default_rng(3)
    masks = rng.random((4, len(y))) < 0.6
    labels = np.stack([y, rng.permutation(y), y, 1 - y])
    C = torch.tensor([1.0, 1.0, 0.05, 5.0])
    sol = fit_logistic(
        torch.tensor(X),
        torch.tensor(labels),
        torch.tensor(masks, dtype=torch.float64),
        2,
        C=C,
        tol=1e-10,
    )
    assert bool(sol.converged.all())
    for b in range(4):
        ref = reference(X[masks[b]], labels[b][masks[b]], C=float(C[b]))
        np.testing.assert_allclose(sol.coef[b].numpy(), ref.coef_, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(sol.intercept[b].numpy(), ref.intercept_, atol=1e-5)


def test_ridge_equals_sklearn_and_the_closed_form():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 15)) * rng.uniform(0.1, 10, 15)
    t = X @ rng.standard_normal(15) + 3.0 + rng.standard_normal(300)
    probe = LinearProbe(task="regression", alpha=4.0).fit(X, t)
    ref = Ridge(alpha=4.0).fit(X, t)
    np.testing.assert_allclose(probe.coef_.numpy()[0], ref.coef_, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(probe.intercept_.numpy()[0], ref.intercept_, rtol=1e-9)
    # closed form: augmented least squares with an unpenalised intercept column
    A = np.hstack([X, np.ones((300, 1))])
    P = np.diag([4.0] * 15 + [0.0])
    w = np.linalg.solve(A.T @ A + P, A.T @ t)
    np.testing.assert_allclose(probe.coef_.numpy()[0], w[:15], rtol=1e-8, atol=1e-10)
    assert probe.score(X, t) == pytest.approx(ref.score(X, t), abs=1e-10)
    # batched with different row sets and alphas
    masks = torch.tensor(rng.random((3, 300)) < 0.7, dtype=torch.float64)
    sol = fit_ridge(
        torch.tensor(X),
        torch.tensor(np.stack([t, -t, 2 * t])),
        masks,
        alpha=torch.tensor([1.0, 4.0, 4.0]),
    )
    for b, (scale, a) in enumerate([(1, 1.0), (-1, 4.0), (2, 4.0)]):
        m = masks[b].bool().numpy()
        ref = Ridge(alpha=a).fit(X[m], scale * t[m])
        np.testing.assert_allclose(sol.coef[b, 0].numpy(), ref.coef_, rtol=1e-8, atol=1e-10)


def test_sklearn_estimator_contract():
    X, y = anisotropic(400, 10, seed=2)
    probe = LinearProbe(C=0.5, standardize=True)
    assert is_classifier(probe) and is_regressor(LinearProbe(task="regression"))
    twin = clone(probe)
    assert twin.get_params() == probe.get_params() and twin is not probe
    probe.set_params(C=0.25)
    assert probe.C == 0.25
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    ours = cross_val_score(LinearProbe(C=0.5, tol=1e-10), X, y, cv=folds)
    theirs = cross_val_score(LogisticRegression(C=0.5, tol=1e-12, max_iter=100_000), X, y, cv=folds)
    np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_standardisation_is_folded_back():
    X, y = anisotropic(700, 12, seed=4)
    probe = LinearProbe(C=0.7, standardize=True, tol=1e-10).fit(X, y)
    mu, sd = X.mean(0), X.std(0)
    ref = reference((X - mu) / sd, y, C=0.7)
    # coef_ acts on raw activations: decision = X @ coef + intercept
    np.testing.assert_allclose(
        probe.decision_function(X), ref.decision_function((X - mu) / sd), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(probe.coef_.numpy()[0] * sd, ref.coef_[0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(probe.mean_.numpy(), mu)
    assert "standardised" in repr(probe)


def test_planted_direction_is_found():
    rng = np.random.default_rng(0)
    d = 32  # the estimate's angular error shrinks as sqrt(d / n)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    y = rng.integers(0, 2, 8000)
    X = rng.standard_normal((8000, d)) + np.outer(2 * y - 1, u)
    probe = LinearProbe(C=1.0).fit(X, y)
    assert float(probe.direction_ @ torch.tensor(u)) > 0.99
    assert probe.direction_.shape == (d,) and probe.direction_.norm().item() == pytest.approx(1.0)
    Xm, ym = anisotropic(500, 6, seed=0, classes=3)
    assert LinearProbe().fit(Xm, ym).direction_.shape == (3, 6)


def test_bad_inputs_name_the_problem():
    X, y = anisotropic(50, 4, seed=0)
    with pytest.raises(ProbeError, match="single class"):
        LinearProbe().fit(X, np.zeros(50))
    with pytest.raises(ProbeError, match="49 labels but X has 50 rows"):
        LinearProbe().fit(X, y[:49])
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ProbeError, match=r"NaN.*first: \[3\]"):
        LinearProbe().fit(bad, y)
    with pytest.raises(ProbeError, match="classification"):
        LinearProbe(task="classify").fit(X, y)
    with pytest.raises(ProbeError, match="C must be a positive"):
        LinearProbe(C=0).fit(X, y)
    with pytest.raises(ProbeError, match="not fitted"):
        LinearProbe().predict(X)
    with pytest.raises(ProbeError, match="3 features but the probe was fit on 4"):
        LinearProbe().fit(X, y).predict(X[:, :3])
    with pytest.raises(ProbeError, match="regresses"):
        LinearProbe(task="regression").fit(X, y.astype(float)).predict_proba(X)


def test_stacked_designs_equal_separate_fits():
    """X stacked [G, n, d] with design[b]: every problem equals sklearn on its own matrix,
    including problems on the same design and a multinomial batch."""
    rng = np.random.default_rng(11)
    mats, labels, masks = [], [], []
    for g in range(3):
        X, y = anisotropic(700, 15, seed=20 + g, classes=3)
        mats.append(X)
        labels.append(y)
        masks.append(rng.random(len(y)) < 0.7)
    design = torch.tensor([0, 1, 2, 1])
    lab = np.stack([labels[g] for g in design.tolist()])
    lab[3] = rng.permutation(lab[3])  # a second problem on design 1
    w = np.stack([masks[g] for g in design.tolist()]).astype(float)
    C = torch.tensor([1.0, 0.2, 3.0, 1.0])
    sol = fit_logistic(
        torch.tensor(np.stack(mats)), torch.tensor(lab), torch.tensor(w), 3, C=C, tol=1e-10,
        design=design,
    )  # fmt: skip
    assert bool(sol.converged.all())
    for b, g in enumerate(design.tolist()):
        keep = w[b] > 0
        ref = reference(mats[g][keep], lab[b][keep], C=float(C[b]))
        coef = sol.coef[b].numpy()
        assert np.abs(coef - ref.coef_).max() / np.abs(ref.coef_).max() < 1e-4


def test_float32_activations_reach_the_float64_optimum():
    """float32 X (the store's format) multiplies in float32 but ends at scikit-learn's
    optimum of the same values in float64; a covariance hint changes nothing."""
    X, y = anisotropic(3000, 60, seed=5)
    X32 = torch.tensor(X, dtype=torch.float32)
    Xref = X32.double().numpy()
    ref = reference(Xref, y, C=1.0)
    rng = np.random.default_rng(0)
    labels = torch.tensor(np.stack([y, rng.permutation(y)]))
    weights = torch.ones(2, len(y), dtype=torch.float64)
    ref_shuffled = reference(Xref, labels[1].numpy(), C=1.0)
    cov = torch.cov(X32.double().T)
    for gram in (None, cov):
        sol = fit_logistic(X32, labels, weights, 2, C=1.0, tol=1e-7, gram=gram)
        assert bool(sol.converged.all())
        for b, r in enumerate((ref, ref_shuffled)):
            coef = sol.coef[b].numpy()
            assert np.abs(coef - r.coef_).max() / np.abs(r.coef_).max() < 1e-4
            ours = objective(coef, sol.intercept[b].numpy(), Xref, labels[b].numpy(), 1.0)
            theirs = objective(r.coef_, r.intercept_, Xref, labels[b].numpy(), 1.0)
            assert abs(ours - theirs) / theirs < 1e-6


def test_design_and_gram_mistakes_are_named():
    X = torch.randn(50, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 50))
    w = torch.ones(2, 50, dtype=torch.float64)
    with pytest.raises(ProbeError, match="design"):
        fit_logistic(torch.stack([X, X]), y, w, 2)  # stacked without design
    with pytest.raises(ProbeError, match="design must be 2 indices in 0..1"):
        fit_logistic(torch.stack([X, X]), y, w, 2, design=torch.tensor([0, 2]))
    with pytest.raises(ProbeError, match="one matrix"):
        fit_logistic(X, y, w, 2, design=torch.tensor([0, 0]))
    with pytest.raises(ProbeError, match="gram must be"):
        fit_logistic(X, y, w, 2, gram=torch.eye(5))
