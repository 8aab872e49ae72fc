"""The example scripts run, and say what they claim (run in-process with runpy)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

import hookscope as hs

EXAMPLES = Path(__file__).parent.parent / "examples"


def _run(script: str, *argv: str) -> dict:
    saved = sys.argv
    sys.argv = [script, *argv]
    try:
        return runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        sys.argv = saved


def test_tour_on_tiny_induction(tmp_path, capsys):
    g = _run("tour.py", "--out", str(tmp_path))
    text = capsys.readouterr().out
    lens, model = g["lens"], g["model"]
    # the logit lens: the answer appears only after the last layer (2-layer induction model)
    p = lens.prob(g["correct"])[:, 0, -1]
    assert p[-1] > 0.5 and p[:-1].max() < 0.1
    assert "P(answer) after resid_post.1" in text
    # DLA by head: an induction head of layer 1 writes the answer (the card names 1.0-1.3)
    assert g["top_heads"][0].startswith("head.1.")
    # the patching sweep names the previous-token head 0.3 first (noising it breaks induction)
    assert str(g["patching"].top(1)[0][0]) == "head.0.3"
    # steering changed the generation; run_with_cache works on the generated ids
    assert not torch.equal(g["plain"][:, : g["steered"].shape[1]], g["steered"])
    assert g["generated"]["resid_post.1"].shape[1] == g["steered"].shape[1]
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "logit_lens.png",
        "dla.png",
        "attention_layer.png",
        "patching.png",
        "attention.html",
    } <= names
    assert model.n_layers == 2


def test_steering_example(capsys):
    _run("steering.py")
    assert capsys.readouterr().out.strip()


@pytest.mark.optional_model
def test_tour_on_smollm2(tmp_path):
    try:
        hs.zoo.load("smollm2-135m")
    except hs.ModelLoadError:
        pytest.skip("smollm2-135m is not installed (make models)")
    g = _run("tour.py", "--model", "smollm2-135m", "--out", str(tmp_path))
    # the name-mover head 23.3 has the largest DLA (the issue measured 2.855 by hand) and
    # patching ranks it first as well
    assert g["top_heads"][0] == "head.23.3"
    dla = dict(zip(g["heads"], g["dla"].tolist(), strict=True))
    assert dla["head.23.3"] == pytest.approx(2.855, abs=0.01)
    assert str(g["patching"].top(1)[0][0]) == "head.23.3"
    assert g["lens"].prob(" Mary")[-1, 0, -1] > 0.5


def test_attribution_units_on_the_digits_models(tmp_path, capsys):
    g = _run("attribution_units.py", "--out", str(tmp_path), "--n", "48")["results"]
    text = capsys.readouterr().out
    # the trained CNN's Grad-CAM (first conv layer) and saliency lean on the ink
    for name in ("grad_cam", "saliency"):
        on_ink, ink = g["shares"][name]
        assert on_ink > ink + 0.05, name
    # integrated gradients: completeness within a few percent of the gaps they explain
    ig = g["ig"]
    gap = ig.values.sum((1, 2, 3)) - ig.delta
    assert float(ig.delta.abs().max()) < 0.05 * float(gap.abs().mean())
    # the head printed as most important is the argmax of the accuracy drops
    drop = g["importance"].accuracy_drop
    assert drop[g["top_head"]] == drop.max()
    assert sum(g["counts"].values()) == 16  # every unit of neuron.0 has a status
    for name in (
        "grad_cam",
        "grad_cam_step16_vs_final",
        "rollout",
        "vit_head_patterns",
        "vit_head_importance",
        "neurons_step16_vs_final",
        "top_activating",
    ):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000, name
    assert "attributions sum to F(x) - F(black)" in text
