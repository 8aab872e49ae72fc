"""Are some runs' metric curves rougher than others'? Derivative spread compared across runs.

For every run and site the derivative of ``metric`` is ``diff(value) / diff(step)`` (per
training step, so logging intervals do not matter); a run's derivatives are pooled over its
sites. Across runs:

* Levene's test (:func:`scipy.stats.levene`, ``center="median"``, i.e. Brown-Forsythe,
  robust to heavy tails) on the derivatives: do their spreads differ (rough vs smooth)?
* Kruskal-Wallis (:func:`scipy.stats.kruskal`) on ``|derivative|``: do the typical rates of
  change differ?

The table lists per run the number of derivatives ``n``, ``derivative_std`` (ddof=1) and
``median_abs_derivative``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hookscope.errors import AnalysisError, format_choices

from ._frames import (
    RESULT_COLUMNS,
    describe,
    pick_metric,
    require_frame,
    series,
    sites_in_order,
    table_text,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Smoothness", "smoothness"]


@dataclass(frozen=True, repr=False)
class Smoothness:
    """Derivative statistics per run and the tests across runs.

    ``table``: ``run``, ``n``, ``derivative_std``, ``median_abs_derivative``.
    ``derivatives``: ``{run: pooled derivatives}``. ``levene_*`` and ``kruskal_*``: statistic
    and p-value of the two tests.
    """

    table: pd.DataFrame
    derivatives: dict[str, np.ndarray]
    levene_statistic: float
    levene_p: float
    kruskal_statistic: float
    kruskal_p: float
    metric: str

    def to_pandas(self) -> pd.DataFrame:
        """One row per run."""
        return self.table.copy()

    def __repr__(self) -> str:
        head = (
            f"Smoothness(metric={self.metric}, {len(self.table)} runs; Levene (median) "
            f"W={self.levene_statistic:.4g} p={self.levene_p:.3g}; Kruskal-Wallis on |d| "
            f"H={self.kruskal_statistic:.4g} p={self.kruskal_p:.3g})"
        )
        return head + "\n" + table_text(self.table)

    def plot(self) -> Figure:
        """Box plot of the derivatives per run."""
        from hookscope.plot import figure

        fig = figure(figsize=(6, 3.5))
        ax = fig.subplots()
        names = list(self.derivatives)
        ax.boxplot([self.derivatives[n] for n in names], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, fontsize=7)
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_ylabel(f"d {self.metric} / d step")
        ax.set_title(f"Levene p={self.levene_p:.3g}, Kruskal p={self.kruskal_p:.3g}")
        fig.tight_layout()
        return fig


def _runs(runs: Any, by: str) -> dict[str, pd.DataFrame]:
    if isinstance(runs, pd.DataFrame):
        if by not in runs.columns:
            raise AnalysisError(
                f"runs is one frame but has no {by!r} column to split it by; it has "
                f"{format_choices(map(str, runs.columns))} (pass by=... or a dict name -> frame)"
            )
        return {str(k): g for k, g in runs.groupby(by, sort=False)}
    if isinstance(runs, Mapping):
        return {str(k): v for k, v in runs.items()}
    raise AnalysisError(
        f"runs must be a dict name -> results frame or one frame with a {by!r} column; "
        f"got {type(runs).__name__}"
    )


def smoothness(runs: Any, metric: str, *, by: str = "run") -> Smoothness:
    """Compare the roughness of ``metric`` across runs (module docstring).

    ``runs``: ``{name: results frame}``, or one results frame split by its column ``by``.
    Needs at least two runs with at least 3 derivatives each.
    """
    from scipy.stats import kruskal, levene

    frames = _runs(runs, by)
    if len(frames) < 2:
        raise AnalysisError(f"smoothness compares runs; got {len(frames)} run(s), need at least 2")
    derivs, rows = {}, []
    for name, frame in frames.items():
        frame = pick_metric(require_frame(frame, f"runs[{name!r}]", RESULT_COLUMNS), metric,
                            f"runs[{name!r}]")  # fmt: skip
        parts = []
        for site in sites_in_order(frame):
            s, v = series(frame[frame["site"] == site], describe(name, site, metric))
            parts.append(np.diff(v) / np.diff(s))
        d = np.concatenate(parts)
        if d.size < 3:
            raise AnalysisError(
                f"run {name!r} has {d.size} derivatives of {metric!r}; need at least 3"
            )
        derivs[name] = d
        rows.append({"run": name, "n": d.size, "derivative_std": float(d.std(ddof=1)),
                     "median_abs_derivative": float(np.median(np.abs(d)))})  # fmt: skip
    pooled = np.concatenate(list(derivs.values()))
    if np.ptp(pooled) == 0 and np.ptp(np.abs(pooled)) == 0:
        raise AnalysisError(
            f"every derivative of {metric!r} in every run is {pooled[0]:g}; nothing to compare"
        )
    lev = levene(*derivs.values(), center="median")
    kw = kruskal(*(np.abs(d) for d in derivs.values()))
    return Smoothness(pd.DataFrame(rows), derivs, float(lev.statistic), float(lev.pvalue),
                      float(kw.statistic), float(kw.pvalue), str(metric))  # fmt: skip
