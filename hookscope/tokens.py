"""Tokens named by id or by text: the one rule for "this text must be exactly one token",
shared by :meth:`HookedModel.to_single_token <hookscope.model.HookedModel.to_single_token>`,
the metrics' answer tokens, the logit lens and ``logit_attrs``.

A token is an id (an int >= 0) or a string that the model's tokenizer makes exactly one
token (mind the leading space: ``" Mary"``); a list or a 1-D integer tensor gives one per
row. :func:`parse_tokens` checks the form without a model; :func:`resolve` turns text into
ids with the model's tokenizer, and an InputError shows the pieces of a text that is not
one token.

>>> parse_tokens(" Mary", "correct")              # TokenText(texts=(' Mary',), one=True)
>>> resolve(parse_tokens(" Mary", "correct"), "correct", model, "logit_diff")  # tensor(5970)
>>> resolve(parse_tokens([5, 7], "token"), "token", model, "LogitLens")       # tensor([5, 7])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookscope.errors import InputError

__all__ = ["TokenIds", "TokenText", "as_integers", "parse_tokens", "resolve"]

TokenIds = int | str | Sequence[int] | Sequence[str] | Tensor

_TOKEN_CHOICES = (
    "a token id (int), a token string (one token of the model's tokenizer, e.g. ' Mary'), "
    "or a list / 1-D integer tensor of them with one per row"
)


@dataclass(frozen=True)
class TokenText:
    """Tokens given as text (``" Mary"``), each to be exactly one token of the model's
    tokenizer; :meth:`ids` (through :func:`resolve` or :meth:`Metric.bind`) turns them into
    ids."""

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


def as_integers(value: Any, what: str, choices: str, note: str = "") -> Tensor:
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
    """Tokens as a LongTensor (0-d or 1-D) of ids >= 0, or as :class:`TokenText`."""
    if isinstance(ids, str):
        return TokenText((ids,), True)
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(t, str) for t in ids):
        return TokenText(tuple(ids), False)
    if isinstance(ids, (bool, float, complex, dict, set)) or ids is None:
        raise InputError(f"{what} must be {_TOKEN_CHOICES}; got {ids!r}")
    t = as_integers(ids, what, _TOKEN_CHOICES)
    if t.numel() and int(t.min()) < 0:
        raise InputError(f"{what} token ids must be >= 0; got {int(t.min())}")
    return t.long()


def resolve(ids: Tensor | TokenText, what: str, model: Any, name: str) -> Tensor:
    """Token ids: ``ids`` itself, or the ids of its text with ``model``'s tokenizer."""
    if isinstance(ids, TokenText):
        return ids.ids(getattr(model, "tokenizer", None), what, name)
    return ids
