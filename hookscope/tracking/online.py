"""Online jump detection: the validated detector of :mod:`hookscope.analysis.jumps`, run
while training goes on, over many series at once.

Offline, :func:`~hookscope.analysis.jumps.jump_report` z-scores every difference of a series
against a reference window around it. Online only the past exists, so this module uses its
causal form (``causal=True``: the reference is the ``window`` positions *before* each
difference) and works in two stages:

1. **Trigger** (every new value, all series at once, vectorised): the causal robust z of the
   newest first difference and of the newest ``h``-point block difference of every series,
   exactly the statistic ``jump_report(..., causal=True)`` computes. A position with
   ``|z| >= threshold`` is a candidate.
2. **Decision** (rare: only for series with a candidate): once ``confirm`` values after the
   candidate exist, ``jump_report(causal=True)`` runs on that series' recent segment; its
   jumps (grouped flags, a significant fitted level change, spikes told apart) whose first
   new value lies in the not yet decided part are reported, each once.

So a jump is reported ``confirm`` logged values after it happened (the ``confirmed_at`` step),
and a level shift is one jump, not a run of flags (the original tracker's defect). The first
``MIN_REFERENCE + 2`` (10) logged values cannot hold a detected jump: there is no reference yet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from hookscope.analysis.jumps import MIN_REFERENCE, jump_report
from hookscope.errors import AnalysisError

__all__ = ["TrackedJump", "OnlineJumps", "DETECTOR_DEFAULTS", "jumps_frame"]

_MAD_TO_STD = 1.4826
#: metrics whose values are integers, and their rounding noise sd (see jump_report's noise_floor)
INTEGER_METRICS = ("energy_rank",)
INTEGER_NOISE = 1.0 / np.sqrt(12.0)
#: the validated detector's settings (hookscope.analysis.jumps), causal for online use
DETECTOR_DEFAULTS: dict[str, Any] = {
    "threshold": 5.0,
    "window": 50,
    "scales": (1, 4),
    "min_separation": 3,
    "level_window": 25,
    "min_magnitude": 0.0,
}


@dataclass(frozen=True)
class TrackedJump:
    """One jump found during training.

    ``step``: the training step of the first logged value on the new level (the change
    happened after the previous logged step). ``site``/``metric``: the series.
    ``magnitude``: fitted level change (>= 0); ``z``: signed robust z of the difference;
    ``direction``: "up"/"down"; ``confirmed_at``: the training step whose value confirmed it.
    """

    step: int | float
    site: str
    metric: str
    magnitude: float
    z: float
    direction: str
    confirmed_at: int | float


def jumps_frame(jumps: list[TrackedJump]) -> pd.DataFrame:
    """One row per jump: step, site, metric, magnitude, z, direction, confirmed_at."""
    cols = ["step", "site", "metric", "magnitude", "z", "direction", "confirmed_at"]
    return pd.DataFrame([asdict(j) for j in jumps], columns=cols)


def _row_median(a: np.ndarray) -> np.ndarray:
    """Median of each row (np.median's value, through one partition: ~5x faster here)."""
    k = a.shape[1]
    mid = k // 2
    if k % 2:
        return np.partition(a, mid, axis=1)[:, mid]
    part = np.partition(a, (mid - 1, mid), axis=1)
    return 0.5 * (part[:, mid - 1] + part[:, mid])


class OnlineJumps:
    """Online jump detection over ``names`` series that share their steps.

    ``push(step, values)`` appends one value per series (an array in ``names`` order) and
    returns the jumps confirmed by it; ``finish()`` decides the candidates left at the end
    of training (with fewer than ``confirm`` values after them). ``noise_floors``: the least
    noise sd of each series (default: ``1/sqrt(12)``, the rounding noise, for integer-valued
    metrics such as ``energy_rank``, else 0; see ``jump_report(noise_floor=)``). ``detector`` overrides
    :data:`DETECTOR_DEFAULTS` (threshold, window, scales, min_separation, level_window,
    min_magnitude).
    """

    def __init__(
        self,
        names: list[tuple[str, str]],
        confirm: int = 10,
        noise_floors: Any = None,
        **detector: Any,
    ):
        unknown = set(detector) - set(DETECTOR_DEFAULTS)
        if unknown:
            raise AnalysisError(
                f"unknown jump detector option(s) {sorted(unknown)}; choose from "
                f"{', '.join(DETECTOR_DEFAULTS)}"
            )
        self.options = {**DETECTOR_DEFAULTS, **detector}
        # the offline detector checks every setting and names the bad one
        jump_report(np.arange(4.0 * MIN_REFERENCE), causal=True, **self.options)
        self.window = int(self.options["window"])
        if self.window < MIN_REFERENCE:
            raise AnalysisError(f"window must be >= {MIN_REFERENCE}; got {self.window}")
        self.scales = tuple(int(h) for h in self.options["scales"])
        self.threshold = float(self.options["threshold"])
        if not isinstance(confirm, int) or confirm < max(self.scales) + 1:
            raise AnalysisError(
                f"confirm must be an int >= {max(self.scales) + 1} (the longest block scale "
                f"plus one: values after a jump needed to see it); got {confirm!r}"
            )
        self.confirm = confirm
        self.names = list(names)
        s = len(self.names)
        self._cap = 256
        self.values = np.zeros((s, self._cap))
        self.steps = np.zeros(self._cap)
        self.stats = {h: np.full((s, self._cap), np.nan) for h in self.scales}
        self.flags = np.zeros((s, self._cap), dtype=bool)  # positions with |z| >= threshold
        self.n = 0
        self.lo = np.full(s, np.inf)
        self.hi = np.full(s, -np.inf)
        self.pending = np.full(s, -1, dtype=np.int64)  # earliest flagged difference, or -1
        self.decided = np.zeros(s, dtype=np.int64)  # values before this index are decided
        self.last_jump = np.full(s, -(10**9), dtype=np.int64)
        self.found: list[TrackedJump] = []
        # least noise sd per series: 1/sqrt(12) (rounding) for integer metrics such as energy_rank
        if noise_floors is None:
            noise_floors = [INTEGER_NOISE if m in INTEGER_METRICS else 0.0 for _, m in self.names]
        self.noise = np.asarray(noise_floors, dtype=float)

    def _grow(self) -> None:
        self._cap *= 2
        pad = self._cap - self.values.shape[1]
        self.values = np.pad(self.values, ((0, 0), (0, pad)))
        self.steps = np.pad(self.steps, (0, pad))
        self.flags = np.pad(self.flags, ((0, 0), (0, pad)))
        for h in self.scales:
            self.stats[h] = np.pad(self.stats[h], ((0, 0), (0, pad)), constant_values=np.nan)

    def push(self, step: float, values: np.ndarray) -> list[TrackedJump]:
        """Append one value per series at training ``step``; the jumps this confirms."""
        if self.n and step <= self.steps[self.n - 1]:
            raise AnalysisError(
                f"steps must increase; got step {step} after step {self.steps[self.n - 1]:g}"
            )
        if self.n == self._cap:
            self._grow()
        n = self.n
        self.values[:, n] = values
        self.steps[n] = step
        self.n = n + 1
        self.lo = np.minimum(self.lo, values)
        self.hi = np.maximum(self.hi, values)
        for h in self.scales:
            self._trigger(h)
        due = (self.pending >= 0) & (self.pending + 1 + self.confirm < self.n)
        out: list[TrackedJump] = []
        for s in np.flatnonzero(due):
            out += self._decide(int(s), final=False)
        return out

    def _trigger(self, h: int) -> None:
        """Causal robust z of the newest statistic at scale ``h`` (as jump_report computes)."""
        n, v = self.n, self.values
        t = n - 1 - h  # the newest position whose block difference is defined
        if t < h - 1:
            return
        stat = (v[:, t + 1 : t + 1 + h].sum(axis=1) - v[:, t + 1 - h : t + 1].sum(axis=1)) / h
        self.stats[h][:, t] = stat
        start = max(h - 1, t - self.window)
        stop = t - h  # reference: positions t-window .. t-h-1 (the nearest h excluded)
        if stop - start < MIN_REFERENCE:
            return
        ref = self.stats[h][:, start:stop]
        center = _row_median(ref)
        mad = _row_median(np.abs(ref - center[:, None]))
        top = np.maximum(np.abs(self.lo), np.abs(self.hi))
        span = np.maximum(self.hi - self.lo, 1e3 * np.finfo(float).eps * top)
        floor = np.maximum(
            np.where(span > 0, 1e-9 * span, 1e-300) * np.sqrt(1.0 / h),
            self.noise * np.sqrt(2.0 / h),
        )
        z = (stat - center) / np.maximum(_MAD_TO_STD * mad, floor)
        hit = (np.abs(z) >= self.threshold) & (t + 1 >= self.decided)
        self.flags[hit, t] = True
        self.pending[hit & (self.pending < 0)] = t

    def _decide(self, s: int, final: bool) -> list[TrackedJump]:
        cand = int(self.pending[s])
        self.pending[s] = -1
        reach = self.window + 2 * int(self.options["level_window"]) + 2 * max(self.scales)
        lo = max(0, cand - reach)
        hi = self.n
        stop = hi if final else hi - self.confirm  # jumps starting before this are decided
        if hi - lo < 10:
            self.decided[s] = max(self.decided[s], stop)
            return []
        rep = jump_report(
            self.values[s, lo:hi],
            self.steps[lo:hi],
            causal=True,
            noise_floor=float(self.noise[s]),
            **self.options,
        )
        out = []
        gap = int(self.options["min_separation"]) + max(self.scales)
        for j in rep.jumps:
            index = lo + j.index
            # only the flagged event: an older change that never flagged is not an online find
            near = index >= cand + 1 - gap
            if not near or not self.decided[s] <= index < stop or index - self.last_jump[s] <= gap:
                continue
            self.last_jump[s] = index
            site, metric = self.names[s]
            step = self.steps[index]
            out.append(
                TrackedJump(
                    int(step) if float(step).is_integer() else float(step),
                    site,
                    metric,
                    j.magnitude,
                    j.z,
                    j.direction,
                    int(self.steps[hi - 1])
                    if float(self.steps[hi - 1]).is_integer()
                    else float(self.steps[hi - 1]),
                )
            )
        self.decided[s] = max(self.decided[s], stop)
        later = np.flatnonzero(self.flags[s, max(0, stop - 1) : hi])
        if later.size:  # flags past the decided part wait for their own confirmation
            self.pending[s] = max(0, stop - 1) + int(later[0])
        self.found += out
        return out

    def finish(self) -> list[TrackedJump]:
        """Decide every candidate left at the end of training (fewer values after it)."""
        out: list[TrackedJump] = []
        for s in np.flatnonzero(self.pending >= 0):
            out += self._decide(int(s), final=True)
        return out
