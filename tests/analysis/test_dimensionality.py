"""Dimensionality metrics on matrices with known spectra and against Marchenko-Pastur."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from hookscope import analysis as an
from hookscope.errors import AnalysisError

matplotlib.use("Agg")

FIVE = ("stable_rank", "participation_ratio", "effective_rank", "energy_rank", "nuclear_norm_ratio")


def metrics(a, center=True, energy=0.9) -> dict[str, float]:
    return {
        "stable_rank": an.stable_rank(a, center=center),
        "participation_ratio": an.participation_ratio(a, center=center),
        "effective_rank": an.effective_rank(a, center=center),
        "energy_rank": an.energy_rank(a, energy, center=center),
        "nuclear_norm_ratio": an.nuclear_norm_ratio(a, center=center),
    }


def closed_form(s: np.ndarray, energy: float = 0.9) -> dict[str, float]:
    """The five metrics written out from singular values ``s``, straight from the definitions."""
    s = np.sort(s)[::-1]
    lam = s**2
    p = s / s.sum()
    p = p[p > 0]
    k = 0
    while lam[:k].sum() < energy * lam.sum() * (1 - 1e-12):
        k += 1
    return {
        "stable_rank": lam.sum() / lam[0],
        "participation_ratio": lam.sum() ** 2 / (lam**2).sum(),
        "effective_rank": math.exp(-(p * np.log(p)).sum()),
        "energy_rank": k,
        "nuclear_norm_ratio": s.sum() / s[0],
    }


def orthonormal_centred(n: int, k: int, seed: int) -> np.ndarray:
    """n x k orthonormal columns, each orthogonal to the all-ones vector (so centring keeps them)."""
    g = np.random.default_rng(seed).standard_normal((n, k))
    q, _ = np.linalg.qr(g - g.mean(0))
    return q


# --------------------------------------------------------------------------- known spectra


def test_identity_uncentred_and_centred():
    n = 10
    eye = np.eye(n)
    for name, value in metrics(eye, center=False).items():
        assert value == pytest.approx(9 if name == "energy_rank" else n, rel=1e-12), name
    # centring I leaves n - 1 equal singular values and one zero
    for name, value in metrics(eye, center=True).items():
        expected = math.ceil(0.9 * (n - 1)) if name == "energy_rank" else n - 1
        assert value == pytest.approx(expected, rel=1e-12), name


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("center", [True, False])
def test_rank_k_equal_singular_values(k, center):
    u = orthonormal_centred(50, k, seed=k)
    v = orthonormal_centred(30, k, seed=k + 100)
    a = 4.2 * u @ v.T
    for name, value in metrics(a, center).items():
        expected = math.ceil(0.9 * k) if name == "energy_rank" else k
        assert value == pytest.approx(expected, rel=1e-9), name


@pytest.mark.parametrize("s", [[5.0, 4.0, 3.0, 2.0, 1.0], [10.0, 1.0, 1.0, 0.1], [1.0, 1e-3, 1e-6]])
def test_diagonal_and_rotated_known_spectrum(s):
    s = np.array(s)
    diag = np.diag(s)
    expected = closed_form(s)
    for name, value in metrics(diag, center=False).items():
        assert value == pytest.approx(expected[name], rel=1e-9), name
    # the same singular values hidden behind random rotations, tall and wide
    rng = np.random.default_rng(0)
    for shape in [(40, len(s)), (len(s), 40)]:
        q1, _ = np.linalg.qr(rng.standard_normal((shape[0], len(s))))
        q2, _ = np.linalg.qr(rng.standard_normal((shape[1], len(s))))
        a = q1 @ np.diag(s) @ q2.T
        for name, value in metrics(a, center=False).items():
            assert value == pytest.approx(expected[name], rel=1e-7), (name, shape)


def test_spectrum_matches_sklearn_pca_variances():
    from sklearn.decomposition import PCA

    a = np.random.default_rng(1).standard_normal((60, 25)) @ np.diag(np.linspace(3, 0.1, 25))
    ev = an.spectrum(a).numpy()
    ref = PCA().fit(a).explained_variance_ * (60 - 1)
    np.testing.assert_allclose(ev, ref, rtol=1e-9)
    wide = a.T  # 25 samples x 60 features: the Gram matrix on the sample side
    np.testing.assert_allclose(
        an.spectrum(wide).numpy(), PCA().fit(wide).explained_variance_ * 24, rtol=1e-8, atol=1e-9
    )


def test_compatibility_singular_value_participation_ratio():
    a = np.random.default_rng(2).standard_normal((30, 12)) + 1.5
    s = np.linalg.svd(a, compute_uv=False)
    legacy = an.participation_ratio(a, center=False, form="singular_values")
    assert legacy == pytest.approx(s.sum() ** 2 / (s**2).sum(), rel=1e-10)
    standard = an.participation_ratio(a, center=False)
    assert standard == pytest.approx((s**2).sum() ** 2 / (s**4).sum(), rel=1e-10)
    assert abs(legacy - standard) > 0.5  # two different quantities


# ------------------------------------------------------------------ Marchenko-Pastur predictions


def marchenko_pastur(gamma: float, energy: float = 0.9) -> dict[str, float]:
    """Per-dimension predictions from the MP density of (1/n) X'X, p/n = gamma < 1."""
    a, b = (1 - gamma**0.5) ** 2, (1 + gamma**0.5) ** 2
    theta = np.linspace(0, np.pi, 400_001)  # lambda = mid + half cos(theta): no edge singularity
    mid, half = (a + b) / 2, (b - a) / 2
    lam = mid + half * np.cos(theta)
    # f(lam) dlam = sqrt((b-lam)(lam-a)) / (2 pi gamma lam) dlam, with dlam = half sin(theta)
    w = (half * np.sin(theta)) ** 2 / (2 * np.pi * gamma * lam)
    dtheta = theta[1] - theta[0]

    def integral(values):
        return float(np.sum(values * w) * dtheta)

    s = np.sqrt(lam)
    mean_s = integral(s)
    # energy rank: the top fraction of eigenvalues (lam descending = theta ascending)
    cum_energy = np.cumsum(lam * w) * dtheta
    cut = np.searchsorted(cum_energy, energy * integral(lam))
    return {
        "mass": integral(np.ones_like(lam)),
        "participation_ratio": integral(lam) ** 2 / integral(lam**2),
        "stable_rank": integral(lam) / b,
        "effective_rank": mean_s * math.exp(-integral(s * np.log(s)) / mean_s),
        "energy_rank": float(np.cumsum(w)[cut] * dtheta),
        "nuclear_norm_ratio": mean_s / math.sqrt(b),
    }


def test_isotropic_gaussian_against_marchenko_pastur():
    n, p = 4000, 400
    mp = marchenko_pastur(p / n)
    assert mp["mass"] == pytest.approx(1.0, abs=1e-6)  # the density integrates to one
    a = torch.randn(n, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rep = an.dimensionality_report(a)
    assert rep.participation_ratio == pytest.approx(p * mp["participation_ratio"], rel=0.01)
    assert rep.effective_rank == pytest.approx(p * mp["effective_rank"], rel=0.01)
    assert rep.nuclear_norm_ratio == pytest.approx(p * mp["nuclear_norm_ratio"], rel=0.02)
    assert rep.stable_rank == pytest.approx(p * mp["stable_rank"], rel=0.02)
    assert rep.energy_rank == pytest.approx(p * mp["energy_rank"], abs=4)
    # closed form of the MP participation ratio: p / (1 + gamma)
    assert p * mp["participation_ratio"] == pytest.approx(p / (1 + p / n), rel=1e-6)


def test_centring_pitfall_large_mean_offset():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((2000, 100))
    shifted = g + 100.0 * rng.standard_normal(100)  # a large per-feature mean
    raw = metrics(shifted, center=False)
    assert raw["participation_ratio"] < 1.01 and raw["stable_rank"] < 1.01
    assert raw["energy_rank"] == 1
    centred = metrics(shifted, center=True)
    reference = metrics(g - g.mean(0), center=False)
    for name in FIVE:
        assert centred[name] == pytest.approx(reference[name], rel=1e-8), name
    assert centred["participation_ratio"] == pytest.approx(100 / (1 + 100 / 2000), rel=0.03)


# ------------------------------------------------------------------ fast paths and the report


def test_report_agrees_with_each_function_and_with_svd():
    a = np.random.default_rng(4).standard_normal((256, 512)) @ np.diag(np.geomspace(1, 0.01, 512))
    rep = an.dimensionality_report(a)
    each = metrics(a)
    s = np.linalg.svd(a - a.mean(0), compute_uv=False)
    ref = closed_form(s)
    for name in FIVE:
        assert getattr(rep, name) == pytest.approx(each[name], rel=1e-9), name
        assert getattr(rep, name) == pytest.approx(ref[name], rel=1e-6), name
    df = rep.to_pandas()
    assert df["metric"].tolist() == list(FIVE) and df["center"].all()
    assert "centred" in repr(rep) and "participation_ratio" in repr(rep)
    assert isinstance(rep.plot(), Figure)


def test_top_singular_value_cold_and_warm():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((100, 40)) @ np.diag(np.linspace(3, 1, 40))
    s_ref = np.linalg.svd(a - a.mean(0), compute_uv=False)[0]
    s1, v = an.top_singular_value(a)
    assert s1 == pytest.approx(s_ref, rel=1e-6)
    b = a + 0.01 * rng.standard_normal(a.shape)  # the next training step
    s2, _ = an.top_singular_value(b, v0=v)
    assert s2 == pytest.approx(np.linalg.svd(b - b.mean(0), compute_uv=False)[0], rel=1e-6)
    wide = a.T  # the sample side is smaller
    sw, vw = an.top_singular_value(wide, center=False)
    assert sw == pytest.approx(np.linalg.svd(wide, compute_uv=False)[0], rel=1e-6)
    assert vw.shape == (100,)
    # a warm start orthogonal to the row space cannot move: a random start takes over
    q, _ = np.linalg.qr(np.c_[wide.T, rng.standard_normal(100)])
    s_orth, _ = an.top_singular_value(wide, center=False, v0=q[:, -1])
    assert s_orth == pytest.approx(sw, rel=1e-6)
    with pytest.raises(AnalysisError, match="v0 has 3 entries but A has 40 features"):
        an.top_singular_value(a, v0=np.ones(3))


def test_tracker_trace_path_and_jumps():
    rng = np.random.default_rng(6)
    trace_only = an.DimensionalityTracker(metrics=("participation_ratio", "stable_rank"))
    full = an.DimensionalityTracker()
    mix = rng.standard_normal((64, 64))
    for step in range(0, 600, 10):
        rank = 4 if step < 300 else 16  # the representation expands at step 300
        a = rng.standard_normal((200, rank)) @ mix[:rank] + 0.05 * rng.standard_normal((200, 64))
        got = trace_only.update(step, a)
        full.update(step, a)
        assert got["stable_rank"] == pytest.approx(an.stable_rank(a), rel=1e-6)
        assert got["participation_ratio"] == pytest.approx(an.participation_ratio(a), rel=1e-10)
    df = trace_only.to_pandas()
    assert list(df.columns) == ["step", "participation_ratio", "stable_rank"] and len(df) == 60
    assert full.to_pandas()["energy_rank"].iloc[-1] > full.to_pandas()["energy_rank"].iloc[0]
    jumps = trace_only.jumps("participation_ratio")
    assert [(j.step, j.direction) for j in jumps] == [(300.0, "up")]
    assert isinstance(full.plot(), Figure) and "60 steps" in repr(full)
    with pytest.raises(AnalysisError, match="steps must increase"):
        trace_only.update(100, a)


def test_bad_inputs():
    a = np.random.default_rng(7).standard_normal((20, 5))
    with pytest.raises(AnalysisError, match="energy must lie in"):
        an.energy_rank(a, 1.5)
    with pytest.raises(AnalysisError, match="form must be one of 'covariance', 'singular_values'"):
        an.participation_ratio(a, form="sv")
    with pytest.raises(AnalysisError, match="no variance"):
        an.stable_rank(np.ones((20, 5)))
    with pytest.raises(AnalysisError, match="all zero"):
        an.stable_rank(np.zeros((20, 5)), center=False)
    with pytest.raises(AnalysisError, match="need at least 2 samples"):
        an.effective_rank(a[:1])
    nan = a.copy()
    nan[3, 2] = np.nan
    with pytest.raises(AnalysisError, match="NaN"):
        an.nuclear_norm_ratio(nan)
    with pytest.raises(AnalysisError, match="center must be True or False"):
        an.stable_rank(a, center="yes")
    with pytest.raises(AnalysisError, match="metric must be one of"):
        an.DimensionalityTracker(metrics=("rank",))
