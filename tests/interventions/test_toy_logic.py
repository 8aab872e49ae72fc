"""Activation patching on hand-built logic networks whose answers are known exactly.

Each network is an MLP ``Linear(2, 2) -> ReLU -> Linear(2, k) -> ReLU -> Linear(k, 2)`` with
weights set by hand. Layer 0 copies the binary inputs: ``neuron.0.0 = a``, ``neuron.0.1 = b``.
Layer 1 and the head compute the gate; the output is ``[batch, 2]`` and the metric is logit 0
(``iv.logit(0, position=None)``), which equals ``SCALE * gate(a, b) + OFFSET`` exactly for
binary inputs (SCALE and OFFSET make normalisation matter: raw values are never 0/1).

Clean input (1, 1), corrupted (0, 0). Normalised score = (m(patched) - m(corrupted)) /
(m(clean) - m(corrupted)) = gate(patched inputs) in both directions, since gate(1, 1) = 1 and
gate(0, 0) = 0:

=======  =====================  ==========================  ==================
gate     denoise a: gate(1, 0)  noise a: gate(0, 1)         both sites
=======  =====================  ==========================  ==================
AND      0 (nothing recovered)  0 (everything destroyed)    denoise 1, noise 0
OR       1 (all recovered)      1 (nothing destroyed)       denoise 1, noise 0
a + 3b   1/4 (b: 3/4)           3/4 (b: 1/4)                denoise 1, noise 0
=======  =====================  ==========================  ==================
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope import interventions as iv

SCALE, OFFSET = 3.0, 2.0
CLEAN = torch.tensor([[1.0, 1.0]])
CORRUPTED = torch.tensor([[0.0, 0.0]])
SITES = ["neuron.0.0", "neuron.0.1"]


def gate_net(gate: str) -> nn.Sequential:
    """Logit 0 = SCALE * gate(a, b) + OFFSET for a, b in {0, 1}; logit 1 = -logit 0."""
    if gate == "and":  # relu(a + b - 1)
        w1, b1, w2 = [[1.0, 1.0], [0.0, 0.0]], [-1.0, 0.0], [1.0, 0.0]
    elif gate == "or":  # min(a + b, 1) = relu(a + b) - relu(a + b - 1)
        w1, b1, w2 = [[1.0, 1.0], [1.0, 1.0]], [0.0, -1.0], [1.0, -1.0]
    elif gate == "sum":  # a + 3b (linear: patching scores are its weights' shares)
        w1, b1, w2 = [[1.0, 3.0], [0.0, 0.0]], [0.0, 0.0], [0.25, 0.0]
    else:
        raise ValueError(gate)
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor(w1))
        net[2].bias.copy_(torch.tensor(b1))
        head = torch.tensor([w2, [-x for x in w2]]) * SCALE
        if gate == "sum":
            head = head * 4  # undo the 0.25: logit 0 = SCALE * (a + 3b) + OFFSET
        net[4].weight.copy_(head)
        net[4].bias.copy_(torch.tensor([OFFSET, -OFFSET]))
    return net.eval()


def gate(name: str, a: float, b: float) -> float:
    return {"and": a * b, "or": max(a, b), "sum": a + 3 * b}[name]


@pytest.mark.parametrize("name", ["and", "or", "sum"])
def test_networks_compute_their_gate(name):
    net = gate_net(name)
    grid = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    want = torch.tensor([SCALE * gate(name, a, b) + OFFSET for a, b in grid.tolist()])
    torch.testing.assert_close(net(grid)[:, 0], want, atol=0, rtol=0)
    model = hs.HookedModel.wrap(net)
    _, cache = model.run_with_cache(grid)
    torch.testing.assert_close(cache["neuron.0.0"], grid[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(cache["neuron.0.1"], grid[:, 1], atol=0, rtol=0)


def patch(name: str, direction: str, sites=SITES, metric=None, clean=CLEAN, corrupted=CORRUPTED):
    return iv.activation_patching(
        hs.HookedModel.wrap(gate_net(name)),
        clean=clean,
        corrupted=corrupted,
        metric=iv.logit(0, position=None) if metric is None else metric,
        sites=sites,
        positions="all",
        direction=direction,
    )


def scores(res) -> list[float]:
    return [float(s) for s in torch.as_tensor(res.scores).flatten()]


# expected normalised scores for (neuron.0.0 = a, neuron.0.1 = b), see the module docstring
EXPECTED = {
    ("and", "denoise"): [0.0, 0.0],
    ("and", "noise"): [0.0, 0.0],
    ("or", "denoise"): [1.0, 1.0],
    ("or", "noise"): [1.0, 1.0],
    ("sum", "denoise"): [0.25, 0.75],
    ("sum", "noise"): [0.75, 0.25],
}


@pytest.mark.parametrize(("name", "direction"), list(EXPECTED))
def test_single_input_patches(name, direction):
    res = patch(name, direction)
    assert tuple(torch.as_tensor(res.scores).shape) == (2,)
    assert [str(hs.parse(str(a))) for a in res.addresses] == SITES
    assert res.positions is None
    assert scores(res) == pytest.approx(EXPECTED[name, direction], abs=1e-6)


@pytest.mark.parametrize("name", ["and", "or", "sum"])
def test_patching_both_inputs_is_the_other_run(name):
    """The whole hidden layer 0 carries everything: denoising it recovers 1, noising it 0."""
    for sites in ["neuron.0", ["neuron.0"]]:
        assert scores(patch(name, "denoise", sites=sites)) == pytest.approx([1.0], abs=1e-6)
        assert scores(patch(name, "noise", sites=sites)) == pytest.approx([0.0], abs=1e-6)


@pytest.mark.parametrize(("name", "direction"), list(EXPECTED))
def test_plain_callable_reports_raw_logit(name, direction):
    """A plain callable is not normalised: the score is logit 0 of the patched run."""
    res = patch(name, direction, metric=lambda out: out[:, 0].mean())
    # patched inputs: denoise a -> (1, 0), b -> (0, 1); noise a -> (0, 1), b -> (1, 0)
    patched = [(1, 0), (0, 1)] if direction == "denoise" else [(0, 1), (1, 0)]
    raw = [SCALE * gate(name, a, b) + OFFSET for a, b in patched]
    assert scores(res) == pytest.approx(raw, abs=1e-6)
    assert not any(abs(r - s) < 0.5 for r, s in zip(raw, EXPECTED[name, direction]))


def test_batch_mean_and_second_layer_site():
    """AND over a batch of two: row 0 (1, 1) vs (0, 0); row 1 (1, 1) vs (0, 1).

    m(clean) = 1, m(corrupted) = mean(0, 0) = 0 (times SCALE, plus OFFSET). Denoising a gives
    rows (1, 0) -> 0 and (1, 1) -> 1: mean 1/2; denoising b gives (0, 1) -> 0 and (0, 1) -> 0:
    0. Noising a: (0, 1), (0, 1) -> 0; noising b: (1, 0), (1, 1) -> 1/2. The AND unit itself
    (neuron.1.0) carries everything: 1 when denoised, 0 when noised.
    """
    clean = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    corrupted = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    sites = SITES + ["neuron.1.0"]
    got = scores(patch("and", "denoise", sites=sites, clean=clean, corrupted=corrupted))
    assert got == pytest.approx([0.5, 0.0, 1.0], abs=1e-6)
    got = scores(patch("and", "noise", sites=sites, clean=clean, corrupted=corrupted))
    assert got == pytest.approx([0.0, 0.5, 0.0], abs=1e-6)
