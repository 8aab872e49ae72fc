"""Checks and helpers shared by the training-dynamics analyses: the two frame schemas.

*results frame* (long): ``step`` (int, training step), ``site`` (hookscope address; the order
of first appearance is depth order), ``metric``, ``value``; optionally ``loss``,
``grad_norm`` (NaN when not logged) and ``run`` (several runs, e.g. seeds, concatenated).

*jumps frame*: ``step``, ``site``, ``metric``, ``magnitude`` (>= 0), ``z``, ``direction``
(``"up"`` / ``"down"``); optionally ``run``.

A frame without a ``run`` column is one run, reported with run ``None``.

Phases are defined once here, in :func:`phase_label`: with ``f = step / n_steps``, *early*
is ``f < early``, *late* is ``f >= late`` and *mid* is everything between.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from hookscope.analysis._validate import as_matrix
from hookscope.errors import AnalysisError, format_choices, suggestion

RESULT_COLUMNS = ("step", "site", "metric", "value")
JUMP_COLUMNS = ("step", "site", "metric", "magnitude", "direction")
PHASES = ("early", "mid", "late")


def require_frame(df: Any, name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """``df`` if it is a non-empty DataFrame holding ``columns``, else an AnalysisError."""
    if not isinstance(df, pd.DataFrame):
        raise AnalysisError(
            f"{name} must be a pandas DataFrame with columns {', '.join(columns)}; "
            f"got {type(df).__name__}"
        )
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AnalysisError(
            f"{name} lacks column(s) {', '.join(missing)}; it needs {', '.join(columns)} "
            f"and has {format_choices(map(str, df.columns))}"
        )
    if df.empty:
        raise AnalysisError(f"{name} has no rows")
    return df


def pick_metric(df: pd.DataFrame, metric: Any, name: str = "results") -> pd.DataFrame:
    """The rows of ``df`` for ``metric``, or an AnalysisError naming the metrics it holds."""
    held = [str(m) for m in pd.unique(df["metric"])]
    if metric not in held:
        raise AnalysisError(
            f"metric {metric!r} is not in {name}; it holds: {format_choices(held)}."
            + suggestion(str(metric), held)
        )
    return df[df["metric"] == metric]


def has_runs(df: pd.DataFrame) -> bool:
    """Whether ``df`` has a ``run`` column."""
    return "run" in df.columns


def by_run(df: pd.DataFrame) -> Iterator[tuple[Any, pd.DataFrame]]:
    """``(run, rows)`` per run in order of first appearance; ``(None, df)`` without a run column."""
    if not has_runs(df):
        yield None, df
        return
    for run in pd.unique(df["run"]):
        yield run, df[df["run"] == run]


def sites_in_order(df: pd.DataFrame) -> list[str]:
    """Sites in depth order: the order of first appearance in the frame."""
    return [str(s) for s in pd.unique(df["site"])]


def series(rows: pd.DataFrame, what: str, column: str = "value") -> tuple[np.ndarray, np.ndarray]:
    """Steps and ``column`` values of one series (one run, site, metric), sorted by step.

    Raises when a step is logged twice (two runs mixed without a ``run`` column) or a value is
    NaN / Inf.
    """
    rows = rows.sort_values("step")
    steps = rows["step"].to_numpy(dtype=float)
    values = rows[column].to_numpy(dtype=float)
    if np.any(np.diff(steps) == 0):
        dup = float(steps[np.flatnonzero(np.diff(steps) == 0)[0]])
        raise AnalysisError(
            f"{what} logs step {dup:g} more than once; concatenated runs need a 'run' column"
        )
    if not np.all(np.isfinite(values)):
        raise AnalysisError(
            f"{what} has {int((~np.isfinite(values)).sum())} NaN/Inf values in {column!r}"
        )
    return steps, values


def describe(run: Any, site: str, metric: str) -> str:
    """``"run 'a', site 'x', metric 'm'"`` (without the run part for a single run)."""
    head = f"run {run!r}, " if run is not None else ""
    return f"{head}site {site!r}, metric {metric!r}"


def n_steps_of(n_steps: Any, run: Any) -> float:
    """Total training steps of ``run``: ``n_steps`` itself, or ``n_steps[run]`` for a mapping."""
    if isinstance(n_steps, Mapping):
        if run not in n_steps:
            raise AnalysisError(
                f"n_steps has no entry for run {run!r}; it has {format_choices(map(repr, n_steps))}"
            )
        n_steps = n_steps[run]
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, float, np.integer, np.floating)):
        raise AnalysisError(
            f"n_steps must be a positive number (or a dict run -> number); got {n_steps!r}"
        )
    if not np.isfinite(n_steps) or n_steps <= 0:
        raise AnalysisError(f"n_steps must be a positive number; got {n_steps!r}")
    return float(n_steps)


def check_n_steps(n_steps: Any, jumps: pd.DataFrame) -> None:
    """Raise unless ``n_steps`` suits ``jumps``: a dict needs a ``run`` column and every run."""
    if isinstance(n_steps, Mapping) and not has_runs(jumps):
        raise AnalysisError("n_steps is a dict run -> n_steps but the frame has no 'run' column")
    for run, rows in by_run(jumps):
        total = n_steps_of(n_steps, run)
        late = rows["step"].to_numpy(dtype=float)
        if np.any(late < 0) or np.any(late > total):
            raise AnalysisError(
                f"{'run ' + repr(run) + ': ' if run is not None else ''}jump steps must lie in "
                f"[0, n_steps={total:g}]; found {late.min():g} .. {late.max():g}"
            )


def check_phases(early: Any, late: Any) -> tuple[float, float]:
    """``early`` and ``late`` as fractions with ``0 < early <= late <= 1``."""
    try:
        e, la = float(early), float(late)
    except (TypeError, ValueError) as err:
        raise AnalysisError(f"early and late must be numbers; got {early!r}, {late!r}") from err
    if not (0.0 < e <= la <= 1.0):
        raise AnalysisError(f"need 0 < early <= late <= 1; got early={early!r}, late={late!r}")
    return e, la


def phase_label(fraction: np.ndarray, early: float, late: float) -> np.ndarray:
    """``"early"`` where ``fraction < early``, ``"late"`` where ``>= late``, else ``"mid"``."""
    f = np.asarray(fraction, dtype=float)
    return np.where(f < early, "early", np.where(f >= late, "late", "mid"))


def table_text(df: pd.DataFrame, max_rows: int = 30) -> str:
    """A DataFrame as the fixed-width text used by every ``__repr__``."""
    return df.to_string(index=False, max_rows=max_rows, float_format=lambda x: f"{x:.4g}")


def step_matrices(activations: Any, min_rows: int = 2) -> tuple[list[Any], list[Tensor]]:
    """Steps (sorted) and ``[n, d]`` float64 matrices of a dict ``{step: [n, d] array}``.

    Every step must hold the same number of rows (the same inputs) and features (one site).
    """
    if not (hasattr(activations, "items") and callable(activations.items)):
        raise AnalysisError(
            f"activations must be a dict {{step: [n, d] array}}; got {type(activations).__name__}"
        )
    try:
        pairs = sorted(activations.items(), key=lambda p: p[0])
    except TypeError as err:
        raise AnalysisError(f"activation steps must be comparable numbers: {err}") from err
    if not pairs:
        raise AnalysisError("activations is empty")
    mats = [as_matrix(a, f"activations[{s!r}]", min_rows=min_rows) for s, a in pairs]
    (s0, _), m0 = pairs[0], mats[0]
    for (step, _), m in zip(pairs, mats, strict=True):
        if m.shape != m0.shape:
            raise AnalysisError(
                f"activations[{s0!r}] has shape {tuple(m0.shape)} but activations[{step!r}] has "
                f"{tuple(m.shape)}; every step must hold the same inputs (rows) at one site"
            )
    return [s for s, _ in pairs], mats
