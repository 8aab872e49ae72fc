"""localize_circuit: planted circuits with exact answers, the tiny-induction model card's
circuit, set scores re-derived through an independent code path (knockout), and errors."""

import json
from pathlib import Path

import pytest
import torch
from test_toy_logic import CLEAN, CORRUPTED, SITES, gate_net

import hookscope as hs
from hookscope import interventions as iv
from hookscope.errors import HookscopeError

CARD_INDUCTION = {"head.1.0", "head.1.1", "head.1.2", "head.1.3"}
CARD_PREVIOUS = "head.0.3"


def _gate(name, net=None, **kwargs):
    model = hs.HookedModel.wrap(net if net is not None else gate_net(name))
    return iv.localize_circuit(
        model, CLEAN, CORRUPTED, iv.logit(0, position=None), sites=SITES, progress=False, **kwargs
    )


@pytest.mark.parametrize("method", ["attribution", "exact"])
def test_planted_gates(method):
    """AND needs both inputs to restore anything; OR either one; noising flips the roles;
    a + 3b: b alone restores exactly 3/4."""
    res = _gate("and", method=method)
    assert sorted(map(str, res.addresses)) == SITES and res.score == pytest.approx(1.0)
    assert res.curve == pytest.approx([0.0, 1.0]) and res.reached

    res = _gate("or", method=method)
    assert len(res.components) == 1 and res.score == pytest.approx(1.0)
    res = _gate("or", method=method, direction="noise")  # OR survives losing one input
    assert sorted(map(str, res.addresses)) == SITES and res.curve == pytest.approx([0.0, 1.0])
    res = _gate("and", method=method, direction="noise")  # AND dies with either input
    assert len(res.components) == 1 and res.score == pytest.approx(1.0)

    res = _gate("sum", method=method)
    assert [str(c[0]) for c in res.ranking] == SITES[::-1]
    assert res.curve == pytest.approx([0.75, 1.0])
    assert [str(a) for a in res.addresses] == SITES[::-1]  # 0.75 < 0.8: both needed
    res = _gate("sum", method=method, threshold=0.7)
    assert [str(a) for a in res.addresses] == ["neuron.0.1"] and res.score == pytest.approx(0.75)


def test_unreached_threshold_is_reported():
    res = _gate("sum", candidates=1, method="exact")
    assert not res.reached and [str(a) for a in res.addresses] == ["neuron.0.1"]
    assert "does NOT reach" in repr(res)


@pytest.fixture(scope="module")
def induction():
    model = hs.zoo.load("tiny-induction")
    task = iv.build_task("induction", model, n=24, seed=3)
    res = iv.localize_circuit(
        model, task.clean, task.corrupted, task.metric, sites=task.sites,
        direction=task.direction, criterion=task.criterion, progress=False,
    )  # fmt: skip
    return model, task, res


def test_tiny_induction_circuit_matches_the_model_card(induction):
    model, task, res = induction
    card = json.loads(
        (Path(hs.zoo.__file__).parent / "weights/tiny-induction/card.json").read_text()
    )
    assert set(card["metrics"]["induction_heads"]) == CARD_INDUCTION
    assert card["metrics"]["previous_token_heads"] == [CARD_PREVIOUS]
    found = {str(a) for a in res.addresses}
    assert CARD_PREVIOUS in found
    assert len(found & CARD_INDUCTION) >= 2
    assert found <= CARD_INDUCTION | {CARD_PREVIOUS}  # nothing else, control head 0.1 included
    assert res.reached and res.score >= 0.8
    assert res.faithfulness.faithfulness > 0.75
    # the previous-token head is what the noising screen ranks first
    assert str(res.ranking[0][0]) == CARD_PREVIOUS


def test_set_scores_match_an_independent_knockout(induction):
    """The faithfulness criterion keeps a set and patches every other head with its
    corrupted value in the clean run; knockout(method="corrupted") computes the same run
    through ablation.py's own hooks. Convert its raw value to the same fraction."""
    model, task, res = induction
    clean_m, corrupted_m = res.baselines["clean"], res.baselines["corrupted"]
    for n in (1, 3, len(res.ranking)):
        keep = [a for a, _ in res.ranking[:n]]
        knock = iv.knockout(model, task.clean, "head.*.*", task.metric, keep=keep,
                            method="corrupted", reference=task.corrupted)  # fmt: skip
        fraction = (knock.value - corrupted_m) / (clean_m - corrupted_m)
        assert res.curve[n - 1] == pytest.approx(fraction, abs=1e-5)
    # minimality: dropping any member of the circuit falls below the threshold
    for member in res.components:
        keep = [a for a, _ in res.components if (a, _) != member]
        knock = iv.knockout(model, task.clean, "head.*.*", task.metric, keep=keep,
                            method="corrupted", reference=task.corrupted)  # fmt: skip
        assert (knock.value - corrupted_m) / (clean_m - corrupted_m) < res.threshold


def test_confirmed_scores_are_exact_patching(induction):
    model, task, res = induction
    exact = iv.activation_patching(model, task.clean, task.corrupted, task.metric,
                                   sites="head.*.*", direction="noise", progress=False)  # fmt: skip
    by_job = dict(zip(exact.jobs, exact.flat.tolist(), strict=True))
    for job, score in zip(res.confirmed.jobs, res.confirmed.flat.tolist(), strict=True):
        assert score == pytest.approx(by_job[job], abs=1e-6)


def test_outputs(induction):
    _, _, res = induction
    data = json.loads(json.dumps(res.to_dict()))
    assert data["circuit"] == [str(a) for a in res.addresses]
    assert data["screen"]["shape"] == [2, 4] and len(data["candidates"]) == 8
    df = res.to_pandas()
    assert df["in_circuit"].sum() == len(res.components)
    assert df["rank"].tolist() == list(range(1, 9))
    text = repr(res)
    assert "faithfulness" in text and CARD_PREVIOUS in text
    from matplotlib.figure import Figure

    assert isinstance(res.plot(), Figure)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="gradient"), "method must be one of attribution, exact"),
        (dict(criterion="sufficiency"), "criterion must be one of patch, faithfulness"),
        (dict(threshold=1.5), r"threshold must be in \(0, 1\]"),
        (dict(candidates=0), "candidates must be an int >= 1"),
        (dict(direction="both"), "direction must be one of denoise, noise"),
        (dict(ablation="shuffle"), "shuffle"),
    ],
)
def test_errors(kwargs, message):
    net = gate_net("or")
    with pytest.raises(HookscopeError, match=message):
        _gate("or", net=net, **kwargs)
    for module in net.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_build_task_errors():
    model = hs.zoo.load("tiny-induction")
    with pytest.raises(HookscopeError, match="unknown task 'copy'; choose one of induction, ioi"):
        iv.build_task("copy", model)
    with pytest.raises(HookscopeError, match="n must be >= 1"):
        iv.build_task("induction", model, n=0)
    task = iv.build_task("induction", model, n=4)
    assert (task.corrupted[:, 0] == task.clean[:, 0]).all()  # BOS kept
    assert (task.corrupted[:, 1:] != 0).all()  # never BOS elsewhere
    period = task.clean[:, 11:21] == task.clean[:, 1:11]
    assert period.all() and task.clean.shape == (4, 21)
    assert torch.is_tensor(task.clean)


@pytest.mark.optional_model
def test_smollm2_ioi_circuit_restores_the_logit_difference():
    """Real weights: the circuit localize_circuit reports for SmolLM2-135M on IOI restores
    its set score when its heads' z is patched by plain torch hooks on each layer's o_proj."""
    from hookscope.zoo import packaged

    if not packaged.installed("smollm2-135m"):
        pytest.skip("smollm2-135m is not installed (python -m hookscope.zoo install smollm2-135m)")
    model = hs.zoo.load("smollm2-135m")
    task = iv.build_task("ioi", model, n=8)
    res = iv.localize_circuit(model, task.clean, task.corrupted, task.metric, progress=False)
    assert res.reached and res.score >= 0.8 and 1 <= len(res.components) <= 20

    hf, d_head = model.model, model.cfg.d_head
    clean_z = {}

    def saver(layer):
        return lambda module, args: clean_z.__setitem__(layer, args[0].clone())

    layers = sorted({a.layer for a in res.addresses})
    projs = {layer: hf.model.layers[layer].self_attn.o_proj for layer in layers}
    handles = [projs[layer].register_forward_pre_hook(saver(layer)) for layer in layers]
    with torch.no_grad():
        hf(task.clean, use_cache=False)
    for h in handles:
        h.remove()

    def patcher(layer):
        heads = [a.head for a in res.addresses if a.layer == layer]

        def pre(module, args):
            z = args[0].clone()
            for h in heads:
                z[..., h * d_head : (h + 1) * d_head] = clean_z[layer][
                    ..., h * d_head : (h + 1) * d_head
                ]
            return (z,)

        return pre

    handles = [projs[layer].register_forward_pre_hook(patcher(layer)) for layer in layers]
    try:
        with torch.no_grad():
            patched = float(task.metric(hf(task.corrupted, use_cache=False).logits))
    finally:
        for h in handles:
            h.remove()
    b = res.baselines
    assert (patched - b["corrupted"]) / (b["clean"] - b["corrupted"]) == pytest.approx(
        res.score, abs=1e-3
    )


def test_mean_ablation_faithfulness_defaults_to_the_corrupted_reference(induction):
    model, task, res = induction
    mean = iv.localize_circuit(model, task.clean, task.corrupted, task.metric, sites=task.sites,
                               direction=task.direction, criterion=task.criterion,
                               ablation="mean", progress=False)  # fmt: skip
    expected = iv.knockout(model, task.clean, "head.*.*", task.metric, keep=mean.addresses,
                           method="mean", reference=task.corrupted)  # fmt: skip
    assert mean.faithfulness.faithfulness == pytest.approx(expected.faithfulness, abs=1e-9)
    assert mean.faithfulness.method == "mean ablation"
