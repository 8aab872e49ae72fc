"""hookscope.tracking.over_checkpoints, offline: small models built here stand in for training
checkpoints. The reference is plain torch forward hooks on the unwrapped modules, with the
activations measured by hookscope.analysis.dimensionality's single-metric functions."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.analysis.dimensionality import (
    effective_rank,
    energy_rank,
    nuclear_norm_ratio,
    participation_ratio,
    stable_rank,
)
from hookscope.errors import InputError
from hookscope.tracking.revisions import over_checkpoints, weights_sha256

import builders

SMALL_NEOX = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=128,
    max_position_embeddings=64,
)


def reference(A, metric, center=True, energy=0.9):
    return {
        "stable_rank": lambda: stable_rank(A, center=center),
        "participation_ratio": lambda: participation_ratio(A, center=center),
        "energy_rank": lambda: energy_rank(A, energy=energy, center=center),
        "nuclear_norm_ratio": lambda: nuclear_norm_ratio(A, center=center),
        "effective_rank": lambda: effective_rank(A, center=center),
    }[metric]()


def captured(
    module: nn.Module, layers: dict[str, nn.Module], x, **kwargs
) -> dict[str, torch.Tensor]:
    """Outputs of ``layers`` in one plain forward, through torch forward hooks."""
    got: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: got.__setitem__(
                name, (out[0] if isinstance(out, tuple) else out).detach()
            )
        )
        for name, m in layers.items()
    ]
    try:
        with torch.no_grad():
            module(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return got


def check_against(res, expected_acts: dict[int, dict[str, torch.Tensor]], metrics, **kw):
    df = res.to_pandas()
    assert len(df) == sum(len(v) for v in expected_acts.values()) * len(metrics)
    for step, acts in expected_acts.items():
        for site, A in acts.items():
            for metric in metrics:
                got = df[(df.step == step) & (df.site == site) & (df.metric == metric)].value
                assert len(got) == 1
                np.testing.assert_allclose(
                    float(got.iloc[0]),
                    reference(A, metric, **kw),
                    rtol=1e-9,
                    err_msg=f"{step} {site} {metric}",
                )


def mlp(step: int) -> nn.Sequential:
    torch.manual_seed(step)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 3)
    )


def cnn(step: int) -> nn.Sequential:
    torch.manual_seed(step)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)
    )


METRICS = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")


# --------------------------------------------------------------------------- (a) the values


@pytest.mark.parametrize("center", [True, False])
def test_mlp_checkpoints_match_plain_hooks(center):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    steps = [0, 1, 10, 100, 1000]
    metrics = (*METRICS, "effective_rank")
    res = over_checkpoints(mlp, steps, x, metrics=metrics, center=center, progress=False)
    expected = {}
    for s in steps:
        m = mlp(s)
        acts = captured(m, {"neuron.0": m[1], "neuron.1": m[3]}, x)
        expected[s] = acts
    check_against(res, expected, metrics, center=center)
    assert res.settings["sites"] == ["neuron.0", "neuron.1"]
    assert list(res.to_pandas().columns) == ["step", "site", "metric", "value", "loss", "grad_norm"]
    assert res.to_pandas()[["loss", "grad_norm"]].isna().all().all()
    assert res.hashes == {s: weights_sha256(mlp(s)) for s in steps}
    assert len(set(res.hashes.values())) == len(steps)
    assert set(res.sources.values()) == {"computed"}
    text = repr(res)
    assert "5 steps 0..1000" in text and "neuron.0" in text and "WARNING" not in text
    fig = res.plot()
    assert len(fig.axes) == len(metrics)
    assert fig.axes[0].get_xscale() == "symlog"  # steps 0..1000 span decades and include 0


def test_cnn_rows_are_examples_with_all_feature_axes():
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    res = over_checkpoints(cnn, [3, 4], x, energy=0.8, progress=False)
    expected = {}
    for s in (3, 4):
        m = cnn(s)
        acts = captured(m, {"neuron.0": m[1], "neuron.1": m[3]}, x)
        assert acts["neuron.0"].shape == (12, 3, 6, 6)
        expected[s] = {k: v.reshape(12, -1) for k, v in acts.items()}
    check_against(res, expected, METRICS, energy=0.8)


def test_token_model_rows_are_tokens_and_padding_is_left_out():
    def neox(step):
        return builders.pythia_like(step, **SMALL_NEOX)

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    res = over_checkpoints(neox, [0, 1], inputs, progress=False)
    assert res.settings["sites"] == ["resid_post.0", "resid_post.1"]
    expected = {}
    for s in (0, 1):
        m = neox(s)
        layers = {f"resid_post.{i}": m.gpt_neox.layers[i] for i in range(2)}
        acts = captured(m, layers, ids, attention_mask=mask, use_cache=False)
        expected[s] = {k: v[mask.bool()] for k, v in acts.items()}  # 19 token rows
        assert expected[s]["resid_post.0"].shape == (19, 32)
    check_against(res, expected, METRICS)


# --------------------------------------------------------------------------- (b) same weights


class Counter:
    """Counts forward passes of every module a loader hands out."""

    def __init__(self, build):
        self.build, self.forwards, self.loads = build, 0, 0

    def __call__(self, step):
        self.loads += 1
        m = self.build(step)
        m.register_forward_hook(lambda *a: setattr(self, "forwards", self.forwards + 1))
        return m


def test_identical_weights_warn_naming_both_steps_and_compute_once():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(3))
    seeds = {0: 0, 1000: 7, 2000: 7}  # step2000 serves step1000's weights (pythia #205/#206)
    loader = Counter(lambda s: mlp(seeds[s]))
    with pytest.warns(UserWarning, match=r"steps 1000 and 2000 have identical weights") as rec:
        res = over_checkpoints(loader, [0, 1000, 2000], x, progress=False)
    assert len([w for w in rec if "identical weights" in str(w.message)]) == 1
    assert loader.forwards == 2 and loader.loads == 3
    assert res.sources == {0: "computed", 1000: "computed", 2000: "same weights as step 1000"}
    assert res.hashes[1000] == res.hashes[2000] != res.hashes[0]
    assert res.duplicates == {2000: 1000}
    df = res.to_pandas()
    a = df[df.step == 1000].value.to_numpy()
    b = df[df.step == 2000].value.to_numpy()
    assert np.array_equal(a, b) and len(a) == 2 * len(METRICS)
    assert "step 2000 has the same weights as step 1000" in repr(res)


# --------------------------------------------------------------------------- (c) the cache


def test_cache_hit_runs_no_forward(tmp_path):
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(4))
    first = Counter(mlp)
    a = over_checkpoints(first, [0, 5, 9], x, cache_dir=tmp_path / "c", progress=False)
    assert first.forwards == 3
    assert len(list((tmp_path / "c").glob("*.json"))) == 3
    assert not list((tmp_path / "c").glob(".*"))  # no temporary files left
    again = Counter(mlp)
    b = over_checkpoints(again, [0, 5, 9], x, cache_dir=tmp_path / "c", progress=False)
    assert again.forwards == 0 and again.loads == 3
    assert set(b.sources.values()) == {"cache"}
    assert b.to_pandas().equals(a.to_pandas()) and b.hashes == a.hashes
    # other inputs or settings are other keys: computed again
    other = Counter(mlp)
    over_checkpoints(other, [0], x[:20], cache_dir=tmp_path / "c", progress=False)
    over_checkpoints(other, [0], x, center=False, cache_dir=tmp_path / "c", progress=False)
    assert other.forwards == 2


def test_a_corrupt_cache_entry_is_named(tmp_path):
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(5))
    over_checkpoints(mlp, [0], x, cache_dir=tmp_path, progress=False)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text("{}")
    with pytest.raises(InputError, match=f"cache file {entry}.*delete it"):
        over_checkpoints(mlp, [0], x, cache_dir=tmp_path, progress=False)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metrics": ("stable_rank", "stabel_rank")}, "unknown metric 'stabel_rank'.*Did you mean"),
        ({"steps": [0, 1, 0]}, "step 0 appears twice"),
        ({"steps": []}, "steps is empty"),
        ({"energy": 1.5}, "energy must be a fraction"),
        ({"inputs": object()}, "inputs is a object"),
    ],
)
def test_bad_arguments_fail_before_any_checkpoint_loads(kwargs, match):
    loader = Counter(mlp)
    call = {"steps": [0, 1], "inputs": torch.randn(5, 6), **kwargs}
    with pytest.raises(InputError, match=match):
        over_checkpoints(loader, progress=False, **call)
    assert loader.loads == 0


def test_loader_must_return_a_model():
    with pytest.raises(InputError, match=r"loader_fn\(3\) returned a str"):
        over_checkpoints(lambda s: "pythia", [3], torch.randn(4, 6), progress=False)


# --------------------------------------------------------------------------- (d) the hub path


def test_pythia_revisions_from_a_local_hub_cache(tmp_path, monkeypatch):
    """hs.zoo.load("pythia-70m", revision="stepN") from a Hugging Face hub cache laid out
    here, offline; refs/step2000 points at step1000's commit, as a wrong hub branch would."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"
    base = hub / "models--EleutherAI--pythia-70m"
    (base / "refs").mkdir(parents=True)
    commits = {0: "0" * 39 + "a", 1000: "0" * 39 + "b"}
    folders = {}
    for seed, (step, commit) in enumerate(commits.items()):
        folders[step] = tmp_path / f"model{step}"
        builders.pythia_like(seed, **SMALL_NEOX).save_pretrained(folders[step])
        shutil.copytree(folders[step], base / "snapshots" / commit)
        (base / "refs" / f"step{step}").write_text(commits[step])
    (base / "refs" / "step2000").write_text(commits[1000])

    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    with pytest.warns(UserWarning, match="steps 1000 and 2000 have identical weights"):
        res = over_checkpoints(
            lambda s: hs.zoo.load("pythia-70m", revision=f"step{s}", cache_dir=str(hub)),
            [0, 1000, 2000],
            ids,
            progress=False,
        )
    from transformers import AutoModelForCausalLM

    expected = {}
    for step, folder in folders.items():
        m = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        assert res.hashes[step] == weights_sha256(m)
        layers = {f"resid_post.{i}": m.gpt_neox.layers[i] for i in range(2)}
        acts = captured(m, layers, ids, use_cache=False)
        expected[step] = {k: v.reshape(-1, 32) for k, v in acts.items()}
    df = res.to_pandas()
    check_against(type(res)(df[df.step != 2000], {}), expected, METRICS)
    assert res.hashes[0] != res.hashes[1000] == res.hashes[2000]
    assert res.sources[2000] == "same weights as step 1000"
