"""What a metric reads: answer tokens (ids or one-token strings) and positions, parsed
when the metric is built and checked against an output shape before any forward."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookscope.errors import InputError

TokenIds = int | str | Sequence[int] | Sequence[str] | Tensor
Position = int | Sequence[int] | Tensor | None

_TOKEN_CHOICES = (
    "a token id (int), a token string (one token of the model's tokenizer, e.g. ' Mary'), "
    "or a list / 1-D integer tensor of them with one per row"
)
_POSITION_CHOICES = (
    "an int (the same position in every row; negative counts from the end), a list / 1-D "
    "integer tensor with one position per row, or None for [batch, classes] outputs"
)


@dataclass(frozen=True)
class TokenText:
    """Answer tokens given as text (``" Mary"``), each to be exactly one token of the
    model's tokenizer; :meth:`Metric.bind` turns them into ids."""

    texts: tuple[str, ...]
    one: bool  #: a single string: the same answer in every row

    def __str__(self) -> str:
        return repr(self.texts[0]) if self.one else repr(list(self.texts))

    def ids(self, tokenizer: Any, what: str, name: str) -> Tensor:
        """The token id of each text (a 0-d tensor for a single string)."""
        if tokenizer is None:
            raise InputError(
                f"{name}: {what} {self} is text, but this model has no tokenizer; pass token "
                "ids (ints), or wrap the model with tokenizer=..."
            )
        found = tokenizer(list(self.texts), add_special_tokens=False)["input_ids"]
        for text, ids in zip(self.texts, found, strict=True):
            if len(ids) != 1:
                pieces = [tokenizer.decode([i]) for i in ids]
                raise InputError(
                    f"{name}: {what} {text!r} is {len(ids)} tokens with this tokenizer "
                    f"({pieces}); an answer must be exactly one token: pass a text that is one "
                    "token (mind the leading space) or its token id"
                )
        return torch.tensor(found[0][0] if self.one else [ids[0] for ids in found])


def _integers(value: Any, what: str, choices: str, note: str = "") -> Tensor:
    """``value`` as a 0-d or non-empty 1-D integer tensor (never rounded), or an InputError
    naming ``choices``."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} must be {choices}; got {value!r}") from None
    if t.ndim == 1 and t.numel() == 0:
        raise InputError(f"{what} is empty; it must be {choices}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.ndim > 1:
        raise InputError(f"{what} must be {choices}; got shape {tuple(t.shape)} {t.dtype}{note}")
    return t


def parse_tokens(ids: TokenIds, what: str) -> Tensor | TokenText:
    """Answer tokens as a LongTensor (0-d or 1-D) of ids >= 0, or as :class:`TokenText`."""
    if isinstance(ids, str):
        return TokenText((ids,), True)
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(t, str) for t in ids):
        return TokenText(tuple(ids), False)
    if isinstance(ids, (bool, float, complex, dict, set)) or ids is None:
        raise InputError(f"{what} must be {_TOKEN_CHOICES}; got {ids!r}")
    t = _integers(ids, what, _TOKEN_CHOICES)
    if t.numel() and int(t.min()) < 0:
        raise InputError(f"{what} token ids must be >= 0; got {int(t.min())}")
    return t.long()


def parse_position(position: Position, what: str = "position") -> int | Tensor | None:
    """``position`` as None, an int, or an integer tensor (one per row), never truncated."""
    if position is None:
        return None
    if isinstance(position, numbers.Integral) and not isinstance(position, bool):
        return int(position)
    if isinstance(position, (bool, str, float, dict, set)):
        raise InputError(f"{what} must be {_POSITION_CHOICES}; got {position!r}")
    note = " (positions are never rounded)"
    return _integers(position, what, _POSITION_CHOICES, note).long()


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


def resolve(ids: Tensor | TokenText, what: str, model: Any, name: str) -> Tensor:
    if isinstance(ids, TokenText):
        return ids.ids(getattr(model, "tokenizer", None), what, name)
    return ids
