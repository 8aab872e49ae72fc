"""How well one site's activations separate known classes, step by step over training.

Per step, for activations ``X`` [n, d] and class labels ``y`` [n] (the same inputs and labels
at every step):

* ``separability``: stratified ``cv``-fold accuracy of a standardised logistic regression
  (:func:`hookscope.analysis.linear_separability`, fixed ``seed``); chance is the
  majority-class rate, reported as ``chance``;
* ``silhouette``: mean silhouette of the labels in activation space, Euclidean
  (:func:`hookscope.analysis.silhouette`);
* ``variance_ratio``: ``tr(S_B) / tr(S_W)`` with the between-class scatter
  ``tr(S_B) = sum_c n_c ||mu_c - mu||^2`` and the within-class scatter
  ``tr(S_W) = sum_c sum_{i in c} ||x_i - mu_c||^2`` (so ``tr(S_B) + tr(S_W)`` is the total
  scatter); infinite when every class is a single point;
* ``pca_dim``: per class, the number of principal components holding ``variance`` (default
  95 %) of that class's variance (:func:`hookscope.analysis.energy_rank`, centred);
  ``pca_dim_mean`` averages over classes, ``per_class`` lists each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from hookscope.analysis._validate import as_labels, in_range, positive_int
from hookscope.analysis.dimensionality import energy_rank
from hookscope.analysis.geometry import linear_separability, silhouette
from hookscope.errors import AnalysisError

from ._frames import step_matrices, table_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Disentanglement", "disentanglement", "variance_ratio"]

_PANELS = ("separability", "silhouette", "variance_ratio", "pca_dim_mean")


def variance_ratio(x: torch.Tensor, y: torch.Tensor) -> float:
    """``tr(S_B) / tr(S_W)`` of float64 rows ``x`` [n, d] and int labels ``y`` [n]."""
    mu = x.mean(dim=0)
    between = within = 0.0
    for c in torch.unique(y):
        xc = x[y == c]
        mc = xc.mean(dim=0)
        between += xc.shape[0] * float((mc - mu).square().sum())
        within += float((xc - mc).square().sum())
    return between / within if within > 0 else float("inf")


@dataclass(frozen=True, repr=False)
class Disentanglement:
    """Class structure of the activations per step.

    ``table``: ``step``, ``separability``, ``chance``, ``silhouette``, ``variance_ratio``,
    ``pca_dim_mean``. ``per_class``: ``step``, ``label``, ``n``, ``pca_dim``.
    """

    table: pd.DataFrame
    per_class: pd.DataFrame
    cv: int
    variance: float

    def to_pandas(self) -> pd.DataFrame:
        """One row per step."""
        return self.table.copy()

    def __repr__(self) -> str:
        head = f"Disentanglement({len(self.table)} steps, cv={self.cv}, variance={self.variance:g})"
        return head + "\n" + table_text(self.table)

    def plot(self) -> Figure:
        """Separability (with chance), silhouette, variance ratio and PCA dimension over steps."""
        from hookscope.plot import figure

        fig = figure(figsize=(8, 5))
        axes = fig.subplots(2, 2, sharex=True).ravel()
        t = self.table
        for ax, col in zip(axes, _PANELS, strict=True):
            ax.plot(t["step"], t[col], ".-")
            ax.set_ylabel(col.replace("_", " "), fontsize=8)
        axes[0].plot(t["step"], t["chance"], color="gray", ls=":", label="chance")
        axes[0].legend(fontsize=7)
        for ax in axes[2:]:
            ax.set_xlabel("step")
        fig.tight_layout()
        return fig


def disentanglement(
    activations: Any,
    labels: Any,
    *,
    cv: int = 5,
    variance: float = 0.95,
    seed: int = 0,
) -> Disentanglement:
    """Separability, silhouette, between/within variance ratio and per-class PCA dimension.

    ``activations``: ``{step: [n, d] tensor or array}``; ``labels``: [n] integer class ids,
    the same for every step. Every class needs at least ``cv`` samples.
    """
    cv = positive_int(cv, "cv", minimum=2)
    variance = in_range(variance, "variance", 0.0, 1.0, closed_low=False)
    steps, mats = step_matrices(activations)
    y = as_labels(labels, mats[0].shape[0])
    classes, counts = torch.unique(y, return_counts=True)
    if int(counts.min()) < cv:
        raise AnalysisError(
            f"class {int(classes[counts.argmin()])} has {int(counts.min())} samples; every "
            f"class needs at least cv={cv}"
        )
    chance = float(counts.max()) / float(counts.sum())
    rows, per_class = [], []
    for step, x in zip(steps, mats, strict=True):
        dims = []
        for c, n_c in zip(classes.tolist(), counts.tolist(), strict=True):
            try:
                dim = energy_rank(x[y == c], energy=variance)
            except AnalysisError as err:
                raise AnalysisError(f"step {step!r}, class {c}: {err}") from err
            dims.append(dim)
            per_class.append({"step": step, "label": c, "n": n_c, "pca_dim": dim})
        rows.append({
            "step": step,
            "separability": linear_separability(x, y, cv=cv, seed=seed),
            "chance": chance,
            "silhouette": silhouette(x, y),
            "variance_ratio": variance_ratio(x, y),
            "pca_dim_mean": float(np.mean(dims)),
        })  # fmt: skip
    return Disentanglement(pd.DataFrame(rows), pd.DataFrame(per_class), cv, variance)
