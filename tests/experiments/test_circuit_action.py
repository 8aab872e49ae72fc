"""circuit_localization end to end: the digits config run through ``hookscope.experiments.run``
and every number checked against plain PyTorch (forward hooks written here, not hookscope's);
the IOI (patching) and tiny-induction (behaviour-only) paths on small models; bad params; no
hook left behind, also when a forward raises mid-run."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hookscope.experiments as ex
from hookscope import actions, probes
from hookscope.errors import ExperimentError
from hookscope.experiments import context as context_module
from hookscope.experiments.spec import load_spec, validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DIGITS = CONFIGS / "circuit_localization_digits.yaml"
FAST = ["action.params.seeds=1", "action.params.bootstrap=20", "action.params.permutations=20"]


def _present_builtins() -> dict:
    """The built-in actions whose modules exist (sibling actions may still be missing)."""
    return {k: v for k, v in actions.BUILTIN.items() if importlib.util.find_spec(v) is not None}


@pytest.fixture(scope="module", autouse=True)
def _setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is fastest on a shared 2-core machine
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(actions, "BUILTIN", _present_builtins())
        yield
    torch.set_num_threads(threads)


def _table(summary: dict, name: str) -> dict:
    t = next(t for t in summary["tables"] if t["name"] == name)
    return {row[0]: dict(zip(t["columns"], row, strict=True)) for row in t["rows"]}


def _all_hooks(module: torch.nn.Module) -> list:
    return [
        h
        for m in module.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    ]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The digits config (fewer seeds and resamples) with the model and the sweep captured."""
    from hookscope import zoo

    model = zoo.load("digits-mlp")
    seen = {}
    real_sweep = probes.probe_sweep

    def sweep(*args, **kwargs):
        seen["sweep"] = real_sweep(*args, **kwargs)
        return seen["sweep"]

    out = tmp_path_factory.mktemp("circuit_digits") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(context_module, "load_model", lambda name, device="cpu": model)
        mp.setattr(probes, "probe_sweep", sweep)
        outcome = ex.run(DIGITS, FAST, out=out, progress=False)
    spec, _ = load_spec(DIGITS, FAST)
    return SimpleNamespace(
        model=model, sweep=seen["sweep"], summary=outcome.summary, out=out, spec=spec
    )


# ---------------------------------------------------------------------------- references
def _digits_rows():
    from hookscope.data import digits_tensors

    X, y = digits_tensors("test")  # the config's dataset: the 450 test images, in order
    return X, y


def _ablated_forward(net: torch.nn.Module, X: torch.Tensor, component: str, taps: dict):
    """Plain torch: mean-ablate ``component`` of the digits MLP (a whole layer output or one
    neuron; the mean over the 450 rows, as the config asks) and record the ``taps``."""
    kind, layer, *unit = component.split(".")
    module = net[2] if layer == "0" else net[4]  # the ReLU ending hidden block 0 / 1
    with torch.no_grad():
        clean = {}
        h = module.register_forward_hook(lambda m, i, o: clean.setdefault("act", o.clone()))
        net(X)
        h.remove()
        mean = clean["act"].double().mean(0).float()

        def ablate(m, i, o):
            o = o.clone()
            if unit:
                o[:, int(unit[0])] = mean[int(unit[0])]
            else:
                o[:] = mean
            return o

        recorded = {}
        handles = [module.register_forward_hook(ablate)]
        for name, tap in taps.items():
            handles.append(
                tap.register_forward_hook(
                    lambda m, i, o, name=name: recorded.__setitem__(name, o.clone())
                )
            )
        try:
            out = net(X)
        finally:
            for h in handles:
                h.remove()
    return out, recorded


def test_digits_ranking_follows_the_sweep(digits_run):
    table = digits_run.sweep.to_pandas()
    ranking = _table(digits_run.summary, "ranking")
    candidates = ["resid_post.0"] + [f"neuron.1.{i}" for i in range(32)]
    assert sorted(ranking) == sorted(candidates)
    order = list(ranking)
    scores = [ranking[s]["score"] for s in order]
    assert scores == sorted(scores, reverse=True)
    assert all(
        ranking[s]["score"] == pytest.approx(table.loc[s, "score"], abs=1e-12) for s in order
    )
    assert [ranking[s]["rank"] for s in order] == list(range(1, len(order) + 1))
    top_k = digits_run.spec.action.params["top_k"]
    assert [s for s in order if ranking[s]["intervened"]] == order[:top_k]
    assert order[0] == "resid_post.0"  # a whole layer encodes the class far better than one unit
    impact = _table(digits_run.summary, "impact")
    assert list(impact) == order[:top_k]


def test_digits_behaviour_drop_equals_plain_torch_accuracy(digits_run):
    net = digits_run.model.model
    X, y = _digits_rows()
    with torch.no_grad():
        clean = (net(X).argmax(1) == y).double().mean().item()
    metrics = digits_run.summary["metrics"]
    assert metrics["clean"]["behaviour"] == pytest.approx(clean, abs=1e-12)
    impact = _table(digits_run.summary, "impact")
    for component, row in impact.items():
        out, _ = _ablated_forward(net, X, component, {})
        ablated = (out.argmax(1) == y).double().mean().item()
        assert row["behaviour_drop"] == pytest.approx(clean - ablated, abs=1e-12), component
    assert impact["resid_post.0"]["behaviour_drop"] > 0.5  # the mean image's layer: near chance


def test_digits_probe_drop_equals_probe_on_recomputed_activations(digits_run):
    net = digits_run.model.model
    X, y = _digits_rows()
    test = np.sort(digits_run.sweep.splits[0]["test"])
    y_test = y.numpy()[test]
    taps = {"resid_post.0": net[2], "resid_post.1": net[4]}

    def accuracy(site, acts):
        pred = digits_run.sweep.probes[site].predict(acts[torch.as_tensor(test)].double())
        return float(np.mean(pred == y_test))

    recorded = {}
    with torch.no_grad():
        handles = [
            m.register_forward_hook(lambda m, i, o, n=n: recorded.__setitem__(n, o.clone()))
            for n, m in taps.items()
        ]
        net(X)
        for h in handles:
            h.remove()
    clean = {site: accuracy(site, recorded[site]) for site in taps}
    assert digits_run.summary["metrics"]["clean"]["probe"] == pytest.approx(clean, abs=1e-12)
    impact = _table(digits_run.summary, "impact")
    for component, row in impact.items():
        _, acts = _ablated_forward(net, X, component, taps)
        for site in taps:
            expected = clean[site] - accuracy(site, acts[site])
            assert row[f"probe_drop[{site}]"] == pytest.approx(expected, abs=1e-12), (
                component,
                site,
            )
        if component.startswith("neuron.1"):
            assert row["probe_drop[resid_post.0]"] == 0.0  # upstream of the ablated unit
    ranking = _table(digits_run.summary, "ranking")
    assert (
        ranking["resid_post.0"]["probe_drop"] == impact["resid_post.0"]["probe_drop[resid_post.1]"]
    )


def test_digits_artifacts_and_no_hook_left(digits_run):
    assert _all_hooks(digits_run.model.model) == []
    summary = json.loads((digits_run.out / "metrics.json").read_text())
    assert summary["action"] == "circuit_localization"
    assert {f["name"] for f in summary["figures"]} == {"impact", "probe_sweep"}
    for name in ("impact", "probe_sweep"):
        assert (digits_run.out / "figures" / f"{name}.png").stat().st_size > 1000
    assert any("no attention" in n for n in summary["notes"])
    import pandas as pd

    pred = pd.read_parquet(digits_run.out / "predictions.parquet")
    top_k = digits_run.spec.action.params["top_k"]
    assert len(pred) == 450 * (1 + top_k)
    clean = pred[pred.component == "clean"]
    assert clean.behaviour.mean() == summary["metrics"]["clean"]["behaviour"]


def test_hooks_removed_when_a_forward_raises_mid_run(digits_run, tmp_path):
    """A user's own hook raises in the first intervened forward (after the sweep, the clean
    pass of 3 batches and one more): the run stops with that error, hookscope's hooks are
    gone and the user's hook is still there."""
    net = digits_run.model.model
    state = {"swept": False, "calls": 0}
    real_sweep = probes.probe_sweep

    def sweep(*args, **kwargs):
        state["swept"] = True
        return real_sweep(*args, **kwargs)

    def boom(module, inputs, output):
        state["calls"] += state["swept"]
        if state["calls"] == 5:
            assert _all_hooks(net) != [boom]  # hookscope's ablation hook is in place
            raise RuntimeError("boom in the middle")

    small = [
        'extraction.sites=["resid_post.*"]',
        'action.params.candidates=["resid_post.*"]',
        "action.params.top_k=2",
    ]
    handle = net[5].register_forward_hook(boom)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(context_module, "load_model", lambda name, device="cpu": digits_run.model)
            mp.setattr(probes, "probe_sweep", sweep)
            with pytest.raises(RuntimeError, match="boom in the middle"):
                ex.run(DIGITS, [*FAST, *small], out=tmp_path / "run", progress=False)
        assert state["calls"] == 5
        assert _all_hooks(net) == [boom]
    finally:
        handle.remove()
    assert _all_hooks(net) == []


# ---------------------------------------------------------------------------- bad params
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("action.params.topk=3", r"^action\.params\.topk: unknown key; .*did you mean 'top_k'\?$"),
        (
            "action.params.intervention=patchin",
            r"^action\.params\.intervention: 'patchin' is not one of .*did you mean 'patching'\?$",
        ),
        ("action.params.top_k=0", r"^action\.params\.top_k: "),
        (
            "action.params.ablation=resample",
            r"^action\.params\.ablation: 'resample' is not one of mean, zero",
        ),
        ("action.params.threshold=1.5", r"^action\.params\.threshold: "),
        (
            "action.params.intervention=patching",
            r"^action\.params\.corrupted_column: 'corrupted' is not a column",
        ),
        (
            "action.params.candidates=[head.*]",
            r"^action\.params\.candidates\[0\]: 'head\.\*' matches no probed site",
        ),
        (
            "action.params.rank_by=selectivity",
            r"^action\.params\.rank_by: 'selectivity' needs the control_task control",
        ),
        (
            "action.params.behaviour=logit_diff",
            r"^action\.params\.behaviour: 'logit_diff' needs a language model",
        ),
        (
            "action.params.localize=ioi",
            r"^action\.params\.localize: the ioi task needs a model with a tokenizer",
        ),
    ],
)
def test_bad_params_name_the_field(tmp_path, override, message):
    with pytest.raises(ExperimentError) as err:
        ex.run(DIGITS, [*FAST, override], out=tmp_path / "run", progress=False)
    text = str(err.value)
    assert "\n" not in text
    assert re.search(message, text), text


# ---------------------------------------------------------------------------- configs
CIRCUIT_CONFIGS = sorted(CONFIGS.glob("circuit_localization_*.yaml"))


def test_every_config_loads_and_validates():
    names = {p.name for p in CIRCUIT_CONFIGS}
    assert names == {
        "circuit_localization_digits.yaml",
        "circuit_localization_tiny_induction.yaml",
        "circuit_localization_pythia70m.yaml",
        "circuit_localization_smollm2.yaml",
    }
    cls = actions.available()["circuit_localization"]
    for path in CIRCUIT_CONFIGS:
        spec, _ = load_spec(path)
        assert spec.action.name == "circuit_localization", path
        validate(cls.Params, spec.action.params, prefix="action.params")
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        text = " ".join(header)
        assert "Question:" in text and re.search(r"Runs in about \S+ (s|min)", text), path


# ---------------------------------------------------------------------------- language models
def test_tiny_induction_behaviour_only(tmp_path):
    """tiny-induction has no tokenizer: the runner's load_dataset is given the change this
    action needs (induction rows, nothing to extract), and the drops are checked against
    plain torch pre-hooks on the attention output projection."""
    from torch.nn import functional as F

    from hookscope import data as hs_data
    from hookscope import zoo
    from hookscope.interventions import build_task

    model = zoo.load("tiny-induction")
    real = context_module.load_dataset

    def load_dataset(spec, model, seed):
        if spec.name == "induction" and model.tokenizer is None:
            return hs_data.induction(spec.n or 64, int(model.cfg.d_vocab), seed=seed), None, None
        return real(spec, model, seed)

    config = CONFIGS / "circuit_localization_tiny_induction.yaml"
    overrides = ["action.params.localize_n=16", "action.params.top_k=3"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(context_module, "load_dataset", load_dataset)
        mp.setattr(context_module, "load_model", lambda name, device="cpu": model)
        summary = ex.run(config, overrides, out=tmp_path / "run", progress=False).summary
    assert _all_hooks(model.model) == []
    assert any("Behaviour-only mode" in n for n in summary["notes"])
    impact = _table(summary, "impact")
    assert len(impact) == 3 and all(re.fullmatch(r"head\.\d\.\d", c) for c in impact)
    tokens = build_task("induction", model, n=16, seed=0).clean
    hf = model.model
    d_head = model.cfg.d_head

    def repeat_loss(edit=None):
        handle = None
        if edit is not None:
            layer, head = edit
            dense = hf.gpt_neox.layers[layer].attention.dense
            handle = dense.register_forward_pre_hook(lambda m, args: (write(args[0], head),))
        try:
            with torch.no_grad():
                logits = hf(tokens).logits
        finally:
            if handle is not None:
                handle.remove()
        return F.cross_entropy(
            logits[:, 11:20].reshape(-1, logits.shape[-1]), tokens[:, 12:21].reshape(-1)
        ).item()

    means = {}

    def write(z, head):
        z = z.clone()
        z[..., head * d_head : (head + 1) * d_head] = means["z"][
            ..., head * d_head : (head + 1) * d_head
        ]
        return z

    clean = repeat_loss()
    assert summary["metrics"]["clean"]["behaviour"] == pytest.approx(clean, rel=1e-5)
    for component, row in impact.items():
        layer, head = map(int, component.split(".")[1:])
        seen = {}
        dense = hf.gpt_neox.layers[layer].attention.dense
        h = dense.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0].clone()))
        with torch.no_grad():
            hf(tokens)
        h.remove()
        means["z"] = seen["z"].double().mean((0, 1)).float()
        expected = repeat_loss((layer, head)) - clean  # a loss: positive drop = worse
        assert row["behaviour_drop"] == pytest.approx(expected, rel=1e-4, abs=1e-5), component
    assert _all_hooks(hf) == []


def test_ioi_patching_on_a_small_neox(tmp_path):
    """The SmolLM2 IOI config on a 2-layer GPT-NeoX with random weights and a small BPE
    tokenizer: patching from the corrupted prompt, logit difference and localize_circuit.
    The behaviour drops are checked against plain torch hooks on the attention / MLP
    outputs."""
    from hookscope.data import ioi

    import builders

    folder = tmp_path / "neox"
    builders.tiny_neox(0).save_pretrained(folder)
    tok = builders.make_tokenizer()
    tok.save_pretrained(folder)
    overrides = [
        f"extraction.model={folder}",
        'extraction.sites=["attn_out.*", "mlp_out.*", "resid_post.1"]',
        'action.params.readouts=["resid_post.1"]',
        "dataset.n=24",
        "action.params.localize_n=8",
        "action.params.top_k=4",
        *FAST,
    ]
    models = []

    def load_model(name, device="cpu"):
        models.append(real_load(name, device))
        return models[-1]

    real_load = context_module.load_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(context_module, "load_model", load_model)
        summary = ex.run(
            CONFIGS / "circuit_localization_smollm2.yaml",
            overrides,
            out=tmp_path / "run",
            progress=False,
        ).summary
    hf = models[0].model
    assert _all_hooks(hf) == []
    assert summary["metrics"]["intervention"] == "patched from the corrupted input"
    assert summary["metrics"]["circuit"]["metric"] == "logit_diff"
    assert {t["name"] for t in summary["tables"]} == {"ranking", "impact", "circuit"}
    pairs = ioi(tok, 24, seed=0)

    def encode(texts):
        ids = [tok(t)["input_ids"] for t in texts]
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return (
            torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
            torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
            torch.tensor([len(r) - 1 for r in ids]),
        )

    clean_ids, mask, last = encode(pairs["clean"])
    bad_ids, _, _ = encode(pairs["corrupted"])
    rows = torch.arange(len(pairs))
    correct, incorrect = torch.tensor(pairs["correct"]), torch.tensor(pairs["incorrect"])

    def logit_diff(module=None):
        handle = None
        if module is not None:
            got = {}
            h = module.register_forward_hook(lambda m, i, o: got.setdefault("o", o.clone()))
            with torch.no_grad():
                hf(input_ids=bad_ids, attention_mask=mask)
            h.remove()
            handle = module.register_forward_hook(lambda m, i, o: got["o"])
        try:
            with torch.no_grad():
                logits = hf(input_ids=clean_ids, attention_mask=mask).logits[rows, last]
        finally:
            if handle is not None:
                handle.remove()
        return (logits[rows, correct] - logits[rows, incorrect]).double().mean().item()

    clean = logit_diff()
    assert summary["metrics"]["clean"]["behaviour"] == pytest.approx(clean, rel=1e-4, abs=1e-6)
    for component, row in _table(summary, "impact").items():
        kind, layer = component.split(".")
        block = hf.gpt_neox.layers[int(layer)]
        module = block.attention.dense if kind == "attn_out" else block.mlp.dense_4h_to_h
        assert row["behaviour_drop"] == pytest.approx(
            clean - logit_diff(module), rel=1e-4, abs=1e-6
        ), component
