"""PatchingResult: scores of a sweep over addresses (and positions), ranked, tabled, plotted.

One result type for activation patching, attribution patching and ablation, and one
function that shapes a sweep's scores (:func:`sweep_result`). A sweep over a selection
with a layer and a unit axis (``head.*.*``, ``neuron.*.*``) is a ``[layer, unit]`` grid
(plus ``pos`` when swept over positions). Layers of different widths (a CNN's 16 and 32
channels, an MLP's 64 and 32 hidden units) make it ragged: the grid is as wide as the widest
layer, cells past a layer's width are NaN, and :attr:`PatchingResult.widths` records each
layer's width. Padding cells are not jobs: ``flat``, :meth:`PatchingResult.top` and
:meth:`PatchingResult.to_pandas` never see them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hookscope.addresses import Address, Selection, parse
from hookscope.errors import InputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PatchingResult", "SweepLayout", "metric_name", "rank", "sweep_layout", "sweep_result"]

Job = tuple[Address, int | None]


def metric_name(metric: Any) -> str:
    """The name a result records for ``metric`` (a Metric's ``name``, a function's name)."""
    return getattr(metric, "name", getattr(metric, "__name__", "metric"))


def rank(values: Tensor) -> list[int]:
    """Indices of ``values`` from largest to smallest (ties in index order); NaN entries
    come last, in index order, after every number (``-inf`` included)."""
    nan = torch.isnan(values)
    order = torch.where(nan, float("-inf"), values).argsort(descending=True, stable=True)
    return torch.cat([order[~nan[order]], order[nan[order]]]).tolist()


@dataclass(frozen=True)
class SweepLayout:
    """Where the jobs of a sweep sit in its ``scores`` tensor.

    ``dims`` names the axes and ``shape`` their sizes; ``cells[i]`` is the index of job
    ``i`` in ``scores.reshape(-1)``. ``widths``: for a ``[layer, unit, ...]`` grid, the
    number of units of each row's layer (cells past it are padding); None otherwise.
    """

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    cells: tuple[int, ...]
    widths: tuple[int, ...] | None = None

    def place(self, flat: Tensor) -> Tensor:
        """Job-order values ``flat`` laid out in ``shape``; NaN in the padding cells."""
        out = torch.full(self.shape, math.nan, dtype=flat.dtype)
        out.view(-1)[torch.tensor(self.cells, dtype=torch.long)] = flat
        return out


def sweep_jobs(addresses: Sequence[Address], pos_list: Sequence[int | None]) -> list[Job]:
    """A sweep's jobs in order: every position of the first address, then the next."""
    return [(a, p) for a in addresses for p in pos_list]


def sweep_layout(
    sites: Any, addresses: Sequence[Address], pos_list: Sequence[int | None]
) -> SweepLayout:
    """The layout of a sweep over ``sites`` (resolved to ``addresses``) at ``pos_list``
    (``[None]``: all positions at once, no ``pos`` axis).

    A selection gets a ``layer`` axis when it spans several layers (or all of them) and a
    ``head``/``neuron`` axis when a layer holds several units (or the selection asks for
    all); a unit's column is its rank among the selected units of its layer. A list of
    sites is one ``site`` axis; one address has no axis.
    """
    item = parse(sites) if isinstance(sites, (str, Address, Selection)) else None
    if isinstance(item, Selection):
        rows: dict[int | None, int] = {}
        widths: list[int] = []
        at: list[tuple[int, int]] = []
        for address in addresses:
            row = rows.setdefault(address.layer_index, len(rows))
            if row == len(widths):
                widths.append(0)
            at.append((row, widths[row]))
            widths[row] += 1
        layer_axis = len(rows) > 1 or item.layers.is_all
        unit_axis = item.units is not None and (max(widths) > 1 or item.units.is_all)
        unit = "head" if item.kind == "head" else "neuron"
        dims = (["layer"] if layer_axis else []) + ([unit] if unit_axis else [])
        shape = ([len(rows)] if layer_axis else []) + ([max(widths)] if unit_axis else [])
        if layer_axis and unit_axis:
            base = [row * shape[1] + col for row, col in at]
        else:
            base = [row if layer_axis else col for row, col in at]
        grid_widths = tuple(widths) if layer_axis and unit_axis else None
    elif isinstance(item, Address):
        dims, shape, base, grid_widths = [], [], [0], None
    else:  # a list of sites
        dims, shape, grid_widths = ["site"], [len(addresses)], None
        base = list(range(len(addresses)))
    if list(pos_list) != [None]:
        n = len(pos_list)
        dims, shape = dims + ["pos"], shape + [n]
        cells = [b * n + i for b in base for i in range(n)]
    else:
        cells = base
    return SweepLayout(tuple(dims), tuple(shape), tuple(cells), grid_widths)


def sweep_result(
    sites: Any,
    addresses: Sequence[Address],
    pos_list: Sequence[int | None],
    flat: Tensor,
    metric: Any,
    method: str,
    direction: str,
    normalised: bool,
    baselines: dict[str, float],
    shortcuts_off: dict[str, str] | None = None,
) -> PatchingResult:
    """The :class:`PatchingResult` of a sweep: ``flat`` holds one value per job of
    :func:`sweep_jobs` ``(addresses, pos_list)``, laid out by :func:`sweep_layout`;
    ``shortcuts_off``: the speed shortcuts that could not run on the model, with why."""
    layout = sweep_layout(sites, addresses, pos_list)
    return PatchingResult(
        scores=layout.place(flat),
        dims=layout.dims,
        jobs=sweep_jobs(addresses, pos_list),
        flat=flat,
        method=method,
        direction=direction,
        metric=metric_name(metric),
        normalised=normalised,
        baselines=baselines,
        higher_is_better=getattr(metric, "higher_is_better", True),
        widths=layout.widths,
        cells=layout.cells,
        shortcuts_off=dict(shortcuts_off or {}),
    )


@dataclass
class PatchingResult:
    """Scores of a patching / attribution / ablation sweep.

    ``scores`` is shaped by the sweep (``dims`` names each axis, e.g. ``("layer", "head")``
    for ``head.*.*`` or ``("layer", "pos")`` for ``resid_pre.*`` swept over positions);
    ``flat`` holds the same numbers in job order, one per ``(address, position)`` of ``jobs``.
    ``widths``: for a ``[layer, unit]`` grid, each layer's number of units; when they
    differ (ragged layers) ``scores[i, widths[i]:]`` is NaN padding, which no job fills.
    ``cells[i]``: where job ``i`` sits in ``scores.reshape(-1)`` (None: job order).
    ``shortcuts_off``: speed shortcuts of the sweep that could not run on this model, each
    with why (e.g. ``{"onednn": ...}`` on a model accelerate dispatched); the scores are
    the same, the sweep was slower. Empty when nothing was turned off for the model.
    """

    scores: Tensor
    dims: tuple[str, ...]
    jobs: list[Job]
    flat: Tensor
    method: str = "activation_patching"
    direction: str = "denoise"
    metric: str = "metric"
    normalised: bool = True
    baselines: dict[str, float] = field(default_factory=dict)
    higher_is_better: bool = True
    widths: tuple[int, ...] | None = None
    cells: tuple[int, ...] | None = None
    shortcuts_off: dict[str, str] = field(default_factory=dict)

    @property
    def ragged(self) -> bool:
        """Whether the grid's layers differ in width (``scores`` then holds NaN padding)."""
        return self.widths is not None and len(set(self.widths)) > 1

    @property
    def effects(self) -> Tensor:
        """How much of the behaviour each job carries, in job order (larger = more important).

        Normalised denoising: the score (fraction restored). Normalised noising and ablation:
        ``1 - score`` (fraction destroyed). Raw scores: the change of the metric towards the
        clean value (denoising, from the ``corrupted`` baseline) or away from it (noising and
        ablation), signed by ``higher_is_better``.
        """
        if self.normalised:
            return self.flat if self.direction == "denoise" else 1.0 - self.flat
        sign = 1.0 if self.higher_is_better else -1.0
        if self.direction == "denoise":
            return sign * (self.flat - self.baselines["corrupted"])
        return sign * (self.baselines["clean"] - self.flat)

    @property
    def addresses(self) -> list[Address]:
        return list(dict.fromkeys(a for a, _ in self.jobs))

    @property
    def positions(self) -> list[int] | None:
        found = list(dict.fromkeys(p for _, p in self.jobs))
        return None if found == [None] else found  # type: ignore[return-value]

    def cell(self, i: int) -> int:
        """The index of job ``i`` in ``scores.reshape(-1)``."""
        return i if self.cells is None else self.cells[i]

    def grid(self, values: Tensor) -> Tensor:
        """Job-order ``values`` (e.g. :attr:`effects`) laid out like ``scores``, NaN in the
        padding cells of a ragged grid."""
        if self.cells is None:
            return values.reshape(self.scores.shape)
        layout = SweepLayout(self.dims, tuple(self.scores.shape), self.cells, self.widths)
        return layout.place(values)

    def top(self, k: int = 10) -> list[tuple[Address, int | None, float]]:
        """The ``k`` most important (address, position, score), ranked by :attr:`effects`.

        For denoising that is the highest score first; for noising and ablation the lowest
        (the sites whose patching destroys the most). Jobs whose score is NaN (the metric
        returned NaN on that patched run) are ranked last, after every number, so they
        appear only when ``k`` exceeds the jobs with a number. Padding cells of a ragged
        grid are not jobs and never appear.
        """
        order = rank(self.effects)[:k]
        return [(self.jobs[i][0], self.jobs[i][1], float(self.flat[i])) for i in order]

    def to_pandas(self):
        """One row per (address, position) with its score."""
        import pandas as pd

        return pd.DataFrame(
            {
                "address": [str(a) for a, _ in self.jobs],
                "position": [p for _, p in self.jobs],
                "score": self.flat.tolist(),
                "effect": self.effects.tolist(),
            }
        )

    def plot(self, ax: Axes | None = None, values: str = "score") -> Figure:
        """Heatmap of a 2-D sweep (bar chart for 1-D); returns the matplotlib Figure.

        ``values``: ``"score"`` (the sweep's scores) or ``"effect"`` (:attr:`effects`, so
        that important sites stand out in either direction). NaN cells (the padding of a
        ragged grid, or a NaN score) are masked and drawn grey, never as a zero score;
        rows of a ``layer`` axis are labelled with their layer.
        """
        import matplotlib
        import numpy as np

        from hookscope.plot import figure

        if values not in ("score", "effect"):
            raise InputError(f"values must be one of score, effect, got {values!r}")
        fig = ax.figure if ax is not None else figure(figsize=(7, 4.5))
        ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
        data = self.scores if values == "score" else self.grid(self.effects)
        data = data.detach().double().cpu()
        title = f"{self.method} ({self.direction}, {self.metric}{', normalised' if self.normalised else ''})"
        if data.ndim >= 2:
            data = data.reshape(data.shape[0], -1)
            finite = data[torch.isfinite(data)]
            lim = (float(finite.abs().max()) if finite.numel() else 0.0) or 1.0
            cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.8")
            image = ax.imshow(
                np.ma.masked_invalid(data.numpy()), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto"
            )
            ax.set_ylabel(self.dims[0])
            xlabel = " x ".join(self.dims[1:])
            ax.set_xlabel(xlabel + (" (grey: past the layer's width)" if self.ragged else ""))
            rows, cols = data.shape
            ticks = range(0, rows, max(1, rows // 24))
            if self.dims[0] == "layer":
                layer_of = {
                    self.cell(i) // cols: a.layer_index for i, (a, _) in enumerate(self.jobs)
                }
                ax.set_yticks(ticks, [str(layer_of.get(r, r)) for r in ticks])
            else:
                ax.set_yticks(ticks)
            ax.set_xticks(range(0, cols, max(1, cols // 32)))
            fig.colorbar(image, ax=ax, label=values)
        else:
            bars = data.reshape(-1).numpy()
            ax.bar(range(len(bars)), bars)
            ax.set_xticks(
                range(len(bars)),
                [str(a) if p is None else f"{a}@{p}" for a, p in self.jobs],
                rotation=90,
            )
            ax.set_ylabel(values)
        ax.set_title(title)
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        head = (
            f"PatchingResult({self.method}, {self.direction}, metric {self.metric}"
            f"{' normalised' if self.normalised else ''}; scores {tuple(self.scores.shape)} over {self.dims})"
        )
        lines = [head]
        if self.ragged:
            lines.append(
                f"  ragged layers: widths {list(self.widths)}; "  # type: ignore[arg-type]
                "scores past a layer's width are NaN padding"
            )
        for name, why in self.shortcuts_off.items():
            lines.append(f"  shortcut off: {name} ({why})")
        n_nan = int(torch.isnan(self.flat).sum())
        if n_nan:
            lines.append(f"  {n_nan} of {len(self.jobs)} jobs scored NaN (ranked last)")
        lines.append(f"  {'rank':<5}{'address':<24}{'position':<10}score")
        for rank_, (address, pos, score) in enumerate(self.top(10), 1):
            lines.append(
                f"  {rank_:<5}{str(address):<24}{'all' if pos is None else pos!s:<10}{score:+.4f}"
            )
        return "\n".join(lines)
