"""Input checks shared by the analysis modules.

Every public function of :mod:`hookscope.analysis` passes its inputs through these helpers, so
that a bad input (NaN/Inf, the wrong number of dimensions, too few samples, mismatched rows,
an unknown option) raises one :class:`~hookscope.errors.AnalysisError` with the same wording
everywhere instead of silently returning NaN.

Conventions: matrices are ``[samples, features]``; everything is computed in float64 on the
device of the input. Centring (subtracting the per-feature mean over samples) is defined once
here, in :func:`centred`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope.errors import AnalysisError


def _to_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as err:  # ragged lists and the like
        raise AnalysisError(f"{name} could not be read as an array: {err}") from err
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise AnalysisError(
            f"{name} must hold numbers (a torch.Tensor or numpy array), got dtype {arr.dtype}"
        )
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch wants writable memory; read-only views get a copy
        arr = arr.copy()
    return torch.from_numpy(arr)


def _finite_float64(t: Tensor, name: str) -> Tensor:
    if t.is_complex():
        raise AnalysisError(f"{name} is complex ({t.dtype}); pass real values")
    t = t.to(torch.float64)
    if bool(torch.isfinite(t.sum())):  # NaN/Inf reach the sum: one cheap reduction first
        return t
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        raise AnalysisError(
            f"{name} contains {int(bad.sum())} non-finite values ({n_nan} NaN, "
            f"{int(bad.sum()) - n_nan} Inf) out of {t.numel()}; remove or impute them first"
        )
    return t


def _var(name: str) -> str:
    """``name`` if it can stand for a variable in example code, else ``x``."""
    return name if name.isidentifier() else "x"


def _flatten_hint(shape: torch.Size, name: str, *, torch_input: bool) -> str:
    """How to make one row per example of an N-D input (N > 2): flatten all but dim 0."""
    var = _var(name)
    code = f"{var}.flatten(1)" if torch_input else f"{var}.reshape({var}.shape[0], -1)"
    flat = (shape[0], int(np.prod(shape[1:])))
    hint = f"; make one row per example by flattening the other dimensions: {code} -> {flat}"
    if len(shape) == 3:
        return hint + (
            f" (or, for token activations [batch, pos, d] where every token is a sample, "
            f"{var}.reshape(-1, {var}.shape[-1]), and the same for the other input)"
        )
    return hint + (
        f"; not {var}.reshape(-1, {var}.shape[-1]), which would mix examples with positions "
        "(e.g. the h x w of a conv feature map) in the rows"
    )


def as_matrix(x: Any, name: str = "X", *, min_rows: int = 2) -> Tensor:
    """``x`` as a finite float64 ``[samples, features]`` tensor, or an AnalysisError."""
    t = _to_tensor(x, name)
    if t.ndim != 2:
        hint = (
            _flatten_hint(t.shape, name, torch_input=isinstance(x, Tensor))
            if t.ndim > 2
            else f"; pass a [samples, features] matrix ({_var(name)}[:, None] for one feature)"
        )
        raise AnalysisError(
            f"{name} must be 2-D [samples, features], got shape {tuple(t.shape)}{hint}"
        )
    if t.shape[1] < 1:
        raise AnalysisError(f"{name} has shape {tuple(t.shape)}: no features")
    if t.shape[0] < min_rows:
        raise AnalysisError(
            f"{name} has {t.shape[0]} rows (samples); need at least {min_rows} samples"
        )
    return _finite_float64(t, name)


def as_vector(x: Any, name: str = "values", *, min_len: int = 1) -> Tensor:
    """``x`` as a finite float64 1-D tensor of at least ``min_len`` entries."""
    t = _to_tensor(x, name)
    if t.ndim != 1:
        raise AnalysisError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.shape[0] < min_len:
        raise AnalysisError(f"{name} has {t.shape[0]} entries; need at least {min_len}")
    return _finite_float64(t, name)


def same_rows(x: Tensor, y: Tensor, names: tuple[str, str] = ("X", "Y")) -> None:
    """Raise unless ``x`` and ``y`` hold the same samples (same number of rows)."""
    if x.shape[0] != y.shape[0]:
        raise AnalysisError(
            f"{names[0]} has {x.shape[0]} rows but {names[1]} has {y.shape[0]} rows; both "
            "must hold one row per sample, for the same samples in the same order"
        )


def choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else an AnalysisError listing them."""
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise AnalysisError(f"{name} must be one of {listed}; got {value!r}")
    return value


def positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else an AnalysisError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise AnalysisError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise AnalysisError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def in_range(value: Any, name: str, low: float, high: float, *, closed_low: bool = True) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` if not ``closed_low``)."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise AnalysisError(f"{name} must be a number; got {value!r}") from err
    ok = (low <= v if closed_low else low < v) and v <= high and np.isfinite(v)
    if not ok:
        bracket = "[" if closed_low else "("
        raise AnalysisError(f"{name} must lie in {bracket}{low}, {high}]; got {value!r}")
    return v


def centred(a: Tensor) -> Tensor:
    """``a`` minus its per-feature mean over samples (rows): the centring used everywhere."""
    return a - a.mean(dim=0, keepdim=True)


def maybe_centred(a: Tensor, center: bool) -> Tensor:
    """:func:`centred` when ``center`` is true, ``a`` unchanged otherwise."""
    if not isinstance(center, (bool, np.bool_)):
        raise AnalysisError(f"center must be True or False; got {center!r}")
    return centred(a) if center else a


def require_signal(m: Tensor, raw: Tensor, name: str, what: str) -> None:
    """Raise if ``m`` (``raw`` after optional centring) is zero up to round-off.

    A constant matrix centres to values of order ``eps * max|raw|``, not exactly zero, so the
    test is relative to the scale of ``raw``.
    """
    scale = float(raw.abs().max())
    if float(m.abs().max()) <= 64 * torch.finfo(m.dtype).eps * scale or scale == 0.0:
        why = "all its rows are equal" if m is not raw else "it is all zero"
        raise AnalysisError(f"{name} has no variance ({why}), so {what} is undefined")


def as_labels(labels: Any, n: int, name: str = "labels", *, min_classes: int = 2) -> Tensor:
    """``labels`` as a 1-D int64 tensor of ``n`` class ids with at least ``min_classes`` classes."""
    t = _to_tensor(labels, name)
    if t.ndim != 1:
        raise AnalysisError(f"{name} must be 1-D (one class id per sample), got {tuple(t.shape)}")
    if t.shape[0] != n:
        raise AnalysisError(f"{name} has {t.shape[0]} entries but the activations have {n} rows")
    if t.is_floating_point() or t.is_complex():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise AnalysisError(f"{name} must be integer class ids; got non-integer values")
    t = t.to(torch.int64)
    k = int(torch.unique(t).numel())
    if k < min_classes:
        raise AnalysisError(f"{name} has {k} distinct class(es); need at least {min_classes}")
    return t


def as_layers(
    activations: Any, names: Any = None, *, sample_dims: int = 1, min_rows: int = 2
) -> tuple[list[str], list[Tensor]]:
    """Names and ``[n, features]`` float64 matrices of a list/dict/cache of layer activations.

    ``activations`` is a sequence of arrays (named ``"0", "1", ...``) or a mapping / cache
    with ``.items()`` (named by ``str(key)``). The first ``sample_dims`` dimensions index
    samples (1: ``[batch, ...]``; 2: ``[batch, pos, ...]`` with every token a sample) and the
    rest are flattened into features. Every layer must have the same number of samples.
    """
    sample_dims = positive_int(sample_dims, "sample_dims")
    if hasattr(activations, "items") and callable(activations.items):
        pairs = list(activations.items())
        found = [str(k) for k, _ in pairs]
        values = tuple(v for _, v in pairs)
    elif isinstance(activations, (list, tuple)):
        values = tuple(activations)
        found = [str(i) for i in range(len(values))]
    else:
        raise AnalysisError(
            "activations must be a list/tuple of [samples, ...] arrays or a mapping "
            f"(dict or activation cache) of them; got {type(activations).__name__}"
        )
    if not values:
        raise AnalysisError("activations is empty; pass at least one layer")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(values):
            raise AnalysisError(
                f"names has {len(names)} entries but there are {len(values)} layers"
            )
        found = names
    mats = []
    for name, value in zip(found, values, strict=True):
        t = _to_tensor(value, f"layer {name!r}")
        if t.ndim <= sample_dims:
            raise AnalysisError(
                f"layer {name!r} has shape {tuple(t.shape)}; with sample_dims={sample_dims} it "
                "needs at least one feature dimension after the sample dimensions"
            )
        t = t.reshape(int(np.prod(t.shape[:sample_dims])), -1)
        mats.append(as_matrix(t, f"layer {name!r}", min_rows=min_rows))
    for name, m in zip(found, mats, strict=True):
        if m.shape[0] != mats[0].shape[0]:
            raise AnalysisError(
                f"layer {found[0]!r} has {mats[0].shape[0]} samples but layer {name!r} has "
                f"{m.shape[0]}; every layer must hold the same samples"
            )
    return found, mats
