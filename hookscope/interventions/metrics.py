"""Metrics on model outputs for patching and ablation.

A *structured* metric (:class:`Metric`) knows what it measures, so sweeps can normalise it:
``score = (m(patched) - m(corrupted)) / (m(clean) - m(corrupted))``. Denoising then reads
0 for the unpatched corrupted run and 1 for full recovery; noising reads 1 for the unpatched
clean run and 0 for full destruction ("fraction of clean behaviour kept"). A plain callable
``metric(output) -> scalar tensor`` is used raw, unnormalised (as TransformerLens' patching
functions do).

Outputs are logits ``[batch, pos, vocab]`` (language models) or ``[batch, classes]``
(classifiers; pass ``position=None``). ``position`` is an int (same for every row) or a
list / LongTensor ``[batch]`` (each row's answer position, e.g. ``ioi_tokens(...).end_pos``);
positions are never rounded (a float is an error). Answer tokens are ids or one-token
strings (``logit_diff(" Mary", " John")``), which :meth:`Metric.bind` resolves with the
model's tokenizer; sweeps bind and :meth:`Metric.check` their metric before any forward,
so an id past the vocabulary or a position past the input is reported before anything runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hookscope import dispatch
from hookscope.errors import InputError
from hookscope.interventions._metric_args import Position, check_read, parse_position
from hookscope.tokens import TokenIds, TokenText, parse_tokens, resolve

if TYPE_CHECKING:
    from hookscope.model import HookedModel

__all__ = ["Metric", "Unembed", "TokenText", "logit_diff", "logit", "prob", "loss"]


def _at_position(output: Tensor, position: int | Tensor | None) -> Tensor:
    """[batch, vocab] logits at each row's position (``output`` itself when position is None)."""
    if position is None:
        return output
    if isinstance(position, int):
        return output[:, position]
    pos = position.to(output.device)
    return output[torch.arange(output.shape[0], device=output.device), pos]


def _single(position: int | Tensor | None) -> int | Tensor | None:
    if position is None or isinstance(position, int):
        return position
    return position if position.ndim == 1 else None


def _gather(logits: Tensor, ids: Tensor) -> Tensor:
    ids = ids.to(logits.device)
    if ids.ndim == 0:
        return logits[:, ids]
    return logits.gather(1, ids[:, None])[:, 0]


class Unembed:
    """A language model's unembedding (an ``nn.Linear`` from d_model to the vocabulary),
    applied to a few rows and columns only: what sweeps use to avoid full logits."""

    def __init__(self, module: nn.Linear):
        self.module = module

    @property
    def vocab(self) -> int:
        """Number of logits (the vocabulary size)."""
        return int(self.module.out_features)

    def parameters(self) -> tuple[Tensor, Tensor | None]:
        """``(weight [vocab, d_model], bias [vocab] or None)``, read through
        :func:`hookscope.dispatch.weight` (real values where accelerate offloaded them)."""
        weight = dispatch.weight(self.module, "weight")
        bias = dispatch.weight(self.module, "bias") if self.module.bias is not None else None
        return weight, bias

    def full(self, hidden: Tensor) -> Tensor:
        """Every logit: ``hidden [..., d_model] -> [..., vocab]`` (on the unembedding's
        device, where ``hidden`` is moved if it is elsewhere)."""
        weight, bias = self.parameters()
        return nn.functional.linear(hidden.to(weight.device), weight, bias)

    def columns(self, hidden: Tensor, ids: Tensor) -> Tensor:
        """The logit of token ``ids`` (one id, or one per row) for ``hidden [batch, d_model]``."""
        weight, bias = self.parameters()
        hidden = hidden.to(weight.device)
        ids = ids.to(hidden.device)
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
    sweeps never build ``[batch, pos, vocab]``. Sweeps call :meth:`bind` and :meth:`check`
    before their first forward, so a metric that cannot read the model's output is reported
    before anything runs.
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

    def bind(self, model: HookedModel) -> Metric:
        """This metric for ``model``: answer tokens given as text resolved to ids with the
        model's tokenizer (each must be exactly one token). Sweeps bind their metric
        themselves; bind it to call it on logits of your own.

        >>> m = iv.logit_diff(" Mary", " John").bind(model)
        >>> m(model(tokens))
        """
        return self

    def check(self, shape: Sequence[int]) -> None:
        """Raise :class:`InputError` unless this metric can read an output of ``shape``
        (its positions and token ids in range). Sweeps call it with the shape the model's
        output will have, before their first forward."""
        return None

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

    def rows(self, index: Tensor, position: Tensor) -> Metric | None:
        """The same metric on rows ``index`` of its batch, read at ``position`` (one
        absolute position per kept row); None where a metric cannot say (sweeps then run
        every row in each forward)."""
        return None

    def __repr__(self) -> str:
        return self.name


def _take_rows(ids: Sequence[Tensor], index: Tensor) -> list[Tensor]:
    """Answer ``ids`` of rows ``index`` (one per row taken, one for all kept)."""
    return [t[index.to(t.device)] if t.ndim == 1 else t for t in ids]


def _repeat_rows(ids: Sequence[Tensor], position: int | Tensor | None, n: int, rows: int):
    """Answer ``ids`` and ``position`` for ``n`` stacked copies of a batch of ``rows``: one
    per row repeated, one for all kept. None if any has a shape the per-copy read rejects
    (it then reports the mismatch in the batch's own terms)."""
    out: list[Any] = []
    for t in ids:  # 0-d (one id for every row) or 1-D
        if not isinstance(t, Tensor) or (t.ndim == 1 and t.shape[0] != rows):
            return None
        out.append(t.repeat(n) if t.ndim == 1 else t)
    if position is None or isinstance(position, int):
        return out, position
    if position.ndim != 1 or position.shape[0] != rows:
        return None
    return out, position.repeat(n)


def _row_positions(position: int | Tensor | None, lengths: Tensor) -> Tensor:
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
        shown = position if isinstance(position, int) else position.tolist()
        raise InputError(
            f"position {shown!r} falls outside rows {bad} of {lengths[bad].tolist()} tokens "
            "(their padding or before their start)"
        )
    return pos


class _LogitDiff(Metric):
    def __init__(self, correct: TokenIds, incorrect: TokenIds, position: Position):
        self.correct, self.incorrect = (
            parse_tokens(correct, "correct"),
            parse_tokens(incorrect, "incorrect"),
        )
        self.position = parse_position(position)
        self.single_position = _single(self.position)
        self.name = "logit_diff"

    def bind(self, model: HookedModel) -> Metric:
        if not isinstance(self.correct, TokenText) and not isinstance(self.incorrect, TokenText):
            return self
        return _LogitDiff(
            resolve(self.correct, "correct", model, self.name),
            resolve(self.incorrect, "incorrect", model, self.name),
            self.position,
        )

    def check(self, shape: Sequence[int]) -> None:
        ids = {"correct token": self.correct, "incorrect token": self.incorrect}
        check_read(self.name, shape, self.position, ids)

    def per_example(self, output: Tensor) -> Tensor:
        self.check(output.shape)
        at = _at_position(output, self.position)
        return _gather(at, self.correct) - _gather(at, self.incorrect)  # type: ignore[arg-type]

    def per_example_hidden(self, hidden: Tensor, unembed: Unembed) -> Tensor:
        self.check((*hidden.shape[:-1], unembed.vocab))
        at = _at_position(hidden, self.position)
        return unembed.columns(at, self.correct) - unembed.columns(at, self.incorrect)  # type: ignore[arg-type]

    def for_lengths(self, lengths: Tensor) -> Metric:
        return _LogitDiff(self.correct, self.incorrect, _row_positions(self.position, lengths))

    def repeated(self, n: int, rows: int) -> Metric | None:
        stacked = _repeat_rows([self.correct, self.incorrect], self.position, n, rows)  # type: ignore[list-item]
        return None if stacked is None else _LogitDiff(*stacked[0], stacked[1])

    def rows(self, index: Tensor, position: Tensor) -> Metric:
        return _LogitDiff(*_take_rows([self.correct, self.incorrect], index), position)  # type: ignore[list-item]


class _Logit(Metric):
    def __init__(self, token: TokenIds, position: Position, probability: bool):
        self.token, self.probability = parse_tokens(token, "token"), probability
        self.position = parse_position(position)
        self.single_position = _single(self.position)
        self.name = "prob" if probability else "logit"

    def bind(self, model: HookedModel) -> Metric:
        if not isinstance(self.token, TokenText):
            return self
        return _Logit(
            resolve(self.token, "token", model, self.name), self.position, self.probability
        )

    def check(self, shape: Sequence[int]) -> None:
        check_read(self.name, shape, self.position, {"token": self.token})

    def per_example(self, output: Tensor) -> Tensor:
        self.check(output.shape)
        at = _at_position(output, self.position)
        if self.probability:
            at = at.float().softmax(-1)
        return _gather(at, self.token)  # type: ignore[arg-type]

    def per_example_hidden(self, hidden: Tensor, unembed: Unembed) -> Tensor:
        self.check((*hidden.shape[:-1], unembed.vocab))
        at = _at_position(hidden, self.position)
        if self.probability:
            return _gather(unembed.full(at).float().softmax(-1), self.token)  # type: ignore[arg-type]
        return unembed.columns(at, self.token)  # type: ignore[arg-type]

    def for_lengths(self, lengths: Tensor) -> Metric:
        return _Logit(self.token, _row_positions(self.position, lengths), self.probability)

    def repeated(self, n: int, rows: int) -> Metric | None:
        if self.probability:  # a softmax over the vocabulary: one copy at a time bounds memory
            return None
        stacked = _repeat_rows([self.token], self.position, n, rows)  # type: ignore[list-item]
        return None if stacked is None else _Logit(*stacked[0], stacked[1], False)

    def rows(self, index: Tensor, position: Tensor) -> Metric:
        return _Logit(*_take_rows([self.token], index), position, self.probability)  # type: ignore[list-item]


class _Loss(Metric):
    def __init__(self, tokens: Tensor, positions: Sequence[int] | None):
        what = "loss needs the token ids [batch, pos] (an integer tensor or a list of lists)"
        if isinstance(tokens, str) or (
            isinstance(tokens, (list, tuple)) and any(isinstance(t, str) for t in tokens)
        ):
            raise InputError(f"{what}, got text; tokenize it first: model.to_tokens(text)")
        try:
            t = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{what}, got {type(tokens).__name__}") from None
        if t.ndim != 2 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"{what}, got shape {tuple(t.shape)} {t.dtype}")
        if t.shape[1] < 2:
            raise InputError(
                f"loss needs at least 2 positions (it predicts token t + 1 from t), got shape "
                f"{tuple(t.shape)}"
            )
        self.tokens = t.long()
        self.positions: list[int] | None = None
        if positions is not None:
            empty = isinstance(positions, (list, tuple, Tensor)) and len(positions) == 0
            pos = None if empty else parse_position(positions, "loss positions")
            if not isinstance(pos, Tensor) or pos.ndim != 1:
                raise InputError(
                    "loss positions must be a non-empty list of ints (the predicting positions "
                    f"0..pos-2), got {positions!r}"
                )
            self.positions = pos.tolist()
        self.name = "loss"
        self.higher_is_better = False

    def check(self, shape: Sequence[int]) -> None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or shape[:2] != tuple(self.tokens.shape):
            raise InputError(
                f"loss: output {shape} does not match tokens {tuple(self.tokens.shape)}; "
                "pass the token ids of the inputs the model runs on ([batch, pos])"
            )
        n = shape[1] - 1  # predicting positions
        bad = [p for p in self.positions or () if not -n <= p < n]
        if bad:
            raise InputError(
                f"loss positions {bad} out of range: {shape[1]} tokens give {n} predicting "
                f"positions (valid: 0..{n - 1}, or {-n}..-1 from the end)"
            )
        top = int(self.tokens.max())
        if top >= shape[2] or int(self.tokens.min()) < 0:
            raise InputError(
                f"loss: token ids must lie in 0..{shape[2] - 1} (vocabulary size {shape[2]}); "
                f"found {int(self.tokens.min())}..{top}"
            )

    def per_example(self, output: Tensor) -> Tensor:
        self.check(output.shape)
        logp = output[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, self.tokens[:, 1:, None].to(output.device))[..., 0]  # [batch, pos-1]
        if self.positions is not None:
            nll = nll[:, self.positions]
        return nll.mean(-1)


def logit_diff(correct: TokenIds, incorrect: TokenIds, position: Position = -1) -> Metric:
    """logit[correct] - logit[incorrect] at ``position`` (per row), averaged over the batch.

    ``correct`` / ``incorrect``: a token id, a token string (``" Mary"``: exactly one token
    of the model's tokenizer, resolved when a sweep binds the metric to its model, see
    :meth:`Metric.bind`), or one of them per row (a list or a 1-D integer tensor).
    """
    return _LogitDiff(correct, incorrect, position)


def logit(token: TokenIds, position: Position = -1) -> Metric:
    """The logit of ``token`` (an id, a one-token string, or one per row) at ``position``,
    averaged over the batch."""
    return _Logit(token, position, probability=False)


def prob(token: TokenIds, position: Position = -1) -> Metric:
    """The softmax probability of ``token`` (an id, a one-token string, or one per row) at
    ``position``, averaged over the batch."""
    return _Logit(token, position, probability=True)


def loss(tokens: Tensor, positions: Sequence[int] | None = None) -> Metric:
    """Next-token cross-entropy of ``tokens`` [batch, pos] (at the given predicting positions).

    Lower is better; normalisation still maps corrupted to 0 and clean to 1.
    """
    return _Loss(tokens, positions)
