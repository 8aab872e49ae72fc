"""Row splits of a probe sweep: stratified train / val / test parts or cross-validation folds,
one per seed, the same at every site (so sites compare on the same rows)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hookscope.errors import ProbeError

__all__ = ["check_sizes", "check_split", "part_sizes", "rows_of", "splits"]


@dataclass(frozen=True)
class Split:
    """Row masks of one seed: ``train``/``val`` (bool [n]) and the held-out rows (``test``)
    for the split mode, or ``folds`` (fold number per row) for cross-validation."""

    train: list[np.ndarray]  # one per fold (a single one for the split mode)
    val: list[np.ndarray | None]
    test: list[np.ndarray]


def part_sizes(count: int, fractions: list[float]) -> np.ndarray:
    """How many of ``count`` rows each part gets: cumulative rounding, the last part taking
    the rest (so the sizes always add up to ``count``)."""
    cuts = np.round(np.cumsum(fractions) * count).astype(int)
    cuts[-1] = count
    return np.diff(np.concatenate([[0], cuts]))


def _stratified_parts(strata: np.ndarray, fractions: list[float], rng) -> np.ndarray:
    """Part number per row, allocating each stratum's rows to the parts by ``fractions``."""
    part = np.full(strata.shape[0], -1, dtype=np.int64)
    for s in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == s))
        start = 0
        for k, size in enumerate(part_sizes(rows.shape[0], fractions)):
            part[rows[start : start + size]] = k
            start += size
    return part


def splits(
    strata: np.ndarray, split: dict | None, cv: int | None, seeds: int, base: int
) -> list[Split]:
    out = []
    for s in range(seeds):
        rng = np.random.default_rng([base, s])
        if cv is not None:
            folds = _stratified_parts(strata, [1.0 / cv] * cv, rng)
            out.append(
                Split([folds != f for f in range(cv)], [None] * cv, [folds == f for f in range(cv)])
            )
        else:
            names = list(split)
            part = _stratified_parts(strata, [split[k] for k in names], rng)
            masks = {k: part == i for i, k in enumerate(names)}
            out.append(Split([masks["train"]], [masks.get("val")], [masks["test"]]))
    return out


def check_split(split: Any, cv: Any, needs_val: bool) -> tuple[dict | None, int | None]:
    if cv is not None and split is not None:
        raise ProbeError("give split= or cv=, not both")
    if cv is not None:
        if not isinstance(cv, int) or isinstance(cv, bool) or cv < 2:
            raise ProbeError(f"cv must be an integer number of folds >= 2; got {cv!r}")
        if needs_val:
            raise ProbeError("a grid of C needs a validation split: use split= with a 'val' part")
        return None, cv
    if split is None:
        split = (
            {"train": 0.6, "val": 0.2, "test": 0.2} if needs_val else {"train": 0.8, "test": 0.2}
        )
    if not isinstance(split, Mapping):
        raise ProbeError(f"split must be a dict like {{'train': 0.8, 'test': 0.2}}; got {split!r}")
    unknown = set(split) - {"train", "val", "test"}
    if unknown or not {"train", "test"} <= set(split):
        raise ProbeError(
            f"split takes the parts 'train', 'test' and optionally 'val'; got {sorted(split)}"
        )
    if not all(
        isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) for v in split.values()
    ):
        raise ProbeError(f"split fractions must be numbers; got {dict(split)}")
    values = [float(v) for v in split.values()]
    if any(v <= 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ProbeError(f"split fractions must be positive and sum to 1; got {dict(split)}")
    if needs_val and "val" not in split:
        raise ProbeError("a grid of C picks C on a validation split: add a 'val' part to split")
    return dict(split), None


def check_sizes(strata: np.ndarray, split: dict | None, cv: int | None, task: str) -> None:
    n = strata.shape[0]
    if cv is not None:
        if task == "classification":
            classes, counts = np.unique(strata, return_counts=True)
            if counts.min() < cv:
                raise ProbeError(
                    f"cv={cv} needs at least {cv} rows of every class; class "
                    f"{classes[counts.argmin()]!r} has {counts.min()} ({n} rows in all)"
                )
        elif n < 2 * cv:
            raise ProbeError(f"cv={cv} needs at least {2 * cv} rows; there are {n}")
        return
    names, fractions = list(split), list(split.values())
    if task == "classification":
        classes, counts = np.unique(strata, return_counts=True)
        for c, count in zip(classes, counts, strict=True):
            sizes = part_sizes(int(count), fractions)
            if sizes.min() < 1:
                empty = names[int(sizes.argmin())]
                raise ProbeError(
                    f"too few examples for the split {split}: class {c!r} has {count} rows, "
                    f"which leaves {int(sizes.min())} in '{empty}'"
                )
    else:
        sizes = part_sizes(n, fractions)
        if sizes.min() < 2:
            empty = names[int(sizes.argmin())]
            raise ProbeError(
                f"too few examples for the split {split}: {n} rows leave {int(sizes.min())} "
                f"in '{empty}'"
            )


def rows_of(part: Split) -> dict[str, np.ndarray]:
    """Row numbers of one seed's split (``train``/``val``/``test``), or ``folds``: the
    held-out fold of every row."""
    if len(part.train) == 1:
        out = {"train": np.flatnonzero(part.train[0]), "test": np.flatnonzero(part.test[0])}
        if part.val[0] is not None:
            out["val"] = np.flatnonzero(part.val[0])
        return out
    folds = np.zeros(part.test[0].shape[0], dtype=np.int64)
    for f, test in enumerate(part.test):
        folds[test] = f
    return {"folds": folds}
