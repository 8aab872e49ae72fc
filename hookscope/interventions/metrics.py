"""Metrics on model outputs for patching and ablation.

A *structured* metric (:class:`Metric`) knows what it measures, so sweeps can normalise it:
``score = (m(patched) - m(corrupted)) / (m(clean) - m(corrupted))``. Denoising then reads
0 for the unpatched corrupted run and 1 for full recovery; noising reads 1 for the unpatched
clean run and 0 for full destruction ("fraction of clean behaviour kept"). A plain callable
``metric(output) -> scalar tensor`` is used raw, unnormalised (as TransformerLens' patching
functions do).

Outputs are logits ``[batch, pos, vocab]`` (language models) or ``[batch, classes]``
(classifiers; pass ``position=None``). ``position`` is an int (same for every row) or a
LongTensor ``[batch]`` (each row's answer position, e.g. ``ioi_tokens(...).end_pos``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hookscope.errors import InputError

__all__ = ["Metric", "Unembed", "logit_diff", "logit", "prob", "loss"]

TokenIds = int | Sequence[int] | Tensor
Position = int | Sequence[int] | Tensor | None


def _ids(ids: TokenIds, what: str) -> Tensor:
    t = torch.as_tensor(ids)
    if t.is_floating_point() or t.ndim > 1:
        raise InputError(
            f"{what} must be a token id or a list/1-D tensor of ids, got {tuple(t.shape)} {t.dtype}"
        )
    return t.long()


def _at_position(output: Tensor, position: Position) -> Tensor:
    """[batch, vocab] logits at each row's position (``output`` itself when position is None)."""
    if position is None:
        if output.ndim != 2:
            raise InputError(
                f"position=None needs [batch, classes] output, got shape {tuple(output.shape)}"
            )
        return output
    if output.ndim != 3:
        raise InputError(
            f"output must be [batch, pos, vocab] to read a position, got shape {tuple(output.shape)}"
        )
    if isinstance(position, int):
        return output[:, position]
    pos = torch.as_tensor(position, device=output.device).long()
    if pos.shape != (output.shape[0],):
        raise InputError(
            f"position must be an int or one per row ({output.shape[0]}), got shape {tuple(pos.shape)}"
        )
    return output[torch.arange(output.shape[0], device=output.device), pos]


def _single(position: Position) -> int | Tensor | None:
    if position is None or isinstance(position, int):
        return position
    pos = torch.as_tensor(position)
    return pos.long() if pos.ndim == 1 and not pos.is_floating_point() else None


def _gather(logits: Tensor, ids: Tensor) -> Tensor:
    ids = ids.to(logits.device)
    if ids.ndim == 0:
        return logits[:, ids]
    if ids.shape[0] != logits.shape[0]:
        raise InputError(f"{ids.shape[0]} answer ids for a batch of {logits.shape[0]}")
    return logits.gather(1, ids[:, None])[:, 0]


class Unembed:
    """A language model's unembedding (an ``nn.Linear`` from d_model to the vocabulary),
    applied to a few rows and columns only: what sweeps use to avoid full logits."""

    def __init__(self, module: nn.Linear):
        self.module = module

    def full(self, hidden: Tensor) -> Tensor:
        """Every logit: ``hidden [..., d_model] -> [..., vocab]``."""
        return nn.functional.linear(hidden, self.module.weight, self.module.bias)

    def columns(self, hidden: Tensor, ids: Tensor) -> Tensor:
        """The logit of token ``ids`` (one id, or one per row) for ``hidden [batch, d_model]``."""
        ids = ids.to(hidden.device)
        weight, bias = self.module.weight, self.module.bias
        if ids.ndim == 0:
            out = hidden @ weight[ids]
        else:
            if ids.shape[0] != hidden.shape[0]:
                raise InputError(f"{ids.shape[0]} answer ids for a batch of {hidden.shape[0]}")
            out = (hidden * weight[ids]).sum(-1)
        return out + bias[ids] if bias is not None else out


class Metric(ABC):
    """A structured metric: ``per_example(output) -> [batch]``, ``__call__`` the batch mean.

    ``per_example_hidden(hidden, unembed)`` computes the same from the unembedding's input
    (``[batch, pos, d_model]``); subclasses that need only a few logits override it so
    sweeps never build ``[batch, pos, vocab]``.
    """

    name = "metric"
    #: False for metrics where lower means more of the behaviour (``loss``).
    higher_is_better = True
    #: The one position each row is read at (an int, or a tensor with one per row), when
    #: the metric reads a single position; None otherwise. Sweeps skip work elsewhere.
    single_position: int | Tensor | None = None

    @abstractmethod
    def per_example(self, output: Tensor) -> Tensor:
        """The metric of each row of ``output``: [batch]."""

    def per_example_hidden(self, hidden: Tensor, unembed: Unembed) -> Tensor:
        """The metric of each row from the unembedding's input ``hidden``: [batch]."""
        return self.per_example(unembed.full(hidden))

    def __call__(self, output: Tensor) -> Tensor:
        return self.per_example(output).mean()

    def for_lengths(self, lengths: Tensor) -> Metric | None:
        """The same metric for right-padded rows of ``lengths`` real tokens: read at each
        row's own tokens (a negative position counts from the row's end); None where a
        metric would read the padding (then padded inputs are refused)."""
        return None

    def repeated(self, n: int, rows: int) -> Metric | None:
        """The same metric for ``n`` copies of a batch of ``rows`` stacked along rows (per-row
        ids and positions repeated), so a sweep reads all copies in one call; None where a
        metric cannot say or its per-row values do not fit ``rows`` (it is then read one
        copy at a time, which reports the mismatch)."""
        return None

    def __repr__(self) -> str:
        return self.name


def _repeat_rows(ids: Sequence[Tensor], position: Position, n: int, rows: int):
    """Answer ``ids`` and ``position`` for ``n`` stacked copies of a batch of ``rows``: one
    per row repeated, one for all kept. None if any has a shape the per-copy read rejects
    (it then reports the mismatch in the batch's own terms)."""
    out: list[Any] = []
    for t in ids:  # 0-d (one id for every row) or 1-D
        if t.ndim == 1 and t.shape[0] != rows:
            return None
        out.append(t.repeat(n) if t.ndim == 1 else t)
    if position is None or (isinstance(position, int) and not isinstance(position, bool)):
        return out, position
    pos = torch.as_tensor(position)
    if pos.ndim != 1 or pos.shape[0] != rows or pos.is_floating_point():
        return None
    return out, pos.repeat(n)


def _row_positions(position: Position, lengths: Tensor) -> Tensor:
    """Each row's read position in right-padded rows of ``lengths`` real tokens."""
    if position is None:
        raise InputError("position=None reads [batch, classes] outputs; token inputs need one")
    pos = torch.as_tensor(position, device=lengths.device).long()
    if pos.ndim == 0:
        pos = pos.expand(lengths.shape)
    if pos.shape != lengths.shape:
        raise InputError(
            f"position must be an int or one per row ({lengths.shape[0]}), got shape "
            f"{tuple(pos.shape)}"
        )
    pos = torch.where(pos < 0, pos + lengths, pos)
    bad = ((pos < 0) | (pos >= lengths)).nonzero().flatten().tolist()
    if bad:
        raise InputError(
            f"position {position!r} falls outside rows {bad} of {lengths[bad].tolist()} tokens "
            "(their padding or before their start)"
        )
    return pos


class _LogitDiff(Metric):
    def __init__(self, correct: TokenIds, incorrect: TokenIds, position: Position):
        self.correct, self.incorrect = _ids(correct, "correct"), _ids(incorrect, "incorrect")
        self.position = position
        self.single_position = _single(position)
        self.name = "logit_diff"

    def per_example(self, output: Tensor) -> Tensor:
        at = _at_position(output, self.position)
        return _gather(at, self.correct) - _gather(at, self.incorrect)

    def per_example_hidden(self, hidden: Tensor, unembed: Unembed) -> Tensor:
        at = _at_position(hidden, self.position)
        return unembed.columns(at, self.correct) - unembed.columns(at, self.incorrect)

    def for_lengths(self, lengths: Tensor) -> Metric:
        return _LogitDiff(self.correct, self.incorrect, _row_positions(self.position, lengths))

    def repeated(self, n: int, rows: int) -> Metric | None:
        stacked = _repeat_rows([self.correct, self.incorrect], self.position, n, rows)
        return None if stacked is None else _LogitDiff(*stacked[0], stacked[1])


class _Logit(Metric):
    def __init__(self, token: TokenIds, position: Position, probability: bool):
        self.token, self.position, self.probability = _ids(token, "token"), position, probability
        self.single_position = _single(position)
        self.name = "prob" if probability else "logit"

    def per_example(self, output: Tensor) -> Tensor:
        at = _at_position(output, self.position)
        if self.probability:
            at = at.float().softmax(-1)
        return _gather(at, self.token)

    def per_example_hidden(self, hidden: Tensor, unembed: Unembed) -> Tensor:
        at = _at_position(hidden, self.position)
        if self.probability:
            return _gather(unembed.full(at).float().softmax(-1), self.token)
        return unembed.columns(at, self.token)

    def for_lengths(self, lengths: Tensor) -> Metric:
        return _Logit(self.token, _row_positions(self.position, lengths), self.probability)

    def repeated(self, n: int, rows: int) -> Metric | None:
        if self.probability:  # a softmax over the vocabulary: one copy at a time bounds memory
            return None
        stacked = _repeat_rows([self.token], self.position, n, rows)
        return None if stacked is None else _Logit(*stacked[0], stacked[1], False)


class _Loss(Metric):
    def __init__(self, tokens: Tensor, positions: Sequence[int] | None):
        self.tokens = torch.as_tensor(tokens).long()
        if self.tokens.ndim != 2:
            raise InputError(
                f"loss needs the token ids [batch, pos], got shape {tuple(self.tokens.shape)}"
            )
        self.positions = positions
        self.name = "loss"
        self.higher_is_better = False

    def per_example(self, output: Tensor) -> Tensor:
        if output.ndim != 3 or output.shape[:2] != self.tokens.shape:
            raise InputError(
                f"loss: output {tuple(output.shape)} does not match tokens {tuple(self.tokens.shape)}"
            )
        logp = output[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, self.tokens[:, 1:, None].to(output.device))[..., 0]  # [batch, pos-1]
        if self.positions is not None:
            nll = nll[:, list(self.positions)]
        return nll.mean(-1)


def logit_diff(correct: TokenIds, incorrect: TokenIds, position: Position = -1) -> Metric:
    """logit[correct] - logit[incorrect] at ``position`` (per row), averaged over the batch."""
    return _LogitDiff(correct, incorrect, position)


def logit(token: TokenIds, position: Position = -1) -> Metric:
    """The logit of ``token`` at ``position``, averaged over the batch."""
    return _Logit(token, position, probability=False)


def prob(token: TokenIds, position: Position = -1) -> Metric:
    """The softmax probability of ``token`` at ``position``, averaged over the batch."""
    return _Logit(token, position, probability=True)


def loss(tokens: Tensor, positions: Sequence[int] | None = None) -> Metric:
    """Next-token cross-entropy of ``tokens`` [batch, pos] (at the given predicting positions).

    Lower is better; normalisation still maps corrupted to 0 and clean to 1.
    """
    return _Loss(tokens, positions)
