"""Effective receptive field of a CNN unit (Luo et al. 2016): :func:`receptive_field`.

The map is ``mean over inputs of |d unit[row, col] / d input|``, summed over input channels,
an ``[H, W]`` map at the input resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hookscope.addresses import Address, MLPNeuron
from hookscope.attribution._common import as_model, prepare_inputs
from hookscope.errors import AddressError, InputError, format_choices
from hookscope.modes import in_eval_mode

from ._common import positive_int, unit_axis

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ReceptiveField", "receptive_field"]


@dataclass(frozen=True, repr=False, eq=False)
class ReceptiveField:
    """Effective receptive field of one CNN unit (or all channels of a layer) at one
    position of its map. ``site``: the unit (``neuron.1.7``) or the layer when ``unit`` is
    None.

    ``map`` [H, W] (float64, input resolution): mean over the inputs of the absolute
    gradient of ``unit[row, col]`` w.r.t. each input pixel, summed over input channels.
    ``unit`` None means the sum of all channels at that position. ``map_shape``: the
    unit's map (h, w); ``position``: (row, col) in it.
    """

    site: str
    unit: int | None
    position: tuple[int, int]
    map_shape: tuple[int, int]
    map: Tensor
    n_inputs: int

    def support(self, rel: float = 1e-6) -> tuple[range, range]:
        """Rows and columns of the smallest box holding every pixel with ``map >= rel *
        max``; empty ranges when the map is zero."""
        peak = float(self.map.max())
        if peak <= 0:
            return range(0), range(0)
        rows, cols = (self.map >= rel * peak).nonzero(as_tuple=True)
        return (
            range(int(rows.min()), int(rows.max()) + 1),
            range(int(cols.min()), int(cols.max()) + 1),
        )

    def to_numpy(self) -> np.ndarray:
        """The map [H, W] as a numpy array."""
        return self.map.numpy().copy()

    def __repr__(self) -> str:
        rows, cols = self.support()
        h, w = self.map.shape
        peak = divmod(int(self.map.argmax()), w)
        box = (
            f"rows {rows.start}-{rows.stop - 1}, cols {cols.start}-{cols.stop - 1} "
            f"({len(rows)}x{len(cols)})"
            if len(rows)
            else "empty (zero gradient)"
        )
        return (
            f"ReceptiveField({self.site} at {self.position} of its {self.map_shape[0]}x"
            f"{self.map_shape[1]} map, {self.n_inputs} inputs)\n  input {h}x{w}, support "
            f"{box}, peak {peak}, max {float(self.map.max()):.4g}"
        )

    def plot(self) -> Figure:
        """The map as a heatmap over the input, the unit's position marked (a cross at the
        centre of its cell scaled to the input)."""
        from hookscope.plot import figure

        fig = figure(figsize=(4.2, 3.6))
        ax = fig.subplots()
        image = ax.imshow(self.map.numpy(), cmap="magma", interpolation="nearest")
        h, w = self.map.shape
        sy, sx = h / self.map_shape[0], w / self.map_shape[1]
        row, col = self.position
        ax.plot([(col + 0.5) * sx - 0.5], [(row + 0.5) * sy - 0.5], "c+", ms=10)
        what = f"{self.site} (all channels)" if self.unit is None else self.site
        ax.set_title(f"ERF of {what} at {self.position}", fontsize=9)
        fig.colorbar(image, ax=ax, label="mean |gradient|")
        fig.tight_layout()
        return fig


@in_eval_mode
def receptive_field(
    model: Any,
    inputs: Any,
    *,
    site: Any,
    unit: int | None = None,
    position: tuple[int, int] | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
) -> ReceptiveField:
    """Effective receptive field of a conv unit (Luo et al. 2016).

    ``site``: a conv unit (``neuron.1.7``) or a conv layer (``neuron.1``) with ``unit=7``;
    a layer with ``unit=None`` takes the sum of all its channels. ``position``: (row, col)
    in the unit's map, default its centre ``(h // 2, w // 2)``. ``inputs``: images
    ``[batch, C, H, W]``. The map is ``mean_n |d a[n, unit, row, col] / d x[n]|`` summed
    over input channels (the model should be in eval mode: batch-norm in training mode
    mixes the examples of a batch).
    """
    m = as_model(model)
    prepared = prepare_inputs(m, inputs)
    if prepared.is_tokens or prepared.tensor.ndim != 4:
        raise InputError(
            "receptive_field needs image inputs [batch, C, H, W]; got "
            f"{'token ids' if prepared.is_tokens else tuple(prepared.tensor.shape)}"
        )
    batch_size = positive_int(batch_size, "batch_size")
    layers = m.addresses("neuron")
    _, probe = m.run_with_cache(prepared.tensor[:1], layers)
    conv = [str(a) for a in layers if probe[a].ndim == 4 and unit_axis(m, a, 4) == 1]
    try:
        found = m.resolve(site) if isinstance(site, (str, Address)) else []
    except AddressError as err:
        raise InputError(f"receptive_field: {err}; conv sites: {format_choices(conv)}") from err
    if len(found) != 1 or not isinstance(found[0], MLPNeuron):
        raise InputError(
            f"receptive_field needs one conv site (a layer or one unit); got {site!r}. Conv "
            f"sites: {format_choices(conv) if conv else 'none (this model has no conv layer)'}"
        )
    address = found[0]
    layer = MLPNeuron(address.layer, None, address.site)
    if str(layer) not in conv:
        raise InputError(
            f"receptive_field is for conv layers; {layer} is not one (its tensor has shape "
            f"{tuple(probe[layer].shape)}). Conv sites: "
            f"{format_choices(conv) if conv else 'none (this model has no conv layer)'}"
        )
    channels, h, w = probe[layer].shape[1:]
    if address.neuron is not None:
        if unit is not None and unit != address.neuron:
            raise InputError(f"site {address} names unit {address.neuron} but unit={unit!r}")
        unit = address.neuron
    if unit is not None and (
        isinstance(unit, bool)
        or not isinstance(unit, (int, np.integer))
        or not 0 <= unit < channels
    ):
        raise InputError(f"unit must be a channel index 0..{channels - 1} of {layer}; got {unit!r}")
    if position is None:
        position = (h // 2, w // 2)
    if (
        not isinstance(position, (tuple, list))
        or len(position) != 2
        or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in position)
        or not (0 <= position[0] < h and 0 <= position[1] < w)
    ):
        raise InputError(
            f"position must be (row, col) in the {h}x{w} map of {layer} (rows 0..{h - 1}, "
            f"cols 0..{w - 1}); got {position!r}"
        )
    row, col = int(position[0]), int(position[1])
    total = torch.zeros(prepared.tensor.shape[2:], dtype=torch.float64)
    from tqdm.auto import tqdm

    starts = range(0, prepared.batch, batch_size)
    show = progress if progress is not None else len(starts) > 1
    for start in tqdm(starts, desc="receptive field", disable=not show):
        x = prepared.tensor[start : start + batch_size].detach().clone().requires_grad_(True)
        seen: dict[str, Tensor] = {}

        def keep(act: Tensor, _address: Address, seen: dict[str, Tensor] = seen) -> None:
            seen["act"] = act

        with torch.enable_grad():
            m.run_with_hooks(x, [(layer, keep)])
            act = seen["act"]
            value = act[:, :, row, col].sum(1) if unit is None else act[:, int(unit), row, col]
            (grad,) = torch.autograd.grad(value.sum(), x)
        total += grad.detach().abs().sum(1).sum(0).double().cpu()
    return ReceptiveField(
        site=str(layer if unit is None else MLPNeuron(layer.layer, int(unit), layer.site)),
        unit=None if unit is None else int(unit),
        position=(row, col),
        map_shape=(int(h), int(w)),
        map=total / prepared.batch,
        n_inputs=prepared.batch,
    )
