"""Size, speed and timing of each detected jump, measured on the series it came from.

For a jump at training step ``s`` of series (run, site, metric) in the results frame:

* ``magnitude``: the level change from the jumps frame (>= 0);
* ``relative_magnitude``: ``magnitude / (max - min)`` of the whole series;
* ``speed``: mean rate of change (metric units per training step) over the middle 80 % of
  the change. The neighbourhood is the ``window`` logged points on each side of the jump,
  cut halfway to a neighbouring jump of the same series. Its start level ``a`` is the median
  of its first ``k = max(1, window // 5)`` values and its end level ``b`` the median of its
  last ``k``; with ``f = (v - a) / (b - a)``, ``t90`` is where ``f`` first reaches 0.9 and
  ``t10`` where it last crosses 0.1 before that (both linearly interpolated between logged
  steps). ``speed = 0.8 * |b - a| / (t90 - t10)``: a linear ramp over ``L`` steps gives its
  slope ``|b - a| / L``; a step between two logged points ``g`` steps apart gives
  ``|b - a| / g``. ``rise_steps = (t90 - t10) / 0.8`` is the matching duration of the whole
  change. A change longer than the neighbourhood is measured on the part inside it;
  ``speed`` is NaN when the neighbourhood shows no change (``a == b``).
* ``phase_fraction``: ``s / n_steps``; ``phase``: early (``< early``), mid, late
  (``>= late``), the one definition in :func:`._frames.phase_label`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hookscope.analysis._validate import positive_int
from hookscope.errors import AnalysisError

from ._frames import (
    JUMP_COLUMNS,
    RESULT_COLUMNS,
    check_n_steps,
    check_phases,
    describe,
    has_runs,
    n_steps_of,
    phase_label,
    require_frame,
    series,
    table_text,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["JumpCharacteristics", "characterize_jumps"]


def _crossing(s: np.ndarray, f: np.ndarray, i: int, level: float) -> float:
    """Step where ``f`` crosses ``level`` between positions ``i`` and ``i + 1`` (linear)."""
    if f[i + 1] == f[i]:
        return float(s[i])
    return float(s[i] + (level - f[i]) / (f[i + 1] - f[i]) * (s[i + 1] - s[i]))


def rise(s: np.ndarray, v: np.ndarray, k: int) -> tuple[float, float]:
    """``(speed, rise_steps)`` of the change inside one neighbourhood (module docstring)."""
    a, b = float(np.median(v[:k])), float(np.median(v[-k:]))
    if b == a or len(v) < 2:
        return float("nan"), float("nan")
    f = (v - a) / (b - a)
    above = np.flatnonzero(f >= 0.9)
    i90 = int(above[0])
    below = np.flatnonzero(f[:i90] <= 0.1)
    if i90 == 0 or below.size == 0:  # already past 90 % at the window start
        return float("nan"), float("nan")
    i10 = int(below[-1])
    t10 = _crossing(s, f, i10, 0.1)
    t90 = _crossing(s, f, i90 - 1, 0.9)
    width = t90 - t10
    return 0.8 * abs(b - a) / width, width / 0.8


@dataclass(frozen=True, repr=False)
class JumpCharacteristics:
    """One row per jump: the jumps frame's columns plus ``series_range``,
    ``relative_magnitude``, ``speed``, ``rise_steps``, ``phase_fraction``, ``phase``."""

    table: pd.DataFrame
    window: int
    early: float
    late: float

    def to_pandas(self) -> pd.DataFrame:
        """The table, one row per jump."""
        return self.table.copy()

    def __repr__(self) -> str:
        head = (
            f"JumpCharacteristics({len(self.table)} jumps, window={self.window}, "
            f"early<{self.early:g}, late>={self.late:g})"
        )
        return head + "\n" + table_text(self.table)

    def plot(self) -> Figure:
        """Magnitude against phase fraction, marker size by speed rank, phase bounds dashed."""
        from hookscope.plot import figure

        t = self.table
        fig = figure(figsize=(6, 3.5))
        ax = fig.subplots()
        rank = t["speed"].rank(pct=True).fillna(0.5).to_numpy()
        ax.scatter(t["phase_fraction"], t["magnitude"], s=15 + 60 * rank, alpha=0.7)
        for x in (self.early, self.late):
            ax.axvline(x, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("phase (step / n_steps)")
        ax.set_ylabel("magnitude")
        ax.set_title("jumps (marker size: speed)")
        fig.tight_layout()
        return fig


def characterize_jumps(
    jumps: pd.DataFrame,
    results: pd.DataFrame,
    n_steps: Any,
    *,
    window: int = 25,
    early: float = 0.1,
    late: float = 0.5,
) -> JumpCharacteristics:
    """Relative magnitude, speed and phase of every jump in ``jumps`` (module docstring).

    ``results``: the results frame the jumps were detected in (same runs, sites, metrics).
    ``n_steps``: total training steps (int, or dict run -> int). ``window``: logged points on
    each side of a jump used to measure its speed.
    """
    jumps = require_frame(jumps, "jumps", JUMP_COLUMNS)
    results = require_frame(results, "results", RESULT_COLUMNS)
    window = positive_int(window, "window", minimum=2)
    early, late = check_phases(early, late)
    runs = has_runs(jumps)
    if runs and not has_runs(results):
        raise AnalysisError("jumps has a 'run' column but results does not")
    check_n_steps(n_steps, jumps)
    key = ["run", "site", "metric"] if runs else ["site", "metric"]
    groups = dict(iter(results.groupby(key, sort=False)))
    rows = []
    for idx, group in jumps.groupby(key, sort=False):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if idx not in groups:
            raise AnalysisError(
                f"jumps has {describe(*(idx if runs else (None, *idx)))} but results has no "
                "such series"
            )
        what = describe(*(idx if runs else (None, *idx)))
        s, v = series(groups[idx], what)
        span = float(np.ptp(v))
        jump_steps = np.sort(group["step"].to_numpy(dtype=float))
        for _, j in group.iterrows():
            at = int(np.searchsorted(s, float(j["step"])))  # first point on the new level
            if at >= len(s) or s[at] != float(j["step"]):
                raise AnalysisError(f"{what}: jump step {j['step']} is not a logged step")
            lo, hi = max(0, at - window), min(len(s), at + window)
            before = jump_steps[jump_steps < j["step"]]
            after = jump_steps[jump_steps > j["step"]]
            if before.size:  # stop halfway to the neighbouring jumps
                lo = max(lo, int(np.searchsorted(s, (before[-1] + j["step"]) / 2)))
            if after.size:
                hi = min(hi, int(np.searchsorted(s, (after[0] + j["step"]) / 2)))
            k = max(1, min(window // 5, (hi - lo) // 4))
            speed, width = rise(s[lo:hi], v[lo:hi], k)
            run = j["run"] if runs else None
            frac = float(j["step"]) / n_steps_of(n_steps, run)
            rows.append(
                {**j.to_dict(), "series_range": span,
                 "relative_magnitude": float(j["magnitude"]) / span if span > 0 else np.nan,
                 "speed": speed, "rise_steps": width, "phase_fraction": frac}
            )  # fmt: skip
    table = pd.DataFrame(rows)
    table["phase"] = phase_label(table["phase_fraction"].to_numpy(), early, late)
    return JumpCharacteristics(table.sort_values("step", kind="stable", ignore_index=True),
                               window, early, late)  # fmt: skip
