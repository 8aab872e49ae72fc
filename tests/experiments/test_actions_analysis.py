"""feature_comparison, polysemanticity and repr_collapse end to end on the digits configs,
each number checked against an independent computation (scikit-learn probes, plain-PyTorch
forwards, numpy CKA, the definitions written out by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from experiment_refs import linear_cka, table, without_pc1
from sklearn.linear_model import LogisticRegression
from statsmodels.stats.multitest import multipletests

import hookscope as hs
from hookscope import actions
from hookscope.data import digits
from hookscope.errors import ExperimentError
from hookscope.experiments import load_spec, run
from hookscope.experiments.spec import validate

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# the tests' runs: one seed and no controls (shuffled-label probes converge slowly and
# dominate a sweep's cost; the configs as written keep them)
FAST = [
    "action.params.seeds=1",
    "action.params.bootstrap=200",
    "action.params.permutations=50",
    "controls=[]",
]
OURS = [
    f"{action}_{model}.yaml"
    for action in ("feature_comparison", "polysemanticity")
    for model in ("digits", "pythia70m", "smollm2")
] + ["collapse_digits_cnn.yaml", "collapse_pythia70m.yaml", "collapse_smollm2.yaml"]


def images() -> np.ndarray:
    return np.asarray(digits("test")["image"], dtype=np.float32)  # [450, 8, 8]


def forward(model: str, sites: list[str]) -> dict[str, np.ndarray]:
    """Plain forward of a zoo model on the 450 test images: ``{site: [450, features]}``."""
    m = hs.zoo.load(model)
    x = torch.from_numpy(images())[:, None]
    _, cache = m.run_with_cache(x, names=sites)
    return {s: cache[s].reshape(x.shape[0], -1).double().numpy() for s in sites}


def ink_label() -> np.ndarray:
    ink = images().reshape(450, -1).astype(np.float64).sum(1)
    return (ink > np.median(ink)).astype(np.int64)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("store"))


# ---------------------------------------------------------------------------- feature_comparison
@pytest.fixture(scope="module")
def comparison(tmp_path_factory, store):
    out = tmp_path_factory.mktemp("fc") / "run"
    cfg = CONFIGS / "feature_comparison_digits.yaml"
    outcome = run(cfg, [*FAST, f"extraction.store={store}"], out=out, progress=False)
    return outcome, cfg


def test_feature_comparison_curves_auc_peaks_and_paired_test(comparison):
    outcome, _ = comparison
    m = outcome.summary["metrics"]
    sites = ["resid_pre.0", "resid_post.0", "resid_post.1", "logits"]
    assert m["sites"] == sites
    labels = {"parity": np.asarray(digits("test")["label"]) % 2, "ink": ink_label()}
    acts = forward("digits-mlp", sites)
    for name, y in labels.items():
        task = m["tasks"][name]
        curve = np.array([task["curve"][s] for s in sites])
        # the curve is the probe sweep on the same activations (plain forward, not the store)
        ref = hs.probes.probe_sweep(
            {s: torch.from_numpy(acts[s]) for s in sites},
            y,
            task="classification",
            split={"train": 0.7, "test": 0.3},
            controls=[],
            seeds=1,
            bootstrap=200,
            permutations=50,
            seed=0,
            progress=False,
        )
        np.testing.assert_allclose(curve, ref.to_pandas().loc[sites, "score"], atol=1e-12)
        assert task["auc"] == pytest.approx(np.trapezoid(curve) / (len(sites) - 1), abs=1e-12)
        assert task["peak_site"] == sites[int(np.argmax(curve))]
        above = np.flatnonzero(curve >= m["threshold"])
        assert task["first_above"] == (sites[above[0]] if above.size else None)
    # the paired test: both tasks' probes predict the same held-out rows at every site
    pred = pd.read_parquet(outcome.run_dir / "predictions.parquet")
    rows = {(t, s): tuple(g["row"]) for (t, s), g in pred.groupby(["task", "site"])}
    assert len(set(rows.values())) == 1 and len(rows) == 8
    held = np.array(next(iter(rows.values())))
    assert len(held) == m["paired_rows"]
    acc = (
        pred.assign(hit=pred["label"] == pred["prediction"]).groupby(["task", "site"])["hit"].mean()
    )
    common = {t: np.array([acc[(t, s)] for s in sites]) for t in labels}
    auc = {t: np.trapezoid(c) / (len(sites) - 1) for t, c in common.items()}
    d = m["auc_difference"]
    assert d["estimate"] == pytest.approx(auc["parity"] - auc["ink"], abs=1e-12)
    assert d["ci_low"] <= d["ci_high"] and 0 < d["p_value"] <= 1
    assert m["peak_difference"]["estimate"] == int(
        np.argmax(common["parity"]) - np.argmax(common["ink"])
    )
    assert 0 <= m["a_peaks_first"] <= 1 - m["peaks_tied"] + 1e-12
    # ... and those probes are scikit-learn's logistic regression on the other rows
    train = np.setdiff1d(np.arange(450), held)
    for site in ("resid_post.0", "logits"):
        for name, y in labels.items():
            sk = LogisticRegression(C=1.0, max_iter=5000).fit(acts[site][train], y[train])
            ours = pred[(pred.task == name) & (pred.site == site)].sort_values("row")
            assert (sk.predict(acts[site][ours["row"]]) == ours["prediction"]).mean() >= 0.99


def test_rerun_does_no_forward_and_keeps_the_store(comparison, monkeypatch):
    outcome, cfg = comparison
    store = Path(json.loads((outcome.run_dir / "activations_index.json").read_text())["store"])
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    metrics = (outcome.run_dir / "metrics.json").read_bytes()
    figures = {f.name: f.read_bytes() for f in (outcome.run_dir / "figures").iterdir()}
    forwards = []
    import hookscope.experiments.context as context

    real = context.load_model

    def counting(*args, **kwargs):
        model = real(*args, **kwargs)
        model.model.register_forward_hook(lambda *a: forwards.append(1))
        return model

    monkeypatch.setattr(context, "load_model", counting)
    overrides = [*FAST, f"extraction.store={store}"]
    again = run(cfg, overrides, out=outcome.run_dir, progress=False)
    assert again.ran == () and forwards == []  # complete and unchanged: nothing to do
    # forced: the action runs again, reading the store, with the same metrics
    forced = run(cfg, overrides, out=outcome.run_dir, progress=False, force=True)
    assert forced.ran == ("action", "report") and forwards == []
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before
    assert (outcome.run_dir / "metrics.json").read_bytes() == metrics
    # figures too, SVGs included (no date, fixed element ids)
    assert {f.name: f.read_bytes() for f in (outcome.run_dir / "figures").iterdir()} == figures


# ---------------------------------------------------------------------------- polysemanticity
def test_polysemanticity_matches_sklearn_and_finds_a_planted_neuron(tmp_path, store):
    """The digits config with one more label, ``planted``: neuron 20's activation above its
    median, which a probe should find aligned with that neuron (max |cos| about 0.7 at C=1,
    where the random directions' 99.9th percentile is about 0.5)."""
    H = forward("digits-mlp", ["neuron.0"])["neuron.0"]
    planted = (H[:, 20] > np.median(H[:, 20])).astype(np.int64)
    digits("test").add_column("planted", planted.tolist()).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "run"
    outcome = run(
        CONFIGS / "polysemanticity_digits.yaml",
        [
            *FAST,
            "action.params.alignment_threshold=0.6",
            "action.params.labels=[planted, parity, large, ink, label]",
            "dataset.name=files",
            f"dataset.path={tmp_path / 'data'}",
            f"extraction.store={store}",
        ],
        out=out,
        progress=False,
    )
    m = outcome.summary["metrics"]
    assert m["alignment"]["planted"]["top_neuron"] == 20 and m["alignment"]["planted"]["aligned"]
    assert m["alignment"]["planted"]["max_cos_z"] > 5
    assert not any(a["aligned"] for k, a in m["alignment"].items() if k != "planted")
    # every direction is scikit-learn's on the same training rows (one seed: its probe's)
    y_all = np.asarray(digits("test")["label"])
    labels = {
        "planted": planted,
        "parity": y_all % 2,
        "large": (y_all >= 5).astype(int),
        "ink": ink_label(),
        "label": y_all,
    }
    pred = pd.read_parquet(out / "predictions.parquet")
    directions = {}
    for name, y in labels.items():
        held = pred.loc[pred.feature == name, "row"].to_numpy()
        train = np.setdiff1d(np.arange(450), held)
        coef = LogisticRegression(C=1.0, max_iter=10000, tol=1e-7).fit(H[train], y[train]).coef_
        if coef.shape[0] == 1:
            directions[name] = coef[0]
        else:
            directions.update({f"{name}={k}": coef[k] for k in range(coef.shape[0])})
    alignment = table(outcome.summary, "alignment").set_index("direction")
    assert list(m["alignment"]) == list(alignment.index) == list(directions)
    W = np.stack([w / np.linalg.norm(w) for w in directions.values()])
    d = W.shape[1]
    for i, name in enumerate(directions):
        got, w = alignment.loc[name], W[i]
        assert m["alignment"][name]["max_cos"] == got["max_cos"]
        assert got["top_neuron"] == int(np.abs(w).argmax())
        assert got["max_cos"] == pytest.approx(np.abs(w).max(), abs=2e-3)
        assert got["participation_ratio"] == pytest.approx(1 / (w**4).sum(), rel=1e-2)
        c = w - w.mean()
        assert got["kurtosis"] == pytest.approx((c**4).mean() / (c**2).mean() ** 2 - 3, abs=0.05)
    z = np.sqrt(d) * W  # loading z-scores, by their definition
    index = (np.abs(z) >= m["z_threshold"]).sum(0)
    assert m["loading_index_counts"] == {
        str(k): int((index == k).sum()) for k in range(index.max() + 1)
    }
    cos = np.abs(W @ W.T)
    expect = []
    for j in range(d):
        high = np.flatnonzero(np.abs(z[:, j]) >= m["z_threshold"])
        if len(high) >= 2 and (cos[np.ix_(high, high)] < m["unrelated_below"]).any():
            expect.append(j)
    assert m["candidates"] == expect
    assert {t["name"] for t in outcome.summary["tables"]} == {"probes", "alignment", "candidates"}
    probes = table(outcome.summary, "probes")  # Holm across the features (statsmodels' Holm)
    np.testing.assert_allclose(probes["p_holm"], multipletests(probes["p_value"], method="holm")[1])
    assert {p.name for p in (out / "figures").iterdir()} == {
        f"{n}.{e}" for n in ("loadings", "alignment") for e in ("png", "svg")
    }


# ---------------------------------------------------------------------------- repr_collapse
def test_collapse_cnn_cka_collapse_index_and_pc1(tmp_path, store):
    out = tmp_path / "run"
    outcome = run(
        CONFIGS / "collapse_digits_cnn.yaml",
        [*FAST, f"extraction.store={store}"],
        out=out,
        progress=False,
    )
    m = outcome.summary["metrics"]
    sites = ["resid_pre.0", "resid_post.0", "resid_post.1", "logits"]
    assert m["sites"] == sites and m["cka_rows"] == 450
    acts = forward("digits-cnn", sites)
    flat = {s: without_pc1(acts[s]) for s in sites}
    cka = table(outcome.summary, "cka").set_index("site")
    cka_wo = table(outcome.summary, "cka_without_pc1").set_index("site")
    for a in sites:
        for b in sites:
            assert cka.loc[a, b] == pytest.approx(linear_cka(acts[a], acts[b]), abs=1e-5)
            assert cka_wo.loc[a, b] == pytest.approx(linear_cka(flat[a], flat[b]), abs=1e-4)
    # one seed: the curve is the accuracy of seed 0's held-out predictions, which agree with
    # scikit-learn's logistic regression fitted on the other rows
    y = ink_label()
    pred = pd.read_parquet(out / "predictions.parquet")
    curve = np.array([m["curve"][s] for s in sites])
    for s, score in zip(sites, curve, strict=True):
        rows = pred[pred.site == s].sort_values("row")
        assert (rows["label"].to_numpy() == y[rows["row"]]).all()
        assert score == pytest.approx((rows["label"] == rows["prediction"]).mean(), abs=1e-12)
        if s in ("resid_pre.0", "logits"):  # the quick fits
            train = np.setdiff1d(np.arange(450), rows["row"])
            sk = LogisticRegression(C=1.0, max_iter=5000).fit(acts[s][train], y[train])
            assert (sk.predict(acts[s][rows["row"]]) == rows["prediction"]).mean() >= 0.99
    assert m["collapse_index"] == pytest.approx(curve.max() - curve[-1], abs=1e-12)
    assert m["peak_site"] == sites[int(curve.argmax())]
    assert m["drop_points"] == [sites[i] for i in range(1, 4) if curve[i - 1] - curve[i] >= 0.05]
    onehot = np.eye(2)[y]
    for s in sites:
        assert m["cka_reference_curve"][s] == pytest.approx(linear_cka(acts[s], onehot), abs=1e-5)
    a, b = m["pc1_diagnostic"]["sites"]
    assert b == "logits" and a == (m["peak_site"] if m["peak_site"] != "logits" else sites[0])
    x = acts[a] - acts[a].mean(0)
    sv = np.linalg.svd(x, compute_uv=False)
    assert m["pc1_diagnostic"]["pc1_fraction_x"] == pytest.approx(
        sv[0] ** 2 / (sv**2).sum(), abs=1e-6
    )
    assert m["pc1_diagnostic"]["cka_without_pc1"] == pytest.approx(
        linear_cka(flat[a], flat[b]), abs=1e-4
    )
    assert "recoverability" not in m
    assert {p.name for p in (out / "figures").iterdir()} == {
        f"{n}.{e}" for n in ("collapse", "cka", "cka_without_pc1") for e in ("png", "svg")
    }


def test_recoverability_reprobes_the_patched_forward(tmp_path, store):
    """MLP: the input (64 pixels) patched over the first hidden layer (64 units); the later
    sites are what the rest of the network makes of raw pixels, computed here by hand."""
    outcome = run(
        CONFIGS / "collapse_digits_cnn.yaml",
        [
            *FAST,
            "extraction.model=digits-mlp",
            "action.params.recover_from=resid_pre.0",
            "action.params.recover_into=resid_post.0",
            f"extraction.store={store}",
        ],
        out=tmp_path / "run",
        progress=False,
    )
    rec = outcome.summary["metrics"]["recoverability"]
    assert list(rec["sites"]) == ["resid_post.1", "logits"]
    seq = hs.zoo.load("digits-mlp").model  # Flatten, Linear, ReLU, Linear, ReLU, Linear
    with torch.no_grad():
        x = torch.from_numpy(images()).reshape(450, 64)
        h1 = seq[4](seq[3](x))
        patched = {"resid_post.1": h1, "logits": seq[5](h1)}
    ref = hs.probes.probe_sweep(
        patched,
        ink_label(),
        task="classification",
        split={"train": 0.7, "test": 0.3},
        controls=[],
        seeds=1,
        bootstrap=200,
        permutations=50,
        seed=0,
        progress=False,
    ).to_pandas()
    curve = outcome.summary["metrics"]["curve"]
    for site, got in rec["sites"].items():
        assert got["patched"] == pytest.approx(ref.loc[site, "score"], abs=1e-9)
        assert got["clean"] == curve[site]
    assert rec["recovered_score"] == rec["sites"]["logits"]["patched"]
    lost = max(curve.values()) - curve["logits"]
    assert lost >= 0.05  # the MLP loses "ink" by its logits too, so the fraction is defined
    assert rec["recovered_fraction"] == pytest.approx(
        (rec["recovered_score"] - curve["logits"]) / lost
    )


# ---------------------------------------------------------------------------- bad params, configs
@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (
            "feature_comparison_digits.yaml",
            ["action.params.threshold=1.5"],
            "action.params.threshold: ",
        ),
        (
            "feature_comparison_digits.yaml",
            ["action.params.treshold=0.5"],
            "action.params.treshold: unknown key; valid keys: ",
        ),
        (
            "feature_comparison_digits.yaml",
            ["action.params.label_a=nosuch"],
            "action.params.label_a: 'nosuch' is neither a column of the dataset nor a derived label",
        ),
        (
            "feature_comparison_digits.yaml",
            ["action.params.label_b=parity"],
            "action.params.label_b: the same label",
        ),
        (
            "polysemanticity_digits.yaml",
            ["action.params.labels=[parity]"],
            "action.params.labels: ",
        ),
        (
            "polysemanticity_digits.yaml",
            ["action.params.site=resid_post.1"],
            "action.params.site: 'resid_post.1' is not an extracted site",
        ),
        (
            "collapse_digits_cnn.yaml",
            ["action.params.recover_from=resid_pre.0"],
            "action.params.recover_into: required with recover_from",
        ),
        (
            "collapse_digits_cnn.yaml",
            ["action.params.recover_from=resid_pre.0", "action.params.recover_into=resid_post.0"],
            "action.params.recover_into: patching needs equal widths",
        ),
        (
            "collapse_digits_cnn.yaml",
            ["action.params.label=nosuch"],
            "action.params.label: 'nosuch'",
        ),
    ],
)
def test_bad_params_name_the_field(tmp_path, store, config, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(ExperimentError) as err:
        run(CONFIGS / config, [*overrides, f"extraction.store={store}"], out=out, progress=False)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("name", OURS)
def test_configs_validate(name):
    path = CONFIGS / name
    spec, _ = load_spec(path)
    action = actions.get(spec.action.name)
    validate(action.Params, spec.action.params, prefix="action.params")
    header = path.read_text().splitlines()[:8]
    assert any(line.startswith("# Question:") for line in header)
    assert any("Runs in about" in line for line in header)
