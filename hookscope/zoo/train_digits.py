"""Train the shipped digits models (MLP, CNN, ViT) on scikit-learn's 8x8 digits.

    python -m hookscope.zoo.train_digits                 # all three
    python -m hookscope.zoo.train_digits --model cnn     # one of mlp, cnn, vit

Each run trains on :func:`hookscope.data.digits.digits_tensors` ("train", 1,347 images,
pixels in [0, 1], input [batch, 1, 8, 8]) with AdamW and a seeded shuffle, saves the
weights at log-spaced steps (0, 1, 2, 4, ..., and the last) for training-dynamics
analysis, and writes ``hookscope/zoo/weights/digits-<model>/``: ``model.safetensors``
(final), ``checkpoints/step_XXXXXX.safetensors`` and ``card.json`` with the held-out
("test", 450 images) accuracy of the final weights and of every checkpoint, and the sha256
of every weight file (checked when the model is loaded).

Accuracy is :func:`accuracy`: the fraction of images whose argmax logit is the label, in
eval mode, float32, one forward over the whole split. Seeded; seconds to a minute per
model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from hookscope.data.digits import SPLIT_SEED, TEST_FRACTION, digits_tensors
from hookscope.zoo.shipped import WEIGHTS_DIR, build_module, save_weights, write_card

MODELS = ("mlp", "cnn", "vit")


@dataclass(frozen=True)
class Recipe:
    """Build record (``hookscope.zoo.shipped.build_module``), one-line architecture and
    size description, and training settings."""

    build: dict
    architecture: str
    steps: int
    lr: float
    weight_decay: float = 0.01
    batch_size: int = 64
    seed: int = 0
    describe: str = ""
    extra: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "mlp": Recipe(
        architecture="mlp (nn.Sequential: Flatten, Linear 64-64-32-10, ReLU)",
        build={
            "kind": "sequential",
            "layers": [
                ["Flatten", {}],
                ["Linear", {"in_features": 64, "out_features": 64}],
                ["ReLU", {}],
                ["Linear", {"in_features": 64, "out_features": 32}],
                ["ReLU", {}],
                ["Linear", {"in_features": 32, "out_features": 10}],
            ],
        },
        steps=1000,
        lr=3e-3,
        describe="MLP 64-64-32-10 (ReLU), 2 hidden layers",
    ),
    "cnn": Recipe(
        architecture="cnn (nn.Sequential: 2 x [conv3x3, ReLU, maxpool 2], linear head)",
        build={
            "kind": "sequential",
            "layers": [
                ["Conv2d", {"in_channels": 1, "out_channels": 16, "kernel_size": 3, "padding": 1}],
                ["ReLU", {}],
                ["MaxPool2d", {"kernel_size": 2}],
                ["Conv2d", {"in_channels": 16, "out_channels": 32, "kernel_size": 3, "padding": 1}],
                ["ReLU", {}],
                ["MaxPool2d", {"kernel_size": 2}],
                ["Flatten", {}],
                ["Linear", {"in_features": 128, "out_features": 10}],
            ],
        },
        steps=1000,
        lr=3e-3,
        describe="CNN conv3x3(16)-pool-conv3x3(32)-pool-linear, 2 conv layers",
    ),
    "vit": Recipe(
        architecture="vit (hookscope.ViT: pre-LayerNorm, 2x2 patches + CLS token)",
        build={
            "kind": "vit",
            "config": {
                "image_size": 8,
                "patch_size": 2,
                "in_channels": 1,
                "d_model": 64,
                "n_layers": 2,
                "n_heads": 4,
                "d_mlp": 128,
                "n_classes": 10,
            },
        },
        steps=1000,
        lr=2e-3,
        describe="ViT 2 layers, d_model 64, 4 heads, d_mlp 128, 2x2 patches + CLS",
    ),
}


def command(model: str) -> str:
    return f"python -m hookscope.zoo.train_digits --model {model}"


def checkpoint_steps(steps: int) -> list[int]:
    """0, then powers of two below ``steps``, then ``steps`` itself."""
    out = [0]
    p = 1
    while p < steps:
        out.append(p)
        p *= 2
    return out + [steps]


def accuracy(module: nn.Module, X: Tensor, y: Tensor) -> float:
    """Fraction of rows whose argmax logit equals the label (eval mode, no grad)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        pred = module(X).argmax(-1)
    module.train(was_training)
    return (pred == y).sum().item() / len(y)


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def training_steps(
    model: str, seed: int | None = None, steps: int | None = None
) -> tuple[nn.Module, int, Iterator[tuple[int, Tensor]]]:
    """``model``'s recipe, ready to train: ``(module, steps, updates)``.

    ``updates`` yields ``(step, loss)`` after each optimiser update (``step`` from 0; the
    loss of that step's batch, detached): the loop of :func:`train`, for callers that
    measure during training (``hs.Tracker``). ``seed`` and ``steps`` default to the recipe's;
    the cosine schedule spans ``steps``.
    """
    recipe = RECIPES[model]
    seed = recipe.seed if seed is None else seed
    steps = recipe.steps if steps is None else steps
    torch.manual_seed(seed)
    module = build_module(recipe.build)
    X, y = digits_tensors("train")
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def updates() -> Iterator[tuple[int, Tensor]]:
        perm, cursor = torch.randperm(len(y), generator=order), 0
        module.train()
        for step in range(steps):
            if cursor + recipe.batch_size > len(y):
                perm, cursor = torch.randperm(len(y), generator=order), 0
            rows = perm[cursor : cursor + recipe.batch_size]
            cursor += recipe.batch_size
            loss = F.cross_entropy(module(X[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            yield step, loss.detach()

    return module, steps, updates()


def train(model: str, progress: bool = True) -> tuple[nn.Module, dict[int, dict[str, Tensor]]]:
    """Train ``model`` ("mlp", "cnn" or "vit"); returns the module and {step: state_dict}."""
    module, steps, updates = training_steps(model)
    saves = set(checkpoint_steps(steps))
    states: dict[int, dict[str, Tensor]] = {0: _state(module)}
    bar = tqdm(updates, total=steps, desc=f"train digits-{model}", disable=not progress)
    for step, loss in bar:  # after update `step`, the state of step + 1
        if step + 1 in saves:
            states[step + 1] = _state(module)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return module.eval(), states


def write(
    model: str,
    module: nn.Module,
    states: dict[int, dict[str, Tensor]],
    folder: Path,
    seconds: float,
) -> dict:
    """Save final weights, checkpoints and card.json into ``folder``; returns the card."""
    import sklearn

    recipe = RECIPES[model]
    name = f"digits-{model}"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_dir = folder / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    for old in ckpt_dir.glob("step_*.safetensors"):
        old.unlink()
    steps = sorted(states)
    X_test, y_test = digits_tensors("test")
    X_train, y_train = digits_tensors("train")
    probe = build_module(recipe.build).eval()
    trajectory = []
    for step in steps:
        path = (
            folder / "model.safetensors"
            if step == steps[-1]
            else ckpt_dir / f"step_{step:06d}.safetensors"
        )
        save_weights(states[step], path)
        probe.load_state_dict(states[step])
        trajectory.append(
            {
                "step": step,
                "test_accuracy": accuracy(probe, X_test, y_test),
                "train_accuracy": accuracy(probe, X_train, y_train),
            }
        )
    final = trajectory[-1]
    n_params = sum(p.numel() for p in module.parameters())
    info = {
        "name": name,
        "architecture": recipe.architecture,
        "build": recipe.build,
        "size": f"{recipe.describe}, {n_params / 1000:.1f}k params",
        "source": f"shipped in hookscope/zoo/weights/{name}, trained by `{command(model)}`",
        "known": f"held-out accuracy {final['test_accuracy']:.4f} on the 450 digits test images",
        "metrics": {
            "test_accuracy": final["test_accuracy"],
            "train_accuracy": final["train_accuracy"],
            "n_test": len(y_test),
            "n_train": len(y_train),
            "trajectory": trajectory,
        },
        "seed": recipe.seed,
        "command": command(model),
        "checkpoints": steps,
        "training": {
            "steps": recipe.steps,
            "batch_size": recipe.batch_size,
            "optimizer": "AdamW",
            "lr": recipe.lr,
            "weight_decay": recipe.weight_decay,
            "schedule": "cosine decay to 0, no warmup",
            "loss": "cross-entropy",
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
        },
        "data": {
            "generator": "hookscope.data.digits.digits_tensors",
            "input": "[batch, 1, 8, 8] float32, sklearn grey levels / 16",
            "split": f"stratified, test_size={TEST_FRACTION}, random_state={SPLIT_SEED}",
            "accuracy": "hookscope.zoo.train_digits.accuracy (argmax logit == label, eval mode)",
        },
        "versions": {
            "torch": torch.__version__,
            "scikit-learn": sklearn.__version__,
            "python": platform.python_version(),
        },
    }
    return write_card(folder, info)  # adds the sha256 of every weight file just saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=(*MODELS, "all"), default="all")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="parent folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for model in MODELS if args.model == "all" else (args.model,):
        start = time.perf_counter()
        module, states = train(model)
        seconds = time.perf_counter() - start
        info = write(model, module, states, args.out / f"digits-{model}", seconds)
        m = info["metrics"]
        print(
            f"digits-{model}: test accuracy {m['test_accuracy']:.4f}, train "
            f"{m['train_accuracy']:.4f}, {len(info['checkpoints'])} checkpoints, {seconds:.0f} s"
        )


if __name__ == "__main__":
    main()
