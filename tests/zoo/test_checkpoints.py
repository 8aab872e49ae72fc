"""hs.zoo.checkpoints: the steps one can load, for every kind of zoo model."""

from pathlib import Path

import pytest
import torch

import hookscope as hs

WEIGHTS = Path(hs.zoo.__file__).parent / "weights"


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp", "digits-vit", "tiny-induction"])
def test_shipped_steps_are_the_files_on_disk(name):
    steps = hs.zoo.checkpoints(name)
    on_disk = sorted(
        int(p.stem.split("_")[1])
        for p in (WEIGHTS / name / "checkpoints").glob("step_*.safetensors")
    )
    # the final step is model.safetensors itself, not repeated in checkpoints/
    assert steps == sorted(set(on_disk) | ({steps[-1]} if steps else set()))
    assert steps == sorted(steps)


def test_every_listed_step_loads_and_differs():
    steps = hs.zoo.checkpoints("digits-cnn")
    first = hs.zoo.load("digits-cnn", checkpoint=steps[0]).model
    last = hs.zoo.load("digits-cnn", checkpoint=steps[-1]).model
    final = hs.zoo.load("digits-cnn").model
    for a, b in zip(last.parameters(), final.parameters(), strict=True):
        assert torch.equal(a, b)  # the last listed step is the final model
    assert any(
        not torch.equal(a, b) for a, b in zip(first.parameters(), last.parameters(), strict=True)
    )


def test_pythia_steps_are_eleutherais_revisions():
    steps = hs.zoo.checkpoints("pythia-70m")
    # EleutherAI: step0, 1, 2, 4, ..., 512, then every 1000 steps to 143000: 154 checkpoints
    assert len(steps) == 154 and steps[:3] == [0, 1, 2] and steps[10] == 512
    assert steps[-1] == 143000 and steps[11] == 1000
    assert hs.zoo.checkpoints("smollm2-135m") == []
    with pytest.raises(hs.InputError, match=r"revision='stepN' \(steps: hs.zoo.checkpoints"):
        hs.zoo.load("pythia-70m", checkpoint=1000)
    with pytest.raises(hs.InputError, match="unknown zoo model"):
        hs.zoo.checkpoints("digits-cnm")
