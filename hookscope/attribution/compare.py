"""One attribution method on two checkpoints of a model, and the difference.

``before`` / ``after`` are anything :func:`hookscope.attribution` methods take: a
HookedModel (``hs.zoo.load("digits-cnn", checkpoint=16)``), a torch module (a tracker
checkpoint: ``hs.tracking.Checkpoints(folder).load(step, model)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope.attribution._common import comparison_call, predicted_classes, prepare_inputs
from hookscope.attribution.result import _image
from hookscope.errors import InputError

__all__ = ["Comparison", "compare", "COMPARABLE"]


def _methods() -> dict[str, Callable[..., Any]]:
    from hookscope.attribution.attention import attention_flow, attention_rollout
    from hookscope.attribution.grad_cam import grad_cam
    from hookscope.attribution.gradients import integrated_gradients, saliency

    return {
        "grad_cam": grad_cam,
        "saliency": saliency,
        "integrated_gradients": integrated_gradients,
        "attention_rollout": attention_rollout,
        "attention_flow": attention_flow,
    }


#: the methods that take a target (``target=None`` in :func:`compare`: the ``after``
#: model's predicted class, the same for both models)
TARGETED = ("grad_cam", "saliency", "integrated_gradients")
COMPARABLE = (
    "grad_cam",
    "saliency",
    "integrated_gradients",
    "attention_rollout",
    "attention_flow",
)


def _values(result: Any) -> Tensor:
    """The per-example values a result compares by: an Attributions' values; a rollout's row
    over the patch grid (images) or over the tokens (text)."""
    from hookscope.attribution.attention import Rollout

    if isinstance(result, Rollout) and result.is_image:
        return result.grid
    return result.values


@dataclass(repr=False)
class Comparison:
    """``before`` and ``after`` results of one method on the same inputs and targets, and
    ``difference`` = after - before (same shape as the values).

    ``similarity()``: per example, the Pearson correlation of the two maps (NaN where a map
    is constant); ``to_pandas()`` one row per example: the correlation, mean |before|,
    mean |after|, mean |difference|.
    """

    method: str
    before: Any
    after: Any
    difference: Tensor
    names: tuple[str, str] = ("before", "after")

    def similarity(self) -> Tensor:
        a = _values(self.before).reshape(len(self.difference), -1).double()
        b = _values(self.after).reshape(len(self.difference), -1).double()
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        den = a.norm(dim=1) * b.norm(dim=1)
        return torch.where(den > 0, (a * b).sum(1) / den, torch.full_like(den, float("nan")))

    def to_pandas(self):
        import pandas as pd

        n = len(self.difference)
        flat = lambda t: t.reshape(n, -1).double().abs().mean(1).numpy()  # noqa: E731
        return pd.DataFrame(
            {
                "example": np.arange(n),
                "correlation": self.similarity().numpy(),
                f"mean_abs_{self.names[0]}": flat(_values(self.before)),
                f"mean_abs_{self.names[1]}": flat(_values(self.after)),
                "mean_abs_difference": flat(self.difference),
            }
        )

    def __repr__(self) -> str:
        sim = self.similarity()
        frame = self.to_pandas()
        return (
            f"Comparison({self.method}: {self.names[0]} vs {self.names[1]}, "
            f"{len(self.difference)} examples; median correlation "
            f"{float(np.nanmedian(sim.numpy())):.3f}, mean |difference| "
            f"{float(frame['mean_abs_difference'].mean()):.4g})\n"
            + frame.head(8).to_string(index=False, float_format=lambda v: f"{v:.4g}")
        )

    def plot(self, images: Tensor | None = None, *, n: int = 8):
        """Three rows (before, after, difference) of the first ``n`` examples' maps, over the
        images when given. Each axes' last image holds the values drawn."""
        from hookscope.plot import figure

        if not isinstance(n, int) or n < 1:
            raise InputError(f"n must be a positive number of examples, got {n!r}")
        count = min(n, len(self.difference))
        if self.method == "grad_cam" and self.difference.ndim == 4:
            raise InputError(
                "these maps have a class axis (grad_cam with target='all'); plot one class: "
                "compare with target=k"
            )
        rows = [
            (self.names[0], _values(self.before)),
            (self.names[1], _values(self.after)),
            ("difference", self.difference),
        ]
        fig = figure(figsize=(1.6 * count + 0.8, 5.2), layout="constrained")
        axes = np.atleast_2d(fig.subplots(3, count, squeeze=False))
        top = max(float(v[:count].abs().max()) for _, v in rows[:2]) or 1.0
        diff_top = float(self.difference[:count].abs().max()) or 1.0
        for r, (label, values) in enumerate(rows):
            for j in range(count):
                ax = axes[r, j]
                m = _as_map(values[j])
                if images is not None and m.shape == _image(images[j]).shape[:2]:
                    ax.imshow(_image(images[j]), cmap="gray")
                if r < 2:
                    ax.imshow(
                        m,
                        cmap="inferno",
                        vmin=-top if (m < 0).any() else 0,
                        vmax=top,
                        alpha=0.6 if images is not None else 1.0,
                    )
                else:
                    ax.imshow(
                        m,
                        cmap="RdBu_r",
                        vmin=-diff_top,
                        vmax=diff_top,
                        alpha=0.7 if images is not None else 1.0,
                    )
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
        fig.suptitle(f"{self.method}: {self.names[0]} vs {self.names[1]}", fontsize=9)
        return fig


def _as_map(v: Tensor) -> np.ndarray:
    v = v.detach().cpu().double()
    if v.ndim == 3:  # [C, H, W] input attributions: sum channels
        v = v.sum(0)
    if v.ndim == 1:
        v = v.unsqueeze(0)
    return v.numpy()


def compare(
    before: Any,
    after: Any,
    inputs: Any,
    *,
    method: str = "grad_cam",
    names: tuple[str, str] = ("before", "after"),
    **kwargs: Any,
) -> Comparison:
    """Run ``method`` (one of :data:`COMPARABLE`) with ``kwargs`` on both models.

    Both runs explain the same targets: without ``target=``, the ``after`` model's predicted
    class of each example.

    >>> cmp = compare(hs.zoo.load("digits-cnn", checkpoint=16), hs.zoo.load("digits-cnn"),
    ...               X[:8], method="grad_cam", target=y[:8], site="neuron.1")  # doctest: +SKIP
    >>> cmp.plot(X[:8])                                                          # doctest: +SKIP
    """
    before, after, run = comparison_call(
        before, after, method, COMPARABLE, names, lambda m: _methods()[m], (), kwargs
    )
    if method in TARGETED and kwargs.get("target") is None:
        # one target for both: the predicted class of the ``after`` model
        kwargs = {**kwargs, "target": predicted_classes(after, prepare_inputs(after, inputs))}
    first = run(before, inputs, **kwargs)
    second = run(after, inputs, **kwargs)
    a, b = _values(first), _values(second)
    if a.shape != b.shape:
        raise InputError(
            f"the two models give {method} values of different shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}: compare checkpoints of one architecture"
        )
    return Comparison(method, first, second, b - a, (names[0], names[1]))
