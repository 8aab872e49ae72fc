"""Small trained models shipped inside hookscope, with their model cards.

Each model lives in ``hookscope/zoo/weights/<name>/``:

* ``card.json``: the model card (see :func:`card`), including the ``build`` record that
  rebuilds the module (:func:`build_module`);
* ``model.safetensors``: the final weights (a plain ``state_dict``);
* ``checkpoints/step_XXXXXX.safetensors``: the training trajectory, where there is one.

Weights are read with ``safetensors.torch.load_file`` only (never pickle). The models are
produced by the project's own training scripts (``python -m hookscope.zoo.train_induction``,
``python -m hookscope.zoo.train_digits``) under fixed seeds; each card records the command.

Integrity: the card's ``sha256`` maps every weight file (its path relative to the model's
folder, ``/``-separated) to its SHA-256 hex digest, written by :func:`write_card` when a
training script saves. Loading a file checks its digest first, once per process per file
version (remembered under the file's path, size and modification time): hashing the largest
file, tiny-induction's 0.44 MB, takes about 0.5 ms against about 12 ms to build and load
that model; a repeated load costs a ``stat`` (about 15 us). A mismatch, a truncated file or
an unreadable card raises ModelLoadError naming the file and how to restore it.

>>> load_shipped("tiny-induction")                  # HookedModel over a GPT-NeoX
>>> load_shipped("digits-cnn", checkpoint=16)       # the CNN after 16 training steps
>>> load_shipped("tiny-induction", dtype="float16")  # weights cast once after the check
>>> card("digits-mlp")["metrics"]["test_accuracy"]
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from hookscope.errors import InputError, ModelLoadError, format_choices, suggestion
from hookscope.hf_compat import renamed_state

__all__ = [
    "SHIPPED",
    "WEIGHTS_DIR",
    "build_module",
    "card",
    "checkpoint_path",
    "checkpoints",
    "file_sha256",
    "load_module",
    "load_shipped",
    "model_dir",
    "restore_hint",
    "save_weights",
    "verify_weights",
    "weight_files",
    "write_card",
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
    "sha256",
)
#: (path, size, mtime_ns) -> sha256 of the weight files already checked in this process
_VERIFIED: dict[tuple[str, int, int], str] = {}

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
    weights, or ``[]``); ``sha256`` (weight file -> digest, see the module docstring); plus
    ``training`` (hyper-parameters), ``data`` and ``versions``.
    """
    path = model_dir(name) / "card.json"
    if not path.is_file():
        raise ModelLoadError(
            f"shipped model {name!r} has no card at {path}. {restore_hint(name, 'card.json')}"
        )
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(
            f"the card of shipped model {name!r}, {path}, is not readable JSON ({err}). "
            + restore_hint(name, "card.json")
        ) from None
    missing = [k for k in CARD_KEYS if k not in data] if isinstance(data, dict) else CARD_KEYS
    if missing:
        raise ModelLoadError(
            f"card {path} lacks key(s) {', '.join(missing)}. " + restore_hint(name, "card.json")
        )
    return data


def restore_hint(name: str, relative: str) -> str:
    """How to get ``hookscope/zoo/weights/<name>/<relative>`` back as shipped."""
    command = _training_command(name)
    return (
        "Restore it: in a git clone, `git checkout -- "
        f"hookscope/zoo/weights/{name}/{relative}`; in an installed hookscope, "
        "`pip install --force-reinstall --no-deps hookscope`; or regenerate the model and its "
        f"card with `{command}`."
    )


def _training_command(name: str) -> str:
    """The command that regenerates ``name`` (from the training script, not the card, which
    may be the broken file)."""
    if name == "tiny-induction":
        from hookscope.zoo.train_induction import COMMAND

        return COMMAND
    from hookscope.zoo.train_digits import command

    return command(name.removeprefix("digits-"))


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


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a shipped model's folder: ``model.safetensors`` and checkpoints."""
    return sorted([*folder.glob("*.safetensors"), *(folder / "checkpoints").glob("*.safetensors")])


def verify_weights(name: str, path: Path, info: dict[str, Any] | None = None) -> None:
    """Check ``path`` (a weight file of shipped model ``name``) against its card's sha256.

    Raises ModelLoadError naming the file, the recorded and the actual digest and how to
    restore it. A file version (path, size, mtime) that passed is not hashed again.
    """
    info = card(name) if info is None else info
    relative = path.relative_to(model_dir(name)).as_posix()
    expected = info["sha256"].get(relative) if isinstance(info["sha256"], dict) else None
    if expected is None:
        raise ModelLoadError(
            f"the card of {name} records no sha256 for {relative}, so {path} cannot be checked. "
            + restore_hint(name, "card.json")
        )
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key) == expected:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ModelLoadError(
            f"weights file {path} is corrupt: its sha256 is {actual}, but the card "
            f"({model_dir(name) / 'card.json'}) records {expected} ({stat.st_size} bytes on "
            f"disk). {restore_hint(name, relative)}"
        )
    _VERIFIED[key] = actual


def load_module(name: str, checkpoint: int | None = None) -> nn.Module:
    """The plain torch module of ``name`` (eval mode, float32, CPU) with final or checkpoint
    weights, checked against the card's sha256 first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = card(name)
    path = checkpoint_path(name, checkpoint)
    relative = path.relative_to(model_dir(name)).as_posix()
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} is missing. {restore_hint(name, relative)}")
    verify_weights(name, path, info)
    module = build_module(info["build"])
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(
            f"weights file {path} is not a readable safetensors file ({err}). "
            + restore_hint(name, relative)
        ) from None
    result = module.load_state_dict(renamed_state(module, state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{path} does not match {name}'s build record: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}. {restore_hint(name, relative)}"
        )
    return module.eval()


def load_shipped(
    name: str,
    checkpoint: int | None = None,
    *,
    dtype: Any = None,
    device: Any = None,
):
    """Shipped model ``name`` as a ``hookscope.HookedModel`` in eval mode.

    ``checkpoint`` picks a step of the training trajectory (:func:`checkpoints`); None
    loads the final weights. ``dtype`` (float32, float16, bfloat16, float64 or a torch
    dtype; default float32, as stored) and ``device`` (default CPU) are applied once after
    loading, so a float16 model holds exactly the stored float32 weights cast to float16.
    Unknown names raise ``ModelLoadError``, unknown steps, dtypes and devices ``InputError``,
    each listing the valid choices.
    """
    from hookscope._checks import as_device, as_dtype
    from hookscope.model import HookedModel

    torch_dtype, torch_device = as_dtype(dtype), as_device(device)
    module = load_module(name, checkpoint)
    if torch_dtype is not None or torch_device is not None:
        module.to(device=torch_device, dtype=torch_dtype)
    return HookedModel.wrap(module)


def save_weights(state: dict[str, Any], path: Path) -> None:
    """Write a state dict as safetensors atomically (a temporary file, then ``os.replace``)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_card(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``info`` as ``folder/card.json`` (atomically), with ``sha256`` of every weight file.

    Called by the training scripts after they save the weights, so card and files agree.
    Returns the card as written.
    """
    info = dict(info)
    info["sha256"] = {
        p.relative_to(folder).as_posix(): file_sha256(p) for p in weight_files(folder)
    }
    tmp = folder / f".card.json.{os.getpid()}.tmp"
    try:
        with tmp.open("w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / "card.json")
    finally:
        tmp.unlink(missing_ok=True)
    return info
