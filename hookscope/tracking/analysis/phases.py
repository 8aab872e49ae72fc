"""When in training jumps happen: shares early / mid / late and by site, with bootstrap CIs.

A jump at step ``s`` of a run trained for ``n_steps`` is *early* when ``s / n_steps <
early``, *late* when ``>= late``, else *mid* (:func:`._frames.phase_label`). Shares are of
all jumps pooled.

Confidence intervals are percentile bootstrap intervals (``n_boot`` resamples, fixed
``seed``). Jumps of one run are not independent (one run's dynamics move all its sites), so
with a ``run`` column holding two or more runs the bootstrap resamples *runs* with
replacement and pools their jumps (a cluster bootstrap); otherwise it resamples jumps. The
result says which in ``resampling``. A resample without jumps is skipped.

The second table gives the share of jumps at each site, in depth order (``sites``; pass
``pd.unique(results.site)`` — by default the order of first appearance in the jumps frame);
``first_layer_share`` is the share at the first site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hookscope.analysis._validate import in_range, positive_int
from hookscope.errors import AnalysisError, format_choices

from ._frames import (
    JUMP_COLUMNS,
    PHASES,
    check_n_steps,
    check_phases,
    has_runs,
    n_steps_of,
    phase_label,
    require_frame,
    sites_in_order,
    table_text,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PhaseDistribution", "phase_distribution"]


@dataclass(frozen=True, repr=False)
class PhaseDistribution:
    """Shares of jumps per phase and per site with bootstrap CIs.

    ``table``: ``phase``, ``n_jumps``, ``share``, ``ci_low``, ``ci_high``. ``by_site``: the
    same per ``site`` in depth order. ``resampling``: what the bootstrap resampled.
    """

    table: pd.DataFrame
    by_site: pd.DataFrame
    n_jumps: int
    n_runs: int
    resampling: str
    early: float
    late: float
    confidence: float
    n_boot: int

    @property
    def first_layer_share(self) -> float:
        """Share of all jumps at the first site."""
        return float(self.by_site["share"].iloc[0])

    def to_pandas(self) -> pd.DataFrame:
        """One row per phase."""
        return self.table.copy()

    def __repr__(self) -> str:
        head = (
            f"PhaseDistribution({self.n_jumps} jumps in {self.n_runs} run(s); early < "
            f"{self.early:g}, late >= {self.late:g}; {self.confidence:.0%} CI by {self.n_boot} "
            f"resamples of {self.resampling})"
        )
        return "\n".join([head, table_text(self.table), "", "by site:", table_text(self.by_site)])

    def plot(self) -> Figure:
        """Bars of the shares per phase and per site, with their CIs."""
        from hookscope.plot import figure

        fig = figure(figsize=(8, 3.2))
        axes = fig.subplots(1, 2, width_ratios=[1, 2])
        for ax, t, col in ((axes[0], self.table, "phase"), (axes[1], self.by_site, "site")):
            err = np.stack([t["share"] - t["ci_low"], t["ci_high"] - t["share"]])
            ax.bar(t[col].astype(str), t["share"], yerr=err, capsize=3)
            ax.set_ylim(0, 1)
            ax.set_ylabel("share of jumps")
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        axes[0].set_title("by phase")
        axes[1].set_title("by site (depth order)")
        fig.tight_layout()
        return fig


def _shares(codes: np.ndarray, n_cat: int) -> np.ndarray:
    return np.bincount(codes, minlength=n_cat) / max(len(codes), 1)


def _bootstrap(
    codes: list[np.ndarray], n_cat: int, n_boot: int, rng: np.random.Generator, alpha: float
) -> np.ndarray:
    """Percentile CIs ``[n_cat, 2]`` of the shares, resampling the groups in ``codes``."""
    counts = np.stack([np.bincount(c, minlength=n_cat) for c in codes])  # [groups, n_cat]
    picks = rng.integers(0, len(codes), size=(n_boot, len(codes)))
    totals = counts[picks].sum(axis=1)  # [n_boot, n_cat]
    n = totals.sum(axis=1)
    shares = totals[n > 0] / n[n > 0, None]
    return np.quantile(shares, [alpha / 2, 1 - alpha / 2], axis=0).T


def phase_distribution(
    jumps: pd.DataFrame,
    n_steps: Any,
    early: float = 0.1,
    late: float = 0.5,
    n_boot: int = 2000,
    seed: int = 0,
    *,
    confidence: float = 0.95,
    sites: Sequence[str] | None = None,
) -> PhaseDistribution:
    """Shares of ``jumps`` early / mid / late and per site, with bootstrap CIs.

    ``n_steps``: total training steps (int, or dict run -> int when ``jumps`` has a ``run``
    column). ``early`` / ``late``: phase bounds as fractions of ``n_steps``. ``sites``: all
    sites in depth order (so sites without jumps get share 0).
    """
    jumps = require_frame(jumps, "jumps", JUMP_COLUMNS)
    early, late = check_phases(early, late)
    n_boot = positive_int(n_boot, "n_boot", minimum=100)
    seed = positive_int(seed, "seed", minimum=0)
    confidence = in_range(confidence, "confidence", 0.0, 1.0, closed_low=False)
    check_n_steps(n_steps, jumps)
    order = sites_in_order(jumps) if sites is None else [str(s) for s in sites]
    unknown = sorted(set(map(str, jumps["site"])) - set(order))
    if unknown:
        raise AnalysisError(
            f"jumps has site(s) {format_choices(unknown)} not in sites ({format_choices(order)})"
        )
    runs = jumps["run"].to_numpy() if has_runs(jumps) else np.full(len(jumps), None)
    total = np.array([n_steps_of(n_steps, r) for r in runs])
    phase = phase_label(jumps["step"].to_numpy(dtype=float) / total, early, late)
    phase_code = np.array([PHASES.index(p) for p in phase], dtype=int)
    site_code = np.array([order.index(str(s)) for s in jumps["site"]], dtype=int)
    run_ids = list(pd.unique(pd.Series(runs)))
    if len(run_ids) >= 2:
        groups = [np.flatnonzero(runs == r) for r in run_ids]
        resampling = f"runs (cluster bootstrap over {len(run_ids)} runs)"
        if len(run_ids) < 5:
            resampling += "; with so few runs the interval is coarse"
    else:
        groups = [np.array([i]) for i in range(len(jumps))]
        resampling = "jumps (one run)"
    alpha = 1 - confidence
    tables = []
    for codes, labels, col in ((phase_code, PHASES, "phase"), (site_code, order, "site")):
        rng = np.random.default_rng(seed)
        ci = _bootstrap([codes[g] for g in groups], len(labels), n_boot, rng, alpha)
        counts = np.bincount(codes, minlength=len(labels))
        tables.append(pd.DataFrame({col: list(labels), "n_jumps": counts,
                                    "share": _shares(codes, len(labels)),
                                    "ci_low": ci[:, 0], "ci_high": ci[:, 1]}))  # fmt: skip
    return PhaseDistribution(tables[0], tables[1], len(jumps), len(run_ids), resampling,
                             early, late, confidence, n_boot)  # fmt: skip
