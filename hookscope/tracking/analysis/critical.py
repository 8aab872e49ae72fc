"""Critical periods: windows of training where a site's metric changes fastest.

Per series (run, site) with values ``v_i`` logged at steps ``s_i``:

* ``velocity`` at step ``s_{i+1}`` is ``(v_{i+1} - v_i) / (s_{i+1} - s_i)`` (metric units per
  training step, so irregular logging does not distort it);
* ``acceleration`` at ``s_{i+1}`` (from ``i >= 1``) is the change of velocity divided by the
  distance between the midpoints of the two intervals, ``(s_{i+1} - s_{i-1}) / 2``;
* a velocity is *critical* when ``|velocity|`` is above the ``percentile``-th percentile of
  that series' ``|velocity|`` (strictly above, so a constant series has none);
* a *critical window* is a maximal run of consecutive critical intervals; it spans from the
  start of its first interval to the end of its last (``start``, ``end`` in training steps).

Coordination across layers: at each velocity step, ``fraction_critical`` is the share of the
run's sites (those logged at that step) that are critical; *coordinated windows* are maximal
runs of steps with ``fraction_critical >= coordination`` (default one half).

Loss: where the frame has a ``loss`` column with values, ``loss_improvement`` at step
``s_{i+1}`` is ``-(loss_{i+1} - loss_i) / (s_{i+1} - s_i)`` (the same per-step convention),
and Spearman's rho is reported between it and the total ``|velocity|`` over sites at that step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hookscope.analysis._validate import in_range
from hookscope.errors import AnalysisError, format_choices

from ._frames import (
    RESULT_COLUMNS,
    by_run,
    describe,
    pick_metric,
    require_frame,
    series,
    sites_in_order,
    table_text,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CriticalPeriods", "critical_periods"]


def runs_of_true(mask: np.ndarray) -> list[tuple[int, int]]:
    """``(first, last)`` positions of every maximal run of True in ``mask``."""
    padded = np.r_[False, mask.astype(bool), False].astype(int)
    edges = np.diff(padded)
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1, strict=True))


@dataclass(frozen=True, repr=False)
class CriticalPeriods:
    """Velocities, critical windows and their coordination across sites.

    ``velocity``: one row per (run, site, step): ``velocity``, ``acceleration``,
    ``critical``. ``windows``: one row per critical window: ``run``, ``site``, ``start``,
    ``end``, ``n_intervals``, ``peak_velocity`` (signed, largest ``|velocity|``).
    ``coordination``: ``run``, ``step``, ``fraction_critical``. ``coordinated_windows``:
    ``run``, ``start``, ``end``, ``peak_fraction``. ``loss_correlation``: per run, ``rho``,
    ``p_value`` and ``n`` steps (NaN without enough loss values).
    """

    velocity: pd.DataFrame
    windows: pd.DataFrame
    coordination: pd.DataFrame
    coordinated_windows: pd.DataFrame
    loss_correlation: pd.DataFrame
    metric: str
    percentile: float
    coordination_level: float

    def to_pandas(self) -> pd.DataFrame:
        """One row per critical window."""
        return self.windows.copy()

    def __repr__(self) -> str:
        head = (
            f"CriticalPeriods(metric={self.metric}, percentile={self.percentile:g}, "
            f"{len(self.windows)} windows, {len(self.coordinated_windows)} coordinated)"
        )
        parts = [head, table_text(self.windows)]
        if len(self.coordinated_windows):
            parts += ["", "coordinated windows:", table_text(self.coordinated_windows)]
        parts += ["", "|velocity| vs loss improvement:", table_text(self.loss_correlation)]
        return "\n".join(parts)

    def plot(self, run: object = None) -> Figure:
        """Heat map site x step of velocity for ``run`` (default: the first), windows boxed."""
        from matplotlib.patches import Rectangle

        from hookscope.plot import figure

        runs = list(pd.unique(self.velocity["run"]))
        run = runs[0] if run is None else run
        if run not in runs:
            raise AnalysisError(f"run {run!r} is not in the result; it has {format_choices(runs)}")
        vel = self.velocity[self.velocity["run"].isin([run])]
        sites = list(pd.unique(vel["site"]))
        grid = vel.pivot(index="site", columns="step", values="velocity").loc[sites]
        steps = grid.columns.to_numpy(dtype=float)
        edges = np.r_[steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1), steps]
        fig = figure(figsize=(7, 1 + 0.4 * len(sites) + 1))
        ax = fig.subplots()
        lim = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
        mesh = ax.pcolormesh(edges, np.arange(len(sites) + 1), grid.to_numpy(),
                             cmap="RdBu_r", vmin=-lim, vmax=lim)  # fmt: skip
        fig.colorbar(mesh, ax=ax, label="velocity (per step)")
        for _, w in self.windows[self.windows["run"].isin([run])].iterrows():
            y = sites.index(w["site"])
            ax.add_patch(Rectangle((w["start"], y), w["end"] - w["start"], 1,
                                   fill=False, ec="k", lw=1.2))  # fmt: skip
        for _, w in self.coordinated_windows[
            self.coordinated_windows["run"].isin([run])
        ].iterrows():
            ax.axvspan(w["start"], w["end"], color="gold", alpha=0.15)
        ax.set_yticks(np.arange(len(sites)) + 0.5, sites, fontsize=7)
        ax.set_xlabel("step")
        ax.set_title(f"{self.metric}: velocity, critical windows boxed")
        fig.tight_layout()
        return fig


def _loss_rate(rows: pd.DataFrame) -> pd.Series:
    loss = rows.groupby("step")["loss"].mean().dropna().sort_index()
    steps = loss.index.to_numpy(dtype=float)
    rate = -np.diff(loss.to_numpy()) / np.diff(steps)
    return pd.Series(rate, index=loss.index[1:])


def critical_periods(
    results: pd.DataFrame, metric: str, percentile: float = 90, *, coordination: float = 0.5
) -> CriticalPeriods:
    """Velocity, acceleration and critical windows of ``metric`` per site (module docstring).

    ``percentile``: per-series percentile of ``|velocity|`` above which a step is critical.
    ``coordination``: share of sites that must be critical at once for a coordinated window.
    Every series needs at least 3 logged values.
    """
    from scipy.stats import spearmanr

    results = require_frame(results, "results", RESULT_COLUMNS)
    rows = pick_metric(results, metric)
    percentile = in_range(percentile, "percentile", 0.0, 100.0)
    coordination = in_range(coordination, "coordination", 0.0, 1.0, closed_low=False)
    vel_rows, win_rows, coord_rows, cwin_rows, loss_rows = [], [], [], [], []
    for run, run_rows in by_run(rows):
        per_site = []
        for site in sites_in_order(run_rows):
            what = describe(run, site, metric)
            s, v = series(run_rows[run_rows["site"] == site], what)
            if len(v) < 3:
                raise AnalysisError(f"{what} has {len(v)} logged values; need at least 3")
            vel = np.diff(v) / np.diff(s)
            mid = (s[1:] + s[:-1]) / 2
            acc = np.r_[np.nan, np.diff(vel) / np.diff(mid)]
            crit = np.abs(vel) > np.percentile(np.abs(vel), percentile)
            frame = pd.DataFrame({"run": run, "site": site, "step": s[1:], "velocity": vel,
                                  "acceleration": acc, "critical": crit})  # fmt: skip
            per_site.append(frame)
            for a, b in runs_of_true(crit):
                peak = a + int(np.argmax(np.abs(vel[a : b + 1])))
                win_rows.append({"run": run, "site": site, "start": s[a], "end": s[b + 1],
                                 "n_intervals": b - a + 1, "peak_velocity": vel[peak]})  # fmt: skip
        run_vel = pd.concat(per_site, ignore_index=True)
        vel_rows.append(run_vel)
        frac = run_vel.groupby("step")["critical"].mean()
        coord_rows.append(pd.DataFrame({"run": run, "step": frac.index,
                                        "fraction_critical": frac.to_numpy()}))  # fmt: skip
        steps = frac.index.to_numpy(dtype=float)
        for a, b in runs_of_true(frac.to_numpy() >= coordination):
            start = steps[a - 1] if a > 0 else float(run_rows["step"].min())
            cwin_rows.append({"run": run, "start": start, "end": steps[b],
                              "peak_fraction": float(frac.iloc[a : b + 1].max())})  # fmt: skip
        corr = {"run": run, "rho": np.nan, "p_value": np.nan, "n": 0}
        if "loss" in run_rows.columns:
            speed = run_vel.assign(a=run_vel["velocity"].abs()).groupby("step")["a"].sum()
            both = pd.concat([speed, _loss_rate(run_rows)], axis=1, join="inner").dropna()
            corr["n"] = len(both)
            if len(both) >= 3 and both.iloc[:, 0].nunique() > 1 and both.iloc[:, 1].nunique() > 1:
                r = spearmanr(both.iloc[:, 0], both.iloc[:, 1])
                corr.update(rho=float(r.statistic), p_value=float(r.pvalue))
        loss_rows.append(corr)
    win_cols = ["run", "site", "start", "end", "n_intervals", "peak_velocity"]
    return CriticalPeriods(
        velocity=pd.concat(vel_rows, ignore_index=True),
        windows=pd.DataFrame(win_rows, columns=win_cols),
        coordination=pd.concat(coord_rows, ignore_index=True),
        coordinated_windows=pd.DataFrame(
            cwin_rows, columns=["run", "start", "end", "peak_fraction"]
        ),
        loss_correlation=pd.DataFrame(loss_rows),
        metric=str(metric),
        percentile=percentile,
        coordination_level=coordination,
    )
