"""Helpers shared by the unit analyses: argument checks, batched forwards, samples, head grids.

Conventions shared by several modules:

* **Sites** are ``neuron`` addresses: a layer (``neuron.1``, ``neuron.1.pre``) for
  :func:`~hookscope.units.neuron_stats` and :func:`~hookscope.units.composition`, one unit
  (``neuron.1.7``) for :func:`~hookscope.units.top_activating`.
* **Samples.** A unit has one scalar per sample. An MLP unit: one per input. A conv channel
  (unit axis 1 of a ``[batch, C, H, W]`` map): its map reduced over space per input,
  ``reduce="mean"`` (default for statistics) or ``"max"``. A language-model neuron
  (``[batch, pos, d_mlp]``), or a transformer over patches: one per real position; padding
  (``attention_mask == 0``) is never a sample.
* **Arguments.** Labels are one integer class per example (:func:`as_labels`: strings,
  floats and 2-D labels are InputErrors); counts (``batch_size``, ``k``, layers, grids,
  seeds) may be Python or numpy integers, numbers Python or numpy floats.
* **Heads** are named ``(layer, head)``; per-head grids are ``[layer, head]`` (rows follow
  the analysed layers). The **readout position** of an example is CLS (position 0) for a
  vision transformer and its last real token for a language model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookscope.addresses import Address
from hookscope.attribution._common import Inputs, as_model, layer_site
from hookscope.errors import AddressError, InputError, format_choices
from hookscope.model import HookedModel

__all__ = [
    "REDUCTIONS",
    "is_int",
    "is_real",
    "positive_int",
    "as_labels",
    "check_reduce",
    "neuron_layer",
    "unit_axis",
    "batches",
    "unit_samples",
    "kind_of",
    "_attention_model",
    "_pick_layers",
    "_choice",
    "_chunks",
    "_readout",
    "_heatmap",
    "_grid_frame",
]

REDUCTIONS = ("mean", "max")


# --------------------------------------------------------- neuron arguments and samples


def is_int(value: Any) -> bool:
    """True for a Python or numpy integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """True for a Python or numpy int / float (not a bool)."""
    return is_int(value) or isinstance(value, (float, np.floating))


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` (a Python or numpy integer) as an int >= ``minimum``, else InputError."""
    if not is_int(value) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def as_labels(labels: Any, n: int, *, min_classes: int = 2) -> Tensor:
    """``labels`` as a LongTensor [n]: one integer class per example.

    Accepts a 1-D integer tensor, array or list (numpy integers included). Strings, floats,
    booleans, other shapes and a length other than ``n`` raise InputError, as do fewer than
    ``min_classes`` distinct classes (``min_classes=1`` skips that check; the caller then
    decides what one class means).
    """
    if isinstance(labels, (str, bytes)):
        raise InputError(f"labels must be one integer class per example; got a string {labels!r}")
    if isinstance(labels, Tensor):
        y = labels.detach().cpu()
    else:
        try:
            arr = np.asarray(labels)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.dtype.kind not in "iu":
            got = type(labels).__name__ if arr is None else f"{arr.dtype} values"
            raise InputError(
                f"labels must be one integer class per example, a 1-D integer tensor [{n}]; "
                f"got {got}"
            )
        y = torch.from_numpy(arr.astype(np.int64))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim != 1:
        raise InputError(
            f"labels must be one integer class per example, a 1-D integer tensor [{n}]; got "
            f"{y.dtype} of shape {tuple(y.shape)}"
        )
    if y.shape[0] != n:
        raise InputError(
            f"labels has {y.shape[0]} entries but inputs hold {n} examples; pass one label "
            "per input"
        )
    if min_classes > 1 and torch.unique(y).numel() < min_classes:
        raise InputError(
            f"labels hold {torch.unique(y).numel()} class(es); class statistics need at least "
            f"{min_classes}"
        )
    return y.long()


def check_reduce(reduce: Any) -> str:
    """``reduce`` as one of :data:`REDUCTIONS`, else InputError."""
    if reduce not in REDUCTIONS:
        raise InputError(f"reduce must be one of {format_choices(REDUCTIONS)}; got {reduce!r}")
    return reduce


def neuron_layer(model: HookedModel, site: Any, what: str) -> Address:
    """One layer-level ``neuron`` address of ``model`` (``neuron.1``, ``neuron.1.pre``)."""
    try:
        return layer_site(model, site, what, kinds=("neuron",))
    except AddressError as err:
        choices = [str(a) for a in model.addresses("neuron")]
        raise InputError(f"{what}: {err}; choose from {format_choices(choices)}") from err


def unit_axis(model: HookedModel, address: Address, ndim: int) -> int:
    """The (non-negative) axis of the units in the layer tensor of ``address``."""
    return model.adapter.unit_axis(address.slot) % ndim


def batches(
    model: HookedModel,
    prepared: Inputs,
    names: list[Address],
    batch_size: int,
    progress: bool | None,
    desc: str,
) -> Iterator[tuple[int, dict[str, Tensor], Tensor | None]]:
    """Run ``prepared`` in batches: ``(start, {address: float32 CPU activation}, mask)``."""
    from tqdm.auto import tqdm

    starts = range(0, prepared.batch, batch_size)
    show = progress if progress is not None else len(starts) > 1
    for start in tqdm(starts, desc=desc, disable=not show):
        chunk = prepared.rows(start, start + batch_size)
        _, cache = model.run_with_cache(chunk.tensor, names, **chunk.kwargs())
        acts = {str(a): cache[a].detach().float().cpu() for a in names}
        yield start, acts, None if chunk.mask is None else chunk.mask.cpu()


def unit_samples(
    act: Tensor, axis: int, mask: Tensor | None, reduce: str
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A layer tensor as samples x units: ``(matrix [s, p], example [s], position [s])``.

    ``[batch, p]``: one sample per input. Units on axis 1 of a longer tensor (conv maps):
    reduced over the trailing spatial axes by ``reduce``. Units last of ``[batch, pos, p]``:
    one sample per real position (``mask`` marks them); ``position`` is None otherwise.
    """
    batch = act.shape[0]
    rows = torch.arange(batch)
    if act.ndim == 2:
        return act, rows, None
    if axis == 1:
        dims = tuple(range(2, act.ndim))
        mat = act.mean(dims) if reduce == "mean" else act.amax(dims)
        return mat, rows, None
    if act.ndim == 3 and axis == 2:
        keep = torch.ones(act.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        example, position = keep.nonzero(as_tuple=True)
        return act[keep], example, position
    raise InputError(
        f"cannot read units from a tensor of shape {tuple(act.shape)} with units on axis {axis}"
    )


def kind_of(layer_ndim: int, axis: int) -> str:
    """What a unit's sample is: "features" (one per input), "spatial" (a reduced map) or
    "positions" (token / patch positions)."""
    if layer_ndim == 2:
        return "features"
    return "spatial" if axis == 1 else "positions"


# ------------------------------------------------------------- head arguments and grids


def _attention_model(model: Any, what: str) -> tuple[HookedModel, list[int]]:
    """``model`` as a HookedModel and the layers that have attention patterns."""
    hm = as_model(model)
    layers = sorted(a.layer for a in hm.addresses("head") if str(a).endswith(".pattern"))  # type: ignore[attr-defined]
    if not layers:
        sites = sorted({str(a).split(".")[0] for a in hm.addresses()})
        raise InputError(
            f"{what} needs a model with attention heads; this {hm.adapter.name} model has none "
            f"(its sites: {format_choices(sites)}). Use a transformer such as digits-vit or a "
            "language model"
        )
    return hm, layers


def _pick_layers(layers: Any, valid: list[int]) -> list[int]:
    if layers is None:
        return list(valid)
    items = [layers] if is_int(layers) else layers
    if isinstance(items, np.ndarray) and items.ndim == 1:
        items = items.tolist()
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, range)):
        raise InputError(f"layers must be None, a layer index or a list of them; got {layers!r}")
    bad = [x for x in items if not is_int(x) or int(x) not in valid]
    if bad or not items:
        raise InputError(
            f"layers {list(items) if not bad else bad} are not attention layers of this model; "
            f"choose from {valid}"
        )
    return sorted({int(x) for x in items})


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InputError(f"{name} must be one of {format_choices(choices)}; got {value!r}")
    return value


def _chunks(data: Inputs, size: int, progress: bool | None, desc: str) -> Iterator[Inputs]:
    """``data`` in slices of ``size`` rows, with a progress bar when there are several."""
    starts = range(0, data.batch, size)
    show = progress if progress is not None else len(starts) > 1
    for s in tqdm(starts, desc=desc, disable=not show):
        yield data.rows(s, s + size)


def _readout(chunk: Inputs, n_pos: int) -> Tensor:
    """Each row's readout position: CLS (0) for images, the last real token for tokens."""
    if not chunk.is_tokens:
        return torch.zeros(chunk.batch, dtype=torch.long)
    if chunk.last is None:
        return torch.full((chunk.batch,), n_pos - 1, dtype=torch.long)
    return chunk.last.long()


def _heatmap(ax: Any, grid: Tensor, title: str, layers: Sequence[int], cmap: str = "viridis"):
    im = ax.imshow(grid.numpy(), cmap=cmap, aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.figure.colorbar(im, ax=ax)
    return im


def _grid_frame(layers: Sequence[int], columns: dict[str, Tensor]) -> pd.DataFrame:
    """One row per head of ``[layer, head]`` grids."""
    n_heads = next(iter(columns.values())).shape[1]
    frame = {
        "layer": np.repeat(np.asarray(layers), n_heads),
        "head": np.tile(np.arange(n_heads), len(layers)),
    }
    for name, grid in columns.items():
        frame[name] = grid.reshape(-1).cpu().numpy()
    return pd.DataFrame(frame)
