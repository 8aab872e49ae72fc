"""Sweeps over layers of different widths (issue 11 §4): the shipped digits-cnn (conv
channels 16 and 32) and digits-mlp (hidden units 64 and 32).

Every cell of the ``[layer, neuron]`` grid is compared with a reference computed in plain
torch on the ``nn.Sequential`` itself (forward hooks on its ReLU modules, ``neuron.L.i`` being
unit ``i`` on axis 1 of the L-th ReLU's output), and for activation patching also with a
single-site hookscope sweep of that one neuron. Cells past a layer's width must be NaN and
never ranked, tabled or drawn as a score.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope import interventions as iv
from hookscope.data.digits import digits_tensors

X, Y = digits_tensors("test")
CLEAN, CORRUPTED, REFERENCE = X[:12], X[12:24], X[100:160]
Y_CLEAN, Y_CORRUPTED = Y[:12], Y[12:24]
WIDTHS = {"digits-cnn": (16, 32), "digits-mlp": (64, 32)}


def metric():
    return iv.logit_diff(Y_CLEAN, Y_CORRUPTED, position=None)


def metric_torch(logits: torch.Tensor) -> torch.Tensor:
    """The same metric in plain torch: mean of logit[clean label] - logit[corrupted label]."""
    rows = torch.arange(logits.shape[0])
    return (logits[rows, Y_CLEAN] - logits[rows, Y_CORRUPTED]).mean()


@pytest.fixture(scope="module", params=["digits-cnn", "digits-mlp"])
def digits(request):
    model = hs.zoo.load(request.param)
    relus = [m for m in model.model if isinstance(m, nn.ReLU)]
    return request.param, model, relus


def _acts(net: nn.Module, relus: list[nn.Module], x: torch.Tensor, edit=None):
    """``(logits, [each ReLU's output])``; ``edit(layer, out) -> out`` rewrites outputs."""
    seen: list[torch.Tensor] = [None] * len(relus)  # type: ignore[list-item]
    handles = []
    for layer, relu in enumerate(relus):

        def hook(module, args, out, layer=layer):
            out = edit(layer, out) if edit is not None else out
            seen[layer] = out
            return out

        handles.append(relu.register_forward_hook(hook))
    try:
        logits = net(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def _set_unit(target: int, unit: int, value):
    """An ``edit`` writing ``value`` (a tensor [batch, ...] or a scalar) into unit ``unit``
    of layer ``target``."""

    def edit(layer, out):
        if layer != target:
            return out
        out = out.clone()
        out[:, unit] = value if not isinstance(value, torch.Tensor) else value[:, unit]
        return out

    return edit


_REFERENCES: dict[int, dict] = {}


def _patching_reference(net, relus):
    """Normalised denoising score of every (layer, unit), patched alone in plain torch."""
    if id(net) not in _REFERENCES:
        _REFERENCES[id(net)] = _compute_patching_reference(net, relus)
    return _REFERENCES[id(net)]


def _compute_patching_reference(net, relus):
    with torch.no_grad():
        clean_logits, clean_acts = _acts(net, relus, CLEAN)
        m_clean = float(metric_torch(clean_logits))
        m_corrupted = float(metric_torch(net(CORRUPTED)))
        ref = {}
        for layer, act in enumerate(clean_acts):
            for unit in range(act.shape[1]):
                logits, _ = _acts(net, relus, CORRUPTED, _set_unit(layer, unit, act))
                ref[layer, unit] = (float(metric_torch(logits)) - m_corrupted) / (
                    m_clean - m_corrupted
                )
    return ref


def _check_grid(res, ref, widths):
    """Every cell equals the reference; cells past a layer's width are NaN."""
    assert res.dims == ("layer", "neuron") and res.widths == widths
    assert res.scores.shape == (2, max(widths)) and res.ragged
    for (layer, unit), value in ref.items():
        assert float(res.scores[layer, unit]) == pytest.approx(value, rel=1e-4, abs=1e-5), (
            layer,
            unit,
        )
    for layer, width in enumerate(widths):
        assert torch.isnan(res.scores[layer, width:]).all()
        assert not torch.isnan(res.scores[layer, :width]).any()
    assert len(res.jobs) == len(ref) == sum(widths)


def test_activation_patching_every_cell(digits):
    name, model, relus = digits
    ref = _patching_reference(model.model, relus)
    res = iv.activation_patching(
        model, CLEAN, CORRUPTED, metric(), sites="neuron.*.*", progress=False
    )
    _check_grid(res, ref, WIDTHS[name])
    for address in model.resolve("neuron.*.*"):  # the same cell from a one-site sweep
        one = iv.activation_patching(
            model, CLEAN, CORRUPTED, metric(), sites=str(address), progress=False
        )
        assert one.scores.shape == () and one.widths is None
        assert float(res.scores[address.layer, address.neuron]) == pytest.approx(
            float(one.scores), rel=1e-6, abs=1e-7
        )


def test_top_table_repr_and_plot_see_only_real_units(digits):
    name, model, relus = digits
    ref = _patching_reference(model.model, relus)
    res = iv.activation_patching(
        model, CLEAN, CORRUPTED, metric(), sites="neuron.*.*", progress=False
    )
    widths = WIDTHS[name]
    # top: ranked by the reference values, every job exactly once, no padding
    ranked = res.top(len(ref) + 10)
    assert len(ranked) == len(ref)
    assert {(a.layer, a.neuron) for a, _, _ in ranked} == set(ref)
    best = sorted(ref, key=ref.get, reverse=True)[:5]
    assert [(a.layer, a.neuron) for a, _, _ in res.top(5)] == best
    for address, _, score in ranked:
        assert score == pytest.approx(ref[address.layer, address.neuron], abs=1e-5)
    # to_pandas: one row per real unit, with the reference score
    table = res.to_pandas()
    assert len(table) == len(ref)
    for row in table.itertuples():
        address = hs.parse(row.address)
        assert row.score == pytest.approx(ref[address.layer, address.neuron], abs=1e-5)
    # repr: says the grid is ragged
    text = repr(res)
    assert f"widths {list(widths)}" in text and "NaN padding" in text
    # plot: padding masked (not a zero score), every real cell drawn with its reference value
    for values in ("score", "effect"):
        fig = res.plot(values=values)
        image = fig.axes[0].images[0].get_array()
        assert isinstance(image, np.ma.MaskedArray) and image.shape == (2, max(widths))
        for layer, width in enumerate(widths):
            assert image.mask[layer, width:].all() and not image.mask[layer, :width].any()
        for (layer, unit), value in ref.items():
            assert image[layer, unit] == pytest.approx(value, abs=1e-5)
        low, high = fig.axes[0].images[0].get_clim()
        assert math.isfinite(low) and math.isfinite(high)
        labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert labels == ["0", "1"]


def test_ablation_every_cell(digits):
    name, model, relus = digits
    net = model.model
    with torch.no_grad():
        base = float(metric_torch(net(CLEAN)))
        _, ref_acts = _acts(net, relus, REFERENCE)
        means = [a.mean(0, keepdim=True) for a in ref_acts]  # over reference rows
        zero, mean = {}, {}
        for layer, act in enumerate(ref_acts):
            for unit in range(act.shape[1]):
                logits, _ = _acts(net, relus, CLEAN, _set_unit(layer, unit, 0.0))
                zero[layer, unit] = float(metric_torch(logits))
                value = means[layer].expand(CLEAN.shape[0], *means[layer].shape[1:])
                logits, _ = _acts(net, relus, CLEAN, _set_unit(layer, unit, value))
                mean[layer, unit] = float(metric_torch(logits))
    res = iv.ablate(model, CLEAN, "neuron.*.*", metric=metric(), progress=False)
    _check_grid(res, zero, WIDTHS[name])
    assert res.baselines["clean"] == pytest.approx(base, abs=1e-5)
    res = iv.ablate(
        model, CLEAN, "neuron.*.*", "mean", reference=REFERENCE, metric=metric(), progress=False
    )
    _check_grid(res, mean, WIDTHS[name])
    # the most destructive unit first: the lowest metric
    assert [(a.layer, a.neuron) for a, _, _ in res.top(3)] == sorted(mean, key=mean.get)[:3]


def test_attribution_every_cell(digits):
    name, model, relus = digits
    net = model.model
    with torch.no_grad():
        _, clean_acts = _acts(net, relus, CLEAN)
        m_clean = float(metric_torch(net(CLEAN)))
    grads: list[torch.Tensor] = [None] * len(relus)  # type: ignore[list-item]

    def keep_grad(layer, out):
        out.register_hook(lambda g, layer=layer: grads.__setitem__(layer, g))
        return out

    logits, corrupted_acts = _acts(net, relus, CORRUPTED, keep_grad)
    m_corrupted = metric_torch(logits)
    m_corrupted.backward()
    m_corrupted = float(m_corrupted.detach())
    net.zero_grad(set_to_none=True)
    ref = {}
    for layer, (grad, clean, corrupted) in enumerate(zip(grads, clean_acts, corrupted_acts)):
        change = (grad.double() * (clean - corrupted).double()).transpose(0, 1)
        per_unit = change.reshape(change.shape[0], -1).sum(1)
        for unit, delta in enumerate(per_unit.tolist()):
            ref[layer, unit] = delta / (m_clean - m_corrupted)  # (m_base + delta - m_c) / gap
    res = iv.attribution_patching(
        model, CLEAN, CORRUPTED, metric(), sites="neuron.*.*", progress=False
    )
    _check_grid(res, ref, WIDTHS[name])


def test_even_selections_and_lists_keep_their_shapes(digits):
    name, model, relus = digits
    ref = _patching_reference(model.model, relus)
    res = iv.activation_patching(
        model, CLEAN, CORRUPTED, metric(), sites="neuron.*.3-10", progress=False
    )
    assert res.dims == ("layer", "neuron") and res.widths == (8, 8) and not res.ragged
    assert not torch.isnan(res.scores).any()
    for layer in range(2):
        for col in range(8):
            assert float(res.scores[layer, col]) == pytest.approx(ref[layer, col + 3], abs=1e-5)
    res = iv.activation_patching(
        model, CLEAN, CORRUPTED, metric(), sites="neuron.1.*", progress=False
    )
    assert res.dims == ("neuron",) and res.scores.shape == (32,) and res.widths is None
    assert res.scores.tolist() == pytest.approx([ref[1, u] for u in range(32)], abs=1e-5)
    sites = ["neuron.1.4", "neuron.0.2"]
    res = iv.activation_patching(model, CLEAN, CORRUPTED, metric(), sites=sites, progress=False)
    assert res.dims == ("site",)
    assert res.scores.tolist() == pytest.approx([ref[1, 4], ref[0, 2]], abs=1e-5)


def test_layer_rows_follow_the_selected_layers():
    """``neuron.1-2.*`` on a 3-layer MLP of widths 5, 3, 4: row 0 is layer 1 (width 3)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 4), nn.ReLU(),
        nn.Linear(4, 2),
    ).eval()  # fmt: skip
    model = hs.HookedModel.wrap(net)
    clean, corrupted = torch.randn(4, 6), torch.randn(4, 6)
    res = iv.activation_patching(
        model, clean, corrupted, lambda out: out[:, 0].mean(), sites="neuron.1-2.*",
        progress=False,
    )  # fmt: skip
    assert res.widths == (3, 4) and res.scores.shape == (2, 4)
    assert torch.isnan(res.scores[0, 3]) and not torch.isnan(res.scores[1]).any()
    for address in model.resolve("neuron.1-2.*"):
        one = iv.activation_patching(
            model, clean, corrupted, lambda out: out[:, 0].mean(), sites=str(address),
            progress=False,
        )  # fmt: skip
        row = address.layer - 1
        assert float(res.scores[row, address.neuron]) == pytest.approx(float(one.scores))
    fig = res.plot()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["1", "2"]


def test_circuit_json_has_no_nan_and_boxes_the_right_cells():
    """localize_circuit on the ragged CNN grid: the JSON record holds null for padding, and
    the plot boxes each component at its own cell."""
    model = hs.zoo.load("digits-cnn")
    res = iv.localize_circuit(
        model, CLEAN, CORRUPTED, metric(), sites="neuron.*.*", candidates=4, progress=False
    )
    record = res.to_dict()
    scores = record["screen"]["scores"]
    assert record["screen"]["widths"] == [16, 32]
    assert scores[0][16:] == [None] * 16 and None not in scores[0][:16] + scores[1]
    json.dumps(record, allow_nan=False)  # valid JSON: no NaN
    fig = res.plot()
    boxes = list(fig.axes[0].patches)
    assert len(boxes) == len(res.components)
    for box, (address, _) in zip(boxes, res.components, strict=True):
        assert (box.get_y() + 0.4, box.get_x() + 0.4) == pytest.approx(
            (address.layer, address.neuron)
        )
