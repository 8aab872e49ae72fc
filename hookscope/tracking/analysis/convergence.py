"""Convergence step per site, and whether layers settle bottom-up, top-down or together.

For one series (run, site, metric) with values ``v_0 .. v_{T-1}`` logged at steps
``s_0 < .. < s_{T-1}``:

* the *final value* is the mean of the last ``n_final`` logged values (default 3);
* the *tolerance* is ``eps * (max(v) - min(v))`` (``relative=True``, the default: a fraction
  of the range the series travelled) or ``eps`` itself (``relative=False``, in the metric's
  units);
* the *convergence step* is the first logged step ``s_i`` such that ``|v_j - final| <=
  tolerance`` for every ``j >= i``; NaN (not converged) when even the last value is outside.
  A constant series converges at its first step.

Across sites in depth order (order of first appearance in the frame), per run, the pattern is

* ``"simultaneous"``: all convergence steps within ``tolerance_frac * training length`` of
  each other (training length: ``n_steps`` when given, else last minus first logged step);
* ``"bottom-up"``: otherwise, if Spearman's rho between depth and convergence step is
  ``>= rho_threshold`` (deeper layers converge later);
* ``"top-down"``: rho ``<= -rho_threshold``;
* ``"mixed"``: anything else; ``"undetermined"`` with fewer than two converged sites.

No p-value is used for the ordering: with the few layers of a typical model Spearman's test
cannot reach significance (three sites give p >= 1/3), so the rho threshold and the spread
condition decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hookscope.analysis._validate import in_range, positive_int
from hookscope.errors import AnalysisError

from ._frames import (
    RESULT_COLUMNS,
    by_run,
    describe,
    n_steps_of,
    pick_metric,
    require_frame,
    series,
    sites_in_order,
    table_text,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PATTERNS", "ConvergenceResult", "convergence", "convergence_step"]

PATTERNS = ("bottom-up", "top-down", "simultaneous", "mixed", "undetermined")


def convergence_step(
    steps: np.ndarray, values: np.ndarray, tolerance: float, n_final: int
) -> tuple[float, float]:
    """``(convergence step or NaN, final value)`` of one sorted series (see module docstring)."""
    final = float(values[-n_final:].mean())
    outside = np.flatnonzero(np.abs(values - final) > tolerance)
    if outside.size == 0:
        return float(steps[0]), final
    last = int(outside[-1])
    if last == len(values) - 1:
        return float("nan"), final
    return float(steps[last + 1]), final


@dataclass(frozen=True, repr=False)
class ConvergenceResult:
    """Convergence steps per site and the depth pattern per run.

    ``table``: one row per (run, site): ``depth`` (0 = first site), ``convergence_step``
    (NaN: not converged), ``final_value``, ``tolerance``. ``patterns``: one row per run:
    ``pattern``, ``rho`` (Spearman, depth vs step), ``spread`` (max - min convergence step),
    ``length`` (training length used), ``n_converged``. ``pattern``: the pattern when there
    is one run, else None (see ``patterns``).
    """

    table: pd.DataFrame
    patterns: pd.DataFrame
    metric: str
    eps: float
    relative: bool
    tolerance_frac: float
    rho_threshold: float

    @property
    def pattern(self) -> str | None:
        """The pattern of the single run; None when there are several (read ``patterns``)."""
        return str(self.patterns["pattern"].iloc[0]) if len(self.patterns) == 1 else None

    def to_pandas(self) -> pd.DataFrame:
        """One row per (run, site) with its convergence step."""
        return self.table.copy()

    def __repr__(self) -> str:
        how = "of the range" if self.relative else "absolute"
        head = f"ConvergenceResult(metric={self.metric}, eps={self.eps:g} {how})"
        return "\n".join([head, table_text(self.patterns), "", table_text(self.table)])

    def plot(self) -> Figure:
        """Convergence step against depth, one line per run, pattern in the legend."""
        from hookscope.plot import figure

        fig = figure(figsize=(6, 3.5))
        ax = fig.subplots()
        for i, (run, rows) in enumerate(self.table.groupby("run", dropna=False, sort=False)):
            pattern = self.patterns["pattern"].iloc[i]
            label = pattern if len(self.patterns) == 1 else f"{run}: {pattern}"
            ax.plot(rows["depth"], rows["convergence_step"], "o-", label=label)
        sites = list(pd.unique(self.table["site"]))
        ax.set_xticks(range(len(sites)), sites, rotation=30, fontsize=7)
        ax.set_xlabel("site (depth order)")
        ax.set_ylabel("convergence step")
        ax.set_title(f"convergence of {self.metric} (eps={self.eps:g})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def _pattern(conv: np.ndarray, length: float, tol_frac: float, rho_min: float) -> dict:
    from scipy.stats import spearmanr

    ok = np.isfinite(conv)
    depth = np.arange(len(conv))[ok]
    c = conv[ok]
    row = {"rho": float("nan"), "spread": float("nan"), "length": length, "n_converged": c.size}
    if c.size < 2:
        return {"pattern": "undetermined", **row}
    row["spread"] = float(c.max() - c.min())
    if row["spread"] > 0:
        row["rho"] = float(spearmanr(depth, c).statistic)
    if row["spread"] <= tol_frac * length:
        return {"pattern": "simultaneous", **row}
    if row["rho"] >= rho_min:
        return {"pattern": "bottom-up", **row}
    if row["rho"] <= -rho_min:
        return {"pattern": "top-down", **row}
    return {"pattern": "mixed", **row}


def convergence(
    results: pd.DataFrame,
    metric: str,
    eps: float = 0.05,
    *,
    relative: bool = True,
    n_final: int = 3,
    tolerance: float = 0.05,
    rho_threshold: float = 0.8,
    n_steps: Any = None,
) -> ConvergenceResult:
    """When each site's ``metric`` settles, and the depth pattern (see the module docstring).

    ``eps``: band around the final value, a fraction of the series' range (``relative``) or
    in metric units. ``n_final``: logged values averaged into the final value.
    ``tolerance``: spread, as a fraction of training length, below which convergence is
    ``"simultaneous"``. ``rho_threshold``: Spearman rho needed for bottom-up / top-down.
    ``n_steps``: training length (int, or dict run -> int); default last - first logged step.

    >>> res = convergence(results, "participation_ratio")  # doctest: +SKIP
    >>> res.pattern, res.to_pandas()                        # doctest: +SKIP
    """
    results = require_frame(results, "results", RESULT_COLUMNS)
    rows = pick_metric(results, metric)
    eps = in_range(eps, "eps", 0.0, np.inf)
    n_final = positive_int(n_final, "n_final")
    tolerance = in_range(tolerance, "tolerance", 0.0, 1.0)
    rho_threshold = in_range(rho_threshold, "rho_threshold", 0.0, 1.0, closed_low=False)
    if not isinstance(relative, bool):
        raise AnalysisError(f"relative must be True or False; got {relative!r}")
    table, patterns = [], []
    for run, run_rows in by_run(rows):
        conv = []
        first, last = np.inf, -np.inf
        for depth, site in enumerate(sites_in_order(run_rows)):
            what = describe(run, site, metric)
            steps, values = series(run_rows[run_rows["site"] == site], what)
            if len(values) < n_final + 1:
                raise AnalysisError(
                    f"{what} has {len(values)} logged values; need at least n_final + 1 = "
                    f"{n_final + 1} to tell convergence from the final value"
                )
            band = eps * float(np.ptp(values)) if relative else eps
            step, final = convergence_step(steps, values, band, n_final)
            conv.append(step)
            first, last = min(first, steps[0]), max(last, steps[-1])
            table.append(
                {"run": run, "site": site, "depth": depth, "convergence_step": step,
                 "final_value": final, "tolerance": band}
            )  # fmt: skip
        length = n_steps_of(n_steps, run) if n_steps is not None else float(last - first)
        patterns.append({"run": run, **_pattern(np.array(conv), length, tolerance, rho_threshold)})
    return ConvergenceResult(
        pd.DataFrame(table),
        pd.DataFrame(patterns),
        str(metric),
        eps,
        relative,
        tolerance,
        rho_threshold,
    )
