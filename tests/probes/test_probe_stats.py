"""hookscope.probes.stats against scikit-learn, scipy, statsmodels, closed forms and
simulations with known truth.

(Named test_probe_stats.py, not test_stats.py: tests/store/test_stats.py already uses that
basename and the test folders have no __init__.py, so pytest would refuse to collect both.)
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from scipy import stats as sps
from sklearn import metrics as skm
from statsmodels.stats.multitest import multipletests

from hookscope.errors import ProbeError
from hookscope.probes import stats as st


def sklearn_metric(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The reference definitions the module documents, through scikit-learn."""
    if metric == "r2":
        return skm.r2_score(y, pred)
    k = pred.shape[1]
    if metric == "accuracy":
        return skm.accuracy_score(y, pred.argmax(1))
    if metric == "f1":
        average = "binary" if k == 2 else "macro"
        return skm.f1_score(y, pred.argmax(1), average=average, zero_division=0)
    if k == 2:
        return skm.roc_auc_score(y, pred[:, 1])
    return skm.roc_auc_score(y, pred, multi_class="ovr", average="macro", labels=np.arange(k))


def tied_classification(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities with many tied scores: every row's probability vector is one
    of 12 (binary: 11 rounded values), and labels that depend on the scores."""
    rng = np.random.default_rng(seed)
    if k == 2:
        p1 = rng.integers(0, 11, n) / 10
        y = (rng.random(n) < 0.25 + 0.5 * p1).astype(np.int64)
        return y, np.stack([1 - p1, p1], 1)
    palette = rng.dirichlet(np.ones(k), size=12)
    pred = palette[rng.integers(0, 12, n)]
    y = np.array([rng.choice(k, p=0.5 * row + 0.5 / k) for row in pred], dtype=np.int64)
    return y, pred


def regression(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = 50.0 + rng.standard_normal(n)  # an offset far from 0: the sums of squares must not cancel
    return y, y + 0.8 * rng.standard_normal(n)


# ------------------------------------------------------------------------ metric values


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("metric", ["accuracy", "f1", "auroc"])
def test_metric_values_match_sklearn_on_resamples(metric, k):
    y, pred = tied_classification(400, k, seed=k)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 400, size=(6, 350))  # resamples of another length than n
    got = st.metric_values(metric, torch.as_tensor(y), torch.as_tensor(pred), torch.as_tensor(idx))
    want = [sklearn_metric(metric, y[r], pred[r]) for r in idx]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    whole = st.metric_values(metric, y, pred)  # numpy input, all rows
    assert whole.shape == (1,)
    assert float(whole[0]) == pytest.approx(sklearn_metric(metric, y, pred), abs=1e-12)


def test_r2_matches_sklearn_on_resamples():
    y, pred = regression(300, seed=1)
    idx = np.random.default_rng(2).integers(0, 300, size=(6, 300))
    got = st.metric_values("r2", y, pred, idx)
    want = [skm.r2_score(y[r], pred[r]) for r in idx]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_macro_f1_averages_only_the_classes_present_like_sklearn():
    # class 2 is neither true nor predicted in the resample: sklearn leaves it out of the mean
    y = np.array([0, 0, 1, 1, 2])
    pred = np.eye(3)[[0, 1, 1, 1, 2]]
    idx = np.array([[0, 1, 2, 3]])
    got = float(st.metric_values("f1", y, pred, idx)[0])
    assert got == pytest.approx(skm.f1_score(y[:4], [0, 1, 1, 1], average="macro"))
    assert got == pytest.approx((2 / 3 + 0.8) / 2)


def test_undefined_metrics_are_nan():
    y = np.array([1, 1, 1, 1])
    pred = np.array([[0.2, 0.8], [0.4, 0.6], [0.3, 0.7], [0.9, 0.1]])
    assert math.isnan(float(st.metric_values("auroc", y, pred)[0]))  # one class
    assert math.isnan(float(st.metric_values("r2", np.ones(5), np.arange(5.0))[0]))


@pytest.mark.parametrize(
    "metric,k", [("accuracy", 2), ("f1", 2), ("f1", 4), ("auroc", 2), ("auroc", 4), ("r2", 0)]
)
def test_jackknife_closed_form_equals_leaving_each_row_out(metric, k):
    n = 60
    if metric == "r2":
        y, pred = regression(n, seed=3)
    else:
        y, pred = tied_classification(n, k, seed=3)
    jack = st._jackknife(st._prepare(metric, y, pred)).numpy()
    want = [sklearn_metric(metric, np.delete(y, i), np.delete(pred, i, axis=0)) for i in range(n)]
    np.testing.assert_allclose(jack, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------ bootstrap


def test_resample_indices_shape_range_and_seed():
    a = st.resample_indices(50, 7, torch.Generator().manual_seed(3))
    b = st.resample_indices(50, 7, torch.Generator().manual_seed(3))
    assert a.shape == (7, 50) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < 50
    assert torch.equal(a, b)
    # with replacement: a resample of 50 rows repeats some (P(no repeat) = 50!/50^50)
    assert all(len(set(row.tolist())) < 50 for row in a)


def test_percentile_interval_is_the_quantiles_of_sklearn_replicates():
    y, pred = tied_classification(200, 2, seed=4)
    ci = st.bootstrap("auroc", y, pred, n_resamples=300, confidence=0.9, seed=11)
    idx = st.resample_indices(200, 300, torch.Generator().manual_seed(11)).numpy()
    reps = np.array([sklearn_metric("auroc", y[r], pred[r]) for r in idx])
    np.testing.assert_allclose(ci.replicates.numpy(), reps, rtol=1e-12)
    assert ci.estimate == pytest.approx(skm.roc_auc_score(y, pred[:, 1]))
    assert ci.low == pytest.approx(np.percentile(reps, 5))
    assert ci.high == pytest.approx(np.percentile(reps, 95))
    assert (ci.confidence, ci.method, ci.metric) == (0.9, "percentile", "auroc")
    assert str(ci).startswith(f"auroc {ci.estimate:.4g} [") and "90% percentile CI" in str(ci)


def vectorised_auc(y, score, axis=-1):
    """ROC AUC from midranks, vectorised for scipy.stats.bootstrap."""
    ranks = sps.rankdata(score, axis=axis)
    n_pos = y.sum(axis)
    n_neg = y.shape[axis] - n_pos
    return ((ranks * y).sum(axis) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def vectorised_r2(y, pred, axis=-1):
    ss_tot = ((y - y.mean(axis, keepdims=True)) ** 2).sum(axis)
    return 1 - ((y - pred) ** 2).sum(axis) / ss_tot


def monte_carlo_tolerance(replicates: np.ndarray, endpoint: float, b: int) -> float:
    """5 Monte-Carlo SDs of the difference of two independent estimates of the bootstrap
    quantile at ``endpoint``: the quantile's own SD is about half the spread of the
    replicates' quantiles at ``q -+ sqrt(q (1 - q) / b)`` (the binomial SD of its rank)."""
    q = float(np.mean(replicates <= endpoint))
    delta = math.sqrt(q * (1 - q) / b)
    hi, lo = np.quantile(replicates, [min(q + delta, 1.0), max(q - delta, 0.0)])
    return 5 * math.sqrt(2) * (hi - lo) / 2


def skewed_classification(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels from a logistic model of a Gaussian score, scored by a flatter logistic:
    AUROC about 0.9 on 120 rows, where the bootstrap distribution is visibly skewed."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(n)
    y = (rng.random(n) < 1 / (1 + np.exp(-3 * s))).astype(np.int64)
    p1 = 1 / (1 + np.exp(-s))
    return y, np.stack([1 - p1, p1], 1)


@pytest.mark.parametrize("metric", ["accuracy", "auroc", "r2"])
def test_bca_agrees_with_scipy(metric):
    """Same data, independent resamples (20,000 each): the BCa endpoints agree with scipy's
    within Monte-Carlo error. For AUROC the test has power: scipy's own percentile interval
    is further from its BCa interval than the tolerance."""
    n, b = 120, 20_000
    if metric == "r2":
        y, pred = regression(n, seed=5)
        data, stat = (y, pred), vectorised_r2
    else:
        y, pred = skewed_classification(n, seed=5)
        if metric == "accuracy":
            data, stat = ((pred.argmax(1) == y).astype(float),), np.mean
        else:
            data, stat = (y, pred[:, 1]), vectorised_auc

    def scipy_interval(method):
        res = sps.bootstrap(
            data, stat, n_resamples=b, method=method, paired=len(data) > 1, random_state=0
        )
        return res.confidence_interval

    ref = scipy_interval("BCa")
    ci = st.bootstrap(metric, y, pred, n_resamples=b, seed=0, method="bca")
    assert ci.estimate == pytest.approx(float(stat(*data)), abs=1e-12)
    reps = ci.replicates.numpy()
    if metric == "accuracy":  # a discrete statistic: quantiles sit on the 1/n grid
        tol_low = tol_high = 1 / n
    else:
        tol_low = monte_carlo_tolerance(reps, ci.low, b)
        tol_high = monte_carlo_tolerance(reps, ci.high, b)
    assert ci.low == pytest.approx(ref.low, abs=tol_low)
    assert ci.high == pytest.approx(ref.high, abs=tol_high)
    if metric == "auroc":
        pct = scipy_interval("percentile")
        assert abs(pct.low - ref.low) > tol_low or abs(pct.high - ref.high) > tol_high


def test_percentile_coverage_on_two_gaussians_with_known_accuracy():
    """400 test sets of 1000 rows from two Gaussians (equal priors, means -mu and +mu,
    identity covariance) scored by a FIXED linear rule w.x + b: its accuracy is
    (Phi((w.mu + b) / |w|) + Phi((w.mu - b) / |w|)) / 2 in closed form. The 95% percentile
    interval must cover it in 93-97% of the test sets."""
    sets, n = 400, 1000
    mu = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    w = torch.tensor([1.0, 0.7, -0.4], dtype=torch.float64)
    b = 0.3
    norm = float(w.norm())
    truth = 0.5 * (sps.norm.cdf((w @ mu + b) / norm) + sps.norm.cdf((w @ mu - b) / norm))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (sets, n), generator=g)
    x = (2 * y[..., None] - 1) * mu + torch.randn(sets, n, 3, generator=g, dtype=torch.float64)
    p1 = torch.sigmoid(x @ w + b)
    pred = torch.stack([1 - p1, p1], -1)
    covered = 0
    for i in range(sets):
        ci = st.bootstrap("accuracy", y[i], pred[i], n_resamples=1000, seed=i)
        covered += ci.low <= truth <= ci.high
    assert 0.93 <= covered / sets <= 0.97, covered / sets


def test_undefined_replicates_are_dropped_with_a_warning():
    # 2 positives among 20 rows: resamples that miss both have no AUROC
    y = np.zeros(20, dtype=np.int64)
    y[[3, 11]] = 1
    p1 = np.linspace(0.05, 0.95, 20)
    pred = np.stack([1 - p1, p1], 1)
    idx = st.resample_indices(20, 500, torch.Generator().manual_seed(2)).numpy()
    missing = int(sum(y[r].sum() == 0 for r in idx))
    assert missing > 0
    with pytest.warns(RuntimeWarning, match=f"undefined on {missing} of 500"):
        ci = st.bootstrap("auroc", y, pred, n_resamples=500, seed=2)
    assert ci.replicates.numel() == 500 - missing
    with pytest.raises(ProbeError, match="undefined on these rows"):
        st.bootstrap("auroc", np.ones(20, dtype=np.int64), pred)


# ------------------------------------------------------------------------ paired difference


def test_paired_difference_uses_the_same_rows_for_both():
    rng = np.random.default_rng(8)
    n = 500
    y = rng.integers(0, 2, n)
    pa = np.clip(0.5 + 0.35 * (2 * y - 1) + 0.3 * rng.standard_normal(n), 0.01, 0.99)
    pb = np.clip(pa + 0.25 * rng.standard_normal(n), 0.01, 0.99)  # correlated with a
    pred_a, pred_b = np.stack([1 - pa, pa], 1), np.stack([1 - pb, pb], 1)
    diff = st.paired_difference("accuracy", y, pred_a, pred_b, n_resamples=2000, seed=4)
    idx = st.resample_indices(n, 2000, torch.Generator().manual_seed(4)).numpy()
    np.testing.assert_allclose(
        diff.replicates[:20].numpy(),
        [
            skm.accuracy_score(y[r], pred_a[r].argmax(1))
            - skm.accuracy_score(y[r], pred_b[r].argmax(1))
            for r in idx[:20]
        ],
        atol=1e-12,
    )
    ca = (pred_a.argmax(1) == y).astype(float)
    cb = (pred_b.argmax(1) == y).astype(float)
    assert diff.estimate == pytest.approx(ca.mean() - cb.mean())
    assert diff.low == pytest.approx(np.percentile(diff.replicates.numpy(), 2.5))
    # closed form: the bootstrap SD of a paired difference of means is sd(ca - cb) / sqrt(n);
    # unpaired resampling would give sqrt(var(ca) + var(cb)) / sqrt(n), about 1.6x larger here
    paired_sd = np.std(ca - cb) / np.sqrt(n)
    unpaired_sd = np.sqrt(np.var(ca) + np.var(cb)) / np.sqrt(n)
    assert unpaired_sd > 1.4 * paired_sd
    assert float(diff.replicates.std()) == pytest.approx(paired_sd, rel=0.08)
    same = st.paired_difference("accuracy", y, pred_a, pred_a, n_resamples=50)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_difference_bca_uses_the_jackknife_of_the_difference():
    """BCa of a paired difference of accuracies is BCa of the mean of ca - cb (scipy)."""
    rng = np.random.default_rng(9)
    n = 400
    y = rng.integers(0, 2, n)
    pa = np.clip(0.5 + 0.3 * (2 * y - 1) + 0.3 * rng.standard_normal(n), 0.01, 0.99)
    pb = rng.random(n)
    pred_a, pred_b = np.stack([1 - pa, pa], 1), np.stack([1 - pb, pb], 1)
    got = st.paired_difference("accuracy", y, pred_a, pred_b, 20_000, 0.95, 1, method="bca")
    delta = (pred_a.argmax(1) == y).astype(float) - (pred_b.argmax(1) == y).astype(float)
    ref = sps.bootstrap((delta,), np.mean, n_resamples=20_000, method="BCa", random_state=1)
    reps = got.replicates.numpy()
    tol_low = max(monte_carlo_tolerance(reps, got.low, 20_000), 1 / n)  # 1/n: the grid
    tol_high = max(monte_carlo_tolerance(reps, got.high, 20_000), 1 / n)
    assert got.low == pytest.approx(ref.confidence_interval.low, abs=tol_low)
    assert got.high == pytest.approx(ref.confidence_interval.high, abs=tol_high)
    assert got.estimate == pytest.approx(delta.mean())
    assert got.metric == "accuracy difference"


# ------------------------------------------------------------------------ permutation


def test_permutation_pvalues_are_uniform_under_the_null():
    """400 data sets whose labels are independent of the (continuous) scores: the p-values
    are uniform on {1/1000, ..., 1}; KS against U(0, 1) and the rejection rate at 0.05."""
    sets, n = 400, 200
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (sets, n), generator=g)
    p1 = torch.rand(sets, n, generator=g, dtype=torch.float64)
    pvalues = np.array(
        [
            st.permutation_pvalue("auroc", y[i], torch.stack([1 - p1[i], p1[i]], 1), 999, seed=i)
            for i in range(sets)
        ]
    )
    assert pvalues.min() >= 1 / 1000
    assert sps.kstest(pvalues, "uniform").pvalue > 0.01
    rate = float((pvalues <= 0.05).mean())
    assert abs(rate - 0.05) <= 3 * math.sqrt(0.05 * 0.95 / sets), rate


def test_permutation_pvalue_of_a_discrete_metric_is_valid_and_small_for_a_real_effect():
    # accuracy is discrete: ties with the observed value make the test conservative,
    # P(p <= 0.05) <= 0.05, never liberal
    sets, n = 300, 60
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (sets, n), generator=g)
    p1 = torch.rand(sets, n, generator=g, dtype=torch.float64)
    pv = [
        st.permutation_pvalue("accuracy", y[i], torch.stack([1 - p1[i], p1[i]], 1), 199, seed=i)
        for i in range(sets)
    ]
    assert np.mean(np.array(pv) <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sets)
    # a real effect: p at its floor 1 / (1 + P)
    yy = torch.randint(0, 2, (300,), generator=g)
    good = torch.where(yy == 1, 0.8, 0.2).to(torch.float64)
    for metric in ("accuracy", "f1", "auroc"):
        p = st.permutation_pvalue(metric, yy, torch.stack([1 - good, good], 1), 199)
        assert p == pytest.approx(1 / 200)
    x = torch.randn(300, generator=g, dtype=torch.float64)
    assert st.permutation_pvalue("r2", x, x + 0.1, 199) == pytest.approx(1 / 200)


def test_permutation_pvalue_matches_a_plain_loop_over_the_same_permutations():
    """The vectorised count equals counting sklearn metrics of the same permuted labels
    (the permutations are successive torch.randperm draws of Generator().manual_seed(seed))."""
    y, pred = tied_classification(80, 3, seed=6)
    for metric in ("accuracy", "f1", "auroc"):
        p = st.permutation_pvalue(metric, y, pred, n_permutations=60, seed=5)
        g = torch.Generator().manual_seed(5)
        perm = [torch.randperm(80, generator=g).numpy() for _ in range(60)]
        observed = sklearn_metric(metric, y, pred)
        null = np.array([sklearn_metric(metric, y[q], pred) for q in perm])
        assert p == pytest.approx((1 + np.sum(null >= observed - 1e-12)) / 61)


# ------------------------------------------------------------------------ Holm


@pytest.mark.parametrize("m", [1, 2, 7, 50])
def test_holm_matches_statsmodels(m):
    rng = np.random.default_rng(m)
    p = rng.random(m) ** 3
    if m > 2:
        p[1] = p[2]  # a tie
        p[0] = 0.0
    got = st.holm(torch.as_tensor(p))
    want = multipletests(p, method="holm")[1]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(st.holm(p.tolist()).numpy(), want, rtol=1e-12, atol=1e-15)
    assert st.holm([]).numel() == 0


def test_holm_controls_the_family_wise_error_rate():
    """2000 families of 6 true nulls (z ~ N(0, 1)) and 4 strong effects (z ~ N(5, 1)),
    one-sided p-values: rejecting at Holm-adjusted 0.05 falsely rejects a null in at most
    5% of families (+ 3 binomial SDs); testing each at 0.05 does far more often."""
    families, alpha = 2000, 0.05
    rng = np.random.default_rng(0)
    z = rng.standard_normal((families, 10))
    z[:, 6:] += 5.0
    p = sps.norm.sf(z)
    adjusted = np.stack([st.holm(row).numpy() for row in p])
    fwer = np.mean((adjusted[:, :6] <= alpha).any(1))
    uncorrected = np.mean((p[:, :6] <= alpha).any(1))
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / families)
    assert fwer <= bound, fwer
    assert uncorrected > bound and uncorrected == pytest.approx(1 - 0.95**6, abs=0.03)
    assert np.mean(adjusted[:, 6:] <= alpha) > 0.95  # and it keeps the power on the effects


# ------------------------------------------------------------------------ mean_sd


def test_mean_sd_over_seeds():
    values = [0.81, 0.84, 0.79, 0.86]
    mean, sd = st.mean_sd(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert sd == pytest.approx(statistics.stdev(values))
    mean, sd = st.mean_sd(torch.tensor([0.8]))
    assert mean == pytest.approx(0.8) and math.isnan(sd)


# ------------------------------------------------------------------------ bad input


def test_check_metric_names_the_valid_choices():
    assert st.check_metric("auroc", "classification") == "auroc"
    assert st.check_metric("r2", "regression") == "r2"
    with pytest.raises(ProbeError, match="accuracy, f1, auroc") as err:
        st.check_metric("acuracy", "classification")
    assert "Did you mean 'accuracy'" in str(err.value)
    with pytest.raises(ProbeError, match="is for regression probes; a classification probe"):
        st.check_metric("r2", "classification")
    with pytest.raises(ProbeError, match="classification, regression"):
        st.check_metric("r2", "regresion")


def test_bad_inputs_raise_probe_errors():
    y, pred = tied_classification(50, 2, seed=0)
    with pytest.raises(ProbeError, match="unknown metric 'auc'.*accuracy, f1, auroc, r2"):
        st.bootstrap("auc", y, pred)
    with pytest.raises(ProbeError, match="y has 49 rows but pred has shape \\(50, 2\\)"):
        st.metric_values("accuracy", y[:49], pred)
    with pytest.raises(ProbeError, match="pred_b has shape"):
        st.paired_difference("accuracy", y, pred, pred[:-1])
    for bad in (0, -3, 2.5):
        with pytest.raises(ProbeError, match="n_resamples must be a whole number >= 1"):
            st.bootstrap("accuracy", y, pred, n_resamples=bad)
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ProbeError, match="confidence must lie strictly between 0 and 1"):
            st.bootstrap("accuracy", y, pred, confidence=bad)
    with pytest.raises(ProbeError, match="unknown interval method 'bac'.*percentile, bca"):
        st.bootstrap("accuracy", y, pred, method="bac")
    with pytest.raises(ProbeError, match="integer class codes"):
        st.metric_values("accuracy", y.astype(float), pred)
    with pytest.raises(ProbeError, match="class codes 0..2 but pred has 2 columns"):
        st.metric_values("accuracy", np.r_[y[:-1], 2], pred)
    with pytest.raises(ProbeError, match="shape \\[n, K\\]"):
        st.metric_values("auroc", y, pred[:, 1])
    with pytest.raises(ProbeError, match="needs one prediction per row"):
        st.metric_values("r2", y.astype(float), pred)
    with pytest.raises(ProbeError, match="non-finite"):
        st.metric_values("accuracy", y, np.where(np.arange(50)[:, None] == 3, np.nan, pred))
    with pytest.raises(ProbeError, match="valid rows are 0..49"):
        st.metric_values("accuracy", y, pred, np.array([[0, 50]]))
    with pytest.raises(ProbeError, match="n_permutations must be a whole number"):
        st.permutation_pvalue("accuracy", y, pred, n_permutations=0)
    with pytest.raises(ProbeError, match="p-values must lie in \\[0, 1\\]"):
        st.holm([0.1, 1.2])
    with pytest.raises(ProbeError, match="non-finite"):
        st.holm([0.1, float("nan")])
    with pytest.raises(ProbeError, match="non-empty"):
        st.mean_sd([])
    with pytest.raises(ProbeError, match="seed must be an integer"):
        st.bootstrap("accuracy", y, pred, seed=1.5)
    with pytest.raises(ProbeError, match="torch.Generator"):
        st.resample_indices(10, 5, 0)
