"""hs.Tracker around real training loops: values against hookscope.analysis.dimensionality on
independently captured activations, planted jumps found at their training step, checkpoints
bitwise equal to the model's state, hooks gone after close/errors/interrupts."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hookscope as hs
from hookscope.analysis.dimensionality import dimensionality_report
from hookscope.analysis.jumps import jump_report
from hookscope.data.digits import digits_tensors
from hookscope.errors import HookError, HookscopeError, InputError
from hookscope.tracking import Checkpoints, OnlineJumps, plan_checkpoints
from hookscope.zoo.shipped import build_module
from hookscope.zoo.train_digits import RECIPES

METRICS4 = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")


@pytest.fixture(scope="module")
def digits():
    X, y = digits_tensors("train")
    _, _, V = torch.linalg.svd(X.flatten(1), full_matrices=False)
    rank1 = (X.flatten(1) @ (V[:1].T @ V[:1])).reshape(X.shape)
    return X, y, rank1


def _model(kind: str = "mlp", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_module(RECIPES[kind].build)


def _batch(step: int, n: int = 1280, size: int = 64) -> slice:
    start = (step * size) % n
    return slice(start, start + size)


def _train(model, tracker, X, y, steps, switch=None, lr=3e-3, after_step=None):
    """AdamW training; inputs are X_low before step ``switch`` (data switch), X after."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    X_full, X_low = X if isinstance(X, tuple) else (X, X)
    with tracker:
        for step in range(steps):
            src = X_low if switch is not None and step < switch else X_full
            rows = _batch(step)
            loss = F.cross_entropy(model(src[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tracker.log(step, loss=loss)
            if after_step is not None:
                after_step(step)
    return tracker


def _hooks_left(module: nn.Module) -> int:
    """Torch hooks and replaced ``forward`` methods (the tracker's recorders) on ``module``."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + ("forward" in m.__dict__)
        for m in module.modules()
    )


# ------------------------------------------------------------------------- values


@pytest.mark.parametrize("background", ["process", "thread", False])
def test_metrics_equal_dimensionality_on_the_training_forward(digits, background):
    X, y, _ = digits
    model = _model("mlp")
    relus = [m for m in model if isinstance(m, nn.ReLU)]
    seen: dict[int, list[torch.Tensor]] = {}
    step_now = [0]
    refs = [
        r.register_forward_hook(
            lambda mod, a, out, i=i: seen.setdefault(step_now[0], [None, None]).__setitem__(
                i, out.detach().clone()
            )
        )
        for i, r in enumerate(relus)
    ]
    tracker = hs.Tracker(model, every=3, metrics=METRICS4, jumps=False, background=background)

    def next_step(step):
        step_now[0] = step + 1

    _train(model, tracker, X, y, 31, after_step=next_step)
    for r in refs:
        r.remove()
    frame = tracker.results()
    assert sorted(frame["step"].unique()) == list(range(0, 31, 3))
    assert list(frame["site"].unique()) == ["neuron.0", "neuron.1"]
    for step in (0, 15, 30):
        for i, site in enumerate(["neuron.0", "neuron.1"]):
            ref = dimensionality_report(seen[step][i]).metrics()
            got = frame[(frame.step == step) & (frame.site == site)].set_index("metric")["value"]
            for metric in METRICS4:
                assert got[metric] == pytest.approx(ref[metric], rel=1e-9), (step, site, metric)
    losses = frame.groupby("step")["loss"].first()
    assert np.isfinite(losses).all() and losses.iloc[0] > losses.iloc[-1]


def test_two_metrics_take_the_trace_path_and_still_equal_the_report(digits):
    X, y, _ = digits
    model = _model("mlp")
    tracker = hs.Tracker(
        model, every=1, metrics=("stable_rank", "participation_ratio"), inputs=X[:200], jumps=False
    )
    _train(model, tracker, X, y, 5)
    model.eval()
    with torch.no_grad():
        hidden = model[2](model[1](model[0](X[:200])))
    ref = dimensionality_report(hidden).metrics()
    last = tracker.results().query("step == 4 and site == 'neuron.0'").set_index("metric")["value"]
    assert last["stable_rank"] == pytest.approx(ref["stable_rank"], rel=1e-7)
    assert last["participation_ratio"] == pytest.approx(ref["participation_ratio"], rel=1e-9)


@pytest.mark.parametrize(
    "conv, reshape",
    [
        ("flatten", lambda t: t.flatten(1)),
        ("channels", lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])),
        ("mean", lambda t: t.mean(dim=(2, 3))),
    ],
)
def test_cnn_probe_batch_follows_the_conv_convention(digits, conv, reshape):
    X, y, _ = digits
    model = _model("cnn")
    model.train()
    tracker = hs.Tracker(model, inputs=X[:96], every=2, conv=conv, jumps=False)
    _train(model, tracker, X, y, 3)
    assert model.training  # the probe forward's eval mode was undone
    assert _hooks_left(model) == 0
    model.eval()
    with torch.no_grad():
        maps = model[1](model[0](X[:96]))  # conv -> ReLU: neuron.0 [96, 16, 8, 8]
    ref = dimensionality_report(reshape(maps)).metrics()
    got = tracker.results().query("step == 2 and site == 'neuron.0'").set_index("metric")["value"]
    for metric in METRICS4:
        assert got[metric] == pytest.approx(ref[metric], rel=1e-9)


def test_a_language_model_probe_batch_with_padding(tmp_path):
    model = hs.zoo.load("tiny-induction")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.model.config.vocab_size, (6, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    tracker = hs.Tracker(model, inputs={"input_ids": ids, "attention_mask": mask}, jumps=False)
    assert tracker.names == ["resid_post.0", "resid_post.1"]
    with tracker:
        tracker.log(0)
    _, cache = model.run_with_cache(
        {"input_ids": ids, "attention_mask": mask}, names="resid_post.1"
    )
    rows = cache["resid_post.1"][mask.bool()]
    assert rows.shape[0] == 6 * 12 - 4
    ref = dimensionality_report(rows).metrics()
    got = tracker.results().query("site == 'resid_post.1'").set_index("metric")["value"]
    for metric in METRICS4:
        assert got[metric] == pytest.approx(ref[metric], rel=1e-9)


def test_grad_norms_are_measured_per_group(digits):
    X, y, _ = digits
    model = _model("mlp")
    norms = {}

    def remember(step):
        grads = [p.grad.flatten() for p in model.parameters()]
        norms[step] = float(torch.linalg.vector_norm(torch.cat(grads)))

    tracker = hs.Tracker(model, every=2, jumps=False, grad_norms=True)
    _train(model, tracker, X, y, 5, after_step=remember)
    frame = tracker.results().groupby("step")["grad_norm"].first()
    for step in (0, 2, 4):
        assert frame[step] == pytest.approx(norms[step], rel=1e-6)
    groups = tracker.grad_norm_table()
    assert set(groups.columns) == {"step", "1", "3", "5"}  # the three Linear layers
    total = np.sqrt((groups[["1", "3", "5"]] ** 2).sum(axis=1))
    np.testing.assert_allclose(total, frame.to_numpy(), rtol=1e-9)


# ------------------------------------------------------------------------- jumps


@pytest.mark.parametrize("every", [1, 5])
def test_a_data_switch_is_one_jump_at_its_training_step(digits, every):
    """Inputs switch from a rank-1 projection of the digits to the digits at step 153."""
    X, y, rank1 = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=every)
    _train(model, tracker, (X, rank1), y, 300, switch=153)
    found = tracker.jump_table()
    assert len(found), "the planted switch was not found"
    first_logged = 153 + (-153) % every
    # every layer jumps at the first logged step on the new data; the deeper layer's
    # participation ratio and stable rank keep moving for a few steps (they jump at 160):
    # nothing is found before the switch or long after it
    at_switch = found[found["step"] == first_logged]
    assert set(at_switch["site"]) == {"neuron.0", "neuron.1"}, found
    assert set(at_switch.query("site == 'neuron.0'")["metric"]) >= {"nuclear_norm_ratio"}
    assert found["step"].between(153, 163).all(), found
    # each series holds at most one jump: a level shift is not flagged over and over
    assert not found.duplicated(["site", "metric"]).any()
    assert (found["confirmed_at"] > found["step"]).all()
    assert set(found["site"]) == {"neuron.0", "neuron.1"}


def test_a_smooth_run_has_no_jumps(digits):
    X, y, _ = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=1)
    _train(model, tracker, X, y, 300)
    assert tracker.jumps() == []


def test_online_detection_agrees_with_the_offline_causal_detector():
    rng = np.random.default_rng(3)
    values = rng.standard_normal((3, 400))
    values[0, 150:] += 10
    values[2, 90:] -= 12
    values[2, 300:] += 9
    steps = 100 + 5 * np.arange(400)
    online = OnlineJumps([("a", "m"), ("b", "m"), ("c", "m")])
    found = []
    for i in range(400):
        found += online.push(steps[i], values[:, i])
    found += online.finish()
    for s, name in enumerate("abc"):
        offline = [j.step for j in jump_report(values[s], steps, causal=True).jumps]
        assert sorted(j.step for j in found if j.site == name) == offline
    assert sorted(j.step for j in found) == [550, 850, 1600]


def test_an_integer_metric_is_not_flagged_for_one_unit_flickers():
    values = np.full(200, 7.0)
    values[[40, 41, 90, 130, 131, 132]] = 8.0  # back and forth by one component
    values[160:] = 12.0  # a real move of 5 components
    online = OnlineJumps([("neuron.0", "energy_rank")])
    found = [j for i in range(200) for j in online.push(i, values[i : i + 1])]
    found += online.finish()
    assert [(j.step, j.direction) for j in found] == [(160, "up")]


# ------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("buffer", ["memory", "disk"])
def test_checkpoints_around_a_jump_equal_the_model_state_bitwise(digits, tmp_path, buffer):
    X, y, rank1 = digits
    model = _model("mlp")
    states: dict[int, dict[str, torch.Tensor]] = {}

    def remember(step):
        states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    tracker = hs.Tracker(
        model,
        every=5,
        checkpoints=tmp_path / "ckpt",
        keep_around_jumps=(10, 10),
        buffer=buffer,
    )
    assert tracker.buffer_bytes == tracker.ring.size * sum(
        v.numel() * v.element_size() for v in model.state_dict().values()
    )
    _train(model, tracker, (X, rank1), y, 300, switch=153, after_step=remember)
    ck = tracker.checkpoints()
    jump_steps = sorted({int(s) for s in tracker.jump_table()["step"]})
    assert jump_steps[0] == 155
    for j in jump_steps:
        for s in range(max(0, j - 10), j + 11, 5):
            assert s in ck.steps
    assert 145 in ck.steps  # the last logged state before the switch, from the ring buffer
    for step in ck.steps:
        saved = ck.state(step)
        assert saved.keys() == states[step].keys()
        for k in saved:
            assert torch.equal(saved[k], states[step][k]), (step, k)
    loaded = ck.load(145, model)
    assert loaded is not model
    assert torch.equal(loaded[1].weight, states[145]["1.weight"])
    index = json.loads((tmp_path / "ckpt" / "index.json").read_text())
    assert index["format"] == "hookscope.tracking.checkpoints" and index["version"] == 1
    assert index["buffer"]["bytes"] == tracker.buffer_bytes
    reopened = Checkpoints(tmp_path / "ckpt")
    assert reopened.steps == ck.steps and len(reopened.jumps()) == len(tracker.jumps())
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_a_damaged_checkpoint_is_refused(digits, tmp_path):
    X, y, rank1 = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=5, checkpoints=tmp_path / "ck", save_steps=[20])
    _train(model, tracker, X, y, 25)
    ck = tracker.checkpoints()
    assert ck.steps == [20]
    path = tmp_path / "ck" / ck.to_pandas()["file"][0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256"):
        ck.state(20)


def test_planned_checkpoints_replay_the_same_states(digits, tmp_path):
    X, y, rank1 = digits
    first = _model("mlp", seed=1)
    tracker = hs.Tracker(first, every=5)
    _train(first, tracker, (X, rank1), y, 300, switch=153)
    plan = plan_checkpoints(tracker.jump_table(), n_steps=300, n=1, window=(5, 5), every=5)
    assert plan == [150, 155, 160]
    replay = _model("mlp", seed=1)
    states = {}

    def remember(step):
        if step in plan:
            states[step] = {k: v.clone() for k, v in replay.state_dict().items()}

    again = hs.Tracker(replay, every=5, jumps=False, checkpoints=tmp_path / "plan", save_steps=plan)
    _train(replay, again, (X, rank1), y, 300, switch=153, after_step=remember)
    ck = again.checkpoints()
    assert ck.steps == plan
    for step in plan:
        for k, v in ck.state(step).items():
            assert torch.equal(v, states[step][k])


def test_plan_checkpoints_picks_one_jump_per_phase():
    import pandas as pd

    jumps = pd.DataFrame(
        {"step": [5, 8, 300, 320, 900, 950], "magnitude": [1.0, 3.0, 2.0, 0.5, 0.1, 4.0]}
    )
    assert plan_checkpoints(jumps, n_steps=1000, n=3, window=(1, 1)) == [
        7,
        8,
        9,
        299,
        300,
        301,
        949,
        950,
        951,
    ]
    with pytest.raises(InputError, match="before, after"):
        plan_checkpoints(jumps, n_steps=1000, window=10)


# ------------------------------------------------------------------------- hygiene


def test_hooks_are_removed_after_close_an_error_and_an_interrupt(digits):
    X, y, _ = digits
    model = _model("mlp")
    before = model(X[:8]).detach()
    tracker = hs.Tracker(model)
    with tracker:
        assert _hooks_left(model) > 0
        model(X[:8])
        tracker.log(0)
    assert _hooks_left(model) == 0
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        t = hs.Tracker(model)
        with pytest.raises(type(exc)):
            with t:
                model(X[:8])
                t.log(0)
                raise exc
        assert _hooks_left(model) == 0
        assert len(t.results()) == 2 * 4  # the measured step is kept
    assert torch.equal(model(X[:8]).detach(), before)


def test_no_autograd_graph_is_kept(digits):
    X, y, _ = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, background=False, jumps=False)
    with tracker:
        loss = F.cross_entropy(model(X[:64]), y[:64])
        recorded = dict(tracker._run.acts)
        loss.backward()
        tracker.log(0, loss=loss)
    assert recorded and all(not t.requires_grad and t.grad_fn is None for t in recorded.values())


def test_a_copy_of_the_model_made_during_tracking_is_not_recorded(digits):
    X, y, _ = digits
    model = _model("mlp")
    relus = [m for m in model if isinstance(m, nn.ReLU)]
    tracker = hs.Tracker(model, background=False, jumps=False)
    with tracker:
        twin = copy.deepcopy(model)  # e.g. an inner-loop copy trained alongside
        model(X[:64])
        twin(X[64:128]).sum().backward()  # with gradients, in the tracker's thread
        tracker.log(0)
        assert _hooks_left(model) > 0
    assert _hooks_left(twin) == 0 or all(
        not m.__dict__["forward"].active for m in twin.modules() if "forward" in m.__dict__
    )
    expected = dimensionality_report(relus[0](model[1](model[0](X[:64]))).detach()).metrics()
    got = tracker.results().query("site == 'neuron.0'").set_index("metric")["value"]
    assert got["stable_rank"] == pytest.approx(expected["stable_rank"], rel=1e-9)


def test_a_model_saved_whole_during_tracking_loads_without_the_recorders(digits, tmp_path):
    X, y, _ = digits
    model = _model("mlp")
    with hs.Tracker(model, jumps=False) as tracker:
        model(X[:64]).sum().backward()  # the recorders are on (step 0 is due)
        torch.save(model, tmp_path / "whole.pt")
        tracker.log(0)
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(loaded(X[:8]), model(X[:8]))
    assert all(
        not m.__dict__["forward"].active for m in loaded.modules() if "forward" in m.__dict__
    )


def test_a_forward_hook_on_a_tracked_module_is_part_of_what_is_measured(digits):
    X, y, _ = digits
    model = _model("mlp")
    relu = next(m for m in model if isinstance(m, nn.ReLU))
    mask = torch.zeros(64)
    mask[:8] = 1
    user = relu.register_forward_hook(lambda m, i, out: out * mask)  # e.g. pruning
    try:
        with hs.Tracker(model, sites=["neuron.0"], jumps=False, background=False) as tracker:
            model(X[:64]).sum().backward()
            tracker.log(0)
        masked = relu(model[1](model[0](X[:64]))).detach()  # the user's hook applies
    finally:
        user.remove()
    got = tracker.results().set_index("metric")["value"]
    expected = dimensionality_report(masked).metrics()
    assert got["participation_ratio"] == pytest.approx(expected["participation_ratio"], rel=1e-9)
    assert expected["participation_ratio"] < 8.5  # 8 units left, not the unmasked 64


def test_a_worker_error_reaches_the_training_loop(digits):
    X, y, _ = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, jumps=False)
    with pytest.raises(HookscopeError, match=r"step 1, neuron\.0.*non-finite"):
        with tracker:
            model(X[:64])
            tracker.log(0)
            model(torch.full_like(X[:64], float("nan")))
            tracker.log(1)
            tracker.flush()
    assert _hooks_left(model) == 0


def test_log_without_the_with_block_and_bad_arguments_are_named(digits):
    X, y, _ = digits
    model = _model("mlp")
    with pytest.raises(HookError, match="with tracker"):
        hs.Tracker(model).log(0)
    with pytest.raises(InputError, match="participation_ratio"):
        hs.Tracker(model, metrics=("participation",))
    with pytest.raises(InputError, match="flatten, channels, mean"):
        hs.Tracker(model, conv="pixels")
    with pytest.raises(InputError, match="positive int"):
        hs.Tracker(model, every=0)
    with pytest.raises(InputError, match="whole layer: use neuron.0"):
        hs.Tracker(model, sites="neuron.0.3")
    with pytest.raises(InputError, match="needs checkpoints"):
        hs.Tracker(model, save_steps=[3])
    tracker = hs.Tracker(model, background=False)
    with tracker:
        model(X[:8])
        tracker.log(0)
        with pytest.raises(InputError, match="steps must increase"):
            tracker.log(0)
    with pytest.raises(InputError, match="not tracked; tracked: neuron.0, neuron.1"):
        tracker.jumps(site="neuron.2")
    assert _hooks_left(model) == 0


def test_logging_only_due_steps_measures_them_and_eval_passes_are_ignored(digits):
    X, y, _ = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=5, jumps=False, background=False, sites="neuron.0")
    seen = {}
    with tracker:
        for step in range(21):
            with torch.no_grad():  # the reference (not recorded: no graph)
                seen[step] = model[2](model[1](model[0](X[_batch(step)])))
            model(X[_batch(step)])
            with torch.no_grad():
                model(X[:16] * 0.01)  # an evaluation pass before log() is not measured
            if step % 5 == 0:
                tracker.log(step)
    frame = tracker.results()
    assert sorted(frame["step"].unique()) == [0, 5, 10, 15, 20]
    got = frame.query("step == 15").set_index("metric")["value"]
    ref = dimensionality_report(seen[15]).metrics()
    assert got["stable_rank"] == pytest.approx(ref["stable_rank"], rel=1e-9)


def test_force_with_the_training_forward_needs_arm(digits):
    X, y, _ = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=10, jumps=False, background=False)
    with tracker:
        for step in range(12):
            if step == 3:
                tracker.arm()
            model(X[_batch(step)])
            tracker.log(step, force=step == 3)
        model(X[:64])
        with pytest.warns(UserWarning, match="tracker.arm"):
            tracker.log(12, force=True)
    assert sorted(tracker.results()["step"].unique()) == [0, 3, 10]


def test_checkpoint_folders_resume_refuse_and_start_empty(digits, tmp_path):
    X, y, _ = digits
    folder = tmp_path / "ck"
    for seed in (0, 1):  # a rerun into the same folder replaces the states it saves
        model = _model("mlp", seed=seed)
        tracker = hs.Tracker(model, every=2, jumps=False, checkpoints=folder, save_steps=[3])
        assert tracker.checkpoints().steps == ([] if seed == 0 else [3])
        at3 = {}
        _train(
            model,
            tracker,
            X,
            y,
            5,
            after_step=lambda s: at3.update(w=model[1].weight.clone()) if s == 3 else None,
        )
        assert torch.equal(tracker.checkpoints().state(3)["1.weight"], at3["w"])
    from hookscope.tracking.checkpoints import CheckpointFolder

    with pytest.raises(InputError, match="checkpoints of a Sequential"):
        CheckpointFolder(folder, nn.Linear(3, 3), {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        hs.Tracker(_model("mlp"), checkpoints=tmp_path / "file")
    model = _model("mlp")
    tracker = hs.Tracker(model, checkpoints=tmp_path / "moved", jumps=False)
    model.double()
    with pytest.raises(InputError, match="dtypes after the Tracker was built"):
        with tracker:
            model(X[:8].double())
            tracker.log(0)


# ------------------------------------------------------------------------- outputs


def test_views_exports_plots_and_tensorboard(digits, tmp_path):
    X, y, rank1 = digits
    model = hs.HookedModel.wrap(_model("mlp"))
    tracker = hs.Tracker(model, every=2, tensorboard=tmp_path / "tb")
    _train(model.model, tracker, (X, rank1), y, 200, switch=101)
    view = tracker.get_results()
    assert list(view) == ["neuron.0", "neuron.1"]
    cols = ["step", "stable_rank", "participation_ratio", "cumulative_90", "nuclear_norm_ratio"]
    assert cols == list(view["neuron.0"].columns[:5])
    long = tracker.results().query("site == 'neuron.0' and metric == 'energy_rank'")
    np.testing.assert_array_equal(view["neuron.0"]["cumulative_90"], long["value"])
    for suffix in ("parquet", "csv", "json", "h5"):
        path = tracker.export(tmp_path / f"run.{suffix}")
        back = hs.tracking.load_run(path)
        np.testing.assert_array_equal(back.results["value"], tracker.results()["value"])
        assert back.meta["every"] == 2 and back.meta["sites"] == ["neuron.0", "neuron.1"]
        assert len(back.jumps) == len(tracker.jumps())
    assert tracker.plot().axes and tracker.plot("heatmap").axes
    with pytest.raises(InputError, match="'lines' or 'heatmap'"):
        tracker.plot("bars")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "stable_rank/neuron.0" in tags and "loss" in tags
    sr = acc.Scalars("stable_rank/neuron.0")
    assert [e.step for e in sr] == list(range(0, 200, 2))
    assert sr[5].value == pytest.approx(
        tracker.results()
        .query("step == 10 and site == 'neuron.0' and metric == 'stable_rank'")["value"]
        .item(),
        rel=1e-6,
    )
    jump_tags = {t for t in tags if t.startswith("jumps/")}
    assert jump_tags == {f"jumps/{j.metric}/{j.site}" for j in tracker.jumps()}
    assert "Tracker(2 sites" in repr(tracker)
    assert not math.isnan(tracker.results()["loss"].iloc[0])


def test_detector_settings_and_a_loaded_copy_are_checked(digits, tmp_path):
    X, y, _ = digits
    model = _model("mlp")
    with pytest.raises(HookscopeError, match="threshold"):
        hs.Tracker(model, jump_options={"threshold": -1})
    with pytest.raises(HookscopeError, match="scales"):
        hs.Tracker(model, jump_options={"scales": 4})
    with pytest.raises(HookscopeError, match="unknown jump detector option"):
        hs.Tracker(model, jump_options={"treshold": 4})
    tracker = hs.Tracker(model, checkpoints=tmp_path / "ck", save_steps=[0], jumps=False)
    with tracker:
        model(X[:8])
        tracker.log(0)
        twin = tracker.checkpoints().load(0, model)  # copied while the hooks are on
    assert _hooks_left(model) == 0 and _hooks_left(twin) == 0


def test_a_killed_worker_process_is_an_error_not_a_hang(digits):
    import os
    import signal

    X, y, _ = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, jumps=False, background="process")
    with pytest.raises(HookError, match="worker process ended unexpectedly"):
        with tracker:
            for step in range(3):
                model(X[:64])
                tracker.log(step)
            tracker.flush()
            os.kill(tracker._worker.proc.pid, signal.SIGKILL)
            tracker._worker.proc.join()
            for step in range(3, 6):
                model(X[:64])
                tracker.log(step)
    assert sorted(tracker.results()["step"]) == [0] * 8 + [1] * 8 + [2] * 8
    assert _hooks_left(model) == 0
    assert not tracker._worker.proc.is_alive()


def test_an_unknown_background_is_named(digits):
    with pytest.raises(InputError, match="process, thread, inline"):
        hs.Tracker(_model("mlp"), background="gpu")


def test_saved_states_feed_the_checkpoint_analyses(digits, tmp_path):
    from hookscope.tracking.analysis import gradient_flow, subspace_evolution

    X, y, _ = digits
    model = _model("mlp")
    tracker = hs.Tracker(
        model, every=5, jumps=False, checkpoints=tmp_path / "ck", save_steps=[0, 10, 20]
    )
    _train(model, tracker, X, y, 21)
    ck = tracker.checkpoints()
    acts = ck.activations(model, X[:100], "neuron.1")
    assert sorted(acts) == [0, 10, 20]
    twin = _model("mlp")
    twin.load_state_dict(ck.state(10))
    twin.eval()
    with torch.no_grad():
        ref = twin[4](twin[3](twin[2](twin[1](twin[0](X[:100])))))
    np.testing.assert_array_equal(acts[10], ref.numpy())
    evo = subspace_evolution(acts, k=3)
    assert len(evo.to_pandas())
    flow = gradient_flow(
        _model("mlp"), ck.states(), (X[:64], y[:64]), lambda m, b: F.cross_entropy(m(b[0]), b[1])
    )
    assert set(flow.to_pandas()["step"]) == {0, 10, 20}
    with pytest.raises(InputError, match="takes one layer"):
        ck.activations(model, X[:10], "neuron.*")
