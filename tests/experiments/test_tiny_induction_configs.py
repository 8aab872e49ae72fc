"""The tiny-induction configs of feature_comparison, polysemanticity and repr_collapse end to
end, each checked against an independent computation: the shipped weights loaded by
Hugging Face ``transformers`` and read with plain PyTorch hooks, scikit-learn probes on the
rows the action held out, CKA and the loading z-scores written out by hand, and the ground
truth of the induction task (where a repeat is, what each layer can see)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from experiment_refs import linear_cka, table, without_pc1
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import hookscope as hs
from hookscope import actions
from hookscope.data import induction
from hookscope.experiments import load_spec, run
from hookscope.experiments.spec import validate

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
WEIGHTS = Path(hs.__file__).resolve().parent / "zoo" / "weights" / "tiny-induction"
N = 300  # rows per test run (the configs use 600)
# one seed, fewer resamples and no shuffled-label control: the configs as written keep them
FAST = [
    f"dataset.n={N}",
    "action.params.seeds=1",
    "action.params.bootstrap=200",
    "action.params.permutations=50",
    "controls=[]",
]
CONFIG_FILES = {
    "feature_comparison": "feature_comparison_tiny_induction.yaml",
    "polysemanticity": "polysemanticity_tiny_induction.yaml",
    "repr_collapse": "collapse_tiny_induction.yaml",
}


def dataset(config: str):
    """The test run's rows, generated here: ``induction`` over the model's 64 tokens with
    the config's options and seed, N rows."""
    spec, _ = load_spec(CONFIGS / config, FAST)
    assert spec.dataset.name == "induction" and spec.dataset.n == N
    return induction(N, vocab_size=64, seed=spec.seed, **spec.dataset.options)


def rows(config: str) -> dict[str, np.ndarray]:
    """The columns of :func:`dataset` as arrays."""
    ds = dataset(config)
    return {k: np.asarray(ds[k]) for k in ds.column_names}


def reference_forward(tokens: np.ndarray, position: np.ndarray, sites: list[str]) -> dict:
    """``{site: [rows, features]}`` at one position per row, from the shipped weights loaded
    by transformers and read with plain forward hooks (no hookscope code). ``resid_post.L``
    is layer L's output hidden state, ``neuron.L`` the MLP's GELU output, ``embed`` the token
    embedding, ``logits`` the unembedding's output."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(WEIGHTS).eval()
    gpt = model.gpt_neox
    modules = {"embed": gpt.embed_in, "logits": model.get_output_embeddings()}
    for layer in range(len(gpt.layers)):
        modules[f"resid_post.{layer}"] = gpt.layers[layer]
        modules[f"neuron.{layer}"] = gpt.layers[layer].mlp.act
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:

        def keep(_module, _inputs, output, site=site):
            seen[site] = output[0] if isinstance(output, tuple) else output

        handles.append(modules[site].register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(torch.from_numpy(tokens))
    finally:
        for h in handles:
            h.remove()
    at = torch.arange(len(tokens))
    return {s: seen[s][at, torch.from_numpy(position)].double().numpy() for s in sites}


def stored(run_dir: Path, config: str, sites: list[str], positions) -> dict:
    """The run's activations read back from its store (``{site: [rows, features]}``)."""
    index = json.loads((run_dir / "activations_index.json").read_text())
    store = hs.store.ActivationStore(index["store"])
    acts = store.get(
        hs.zoo.load("tiny-induction"),
        dataset(config),
        sites=sites,
        positions=positions,
        text_column="tokens",
    )
    assert acts.key == index["entries"][0]["key"] and acts.sites == sites
    return {s: acts[s].double().numpy() for s in sites}


def fit_predict(x: np.ndarray, y: np.ndarray, held: np.ndarray, standardize: bool = False):
    """scikit-learn's L2 logistic regression (C=1) fitted on every row not held out."""
    train = np.setdiff1d(np.arange(len(y)), held)
    clf = LogisticRegression(C=1.0, max_iter=20000, tol=1e-8)
    if standardize:
        clf = make_pipeline(StandardScaler(), clf)
    clf.fit(x[train], y[train])
    return clf.predict(x[held]), clf


# ---------------------------------------------------------------------------- feature_comparison
def test_feature_comparison_repeat_appears_in_block_1(tmp_path):
    """Position 5, periods 3-5: ``large`` (prefix_len >= 5) is "token 5 has not occurred
    before"; the layer-1 induction heads are what can see that, so nothing before block 1
    decodes it and block 1 does."""
    outcome = run(
        CONFIGS / CONFIG_FILES["feature_comparison"],
        FAST,
        out=tmp_path / "run",
        progress=False,
    )
    m = outcome.summary["metrics"]
    sites = ["embed", "resid_post.0", "resid_post.1", "logits"]
    assert m["sites"] == sites and (m["label_a"], m["label_b"]) == ("large", "prefix_len")
    data = rows(CONFIG_FILES["feature_comparison"])
    tokens, period = data["tokens"], data["prefix_len"]
    not_yet_repeating = np.array([t[5] not in t[1:5] for t in tokens])
    assert ((period >= 5) == not_yet_repeating).all()
    ref = reference_forward(tokens, np.full(N, 5), sites)
    acts = stored(outcome.run_dir, CONFIG_FILES["feature_comparison"], sites, 5)
    for s in sites:
        np.testing.assert_allclose(acts[s], ref[s], rtol=1e-4, atol=1e-5)
    # the paired test's probes: scikit-learn's, fitted on the rows it did not hold out
    labels = {"large": not_yet_repeating.astype(np.int64), "prefix_len": period}
    pred = pd.read_parquet(outcome.run_dir / "predictions.parquet")
    held = np.sort(pred["row"].unique())
    assert len(held) == m["paired_rows"]
    accuracy = {}
    for name, y in labels.items():
        for s in sites:
            ours = pred[(pred.task == name) & (pred.site == s)].sort_values("row")
            assert (ours["row"].to_numpy() == held).all()
            assert (ours["label"].to_numpy() == y[held]).all()
            sk, _ = fit_predict(ref[s], y, held)
            assert (sk == ours["prediction"].to_numpy()).mean() >= 0.97, (name, s)
            accuracy[name, s] = (sk == y[held]).mean()
    auc = {n: np.trapezoid([accuracy[n, s] for s in sites]) / (len(sites) - 1) for n in labels}
    d = m["auc_difference"]
    assert d["auc_a"] == pytest.approx(auc["large"], abs=0.03)
    assert d["auc_b"] == pytest.approx(auc["prefix_len"], abs=0.03)
    assert d["estimate"] == pytest.approx(d["auc_a"] - d["auc_b"], abs=1e-12)
    # the task's ground truth, read off the independent probes: the token embedding at
    # position 5 is a uniform token whatever the period, layer 0 has no head that compares
    # tokens, the induction heads of layer 1 do
    y = labels["large"][held]
    majority = np.bincount(y).max() / len(y)
    assert accuracy["large", "embed"] <= majority + 0.1
    assert accuracy["large", "resid_post.0"] <= majority + 0.1
    assert accuracy["large", "resid_post.1"] >= 0.95
    # ... and the action's own layer curves say the same
    large = m["tasks"]["large"]
    assert large["first_above"] == "resid_post.1" and large["curve"]["resid_post.1"] >= 0.95
    assert m["tasks"]["prefix_len"]["peak_site"] in ("resid_post.1", "logits")


# ---------------------------------------------------------------------------- polysemanticity
def test_polysemanticity_layer1_neurons_match_sklearn(tmp_path):
    """neuron.1 at the first repeated token: every direction is scikit-learn's probe on the
    reference activations, and the loading index and candidates follow their definitions."""
    outcome = run(
        CONFIGS / CONFIG_FILES["polysemanticity"],
        FAST,
        out=tmp_path / "run",
        progress=False,
    )
    m = outcome.summary["metrics"]
    assert m["site"] == "neuron.1" and m["width"] == 256
    data = rows(CONFIG_FILES["polysemanticity"])
    tokens, period, start = data["tokens"], data["prefix_len"], data["repeat_start"]
    assert (start == period + 1).all() and (tokens[np.arange(N), start] == tokens[:, 1]).all()
    H = reference_forward(tokens, start, ["neuron.1"])["neuron.1"]
    acts = stored(outcome.run_dir, CONFIG_FILES["polysemanticity"], ["neuron.1"], "repeat_start")
    np.testing.assert_allclose(acts["neuron.1"], H, rtol=1e-4, atol=1e-5)
    labels = {
        "large": (period >= 5).astype(np.int64),
        "parity": period % 2,
        "prefix_len": period,
    }
    pred = pd.read_parquet(outcome.run_dir / "predictions.parquet")
    probes = table(outcome.summary, "probes").set_index("feature")
    directions = {}
    for name, y in labels.items():
        ours = pred[pred.feature == name].sort_values("row")
        held = ours["row"].to_numpy()
        assert (ours["label"].to_numpy() == y[held]).all()
        sk, clf = fit_predict(H, y, held)
        assert (sk == ours["prediction"].to_numpy()).mean() >= 0.97, name
        # one seed: the score is that seed's held-out accuracy
        assert probes.loc[name, "score"] == pytest.approx((sk == y[held]).mean(), abs=0.04)
        coef = clf.coef_
        if coef.shape[0] == 1:
            directions[name] = coef[0]
        else:
            directions.update({f"{name}={c}": coef[k] for k, c in enumerate(clf.classes_)})
    # the start of the repeat (a position) reaches the MLP through layer 0's attention
    majority = np.bincount(labels["large"]).max() / N
    assert probes.loc["large", "score"] >= majority + 0.15
    alignment = table(outcome.summary, "alignment").set_index("direction")
    assert list(m["alignment"]) == list(alignment.index) == list(directions)
    W = np.stack([w / np.linalg.norm(w) for w in directions.values()])
    d = W.shape[1]
    for i, name in enumerate(directions):
        got, w = alignment.loc[name], W[i]
        assert got["top_neuron"] == int(np.abs(w).argmax())
        assert got["max_cos"] == pytest.approx(np.abs(w).max(), abs=5e-3)
        assert got["participation_ratio"] == pytest.approx(1 / (w**4).sum(), rel=2e-2)
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


# ---------------------------------------------------------------------------- repr_collapse
def test_collapse_position_at_repeat_start(tmp_path):
    """The period at the first repeated token (= its position - 1): the curve is
    scikit-learn's standardised probe per site, CKA is the hand-written formula, and the
    recoverability patch is the unembedding of resid_post.0 computed by hand."""
    outcome = run(
        CONFIGS / CONFIG_FILES["repr_collapse"],
        FAST,
        out=tmp_path / "run",
        progress=False,
    )
    m = outcome.summary["metrics"]
    sites = ["embed", "resid_post.0", "resid_post.1", "logits"]
    assert m["sites"] == sites and m["label"] == "prefix_len" and m["cka_rows"] == N
    data = rows(CONFIG_FILES["repr_collapse"])
    tokens, period, start = data["tokens"], data["prefix_len"], data["repeat_start"]
    ref = reference_forward(tokens, start, sites)
    acts = stored(outcome.run_dir, CONFIG_FILES["repr_collapse"], sites, "repeat_start")
    for s in sites:
        np.testing.assert_allclose(acts[s], ref[s], rtol=1e-4, atol=1e-5)
    # CKA on every row (max_rows is above N)
    cka = table(outcome.summary, "cka").set_index("site")
    cka_wo = table(outcome.summary, "cka_without_pc1").set_index("site")
    flat = {s: without_pc1(ref[s]) for s in sites}
    for a in sites:
        for b in sites:
            assert cka.loc[a, b] == pytest.approx(linear_cka(ref[a], ref[b]), abs=1e-5)
            assert cka_wo.loc[a, b] == pytest.approx(linear_cka(flat[a], flat[b]), abs=1e-4)
    onehot = (period[:, None] == np.unique(period)[None]).astype(np.float64)
    for s in sites:
        assert m["cka_reference_curve"][s] == pytest.approx(linear_cka(ref[s], onehot), abs=1e-5)
    # the curve: seed 0's held-out accuracy, which scikit-learn's standardised logistic
    # regression fitted on the other rows reproduces
    pred = pd.read_parquet(outcome.run_dir / "predictions.parquet")
    curve = np.array([m["curve"][s] for s in sites])
    held = None
    for s, score in zip(sites, curve, strict=True):
        ours = pred[pred.site == s].sort_values("row")
        held = ours["row"].to_numpy()
        assert (ours["label"].to_numpy() == period[held]).all()
        assert score == pytest.approx((ours["label"] == ours["prediction"]).mean(), abs=1e-12)
        sk, _ = fit_predict(ref[s], period, held, standardize=True)
        assert (sk == ours["prediction"].to_numpy()).mean() >= 0.95, s
    assert m["collapse_index"] == pytest.approx(curve.max() - curve[-1], abs=1e-12)
    assert m["peak_site"] == sites[int(curve.argmax())]
    assert m["drop_points"] == [sites[i] for i in range(1, 4) if curve[i - 1] - curve[i] >= 0.05]
    # ground truth: the token at the first repeated position is token 1, uniform whatever
    # the period, so the embedding cannot know the period; layer 0 can (from position)
    majority = np.bincount(period[held]).max() / len(held)
    assert curve[0] <= majority + 0.1
    assert curve[1] >= majority + 0.2
    # recoverability: resid_post.1 replaced by resid_post.0 makes the logits the
    # unembedding of resid_post.0's final layer norm
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(WEIGHTS).eval()
    with torch.no_grad():
        h0 = torch.from_numpy(ref["resid_post.0"]).float()
        patched = hf.get_output_embeddings()(hf.gpt_neox.final_layer_norm(h0)).double().numpy()
    rec = m["recoverability"]
    assert list(rec["sites"]) == ["logits"]
    sk, _ = fit_predict(patched, period, held, standardize=True)
    assert rec["sites"]["logits"]["patched"] == pytest.approx((sk == period[held]).mean(), abs=0.04)
    assert rec["sites"]["logits"]["clean"] == m["curve"]["logits"]


# ---------------------------------------------------------------------------- the files
@pytest.mark.parametrize("action", list(CONFIG_FILES))
def test_config_validates_and_has_its_header(action):
    path = CONFIGS / CONFIG_FILES[action]
    spec, _ = load_spec(path)
    assert spec.action.name == action and spec.extraction.model == "tiny-induction"
    validate(actions.get(action).Params, spec.action.params, prefix="action.params")
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert header[0].startswith("# Question:")
    assert any("Runs in about" in line for line in header)
    assert f"`{CONFIG_FILES[action]}`" in (CONFIGS / "README.md").read_text()
