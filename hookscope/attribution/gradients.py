"""Gradient attributions: saliency, integrated gradients and Grad-CAM, at the input or at any
hookscope address, on any wrapped model (vision or language), batched.

Where the gradient is taken:

* image / feature inputs (a float tensor), ``site=None``: the input itself;
* token inputs, ``site=None``: the ``embed`` address (the token embeddings); the value of a
  token sums (integrated gradients) or reduces (saliency) its embedding dimensions;
* ``site="resid_post.1"`` (any layer-level address): that activation - the forward runs
  with the activation replaced by a tensor that requires grad (a hookscope hook), so the
  gradient is the model's derivative with respect to it.

Targets are class indices (one, or one per example; for a language model the token's logit
at each row's last real position), ``"all"`` (Grad-CAM) or a callable ``output ->
Tensor[rows]`` that acts row-wise (integrated gradients runs many steps of each example as
rows of one batch). See :mod:`hookscope.attribution._common`.

Conventions (the tests compare each with captum 0.9 to 1e-5):

* :func:`saliency` - ``|d target / d input|`` (``absolute=False``: signed), as captum's
  ``Saliency``.
* :func:`integrated_gradients` - ``(x - x') * sum_k w_k dF/dx(x' + a_k (x - x'))`` with
  quadrature nodes ``a_k`` and weights ``w_k``: ``riemann_left/right/middle`` (``w = 1/n``,
  nodes as captum), ``riemann_trapezoid`` (nodes ``linspace(0, 1, n)``, weights ``1/(n-1)``
  halved at the ends: they sum to 1; captum's sum to ``1 - 1/n``), ``gausslegendre``
  (numpy's Legendre nodes mapped to [0, 1], captum's default). The completeness delta per
  example is ``sum(attributions) - (F(x) - F(x'))`` (captum's sign).
* :func:`grad_cam` - Selvaraju et al. 2017: channel weights are the spatial mean of the
  gradients, the map is ``ReLU(sum_c w_c A_c)`` (``relu=False``: signed), upsampled
  bilinearly (``align_corners=False``, as ``LayerAttribution.interpolate``) to the input's
  height and width; no normalisation unless ``normalize="max"`` (divide by each map's
  maximum) or ``"minmax"``. A transformer site over image patches ``[batch, tokens, d]``
  is reshaped to the patch grid; when the token count is a square plus one the first token
  is a CLS token and is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hookscope.addresses import Address, AttentionHead, Module, Selection
from hookscope.attribution._common import (
    Inputs,
    as_model,
    layer_site,
    prepare_inputs,
    resolve_target,
)
from hookscope.attribution.result import Attributions
from hookscope.errors import InputError, format_choices, suggestion
from hookscope.model import HookedModel
from hookscope.modes import in_eval_mode

__all__ = [
    "saliency",
    "integrated_gradients",
    "grad_cam",
    "quadrature",
    "METHODS",
    "NORMALIZATIONS",
]

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
NORMALIZATIONS = (None, "max", "minmax")
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


def _check_count(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{name} must be a positive integer or None, got {value!r}")


# ---------------------------------------------------------------------------- where


class _Where:
    """Where the gradient is taken: the model's float input, or an address whose activation
    the forward replaces with a given tensor."""

    def __init__(self, model: HookedModel, inputs: Inputs, site: Any, what: str):
        self.model, self.inputs = model, inputs
        if site is None and inputs.is_tokens:
            site = "embed"
            if "embed" not in [str(a) for a in model.addresses()]:
                raise InputError(
                    f"{what} over token inputs needs the model's embed address; "
                    f"{model.adapter.name} has none. Pass site= one of "
                    f"{format_choices([str(a) for a in model.addresses()])}"
                )
        self.address: Address | None = None if site is None else layer_site(model, site, what)
        self.site = "input" if self.address is None else str(self.address)

    def per_token(self, point: Tensor) -> bool:
        """Token inputs and a site over their positions ([batch, pos, ...]): the values are
        reduced to one per token."""
        pos = self.inputs.tensor.shape[1] if self.inputs.is_tokens else None
        return pos is not None and point.ndim >= 3 and point.shape[1] == pos

    def activation(self, examples: Tensor | None = None) -> Tensor:
        """The value the gradient is taken at (detached), for the rows ``examples``."""
        x = self.inputs.tensor if examples is None else self.inputs.tensor[examples]
        if self.address is None:
            return x.detach()
        _, cache = self.model.run_with_cache(x, [self.address], **self.inputs.kwargs(examples))
        return cache[self.address].detach()

    def forward(self, examples: Tensor, value: Tensor) -> Tensor:
        """The model's output on rows ``examples`` with the gradient point set to ``value``."""
        if self.address is None:
            return self.model(value)
        x = self.inputs.tensor[examples]

        def put(act: Tensor, address: Any) -> Tensor:
            if act.shape != value.shape:
                raise InputError(
                    f"the activation at {self.site} has shape {tuple(act.shape)} but the value "
                    f"given for it has {tuple(value.shape)}"
                )
            return value

        hooks = [(self.address, put)]
        return self.model.run_with_hooks(x, hooks=hooks, **self.inputs.kwargs(examples))

    def forward_leaf(self, examples: Tensor) -> tuple[Tensor, Tensor]:
        """One forward of rows ``examples`` (grad enabled) with the gradient point made a
        leaf that requires grad: ``(output, leaf)``."""
        if self.address is None:
            leaf = self.inputs.tensor[examples].detach().clone().requires_grad_(True)
            return self.model(leaf), leaf
        held: list[Tensor] = []

        def grab(act: Tensor, address: Any) -> Tensor:
            held.append(act.detach().clone().requires_grad_(True))
            return held[-1]

        x = self.inputs.tensor[examples]
        out = self.model.run_with_hooks(
            x, hooks=[(self.address, grab)], **self.inputs.kwargs(examples)
        )
        return out, held[0]

    def tokens(self, point: Tensor) -> list[list[str]] | None:
        """Each row's tokens as strings up to its last real one, when the values are per
        token (left padding shows as pad tokens with value 0)."""
        if not self.per_token(point):
            return None
        ids = self.inputs.tensor.cpu()
        lengths = (
            [ids.shape[1]] * ids.shape[0]
            if self.inputs.last is None
            else (self.inputs.last + 1).tolist()
        )
        rows = []
        for row, n in zip(ids.tolist(), lengths, strict=True):
            row = row[:n]
            if self.model.tokenizer is None:
                rows.append([str(t) for t in row])
            else:
                rows.append([self.model.tokenizer.decode([t]) for t in row])
        return rows


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _output_width(out: Tensor) -> int:
    return int(out.shape[-1])


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


def _check_grad_mode(what: str) -> None:
    if torch.is_inference_mode_enabled():
        raise InputError(
            f"{what} needs gradients, which torch.inference_mode() turns off; call it outside "
            "the inference_mode block"
        )


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
    _check_grad_mode("saliency")
    model = as_model(model)
    inp = prepare_inputs(model, inputs)
    if not isinstance(absolute, bool):
        raise InputError(f"absolute must be True or False, got {absolute!r}")
    _check_count(batch_size, "batch_size")
    where = _Where(model, inp, site, "saliency")
    tgt = resolve_target(model, inp, target, batch_size=batch_size)
    grads, points = [], []
    size = batch_size or inp.batch
    for start, stop in _chunks(inp.batch, size):
        examples = torch.arange(start, stop, device=inp.tensor.device)
        with torch.enable_grad():
            out, leaf = where.forward_leaf(examples)
            point = leaf.detach()
            if start == 0:
                tgt.check_range(_output_width(out))
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


def _baseline(baseline: Any, point: Tensor, where: _Where) -> Tensor:
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
    _check_grad_mode("integrated_gradients")
    model = as_model(model)
    inp = prepare_inputs(model, inputs)
    _check_method(method, n_steps)
    _check_count(internal_batch_size, "internal_batch_size")
    if progress is not None and not isinstance(progress, bool):
        raise InputError(f"progress must be True, False or None, got {progress!r}")
    where = _Where(model, inp, site, "integrated_gradients")
    tgt = resolve_target(model, inp, target)
    x = where.activation()
    base = _baseline(baseline, x, where)
    B = inp.batch
    every = torch.arange(B, device=x.device)
    with torch.no_grad():
        out_x = where.forward(every, x)
        tgt.check_range(_output_width(out_x))
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


def _grid(act: Tensor, site: str) -> Tensor:
    """A spatial activation as [rows, C, H, W]: a conv map as is, image-patch tokens
    [rows, T, d] on their grid (CLS dropped when T - 1 is a square)."""
    if act.ndim == 4:
        return act
    if act.ndim == 3:
        rows, t, d = act.shape
        drop = 1 if t > 1 and math.isqrt(t - 1) ** 2 == t - 1 else 0
        side = math.isqrt(t - drop)
        if side * side == t - drop:
            return act[:, drop:].reshape(rows, side, side, d).permute(0, 3, 1, 2)
    raise InputError(f"{site} has shape {tuple(act.shape)}: not spatial")


def _cam_site(model: HookedModel, inp: Inputs, site: Any) -> Any:
    """The site Grad-CAM uses: ``site`` when it is a spatial layer (or a ``module:<path>``
    with a spatial output), else InputError naming the spatial layers this model has;
    ``None``: the usual one (:func:`_default_cam_site`)."""
    found = _spatial(model, inp)
    names = [name for name, _ in found]
    none_here = (
        f"the {model.adapter.name} model has no spatial layer (a conv feature map or "
        "image-patch tokens); pass a module:<path> whose output is one"
    )
    if site is None:
        if not names:
            raise InputError(f"grad_cam needs a spatial site; {none_here}")
        return _default_cam_site(found)
    resolved = model.resolve(site) if isinstance(site, (str, Address, Selection)) else []
    if len(resolved) == 1 and isinstance(resolved[0], Module):
        _, cache = model.run_with_cache(
            inp.tensor[:1], [resolved[0]], **inp.kwargs(torch.arange(1))
        )
        act = cache[resolved[0]]
        if act.ndim == 4 or (act.ndim == 3 and _is_patch_grid(act)):
            return resolved[0]
        raise InputError(
            f"grad_cam needs a spatial site; {resolved[0]} has shape {tuple(act.shape)}. "
            + (f"Choose one of {format_choices(names)}" if names else none_here.capitalize())
        )
    if len(resolved) == 1 and str(resolved[0]) in names:
        return resolved[0]
    what = [str(a) for a in resolved][:4] if resolved else repr(site)
    raise InputError(
        f"grad_cam needs one spatial layer (a conv feature map or image-patch tokens); "
        f"{site!r} selects {what}. "
        + (f"Choose one of {format_choices(names)}" if names else none_here.capitalize())
    )


def _default_cam_site(found: list[tuple[str, int]]) -> str:
    """Grad-CAM's usual layer among the spatial ones: the last conv layer's output (the last
    ``neuron.L`` feature map), else the last block's input ``resid_pre.L`` of a vision
    transformer (its patch tokens still reach the CLS token through the last attention; at
    the last block's output they no longer do, and the map is 0), else the last one."""
    sites = [name for name, _ in found]
    conv = [
        n for n, ndim in found if ndim == 4 and n.startswith("neuron.") and not n.endswith(".pre")
    ]
    blocks = [s for s in sites if s.startswith("resid_pre.")]
    if conv:
        return conv[-1]
    return blocks[-1] if blocks else sites[-1]


def _spatial(model: HookedModel, inp: Inputs) -> list[tuple[str, int]]:
    """The layer-level addresses whose activation Grad-CAM can use, with their number of
    dimensions (4: a conv map; 3: patch tokens), in forward order (on one example)."""
    found = []
    addresses = [a for a in model.addresses() if not _is_head(a)]
    _, cache = model.run_with_cache(inp.tensor[:1], addresses, **inp.kwargs(torch.arange(1)))
    for a in addresses:
        act = cache[a]
        if act.ndim == 4 or (act.ndim == 3 and _is_patch_grid(act)):
            found.append((str(a), act.ndim))
    return found


def _spatial_sites(model: HookedModel, inp: Inputs) -> list[str]:
    return [name for name, _ in _spatial(model, inp)]


@in_eval_mode
def grad_cam(
    model: Any,
    inputs: Any,
    target: Any = None,
    *,
    site: Any = None,
    relu: bool = True,
    normalize: str | None = None,
    upsample: bool = True,
    batch_size: int | None = None,
) -> Attributions:
    """Grad-CAM (Selvaraju et al. 2017) at ``site``, a conv feature map or image-patch tokens.

    ``values``: [batch, H, W] at the input's resolution (``upsample=False``: the site's
    grid), or [batch, n_classes, H, W] with ``target="all"``: every class from one forward
    and one batched backward. ``site=None``: the last conv layer's output (``neuron.L``),
    or a ViT's last block input ``resid_pre.L``; ``target=None``: the predicted class.
    ``raw``: the maps at the site's grid. Conventions in the module docstring (ReLU on by
    default; no normalisation unless asked).

    >>> cam = grad_cam(cnn, X[:16], target=y[:16], site="neuron.1")   # doctest: +SKIP
    """
    _check_grad_mode("grad_cam")
    model = as_model(model)
    inp = prepare_inputs(model, inputs)
    if inp.is_tokens:
        raise InputError(
            "grad_cam needs image inputs (a float tensor [batch, C, H, W]); for token inputs "
            "use saliency or integrated_gradients"
        )
    if not isinstance(relu, bool) or not isinstance(upsample, bool):
        raise InputError(f"relu and upsample must be True or False, got {relu!r}, {upsample!r}")
    if normalize not in NORMALIZATIONS:
        raise InputError(
            f"unknown normalize {normalize!r}; choose one of {format_choices(NORMALIZATIONS)}"
        )
    _check_count(batch_size, "batch_size")
    if inp.tensor.ndim != 4:
        raise InputError(
            f"grad_cam needs images [batch, C, H, W]; the inputs have shape "
            f"{tuple(inp.tensor.shape)}"
        )
    site = _cam_site(model, inp, site)
    where = _Where(model, inp, site, "grad_cam")
    tgt = resolve_target(model, inp, target, allow_all=True, batch_size=batch_size)
    maps = []
    for start, stop in _chunks(inp.batch, batch_size or inp.batch):
        examples = torch.arange(start, stop, device=inp.tensor.device)
        with torch.enable_grad():
            out, leaf = where.forward_leaf(examples)
            if start == 0:
                tgt.check_range(_output_width(out))
            if tgt.kind == "all":
                k = _output_width(out)
                if out.ndim != 2:
                    raise InputError(
                        f'target="all" needs logits [batch, classes]; the model returned '
                        f"{tuple(out.shape)}"
                    )
                eye = torch.eye(k, dtype=out.dtype, device=out.device)
                seeds = eye[:, None, :].expand(k, out.shape[0], k)
                (grad,) = torch.autograd.grad(out, leaf, seeds, is_grads_batched=True)
                grad = grad.transpose(0, 1)  # [rows, classes, ...]
            else:
                value = tgt.select(out, examples, inp.last)
                (grad,) = torch.autograd.grad(value.sum(), leaf)
                grad = grad.unsqueeze(1)
        act = _grid(leaf.detach(), where.site)  # [rows, C, h, w]
        g = _grid(grad.flatten(0, 1), where.site).unflatten(0, grad.shape[:2])
        weights = g.mean(dim=(-2, -1))  # [rows, K, C]
        cam = torch.einsum("rkc,rchw->rkhw", weights, act)
        maps.append(cam.relu() if relu else cam)
    raw = torch.cat(maps)
    values = raw
    if upsample:
        values = F.interpolate(
            values, size=inp.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
    if normalize is not None:
        values = _normalized(values, normalize)
    if tgt.kind != "all":
        values, raw = values[:, 0], raw[:, 0]
    return Attributions(
        "grad_cam",
        values.detach(),
        where.site,
        tgt.indices,
        {"relu": relu, "normalize": normalize, "upsample": upsample, "target": tgt.describe()},
        raw=raw.detach(),
    )


def _is_head(address: Any) -> bool:
    """Per-head sites ([batch, pos, heads, d_head], patterns): never a spatial map."""
    return isinstance(address, AttentionHead)


def _is_patch_grid(act: Tensor) -> bool:
    """Tokens [rows, T, d] that lie on a square grid (T or T - 1 a square)."""
    t = act.shape[1]
    return math.isqrt(t) ** 2 == t or (t > 1 and math.isqrt(t - 1) ** 2 == t - 1)


def _normalized(maps: Tensor, how: str) -> Tensor:
    flat = maps.flatten(-2)
    hi = flat.amax(-1, keepdim=True)
    if how == "max":
        scale = torch.where(hi.abs() > 0, hi.abs(), torch.ones_like(hi))
        return (flat / scale).view_as(maps)
    lo = flat.amin(-1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return ((flat - lo) / span).view_as(maps)
