"""Smoke test of examples/dimensionality_findings.py: its table against hand counts of the jump table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "dimensionality_findings.py"


@pytest.fixture(scope="module")
def findings():
    spec = importlib.util.spec_from_file_location("dimensionality_findings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_table_equals_hand_count_of_jump_table(findings):
    steps = 300
    # the default threshold (5) finds no jump in so short an MLP run; 2.5 finds ~11, early,
    # mid and late, at both sites, so that every count below is tested on something
    runs, table = findings.run_findings(
        ("mlp",), [0], steps, 0, progress=False, jump_options={"threshold": 2.5}
    )
    (run,) = runs
    jumps = run.jumps
    assert run.n_steps == steps and run.sites == ["neuron.0", "neuron.1"]
    assert set(run.results["step"]) == set(range(steps))  # every step measured
    assert len(jumps) >= 3, "too few jumps for the hand count to test anything"
    groups = {m: [m] for m in findings.METRICS}
    groups["continuous"] = ["stable_rank", "participation_ratio", "nuclear_norm_ratio"]
    groups["all 4"] = list(findings.METRICS)
    for name, metrics in groups.items():
        row = table[(table["model"] == "mlp") & (table["metrics"] == name)].iloc[0]
        mine = [j for j in jumps.itertuples() if j.metric in metrics]
        n = len(mine)
        early = sum(1 for j in mine if j.step < 30)  # 10 % of 300
        late = sum(1 for j in mine if j.step >= 150)  # 50 % of 300
        first = sum(1 for j in mine if j.site == "neuron.0")
        assert (row["n_jumps"], row["n_early"], row["n_late"], row["n_first_layer"]) == (
            n,
            early,
            late,
            first,
        )
        if n:
            assert row["early"] == pytest.approx(early / n)
            assert row["late"] == pytest.approx(late / n)
            assert row["first_layer"] == pytest.approx(first / n)
        else:
            assert np.isnan(row["early"])
        assert np.isnan(row["early_lo"])  # one seed: no interval over seeds
    everything = table[table["metrics"] == "all 4"].iloc[0]
    assert (
        everything["n_early"] > 0 and everything["n_late"] > 0 and everything["n_first_layer"] > 0
    )
    # nothing is reported before the detector has a reference window
    assert jumps["step"].min() >= findings.earliest_testable(runs)["index"]


def test_bootstrap_resamples_seeds(findings):
    """Two synthetic runs: CIs span the per-seed shares, resampling seeds (not jumps)."""
    sites = ["neuron.0", "neuron.1"]

    def run(seed, steps_sites):
        jumps = pd.DataFrame(
            [{"step": s, "site": site, "metric": "stable_rank", "magnitude": 1.0, "z": 9.0,
              "direction": "up", "confirmed_at": s + 10} for s, site in steps_sites]
        )  # fmt: skip
        return findings.Run("mlp", seed, 100, sites, pd.DataFrame(), jumps, 0.0)

    a = run(
        0, [(5, "neuron.0"), (6, "neuron.0"), (50, "neuron.1")]
    )  # early 2/3, late 1/3 (50 = 50 %: late)
    b = run(1, [(10, "neuron.1")])  # early 0/1 (10 = 10 %: not early)
    t = findings.findings_table([a, b], n_boot=2000).set_index("metrics").loc["stable_rank"]
    assert t["n_jumps"] == 4 and t["n_early"] == 2 and t["n_late"] == 1 and t["n_first_layer"] == 2
    assert t["early"] == pytest.approx(0.5)
    # resamples: {a,a} 2/3, {a,b} 2/4, {b,b} 0 -> the CI reaches both extremes
    assert t["early_lo"] == pytest.approx(0.0) and t["early_hi"] == pytest.approx(2 / 3)
