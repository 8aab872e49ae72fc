"""Per-unit statistics of one neuron layer: :func:`neuron_stats` and :func:`compare_neurons`.

Conventions (sites and samples: :mod:`hookscope.units._common`):

* **Active** means ``activation > threshold`` (default 0, as in
  :func:`hookscope.analysis.geometry.dead_neurons`); **sparsity** is the fraction of samples
  where a unit is inactive (``<= threshold``); **dead** means never active (sparsity 1).
* **Selectivity** is :func:`hookscope.analysis.geometry.class_selectivity` (Morcos et al.
  2018) over the samples, each sample carrying its input's label; it needs non-negative
  activations (post-ReLU) and is NaN otherwise (with a warning) and without labels.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hookscope.analysis.geometry import (
    NeuronStatsComparison,
    class_selectivity,
    compare_neuron_stats,
    dead_neurons,
)
from hookscope.attribution._common import as_model, prepare_inputs
from hookscope.errors import InputError, format_choices
from hookscope.modes import in_eval_mode

from ._common import (
    as_labels,
    batches,
    check_reduce,
    is_real,
    kind_of,
    neuron_layer,
    positive_int,
    unit_axis,
    unit_samples,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["NeuronStats", "neuron_stats", "NeuronComparison", "compare_neurons"]

STATUSES = ("dead", "woke up", "died", "changed", "stable")


# ------------------------------------------------------------------------- neuron stats


@dataclass(frozen=True, repr=False, eq=False)
class NeuronStats:
    """Per-unit statistics of one neuron layer over a set of inputs.

    ``activations`` [samples, units] (float32; the per-sample values, see the module
    docstring), ``example`` [samples] (the input row of each sample), ``labels`` [samples]
    or None. ``mean``, ``std`` (population, ddof 0), ``sparsity`` (fraction ``<=
    threshold``), ``dead`` (bool), ``selectivity`` (NaN without labels), ``preferred_class``
    (-1 for dead units or without labels): [units]. ``classes`` [c] and ``class_means`` [c,
    units] (empty without labels). ``kind``: "features", "spatial" (conv maps reduced by
    ``reduce``) or "positions" (see the module docstring).
    """

    site: str
    kind: str
    reduce: str | None
    threshold: float
    activations: Tensor
    example: Tensor
    labels: Tensor | None
    mean: Tensor
    std: Tensor
    sparsity: Tensor
    dead: Tensor
    selectivity: Tensor
    preferred_class: Tensor
    classes: Tensor
    class_means: Tensor

    @property
    def n_units(self) -> int:
        return self.activations.shape[1]

    @property
    def n_samples(self) -> int:
        return self.activations.shape[0]

    def to_pandas(self) -> pd.DataFrame:
        """One row per unit: mean, std, sparsity, dead, selectivity, preferred_class."""
        return pd.DataFrame(
            {
                "unit": np.arange(self.n_units),
                "mean": self.mean.numpy(),
                "std": self.std.numpy(),
                "sparsity": self.sparsity.numpy(),
                "dead": self.dead.numpy(),
                "selectivity": self.selectivity.numpy(),
                "preferred_class": self.preferred_class.numpy(),
            }
        )

    def describe_samples(self) -> str:
        if self.kind == "spatial":
            return f"conv channels reduced by spatial {self.reduce}"
        if self.kind == "positions":
            return "one sample per real token / patch position"
        return "one sample per input"

    def __repr__(self) -> str:
        dead = int(self.dead.sum())
        sel = self.selectivity[~self.dead]
        sel_text = (
            f", mean selectivity {float(sel.mean()):.3f} (alive units)"
            if sel.numel() and bool(torch.isfinite(sel).all())
            else ""
        )
        head = (
            f"NeuronStats({self.site}: {self.n_units} units, {self.n_samples} samples, "
            f"{self.describe_samples()}, active = > {self.threshold:g})\n"
            f"  dead {dead} ({dead / self.n_units:.1%}), mean sparsity "
            f"{float(self.sparsity.mean()):.3f}{sel_text}\n"
        )
        df = self.to_pandas()
        more = f"\n  ... {len(df) - 16} more units" if len(df) > 16 else ""
        return head + df.head(16).to_string(index=False, float_format="{:.4f}".format) + more

    def compare(self, after: NeuronStats, *, min_change: float = 0.5) -> NeuronComparison:
        """:func:`compare_neurons` of these statistics (before) with ``after``."""
        return compare_neurons(self, after, min_change=min_change)

    def class_grid(self, normalize: bool = True) -> np.ndarray:
        """The neuron grid :meth:`plot` draws: class means [units, classes], each row divided
        by its largest absolute value when ``normalize`` (rows of zeros stay zero)."""
        if self.labels is None:
            raise InputError("the class grid needs labels: neuron_stats(model, X, labels, ...)")
        grid = self.class_means.T.double().numpy().copy()
        if normalize:
            scale = np.abs(grid).max(axis=1, keepdims=True)
            grid = np.divide(grid, scale, out=np.zeros_like(grid), where=scale > 0)
        return grid

    def plot(self, normalize: bool = True) -> Figure:
        """Neuron grid: class-mean activation per unit (rows) and class (columns), with
        selectivity and dead units in the row labels; without labels, mean and sparsity bars."""
        from hookscope.plot import figure

        if self.labels is None:
            fig = figure(figsize=(max(5.0, 0.18 * self.n_units + 2), 4.5))
            top, bottom = fig.subplots(2, 1, sharex=True)
            units = np.arange(self.n_units)
            top.bar(units, self.mean.numpy(), yerr=self.std.numpy(), color="C0")
            top.set_ylabel("mean")
            bottom.bar(units, self.sparsity.numpy(), color="C1")
            bottom.set_ylabel("sparsity")
            bottom.set_xlabel("unit")
            top.set_title(f"{self.site}: {self.describe_samples()}", fontsize=9)
            fig.tight_layout()
            return fig
        grid = self.class_grid(normalize)
        fig = figure(figsize=(1.2 + 0.35 * grid.shape[1], max(3.0, 0.22 * self.n_units + 1.2)))
        ax = fig.subplots()
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in self.classes.tolist()])
        names = [
            f"{u} dead" if d else f"{u} ({s:.2f})"
            for u, (d, s) in enumerate(
                zip(self.dead.tolist(), self.selectivity.tolist(), strict=True)
            )
        ]
        ax.set_yticks(range(self.n_units), names, fontsize=6)
        ax.set_xlabel("class")
        ax.set_ylabel("unit (selectivity)")
        what = "class mean / unit max" if normalize else "class mean"
        ax.set_title(f"{self.site}: {what}", fontsize=9)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        return fig


def stats_from_samples(
    site: str,
    kind: str,
    reduce: str | None,
    threshold: float,
    activations: Tensor,
    example: Tensor,
    labels: Tensor | None,
) -> NeuronStats:
    """:class:`NeuronStats` of a samples x units matrix (the geometry functions do the
    dead / selectivity mathematics)."""
    a64 = activations.double()
    dead = dead_neurons(activations, threshold)
    units = activations.shape[1]
    selectivity = torch.full((units,), float("nan"), dtype=torch.float64)
    preferred = torch.full((units,), -1, dtype=torch.long)
    classes = torch.zeros(0, dtype=torch.long)
    class_means = torch.zeros(0, units, dtype=torch.float64)
    if labels is not None:
        classes, idx = torch.unique(labels, return_inverse=True)
        sums = a64.new_zeros(classes.numel(), units).index_add_(0, idx, a64)
        class_means = sums / torch.bincount(idx, minlength=classes.numel())[:, None].double()
        preferred = torch.where(dead, -1, classes[class_means.argmax(0)])
        if classes.numel() < 2:
            warnings.warn("class selectivity needs two classes or more; it is NaN", stacklevel=3)
        elif bool((activations < 0).any()):
            warnings.warn(
                f"{site} has negative activations; class selectivity (Morcos et al.) is defined "
                "for non-negative ones (a post-ReLU site) and is NaN here",
                stacklevel=3,
            )
        else:
            selectivity = class_selectivity(a64, labels).double()
    return NeuronStats(
        site=site,
        kind=kind,
        reduce=reduce,
        threshold=float(threshold),
        activations=activations,
        example=example,
        labels=labels,
        mean=a64.mean(0),
        std=a64.std(0, correction=0),
        sparsity=(activations <= threshold).double().mean(0),
        dead=dead,
        selectivity=selectivity,
        preferred_class=preferred,
        classes=classes,
        class_means=class_means,
    )


@in_eval_mode
def neuron_stats(
    model: Any,
    inputs: Any,
    labels: Any = None,
    *,
    site: Any,
    reduce: str = "mean",
    threshold: float = 0.0,
    batch_size: int = 256,
    progress: bool | None = None,
) -> NeuronStats:
    """Mean, std, sparsity, dead and class selectivity of every unit of one neuron layer.

    ``inputs``: images / features ``[batch, ...]``, token ids, texts or a dict with
    ``input_ids`` and ``attention_mask``. ``labels``: one class per input ([batch]), or None.
    ``site``: a layer such as ``neuron.0``. Conv channels are reduced over space by
    ``reduce`` ("mean" or "max"); language-model neurons give one sample per real position
    (each carrying its input's label). Run in batches of ``batch_size`` inputs; the result
    keeps the ``[samples, units]`` float32 matrix (for a long text corpus: samples = tokens).

    >>> n = units.neuron_stats(cnn, X, y, site="neuron.0")  # doctest: +SKIP
    """
    m = as_model(model)
    address = neuron_layer(m, site, "neuron_stats")
    reduce = check_reduce(reduce)
    batch_size = positive_int(batch_size, "batch_size")
    if not is_real(threshold):
        raise InputError(f"threshold must be a finite number; got {threshold!r}")
    if not math.isfinite(threshold):
        raise InputError(f"threshold must be a finite number; got {threshold!r}")
    prepared = prepare_inputs(m, inputs)
    # one class is accepted here: selectivity is then NaN, with a warning
    y = None if labels is None else as_labels(labels, prepared.batch, min_classes=1)
    mats, rows = [], []
    kind = "features"
    for start, acts, mask in batches(m, prepared, [address], batch_size, progress, "neuron stats"):
        act = acts[str(address)]
        axis = unit_axis(m, address, act.ndim)
        kind = kind_of(act.ndim, axis)
        mat, example, _ = unit_samples(act, axis, mask, reduce)
        mats.append(mat)
        rows.append(example + start)
    activations = torch.cat(mats)
    example = torch.cat(rows)
    return stats_from_samples(
        str(address),
        kind,
        reduce if kind == "spatial" else None,
        float(threshold),
        activations,
        example,
        None if y is None else y[example],
    )


# ---------------------------------------------------------------------------- comparison


@dataclass(frozen=True, repr=False, eq=False)
class NeuronComparison:
    """The same units on the same inputs, before and after (two checkpoints, an edit).

    ``status`` per unit: "dead" (dead both times), "woke up" (dead before, alive after),
    "died", "changed" (alive both times and ``|effect_size| >= min_change``) or "stable";
    a new preferred class shows in :meth:`to_pandas` (``preferred_changed``). ``effect_size`` [units]: the change of the mean over the
    pooled std, ``(mean_after - mean_before) / sqrt((std_b^2 + std_a^2) / 2)`` (Cohen's d;
    inf when both stds are 0 and the means differ). ``geometry`` is the
    :class:`~hookscope.analysis.geometry.NeuronStatsComparison` (dead and selectivity).
    """

    before: NeuronStats
    after: NeuronStats
    geometry: NeuronStatsComparison
    effect_size: Tensor
    status: tuple[str, ...]
    min_change: float

    def summary(self) -> dict[str, float]:
        """Units per status and the geometry summary (dead fractions, selectivities)."""
        counts = {s: float(self.status.count(s)) for s in STATUSES}
        return {**counts, **self.geometry.summary()}

    def units(self, status: str) -> list[int]:
        """The units with ``status`` (one of dead, woke up, died, changed, stable)."""
        if status not in STATUSES:
            raise InputError(f"status must be one of {format_choices(STATUSES)}; got {status!r}")
        return [u for u, s in enumerate(self.status) if s == status]

    def to_pandas(self) -> pd.DataFrame:
        """One row per unit: status, and mean / sparsity / selectivity / preferred class
        before and after."""
        b, a = self.before, self.after
        return pd.DataFrame(
            {
                "unit": np.arange(b.n_units),
                "status": list(self.status),
                "mean_before": b.mean.numpy(),
                "mean_after": a.mean.numpy(),
                "effect_size": self.effect_size.numpy(),
                "sparsity_before": b.sparsity.numpy(),
                "sparsity_after": a.sparsity.numpy(),
                "selectivity_before": self.geometry.selectivity_before.double().numpy(),
                "selectivity_after": self.geometry.selectivity_after.double().numpy(),
                "preferred_before": b.preferred_class.numpy(),
                "preferred_after": a.preferred_class.numpy(),
                "preferred_changed": (b.preferred_class != a.preferred_class).numpy(),
            }
        )

    def __repr__(self) -> str:
        s = self.summary()
        counts = ", ".join(f"{k} {int(s[k])}" for k in STATUSES)
        lines = [f"  {k:<24} {v:.4g}" for k, v in self.geometry.summary().items()]
        df = self.to_pandas()
        moved = df[df["status"].isin(["woke up", "died", "changed"])]
        table = (
            "\n" + moved.head(16).to_string(index=False, float_format="{:.3f}".format)
            if len(moved)
            else ""
        )
        return (
            f"NeuronComparison({self.before.site}: {self.before.n_units} units, "
            f"{self.before.n_samples} samples; changed = alive and |effect size| >= "
            f"{self.min_change:g})\n  {counts}\n" + "\n".join(lines) + table
        )

    def plot(self) -> Figure:
        """Left: each unit's mean before vs after, coloured by status. Right: the class
        selectivity histograms before and after (when labelled) or the status counts."""
        from hookscope.plot import figure

        fig = figure(figsize=(9, 3.8))
        left, right = fig.subplots(1, 2)
        colours = {
            "dead": "0.6",
            "woke up": "C2",
            "died": "C3",
            "changed": "C1",
            "stable": "C0",
        }
        mb, ma = self.before.mean.numpy(), self.after.mean.numpy()
        for status in STATUSES:
            idx = self.units(status)
            if idx:
                left.scatter(mb[idx], ma[idx], s=18, color=colours[status], label=status)
        lo = float(min(mb.min(), ma.min()))
        hi = float(max(mb.max(), ma.max()))
        left.plot([lo, hi], [lo, hi], color="0.8", lw=0.8, zorder=0)
        left.set_xlabel("mean before")
        left.set_ylabel("mean after")
        left.legend(fontsize=7)
        left.set_title(self.before.site, fontsize=9)
        sel_b = self.geometry.selectivity_before.double().numpy()
        sel_a = self.geometry.selectivity_after.double().numpy()
        if np.isfinite(sel_b).all() and np.isfinite(sel_a).all():
            bins = np.linspace(0, 1, 26)
            right.hist(sel_b, bins, alpha=0.6, label="before")
            right.hist(sel_a, bins, alpha=0.6, label="after")
            right.set_xlabel("class selectivity")
            right.set_ylabel("units")
            right.legend(fontsize=7)
        else:
            right.bar(list(STATUSES), [self.status.count(s) for s in STATUSES])
            right.set_ylabel("units")
            right.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        return fig


def compare_neurons(
    before: NeuronStats, after: NeuronStats, *, min_change: float = 0.5
) -> NeuronComparison:
    """Which units are dead, woke up, died or changed between two :class:`NeuronStats` of
    the same site on the same inputs (e.g. two checkpoints).

    Dead and selectivity come from
    :func:`~hookscope.analysis.geometry.compare_neuron_stats` on the two activation matrices;
    ``min_change`` is the effect size (Cohen's d) from which an alive unit counts as changed.
    """
    for name, value in (("before", before), ("after", after)):
        if not isinstance(value, NeuronStats):
            raise InputError(
                f"{name} must be a NeuronStats (units.neuron_stats(model, X, y, site=...)); got "
                f"{type(value).__name__}"
            )
    if before.activations.shape != after.activations.shape or not torch.equal(
        before.example, after.example
    ):
        raise InputError(
            f"before has {before.n_samples} samples x {before.n_units} units but after has "
            f"{after.n_samples} x {after.n_units}; compare the same site on the same inputs"
        )
    if (before.site, before.reduce) != (after.site, after.reduce):
        raise InputError(
            f"before is {before.site} ({before.describe_samples()}) but after is {after.site} "
            f"({after.describe_samples()}); compare the same site with the same reduce"
        )
    if before.threshold != after.threshold:
        raise InputError(
            f"before uses threshold {before.threshold} and after {after.threshold}; use one"
        )
    if not is_real(min_change) or not min_change >= 0:
        raise InputError(f"min_change must be a number >= 0; got {min_change!r}")
    labelled = before.labels is not None and after.labels is not None
    if labelled and not torch.equal(before.labels, after.labels):
        raise InputError("before and after were computed with different labels")
    if labelled and bool(
        torch.isfinite(before.selectivity).all() & torch.isfinite(after.selectivity).all()
    ):
        geometry = compare_neuron_stats(
            before.activations, after.activations, before.labels, before.threshold
        )
    else:  # no labels, or negative activations: selectivity stays NaN
        geometry = NeuronStatsComparison(
            before.dead, after.dead, before.selectivity, after.selectivity
        )
    diff = after.mean - before.mean
    pooled = ((before.std.square() + after.std.square()) / 2).sqrt()
    effect = torch.where(
        pooled > 0,
        diff / pooled.clamp_min(1e-300),
        torch.where(diff == 0, torch.zeros_like(diff), diff.sign() * math.inf),
    )
    status = []
    for u in range(before.n_units):
        was, now = bool(geometry.dead_before[u]), bool(geometry.dead_after[u])
        if was and now:
            status.append("dead")
        elif was:
            status.append("woke up")
        elif now:
            status.append("died")
        elif abs(float(effect[u])) >= min_change:
            status.append("changed")
        else:
            status.append("stable")
    return NeuronComparison(before, after, geometry, effect, tuple(status), float(min_change))
