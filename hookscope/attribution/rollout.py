"""The result of attention rollout and attention flow (:mod:`.attention`): each example's
query row over the tokens, its views (``.cls`` / ``.grid`` for images, ``.last`` for
texts), a long table and a figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from jaxtyping import Float
from torch import Tensor

from hookscope.errors import InputError

__all__ = ["Rollout"]


@dataclass
class Rollout:
    """Attention rollout or flow of a batch: how much each input token reaches the query
    token (CLS for images, the last real token for texts) through the chosen layers.

    * ``row`` [batch, n]: the query row over every input token (CLS included; 0 on padding);
    * ``matrix`` [batch, n, n]: the full rollout (``None`` for flow);
    * ``query`` [batch]: the query position of each example; ``mask`` [batch, n]: real tokens;
    * ``values``: ``.cls`` for images, ``.last`` for texts.
    """

    method: str
    row: Tensor
    query: Tensor
    head_fusion: str
    discard_ratio: float
    residual: bool
    layers: tuple[int, ...]
    is_image: bool
    matrix: Tensor | None = None
    mask: Tensor | None = None
    tokens: list[list[str]] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ views
    @property
    def cls(self) -> Float[Tensor, "batch n_patches"]:
        """Images: the query (CLS) row over the patch tokens, position 0 dropped."""
        if not self.is_image:
            raise InputError(
                ".cls is for image inputs (a ViT with CLS first); for texts use .last or .values"
            )
        return self.row[:, 1:]

    @property
    def grid(self) -> Float[Tensor, "batch g g"]:
        """Images: ``.cls`` on the square patch grid (row-major patches)."""
        cls = self.cls
        g = math.isqrt(cls.shape[1])
        if g * g != cls.shape[1]:
            raise InputError(
                f"{cls.shape[1]} patch tokens after CLS do not form a square grid; use .cls"
            )
        return cls.reshape(-1, g, g)

    @property
    def last(self) -> Float[Tensor, "batch pos"]:
        """Texts: the query row (the last real token's by default) over the tokens, 0 on
        padding."""
        if self.is_image:
            raise InputError(".last is for token inputs; for images use .cls, .grid or .values")
        return self.row

    @property
    def values(self) -> Tensor:
        """``.cls`` [batch, n_patches] for images, ``.last`` [batch, pos] for texts."""
        return self.cls if self.is_image else self.last

    def _length(self, b: int) -> int:
        return self.row.shape[1] if self.mask is None else int(self.mask[b].sum())

    # ------------------------------------------------------------------ outputs
    def to_pandas(self):
        """A long frame: ``example``, ``position`` (patch index for images, token position
        for texts; padding left out), ``row``/``col`` on the patch grid or ``token``, ``value``.
        """
        import pandas as pd

        values = self.values.cpu().numpy()
        frames = []
        for b in range(values.shape[0]):
            n = values.shape[1] if self.is_image else self._length(b)
            if self.mask is not None and not self.is_image:
                pos = np.flatnonzero(self.mask[b].cpu().numpy())
            else:
                pos = np.arange(n)
            frame = {"example": b, "position": pos}
            if self.is_image:
                g = math.isqrt(values.shape[1])
                if g * g == values.shape[1]:
                    frame["row"], frame["col"] = pos // g, pos % g
            elif self.tokens is not None:
                frame["token"] = self.tokens[b]
            frame["value"] = values[b, pos]
            frames.append(pd.DataFrame(frame))
        return pd.concat(frames, ignore_index=True)

    def __repr__(self) -> str:
        batch, n = self.row.shape
        layers = (
            f"{self.layers[0]}-{self.layers[-1]}"
            if list(self.layers) == list(range(self.layers[0], self.layers[-1] + 1))
            else ",".join(map(str, self.layers))
        )
        q = self.query.tolist()
        if self.is_image and q == [0] * batch:
            what = f"{n} tokens (CLS + {n - 1} patches), query CLS"
        elif self.is_image:
            what = f"{n} tokens (CLS + {n - 1} patches), query positions {sorted(set(q))}"
        else:
            what = f"{n} positions, query token at {q[:8]}{' ...' if batch > 8 else ''}"
        v = self.values
        return (
            f"Rollout(method={self.method!r}, head_fusion={self.head_fusion!r}, "
            f"discard_ratio={self.discard_ratio}, residual={self.residual}, layers {layers}; "
            f"{batch} examples, {what}; values mean {float(v.mean()):.4g}, "
            f"max {float(v.max()):.4g})"
        )

    def plot(
        self,
        images: Tensor | np.ndarray | None = None,
        *,
        examples: Sequence[int] | None = None,
        alpha: float = 0.6,
        cmap: str = "inferno",
        ncols: int = 4,
    ):
        """A matplotlib Figure, one axes per example (the first 8 by default).

        Images: ``.grid`` drawn as an image (``ax.images[-1]``, array = the grid), stretched
        over the input image when ``images`` ([batch, C, H, W] or [batch, H, W]) is given
        (drawn first, ``ax.images[0]``). Texts: a heat row over the real tokens
        (``ax.images[0]``, array [1, length]) with the tokens as labels.
        """
        import matplotlib.pyplot as plt

        batch = self.row.shape[0]
        chosen = list(range(min(batch, 8))) if examples is None else list(examples)
        if not chosen or not all(isinstance(b, int) and 0 <= b < batch for b in chosen):
            raise InputError(
                f"examples must be example indices in 0..{batch - 1}, got {examples!r}"
            )
        pictures = self._images(images, max(chosen) + 1) if images is not None else None
        if self.is_image:
            grid = self.grid.cpu().numpy()
            cols = min(ncols, len(chosen))
            rows = -(-len(chosen) // cols)
            fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
            for ax, b in zip(axes.flat, chosen, strict=False):
                if pictures is not None:
                    pic = pictures[b]
                    ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None)
                    h, w = pic.shape[:2]
                    ax.imshow(
                        grid[b], cmap=cmap, alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5)
                    )
                else:
                    ax.imshow(grid[b], cmap=cmap)
                ax.set_title(f"example {b}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            for ax in list(axes.flat)[len(chosen) :]:
                fig.delaxes(ax)
        else:
            values = self.row.cpu().numpy()
            width = max(self._length(b) for b in chosen)
            fig, axes = plt.subplots(
                len(chosen), 1, figsize=(max(4.0, 0.5 * width), 1.1 * len(chosen)), squeeze=False
            )
            for ax, b in zip(axes[:, 0], chosen, strict=True):
                keep = (
                    np.arange(values.shape[1])
                    if self.mask is None
                    else np.flatnonzero(self.mask[b].cpu().numpy())
                )
                ax.imshow(values[b, keep][None, :], cmap=cmap, aspect="auto")
                labels = self.tokens[b] if self.tokens is not None else [str(i) for i in keep]
                ax.set_xticks(range(len(keep)), labels, rotation=90, fontsize=8)
                ax.set_yticks([])
                ax.set_title(f"example {b}", fontsize=9)
        fig.suptitle(f"attention {self.method} ({self.head_fusion} over heads)", fontsize=10)
        fig.tight_layout()
        return fig

    def _images(self, images: Any, need: int) -> np.ndarray:
        """The images as [rows, H, W] or [rows, H, W, 3] scaled to [0, 1] per image; at
        least ``need`` rows (the examples drawn)."""
        if not self.is_image:
            raise InputError("images= is for image inputs; a text rollout plots as token rows")
        arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
        if arr.ndim == 4 and arr.shape[1] in (1, 3):
            arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)
        if arr.ndim not in (3, 4) or arr.shape[0] < need:
            raise InputError(
                f"images must be [rows, C, H, W] or [rows, H, W] (C 1 or 3) with at least "
                f"{need} rows (the examples drawn), got {tuple(np.shape(images))}"
            )
        arr = arr.astype(np.float64)
        batch = arr.shape[0]
        lo = arr.reshape(batch, -1).min(1).reshape(-1, *([1] * (arr.ndim - 1)))
        hi = arr.reshape(batch, -1).max(1).reshape(-1, *([1] * (arr.ndim - 1)))
        return (arr - lo) / np.where(hi > lo, hi - lo, 1.0)
