"""Small trained models shipped inside hookscope, with their model cards.

Each model lives in ``hookscope/zoo/weights/<name>/``:

* ``card.json``: the model card (see :func:`card`), including the ``build`` record that
  rebuilds the module (:func:`build_module`);
* ``model.safetensors``: the final weights (a plain ``state_dict``);
* ``checkpoints/step_XXXXXX.safetensors``: the training trajectory, where there is one.

Weights are read with ``safetensors.torch.load_file`` only (never pickle). The models are
produced by the project's own training scripts (``python -m hookscope.zoo.train_induction``,
``python -m hookscope.zoo.train_digits``) under fixed seeds; each card records the command.

>>> load_shipped("tiny-induction")                  # HookedModel over a GPT-NeoX
>>> load_shipped("digits-cnn", checkpoint=16)       # the CNN after 16 training steps
>>> card("digits-mlp")["metrics"]["test_accuracy"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from hookscope.errors import InputError, ModelLoadError, format_choices, suggestion

__all__ = [
    "SHIPPED",
    "WEIGHTS_DIR",
    "build_module",
    "card",
    "checkpoint_path",
    "checkpoints",
    "load_shipped",
    "model_dir",
]

SHIPPED: tuple[str, ...] = ("tiny-induction", "digits-mlp", "digits-cnn", "digits-vit")
WEIGHTS_DIR = Path(__file__).parent / "weights"
CARD_KEYS = (
    "name",
    "architecture",
    "build",
    "size",
    "source",
    "known",
    "metrics",
    "seed",
    "command",
    "checkpoints",
)

#: the layer classes a "sequential" build record may name (constructor kwargs in JSON)
SEQUENTIAL_LAYERS: dict[str, type[nn.Module]] = {
    "Flatten": nn.Flatten,
    "Linear": nn.Linear,
    "Conv2d": nn.Conv2d,
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
    "Tanh": nn.Tanh,
    "MaxPool2d": nn.MaxPool2d,
    "AvgPool2d": nn.AvgPool2d,
    "Dropout": nn.Dropout,
}


def _check_name(name: str) -> None:
    if name not in SHIPPED:
        raise ModelLoadError(
            f"no shipped model named {name!r}; shipped models: {format_choices(SHIPPED)}."
            + suggestion(str(name), SHIPPED)
        )


def model_dir(name: str) -> Path:
    """The folder holding ``name``'s card and weights."""
    _check_name(name)
    return WEIGHTS_DIR / name


def card(name: str) -> dict[str, Any]:
    """The model card of shipped model ``name`` (parsed ``card.json``).

    Keys: ``name``; ``architecture`` (one line, its first word the adapter: gpt_neox,
    mlp, cnn, vit); ``build`` (the record :func:`build_module` rebuilds it from); ``size`` (one
    line); ``source`` (where the weights are and the script that trained them); ``known``
    (one line: what is known inside); ``metrics`` (numbers measured on the shipped
    weights, reproducible from them); ``seed``; ``command`` (exact training command);
    ``checkpoints`` (training steps with saved weights, the last being the final
    weights, or ``[]``); plus ``training`` (hyper-parameters), ``data`` and ``versions``.
    """
    path = model_dir(name) / "card.json"
    if not path.is_file():
        raise ModelLoadError(
            f"shipped model {name!r} has no card at {path}; re-create it with the training "
            "script named in the README (python -m hookscope.zoo.train_induction / train_digits)"
        )
    with path.open() as f:
        data = json.load(f)
    missing = [k for k in CARD_KEYS if k not in data]
    if missing:
        raise ModelLoadError(f"card {path} lacks key(s) {', '.join(missing)}")
    return data


def checkpoints(name: str) -> list[int]:
    """Training steps of ``name``'s saved trajectory (ascending; the last is final), or []."""
    return [int(s) for s in card(name)["checkpoints"]]


def checkpoint_path(name: str, checkpoint: int | None = None) -> Path:
    """The safetensors file of ``name`` at training step ``checkpoint`` (None: final)."""
    folder = model_dir(name)
    if checkpoint is None:
        return folder / "model.safetensors"
    steps = checkpoints(name)
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint not in steps:
        raise InputError(
            f"{name} has no checkpoint at step {checkpoint!r}; "
            + (
                f"saved steps: {format_choices([str(s) for s in steps], limit=20)}"
                if steps
                else "it ships final weights only (checkpoint=None)"
            )
        )
    if checkpoint == steps[-1]:
        return folder / "model.safetensors"
    return folder / "checkpoints" / f"step_{checkpoint:06d}.safetensors"


def build_module(record: dict[str, Any]) -> nn.Module:
    """A freshly initialised module from a ``build`` record (a card's key).

    Records: ``{"kind": "gpt_neox", "config": {...GPTNeoXConfig kwargs}}`` ->
    ``GPTNeoXForCausalLM``; ``{"kind": "vit", "config": {...}}`` -> ``hookscope.ViT``;
    ``{"kind": "sequential", "layers": [[class_name, {kwargs}], ...]}`` -> ``nn.Sequential``
    of the classes in ``SEQUENTIAL_LAYERS``.
    """
    kind = record.get("kind")
    if kind == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        return GPTNeoXForCausalLM(GPTNeoXConfig(**record["config"]))
    if kind == "vit":
        from hookscope.models.vit import ViT

        return ViT(**record["config"])
    if kind == "sequential":
        layers = []
        for cls_name, kwargs in record["layers"]:
            if cls_name not in SEQUENTIAL_LAYERS:
                raise ModelLoadError(
                    f"unknown layer {cls_name!r} in a sequential build record; known: "
                    f"{format_choices(SEQUENTIAL_LAYERS)}"
                )
            layers.append(SEQUENTIAL_LAYERS[cls_name](**kwargs))
        return nn.Sequential(*layers)
    raise ModelLoadError(f"unknown build kind {kind!r}; known: gpt_neox, vit, sequential")


def load_module(name: str, checkpoint: int | None = None) -> nn.Module:
    """The plain torch module of ``name`` (eval mode) with final or checkpoint weights."""
    from safetensors.torch import load_file

    info = card(name)
    path = checkpoint_path(name, checkpoint)
    if not path.is_file():
        raise ModelLoadError(
            f"weights file {path} is missing; re-create it with: {info['command']}"
        )
    module = build_module(info["build"])
    state = load_file(str(path))
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{path} does not match {name}'s build record: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return module.eval()


def load_shipped(name: str, checkpoint: int | None = None):
    """Shipped model ``name`` as a ``hookscope.HookedModel`` (eval mode, CPU, float32).

    ``checkpoint`` picks a step of the training trajectory (:func:`checkpoints`); None
    loads the final weights. Unknown names raise ``ModelLoadError`` and unknown steps
    ``InputError``, both listing the valid choices.
    """
    from hookscope.model import HookedModel

    return HookedModel.wrap(load_module(name, checkpoint))
