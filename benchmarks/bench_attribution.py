"""Integrated gradients and Grad-CAM for all classes against captum, in one run (issue 17).

Run from the repository root:

    .venv/bin/python benchmarks/bench_attribution.py               # 256 images, 64 steps, 1 thread
    .venv/bin/python benchmarks/bench_attribution.py --threads 2
    .venv/bin/python benchmarks/bench_attribution.py --device cuda # both sides on a GPU
    .venv/bin/python benchmarks/bench_attribution.py --quick       # 32 images, 3 rounds (smoke run)

Data: the first ``--n`` digits test images (``hs.data.digits("test", tensors=True)``) and
their labels as targets, on the shipped ``digits-cnn`` and ``digits-mlp``.

* **Integrated gradients**, ``n_steps=--steps``, Gauss-Legendre (captum's default), zero
  baseline, with the completeness delta on both sides:
  ``hs.attribution.integrated_gradients(model, X, target=y)`` (its automatic chunks) against
  captum's ``IntegratedGradients(module).attribute(X, target=y, return_convergence_delta=
  True)`` twice: with captum's default (all ``n_steps x n`` rows in one batch) and with
  ``internal_batch_size`` equal to the rows of hookscope's chunks (the same chunking).
* **Grad-CAM for every class** at ``neuron.1`` (the second conv's ReLU output) of
  digits-cnn: ``grad_cam(cnn, X, target="all", site="neuron.1")`` (one forward, one batched
  backward) against captum's ``LayerGradCam(cnn, cnn[4]).attribute(X, target=k,
  relu_attributions=True)`` followed by ``LayerAttribution.interpolate(.., (8, 8),
  "bilinear")`` for k = 0..9, and against hookscope called once per class.

Timing: ``--rounds`` rounds; in each, every variant runs once, in an order rotated per
round (this VM's speed drifts by tens of percent within seconds; interleaving pairs the
variants in time). Reported: the median seconds of each variant, the median of the per-round
ratios captum / hookscope and its bootstrap 95 % interval. Equality: the largest absolute
difference of the attributions (and of the deltas) between the two libraries. Figures go to
``results/bench_attribution.json`` with versions, seed and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hookscope as hs  # noqa: E402
from hookscope import attribution as at  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(variants: dict, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Each variant once per round, the order rotated per round; seconds per call."""
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync(device)
            t = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def ratio(times: dict[str, list[float]], slow: str, fast: str, seed: int = 0) -> dict:
    r = np.array(times[slow]) / np.array(times[fast])
    rng = np.random.default_rng(seed)
    boots = np.median(rng.choice(r, size=(2000, len(r)), replace=True), axis=1)
    return {
        "median": float(np.median(r)),
        "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
    }


def ig_section(name: str, X, y, args, device) -> dict:
    from captum.attr import IntegratedGradients

    model = hs.zoo.load(name, device=str(device))
    module = model.model
    ours = at.integrated_gradients(model, X, target=y, n_steps=args.steps, progress=False)
    ref, ref_delta = IntegratedGradients(module).attribute(
        X, target=y, n_steps=args.steps, return_convergence_delta=True
    )
    rows = ours.conventions["internal_batch_size"]  # the rows of hookscope's own chunks
    ig = IntegratedGradients(module)
    times = interleaved(
        {
            "hookscope": lambda: at.integrated_gradients(
                model, X, target=y, n_steps=args.steps, progress=False
            ),
            "captum": lambda: ig.attribute(
                X, target=y, n_steps=args.steps, return_convergence_delta=True
            ),
            "captum_same_chunks": lambda: ig.attribute(
                X,
                target=y,
                n_steps=args.steps,
                internal_batch_size=rows,
                return_convergence_delta=True,
            ),
        },
        args.rounds,
        device,
    )
    return {
        "model": name,
        "chunk_rows": rows,
        "seconds": {k: float(np.median(v)) for k, v in times.items()},
        "times": times,
        "speedup": ratio(times, "captum", "hookscope"),
        "speedup_same_chunks": ratio(times, "captum_same_chunks", "hookscope"),
        "max_abs_diff": float((ours.values - ref).abs().max()),
        "max_abs_delta_diff": float((ours.delta - ref_delta).abs().max()),
        "max_abs_value": float(ref.abs().max()),
    }


def cam_section(X, args, device) -> dict:
    from captum.attr import LayerAttribution, LayerGradCam

    cnn = hs.zoo.load("digits-cnn", device=str(device))
    n_classes = 10
    gc = LayerGradCam(cnn.model, cnn.model[4])

    def captum_all():
        return torch.stack(
            [
                LayerAttribution.interpolate(
                    gc.attribute(X, target=k, relu_attributions=True), (8, 8), "bilinear"
                )[:, 0]
                for k in range(n_classes)
            ],
            1,
        )

    def ours_all():
        return at.grad_cam(cnn, X, target="all", site="neuron.1").values

    def ours_per_class():
        return torch.stack(
            [at.grad_cam(cnn, X, target=k, site="neuron.1").values for k in range(n_classes)], 1
        )

    diff = float((ours_all() - captum_all().detach()).abs().max())
    times = interleaved(
        {"hookscope": ours_all, "captum": captum_all, "hookscope_per_class": ours_per_class},
        args.rounds,
        device,
    )
    return {
        "site": "neuron.1",
        "seconds": {k: float(np.median(v)) for k, v in times.items()},
        "times": times,
        "speedup": ratio(times, "captum", "hookscope"),
        "speedup_vs_per_class_hookscope": ratio(times, "hookscope_per_class", "hookscope"),
        "max_abs_diff": diff,
        "max_abs_value": float(captum_all().detach().abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256, help="images")
    parser.add_argument("--steps", type=int, default=64, help="integrated-gradients steps")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_attribution.json"))
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds = 32, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    X, y = hs.data.digits("test", tensors=True)
    X, y = X[: args.n].to(device), y[: args.n].to(device)
    versions = {p: version(p) for p in ("torch", "captum", "numpy")}
    versions["python"] = platform.python_version()
    versions["hookscope"] = hs.__version__
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{args.n} images, {args.steps} steps, {args.threads} thread(s), {device}")
    result = {
        "command": "python " + " ".join(sys.argv),
        "versions": versions,
        "seed": 0,
        "device": str(device),
        "threads": args.threads,
        "n_images": args.n,
        "n_steps": args.steps,
        "rounds": args.rounds,
        "integrated_gradients": [
            ig_section(n, X, y, args, device) for n in ("digits-cnn", "digits-mlp")
        ],
        "grad_cam_all_classes": cam_section(X, args, device),
    }
    report(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


def report(r: dict) -> None:
    print(
        "\n| measurement | hookscope s | captum s | captum / hookscope [95% CI] | target | max |diff| |"
    )
    print("|---|---|---|---|---|---|")
    for s in r["integrated_gradients"]:
        sec, sp, same = s["seconds"], s["speedup"], s["speedup_same_chunks"]
        print(
            f"| IG {s['model']} | {sec['hookscope']:.3f} | {sec['captum']:.3f} | "
            f"{sp['median']:.2f} [{sp['ci95'][0]:.2f}, {sp['ci95'][1]:.2f}] | >= 1.5 | "
            f"{s['max_abs_diff']:.1e} (delta {s['max_abs_delta_diff']:.1e}) |"
        )
        print(
            f"| IG {s['model']}, captum with the same {s['chunk_rows']}-row chunks | "
            f"{sec['hookscope']:.3f} | {sec['captum_same_chunks']:.3f} | "
            f"{same['median']:.2f} [{same['ci95'][0]:.2f}, {same['ci95'][1]:.2f}] | | |"
        )
    c = r["grad_cam_all_classes"]
    sec, sp, pc = c["seconds"], c["speedup"], c["speedup_vs_per_class_hookscope"]
    print(
        f"| Grad-CAM, 10 classes | {sec['hookscope']:.4f} | {sec['captum']:.4f} | "
        f"{sp['median']:.2f} [{sp['ci95'][0]:.2f}, {sp['ci95'][1]:.2f}] | >= 3 | "
        f"{c['max_abs_diff']:.1e} |"
    )
    print(
        f"| Grad-CAM, hookscope once per class / all at once | {sec['hookscope']:.4f} | "
        f"{sec['hookscope_per_class']:.4f} | {pc['median']:.2f} | | |"
    )


if __name__ == "__main__":
    main()
