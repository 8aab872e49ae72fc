"""probe_sweep: planted ground truth, controls, the store, scikit-learn references."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

import hookscope as hs
from hookscope import analysis as an
from hookscope import probes
from hookscope.errors import ProbeError

FAST = {"seeds": 3, "bootstrap": 300, "permutations": 300, "progress": False}


# ------------------------------------------------------------------ a constructed model
def xor_model() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """A 3-block MLP with hand-set weights. Inputs are 4x4 "images" whose first two pixels
    are signs a, b (plus noise); the label is a*b > 0 (XOR: not linearly decodable from the
    input or block 0's output). Block 1 computes relu(a+b) and relu(-a-b) in units 0 and 1,
    whose sum is the label: there the feature is linear along (e0 + e1)/sqrt(2). Block 2
    rotates everything by an orthogonal Q, so its direction is Q (e0 + e1)/sqrt(2)."""
    d = 16
    l0, l1, l2, head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 2)
    with torch.no_grad():
        # block 0: pass a, b as both signs (relu keeps the XOR non-linear), the rest as is
        w0 = torch.eye(d)
        w0[2, :] = 0
        w0[2, 0] = -1.0  # relu(-a)
        w0[3, :] = 0
        w0[3, 1] = -1.0  # relu(-b)
        l0.weight.copy_(w0)
        l0.bias.zero_()
        w1 = torch.eye(d) * 0.1
        w1[0, :4] = torch.tensor([1.0, 1.0, -1.0, -1.0])  # a + b
        w1[1, :4] = torch.tensor([-1.0, -1.0, 1.0, 1.0])  # -a - b
        w1[2, :] = 0
        w1[3, :] = 0
        l1.weight.copy_(w1)
        l1.bias.zero_()
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3)))
        l2.weight.copy_(q)
        l2.bias.zero_()
        head.weight.normal_()
    net = nn.Sequential(nn.Flatten(), l0, nn.ReLU(), l1, nn.ReLU(), l2, head).eval()
    e = torch.zeros(d, dtype=torch.float64)
    e[:2] = 2**-0.5
    return net, e.numpy(), (q.double() @ e).numpy()


def xor_data(n: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    a, b = rng.choice([-1.0, 1.0], n), rng.choice([-1.0, 1.0], n)
    img = 0.3 * rng.standard_normal((n, 16))
    img[:, 0] += a
    img[:, 1] += b
    label = (a * b > 0).astype(np.int64)
    return datasets.Dataset.from_dict(
        {"image": img.reshape(n, 4, 4).astype(np.float32).tolist(), "label": label}
    )


@pytest.fixture(scope="module")
def xor_store(tmp_path_factory):
    net, e1, e2 = xor_model()
    model = hs.HookedModel.wrap(net)
    store = hs.ActivationStore(tmp_path_factory.mktemp("xor"))
    acts = store.extract(
        model,
        xor_data(1500),
        sites="resid_post.*",
        positions="image",
        batch_size=256,
        progress=False,
    )
    return acts, e1, e2


def test_planted_feature_is_found_at_its_layer_along_its_direction(xor_store):
    acts, e1, e2 = xor_store
    assert acts.sites == ["resid_post.0", "resid_post.1", "resid_post.2"]
    sweep = probes.probe_sweep(acts, "label", "resid_post.*", **FAST)
    table = sweep.to_pandas()
    # block 0: XOR is not linear; the probe is at chance and the CI covers 0.5
    assert table.loc["resid_post.0", "ci_low"] < 0.5 < table.loc["resid_post.0", "ci_high"] + 0.02
    assert table.loc["resid_post.0", "p_holm"] > 0.05
    for site, e in (("resid_post.1", e1), ("resid_post.2", e2)):
        assert table.loc[site, "score"] > 0.97 and table.loc[site, "p_holm"] < 0.01
        assert float(sweep.directions[site] @ torch.tensor(e)) > 0.99
        assert table.loc[site, "effect_ci_low"] > 0.2  # above the shuffled labels
    # the controls stay far below the task (four clusters make a shuffled probe's score
    # coarse here; the shuffle-at-chance check is test_shuffle_is_chance_within_its_interval)
    for site in ("resid_post.1", "resid_post.2"):
        assert table.loc[site, "shuffle_ci_high"] < 0.8
        assert table.loc[site, "random_features_ci_high"] < 0.8


def test_shuffle_is_chance_within_its_interval():
    rng = np.random.default_rng(4)
    n, d = 1500, 20
    y = rng.integers(0, 2, n)
    X = rng.standard_normal((n, d)) + np.outer(2 * y - 1, np.r_[1.0, np.zeros(d - 1)])
    sweep = probes.probe_sweep(
        {"resid_post.0": torch.tensor(X)},
        y,
        controls=["shuffle", "random_features"],
        seeds=5,
        bootstrap=500,
        permutations=200,
        progress=False,
    )
    row = sweep["resid_post.0"]
    for c in ("shuffle", "random_features"):
        assert row[c + "_ci_low"] < 0.5 < row[c + "_ci_high"]
    assert row["ci_low"] > 0.8 and row["effect_ci_low"] > 0.25


def test_seed_zero_probe_equals_sklearn_on_the_same_rows(xor_store):
    acts, _, _ = xor_store
    sweep = probes.probe_sweep(
        acts,
        "label",
        ["resid_post.1"],
        seeds=2,
        bootstrap=50,
        permutations=50,
        progress=False,
        tol=1e-10,
        controls=(),
    )
    rows = sweep.splits[0]
    X = acts["resid_post.1"].double().numpy()
    y = np.asarray(acts.column("label"))
    ref = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(
        X[rows["train"]], y[rows["train"]]
    )
    probe = sweep.probes["resid_post.1"]
    np.testing.assert_allclose(probe.coef_.numpy(), ref.coef_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probe.intercept_.numpy(), ref.intercept_, rtol=1e-4, atol=1e-6)
    # the seed-0 test score in the table is sklearn's accuracy on the test rows (seed mean
    # over 2 seeds: check seed 0 through the probe)
    assert probe.score(X[rows["test"]], y[rows["test"]]) == pytest.approx(
        ref.score(X[rows["test"]], y[rows["test"]])
    )
    assert len(set(rows["train"]) & set(rows["test"])) == 0
    assert len(rows["train"]) + len(rows["test"]) == len(y)


def test_multiclass_digits_from_the_zoo_through_the_store(tmp_path):
    model = hs.zoo.load("digits-mlp")
    ds = hs.data.digits("test").select(range(400))
    acts = hs.ActivationStore(tmp_path).extract(
        model, ds, sites="resid_post.*", positions="image", progress=False
    )
    sweep = probes.probe_sweep(
        acts,
        "label",
        metric="accuracy",
        seeds=2,
        bootstrap=200,
        permutations=200,
        progress=False,
        controls=["shuffle"],
    )
    assert sweep.sites == ["resid_post.0", "resid_post.1"]
    table = sweep.to_pandas()
    rows = sweep.splits[0]
    for site in sweep.sites:
        X = acts[site].double().numpy()
        y = np.asarray(acts.column("label"))
        ref = LogisticRegression(C=1.0, tol=1e-8, max_iter=100_000).fit(
            X[rows["train"]], y[rows["train"]]
        )
        ours = sweep.probes[site]
        assert ours.coef_.shape == (10, X.shape[1])
        agree = (ours.predict(X[rows["test"]]) == ref.predict(X[rows["test"]])).mean()
        assert agree > 0.99
        assert table.loc[site, "score"] > 0.8 and table.loc[site, "shuffle"] < 0.3
        assert sweep.directions[site].shape == (10, X.shape[1])


def typed(n: int, d: int, kinds: int, seed: int):
    """Rows of ``kinds`` types (e.g. tokens), each with its own embedding, plus noise."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, kinds, n)
    X = 2 * rng.standard_normal((kinds, d))[types] + 0.5 * rng.standard_normal((n, d))
    return rng, types, X


def test_control_task_separates_memorisation_from_encoding():
    """Hewitt & Liang's control task. With few types (40 in 24 dimensions) a linear probe
    can memorise any per-type labelling: a per-type property scores high and so does the
    control task, so selectivity is low. With many types (600) it cannot, while a label
    carried by a direction shared by all types still scores high: selectivity is high."""
    n, d = 3000, 24
    kw = dict(controls=["shuffle", "control_task"], **FAST)
    rng, types, X = typed(n, d, 40, seed=0)
    memo = rng.integers(0, 2, 40)[types]  # a per-type property
    memorised = probes.probe_sweep(
        {"resid_post.0": torch.tensor(X)}, memo, control_task_key=types, **kw
    )["resid_post.0"]
    assert memorised["score"] > 0.8 and memorised["control_task"] > 0.75
    assert abs(memorised["selectivity"]) < 0.1
    rng, types, X = typed(n, d, 600, seed=1)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    encoded = rng.integers(0, 2, n)  # varies within a type, along u
    X = X + np.outer(2 * encoded - 1, 3.0 * u)
    carried = probes.probe_sweep(
        {"resid_post.0": torch.tensor(X)}, encoded, control_task_key=types, **kw
    )["resid_post.0"]
    assert carried["score"] > 0.8 and carried["control_task"] < 0.65
    assert carried["selectivity_ci_low"] > 0.15
    # one label per type, the same for every row of the type, from the label distribution
    ctl = probes.control_task_labels(types, encoded, seed=1)
    assert all(len(set(ctl[types == t])) == 1 for t in np.unique(types))
    assert set(np.unique(ctl)) <= {0, 1}


def test_directions_feed_neuron_alignment_without_glue():
    rng = np.random.default_rng(1)
    n, d = 2000, 32
    y = rng.integers(0, 2, n)
    aligned = rng.standard_normal((n, d))
    aligned[:, 7] += 3.0 * (2 * y - 1)  # the feature on neuron 7
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    spread = aligned @ rot  # the same feature spread over every neuron
    sweep = probes.probe_sweep(
        {"neuron.0": torch.tensor(aligned), "neuron.1": torch.tensor(spread)},
        y,
        controls=(),
        **FAST,
    )
    result = an.neuron_alignment(sweep.directions)
    assert result.names == ["neuron.0", "neuron.1"]
    assert result.aligned.tolist() == [True, False]
    assert int(result.top_neuron[0]) == 7


def test_result_forms_and_json_artifact(xor_store, tmp_path):
    acts, _, _ = xor_store
    sweep = probes.probe_sweep(acts, "label", "resid_post.1", control_task_key="label", **FAST)
    text = str(sweep)
    assert "resid_post.1" in text and "selectivity" in text and "3 seeds" in text
    cols = set(sweep.to_pandas().columns)
    assert {
        "score",
        "sd",
        "ci_low",
        "ci_high",
        "shuffle",
        "random_features",
        "control_task",
        "selectivity",
        "effect",
        "p_value",
        "p_holm",
        "n_train",
        "n_test",
    } <= cols
    fig = sweep.plot()
    assert len(fig.axes[0].lines) >= 1 + len(sweep.controls)
    path = sweep.to_json(tmp_path / "sweep.json")
    saved = json.loads(path.read_text())
    assert saved["config"]["seeds"] == 3 and saved["config"]["seed"] == 0
    assert saved["config"]["versions"]["hookscope"] == hs.__version__
    assert saved["rows"][0]["score"] == pytest.approx(sweep.rows[0]["score"])
    assert len(saved["directions"]["resid_post.1"]) == acts["resid_post.1"].shape[1]


def test_sites_are_read_one_at_a_time(xor_store, monkeypatch):
    acts, _, _ = xor_store
    seen = []
    original = type(acts).__getitem__

    def spy(self, site):
        seen.append(site)
        return original(self, site)

    monkeypatch.setattr(type(acts), "__getitem__", spy)
    probes.probe_sweep(
        acts, "label", controls=["shuffle"], seeds=1, bootstrap=20, permutations=20, progress=False
    )
    assert seen == ["resid_post.0", "resid_post.1", "resid_post.2"]


def test_cv_grid_refit_permutations_and_regression():
    rng = np.random.default_rng(2)
    n, d = 600, 10
    X = rng.standard_normal((n, d))
    y = (X[:, 0] + 0.5 * rng.standard_normal(n) > 0).astype(int)
    acts = {"resid_post.0": torch.tensor(X)}
    cv = probes.probe_sweep(acts, y, cv=5, controls=["shuffle"], **FAST)["resid_post.0"]
    assert cv["n_test"] == n and cv["score"] > 0.8
    grid = probes.probe_sweep(acts, y, C=[1e-6, 1.0], controls=(), **FAST)["resid_post.0"]
    assert grid["C"] == 1.0  # the vanishing C cannot fit; validation picks the other
    null_y = rng.integers(0, 2, n)
    refit = probes.probe_sweep(
        acts,
        null_y,
        controls=(),
        permutation="refit",
        seeds=1,
        bootstrap=50,
        permutations=99,
        progress=False,
    )["resid_post.0"]
    assert refit["p_value"] > 0.05 and refit["p_value"] >= 1 / 100
    strong = probes.probe_sweep(
        acts,
        y,
        controls=(),
        permutation="refit",
        seeds=1,
        bootstrap=50,
        permutations=99,
        progress=False,
    )["resid_post.0"]
    assert strong["p_value"] == pytest.approx(1 / 100)
    target = X @ np.arange(d) + rng.standard_normal(n)
    reg = probes.probe_sweep(acts, target, controls=["shuffle"], **FAST)
    assert reg.task == "regression" and reg.metric == "r2"
    assert reg["resid_post.0"]["score"] > 0.95 and reg["resid_post.0"]["shuffle"] < 0.05


def test_random_init_control(tmp_path):
    import builders

    model = hs.HookedModel.wrap(builders.tiny_gpt2(), builders.make_tokenizer())
    # (builders draws the tiny model's own weights under seed 0: use another seed here)
    fresh = probes.random_init(model, seed=5)
    again = probes.random_init(model, seed=5)
    ours = dict(model.model.named_parameters())
    theirs = dict(fresh.model.named_parameters())
    assert ours.keys() == theirs.keys()
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)
    for k, v in again.model.named_parameters():
        assert torch.equal(v, theirs[k])
    assert fresh.adapter.name == model.adapter.name and fresh.n_layers == model.n_layers
    # the untrained copy uses the architecture's own initialisation (HF _init_weights)
    cfg = fresh.model.config
    if hasattr(cfg, "initializer_range"):
        w = next(
            p for n, p in fresh.model.named_parameters() if n.endswith("weight") and p.ndim == 2
        )
        assert abs(float(w.detach().std()) - cfg.initializer_range) < 0.5 * cfg.initializer_range
    texts = [f"the {w} sat on the mat number {i}" for i, w in enumerate(["cat", "dog"] * 30)]
    ds = datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(60)]})
    store = hs.ActivationStore(tmp_path)
    kw = dict(sites="resid_post.0", positions="last", progress=False)
    trained = store.extract(model, ds, **kw)
    untrained = store.extract(fresh, ds, **kw)
    assert trained.key != untrained.key
    sweep = probes.probe_sweep(
        trained,
        "label",
        controls=["random_init"],
        random_init=untrained,
        seeds=1,
        bootstrap=50,
        permutations=50,
        progress=False,
    )
    assert "random_init" in sweep.to_pandas().columns
    assert not math.isnan(sweep.rows[0]["random_init"])


def test_bad_input_names_the_problem(xor_store):
    acts, _, _ = xor_store
    X = {"resid_post.0": torch.randn(40, 3)}
    y = np.arange(40) % 2
    with pytest.raises(ProbeError, match="39 values but acts has 40 rows"):
        probes.probe_sweep(X, y[:39])
    with pytest.raises(ProbeError, match="single class"):
        probes.probe_sweep(X, np.zeros(40, int))
    bad = {"resid_post.0": torch.randn(40, 3)}
    bad["resid_post.0"][5, 1] = float("nan")
    with pytest.raises(ProbeError, match=r"resid_post.0.*NaN.*first: \[5\]"):
        probes.probe_sweep(bad, y, progress=False)
    with pytest.raises(ProbeError, match="no site of acts matches 'attn_out.*'.*resid_post.0"):
        probes.probe_sweep(acts, "label", "attn_out.*")
    with pytest.raises(ProbeError, match="'token_id' is not a column.*label"):
        probes.probe_sweep(acts, "label", control_task_key="token_id", controls=["control_task"])
    with pytest.raises(ProbeError, match="control_task_key"):
        probes.probe_sweep(acts, "label", controls=["control_task"])
    with pytest.raises(ProbeError, match="unknown controls.*shuffle"):
        probes.probe_sweep(acts, "label", controls=["shufle"])
    with pytest.raises(ProbeError, match=r"too few examples.*has 2 rows"):
        probes.probe_sweep({"resid_post.0": torch.randn(12, 3)}, np.array([0] * 10 + [1] * 2))
    with pytest.raises(ProbeError, match="cv=5 needs at least 5 rows of every class.*has 3"):
        probes.probe_sweep({"resid_post.0": torch.randn(13, 3)}, np.array([0] * 10 + [1] * 3), cv=5)
    with pytest.raises(ProbeError, match="sum to 1"):
        probes.probe_sweep(X, y, split={"train": 0.5, "test": 0.2})
    with pytest.raises(ProbeError, match="metric.*accuracy"):
        probes.probe_sweep(X, y, metric="precision")


# ------------------------------------------------------------------ review fixes
def test_weighted_bootstrap_metrics_equal_sklearn_sample_weights():
    from sklearn.metrics import accuracy_score, f1_score, r2_score, roc_auc_score

    from hookscope.probes.stats import weighted_values

    rng = np.random.default_rng(0)
    for k in (2, 3):
        y = rng.integers(0, k, 300)
        p = np.round(rng.dirichlet(np.ones(k), 300), 1) + 1e-3
        p /= p.sum(1, keepdims=True)  # rounded scores: many ties
        W = rng.poisson(1.0, (4, 300)).astype(float)
        yt, pt, wt = torch.tensor(y), torch.tensor(p), torch.tensor(W)
        average = "binary" if k == 2 else "macro"
        refs = {
            "accuracy": [accuracy_score(y, p.argmax(1), sample_weight=w) for w in W],
            "f1": [f1_score(y, p.argmax(1), sample_weight=w, average=average) for w in W],
            "auroc": [
                roc_auc_score(y, p[:, 1] if k == 2 else p, sample_weight=w, multi_class="ovr")
                for w in W
            ],
        }
        for metric, ref in refs.items():
            np.testing.assert_allclose(weighted_values(metric, yt, pt, wt).numpy(), ref, atol=1e-12)
    t = rng.standard_normal(200)
    pred = t + rng.standard_normal(200)
    W = rng.poisson(1.0, (3, 200)).astype(float)
    np.testing.assert_allclose(
        weighted_values("r2", torch.tensor(t), torch.tensor(pred), torch.tensor(W)).numpy(),
        [r2_score(t, pred, sample_weight=w) for w in W],
        atol=1e-12,
    )


def test_interval_does_not_shrink_with_more_seeds_on_the_same_rows():
    """Seeds' held-out rows overlap: more seeds average over more of the data set's rows
    (the interval narrows as the seeds cover it, and the seed-to-seed part shrinks), but
    never below what all 400 rows allow: the binomial interval of n = 400 at 0.5. (Resampling
    each seed's rows independently fell to 0.042 at 50 seeds, half of that floor.)"""
    rng = np.random.default_rng(5)
    X = {"resid_post.0": torch.tensor(rng.standard_normal((400, 5)))}
    y = rng.integers(0, 2, 400)
    width = {}
    for seeds in (1, 20, 50):
        row = probes.probe_sweep(
            X, y, controls=(), seeds=seeds, bootstrap=400, permutations=50, progress=False
        )["resid_post.0"]
        width[seeds] = row["ci_high"] - row["ci_low"]
        assert row["ci_low"] < 0.5 < row["ci_high"]  # null data: chance inside
    all_rows = 2 * 1.96 * math.sqrt(0.25 / 400)
    assert width[1] > 2 * all_rows  # one seed: 80 held-out rows
    assert width[20] > 0.9 * all_rows and width[50] > 0.9 * all_rows


def test_solver_stops_at_the_float64_optimum_and_warns_when_it_cannot_converge():
    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 20))
    y = (X[:, 0] > 0).astype(int)  # separable
    probe = LinearProbe = probes.LinearProbe(tol=1e-300, max_iter=5000).fit(X, y)
    assert probe.converged_ and probe.n_iter_ < 5000
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        LinearProbe.set_params(tol=1e-12, max_iter=2).fit(X, y)
    with pytest.warns(ConvergenceWarning, match="did not reach"):
        probes.probe_sweep(
            {"resid_post.0": torch.tensor(X)},
            y,
            controls=(),
            seeds=1,
            bootstrap=10,
            permutations=10,
            max_iter=2,
            progress=False,
        )


def test_review_edge_cases_of_the_sweep(tmp_path):
    rng = np.random.default_rng(2)
    X = {"resid_post.0": torch.tensor(rng.standard_normal((60, 3)))}
    whole = np.round(np.abs(rng.standard_normal(60)) * 10).astype(float)
    assert (
        probes.probe_sweep(
            X, whole, controls=(), seeds=1, bootstrap=20, permutations=20, progress=False
        ).task
        == "regression"
    )  # float labels: regression
    with pytest.raises(ProbeError, match="continuous values.*task='regression'"):
        probes.LinearProbe().fit(X["resid_post.0"], rng.standard_normal(60))
    with pytest.raises(ProbeError, match="refit.*grid of C"):
        probes.probe_sweep(X, np.arange(60) % 2, C=[0.1, 1.0], permutation="refit")
    with pytest.raises(ProbeError, match="C must be a positive"):
        probes.probe_sweep(X, np.arange(60) % 2, C="abc")
    assert (
        probes.probe_sweep(
            X,
            np.arange(60) % 2,
            C=np.array([0.5]),
            controls=(),
            seeds=1,
            bootstrap=10,
            permutations=10,
            progress=False,
        ).rows[0]["C"]
        == 0.5
    )
    with pytest.raises(ProbeError, match="sites must be"):
        probes.probe_sweep(X, np.arange(60) % 2, sites=3)
    with pytest.raises(ProbeError, match="must be \\[rows, features\\].*flatten"):
        probes.probe_sweep({"resid_post.0": torch.randn(60, 2, 3)}, np.arange(60) % 2)
    numbered = probes.probe_sweep(
        {0: X["resid_post.0"]},
        np.arange(60) % 2,
        controls=(),
        seeds=1,
        bootstrap=10,
        permutations=10,
        progress=False,
    )
    assert numbered.sites == ["0"]
    # 3 + 3 rows in three parts: the check and the split allocate alike (no empty part later)
    six = {"resid_post.0": torch.randn(6, 2)}
    with pytest.raises(ProbeError, match="too few examples"):
        probes.probe_sweep(
            six, np.array([0, 0, 0, 1, 1, 1]), split={"train": 0.6, "test": 0.2, "val": 0.2}
        )
    # strict JSON: NaN (one seed's sd) as null, booleans and numpy numbers as JSON
    sweep = probes.probe_sweep(
        X,
        np.arange(60) % 2 == 0,
        controls=["shuffle"],
        seeds=1,
        bootstrap=20,
        permutations=20,
        seed=np.int64(3),
        progress=False,
    )
    text = sweep.to_json(tmp_path / "s.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert saved["rows"][0]["sd"] is None and saved["config"]["classes"] == [False, True]


def test_gaussian_features_have_the_sites_mean_and_covariance():
    """Each block of draws has X's mean and covariance up to sampling error (closed form:
    the sd of a sample covariance entry is sqrt((s_ii s_jj + s_ij^2) / n)); blocks are
    independent draws, and the same generator seed gives the same draws."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    X = torch.tensor(rng.standard_normal((4000, 6)) @ A + 3.0)
    Z = probes.gaussian_features(X, torch.Generator().manual_seed(1), draws=2)
    assert Z.shape == (8000, 6)
    S = torch.cov(X.T)
    n = 4000
    for block in (Z[:n].double(), Z[n:].double()):
        sd_mean = (torch.diag(S) / n).sqrt()
        assert bool(((block.mean(0) - X.mean(0)).abs() < 5 * sd_mean).all())
        sd_cov = ((torch.diag(S)[:, None] * torch.diag(S)[None] + S**2) / n).sqrt()
        assert bool(((torch.cov(block.T) - S).abs() < 5 * sd_cov).all())
    assert not torch.allclose(Z[:n], Z[n:])
    again = probes.gaussian_features(X, torch.Generator().manual_seed(1), draws=2)
    assert torch.equal(Z, again)


def test_eigenbasis_random_features_give_the_same_probe():
    """rotate=False draws G L^1/2; rotate=True the same G as mean + G L^1/2 V'. A logistic
    probe on either has the same penalty and margins (u = V'w), so the same predictions."""
    rng = np.random.default_rng(2)
    X = torch.tensor(rng.standard_normal((1500, 5)) @ rng.standard_normal((5, 5)) + 1.0)
    cov = probes.controls.covariance(X)
    flat = probes.gaussian_features(X, torch.Generator().manual_seed(4), rotate=False)
    full = probes.gaussian_features(X, torch.Generator().manual_seed(4))
    evals, V = torch.linalg.eigh(cov)
    expected = flat.double() @ V.T + X.mean(0)
    assert torch.allclose(full.double(), expected, atol=1e-4)
    assert torch.allclose(torch.cov(flat.double().T), torch.diag(evals), atol=0.15 * evals.max())
    y = (rng.random(1500) < 0.4).astype(int)
    a = probes.LinearProbe(C=0.5, tol=1e-10).fit(flat.double(), y)
    b = probes.LinearProbe(C=0.5, tol=1e-10).fit(full.double(), y)
    np.testing.assert_allclose(
        a.predict_proba(flat.double()), b.predict_proba(full.double()), atol=1e-5
    )
