"""What a unit is built from: ridge :func:`composition` of late units from early units.

Every unit of the late layer is regressed on all units of the early layer (closed-form
ridge, ``alpha`` as in :class:`sklearn.linear_model.Ridge`: intercept fitted and not
penalised, features not standardised). Samples follow :mod:`hookscope.units._common`, the
same samples in both layers: conv maps are always reduced over space (``reduce="mean"`` or
``"max"``; the two layers' maps have different sizes, so per-position regression would need a
resampling this module does not guess), language-model neurons give the same positions in
both layers. The sufficient statistics are accumulated in float64 batch by batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hookscope.attribution._common import as_model, prepare_inputs
from hookscope.errors import InputError, format_choices
from hookscope.modes import in_eval_mode

from ._common import (
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

__all__ = ["Composition", "composition"]


@dataclass(frozen=True, repr=False, eq=False)
class Composition:
    """Ridge regression of each late unit on all early units.

    ``coef`` [late, early] (raw, as sklearn's ``Ridge.coef_``), ``intercept`` [late],
    ``r2`` [late] (in-sample coefficient of determination, as ``Ridge.score`` per unit;
    NaN for a constant late unit, e.g. a dead one), ``standardized`` [late, early]
    (``coef * std(early) / std(late)``, population stds; 0 for a constant late unit).
    ``top`` late units' contributors are the ``n_top`` early units of largest
    ``|standardized|`` (non-zero only), strongest first.
    """

    early: str
    late: str
    alpha: float
    kind: str
    reduce: str | None
    n_samples: int
    coef: Tensor
    intercept: Tensor
    r2: Tensor
    standardized: Tensor
    n_top: int

    @property
    def top(self) -> list[list[int]]:
        """Each late unit's top contributors (early unit indices), strongest first."""
        out = []
        for row in self.standardized.abs():
            order = torch.sort(row, descending=True, stable=True).indices[: self.n_top]
            out.append([int(i) for i in order if float(row[i]) > 0])
        return out

    def edges(self) -> pd.DataFrame:
        """The graph :meth:`plot` draws: one row per (early, late) top-contributor edge with
        its standardized weight, late units in order, strongest edge first."""
        rows = [
            (e, j, float(self.standardized[j, e]))
            for j, contributors in enumerate(self.top)
            for e in contributors
        ]
        return pd.DataFrame(rows, columns=["early", "late", "weight"])

    def to_pandas(self) -> pd.DataFrame:
        """One row per late unit: r2, its top early contributors and their standardized
        weights."""
        top = self.top
        return pd.DataFrame(
            {
                "late_unit": np.arange(len(top)),
                "r2": self.r2.numpy(),
                "top_early": [tuple(t) for t in top],
                "top_weight": [
                    tuple(round(float(self.standardized[j, e]), 4) for e in t)
                    for j, t in enumerate(top)
                ],
            }
        )

    def __repr__(self) -> str:
        finite = self.r2[torch.isfinite(self.r2)]
        mean = f"{float(finite.mean()):.3f}" if finite.numel() else "nan"
        what = f", maps reduced by spatial {self.reduce}" if self.reduce else ""
        df = self.to_pandas()
        more = f"\n  ... {len(df) - 16} more late units" if len(df) > 16 else ""
        return (
            f"Composition({self.early} -> {self.late}: ridge alpha={self.alpha:g}, "
            f"{self.n_samples} samples{what})\n  mean R^2 {mean} over "
            f"{finite.numel()} non-constant late units\n"
            + df.head(16).to_string(index=False, float_format="{:.4f}".format)
            + more
        )

    def plot(self) -> Figure:
        """Graph: early units (left) -> late units (right, coloured by R^2); an edge per top
        contributor, width proportional to |standardized weight|, blue positive, red
        negative (the colours of the patching heatmaps)."""
        from matplotlib.collections import LineCollection

        from hookscope.plot import NEGATIVE, POSITIVE, figure

        n_late, n_early = self.standardized.shape
        y_early = np.linspace(1.0, 0.0, n_early) if n_early > 1 else np.array([0.5])
        y_late = np.linspace(1.0, 0.0, n_late) if n_late > 1 else np.array([0.5])
        edges = self.edges()
        fig = figure(figsize=(5.5, max(4.0, 0.12 * max(n_early, n_late) + 1.5)))
        ax = fig.subplots()
        if len(edges):
            weights = edges["weight"].to_numpy()
            biggest = np.abs(weights).max()
            segments = [
                [(0.0, y_early[e]), (1.0, y_late[j])]
                for e, j in zip(edges["early"], edges["late"], strict=True)
            ]
            lines = LineCollection(
                segments,
                linewidths=0.3 + 3.7 * np.abs(weights) / biggest,
                colors=[POSITIVE if w > 0 else NEGATIVE for w in weights],
                alpha=0.7,
            )
            ax.add_collection(lines)
        ax.scatter(np.zeros(n_early), y_early, s=14, color="0.4", zorder=3)
        dots = ax.scatter(
            np.ones(n_late),
            y_late,
            s=22,
            c=np.nan_to_num(self.r2.numpy(), nan=0.0),
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            zorder=3,
        )
        if max(n_early, n_late) <= 64:
            for i, y in enumerate(y_early):
                ax.text(-0.04, y, str(i), ha="right", va="center", fontsize=6)
            for j, y in enumerate(y_late):
                ax.text(1.04, y, str(j), ha="left", va="center", fontsize=6)
        fig.colorbar(dots, ax=ax, label="R^2")
        ax.set_xlim(-0.2, 1.2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks([0, 1], [self.early, self.late])
        ax.set_yticks([])
        ax.set_title(f"ridge composition, alpha={self.alpha:g}, top {self.n_top}", fontsize=9)
        fig.tight_layout()
        return fig


class _Moments:
    """Streaming sums of shifted early features x and late features y (float64)."""

    def __init__(self, x: Tensor, y: Tensor):
        self.kx, self.ky = x.mean(0), y.mean(0)  # the shift: the first batch's means
        self.n = 0
        self.sx = torch.zeros_like(self.kx)
        self.sy = torch.zeros_like(self.ky)
        self.sxx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.sxy = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
        self.syy = torch.zeros_like(self.ky)

    def add(self, x: Tensor, y: Tensor) -> None:
        x, y = x - self.kx, y - self.ky
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y
        self.syy += y.square().sum(0)


def ridge_from_moments(mo: _Moments, alpha: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(coef [late, early], intercept, r2, standardized)`` from the streamed moments."""
    n = mo.n
    cxx = mo.sxx - torch.outer(mo.sx, mo.sx) / n
    cxy = mo.sxy - torch.outer(mo.sx, mo.sy) / n
    cyy = (mo.syy - mo.sy.square() / n).clamp_min(0)
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype)
    system = cxx + alpha * eye
    beta, info = torch.linalg.solve_ex(system, cxy)  # [early, late]
    if int(info) != 0 or not bool(torch.isfinite(beta).all()):
        # singular (dead or collinear early units with alpha = 0): the minimum-norm
        # least-squares solution, as a pseudo-inverse regression would give
        beta = torch.linalg.pinv(system, hermitian=True) @ cxy
    mean_x, mean_y = mo.kx + mo.sx / n, mo.ky + mo.sy / n
    intercept = mean_y - mean_x @ beta
    ss_res = (cyy - 2 * (beta * cxy).sum(0) + (beta * (cxx @ beta)).sum(0)).clamp_min(0)
    constant = cyy <= 1e-24 * n * torch.clamp(mean_y.square(), min=1.0)
    r2 = torch.where(constant, math.nan, 1 - ss_res / cyy.clamp_min(1e-300))
    sd_x = (cxx.diagonal().clamp_min(0) / n).sqrt()
    sd_y = (cyy / n).sqrt()
    standardized = torch.where(
        constant[None, :], 0.0, beta * sd_x[:, None] / sd_y.clamp_min(1e-300)[None, :]
    )
    return beta.T.contiguous(), intercept, r2, standardized.T.contiguous()


@in_eval_mode
def composition(
    model: Any,
    inputs: Any,
    *,
    early: Any,
    late: Any,
    alpha: float = 0.1,
    reduce: str = "mean",
    top: int = 3,
    batch_size: int = 256,
    progress: bool | None = None,
) -> Composition:
    """How well each unit of ``late`` is a linear function of the units of ``early``.

    ``early``/``late``: neuron layers (``neuron.0``, ``neuron.1``), early before late in
    the forward. Ridge of each late unit on all early units with penalty ``alpha`` (as
    sklearn's ``Ridge(alpha=alpha)``); ``top``: contributors kept per late unit. See the
    module docstring for what a sample is.

    >>> units.composition(cnn, X, early="neuron.0", late="neuron.1", alpha=0.1)  # doctest: +SKIP
    """
    m = as_model(model)
    a_early = neuron_layer(m, early, "composition early")
    a_late = neuron_layer(m, late, "composition late")
    order = [str(a) for a in m.addresses("neuron")]
    if order.index(str(a_early)) >= order.index(str(a_late)):
        raise InputError(
            f"early ({a_early}) must come before late ({a_late}) in the forward; neuron layers "
            f"in order: {format_choices(order)}"
        )
    if not is_real(alpha) or not alpha >= 0:
        raise InputError(f"alpha must be a number >= 0; got {alpha!r}")
    if not math.isfinite(alpha):
        raise InputError(f"alpha must be finite; got {alpha!r}")
    reduce = check_reduce(reduce)
    top = positive_int(top, "top")
    batch_size = positive_int(batch_size, "batch_size")
    prepared = prepare_inputs(m, inputs)
    moments: _Moments | None = None
    kinds = set()
    names = [a_early, a_late]
    for _, acts, mask in batches(m, prepared, names, batch_size, progress, "composition"):
        mats = []
        for a in names:
            act = acts[str(a)]
            axis = unit_axis(m, a, act.ndim)
            kinds.add(kind_of(act.ndim, axis))
            mats.append(unit_samples(act, axis, mask, reduce)[0].double())
        x, y = mats
        if x.shape[0] != y.shape[0]:
            raise InputError(
                f"{a_early} gives {x.shape[0]} samples per batch but {a_late} gives "
                f"{y.shape[0]}; composition needs layers with the same samples"
            )
        if moments is None:
            moments = _Moments(x, y)
        moments.add(x, y)
    assert moments is not None  # prepare_inputs refuses empty inputs
    if moments.n < 2:
        raise InputError("composition needs at least two samples")
    coef, intercept, r2, standardized = ridge_from_moments(moments, float(alpha))
    kind = "positions" if "positions" in kinds else "spatial" if "spatial" in kinds else "features"
    return Composition(
        early=str(a_early),
        late=str(a_late),
        alpha=float(alpha),
        kind=kind,
        reduce=reduce if "spatial" in kinds else None,
        n_samples=moments.n,
        coef=coef,
        intercept=intercept,
        r2=r2,
        standardized=standardized,
        n_top=top,
    )
