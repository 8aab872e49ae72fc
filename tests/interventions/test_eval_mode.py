"""Interventions run in eval mode and give the caller's training flags back (issue 11 §6).

A digits MLP with dropout after each hidden layer, wrapped in train mode (as
``HookedModel.wrap`` leaves it), with one dropout module put in eval by the user: every
intervention must give the same scores twice, equal to those of an eval-mode copy, and
leave every submodule's flag as it was, also when it raises. The reference is the same
network in eval mode (``copy.deepcopy(...).eval()``), run through the same call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope import interventions as iv
from hookscope.data.digits import digits_tensors
from hookscope.modes import EvalMode

X, Y = digits_tensors("test")
CLEAN, CORRUPTED, REFERENCE = X[:10], X[10:20], X[40:80]
SITES = "neuron.*.*"


def metric():
    return iv.logit_diff(Y[:10], Y[10:20], position=None)


def dropout_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, 16),
        nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10),
    )  # fmt: skip
    net.train()
    net[6].eval()  # the user's own choice: this dropout stays off
    return net


def flags(net: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in net.named_modules()}


def knock(k: iv.Knockout) -> torch.Tensor:
    return torch.tensor([k.value, k.clean, k.ablated, k.faithfulness])


CALLS = {
    "activation_patching": lambda m: iv.activation_patching(
        m, CLEAN, CORRUPTED, metric(), SITES, progress=False
    ).flat,
    "attribution_patching": lambda m: iv.attribution_patching(
        m, CLEAN, CORRUPTED, metric(), SITES, progress=False
    ).flat,
    "ablate": lambda m: iv.ablate(
        m, CLEAN, SITES, "mean", reference=REFERENCE, metric=metric(), progress=False
    ).flat,
    "ablate (no metric)": lambda m: iv.ablate(
        m, CLEAN, "neuron.0.0-3", "mean", reference=REFERENCE, progress=False
    ),
    "knockout": lambda m: knock(
        iv.knockout(
            m, CLEAN, SITES, metric(), keep=["neuron.0.3", "neuron.1.2"], method="corrupted",
            reference=CORRUPTED,
        )
    ),
    "localize_circuit": lambda m: torch.tensor(
        iv.localize_circuit(
            m, CLEAN, CORRUPTED, metric(), SITES, candidates=4, progress=False
        ).curve
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CALLS))
def test_train_mode_model_gives_eval_scores_twice_and_keeps_its_flags(name):
    net = dropout_net()
    before = flags(net)
    assert before[""] and before["3"] and not before["6"]
    model = hs.HookedModel.wrap(net)
    expected = CALLS[name](hs.HookedModel.wrap(copy.deepcopy(net).eval()))
    first = CALLS[name](model)
    assert flags(net) == before
    second = CALLS[name](model)
    assert flags(net) == before
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-12)


def test_flags_come_back_when_a_call_raises_mid_sweep():
    """A plain metric that records the flags it runs under, then raises on its third call
    (after the baselines): eval inside, the caller's flags after."""
    net = dropout_net()
    before = flags(net)
    model = hs.HookedModel.wrap(net)
    seen: list[dict[str, bool]] = []

    def failing(out):
        seen.append(flags(net))
        if len(seen) == 3:
            raise RuntimeError("metric broke")
        return out[:, 0].mean()

    with pytest.raises(RuntimeError, match="metric broke"):
        iv.activation_patching(
            model, CLEAN, CORRUPTED, failing, SITES, chunk_size=1, progress=False
        )
    assert len(seen) == 3 and all(not any(f.values()) for f in seen)
    assert flags(net) == before
    seen.clear()
    with pytest.raises(RuntimeError, match="metric broke"):
        iv.ablate(model, CLEAN, SITES, metric=failing, chunk_size=1, progress=False)
    assert flags(net) == before
    # refused arguments and refused baselines leave the flags as well
    with pytest.raises(hs.InputError):
        iv.activation_patching(model, CLEAN, CORRUPTED, metric(), SITES, direction="up")
    with pytest.raises(hs.InputError, match="nan on the clean baseline"):
        iv.localize_circuit(model, CLEAN, CORRUPTED, lambda out: out.sum() * torch.nan, SITES)
    assert flags(net) == before


def test_caching_in_train_mode_is_left_alone():
    net = dropout_net()
    before = flags(net)
    model = hs.HookedModel.wrap(net)
    torch.manual_seed(1)
    _, first = model.run_with_cache(CLEAN, names=["resid_post.0"])
    _, second = model.run_with_cache(CLEAN, names=["resid_post.0"])
    assert flags(net) == before
    assert not torch.equal(first["resid_post.0"], second["resid_post.0"])  # dropout is on


class Stubborn(nn.Module):
    """A module whose ``training`` flag refuses one assignment (``refuse``: the value it
    refuses, raising ``error``), as a module with a property, or an interrupt, would."""

    def __init__(self):
        super().__init__()
        self.refuse: bool | None = None
        self.error: type[BaseException] = RuntimeError

    def __setattr__(self, name, value):
        if name == "training" and getattr(self, "refuse", None) is value:
            self.refuse = None
            raise self.error(f"refused training={value}")
        super().__setattr__(name, value)


def test_eval_mode_restores_every_flag_even_if_one_restore_fails():
    net = nn.Sequential(nn.Linear(2, 2), Stubborn(), nn.Sequential(nn.Dropout(), nn.Linear(2, 2)))
    net.train()
    net[2][1].eval()
    before = flags(net)
    with pytest.raises(KeyboardInterrupt, match="refused training=True"):
        with EvalMode(net):
            assert not any(flags(net).values())
            net[1].refuse, net[1].error = True, KeyboardInterrupt
    # the interrupted restore runs again (hookscope.scope's second pass): every flag is back,
    # the refusing module's too, and the interrupt still reaches the caller
    assert flags(net) == before
    # entering: a refusal mid-way puts back the flags already changed, then raises
    net[1].training = True
    net[1].refuse, net[1].error = False, RuntimeError
    with pytest.raises(RuntimeError, match="refused training=False"):
        with EvalMode(net):
            pytest.fail("the block must not run")
    assert flags(net) == before


def test_eval_mode_nests_and_records_before_changing():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    net.train()
    net[0].eval()
    before = flags(net)
    with EvalMode(net):
        with EvalMode(net):
            assert not any(flags(net).values())
        assert not any(flags(net).values())
    assert flags(net) == before
