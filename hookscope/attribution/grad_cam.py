"""Grad-CAM (Selvaraju et al. 2017) at a conv feature map or a vision transformer's patch
tokens, on any wrapped model, batched; every class at once with ``target="all"``.

Conventions (the tests compare them with captum 0.9's ``LayerGradCam`` +
``LayerAttribution.interpolate`` to 1e-5): channel weights are the spatial mean of the
gradients, the map is ``ReLU(sum_c w_c A_c)`` (``relu=False``: signed), upsampled
bilinearly (``align_corners=False``) to the input's height and width; no normalisation
unless ``normalize="max"`` (divide by each map's maximum) or ``"minmax"``. A transformer
site over image patches ``[batch, tokens, d]`` is reshaped to the patch grid; when the token
count is a square plus one the first token is a CLS token and is dropped. Targets as in
:mod:`hookscope.attribution._common`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hookscope.addresses import Address, AttentionHead, Module, Selection
from hookscope.attribution._common import (
    Inputs,
    as_model,
    prepare_inputs,
    resolve_target,
)
from hookscope.attribution._where import Where, check_count, check_grad_mode, chunks, output_width
from hookscope.attribution.result import Attributions
from hookscope.errors import InputError, format_choices
from hookscope.model import HookedModel
from hookscope.modes import in_eval_mode

__all__ = ["grad_cam", "NORMALIZATIONS"]

NORMALIZATIONS = (None, "max", "minmax")


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
    check_grad_mode("grad_cam")
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
    check_count(batch_size, "batch_size")
    if inp.tensor.ndim != 4:
        raise InputError(
            f"grad_cam needs images [batch, C, H, W]; the inputs have shape "
            f"{tuple(inp.tensor.shape)}"
        )
    site = _cam_site(model, inp, site)
    where = Where(model, inp, site, "grad_cam")
    tgt = resolve_target(model, inp, target, allow_all=True, batch_size=batch_size)
    maps = []
    for start, stop in chunks(inp.batch, batch_size or inp.batch):
        examples = torch.arange(start, stop, device=inp.tensor.device)
        with torch.enable_grad():
            out, leaf = where.forward_leaf(examples)
            if start == 0:
                tgt.check_range(output_width(out))
            if tgt.kind == "all":
                k = output_width(out)
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
