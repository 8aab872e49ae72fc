"""What a metric reads: positions, parsed when the metric is built, and answer tokens
(parsed by :mod:`hookscope.tokens`) with them checked against an output shape before any
forward."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from hookscope.errors import InputError
from hookscope.tokens import TokenText, as_integers

Position = int | Sequence[int] | Tensor | None

_POSITION_CHOICES = (
    "an int (the same position in every row; negative counts from the end), a list / 1-D "
    "integer tensor with one position per row, or None for [batch, classes] outputs"
)


def parse_position(position: Position, what: str = "position") -> int | Tensor | None:
    """``position`` as None, an int, or an integer tensor (one per row), never truncated."""
    if position is None:
        return None
    if isinstance(position, numbers.Integral) and not isinstance(position, bool):
        return int(position)
    if isinstance(position, (bool, str, float, dict, set)):
        raise InputError(f"{what} must be {_POSITION_CHOICES}; got {position!r}")
    note = " (positions are never rounded)"
    return as_integers(position, what, _POSITION_CHOICES, note).long()


def check_read(
    name: str, shape: Sequence[int], position: int | Tensor | None, ids: dict[str, Any]
) -> None:
    """InputError unless a metric reading ``position`` and token ``ids`` fits an output of
    ``shape`` ([batch, pos, vocab], or [batch, classes] when position is None)."""
    shape = tuple(int(n) for n in shape)
    if position is None:
        if len(shape) != 2:
            raise InputError(
                f"{name}: position=None needs [batch, classes] output, got shape {shape}; "
                "pass the position to read (an int, or one per row)"
            )
        batch, width, unit = shape[0], shape[1], "classes"
    else:
        if len(shape) != 3:
            raise InputError(
                f"{name}: output must be [batch, pos, vocab] to read position "
                f"{show_position(position)}, got shape {shape}; pass position=None for [batch, classes] "
                "outputs (classifiers)"
            )
        batch, n_pos, width = shape
        unit = "vocabulary entries"
        if isinstance(position, int):
            if not -n_pos <= position < n_pos:
                raise InputError(
                    f"{name}: position {position} out of range for {n_pos} positions "
                    f"(valid: 0..{n_pos - 1}, or {-n_pos}..-1 counted from the end)"
                )
        else:
            if tuple(position.shape) != (batch,):
                raise InputError(
                    f"{name}: position must be an int or one per row ({batch}), got shape "
                    f"{tuple(position.shape)}"
                )
            bad = ((position < -n_pos) | (position >= n_pos)).nonzero().flatten().tolist()
            if bad:
                raise InputError(
                    f"{name}: positions {position[bad].tolist()} of rows {bad} out of range for "
                    f"{n_pos} positions (valid: 0..{n_pos - 1}, or {-n_pos}..-1 from the end)"
                )
    for what, t in ids.items():
        if isinstance(t, TokenText):
            raise InputError(
                f"{name}: {what} {t} is text; resolve it with the model's tokenizer first: "
                "metric.bind(model) (sweeps do this themselves), or pass token ids"
            )
        if t.ndim == 1 and t.shape[0] != batch:
            raise InputError(
                f"{name}: {t.shape[0]} {what} ids for a batch of {batch}; give one id for "
                "every row or one per row"
            )
        if t.numel() and int(t.max()) >= width:
            raise InputError(
                f"{name}: {what} id {int(t.max())} out of range; valid ids are "
                f"0..{width - 1} (the output has {width} {unit})"
            )


def show_position(position: int | Tensor) -> str:
    return str(position) if isinstance(position, int) else str(position.tolist())
