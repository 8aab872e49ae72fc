"""Every unit analysis on two checkpoints of a model, and what changed.

:func:`compare` runs one analysis of :data:`ANALYSES` with the same arguments on ``before``
and ``after`` (HookedModels, torch modules: ``hs.zoo.load(name, checkpoint=k)``, a
tracker's ``Checkpoints(folder).load(step, model)``) and lines up the quantities each
reports:

=================  ==========================================  ============================
analysis           quantities compared (after - before)        also reported
=================  ==========================================  ============================
head_stats         entropy, gini, max_weight, distance,        (see also
                   cls_share, selectivity [layer, head]        :func:`compare_heads`)
head_importance    accuracy_drop, loss_increase [layer, head]
head_probe         class_accuracy, position_accuracy
cluster_heads      -                                           adjusted Rand index of the
                                                               two labelings, heads moved
neuron_stats       mean, std, sparsity, selectivity [unit]     (see also
                                                               :func:`compare_neurons`)
top_activating     value at each rank [k]                      overlap of the top-k inputs
composition        r2 [late unit]
receptive_field    map [H, W]
=================  ==========================================  ============================

The result has ``before``, ``after`` (the two results), ``quantities`` (name -> (before,
after) tensors), ``difference(name)``, ``to_pandas()`` (one row per quantity and cell),
a text summary and ``plot()``: per quantity, before / after / difference panels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope.errors import InputError, format_choices

__all__ = ["ANALYSES", "UnitComparison", "compare"]

ANALYSES = (
    "head_stats",
    "head_importance",
    "head_probe",
    "cluster_heads",
    "neuron_stats",
    "top_activating",
    "composition",
    "receptive_field",
)


def _quantities(method: str, result: Any) -> dict[str, Tensor]:
    """The aligned tensors of ``result`` that a comparison subtracts."""
    if method == "head_stats":
        names = ["entropy", "gini", "max_weight", "distance", "cls_share", "selectivity"]
        return {n: getattr(result, n) for n in names if getattr(result, n) is not None}
    if method == "head_importance":
        found = {"accuracy_drop": result.accuracy_drop, "loss_increase": result.loss_increase}
        return {k: v for k, v in found.items() if v is not None}
    if method == "head_probe":
        return {
            "class_accuracy": result.class_accuracy,
            "position_accuracy": result.position_accuracy,
        }
    if method == "cluster_heads":
        return {}
    if method == "neuron_stats":
        found = {
            "mean": result.mean,
            "std": result.std,
            "sparsity": result.sparsity,
            "selectivity": result.selectivity,
        }
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in found.items()}
    if method == "top_activating":
        return {"value": result.values}
    if method == "composition":
        return {"r2": result.r2}
    return {"map": result.map}


def _runner(method: str) -> Callable[..., Any]:
    from hookscope import units

    return getattr(units, method)


@dataclass(repr=False, eq=False)
class UnitComparison:
    """One unit analysis on two checkpoints (see the module docstring)."""

    method: str
    before: Any
    after: Any
    quantities: dict[str, tuple[Tensor, Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)
    names: tuple[str, str] = ("before", "after")

    def difference(self, name: str) -> Tensor:
        """``after - before`` of quantity ``name``."""
        if name not in self.quantities:
            raise InputError(
                f"{self.method} comparisons have no quantity {name!r}; choose one of "
                f"{format_choices(list(self.quantities))}"
            )
        a, b = self.quantities[name]
        return b.double() - a.double()

    def to_pandas(self):
        """One row per quantity and cell: ``quantity``, ``index`` (the cell, e.g. ``(layer,
        head)``), the two values and their difference."""
        import pandas as pd

        rows = []
        for name, (a, b) in self.quantities.items():
            a_np, b_np = a.double().cpu().numpy(), b.double().cpu().numpy()
            for idx in np.ndindex(a_np.shape):
                rows.append(
                    {
                        "quantity": name,
                        "index": idx if len(idx) != 1 else idx[0],
                        self.names[0]: a_np[idx],
                        self.names[1]: b_np[idx],
                        "difference": b_np[idx] - a_np[idx],
                    }
                )
        return pd.DataFrame(rows, columns=["quantity", "index", *self.names, "difference"])

    def __repr__(self) -> str:
        lines = [f"UnitComparison({self.method}: {self.names[0]} vs {self.names[1]})"]
        for name, (a, b) in self.quantities.items():
            d = (b.double() - a.double()).flatten()
            finite = d[torch.isfinite(d)]
            if finite.numel():
                top = int(torch.where(torch.isfinite(d), d.abs(), -1.0).argmax())
                cell = np.unravel_index(top, tuple(a.shape)) if a.ndim else ()
                lines.append(
                    f"  {name}: mean |difference| {float(finite.abs().mean()):.4g}, largest "
                    f"{float(d[top]):+.4g} at {tuple(int(i) for i in cell)}"
                )
            else:
                lines.append(f"  {name}: no finite values")
        for key, value in self.extra.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"  {key}: {shown}")
        return "\n".join(lines)

    def plot(self):
        """Per quantity a row of three panels: before, after (one colour scale) and the
        difference (diverging). Matrices are drawn as images (``ax.images[-1]`` holds the
        values), vectors as bars (the bar heights are the values)."""
        from hookscope.plot import figure

        names = list(self.quantities)
        if not names:
            return self._plot_labels()
        fig = figure(figsize=(10, 2.6 * len(names) + 0.4), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(names), 3, squeeze=False))
        for r, name in enumerate(names):
            a, b = (t.double().cpu() for t in self.quantities[name])
            panels = [(self.names[0], a), (self.names[1], b), ("difference", b - a)]
            both = torch.cat([a.flatten(), b.flatten()])
            both = both[torch.isfinite(both)]
            lo, hi = (float(both.min()), float(both.max())) if both.numel() else (0.0, 1.0)
            for c, (title, t) in enumerate(panels):
                ax = axes[r, c]
                if t.ndim >= 2:
                    if c < 2:
                        ax.imshow(t.numpy(), cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
                    else:
                        top = float(t[torch.isfinite(t)].abs().max()) if t.numel() else 1.0
                        top = top or 1.0
                        ax.imshow(t.numpy(), cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto")
                else:
                    t = t.reshape(-1)
                    ax.bar(np.arange(len(t)), t.numpy(), color="#2166ac" if c < 2 else "#b2182b")
                ax.set_title(f"{name}: {title}", fontsize=8)
        fig.suptitle(f"{self.method}: {self.names[0]} vs {self.names[1]}", fontsize=9)
        return fig

    def _plot_labels(self):
        """cluster_heads: the cluster of every head before and after (a 2 x heads grid)."""
        from hookscope.plot import figure

        grid = np.stack([self.before.labels.numpy(), self.after.labels.numpy()])
        fig = figure(figsize=(max(4, 0.3 * grid.shape[1] + 1), 2.2), layout="constrained")
        ax = fig.subplots()
        ax.imshow(grid, cmap="tab10", aspect="auto", interpolation="nearest")
        ax.set_yticks([0, 1])
        ax.set_yticklabels(list(self.names))
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xticklabels(self.before.names, rotation=90, fontsize=7)
        ax.set_title(
            f"cluster_heads: adjusted Rand index {self.extra['adjusted_rand_index']:.3f}",
            fontsize=9,
        )
        return fig


def compare(
    before: Any,
    after: Any,
    inputs: Any,
    *args: Any,
    method: str | None = None,
    names: tuple[str, str] = ("before", "after"),
    **kwargs: Any,
) -> UnitComparison:
    """Run the unit analysis ``method`` (one of :data:`ANALYSES`) with ``args``/``kwargs``
    on both models and compare (module docstring). ``names``: how the two models are shown
    (repr, plot titles, :meth:`UnitComparison.to_pandas` columns); ``labels=`` goes to the
    analysis. The call is checked against the analysis' signature before anything runs.

    >>> cmp = units.compare(hs.zoo.load("digits-cnn", checkpoint=16), hs.zoo.load("digits-cnn"),
    ...                     X, method="receptive_field", site="neuron.1.3")   # doctest: +SKIP
    >>> cmp.difference("map"); cmp.plot()                                      # doctest: +SKIP
    """
    if method is None:
        raise InputError(f"compare needs method=, one of {format_choices(ANALYSES)}")
    from hookscope.attribution._common import comparison_call

    before, after, run = comparison_call(
        before, after, method, ANALYSES, names, _runner, args, kwargs
    )
    first = run(before, inputs, *args, **kwargs)
    second = run(after, inputs, *args, **kwargs)
    qa, qb = _quantities(method, first), _quantities(method, second)
    quantities = {}
    for name in qa:
        a, b = torch.as_tensor(qa[name]), torch.as_tensor(qb[name])
        if a.shape != b.shape:
            raise InputError(
                f"the two models give {method} {name} of shapes {tuple(a.shape)} and "
                f"{tuple(b.shape)}: compare checkpoints of one architecture"
            )
        quantities[name] = (a, b)
    extra: dict[str, Any] = {}
    if method == "cluster_heads":
        from sklearn.metrics import adjusted_rand_score

        if first.names != second.names:
            raise InputError(
                f"the two models have different heads ({len(first.names)} vs "
                f"{len(second.names)}): compare checkpoints of one architecture"
            )
        extra["adjusted_rand_index"] = float(
            adjusted_rand_score(first.labels.numpy(), second.labels.numpy())
        )
        extra["k"] = (first.k, second.k)
    if method == "top_activating":
        a_set, b_set = set(_top_keys(first)), set(_top_keys(second))
        extra["top_k_overlap"] = len(a_set & b_set) / max(len(a_set), 1)
    return UnitComparison(method, first, second, quantities, extra, (names[0], names[1]))


def _top_keys(result: Any) -> list[tuple[int, ...]]:
    """The top-k entries as (input index,) or (input index, position) for tokens."""
    idx = result.indices.tolist()
    if result.positions is None:
        return [(i,) for i in idx]
    return list(zip(idx, result.positions.tolist(), strict=True))
