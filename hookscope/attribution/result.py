"""The result of an attribution method: the values, their conventions, and the views of them
(a long table, a text summary, overlays on the images, tokens coloured by value)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope.attribution.tokens import token_html, token_text
from hookscope.errors import InputError

__all__ = ["Attributions", "plot"]


@dataclass(repr=False)
class Attributions:
    """Attribution values of one method on a batch.

    ``values``: for image inputs ``[batch, *input_shape]`` (saliency, integrated gradients) or
    ``[batch, H, W]`` (Grad-CAM at the input resolution; ``[batch, n_classes, H, W]`` with
    ``target="all"``); for token inputs ``[batch, pos]`` (one value per token, padding 0).
    ``raw``: the values before the per-token reduction or the upsampling (Grad-CAM: the map
    at the site's resolution). ``delta``: integrated gradients' completeness gap per example,
    ``sum(attributions) - (F(x) - F(baseline))``. ``conventions``: every setting that changes
    the numbers (ReLU, normalisation, baseline, steps, ...). ``tokens``: each row's token
    strings (language models). ``targets``: the class index per example (None for a
    callable target or ``"all"``).
    """

    method: str
    values: Tensor
    site: str
    targets: Tensor | None
    conventions: dict[str, Any] = field(default_factory=dict)
    raw: Tensor | None = None
    delta: Tensor | None = None
    tokens: list[list[str]] | None = None

    @property
    def attributions(self) -> Tensor:
        """The values (captum's name for them)."""
        return self.values

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __len__(self) -> int:
        return self.values.shape[0]

    def __repr__(self) -> str:
        conv = ", ".join(f"{k}={v}" for k, v in self.conventions.items())
        lines = [
            f"Attributions({self.method} at {self.site}, {len(self)} examples, "
            f"values {list(self.values.shape)}; {conv})"
        ]
        flat = self.values.reshape(len(self), -1).double()
        for i in range(min(len(self), 5)):
            target = "" if self.targets is None else f" target {int(self.targets[i])}"
            line = (
                f"  example {i}{target}: sum {float(flat[i].sum()):+.4g}, "
                f"max |v| {float(flat[i].abs().max()):.4g}"
            )
            if self.delta is not None:
                line += f", delta {float(self.delta[i]):+.2e}"
            if self.tokens is not None:
                top = int(flat[i].abs().argmax())
                line += f", top token {self.tokens[i][top]!r}"
            lines.append(line)
        if len(self) > 5:
            lines.append(f"  ... {len(self) - 5} more")
        return "\n".join(lines)

    def to_pandas(self):
        """A long table: one row per example and value (``example``, ``target``, the index
        columns of the value - ``token``/``position``, or ``class``/``row``/``col`` - and
        ``value``); ``delta`` per example when there is one."""
        import pandas as pd

        v = self.values.detach().cpu().double().numpy()
        if self.tokens is not None:
            names = ["position"]
        elif self.method == "grad_cam":
            names = (["class"] if v.ndim == 4 else []) + ["row", "col"]
        else:
            names = [f"dim{i}" for i in range(1, v.ndim)]
        grids = np.meshgrid(*[np.arange(s) for s in v.shape], indexing="ij")
        frame = {"example": grids[0].ravel()}
        if self.targets is not None:
            frame["target"] = self.targets.cpu().numpy()[grids[0].ravel()]
        for name, grid in zip(names, grids[1:], strict=True):
            frame[name] = grid.ravel()
        if self.tokens is not None:
            width = v.shape[1]
            padded = [row + [""] * (width - len(row)) for row in self.tokens]
            frame["token"] = [
                padded[e][p] for e, p in zip(grids[0].ravel(), grids[1].ravel(), strict=True)
            ]
        frame["value"] = v.ravel()
        if self.delta is not None:
            frame["delta"] = self.delta.cpu().double().numpy()[grids[0].ravel()]
        out = pd.DataFrame(frame)
        if self.tokens is not None:  # drop padding
            lengths = np.array([len(r) for r in self.tokens])
            out = out[out["position"].to_numpy() < lengths[out["example"].to_numpy()]]
        return out.reset_index(drop=True)

    # ---------------------------------------------------------------- tokens
    def _check_tokens(self) -> None:
        if self.tokens is None:
            raise InputError(
                f"{self.method} values are over an image or features, not tokens; text() and "
                "html() are for token inputs (use plot() for images)"
            )

    def _rows(self, example: int | None) -> range | list[int]:
        if example is None:
            return range(len(self))
        if (
            isinstance(example, bool)
            or not isinstance(example, int)
            or not 0 <= example < len(self)
        ):
            raise InputError(f"example must be an index in 0..{len(self) - 1}, got {example!r}")
        return [example]

    def text(self, example: int | None = None) -> str:
        """Each token with its value, one line per example (``example``: just that one)."""
        self._check_tokens()
        rows = self._rows(example)
        return "\n".join(
            token_text(self.tokens[i], self.values[i, : len(self.tokens[i])].tolist()) for i in rows
        )

    def html(self, example: int | None = None) -> str:
        """Tokens coloured by value (red positive, blue negative; one scale for all rows)."""
        self._check_tokens()
        rows = self._rows(example)
        scale = float(self.values.abs().max()) or 1.0
        parts = []
        for i in rows:
            title = None if self.targets is None else f"example {i}, target {int(self.targets[i])}"
            values = self.values[i, : len(self.tokens[i])].tolist()
            parts.append(token_html(self.tokens[i], values, scale=scale, title=title))
        return "\n".join(parts)

    def _repr_html_(self) -> str | None:
        return self.html() if self.tokens is not None else None

    # ---------------------------------------------------------------- figures
    def plot(self, images: Tensor | None = None, *, n: int = 8, alpha: float = 0.5):
        """The values as a figure (see :func:`plot`)."""
        return plot(self, images, n=n, alpha=alpha)


def _image(x: Tensor) -> np.ndarray:
    """An image [C, H, W] / [H, W] as [H, W] (mean over channels) or [H, W, 3]."""
    x = x.detach().cpu().double()
    if x.ndim == 3 and x.shape[0] == 3:
        x = x.permute(1, 2, 0)
        lo, hi = x.min(), x.max()
        return ((x - lo) / (hi - lo if hi > lo else 1)).numpy()
    if x.ndim == 3:
        x = x.mean(0)
    return x.numpy()


def plot(result: Attributions, images: Tensor | None = None, *, n: int = 8, alpha: float = 0.5):
    """A figure of ``result``'s first ``n`` examples.

    Image attributions: one column per example; with ``images`` the top row shows the image
    and the next the map drawn over it (``alpha``), else the map alone; a map per class
    with ``target="all"``. Maps that are not image-shaped (an MLP's features) are drawn as
    they are shaped (a vector as a row). Token attributions: one row per example, tokens
    coloured by value. The first image of each map axes holds the values drawn
    (``ax.images[-1].get_array()``).
    """
    from hookscope.plot import figure

    if not isinstance(result, Attributions):
        raise InputError(
            f"plot takes an Attributions (from grad_cam, saliency, integrated_gradients), got "
            f"{type(result).__name__}"
        )
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive number of examples, got {n!r}")
    count = min(n, len(result))
    values = result.values.detach().cpu().double()
    if result.tokens is not None:
        return _plot_tokens(result, values[:count])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images is not None:
        if not isinstance(images, Tensor) or images.shape[0] < count:
            raise InputError(
                f"images must be a tensor with at least {count} rows (the examples drawn), got "
                f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
            )
    per_class = result.method == "grad_cam" and values.ndim == 4
    maps = values[:count]
    if not per_class and maps.ndim == 4:  # [n, C, H, W] input attributions: sum channels
        maps = maps.sum(1)
    if maps.ndim == 2:  # features: one row each
        maps = maps.unsqueeze(1)
    rows = (maps.shape[1] if per_class else 1) + (images is not None)
    fig = figure(figsize=(1.6 * count + 0.6, 1.6 * rows + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, count, squeeze=False))
    vmax = float(maps.abs().max()) or 1.0
    signed = bool((maps < 0).any())
    cmap, vmin = ("RdBu_r", -vmax) if signed else ("inferno", 0.0)
    for j in range(count):
        r = 0
        if images is not None:
            axes[0, j].imshow(_image(images[j]), cmap="gray")
            axes[0, j].set_title(
                f"#{j}" if result.targets is None else f"#{j} t={int(result.targets[j])}",
                fontsize=8,
            )
            r = 1
        layers = [maps[j, c] for c in range(maps.shape[1])] if per_class else [maps[j]]
        for c, m in enumerate(layers):
            ax = axes[r + c, j]
            if images is not None and m.shape == _image(images[j]).shape[:2]:
                ax.imshow(_image(images[j]), cmap="gray")
                ax.imshow(m.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha)
            else:
                ax.imshow(m.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            if per_class and j == 0:
                ax.set_ylabel(f"class {c}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{result.method} at {result.site}", fontsize=9)
    return fig


def _plot_tokens(result: Attributions, values: Tensor):
    from hookscope.plot import figure

    count = values.shape[0]
    width = max(len(t) for t in result.tokens[:count])
    fig = figure(figsize=(min(0.7 * width + 1, 16), 0.8 * count + 0.6), layout="constrained")
    ax = fig.subplots()
    grid = np.full((count, width), np.nan)
    for i in range(count):
        k = len(result.tokens[i])
        grid[i, :k] = values[i, :k].numpy()
    vmax = float(np.nanmax(np.abs(grid))) or 1.0
    ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    for i in range(count):
        for p, tok in enumerate(result.tokens[i]):
            ax.text(p, i, tok.replace("\n", "\\n"), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(count))
    ax.set_yticklabels([f"#{i}" for i in range(count)])
    ax.set_xticks([])
    ax.set_title(f"{result.method} at {result.site}", fontsize=9)
    return fig
