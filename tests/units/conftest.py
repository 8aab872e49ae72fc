"""Fixtures shared by the tests of hookscope.units: the zoo models, the digits and the small
hook helpers that several test files use."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.units import head_stats

import builders

# ------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def vit():
    return hs.zoo.load("digits-vit")


@pytest.fixture(scope="module")
def cnn():
    return hs.zoo.load("digits-cnn")


@pytest.fixture(scope="module")
def lm():
    return hs.HookedModel.wrap(builders.tiny_gpt2(), tokenizer=builders.make_tokenizer())


# --------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def digits():
    """The first 120 test digits (test_neurons and test_top_activating use their own 200)."""
    X, y = hs.data.digits("test", tensors=True)
    return X[:120], y[:120]


@pytest.fixture(scope="module")
def stats(vit, digits):
    X, y = digits
    return head_stats(vit, X, y, batch_size=50, progress=False)


@pytest.fixture(scope="module")
def X():
    return hs.data.digits("test", tensors=True)[0][:300]


# ------------------------------------------------------------------------------ helpers


def _edited(vit, edit) -> hs.HookedModel:
    module = copy.deepcopy(vit.model)
    with torch.no_grad():
        edit(module)
    return hs.HookedModel.wrap(module)


@pytest.fixture(scope="session")
def edited():
    """:func:`_edited` (a deep copy of a model's module, edited in place, wrapped)."""
    return _edited


def _hooked(module: nn.Module, run, *, pre: bool = False) -> torch.Tensor:
    """What ``module`` outputs (or receives, ``pre``) during ``run()``, via a torch hook."""
    seen = []
    if pre:
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return torch.cat(seen) if len(seen) > 1 else seen[0]


@pytest.fixture(scope="session")
def hooked():
    """:func:`_hooked` (what a module outputs or receives during a run, via a torch hook)."""
    return _hooked
