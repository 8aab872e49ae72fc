"""Rows of different lengths: on a causal model whose metric reads one position per row,
nothing after a row's read position can change its value, so a sweep need not compute it.
:func:`row_groups` splits the base rows by read position into groups that each run to
their own last read position (when the positions saved outweigh the extra forwards), and
:func:`restrict_jobs` / :func:`restrict_recorded` cut the jobs' values and the baseline
records to one group. Each group's value of a job is the mean over its rows, so the
batch's value is the row-weighted mean of the groups' (what
:meth:`~hookscope.interventions.engine.engine.Engine.run` computes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from hookscope.adapters.base import Adapter
from hookscope.interventions._forward_edits import positions, rows_of
from hookscope.interventions.engine.baseline import Recorded
from hookscope.interventions.engine.jobs import Job, Write
from hookscope.interventions.engine.plan import BLOCK_COST

__all__ = ["copies_for", "restrict_jobs", "restrict_recorded", "restrict_value", "row_groups"]


def copies_for(k: int, batch: int, rows: int, n_jobs: int | None = None) -> int:
    """Copies per forward of a group of ``rows`` base rows: at most as many rows per
    forward as ``k`` copies of the whole ``batch`` (the memory the caller allowed); with
    ``n_jobs``, the same number of forwards spread evenly (no small last forward)."""
    most = max(1, k * batch // rows)
    if n_jobs is None or n_jobs <= 0:
        return most
    forwards = -(-n_jobs // most)
    return -(-n_jobs // forwards)


def row_groups(read: Tensor, n_jobs: int, k: int) -> list[tuple[Tensor, int]]:
    """Groups ``(row indices, length)`` of the base rows, each running positions up to
    ``length`` (its last read position + 1), chosen to minimise the work: per group, the
    row-positions of all jobs plus :data:`~.plan.BLOCK_COST` for each of its forwards
    (:func:`copies_for` copies each). One group holding every row when splitting saves
    nothing."""
    batch = int(read.shape[0])
    levels = sorted(set(read.tolist()))
    counts = [int((read == p).sum()) for p in levels]
    m = len(levels)

    def cost(i: int, j: int) -> float:  # rows of levels i..j-1 in one group
        rows = sum(counts[i:j])
        forwards = -(-n_jobs // copies_for(k, batch, rows))
        return n_jobs * rows * (levels[j - 1] + 1) + BLOCK_COST * forwards

    best, cut = [0.0] + [float("inf")] * m, [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(j):
            c = best[i] + cost(i, j)
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], m
    while j > 0:
        i = cut[j]
        mask = (read >= levels[i]) & (read <= levels[j - 1])
        groups.append((mask.nonzero().flatten(), levels[j - 1] + 1))
        j = i
    return groups[::-1]


def restrict_recorded(rec: Recorded, index: Tensor, length: int) -> Recorded:
    """The baseline records of rows ``index``, positions ``..length``."""
    cut = slice(None, length)

    def take(value: Any) -> Any:
        return positions(rows_of(value, index), cut)  # type: ignore[arg-type]

    return Recorded(
        outputs=None if rec.outputs is None else [take(o) for o in rec.outputs],
        inputs=None if rec.inputs is None else [take(x) for x in rec.inputs],
        prefix_kv=(
            None
            if rec.prefix_kv is None
            else [(k[index][:, :, cut], v[index][:, :, cut]) for k, v in rec.prefix_kv]
        ),
        hidden=None if rec.hidden is None else take(rec.hidden),
    )


def restrict_value(value: Tensor, axis: int | None, index: Tensor, length: int) -> Tensor:
    """A whole-slot tensor of the base batch cut to rows ``index``, positions ``..length``."""
    value = value[index.to(value.device)]
    if axis is not None:
        value = value.narrow(axis, 0, min(length, value.shape[axis]))
    return value


def restrict_jobs(
    jobs: Sequence[Job], full: Callable[[Write], Tensor], adapter: Adapter, index: Tensor,
    length: int, n_pos: int,
) -> list[Job]:  # fmt: skip
    """``jobs`` on rows ``index`` and positions ``..length`` (``full``: a write's value as
    a whole-slot tensor). Writes at later positions change nothing these rows read and are
    dropped (a job may become empty: it then reproduces the base run)."""
    cut: dict[tuple[int, Any], Tensor] = {}  # one cut per value (jobs share values)
    out = []
    for job in jobs:
        writes = []
        for w in job:
            axis = adapter.position_axis(w.slot)
            pos = w.position
            if pos is not None and axis is not None:
                pos %= n_pos
                if pos >= length:
                    continue
            value = None
            if w.value is not None:
                key = (id(w.value), w.slot)
                if key not in cut:
                    cut[key] = restrict_value(full(w), axis, index, length)
                value = cut[key]
            writes.append(Write(w.address, pos, value))
        out.append(tuple(writes))
    return out
