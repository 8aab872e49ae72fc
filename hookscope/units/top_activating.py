"""The inputs (or token positions) where one unit activates most: :func:`top_activating`.

Sites and samples follow :mod:`hookscope.units._common`, except that a conv unit's map is
reduced by ``"max"`` by default here. Token contexts come from each top input's whole
sequence, padding excluded, shown as text, HTML or (without a tokenizer) ``<id>``.
"""

from __future__ import annotations

import html as html_lib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hookscope.addresses import Address, MLPNeuron
from hookscope.attribution._common import as_model, prepare_inputs
from hookscope.errors import AddressError, InputError, format_choices
from hookscope.model import HookedModel
from hookscope.modes import in_eval_mode

from ._common import batches, check_reduce, kind_of, positive_int, unit_axis

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["TopActivating", "top_activating"]


def nonnegative_int(value: Any, name: str) -> int:
    """``value`` as an int >= 0, else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name} must be an integer >= 0; got {value!r}")
    return int(value)


def neuron_unit(model: HookedModel, site: Any, what: str) -> MLPNeuron:
    """One unit address (``neuron.1.7``); a layer, a selection or an index out of range
    raises InputError naming the valid units."""
    layers = [str(a) for a in model.addresses("neuron")]
    try:
        found = model.resolve(site) if isinstance(site, (str, Address)) else None
    except AddressError as err:
        raise InputError(f"{what}: {err}; layers: {format_choices(layers)}") from err
    if not found or len(found) != 1 or not isinstance(found[0], MLPNeuron):
        raise InputError(
            f"{what} needs one unit address such as 'neuron.1.7'; got {site!r}. Neuron layers: "
            f"{format_choices(layers)}"
        )
    unit = found[0]
    if unit.neuron is None:
        n = model.adapter.n_neurons(unit.layer, unit.site)
        suffix = ".pre" if unit.site == "pre" else ""
        raise InputError(
            f"{what} needs one unit, but {site!r} is the whole layer; pick a unit "
            f"neuron.{unit.layer}.I{suffix} with I in 0..{n - 1}"
        )
    return unit


def display_image(image: Tensor) -> np.ndarray:
    """One input as an image to draw: ``[C, H, W]`` with 1 channel as ``[H, W]``, 3 or 4
    as ``[H, W, C]``, min-max scaled to [0, 1] over the whole image (a constant image: 0)."""
    img = image.detach().double().cpu().numpy()
    if img.ndim == 3 and img.shape[0] in (1, 3, 4):
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    lo, hi = np.nanmin(img), np.nanmax(img)
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


@dataclass(frozen=True, repr=False, eq=False)
class TopActivating:
    """The ``k`` samples where one unit is largest, in descending order.

    ``values`` [k]; ``indices`` [k] (input rows); ``positions`` [k] (token / patch position)
    for sequence models, else None; ``locations`` [k, 2] (row, col of the map's maximum) for
    conv units, else None. ``inputs`` [k, ...]: the top inputs (images / features; token ids
    for language models). ``unit_values`` [k, pos]: the unit at every position of each top
    input's sequence (NaN on padding), for the token contexts; else None. ``tokens``: each
    top input's tokens as strings, padding included (language models), else None. ``map_shape``: the conv
    unit's map (H, W), else None.
    """

    site: str
    kind: str
    reduce: str | None
    values: Tensor
    indices: Tensor
    positions: Tensor | None
    locations: Tensor | None
    inputs: Tensor
    unit_values: Tensor | None
    tokens: list[list[str]] | None
    map_shape: tuple[int, int] | None = None

    @property
    def k(self) -> int:
        return self.values.numel()

    def to_pandas(self) -> pd.DataFrame:
        """One row per example: rank, index, value; row/col (conv), position/token/context
        (language models)."""
        df = pd.DataFrame(
            {"rank": np.arange(self.k), "index": self.indices.numpy(), "value": self.values.numpy()}
        )
        if self.locations is not None:
            df["row"] = self.locations[:, 0].numpy()
            df["col"] = self.locations[:, 1].numpy()
        if self.positions is not None:
            df["position"] = self.positions.numpy()
        if self.tokens is not None:
            df["token"] = [self.tokens[r][int(p)] for r, p in enumerate(self.positions)]
            df["context"] = self.contexts(window=5)
        return df

    def __repr__(self) -> str:
        what = f", spatial {self.reduce}" if self.kind == "spatial" else ""
        return f"TopActivating({self.site}, k={self.k}{what})\n" + self.to_pandas().head(
            20
        ).to_string(index=False, float_format="{:.4f}".format)

    def _need_tokens(self, what: str) -> list[list[str]]:
        if self.tokens is None:
            raise InputError(f"{what} is for token inputs (language models); use .plot()")
        return self.tokens

    def _window(self, rank: int, window: int) -> list[int]:
        """The real positions within ``window`` of example ``rank``'s position."""
        real = ~torch.isnan(self.unit_values[rank])  # type: ignore[index]
        p = int(self.positions[rank])  # type: ignore[index]
        span = range(max(0, p - window), min(real.numel(), p + window + 1))
        return [i for i in span if bool(real[i])]

    def contexts(self, window: int = 8) -> list[str]:
        """Each example's ``window`` tokens on either side of its position, the activating
        token marked ``[[token]]`` (newlines shown as ``\\n``)."""
        tokens = self._need_tokens("contexts()")
        window = nonnegative_int(window, "window")
        out = []
        for r in range(self.k):
            p = int(self.positions[r])  # type: ignore[index]
            parts = [
                f"[[{tokens[r][i]}]]" if i == p else tokens[r][i] for i in self._window(r, window)
            ]
            out.append("".join(parts).replace("\n", "\\n"))
        return out

    def text(self, window: int = 8) -> str:
        """A title line, then one line per example: rank, value, ``#input@position`` and its
        context (:meth:`contexts`)."""
        contexts = self.contexts(window)
        lines = [f"{self.site} top {self.k}"]
        for r, ctx in enumerate(contexts):
            where = f"#{int(self.indices[r])}@{int(self.positions[r])}"  # type: ignore[index]
            lines.append(f"{r:>3} {float(self.values[r]):9.4f}  {where}: {ctx}")
        return "\n".join(lines)

    def token_opacity(self, rank: int) -> np.ndarray:
        """The highlight opacity of every token of example ``rank`` in :meth:`html`:
        ``clip(activation / values[0], -1, 1)`` (the top value is 1; negative is blue)."""
        self._need_tokens("token_opacity()")
        top = float(self.values[0])
        scale = top if top > 0 else 1.0
        vals = self.unit_values[rank].double().numpy()  # type: ignore[index]
        return np.clip(np.nan_to_num(vals / scale), -1.0, 1.0)

    def html(self, window: int = 8) -> str:
        """The contexts as HTML: each token's background opacity is proportional to the
        activation (:meth:`token_opacity`; red positive, blue negative), the activating token
        outlined, token text HTML-escaped, the value in each token's tooltip."""
        tokens = self._need_tokens("html()")
        window = nonnegative_int(window, "window")
        rows = []
        for r in range(self.k):
            p = int(self.positions[r])  # type: ignore[index]
            opacity = self.token_opacity(r)
            spans = []
            for i in self._window(r, window):
                o = float(opacity[i])
                colour = f"rgba(214,39,40,{o:.3f})" if o >= 0 else f"rgba(31,119,180,{-o:.3f})"
                outline = "outline:2px solid black;" if i == p else ""
                value = float(self.unit_values[r, i])  # type: ignore[index]
                spans.append(
                    f'<span class="tok" style="background:{colour};{outline}" '
                    f'title="{value:.4f}">{html_lib.escape(tokens[r][i])}</span>'
                )
            rows.append(
                f'<div class="ctx"><span class="val">{float(self.values[r]):.4f} '
                f"#{int(self.indices[r])}@{p}</span> " + "".join(spans) + "</div>"
            )
        head = (
            "<style>.hs-top .tok{white-space:pre;font-family:monospace}"
            ".hs-top .val{color:#555;font-size:80%;margin-right:1em}</style>"
        )
        title = f"<b>{html_lib.escape(self.site)}</b> top {self.k}"
        return f'<div class="hs-top">{head}{title}' + "".join(rows) + "</div>"

    def _repr_html_(self) -> str:
        return (
            self.html()
            if self.tokens is not None
            else "<pre>" + html_lib.escape(repr(self)) + "</pre>"
        )

    def plot(self, columns: int = 5) -> Figure:
        """Image grid of the top inputs (:func:`display_image`: each min-max scaled to
        [0, 1], so standardised inputs show unclipped), titled with the value, the
        conv unit's location marked by its cell of the map; features: one row per input;
        tokens: the values as bars labelled with the activating token."""
        from hookscope.plot import figure

        columns = positive_int(columns, "columns")
        if self.kind != "positions" and self.inputs.ndim >= 3:
            rows = math.ceil(self.k / columns)
            fig = figure(figsize=(1.6 * min(columns, self.k), 1.8 * rows))
            axes = np.atleast_1d(fig.subplots(rows, min(columns, self.k))).reshape(-1)
            for r, ax in enumerate(axes):
                ax.axis("off")
                if r >= self.k:
                    continue
                img = display_image(self.inputs[r])
                ax.imshow(
                    img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1,
                    interpolation="nearest",
                )  # fmt: skip
                ax.set_title(f"#{int(self.indices[r])}: {float(self.values[r]):.3g}", fontsize=7)
                if self.locations is not None and self.map_shape is not None:
                    from matplotlib.patches import Rectangle

                    sy = img.shape[0] / self.map_shape[0]
                    sx = img.shape[1] / self.map_shape[1]
                    row, col = self.locations[r].tolist()
                    ax.add_patch(
                        Rectangle(
                            (col * sx - 0.5, row * sy - 0.5), sx, sy, fill=False, ec="red", lw=1
                        )
                    )
            fig.suptitle(f"{self.site}: top {self.k}", fontsize=9)
            fig.tight_layout()
            return fig
        fig = figure(figsize=(6, max(2.5, 0.25 * self.k + 1)))
        ax = fig.subplots()
        if self.tokens is not None:
            names = [
                f"{self.tokens[r][int(p)]!r} #{int(self.indices[r])}@{int(p)}"
                for r, p in enumerate(self.positions)  # type: ignore[arg-type]
            ]
            ax.barh(range(self.k), self.values.numpy())
            ax.set_yticks(range(self.k), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("activation")
        else:
            flat = self.inputs.reshape(self.k, -1).double().numpy()
            ax.imshow(flat, aspect="auto", interpolation="nearest", cmap="viridis")
            ax.set_yticks(range(self.k), [f"#{int(i)}" for i in self.indices], fontsize=7)
            ax.set_xlabel("input feature")
        ax.set_title(f"{self.site}: top {self.k}", fontsize=9)
        fig.tight_layout()
        return fig


@in_eval_mode
def top_activating(
    model: Any,
    inputs: Any,
    *,
    site: Any,
    k: int = 20,
    reduce: str = "max",
    batch_size: int = 256,
    progress: bool | None = None,
) -> TopActivating:
    """The ``k`` inputs (or token positions) where one unit activates most.

    ``site``: one unit, ``neuron.1.7`` (conv channel 7 of layer 1, an MLP unit, or MLP
    neuron 7 of a transformer block). A conv unit's value per input is its map reduced by
    ``reduce`` ("max", default, or "mean"); ``locations`` is where the map peaks either way.
    Sequence models rank (input, position) pairs over real positions. Fewer than ``k``
    samples: all of them. Ties keep input order.

    >>> top = units.top_activating(lm, texts, site="neuron.2.187", k=20)  # doctest: +SKIP
    >>> print(top.text()); top.html()                                     # doctest: +SKIP
    """
    m = as_model(model)
    unit = neuron_unit(m, site, "top_activating")
    k = positive_int(k, "k")
    reduce = check_reduce(reduce)
    batch_size = positive_int(batch_size, "batch_size")
    prepared = prepare_inputs(m, inputs)
    layer = MLPNeuron(unit.layer, None, unit.site)
    best_v = torch.zeros(0)
    best_i = torch.zeros(0, dtype=torch.long)
    best_p = torch.zeros(0, dtype=torch.long)
    best_loc = torch.zeros(0, 2, dtype=torch.long)
    kind, map_shape = "features", None
    per_input: list[Tensor] = []
    for start, acts, mask in batches(m, prepared, [unit], batch_size, progress, "top activating"):
        act = acts[str(unit)]  # the layer tensor with the unit axis removed
        axis = unit_axis(m, layer, act.ndim + 1)
        kind = kind_of(act.ndim + 1, axis)
        rows = torch.arange(act.shape[0]) + start
        pos = torch.zeros_like(rows)
        loc = torch.zeros(act.shape[0], 2, dtype=torch.long)
        if kind == "features":
            vals = act
        elif kind == "spatial":
            if act.ndim != 3:
                raise InputError(f"{unit}: expected a 2-D map per input, got {tuple(act.shape)}")
            map_shape = (act.shape[1], act.shape[2])
            flat = act.reshape(act.shape[0], -1)
            arg = flat.argmax(1)
            loc = torch.stack([arg // act.shape[2], arg % act.shape[2]], 1)
            vals = flat.amax(1) if reduce == "max" else flat.mean(1)
        else:
            keep = torch.ones(act.shape, dtype=torch.bool) if mask is None else mask.bool()
            per_input.append(torch.where(keep, act, torch.full_like(act, float("nan"))))
            r, pos = keep.nonzero(as_tuple=True)
            vals, rows = act[keep], r + start
            loc = torch.zeros(vals.shape[0], 2, dtype=torch.long)
        cand_v = torch.cat([best_v, vals])
        order = torch.sort(cand_v, descending=True, stable=True).indices[:k]
        best_v = cand_v[order]
        best_i = torch.cat([best_i, rows])[order]
        best_p = torch.cat([best_p, pos])[order]
        best_loc = torch.cat([best_loc, loc])[order]
    source = prepared.tensor[best_i.to(prepared.tensor.device)].detach().cpu()
    unit_values = tokens = None
    if kind == "positions" and prepared.is_tokens:
        unit_values = torch.cat(per_input)[best_i]  # one padded width for all batches
        tokens = [token_strings(m, row) for row in source]
    return TopActivating(
        site=str(unit),
        kind=kind,
        reduce=reduce if kind == "spatial" else None,
        values=best_v,
        indices=best_i,
        positions=best_p if kind == "positions" else None,
        locations=best_loc if kind == "spatial" else None,
        inputs=source,
        unit_values=unit_values,
        tokens=tokens,
        map_shape=map_shape,
    )


def token_strings(model: HookedModel, ids: Tensor) -> list[str]:
    """Each id as its text (the tokenizer's decoding), or ``<id>`` without a tokenizer."""
    if model.tokenizer is None:
        return [f"<{i}>" for i in ids.tolist()]
    return model.to_str_tokens(ids)
