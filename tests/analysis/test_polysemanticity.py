"""Neuron alignment of probe directions, the random baseline and polysemantic candidates."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from scipy import stats

from hookscope import analysis as an
from hookscope.errors import AnalysisError

matplotlib.use("Agg")

D = 256


def test_one_hot_direction_is_monosemantic():
    w = np.zeros(D)
    w[17] = -3.0
    res = an.neuron_alignment(w)
    row = res.to_pandas().iloc[0]
    assert bool(row["aligned"]) and row["top_neuron"] == 17
    assert row["max_cos"] == pytest.approx(1.0) and row["participation_ratio"] == pytest.approx(1.0)
    assert row["kurtosis"] == pytest.approx(stats.kurtosis(w), rel=1e-10)  # Fisher, biased
    assert row["max_cos_z"] > 10


def test_random_direction_matches_the_baseline():
    base = an.random_direction_baseline(D, n_samples=3000, seed=0)
    rng = np.random.default_rng(123)  # a different generator from the baseline's
    w = rng.standard_normal((20, D))
    res = an.neuron_alignment(w, baseline=base)
    assert not bool(res.aligned.any())
    df = res.to_pandas()
    for m in ("max_cos", "participation_ratio", "kurtosis"):
        assert df[m].between(base.quantile(m, 0.001), base.quantile(m, 0.999)).all(), m
        assert df[f"{m}_z"].abs().max() < 4, m
        # twenty random directions average close to the baseline mean (3 standard errors)
        assert abs(df[m].mean() - base.mean(m)) < 3 * base.std(m) / np.sqrt(20), m


def test_baseline_against_closed_forms_and_an_independent_simulation():
    base = an.random_direction_baseline(D, n_samples=4000, seed=1)
    # E[kurtosis] of Gaussian entries, population (biased) estimator: -6 / (d + 1)
    assert base.mean("kurtosis") == pytest.approx(-6 / (D + 1), abs=0.03)
    # participation ratio of a random direction ~ (d + 2) / 3
    assert base.mean("participation_ratio") == pytest.approx((D + 2) / 3, rel=0.02)
    # max |cos|: numpy simulation written independently
    g = np.random.default_rng(7).standard_normal((4000, D))
    max_cos = np.abs(g).max(1) / np.linalg.norm(g, axis=1)
    se = max_cos.std() / np.sqrt(4000) * np.sqrt(2)
    assert base.mean("max_cos") == pytest.approx(max_cos.mean(), abs=4 * se)
    assert base.percentile_of("max_cos", float(np.median(max_cos))) == pytest.approx(0.5, abs=0.05)
    assert list(base.to_pandas()["metric"]) == ["max_cos", "participation_ratio", "kurtosis"]
    assert isinstance(base.plot(), Figure) and "dim=256" in repr(base)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def planted_probes() -> np.ndarray:
    rng = np.random.default_rng(3)
    w = 0.02 * rng.standard_normal((5, D))
    w[0, [3, 10, 11]] += [1.0, 1.0, 1.0]  # feature A: neurons 3, 10, 11
    w[1, [3, 20, 21]] += [1.0, -1.0, -1.0]  # feature B, unrelated to A, shares neuron 3
    w[2, [5, 40]] += [1.0, 0.3]  # features C and D both use neuron 5 and are related
    w[3, [5, 40]] += [1.0, 0.5]
    return w  # probe 4: dense noise


def test_loading_zscores_and_index():
    w = planted_probes()
    z = an.loading_zscores(w)
    expected = np.sqrt(D) * w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-12)
    idx = an.multi_feature_loading_index(w)
    assert idx.dtype == torch.int64 and idx.shape == (D,)
    assert idx[3] == 2 and idx[5] == 2 and idx[10] == 1 and idx[0] == 0


def test_candidates_need_two_unrelated_features():
    w = planted_probes()
    assert an.polysemantic_candidates(w) == [3]  # neuron 5's two features are related (cos ~ 1)
    rep = an.polysemanticity_report(w, names=["A", "B", "C", "D", "noise"])
    assert rep.candidates == {3: [0, 1]}
    df = rep.to_pandas()
    assert df.to_dict("records")[0]["features"] == "A, B"
    assert df["max_abs_z"].iloc[0] == pytest.approx(np.sqrt(D) * 1 / np.sqrt(3), rel=0.01)
    # C and D put (1 / 1.044)^2 ~ 92 % and 80 % of their weight on neuron 5: aligned
    assert rep.alignment.aligned.tolist() == [False, False, True, True, False]
    assert "1 candidate polysemantic neurons" in repr(rep)
    assert isinstance(rep.plot(), Figure) and isinstance(rep.alignment.plot(), Figure)


def test_dense_random_probes_have_no_candidates():
    w = np.random.default_rng(4).standard_normal((8, D))
    assert an.polysemantic_candidates(w) == []


def test_bad_inputs():
    w = planted_probes()
    with pytest.raises(AnalysisError, match=r"rows \[1\] are all zero"):
        an.neuron_alignment(np.vstack([w[0], np.zeros(D)]))
    with pytest.raises(AnalysisError, match="at least 2 neurons"):
        an.neuron_alignment(np.ones((3, 1)))
    with pytest.raises(AnalysisError, match="names has 2 entries but W has 5 probes"):
        an.polysemanticity_report(w, names=["a", "b"])
    with pytest.raises(AnalysisError, match="baseline is for dimension 10 but W has 256"):
        an.neuron_alignment(w, baseline=an.random_direction_baseline(10))
    with pytest.raises(AnalysisError, match="unrelated_below must lie in"):
        an.polysemantic_candidates(w, unrelated_below=2.0)
    bad = w.copy()
    bad[0, 0] = np.inf
    with pytest.raises(AnalysisError, match="Inf"):
        an.loading_zscores(bad)
