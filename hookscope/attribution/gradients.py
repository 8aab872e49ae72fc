"""Gradient attributions: saliency and integrated gradients, at the input or at any
hookscope address (:mod:`._where`), on any wrapped model (vision or language), batched.

Targets are class indices (one, or one per example; for a language model the token's logit
at each row's last real position), a callable ``output -> Tensor[rows]`` that acts
row-wise (integrated gradients runs many steps of each example as rows of one batch), or
None (the predicted class). See :mod:`hookscope.attribution._common`.

Conventions (the tests compare each with captum 0.9 to 1e-5):

* :func:`saliency` - ``|d target / d input|`` (``absolute=False``: signed), as captum's
  ``Saliency``.
* :func:`integrated_gradients` - ``(x - x') * sum_k w_k dF/dx(x' + a_k (x - x'))`` with
  quadrature nodes ``a_k`` and weights ``w_k``: ``riemann_left/right/middle`` (``w = 1/n``,
  nodes as captum), ``riemann_trapezoid`` (nodes ``linspace(0, 1, n)``, weights ``1/(n-1)``
  halved at the ends: they sum to 1; captum's sum to ``1 - 1/n``), ``gausslegendre``
  (numpy's Legendre nodes mapped to [0, 1], captum's default). The completeness delta per
  example is ``sum(attributions) - (F(x) - F(x'))`` (captum's sign).

Grad-CAM is in :mod:`.grad_cam`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope.attribution._common import (
    Inputs,
    as_model,
    prepare_inputs,
    resolve_target,
)
from hookscope.attribution._where import Where, check_count, check_grad_mode, chunks, output_width
from hookscope.attribution.result import Attributions
from hookscope.errors import InputError, format_choices, suggestion
from hookscope.model import HookedModel
from hookscope.modes import in_eval_mode

__all__ = [
    "saliency",
    "integrated_gradients",
    "quadrature",
    "METHODS",
]

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
BASELINES = "'zeros', a number, or a tensor shaped like one example or like the whole batch"
#: integrated gradients' automatic chunk: about this many values kept for the backward per
#: chunk (measured on the digits CNN at 1 thread: chunks of 1-2k rows ran 2x faster than one
#: 16k-row batch, whose activations no longer fit the caches)
CHUNK_ELEMENTS = 4_000_000
#: rows of integrated gradients' first chunk, which measures the memory a row takes
FIRST_CHUNK = 256
#: with ``progress=None`` a bar appears once a loop has run this many seconds
PROGRESS_DELAY = 1.0


def quadrature(method: str, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, weights)`` of the path integral over [0, 1], float64 (module docstring)."""
    _check_method(method, n_steps)
    n = n_steps
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (nodes + 1), 0.5 * weights
    if method == "riemann_trapezoid":
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, n), weights
    start = {"riemann_left": 0.0, "riemann_right": 1.0 / n, "riemann_middle": 0.5 / n}[method]
    return start + np.arange(n) / n, np.full(n, 1.0 / n)


def _check_method(method: Any, n_steps: Any) -> None:
    if method not in METHODS:
        raise InputError(
            f"unknown integration method {method!r}; choose one of {format_choices(METHODS)}."
            + (suggestion(method, METHODS) if isinstance(method, str) else "")
        )
    least = 2 if method == "riemann_trapezoid" else 1
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < least:
        raise InputError(f"n_steps must be an integer >= {least} for {method}, got {n_steps!r}")


class _SavedCount:
    """Counts the values autograd saves for the backward (parameters excluded) while open:
    what a chunk of rows holds in memory until its backward."""

    def __init__(self, model: HookedModel):
        self.params = {p.untyped_storage().data_ptr() for p in model.model.parameters()}
        self.count = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in self.params:
            self.count += t.numel()
        return t

    def __enter__(self) -> _SavedCount:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


# ---------------------------------------------------------------------------- saliency


@in_eval_mode
def saliency(
    model: Any,
    inputs: Any,
    target: Any = None,
    *,
    absolute: bool = True,
    site: Any = None,
    batch_size: int | None = None,
) -> Attributions:
    """The gradient of the target with respect to the input (or ``site``), per example.

    Images / features: ``values`` [batch, *input_shape] = ``|grad|`` (``absolute=False``:
    the signed gradient). Tokens: ``values`` [batch, pos] = the L2 norm of each token's
    embedding gradient (``absolute=False``: gradient . embedding, i.e. gradient x input,
    signed), and the same at any ``site`` over the token positions; ``raw`` holds the
    gradient [batch, pos, ...]. ``batch_size`` splits the batch (None: one backward for all).

    >>> sal = saliency(cnn, X[:16], target=y[:16])          # doctest: +SKIP
    """
    check_grad_mode("saliency")
    model = as_model(model)
    inp = prepare_inputs(model, inputs)
    if not isinstance(absolute, bool):
        raise InputError(f"absolute must be True or False, got {absolute!r}")
    check_count(batch_size, "batch_size")
    where = Where(model, inp, site, "saliency")
    tgt = resolve_target(model, inp, target, batch_size=batch_size)
    grads, points = [], []
    size = batch_size or inp.batch
    for start, stop in chunks(inp.batch, size):
        examples = torch.arange(start, stop, device=inp.tensor.device)
        with torch.enable_grad():
            out, leaf = where.forward_leaf(examples)
            point = leaf.detach()
            if start == 0:
                tgt.check_range(output_width(out))
            value = tgt.select(out, examples, inp.last)
            (grad,) = torch.autograd.grad(value.sum(), leaf)
        grads.append(grad.detach())
        points.append(point)
    grad = torch.cat(grads)
    point = torch.cat(points)
    raw = None
    if where.per_token(point):
        raw = grad
        flat_grad, flat_point = grad.flatten(2), point.flatten(2)
        values = flat_grad.norm(dim=-1) if absolute else (flat_grad * flat_point).sum(-1)
        values = values * _mask(inp, values)
    else:
        values = grad.abs() if absolute else grad
    return Attributions(
        "saliency",
        values,
        where.site,
        tgt.indices,
        {"absolute": absolute, "target": tgt.describe()},
        raw=raw,
        tokens=where.tokens(point),
    )


def _mask(inp: Inputs, values: Tensor) -> Tensor:
    if inp.mask is None:
        return torch.ones_like(values)
    return inp.mask.to(values.dtype)


# ---------------------------------------------------------------------------- IG


def _baseline(baseline: Any, point: Tensor, where: Where) -> Tensor:
    if isinstance(baseline, str):
        if baseline != "zeros":
            raise InputError(f"unknown baseline {baseline!r}; pass {BASELINES}")
        return torch.zeros_like(point)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise InputError(f"baseline {baseline} is not a finite number; pass {BASELINES}")
        return torch.full_like(point, float(baseline))
    if isinstance(baseline, Tensor):
        if tuple(baseline.shape) == tuple(point.shape[1:]):
            baseline = baseline.unsqueeze(0)
        if baseline.ndim != point.ndim or any(
            b not in (1, p) for b, p in zip(baseline.shape, point.shape, strict=True)
        ):
            raise InputError(
                f"baseline has shape {tuple(baseline.shape)} but the {where.site} values have "
                f"{tuple(point.shape)}; pass {BASELINES}"
            )
        if not torch.isfinite(baseline).all():
            raise InputError("baseline holds NaN or Inf values")
        return baseline.to(point.device, point.dtype).expand_as(point).clone()
    raise InputError(f"baseline must be {BASELINES}; got {type(baseline).__name__}")


@in_eval_mode
def integrated_gradients(
    model: Any,
    inputs: Any,
    target: Any = None,
    *,
    baseline: Any = "zeros",
    n_steps: int = 50,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    site: Any = None,
    progress: bool | None = None,
) -> Attributions:
    """Integrated gradients (Sundararajan et al. 2017) from ``baseline`` to the input.

    ``values`` [batch, *input_shape] (tokens: [batch, pos], each token's dimensions summed;
    ``raw`` [batch, pos, d_model]); ``delta`` [batch], the completeness gap. ``method`` and
    the quadrature are in the module docstring. The ``n_steps x batch`` scaled inputs run as
    rows of chunks of ``internal_batch_size`` rows, one forward and one backward each (None:
    the first chunk of :data:`FIRST_CHUNK` rows counts the values autograd keeps per row,
    and later chunks hold about :data:`CHUNK_ELEMENTS` of them; the size used is in
    ``conventions["internal_batch_size"]``). Gradients accumulate in float32 at least. A
    progress bar counts the rows (``progress=None``: shown once the loop has run
    :data:`PROGRESS_DELAY` seconds).
    ``baseline``: ``"zeros"``, a number, or a tensor shaped like one example or the batch
    (at ``site`` when one is given; for tokens, in embedding space).

    >>> ig = integrated_gradients(cnn, X[:16], target=y[:16], n_steps=64)   # doctest: +SKIP
    >>> ig.values.sum((1, 2, 3)) - ig.delta                                 # doctest: +SKIP
    """
    check_grad_mode("integrated_gradients")
    model = as_model(model)
    inp = prepare_inputs(model, inputs)
    _check_method(method, n_steps)
    check_count(internal_batch_size, "internal_batch_size")
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"progress must be True, False or None, got {progress!r}")
    where = Where(model, inp, site, "integrated_gradients")
    tgt = resolve_target(model, inp, target)
    x = where.activation()
    base = _baseline(baseline, x, where)
    B = inp.batch
    every = torch.arange(B, device=x.device)
    with torch.no_grad():
        out_x = where.forward(every, x)
        tgt.check_range(output_width(out_x))
        out_b = where.forward(every, base)
        f_x, f_b = tgt.select(out_x, every, inp.last), tgt.select(out_b, every, inp.last)
    alphas, weights = quadrature(method, n_steps)
    alphas_t = torch.tensor(alphas, dtype=x.dtype, device=x.device)
    weights_t = torch.tensor(weights, dtype=x.dtype, device=x.device)
    rows = n_steps * B
    # the first chunk measures what a row keeps for the backward; the rest are sized by it
    size = internal_batch_size or min(rows, FIRST_CHUNK)
    diff = x - base
    total = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
    from tqdm.auto import tqdm

    shape = (-1,) + (1,) * (x.ndim - 1)
    bar = tqdm(
        total=rows,
        desc="integrated gradients",
        unit="row",
        disable=progress is False,
        delay=0 if progress else PROGRESS_DELAY,
    )
    start = 0
    with bar:
        while start < rows:
            stop = min(start + size, rows)
            flat = torch.arange(start, stop, device=x.device)
            steps, examples = flat // B, flat % B
            point = base[examples] + alphas_t[steps].view(shape) * diff[examples]
            point.requires_grad_(True)
            with torch.enable_grad():
                with _SavedCount(model) as saved:
                    out = where.forward(examples, point)
                    value = tgt.select(out, examples, inp.last)
                (grad,) = torch.autograd.grad(value.sum(), point)
            total.index_add_(0, examples, (grad * weights_t[steps].view(shape)).to(total.dtype))
            if start == 0 and internal_batch_size is None:
                per_row = max(1, saved.count // (stop - start))
                size = max(1, CHUNK_ELEMENTS // per_row)
            bar.update(stop - start)
            start = stop
    attributions = (diff * total).to(x.dtype)
    raw = None
    if where.per_token(x):
        raw = attributions
        attributions = raw.flatten(2).sum(-1)
    sums = attributions.reshape(B, -1).double().sum(1)
    delta = (sums - (f_x - f_b).double()).to(x.dtype)
    return Attributions(
        "integrated_gradients",
        attributions.detach(),
        where.site,
        tgt.indices,
        {
            "method": method,
            "n_steps": n_steps,
            "baseline": baseline if isinstance(baseline, (str, int, float)) else "tensor",
            "target": tgt.describe(),
            "internal_batch_size": size,
        },
        raw=None if raw is None else raw.detach(),
        delta=delta.detach(),
        tokens=where.tokens(x),
    )


# ---------------------------------------------------------------------------- Grad-CAM
