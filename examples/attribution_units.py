"""What the shipped digits models look at and how their units changed during training.

    .venv/bin/python examples/attribution_units.py --out results/attribution_units

* Grad-CAM and saliency of digits-cnn on test digits, and how much of each map falls on the
  ink (pixels > 0.25) against the ink's share of the image; integrated gradients and their
  completeness.
* The same Grad-CAM at an early checkpoint (step 16) and at the end: before, after,
  difference.
* digits-vit: attention rollout from the CLS token, head statistics and head importance.
* digits-cnn's first conv layer: which units woke up or died between step 16 and the end,
  and the inputs its most class-selective unit likes best.

Figures go to ``--out`` (PNG); the numbers are printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

import hookscope as hs  # noqa: E402
from hookscope import attribution as at  # noqa: E402
from hookscope import units  # noqa: E402

INK = 0.25


def ink_share(maps: torch.Tensor, images: torch.Tensor) -> tuple[float, float]:
    """(the share of the maps' total |value| on ink pixels, the ink's share of the pixels)."""
    ink = (images[:, 0] > INK).double()
    m = maps.abs().double().reshape(ink.shape)
    return float((m * ink).sum() / m.sum()), float(ink.mean())


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/attribution_units")
    parser.add_argument("--n", type=int, default=64, help="test images")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    X, y = hs.data.digits("test", tensors=True)
    X, y = X[: args.n], y[: args.n]

    cnn = hs.zoo.load("digits-cnn")
    early = hs.zoo.load("digits-cnn", checkpoint=16)
    cam = at.grad_cam(cnn, X, target=y, site="neuron.0")
    ig = at.integrated_gradients(cnn, X, target=y, n_steps=64)
    sal = at.saliency(cnn, X, target=y)
    shares = {"grad_cam": ink_share(cam.values, X), "saliency": ink_share(sal.values.sum(1), X)}
    for name, (on_ink, ink) in shares.items():
        print(f"{name:>9}: {on_ink:.1%} of |attribution| on ink, which is {ink:.1%} of pixels")
    # integrated gradients from a black baseline are (x - 0) * mean gradient: 0 wherever the
    # pixel is 0, so their share on ink says nothing about the model
    gap = ig.values.sum((1, 2, 3)) - ig.delta
    print(
        f"integrated gradients: attributions sum to F(x) - F(black) within "
        f"{float(ig.delta.abs().max()):.2e} (the gaps average {float(gap.abs().mean()):.2f})"
    )
    at.plot(cam, X, n=8).savefig(out / "grad_cam.png")
    at.plot(ig, X, n=8).savefig(out / "integrated_gradients.png")
    change = at.compare(early, cnn, X[:8], method="grad_cam", target=y[:8], site="neuron.0")
    print(
        f"Grad-CAM step 16 vs final: median correlation {float(change.similarity().nanmedian()):.3f}"
    )
    change.plot(X[:8]).savefig(out / "grad_cam_step16_vs_final.png")

    vit = hs.zoo.load("digits-vit")
    roll = at.attention_rollout(vit, X)
    roll.plot(X[:8]).savefig(out / "rollout.png")
    heads = units.head_stats(vit, X, y)
    heads.plot().savefig(out / "vit_head_patterns.png")
    importance = units.head_importance(vit, X, y)
    importance.plot().savefig(out / "vit_head_importance.png")
    top_head = divmod(int(importance.accuracy_drop.argmax()), importance.accuracy_drop.shape[1])
    print(
        f"ViT: ablating head {top_head[0]}.{top_head[1]} costs the most accuracy "
        f"({float(importance.accuracy_drop.max()):.3f}); rollout's CLS row puts "
        f"{ink_share(roll.grid.repeat_interleave(2, 1).repeat_interleave(2, 2), X)[0]:.1%} "
        "of its mass on ink"
    )

    before = units.neuron_stats(early, X, y, site="neuron.0")
    after = units.neuron_stats(cnn, X, y, site="neuron.0")
    changed = units.compare_neurons(before, after)
    counts = changed.to_pandas()["status"].value_counts().to_dict()
    print(f"digits-cnn neuron.0, step 16 -> final: {counts}")
    changed.plot().savefig(out / "neurons_step16_vs_final.png")
    selective = int(after.selectivity.nan_to_num(-1).argmax())
    top = units.top_activating(cnn, X, site=f"neuron.0.{selective}", k=10)
    top.plot().savefig(out / "top_activating.png")
    print(
        f"most class-selective unit neuron.0.{selective} (selectivity "
        f"{float(after.selectivity[selective]):.3f}); its top inputs' labels: "
        f"{y[top.indices].tolist()}"
    )
    print(f"figures in {out}")
    return {
        "shares": shares,
        "ig": ig,
        "importance": importance,
        "top_head": top_head,
        "changed": changed,
        "counts": counts,
        "selective": selective,
        "top": top,
    }


if __name__ == "__main__":
    results = main()
