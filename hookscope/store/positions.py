"""Which rows an example contributes: the position policy.

============  ==========================================================================
policy        rows per example
============  ==========================================================================
``"last"``    1: its last real token (the attention mask decides; padding never counts)
``"mean"``    1: the mean over its real tokens (computed in float32, then stored)
``"all"``     one per real token, with (example, position, token id) in ``acts.index``
int ``p``     1: position ``p`` (negative counts from the last real token: -1 = last)
list of int   one per listed position
column name   the dataset column holds each example's position (an int) or positions (a
              list of ints), e.g. the IOI ``end_pos``
``"image"``   vision models: one row per image, the whole activation ([C, H, W], [pos, d])
============  ==========================================================================

Every position is checked against every example's length before any forward, and an
out-of-range one is a StoreError naming the example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hookscope.errors import StoreError

__all__ = ["Policy", "parse_policy"]

_NAMED = ("last", "mean", "all", "image")


@dataclass(frozen=True)
class Policy:
    kind: str  # last | mean | all | image | fixed | column
    fixed: tuple[int, ...] = ()
    column: str | None = None

    def describe(self) -> Any:
        """JSON form, part of the entry key."""
        if self.kind == "fixed":
            return list(self.fixed)
        if self.kind == "column":
            return {"column": self.column}
        return self.kind

    @property
    def one_row(self) -> bool:
        """Exactly one row per example (rows align with the dataset's own rows)."""
        return self.kind in ("last", "mean", "image") or (
            self.kind == "fixed" and len(self.fixed) == 1
        )

    def positions(self, lengths: np.ndarray, column: list | None = None) -> list[np.ndarray]:
        """Per example, the positions its rows read (``mean``/``image``: empty)."""
        out = []
        for i, n in enumerate(lengths.tolist()):
            if self.kind in ("mean", "image"):
                out.append(np.zeros(0, dtype=np.int64))
                continue
            if self.kind == "last":
                want = [n - 1]
            elif self.kind == "all":
                want = list(range(n))
            elif self.kind == "fixed":
                want = list(self.fixed)
            else:
                assert column is not None
                value = column[i]
                want = [value] if isinstance(value, (int, np.integer)) else list(value)
                if not all(
                    isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in want
                ):
                    raise StoreError(
                        f"positions column {self.column!r} must hold an int or a list of ints per "
                        f"example; example {i} holds {value!r}"
                    )
            resolved = [p + n if p < 0 else p for p in want]
            bad = [p for p, r in zip(want, resolved, strict=True) if not 0 <= r < n]
            if bad:
                raise StoreError(
                    f"position {bad[0]} is beyond example {i}, which has {n} tokens (valid: "
                    f"0-{n - 1}, or -1 to -{n} from the end); fix the positions or the max_length"
                )
            out.append(np.asarray(resolved, dtype=np.int64))
        return out


def parse_policy(positions: Any, columns: list[str], vision: bool) -> Policy:
    """``positions`` as a Policy, or StoreError naming the choices."""
    choices = (
        "'image' (one row per image) or 'all' (one per token, ViT)"
        if vision
        else "'last', 'mean', 'all', an int, a list of ints, or the name of a dataset column "
        "holding each example's position(s)"
    )
    if vision:
        if positions in ("image", "all"):
            return Policy(positions)
        raise StoreError(f"positions for a vision model must be {choices}; got {positions!r}")
    if isinstance(positions, str):
        if positions in ("last", "mean", "all"):
            return Policy(positions)
        if positions in columns:
            return Policy("column", column=positions)
        raise StoreError(
            f"positions={positions!r} is neither a policy nor a dataset column; use {choices}. "
            f"Dataset columns: {', '.join(columns)}"
        )
    if isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
        return Policy("fixed", (int(positions),))
    if (
        isinstance(positions, (list, tuple))
        and positions
        and all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in positions)
    ):
        return Policy("fixed", tuple(int(p) for p in positions))
    raise StoreError(f"positions must be {choices}; got {positions!r}")
