"""Training-dynamics analyses on constructed series and data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.stats
import torch
from matplotlib.figure import Figure
from torch import nn

from hookscope.errors import AnalysisError
from hookscope.tracking import analysis as ta

METRIC = "participation_ratio"


def results_frame(curves: dict, steps, metric=METRIC, run=None, loss=None) -> pd.DataFrame:
    """Long results frame: one series per site (dict order = depth order)."""
    parts = []
    for site, values in curves.items():
        part = pd.DataFrame(
            {"step": np.asarray(steps, dtype=int), "site": site, "metric": metric,
             "value": np.asarray(values, dtype=float),
             "loss": np.nan if loss is None else np.asarray(loss, dtype=float),
             "grad_norm": np.nan}
        )  # fmt: skip
        if run is not None:
            part["run"] = run
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------ convergence

STEPS_C = np.arange(0, 4001, 10)


def exp_curves(taus):
    # v = 1 + 2 exp(-t / tau): |v - final| <= eps * range first at t* = tau * ln(2 / (eps*range))
    return {f"resid_post.{i}": 1 + 2 * np.exp(-STEPS_C / tau) for i, tau in enumerate(taus)}


def expected_step(tau, eps=0.05):
    span = 2 * (1 - math.exp(-4000 / tau))
    t_star = tau * math.log(2 / (eps * span))
    return 10 * math.ceil(t_star / 10)  # first logged step at or after t*


def test_convergence_matches_the_closed_form_and_finds_bottom_up():
    taus = (50, 100, 200)
    res = ta.convergence(results_frame(exp_curves(taus), STEPS_C), METRIC, eps=0.05)
    assert res.to_pandas()["convergence_step"].tolist() == [expected_step(t) for t in taus]
    assert [expected_step(t) for t in taus] == [150, 300, 600]
    assert res.pattern == "bottom-up" and res.patterns["rho"].iloc[0] == pytest.approx(1.0)
    assert res.table["final_value"].to_numpy() == pytest.approx(1.0, abs=1e-7)
    absolute = ta.convergence(results_frame(exp_curves(taus), STEPS_C), METRIC, 0.1, relative=False)
    assert absolute.table["convergence_step"].tolist() == [150, 300, 600]


@pytest.mark.parametrize(
    "taus, pattern",
    [
        ((200, 100, 50), "top-down"),
        ((100, 101, 103), "simultaneous"),
        ((200, 50, 200, 50), "mixed"),
    ],
)
def test_convergence_patterns(taus, pattern):
    res = ta.convergence(results_frame(exp_curves(taus), STEPS_C), METRIC)
    assert res.pattern == pattern


def test_convergence_per_run_and_not_converged():
    a = results_frame(exp_curves((50, 100, 200)), STEPS_C, run="seed0")
    b = results_frame(exp_curves((200, 100, 50)), STEPS_C, run="seed1")
    res = ta.convergence(pd.concat([a, b]), METRIC)
    assert res.pattern is None
    assert res.patterns.set_index("run")["pattern"].to_dict() == {
        "seed0": "bottom-up", "seed1": "top-down"
    }  # fmt: skip
    # alternating to the end: the last value is never within 5 % of the range of the final mean
    flip = results_frame({"neuron.0": [0, 1] * 10, "neuron.1": np.arange(20.0)}, np.arange(20))
    res = ta.convergence(flip, METRIC)
    assert math.isnan(res.table["convergence_step"].iloc[0]) and res.pattern == "undetermined"


# ---------------------------------------------------------------------------------- jumps

STEPS_J = np.arange(0, 2001, 10)


def jump_fixture():
    ramp = np.clip((STEPS_J - 500) / 100, 0, 1) * 3.0  # 0 -> 3 linearly over steps 500..600
    two = 2.0 * (STEPS_J >= 1200) - 1.0 * (STEPS_J >= 1800)  # +2 at 1200, -1 at 1800
    early = 1.0 * (STEPS_J >= 100)
    results = results_frame({"neuron.0": ramp, "neuron.1": two, "neuron.2": early}, STEPS_J)
    jumps = pd.DataFrame(
        {"step": [550, 1200, 1800, 100], "site": ["neuron.0", "neuron.1", "neuron.1", "neuron.2"],
         "metric": METRIC, "magnitude": [3.0, 2.0, 1.0, 1.0], "z": 50.0,
         "direction": ["up", "up", "down", "up"]}
    )  # fmt: skip
    return jumps, results


def test_characterize_jumps_speed_phase_and_relative_size():
    jumps, results = jump_fixture()
    t = ta.characterize_jumps(jumps, results, n_steps=2000).to_pandas().set_index("step")
    # a linear ramp of 3 over 100 steps: speed = slope 0.03, whole change over 100 steps
    assert t.loc[550, "speed"] == pytest.approx(0.03) and t.loc[550, "rise_steps"] == pytest.approx(
        100
    )
    # a step between two points logged 10 steps apart: magnitude / 10
    assert t.loc[1200, "speed"] == pytest.approx(0.2) and t.loc[1800, "speed"] == pytest.approx(0.1)
    assert t.loc[1200, "relative_magnitude"] == pytest.approx(1.0)
    assert t.loc[1800, "relative_magnitude"] == pytest.approx(0.5)
    assert t["phase"].to_dict() == {100: "early", 550: "mid", 1200: "late", 1800: "late"}
    assert t.loc[550, "phase_fraction"] == pytest.approx(0.275)


def test_characterize_jumps_errors():
    jumps, results = jump_fixture()
    with pytest.raises(AnalysisError, match="no such series"):
        ta.characterize_jumps(jumps.assign(site="neuron.9"), results, 2000)
    with pytest.raises(AnalysisError, match=r"jump steps must lie in \[0, n_steps=1000\]"):
        ta.characterize_jumps(jumps, results, 1000)
    with pytest.raises(AnalysisError, match="lacks column.*magnitude"):
        ta.characterize_jumps(jumps.drop(columns="magnitude"), results, 2000)


def planted_groups(seed=0):
    rng = np.random.default_rng(seed)
    n = 12
    small = {"magnitude": 0.1 * np.exp(0.1 * rng.standard_normal(n)),
             "relative_magnitude": 0.05 + 0.01 * rng.standard_normal(n),
             "speed": 1e-3 * np.exp(0.1 * rng.standard_normal(n)),
             "phase_fraction": 0.05 + 0.01 * rng.random(n)}  # fmt: skip
    big = {"magnitude": 5.0 * np.exp(0.1 * rng.standard_normal(n)),
           "relative_magnitude": 0.8 + 0.01 * rng.standard_normal(n),
           "speed": 1.0 * np.exp(0.1 * rng.standard_normal(n)),
           "phase_fraction": 0.8 + 0.05 * rng.random(n)}  # fmt: skip
    df = pd.concat([pd.DataFrame(small), pd.DataFrame(big)], ignore_index=True)
    return df.assign(group=[0] * n + [1] * n)


def test_cluster_jumps_finds_two_planted_groups():
    df = planted_groups()
    res = ta.cluster_jumps(df, seed=0)
    assert res.k == 2 and res.n_dropped == 0
    assert list(res.scores["k"]) == [2, 3, 4, 5, 6]
    same = pd.crosstab(res.table["group"], res.table["cluster"]).to_numpy()
    assert (same > 0).sum() == 2  # each planted group is exactly one cluster
    assert ta.cluster_jumps(df, k=1).table["cluster"].eq(0).all()
    with pytest.raises(AnalysisError, match="at least 3 distinct jumps"):
        ta.cluster_jumps(df.iloc[:2])
    dropped = ta.cluster_jumps(df.assign(speed=np.r_[np.nan, df["speed"].to_numpy()[1:]]))
    assert dropped.n_dropped == 1 and len(dropped.table) == len(df) - 1


# ------------------------------------------------------------------------- critical periods

STEPS_K = np.arange(0, 1000, 10)


def ramp_in(start, stop):
    """Slope 0.001 everywhere plus 0.05 per step on (start, stop]."""
    return 0.001 * STEPS_K + 0.05 * np.clip(STEPS_K - start, 0, stop - start)


def test_critical_periods_finds_the_planted_fast_window_and_its_coordination():
    curves = {"resid_post.0": ramp_in(400, 500), "resid_post.1": ramp_in(400, 500),
              "resid_post.2": ramp_in(700, 800)}  # fmt: skip
    # total |velocity| per interval, as an independent numpy sum; loss improves by it plus noise
    tot = sum(np.abs(np.diff(v) / 10) for v in curves.values())
    gain = tot + 0.002 * np.random.default_rng(0).random(len(tot))
    loss = np.r_[10.0, 10.0 - np.cumsum(10 * gain)]  # -(diff loss) / 10 = gain
    res = ta.critical_periods(results_frame(curves, STEPS_K, loss=loss), METRIC, percentile=90)
    w = res.to_pandas()
    assert w[["site", "start", "end", "n_intervals"]].values.tolist() == [
        ["resid_post.0", 400, 500, 10], ["resid_post.1", 400, 500, 10],
        ["resid_post.2", 700, 800, 10],
    ]  # fmt: skip
    assert w["peak_velocity"].to_numpy() == pytest.approx(0.051)
    v = res.velocity.set_index(["site", "step"])
    assert v.loc[("resid_post.0", 410), "acceleration"] == pytest.approx(0.005)
    assert v.loc[("resid_post.0", 450), "velocity"] == pytest.approx(0.051)
    cw = res.coordinated_windows
    assert cw[["start", "end"]].values.tolist() == [[400, 500]]
    assert cw["peak_fraction"].iloc[0] == pytest.approx(2 / 3)
    rho = scipy.stats.spearmanr(tot, gain).statistic
    assert res.loss_correlation["rho"].iloc[0] == pytest.approx(rho) and rho > 0.5
    assert res.loss_correlation["n"].iloc[0] == 99
    no_loss = ta.critical_periods(results_frame(curves, STEPS_K), METRIC)
    assert math.isnan(no_loss.loss_correlation["rho"].iloc[0])


# ------------------------------------------------------------------------ phase distribution


def jumps_at(steps, sites=None, run=None):
    df = pd.DataFrame({"step": steps, "site": sites if sites is not None else "neuron.0",
                       "metric": METRIC, "magnitude": 1.0, "z": 9.0,
                       "direction": "up"})  # fmt: skip
    return df if run is None else df.assign(run=run)


def test_phase_shares_and_bootstrap_ci_cover_the_truth():
    rng = np.random.default_rng(0)
    steps = np.r_[
        rng.integers(0, 100, 80), rng.integers(100, 500, 120), rng.integers(500, 1000, 200)
    ]
    sites = ["neuron.0"] * 100 + ["neuron.1"] * 300
    res = ta.phase_distribution(jumps_at(steps, sites), n_steps=1000, seed=0)
    t = res.to_pandas().set_index("phase")
    truth = {"early": 0.2, "mid": 0.3, "late": 0.5}
    for phase, p in truth.items():
        assert t.loc[phase, "share"] == pytest.approx(p)
        assert t.loc[phase, "ci_low"] < p < t.loc[phase, "ci_high"]
        normal = 2 * 1.96 * math.sqrt(p * (1 - p) / 400)  # binomial normal approximation
        assert t.loc[phase, "ci_high"] - t.loc[phase, "ci_low"] == pytest.approx(normal, rel=0.2)
    assert res.resampling.startswith("jumps")
    assert res.first_layer_share == pytest.approx(0.25)
    named = ta.phase_distribution(
        jumps_at(steps, sites), 1000, sites=["neuron.9", "neuron.0", "neuron.1"]
    )
    assert named.first_layer_share == 0.0 and named.by_site["n_jumps"].tolist() == [0, 100, 300]


def test_phase_cluster_bootstrap_resamples_runs():
    # ten runs of 40 jumps: five runs jump only early, five only late
    frames = [jumps_at(np.full(40, 50 if r < 5 else 900), run=f"seed{r}") for r in range(10)]
    jumps = pd.concat(frames, ignore_index=True)
    clustered = ta.phase_distribution(jumps, n_steps=1000).table.set_index("phase")
    naive = ta.phase_distribution(jumps.drop(columns="run"), n_steps=1000).table.set_index("phase")
    width_c = clustered.loc["early", "ci_high"] - clustered.loc["early", "ci_low"]
    width_n = naive.loc["early", "ci_high"] - naive.loc["early", "ci_low"]
    # ten independent units: sd sqrt(.25 / 10) vs 400 units: sd sqrt(.25 / 400)
    assert width_c == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 10), rel=0.25)
    assert width_n == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.25)
    assert "runs" in ta.phase_distribution(jumps, 1000).resampling


def test_phase_n_steps_per_run_and_errors():
    jumps = pd.concat([jumps_at([60], run="long"), jumps_at([60], run="short")])
    t = ta.phase_distribution(jumps, {"long": 1000, "short": 100}, n_boot=200).table
    assert t.set_index("phase")["n_jumps"].to_dict() == {"early": 1, "mid": 0, "late": 1}
    with pytest.raises(AnalysisError, match="no entry for run 'short'"):
        ta.phase_distribution(jumps, {"long": 1000})
    with pytest.raises(AnalysisError, match="no 'run' column"):
        ta.phase_distribution(jumps.drop(columns="run"), {"long": 1000})
    with pytest.raises(AnalysisError, match="0 < early <= late <= 1"):
        ta.phase_distribution(jumps, 1000, early=0.6, late=0.5)


# ---------------------------------------------------------------------------- gradient flow


def test_gradient_flow_matches_closed_form_and_leaves_grads_and_weights():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    x[:, 0] = 0.0  # the first input column is zero: dL/dW[:, 0] = 0 exactly
    y = torch.randn(16, 2, dtype=torch.float64)
    states = {
        s: {k: torch.randn_like(v) for k, v in lin.state_dict().items()} for s in (0, 50, 100)
    }
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    marker = torch.full_like(lin.weight, 7.0)
    lin.weight.grad = marker.clone()

    def mse(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    res = ta.gradient_flow(lin, dict(reversed(states.items())), (x, y), mse)
    t = res.to_pandas().set_index(["step", "parameter"])
    for step, sd in states.items():
        err = x @ sd["weight"].T + sd["bias"] - y
        g_w = 2 / err.numel() * err.T @ x  # closed form for mean squared error of a linear map
        g_b = 2 / err.numel() * err.sum(0)
        for name, g in (("weight", g_w), ("bias", g_b)):
            row = t.loc[(step, name)]
            assert row["l2"] == pytest.approx(float(g.norm()), rel=1e-10)
            assert row["mean"] == pytest.approx(float(g.mean()), rel=1e-10, abs=1e-15)
            assert row["max_abs"] == pytest.approx(float(g.abs().max()), rel=1e-10)
            assert row["std"] == pytest.approx(float(g.flatten().std(correction=0)), rel=1e-10)
        assert (
            t.loc[(step, "weight"), "sparsity"] == 0.25 and t.loc[(step, "bias"), "sparsity"] == 0
        )
    assert list(res.losses["step"]) == [0, 50, 100]
    assert torch.equal(lin.weight.grad, marker) and lin.bias.grad is None
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])

    def broken(m, b):
        if float(m.bias.detach()[0]) == float(states[50]["bias"][0]):
            raise RuntimeError("user bug")
        return mse(m, b)

    with pytest.raises(RuntimeError, match="user bug"):
        ta.gradient_flow(lin, states, (x, y), broken)
    assert all(torch.equal(v, before[k]) for k, v in lin.state_dict().items())
    with pytest.raises(AnalysisError, match="missing bias"):
        ta.gradient_flow(lin, {0: {"weight": states[0]["weight"]}}, (x, y), mse)
    with pytest.raises(AnalysisError, match=r"scalar tensor; got \(16, 2\)"):
        ta.gradient_flow(lin, states, (x, y), lambda m, b: m(b[0]) - b[1])


# ----------------------------------------------------------------------- subspace evolution


def test_subspace_angles_match_scipy_and_a_planted_rotation():
    rng = np.random.default_rng(0)
    acts = {s: rng.standard_normal((60, 10)) @ rng.standard_normal((10, 10)) for s in (0, 10, 20)}
    res = ta.subspace_evolution(acts, k=3)

    def top(a):
        return np.linalg.svd(a - a.mean(0), full_matrices=False)[2][:3].T

    for i, (s0, s1) in enumerate([(0, 10), (10, 20)]):
        ref = np.sort(scipy.linalg.subspace_angles(top(acts[s0]), top(acts[s1])))
        got = res.angles.loc[i, ["angle_1", "angle_2", "angle_3"]].to_numpy(dtype=float)
        assert got == pytest.approx(ref, abs=1e-10)
    assert res.similarity.loc[0, 20] == pytest.approx(np.mean(np.cos(np.sort(
        scipy.linalg.subspace_angles(top(acts[0]), top(acts[20])))) ** 2))  # fmt: skip

    theta = 0.3
    coef = rng.standard_normal((50, 3))
    basis0 = np.eye(8)[:, :3]
    basis1 = basis0.copy()
    basis1[:, 0] = math.cos(theta) * np.eye(8)[:, 0] + math.sin(theta) * np.eye(8)[:, 3]
    planted = {0: coef @ basis0.T, 1: coef @ basis1.T, 2: coef @ np.eye(8)[:, 4:7].T}
    res = ta.subspace_evolution({k: torch.tensor(v) for k, v in planted.items()}, k=3)
    first = res.angles.loc[0, ["angle_1", "angle_2", "angle_3"]].to_numpy(dtype=float)
    assert first == pytest.approx([0.0, 0.0, theta], abs=1e-9)
    assert res.angles.loc[0, "max_angle_deg"] == pytest.approx(math.degrees(theta))
    assert res.similarity.loc[0, 1] == pytest.approx((2 + math.cos(theta) ** 2) / 3)
    assert res.similarity.loc[0, 2] == pytest.approx(0.0, abs=1e-12)
    assert np.diag(res.similarity.to_numpy()) == pytest.approx(1.0)


def test_subspace_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(AnalysisError, match=r"k=9 is too large.*min\(n - 1, d\) = 8"):
        ta.subspace_evolution(
            {0: rng.standard_normal((20, 8)), 1: rng.standard_normal((20, 8))}, k=9
        )
    with pytest.raises(AnalysisError, match=r"shape \(20, 8\) but activations\[1\] has \(19, 8\)"):
        ta.subspace_evolution({0: rng.standard_normal((20, 8)), 1: rng.standard_normal((19, 8))})
    flat = rng.standard_normal((20, 2)) @ rng.standard_normal((2, 8))
    with pytest.raises(AnalysisError, match="rank < k=3"):
        ta.subspace_evolution({0: flat, 1: flat}, k=3)
    with pytest.raises(AnalysisError, match="need at least 2"):
        ta.subspace_evolution({0: flat})


# ------------------------------------------------------------------------ disentanglement


def test_disentanglement_exact_small_case():
    # class 0 at (0, +-1), class 1 at (4, +-1), five copies each: every quantity by hand
    pts = np.array([[0, 1], [0, -1], [4, 1], [4, -1]] * 5, dtype=float)
    y = np.array([0, 0, 1, 1] * 5)
    res = ta.disentanglement({7: pts}, y)
    row = res.to_pandas().iloc[0]
    assert row["variance_ratio"] == pytest.approx(4.0)  # between 10 * 2**2 * 2 / within 20 * 1
    a = (4 * 0 + 5 * 2) / 9  # mean distance to own class (4 duplicates, 5 mirror points)
    b = (4 + math.sqrt(20)) / 2
    assert row["silhouette"] == pytest.approx(1 - a / b)
    assert row["separability"] == 1.0 and row["chance"] == 0.5
    assert row["pca_dim_mean"] == 1.0 and res.per_class["pca_dim"].tolist() == [1, 1]


def test_disentanglement_gaussian_clusters():
    rng = np.random.default_rng(0)
    n, d, m = 500, 5, 3.0
    y = np.r_[np.zeros(n), np.ones(n)].astype(int)
    noise = rng.standard_normal((2 * n, d))
    shift = np.zeros((2 * n, d))
    shift[:, 0] = np.where(y == 0, -m, m)
    res = ta.disentanglement({0: noise, 100: noise + shift}, y)
    t = res.to_pandas().set_index("step")
    assert t.loc[100, "variance_ratio"] == pytest.approx(m**2 / d, rel=0.05)  # m^2 / (d sigma^2)
    assert t.loc[0, "variance_ratio"] == pytest.approx(0.0, abs=0.01)
    assert t.loc[100, "separability"] > 0.99
    assert 0.45 < t.loc[0, "separability"] < 0.55
    assert t.loc[100, "silhouette"] > 0.3 > abs(t.loc[0, "silhouette"])
    assert t["pca_dim_mean"].tolist() == [5.0, 5.0]  # isotropic 5-d classes need all 5 for 95 %
    with pytest.raises(AnalysisError, match="labels has 3 entries but the activations have 1000"):
        ta.disentanglement({0: noise}, y[:3])
    with pytest.raises(
        AnalysisError, match="class 1 has 2 samples; every class needs at least cv=5"
    ):
        ta.disentanglement({0: noise[:12]}, np.r_[np.zeros(10), np.ones(2)].astype(int))


# ---------------------------------------------------------------------------- smoothness


def noisy_run(sigma, seed, every=1):
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 400 * every, every)
    curves = {f"resid_post.{i}": 0.01 * steps + sigma * rng.standard_normal(400) for i in range(2)}
    return results_frame(curves, steps)


def test_smoothness_tells_noisy_from_smooth():
    res = ta.smoothness({"smooth": noisy_run(0.01, 0), "noisy": noisy_run(1.0, 1)}, METRIC)
    assert res.levene_p < 0.01 and res.kruskal_p < 0.01
    t = res.to_pandas().set_index("run")
    # white noise of sd sigma has first differences of sd sigma * sqrt(2)
    assert t.loc["noisy", "derivative_std"] == pytest.approx(math.sqrt(2), rel=0.1)
    same = ta.smoothness({"a": noisy_run(1.0, 2), "b": noisy_run(1.0, 3)}, METRIC)
    assert same.levene_p > 0.05 and same.kruskal_p > 0.05
    # logged every 10 steps: derivatives per training step are ten times smaller
    tenth = ta.smoothness(pd.concat([noisy_run(1.0, 1, 10).assign(run="x"),
                                     noisy_run(1.0, 4, 10).assign(run="y")]), METRIC)  # fmt: skip
    assert tenth.table["derivative_std"].to_numpy() == pytest.approx(math.sqrt(2) / 10, rel=0.1)
    with pytest.raises(AnalysisError, match="need at least 2"):
        ta.smoothness({"only": noisy_run(1.0, 0)}, METRIC)
    with pytest.raises(AnalysisError, match="no 'run' column"):
        ta.smoothness(noisy_run(1.0, 0), METRIC)


# ---------------------------------------------------------------------- errors and results


def test_unknown_metric_names_the_valid_choices():
    frame = results_frame(exp_curves((50, 100)), STEPS_C)
    for call in (ta.convergence, ta.critical_periods):
        expected = (
            r"'participation_rato' is not in results; it holds: participation_ratio\. "
            r"Did you mean 'participation_ratio'\?"
        )
        with pytest.raises(AnalysisError, match=expected):
            call(frame, "participation_rato")
    with pytest.raises(AnalysisError, match="metric 'stable_rank' is not in runs"):
        ta.smoothness({"a": frame, "b": frame}, "stable_rank")


def test_missing_columns_and_too_few_points():
    frame = results_frame(exp_curves((50,)), STEPS_C)
    with pytest.raises(
        AnalysisError, match="lacks column.*value; it needs step, site, metric, value"
    ):
        ta.convergence(frame.drop(columns="value"), METRIC)
    with pytest.raises(AnalysisError, match="must be a pandas DataFrame"):
        ta.critical_periods(frame.to_dict(), METRIC)
    short = results_frame({"neuron.0": [1.0, 2.0]}, [0, 10])
    with pytest.raises(AnalysisError, match="2 logged values; need at least 3"):
        ta.critical_periods(short, METRIC)
    with pytest.raises(AnalysisError, match="2 logged values; need at least n_final"):
        ta.convergence(short, METRIC)
    doubled = pd.concat([frame, frame])
    with pytest.raises(
        AnalysisError, match="more than once; concatenated runs need a 'run' column"
    ):
        ta.convergence(doubled, METRIC)
    with pytest.raises(AnalysisError, match="eps must lie in"):
        ta.convergence(frame, METRIC, eps=-1)


def all_results():
    jumps, results = jump_fixture()
    chars = ta.characterize_jumps(jumps, results, 2000)
    lin = nn.Linear(3, 1)
    x = torch.randn(8, 3)
    rng = np.random.default_rng(0)
    return [
        ta.convergence(results_frame(exp_curves((50, 100)), STEPS_C), METRIC),
        chars,
        ta.cluster_jumps(planted_groups()),
        ta.critical_periods(results_frame({"a.0": ramp_in(400, 500)}, STEPS_K), METRIC),
        ta.phase_distribution(jumps, 2000, n_boot=200),
        ta.gradient_flow(lin, {0: lin.state_dict()}, x, lambda m, b: m(b).square().mean()),
        ta.subspace_evolution(
            {0: rng.standard_normal((20, 6)), 5: rng.standard_normal((20, 6))}, k=2
        ),
        ta.disentanglement(
            {0: rng.standard_normal((20, 3))}, np.r_[np.zeros(10), np.ones(10)].astype(int)
        ),
        ta.smoothness({"a": noisy_run(1.0, 0), "b": noisy_run(0.1, 1)}, METRIC),
    ]


def test_every_result_has_a_frame_a_text_table_and_a_figure():
    for res in all_results():
        assert isinstance(res.to_pandas(), pd.DataFrame) and len(res.to_pandas()) > 0
        text = repr(res)
        assert text.startswith(type(res).__name__ + "(") and "\n" in text
        assert isinstance(res.plot(), Figure)
