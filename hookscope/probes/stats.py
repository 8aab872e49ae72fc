"""Statistics of a fitted probe's held-out predictions: bootstrap confidence intervals, paired
differences, permutation p-values, Holm's correction and the spread over seeds. Nothing here
refits a probe: every function takes the true labels ``y`` and the predictions ``pred`` on
held-out rows.

Metrics (larger is better for all four; each defined here once):

* classification, ``y`` integer class codes ``[n]`` in ``0..K-1`` and ``pred`` class
  probabilities (or any scores) ``[n, K]``, ``K >= 2``:

  - ``accuracy``: fraction of rows with ``argmax(pred) == y`` (a tie goes to the first
    largest column, as ``torch.argmax`` and ``numpy.argmax``);
  - ``f1``: for ``K == 2`` the F1 of class 1 (scikit-learn ``f1_score(average="binary")``);
    for ``K > 2`` the macro F1, the unweighted mean over the classes that occur in ``y`` or in
    the predictions of that sample (``average="macro"`` with scikit-learn's default labels);
    ``zero_division=0``;
  - ``auroc``: for ``K == 2`` the ROC AUC of ``pred[:, 1]`` (tied scores count one half, i.e.
    midranks); for ``K > 2`` the unweighted mean of the one-vs-rest AUROCs of every column
    (``roc_auc_score(multi_class="ovr", average="macro")``). NaN when a sample lacks a class.

* regression, ``y`` and ``pred`` float ``[n]``: ``r2 = 1 - SS_res / SS_tot``. NaN when ``y``
  is constant (scikit-learn returns 0 or 1 there; the ratio is undefined).

A resample is a row of an index matrix (``resample_indices``). All resamples (or
permutations) are evaluated together, in chunks of about 4M elements, with no Python loop
over them: accuracy and R^2 are means over the gathered rows; F1 reads one confusion matrix
per resample, counted with a single ``bincount``; AUROC counts the positives and negatives
in every tie group of the scores per resample (one ``bincount``) and takes the Mann-Whitney
``U`` from their cumulative sums, or, for permutations (scores fixed, labels moved), from the
sum of the positives' midranks.

``bootstrap(seed=s)`` draws ``resample_indices(n, n_resamples, torch.Generator().manual_seed(s))``,
so an interval is reproducible from its seed. Intervals:

* ``percentile``: the ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles of the replicates (linear
  interpolation, as ``numpy.percentile``).
* ``bca`` (Efron 1987; Efron & Tibshirani 1993, ch. 14): bias correction
  ``z0 = Phi^-1((#{t* < t} + #{t* <= t}) / 2B)`` (the mid-rank convention scipy uses) and
  acceleration ``a = sum(d_i^3) / (6 (sum(d_i^2))^{3/2})`` with ``d_i = mean(t_(.)) - t_(i)``
  over the leave-one-out (jackknife) values ``t_(i)``; the interval is the replicates'
  quantiles at ``Phi(z0 + (z0 + z_q) / (1 - a (z0 + z_q)))`` for ``z_q = Phi^-1((1 -+ c) / 2)``.
  The jackknife values are exact closed forms here (every metric is a function of row sums,
  AUROC of per-row rank contributions), ``O(n K)`` rather than ``n`` evaluations.

Replicates on which the metric is undefined (an AUROC resample with one class) are dropped with
a warning; an interval whose estimate is undefined raises :class:`~hookscope.errors.ProbeError`.
Everything is computed in float64 on the device of ``pred``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookscope.errors import ProbeError, format_choices, suggestion

__all__ = [
    "METRICS",
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "TASKS",
    "INTERVAL_METHODS",
    "Interval",
    "check_metric",
    "resample_indices",
    "metric_values",
    "weighted_values",
    "bootstrap",
    "paired_difference",
    "permutation_pvalue",
    "holm",
    "mean_sd",
]

CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "f1", "auroc")
REGRESSION_METRICS: tuple[str, ...] = ("r2",)
METRICS: tuple[str, ...] = CLASSIFICATION_METRICS + REGRESSION_METRICS
TASKS: tuple[str, ...] = ("classification", "regression")
INTERVAL_METHODS: tuple[str, ...] = ("percentile", "bca")

_CHUNK = 1 << 22  # elements of one [resamples, n] block
_F64 = torch.float64


# ------------------------------------------------------------------------------ checks


def check_metric(metric: str, task: str) -> str:
    """``metric`` if it is defined for ``task`` (``"classification"`` or ``"regression"``),
    else a :class:`ProbeError` naming the metrics that are."""
    if task not in TASKS:
        raise ProbeError(
            f"unknown task {task!r}; choose from {format_choices(TASKS)}{suggestion(str(task), TASKS)}"
        )
    valid = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
    if not isinstance(metric, str):
        raise ProbeError(
            f"metric must be a name, got {type(metric).__name__}; a {task} probe takes "
            f"{format_choices(valid)}"
        )
    if metric in valid:
        return metric
    if metric in METRICS:
        other = "regression" if task == "classification" else "classification"
        raise ProbeError(
            f"metric {metric!r} is for {other} probes; a {task} probe takes {format_choices(valid)}"
        )
    raise ProbeError(
        f"unknown metric {metric!r}; a {task} probe takes {format_choices(valid)}"
        f"{suggestion(metric, valid)}"
    )


def _task_of(metric: Any) -> str:
    if isinstance(metric, str) and metric in REGRESSION_METRICS:
        return "regression"
    if isinstance(metric, str) and metric in CLASSIFICATION_METRICS:
        return "classification"
    shown = repr(metric) if isinstance(metric, str) else type(metric).__name__
    hint = suggestion(metric, METRICS) if isinstance(metric, str) else ""
    raise ProbeError(
        f"unknown metric {shown}; choose from {format_choices(METRICS)} "
        f"(classification: {format_choices(CLASSIFICATION_METRICS)}; regression: "
        f"{format_choices(REGRESSION_METRICS)}){hint}"
    )


def _tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as err:  # ragged lists and the like
        raise ProbeError(f"{name} could not be read as an array: {err}") from err
    if arr.dtype == object or arr.dtype.kind in "USVM":
        raise ProbeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    return torch.from_numpy(np.array(arr, copy=True))


def _finite(t: Tensor, name: str) -> Tensor:
    t = t.to(_F64)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ProbeError(
            f"{name} contains {int(bad.sum())} non-finite values (NaN or Inf) out of {t.numel()}"
        )
    return t


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ProbeError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def _generator(seed: Any) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ProbeError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def _check_confidence(confidence: Any) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float, np.floating)):
        raise ProbeError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if not 0 < float(confidence) < 1:
        raise ProbeError(
            f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence!r}"
        )
    return float(confidence)


def _check_method(method: Any) -> str:
    if method not in INTERVAL_METHODS:
        hint = suggestion(method, INTERVAL_METHODS) if isinstance(method, str) else ""
        raise ProbeError(
            f"unknown interval method {method!r}; choose from {format_choices(INTERVAL_METHODS)}"
            f"{hint}"
        )
    return method


@dataclass(frozen=True)
class _Data:
    """Validated held-out data of one metric: ``target`` long codes (classification) or
    centred float targets (regression, with ``pred`` shifted by the same mean)."""

    metric: str
    target: Tensor  # [n]
    pred: Tensor  # [n, K] float64 or [n] float64
    k: int  # classes (0 for regression)
    yhat: Tensor | None  # argmax class [n]
    code: Tensor | None  # accuracy, f1: cell of the confusion matrix of each row, y * K + yhat
    ranks: tuple[_Ranks, ...]  # auroc: one per scored column

    @property
    def n(self) -> int:
        return self.target.shape[0]


@dataclass(frozen=True)
class _Ranks:
    """One scored column of an AUROC: the tie group of every row (0 for the smallest distinct
    score, ...), the number of groups, ``key = 2 * group + (y == column)`` and the midrank of
    every row (1-based, ties sharing the mean of their ranks)."""

    column: int
    group: Tensor
    n_groups: int
    key: Tensor
    midrank: Tensor


def _ranks(column: int, scores: Tensor, target: Tensor) -> _Ranks:
    distinct, group, size = torch.unique(
        scores, sorted=True, return_inverse=True, return_counts=True
    )
    size = size.to(_F64)
    midrank = (torch.cumsum(size, 0) - size + (size + 1) / 2)[group]
    return _Ranks(column, group, distinct.numel(), group * 2 + (target == column), midrank)


def _prepare(metric: Any, y: Any, pred: Any, name: str = "pred", y_name: str = "y") -> _Data:
    task = _task_of(metric)
    p = _tensor(pred, name)
    yt = _tensor(y, y_name)
    if yt.ndim != 1:
        raise ProbeError(f"{y_name} must be one value per row, shape [n]; got {tuple(yt.shape)}")
    n = yt.shape[0]
    if n == 0:
        raise ProbeError(f"{y_name} is empty; the metric needs at least one held-out row")
    if p.ndim == 0 or p.shape[0] != n:
        raise ProbeError(
            f"{y_name} has {n} rows but {name} has shape {tuple(p.shape)}; pass the labels and "
            "predictions of the same held-out rows"
        )
    if task == "classification":
        if p.ndim != 2 or p.shape[1] < 2:
            raise ProbeError(
                f"metric {metric!r} needs class probabilities {name} of shape [n, K] with K >= 2; "
                f"got {tuple(p.shape)}. For a regression probe use {format_choices(REGRESSION_METRICS)}"
            )
        if yt.is_floating_point() or yt.is_complex():
            raise ProbeError(
                f"{y_name} must hold integer class codes 0..K-1 for {metric!r}, got dtype "
                f"{yt.dtype}; encode the labels (e.g. numpy.unique(..., return_inverse=True))"
            )
        p = _finite(p, name)
        k = p.shape[1]
        yt = yt.to(device=p.device, dtype=torch.int64)
        lo, hi = int(yt.min()), int(yt.max())
        if lo < 0 or hi >= k:
            raise ProbeError(
                f"{y_name} holds class codes {lo}..{hi} but {name} has {k} columns (codes 0..{k - 1})"
            )
        ranks: tuple[_Ranks, ...] = ()
        if metric == "auroc":  # two classes: the score of class 1; more: one-vs-rest per class
            ranks = tuple(_ranks(c, p[:, c], yt) for c in ([1] if k == 2 else range(k)))
        yhat = p.argmax(1)
        return _Data(metric, yt, p, k, yhat, yt * k + yhat, ranks)
    if p.ndim != 1:
        raise ProbeError(
            f"metric {metric!r} needs one prediction per row, {name} of shape [n]; got "
            f"{tuple(p.shape)}. For class probabilities use {format_choices(CLASSIFICATION_METRICS)}"
        )
    p = _finite(p, name)
    yt = _finite(yt, y_name).to(p.device)
    shift = yt.mean()  # r2 is shift-invariant; centring keeps the sums of squares accurate
    return _Data(metric, yt - shift, p - shift, 0, None, None, ())


# ------------------------------------------------------------------------------ metrics


def _f1(tp: Tensor, n_true: Tensor, n_pred: Tensor, binary: bool) -> Tensor:
    """F1 from per-class counts ``[..., K]``: ``2 tp / (n_true + n_pred)``, 0 where a class is
    neither true nor predicted; class 1 for two classes, else the mean over present classes."""
    denom = n_true + n_pred
    present = denom > 0
    f1 = torch.where(present, 2 * tp / denom.clamp_min(1e-300), torch.zeros_like(tp))
    if binary:
        return f1[..., 1]
    return (f1 * present).sum(-1) / present.sum(-1)


def _auc(u: Tensor, n_pos: Tensor, n_neg: Tensor) -> Tensor:
    """Mann-Whitney ``U / (n_pos n_neg)``; NaN where a class is missing."""
    denom = n_pos * n_neg
    return torch.where(denom > 0, u / denom.clamp_min(1e-300), torch.full_like(u, math.nan))


def _r2(ss_res: Tensor, ss_tot: Tensor) -> Tensor:
    return torch.where(
        ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), torch.full_like(ss_res, math.nan)
    )


def _tally(keys: Tensor, size: int) -> Tensor:
    """Counts ``[r, size]`` of the values ``0..size-1`` in every row of ``keys [r, m]``."""
    r = keys.shape[0]
    offset = torch.arange(r, device=keys.device)[:, None] * size
    flat = torch.bincount((keys + offset).flatten(), minlength=r * size)
    return flat.reshape(r, size).to(_F64)


def _evaluate(
    d: _Data, rows: Tensor | None = None, labels: Tensor | None = None
) -> Float[Tensor, " r"]:
    """The metric of ``r`` samples of (label, prediction) pairs. A bootstrap passes
    ``rows [r, m]``: sample ``i`` is the rows ``rows[i]`` with their own labels. A permutation
    passes ``labels [r, n]``: sample ``i`` pairs ``labels[i, j]`` with the prediction of row
    ``j``. Neither: the data as given."""
    if rows is None and labels is None:
        labels = d.target[None]
    if d.metric == "r2":
        if rows is not None:
            labels, pred = d.target[rows], d.pred[rows]
        else:
            pred = d.pred
        assert labels is not None
        ss_tot = (labels - labels.mean(1, keepdim=True)).square().sum(1)
        return _r2((labels - pred).square().sum(1), ss_tot)
    assert d.code is not None and d.yhat is not None
    if d.metric == "accuracy":
        hit = (d.target == d.yhat)[rows] if rows is not None else labels == d.yhat
        return hit.to(_F64).mean(1)
    if d.metric == "f1":  # one confusion matrix [true, predicted] per sample
        keys = d.code[rows] if rows is not None else labels * d.k + d.yhat
        conf = _tally(keys, d.k * d.k).reshape(-1, d.k, d.k)
        tp = conf.diagonal(dim1=1, dim2=2)
        return _f1(tp, conf.sum(2), conf.sum(1), d.k == 2)
    # auroc: negatives and positives in every tie group of the scores, then the Mann-Whitney
    # U = sum over groups of positives * (negatives in lower groups + half those in the group)
    aucs = []
    for rk in d.ranks:
        if rows is None:  # labels permuted, scores fixed: U from the midranks of the positives
            positive = (labels == rk.column).to(_F64)
            n_pos = positive.sum(1)
            u = positive @ rk.midrank - n_pos * (n_pos + 1) / 2
            aucs.append(_auc(u, n_pos, labels.shape[1] - n_pos))
            continue
        keys = rk.key[rows]
        counts = _tally(keys, 2 * rk.n_groups).reshape(keys.shape[0], rk.n_groups, 2)
        neg, pos = counts[..., 0], counts[..., 1]
        below = torch.cumsum(neg, 1) - neg
        u = (pos * (below + 0.5 * neg)).sum(1)
        aucs.append(_auc(u, pos.sum(1), neg.sum(1)))
    return torch.stack(aucs, 1).mean(1)


def _jackknife(d: _Data) -> Float[Tensor, " n"]:
    """The metric with each row left out, ``[n]``, in closed form from the full-data sums."""
    n = d.n
    if n < 2:
        raise ProbeError("BCa needs at least 2 rows for its jackknife; use method='percentile'")
    if d.metric == "r2":
        y, res2 = d.target, (d.target - d.pred).square()
        sy, syy = y.sum() - y, y.square().sum() - y.square()
        return _r2(res2.sum() - res2, syy - sy.square() / (n - 1))
    assert d.yhat is not None
    if d.metric == "accuracy":
        correct = (d.target == d.yhat).to(_F64)
        return (correct.sum() - correct) / (n - 1)
    if d.metric == "f1":
        true = torch.nn.functional.one_hot(d.target, d.k).to(_F64)  # [n, K]
        predicted = torch.nn.functional.one_hot(d.yhat, d.k).to(_F64)
        both = true * predicted
        return _f1(both.sum(0) - both, true.sum(0) - true, predicted.sum(0) - predicted, d.k == 2)
    aucs = []
    for rk in d.ranks:
        group, is_pos = rk.group, d.target == rk.column
        counts = _tally(rk.key[None], 2 * rk.n_groups).reshape(rk.n_groups, 2)
        neg, pos = counts[:, 0], counts[:, 1]
        n_pos, n_neg = pos.sum(), neg.sum()
        below = torch.cumsum(neg, 0) - neg  # negatives in lower groups
        above = n_pos - torch.cumsum(pos, 0)  # positives in higher groups
        u = (pos * (below + 0.5 * neg)).sum()
        # a positive row contributes its negatives below (+ half the tied ones) to U, a
        # negative row the positives above it (+ half the tied): leaving it out removes that
        share = torch.where(
            is_pos, below[group] + 0.5 * neg[group], above[group] + 0.5 * pos[group]
        )
        aucs.append(_auc(u - share, n_pos - is_pos.to(_F64), n_neg - (~is_pos).to(_F64)))
    return torch.stack(aucs, 1).mean(1)


def _step(d: _Data, m: int) -> int:
    """Samples per chunk: about ``_CHUNK`` elements of ``[samples, m]`` and of the tallies."""
    return max(1, _CHUNK // max(m, 2 * d.n if d.ranks else d.k * d.k))


def _on_resamples(d: _Data, idx: Tensor) -> Float[Tensor, " r"]:
    """The metric on every resample ``idx [r, m]`` (row indices), in chunks of resamples."""
    step = _step(d, idx.shape[1])
    idx = idx.to(d.target.device)
    out = [_evaluate(d, rows=idx[i : i + step]) for i in range(0, idx.shape[0], step)]
    return torch.cat(out)


def _full(d: _Data) -> float:
    return float(_evaluate(d)[0])


# ------------------------------------------------------------------------------ public


def resample_indices(n: int, n_resamples: int, generator: torch.Generator) -> Int[Tensor, "r n"]:
    """Bootstrap resamples: ``[n_resamples, n]`` row indices drawn uniformly with replacement
    (``torch.randint`` with ``generator``; on the generator's device)."""
    n = _positive_int(n, "n")
    n_resamples = _positive_int(n_resamples, "n_resamples")
    if not isinstance(generator, torch.Generator):
        raise ProbeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got "
            f"{type(generator).__name__}"
        )
    return torch.randint(0, n, (n_resamples, n), generator=generator, device=generator.device)


def metric_values(
    metric: str,
    y: Int[Tensor, " n"] | Float[Tensor, " n"],
    pred: Float[Tensor, "n k"] | Float[Tensor, " n"],
    idx: Int[Tensor, "r m"] | None = None,
) -> Float[Tensor, " r"]:
    """``metric`` (see the module for the definitions) on every resample ``idx`` (rows of
    indices into ``y``/``pred``); ``idx=None`` gives one value, on all rows.

    >>> metric_values("accuracy", torch.tensor([0, 1, 1]), torch.tensor([[.9, .1], [.2, .8], [.6, .4]]))
    tensor([0.6667], dtype=torch.float64)
    """
    d = _prepare(metric, y, pred)
    if idx is None:
        return _evaluate(d)
    it = _tensor(idx, "idx")
    if it.is_floating_point() or it.is_complex() or it.dtype == torch.bool:
        raise ProbeError(f"idx must hold integer row indices, got dtype {it.dtype}")
    if it.ndim == 1:
        it = it[None]
    if it.ndim != 2 or it.shape[1] == 0:
        raise ProbeError(
            f"idx must be [resamples, rows] of row indices, got shape {tuple(it.shape)}"
        )
    lo, hi = int(it.min()), int(it.max())
    if lo < 0 or hi >= d.n:
        raise ProbeError(f"idx holds row indices {lo}..{hi}; valid rows are 0..{d.n - 1}")
    return _on_resamples(d, it.to(torch.int64))


def weighted_values(
    metric: str,
    y: Int[Tensor, " n"] | Float[Tensor, " n"],
    pred: Float[Tensor, "n k"] | Float[Tensor, " n"],
    weights: Float[Tensor, "r n"],
) -> Float[Tensor, " r"]:
    """``metric`` under every row of non-negative row ``weights`` (a weight ``w`` counts a row
    ``w`` times, as scikit-learn's ``sample_weight``): a bootstrap that resamples rows by
    weights (e.g. Poisson(1) counts) shared between several sets of predictions of the same
    rows. Each metric is a ratio of weighted sums, so all ``r`` weightings cost a few matrix
    products (AUROC: weighted Mann-Whitney over the tie groups of the scores)."""
    d = _prepare(metric, y, pred)
    w = _tensor(weights, "weights").to(_F64)
    if w.ndim != 2 or w.shape[1] != d.n:
        raise ProbeError(f"weights must be [r, {d.n}]; got {tuple(w.shape)}")
    if bool((w < 0).any()):
        raise ProbeError("weights must be non-negative")
    w = w.to(d.pred.device)
    total = w.sum(1)
    if d.metric == "r2":
        t = d.target
        mean = (w @ t) / total.clamp_min(1e-300)
        ss_tot = w @ t.square() - total * mean.square()
        return _r2(w @ (t - d.pred).square(), ss_tot.clamp_min(0))
    k, target, yhat = d.k, d.target, d.yhat
    assert yhat is not None
    if d.metric == "accuracy":
        hit = (target == yhat).to(_F64)
        return torch.where(total > 0, (w @ hit) / total.clamp_min(1e-300), torch.nan)
    if d.metric == "f1":
        onehot_t = torch.nn.functional.one_hot(target, k).to(_F64)
        onehot_p = torch.nn.functional.one_hot(yhat, k).to(_F64)
        tp = w @ (onehot_t * onehot_p)
        return _f1(tp, w @ onehot_t, w @ onehot_p, binary=k == 2)
    columns = [1] if k == 2 else list(range(k))
    aucs = []
    for c in columns:
        score = d.pred[:, c]
        _, group = torch.unique(score, return_inverse=True)
        size = int(group.max()) + 1
        pos = (target == c).to(_F64)
        wp = torch.zeros(w.shape[0], size, dtype=_F64, device=w.device)
        wn = torch.zeros_like(wp)
        idx = group[None].expand_as(w)
        wp.scatter_add_(1, idx, w * pos)
        wn.scatter_add_(1, idx, w * (1 - pos))
        below = torch.cumsum(wn, 1) - wn  # negative weight strictly below each group
        u = (wp * (below + 0.5 * wn)).sum(1)
        aucs.append(_auc(u, wp.sum(1), wn.sum(1)))
    return aucs[0] if k == 2 else torch.stack(aucs).mean(0)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval ``[low, high]``.

    ``replicates``: the metric on every resample (undefined ones dropped), float64.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    replicates: Float[Tensor, " r"] = field(repr=False, compare=False)
    metric: str = ""

    def __str__(self) -> str:
        name = f"{self.metric} " if self.metric else ""
        return (
            f"{name}{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] "
            f"({100 * self.confidence:g}% {self.method} CI, {self.replicates.numel()} resamples)"
        )


def _interval(
    name: str,
    estimate: float,
    replicates: Tensor,
    confidence: float,
    method: str,
    jackknife: Callable[[], Tensor],
) -> Interval:
    if not math.isfinite(estimate):
        raise ProbeError(
            f"{name} is undefined on these rows (e.g. AUROC with one class present, or R^2 of "
            "a constant target); no interval can be formed"
        )
    defined = torch.isfinite(replicates)
    if not bool(defined.all()):
        kept = int(defined.sum())
        if kept < replicates.numel() / 2:
            raise ProbeError(
                f"{name} is undefined on {replicates.numel() - kept} of {replicates.numel()} "
                "resamples (a class missing from them); there are too few rows of some class "
                "for a bootstrap"
            )
        warnings.warn(
            f"{name} is undefined on {replicates.numel() - kept} of {replicates.numel()} "
            "resamples (a class missing from them); the interval uses the other "
            f"{kept}",
            RuntimeWarning,
            stacklevel=3,
        )
        replicates = replicates[defined]
    tail = (1 - confidence) / 2
    q = torch.tensor([tail, 1 - tail], dtype=_F64, device=replicates.device)
    if method == "bca":
        b = replicates.numel()
        at_or_below = (replicates < estimate).sum() + (replicates <= estimate).sum()
        z0 = torch.special.ndtri(at_or_below.to(_F64) / (2 * b))
        if not bool(torch.isfinite(z0)):
            raise ProbeError(
                f"BCa is undefined for {name}: all {b} replicates lie on one side of the "
                "estimate; use method='percentile' or more resamples"
            )
        jack = jackknife()
        jack = jack[torch.isfinite(jack)]
        dev = jack.mean() - jack
        ss = dev.square().sum()
        accel = (dev.pow(3).sum() / (6 * ss.pow(1.5))) if float(ss) > 0 else ss.new_zeros(())
        zq = torch.special.ndtri(q)
        q = torch.special.ndtr(z0 + (z0 + zq) / (1 - accel * (z0 + zq)))
    low, high = torch.quantile(replicates, q.to(replicates.device)).tolist()
    return Interval(estimate, low, high, confidence, method, replicates, name)


def bootstrap(
    metric: str,
    y: Int[Tensor, " n"] | Float[Tensor, " n"],
    pred: Float[Tensor, "n k"] | Float[Tensor, " n"],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> Interval:
    """Bootstrap confidence interval of ``metric`` on held-out predictions (rows resampled with
    replacement; ``method`` ``"percentile"`` or ``"bca"``, see the module). Example::

        ci = bootstrap("accuracy", y_test, probe.predict_proba(X_test), method="bca")
        print(ci)  # accuracy 0.83 [0.8, 0.85] (95% bca CI, 1000 resamples)
    """
    d = _prepare(metric, y, pred)
    n_resamples = _positive_int(n_resamples, "n_resamples")
    confidence = _check_confidence(confidence)
    method = _check_method(method)
    idx = resample_indices(d.n, n_resamples, _generator(seed))
    replicates = _on_resamples(d, idx)
    return _interval(metric, _full(d), replicates, confidence, method, lambda: _jackknife(d))


def paired_difference(
    metric: str,
    y: Int[Tensor, " n"] | Float[Tensor, " n"],
    pred_a: Float[Tensor, "n k"] | Float[Tensor, " n"],
    pred_b: Float[Tensor, "n k"] | Float[Tensor, " n"],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "percentile",
) -> Interval:
    """Bootstrap interval of ``metric(pred_a) - metric(pred_b)``, both evaluated on the same
    resampled rows (so what the two share, the difficulty of the rows, cancels). Use it for an
    effect size such as real probe minus shuffled-label control.
    """
    da = _prepare(metric, y, pred_a, "pred_a")
    db = _prepare(metric, y, pred_b, "pred_b")
    if da.k != db.k:
        raise ProbeError(
            f"pred_a has {da.k} class columns but pred_b has {db.k}; compare predictions of "
            "the same task"
        )
    n_resamples = _positive_int(n_resamples, "n_resamples")
    confidence = _check_confidence(confidence)
    method = _check_method(method)
    idx = resample_indices(da.n, n_resamples, _generator(seed))
    replicates = _on_resamples(da, idx) - _on_resamples(db, idx)
    estimate = _full(da) - _full(db)
    return _interval(
        f"{metric} difference",
        estimate,
        replicates,
        confidence,
        method,
        lambda: _jackknife(da) - _jackknife(db),
    )


def permutation_pvalue(
    metric: str,
    y: Int[Tensor, " n"] | Float[Tensor, " n"],
    pred: Float[Tensor, "n k"] | Float[Tensor, " n"],
    n_permutations: int = 1000,
    seed: int = 0,
) -> float:
    """One-sided permutation p-value that the probe beats chance: ``y`` is permuted against
    the fixed held-out predictions ``n_permutations`` times and
    ``p = (1 + #{null >= observed}) / (1 + n_permutations)``, a valid p-value (never below
    ``1 / (1 + n_permutations)``). As scipy's ``permutation_test``, a null value within
    ``100 * eps * |observed|`` of the observed one counts as at least as large. Permutation
    ``i`` is the ``i``-th ``torch.randperm(n, generator=g)`` with
    ``g = torch.Generator().manual_seed(seed)``.
    """
    d = _prepare(metric, y, pred)
    n_permutations = _positive_int(n_permutations, "n_permutations")
    observed = _full(d)
    if not math.isfinite(observed):
        raise ProbeError(f"{metric} is undefined on these rows (e.g. one class present)")
    generator = _generator(seed)
    step = _step(d, d.n)
    at_least = 0
    tolerance = 100 * torch.finfo(_F64).eps * abs(observed)
    for start in range(0, n_permutations, step):
        size = min(step, n_permutations - start)
        # one randperm per permutation: on CPU several times faster than argsort(rand(P, n));
        # the metric of the whole chunk is then one vectorised evaluation
        perm = torch.stack([torch.randperm(d.n, generator=generator) for _ in range(size)])
        null = _evaluate(d, labels=d.target[perm.to(d.target.device)])
        at_least += int((null >= observed - tolerance).sum())
    return (1 + at_least) / (1 + n_permutations)


def holm(pvalues: Float[Tensor, " m"] | Sequence[float]) -> Float[Tensor, " m"]:
    """Holm (1979) step-down adjusted p-values, in the order given: with the ``m`` p-values
    sorted ascending, ``adj_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``. Rejecting where
    ``adj <= alpha`` controls the family-wise error rate at ``alpha`` under any dependence."""
    p = _tensor(pvalues, "pvalues")
    if p.ndim != 1:
        raise ProbeError(f"pvalues must be one-dimensional, got shape {tuple(p.shape)}")
    p = _finite(p, "pvalues")
    if p.numel() and (float(p.min()) < 0 or float(p.max()) > 1):
        raise ProbeError(
            f"p-values must lie in [0, 1]; got values from {float(p.min()):g} to {float(p.max()):g}"
        )
    m = p.numel()
    order = torch.argsort(p, stable=True)
    factor = torch.arange(m, 0, -1, dtype=_F64, device=p.device)
    adjusted = torch.cummax(factor * p[order], 0).values.clamp(max=1.0)
    return torch.empty_like(adjusted).scatter_(0, order, adjusted)


def mean_sd(values: Float[Tensor, " s"] | Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of a metric over seeds. With one seed
    the standard deviation is NaN, not 0: one run says nothing about the spread."""
    v = _tensor(values, "values")
    if v.ndim != 1 or v.numel() == 0:
        raise ProbeError(f"values must be a non-empty list of numbers, got shape {tuple(v.shape)}")
    v = _finite(v, "values")
    sd = float(v.std(correction=1)) if v.numel() > 1 else math.nan
    return float(v.mean()), sd
