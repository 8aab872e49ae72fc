"""Attention-pattern statistics per head: pattern maths, :func:`head_stats`, :func:`compare_heads`.

Conventions (head names, ``[layer, head]`` grids and the readout position:
:mod:`hookscope.units._common`):

* Patterns are ``[batch, heads, dest, src]`` (rows over ``src`` sum to 1), read at
  ``head.L.pattern``.
* **Valid keys** of a query row: real keys (the attention mask of padded token inputs) and,
  for a causal model, keys at or before the query. Padded query rows are skipped. Each row's
  weights are renormalised over its valid keys (a no-op for a model that masks correctly),
  every statistic is computed per row, then averaged without weights over rows and examples.
  Other structural masks are not detected: keys a sliding-window layer (Gemma 3's local
  layers, Mistral) cannot see still count as valid keys holding weight 0, so such a layer
  shows lower ``entropy_norm`` and higher ``gini`` than its weights within the window alone
  would give (``entropy`` and ``max_weight`` are unaffected). Compare window layers with
  each other, or read their ``mean_patterns``.
* **Entropy** ``-sum p log p`` in nats (``0 log 0 = 0``), not normalised. ``entropy_norm``
  divides each row by ``log n`` for its own ``n`` valid keys, so a causal row with few keys
  compares with a full one; rows with a single valid key (a causal model's first row) count
  in ``entropy`` (as 0) but not in ``entropy_norm`` nor ``gini``.
* **Sparsity** is the Gini index of a row over its ``n`` valid keys, sorted ascending,
  ``1 - 2 sum_k p_(k) (n - k + 1/2) / n`` (Hurley & Rickard 2009, "Comparing measures of
  sparsity", IEEE Trans. Inf. Theory 55(10), the one measure meeting all six of their
  criteria): 0 for uniform attention, ``1 - 1/n`` for one-hot. ``max_weight``: the mean of
  each row's largest weight.
* **Distance** ``sum_src p[dest, src] d(dest, src)`` per row. Token inputs: ``d = |dest -
  src|`` in positions. Vision transformers (float image inputs; hookscope's ViT layout): CLS
  at position 0, then patches row-major on a ``grid`` (square unless given); ``d`` is the
  Euclidean distance between patch centres in patch units, for patch queries over patch
  keys only: the CLS row is skipped, the weight on the CLS key dropped and the patch weights
  renormalised (a row with all its weight on CLS is skipped).
* ``cls_share`` (vision only; NaN for token inputs): the mean weight query rows (the CLS row
  included) put on the CLS key.
* **Class selectivity** of a head: :func:`hookscope.analysis.geometry.class_selectivity`
  (Morcos et al. 2018) of the norm of the head's ``result`` (its write into the residual
  stream, ``z_h W_O^h``, output bias excluded) at the readout position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hookscope.attribution._common import prepare_inputs
from hookscope.errors import InputError, format_choices
from hookscope.modes import in_eval_mode

from ._common import (
    _attention_model,
    _chunks,
    _grid_frame,
    _heatmap,
    _pick_layers,
    _readout,
    as_labels,
    is_int,
    positive_int,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "STATS",
    "PatternStatistics",
    "pattern_stats",
    "token_distances",
    "patch_distances",
    "HeadStats",
    "head_stats",
    "HeadStatsComparison",
    "compare_heads",
]

#: per-head statistics of :class:`HeadStats`, in table order
STATS = ("entropy", "entropy_norm", "gini", "max_weight", "distance", "cls_share")


# ------------------------------------------------------------------------- pattern math


def token_distances(n: int) -> Float[Tensor, "n n"]:
    """``|dest - src|`` for ``n`` token positions (float64)."""
    pos = torch.arange(n, dtype=torch.float64)
    return (pos[:, None] - pos[None]).abs()


def patch_distances(rows: int, cols: int, cls: bool = True) -> Float[Tensor, "pos pos"]:
    """Euclidean distances between patch centres of a ``rows x cols`` grid (row-major, patch
    units); with ``cls`` a CLS position 0 is prepended whose row and column are NaN."""
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )  # fmt: skip
    xy = torch.stack([r.flatten(), c.flatten()], 1)
    d = torch.cdist(xy, xy)
    if not cls:
        return d
    out = torch.full((rows * cols + 1,) * 2, math.nan, dtype=torch.float64)
    out[1:, 1:] = d
    return out


def _masked_sum(values: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head sum of ``values`` [b, h, d] over ``rows`` [b, h, d] and the row count."""
    v = torch.where(rows, values, torch.zeros_like(values))
    return v.sum((0, 2)), rows.sum((0, 2)).to(torch.float64)


class PatternStatistics:
    """Streaming per-head attention statistics (see the module docstring for definitions).

    ``add(patterns [batch, heads, dest, src], mask [batch, pos] or None)`` per batch,
    ``merge`` another accumulator of the same heads, ``result()`` the per-head values.
    ``distance`` [dest, src]: the distance of each pair (NaN: excluded), None to skip;
    ``cls_position``: the CLS key for ``cls_share``; ``causal``: keys after the query are
    not valid keys.
    """

    def __init__(
        self, distance: Tensor | None = None, cls_position: int | None = None, causal: bool = False
    ):
        self.distance = None if distance is None else torch.as_tensor(distance, dtype=torch.float64)
        self.cls_position, self.causal = cls_position, bool(causal)
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        self.pattern_sum: Tensor | None = None
        self.pattern_count: Tensor | None = None
        self.n_examples = 0

    def add(
        self,
        patterns: Float[Tensor, "batch heads dest src"],
        mask: Bool[Tensor, "batch pos"] | None = None,
    ) -> None:
        """Accumulate one batch of patterns (``mask``: 1 for real positions)."""
        p = _check_patterns(patterns)
        b, h, d, s = p.shape
        keys = _check_mask(mask, b, s)
        if self.distance is not None and tuple(self.distance.shape) != (d, s):
            raise InputError(f"distance has shape {tuple(self.distance.shape)}, patterns {d}x{s}")
        valid = keys[:, None, :].expand(b, d, s)
        if self.causal:
            valid = valid & torch.ones(d, s, dtype=torch.bool).tril()
        query = keys[:, :d] & valid.any(-1)  # [b, d]
        n_keys = valid.sum(-1).to(torch.float64)  # [b, d]
        q = p * valid[:, None]
        total = q.sum(-1)
        q = q / total.clamp_min(1e-300)[..., None]
        rows = query[:, None] & (total > 0)  # [b, h, d]
        several = rows & (n_keys > 1)[:, None]
        entropy = -torch.special.xlogy(q, q).sum(-1)
        stats = {
            "entropy": (entropy, rows),
            "entropy_norm": (entropy / n_keys.clamp_min(2).log()[:, None], several),
            "gini": (_gini(q, n_keys), several),
            "max_weight": (q.amax(-1), rows),
        }
        if self.distance is not None:
            finite = torch.isfinite(self.distance)
            w = q * finite
            mass = w.sum(-1)
            dist = (w * self.distance.nan_to_num(0.0)).sum(-1) / mass.clamp_min(1e-300)
            stats["distance"] = (dist, rows & (mass > 1e-12))
        if self.cls_position is not None:
            stats["cls_share"] = (q[..., self.cls_position], rows)
        for name, (values, where) in stats.items():
            total_v, count = _masked_sum(values, where)
            self.sums[name] = self.sums.get(name, 0) + total_v
            self.counts[name] = self.counts.get(name, 0) + count
        psum = (p * query[:, None, :, None]).sum(0)
        pcount = query.sum(0).to(torch.float64)
        self.pattern_sum = psum if self.pattern_sum is None else self.pattern_sum + psum
        self.pattern_count = pcount if self.pattern_count is None else self.pattern_count + pcount
        self.n_examples += b

    def merge(self, other: PatternStatistics) -> PatternStatistics:
        """A new accumulator holding both (the same heads and settings)."""
        if other.causal != self.causal or other.cls_position != self.cls_position:
            raise InputError("merge accumulators with the same causal and cls_position settings")
        out = PatternStatistics(self.distance, self.cls_position, self.causal)
        for name in set(self.sums) | set(other.sums):
            out.sums[name] = self.sums.get(name, 0) + other.sums.get(name, 0)
            out.counts[name] = self.counts.get(name, 0) + other.counts.get(name, 0)
        parts = [a for a in (self, other) if a.pattern_sum is not None]
        if parts:
            out.pattern_sum = sum(a.pattern_sum for a in parts)  # type: ignore[assignment]
            out.pattern_count = sum(a.pattern_count for a in parts)  # type: ignore[assignment]
        out.n_examples = self.n_examples + other.n_examples
        return out

    def result(self) -> dict[str, Tensor]:
        """``{stat: [heads]}`` for each of :data:`STATS` (NaN where undefined) and
        ``mean_pattern`` [heads, dest, src] (NaN rows: never a real query)."""
        if self.pattern_sum is None:
            raise InputError("no patterns were added")
        h = self.pattern_sum.shape[0]
        out = {}
        for name in STATS:
            if name not in self.sums:
                out[name] = torch.full((h,), math.nan, dtype=torch.float64)
                continue
            count = self.counts[name]
            out[name] = torch.where(
                count > 0, self.sums[name] / count.clamp_min(1), torch.full_like(count, math.nan)
            )
        count = self.pattern_count[None, :, None]  # type: ignore[index]
        out["mean_pattern"] = torch.where(
            count > 0,
            self.pattern_sum / count.clamp_min(1),
            torch.full_like(self.pattern_sum, math.nan),
        )
        return out


def _gini(q: Tensor, n_keys: Tensor) -> Tensor:
    """Gini index per row of ``q`` [b, h, d, s] over its ``n_keys`` [b, d] valid keys (the
    invalid keys hold 0 and sort first, so the k-th valid key sits at index ``s - n + k - 1``
    and ``n - k + 1/2 = s - j - 1/2`` for 0-based index ``j``)."""
    s = q.shape[-1]
    ascending = q.sort(-1).values
    factor = s - torch.arange(s, dtype=torch.float64) - 0.5
    return 1 - 2 * (ascending * factor).sum(-1) / n_keys[:, None].clamp_min(1)


def _check_patterns(patterns: Any) -> Tensor:
    if not isinstance(patterns, Tensor) or patterns.ndim != 4 or not patterns.is_floating_point():
        got = tuple(patterns.shape) if isinstance(patterns, Tensor) else type(patterns).__name__
        raise InputError(f"patterns must be a float tensor [batch, heads, dest, src]; got {got}")
    if patterns.shape[2] != patterns.shape[3]:
        raise InputError(
            f"patterns must be self-attention [batch, heads, pos, pos]; got {tuple(patterns.shape)}"
        )
    p = patterns.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise InputError("patterns hold negative, NaN or infinite weights")
    return p


def _check_mask(mask: Any, b: int, s: int) -> Tensor:
    if mask is None:
        return torch.ones(b, s, dtype=torch.bool)
    m = torch.as_tensor(mask).cpu()
    if tuple(m.shape) != (b, s):
        raise InputError(f"mask must be [batch, pos] = ({b}, {s}); got {tuple(m.shape)}")
    return m.bool()


def pattern_stats(
    patterns: Float[Tensor, "batch heads dest src"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    *,
    causal: bool = False,
    distance: Float[Tensor, "dest src"] | None = None,
    cls_position: int | None = None,
) -> dict[str, Tensor]:
    """Per-head statistics of one tensor of patterns: :class:`PatternStatistics` in one call.

    >>> pattern_stats(torch.full((1, 1, 4, 4), 0.25))["entropy"]  # log 4
    tensor([1.3863], dtype=torch.float64)
    """
    acc = PatternStatistics(distance, cls_position, causal)
    acc.add(patterns, mask)
    return acc.result()


# ---------------------------------------------------------------------------- head_stats


@dataclass(frozen=True, repr=False, eq=False)
class HeadStats:
    """Per-head attention statistics (module docstring). Each stat is a ``[layer, head]``
    grid (rows follow ``layers``); ``mean_patterns`` is ``[layer, head, dest, src]``;
    ``selectivity`` is None without labels."""

    layers: tuple[int, ...]
    entropy: Tensor
    entropy_norm: Tensor
    gini: Tensor
    max_weight: Tensor
    distance: Tensor
    cls_share: Tensor
    mean_patterns: Tensor
    selectivity: Tensor | None
    n_examples: int
    vision: bool
    causal: bool

    @property
    def n_heads(self) -> int:
        return self.mean_patterns.shape[1]

    def to_pandas(self) -> pd.DataFrame:
        """One row per head: layer, head and every statistic."""
        cols = {name: getattr(self, name) for name in STATS}
        if self.selectivity is not None:
            cols["selectivity"] = self.selectivity
        return _grid_frame(self.layers, cols)

    def __repr__(self) -> str:
        kind = "vision, CLS at 0" if self.vision else ("causal" if self.causal else "tokens")
        df = self.to_pandas()
        if not self.vision:
            df = df.drop(columns="cls_share")
        return (
            f"HeadStats({len(self.layers)} layers x {self.n_heads} heads, {self.n_examples} "
            f"examples, {kind}; entropy in nats, gini = sparsity)\n"
            + df.to_string(index=False, float_format=lambda v: f"{v:.4f}")
        )

    def compare(self, other: HeadStats) -> HeadStatsComparison:
        """``compare_heads(self, other)``: ``self`` before, ``other`` after."""
        return compare_heads(self, other)

    def plot(self) -> Figure:
        """Grid of mean patterns, layers x heads (``fig.axes[i * n_heads + j]`` shows layer
        ``layers[i]`` head ``j``; its image's array is the mean pattern [dest, src])."""
        from hookscope.plot import figure

        n_l, n_h = len(self.layers), self.n_heads
        fig = figure(figsize=(2.2 * n_h + 0.8, 2.2 * n_l))
        axes = fig.subplots(n_l, n_h, squeeze=False)
        top = float(np.nanmax(self.mean_patterns.numpy())) if self.mean_patterns.numel() else 1.0
        im = None
        for i, layer in enumerate(self.layers):
            for j in range(n_h):
                ax = axes[i, j]
                im = ax.imshow(self.mean_patterns[i, j].numpy(), vmin=0, vmax=top, cmap="viridis")
                ax.set_title(f"L{layer}H{j}  H={float(self.entropy[i, j]):.2f}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel("dest")
                if i == n_l - 1:
                    ax.set_xlabel("src")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        fig.suptitle("mean attention patterns", fontsize=10)
        return fig


def _vision_distance(n_pos: int, grid: Any, image: tuple[int, ...]) -> Tensor:
    """Patch distances of CLS + a ``grid`` of patches (square when None) for images of
    spatial size ``image`` (H, W): the grid must cut them into square patches."""
    n_patches = n_pos - 1
    if grid is None:
        side = math.isqrt(max(n_patches, 0))
        if side * side != n_patches or side == 0:
            raise InputError(
                f"{n_pos} positions are not CLS + a square patch grid; pass grid=(rows, cols)"
            )
        grid = (side, side)
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(is_int(g) and g > 0 for g in grid)
        or grid[0] * grid[1] != n_patches
    ):
        raise InputError(
            f"grid must be (rows, cols) with rows * cols = {n_patches} patches; got {grid!r}"
        )
    rows, cols = int(grid[0]), int(grid[1])
    if len(image) == 2 and image[0] * cols != image[1] * rows:
        fits = [
            (r, n_patches // r)
            for r in range(1, n_patches + 1)
            if n_patches % r == 0 and image[0] * (n_patches // r) == image[1] * r
        ]
        raise InputError(
            f"grid {(rows, cols)} does not cut {image[0]}x{image[1]} images into square "
            f"patches; the grid of {n_patches} square patches is "
            + (format_choices([str(f) for f in fits]) if fits else "none (pass the right grid)")
        )
    return patch_distances(rows, cols, cls=True)


def _causal_evidence(patterns: list[Tensor], mask: Tensor | None) -> tuple[bool, bool]:
    """``(seen, violated)`` for causal detection: ``seen`` when some real query row has a
    real key after it; ``violated`` when any head gives such a key nonzero weight."""
    b, _, _, s = patterns[0].shape
    real = torch.ones(b, s, dtype=torch.bool) if mask is None else mask.bool().cpu()
    later = torch.ones(s, s, dtype=torch.bool).triu(1)  # [dest, src]: src after dest
    pairs = real[:, :, None] & real[:, None, :] & later  # [b, dest, src]
    if not bool(pairs.any()):
        return False, False
    for p in patterns:
        w = p.detach().cpu()
        if bool((torch.where(pairs[:, None], w, torch.zeros_like(w)) != 0).any()):
            return True, True
    return True, False


@in_eval_mode
def head_stats(
    model: Any,
    inputs: Any,
    labels: Any = None,
    *,
    layers: Any = None,
    causal: bool | None = None,
    grid: tuple[int, int] | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
) -> HeadStats:
    """Entropy, sparsity, mean pattern, distance, CLS share (and class selectivity with
    ``labels``) of every attention head of ``layers`` on ``inputs``.

    ``inputs``: images [batch, C, H, W] for a vision transformer, token ids / texts / a dict
    with ``attention_mask`` for a language model. ``causal``: None detects it: token inputs
    are causal when some real query row has a real key after it and every such key gets
    exactly 0 weight in every head, over all batches (padded query rows and padded keys
    are ignored); inputs with no such row (every sequence one real token) count as not
    causal. Images: not causal unless ``causal=True``. ``grid``: the patch grid (rows,
    cols) of a non-square ViT (images only); it must cut the images into square patches.
    Inputs run ``batch_size`` rows per forward.

    >>> h = head_stats(vit, X, y); h.to_pandas(); h.plot()
    """
    hm, valid = _attention_model(model, "head_stats")
    chosen = _pick_layers(layers, valid)
    batch_size = positive_int(batch_size, "batch_size")
    if causal is not None and not isinstance(causal, bool):
        raise InputError(f"causal must be None, True or False; got {causal!r}")
    data = prepare_inputs(hm, inputs)
    if grid is not None and data.is_tokens:
        raise InputError("grid is the patch grid of a vision transformer; token inputs take none")
    y = None if labels is None else as_labels(labels, data.batch)
    names = [f"head.{layer}.pattern" for layer in chosen]
    if y is not None:
        names += [f"head.{layer}.result" for layer in chosen]
    detect = causal is None and data.is_tokens
    # while detecting, both settings are accumulated; a violation drops the causal one
    candidates: dict[bool, list[PatternStatistics]] = {}
    norms: list[Tensor] = []
    seen = False
    for chunk in _chunks(data, batch_size, progress, "head stats"):
        _, cache = hm.run_with_cache(chunk.tensor, names, **chunk.kwargs())
        pats = [cache[f"head.{layer}.pattern"] for layer in chosen]
        n_pos = pats[0].shape[-1]
        if not candidates:
            if data.is_tokens:
                dist, cls = token_distances(n_pos), None
            else:
                dist, cls = _vision_distance(n_pos, grid, tuple(chunk.tensor.shape[2:])), 0
            flags = (True, False) if detect else (bool(causal),)
            candidates = {f: [PatternStatistics(dist, cls, f) for _ in chosen] for f in flags}
        if detect and True in candidates:
            found, violated = _causal_evidence(pats, chunk.mask)
            seen = seen or found
            if violated:
                del candidates[True]
        for accs in candidates.values():
            for acc, pat in zip(accs, pats, strict=True):
                acc.add(pat, chunk.mask)
        if y is not None:
            at = _readout(chunk, n_pos)
            rows = torch.arange(chunk.batch)
            per_layer = [
                cache[f"head.{layer}.result"][rows, at.to(pats[0].device)].norm(dim=-1)
                for layer in chosen
            ]  # each [b, heads]
            norms.append(torch.cat(per_layer, 1).detach().to("cpu", torch.float64))
    is_causal = (seen and True in candidates) if detect else bool(causal)
    accs = candidates[is_causal]
    results = [acc.result() for acc in accs]
    grids = {name: torch.stack([r[name] for r in results]) for name in STATS}
    selectivity = None
    if y is not None:
        from hookscope.analysis.geometry import class_selectivity

        summary = torch.cat(norms)
        selectivity = class_selectivity(summary, y).reshape(len(chosen), -1)
    return HeadStats(
        layers=tuple(chosen),
        mean_patterns=torch.stack([r["mean_pattern"] for r in results]),
        selectivity=selectivity,
        n_examples=data.batch,
        vision=not data.is_tokens,
        causal=is_causal,
        **grids,
    )


# --------------------------------------------------------------------------- comparison


@dataclass(frozen=True, repr=False, eq=False)
class HeadStatsComparison:
    """Head statistics at two checkpoints: ``diff[stat] = after - before`` ([layer, head]);
    ``pattern_change``: mean absolute change of the mean pattern per head."""

    before: HeadStats
    after: HeadStats
    diff: dict[str, Tensor]
    pattern_change: Tensor

    def to_pandas(self) -> pd.DataFrame:
        """One row per head: ``<stat>_before``, ``<stat>_after``, ``<stat>_diff``."""
        cols: dict[str, Tensor] = {}
        for name in self.diff:
            cols[f"{name}_before"] = getattr(self.before, name)
            cols[f"{name}_after"] = getattr(self.after, name)
            cols[f"{name}_diff"] = self.diff[name]
        cols["pattern_change"] = self.pattern_change
        return _grid_frame(self.before.layers, cols)

    def __repr__(self) -> str:
        lines = [
            f"  {name:<14} mean {float(d.nanmean()):+.4f}  largest |change| "
            f"{float(d.abs().nan_to_num(0).max()):.4f}"
            for name, d in self.diff.items()
        ]
        return (
            f"HeadStatsComparison({len(self.before.layers)} layers x {self.before.n_heads} heads, "
            "after - before)\n" + "\n".join(lines)
        )

    def plot(self) -> Figure:
        """One heatmap per statistic of ``after - before`` (layers x heads), then the
        pattern change; ``fig.axes[i]`` shows the i-th grid (colour bars follow)."""
        from hookscope.plot import figure

        grids = {**{f"{k} (after - before)": v for k, v in self.diff.items()}}
        grids["mean |pattern change|"] = self.pattern_change
        fig = figure(figsize=(4.0 * len(grids), 3.2))
        axes = fig.subplots(1, len(grids), squeeze=False)[0]
        for ax, (title, grid) in zip(axes, grids.items(), strict=True):
            _heatmap(ax, grid.float(), title, self.before.layers, cmap="RdBu_r")
        fig.tight_layout()
        return fig


def compare_heads(before: HeadStats, after: HeadStats) -> HeadStatsComparison:
    """Difference of every head statistic between two :class:`HeadStats` of the same heads
    (e.g. two checkpoints on the same inputs: ``hs.zoo.load(name, checkpoint=k)``)."""
    for name, value in (("before", before), ("after", after)):
        if not isinstance(value, HeadStats):
            raise InputError(f"{name} must be a HeadStats; got {type(value).__name__}")
    if before.layers != after.layers or before.mean_patterns.shape != after.mean_patterns.shape:
        raise InputError(
            f"compare the same heads on the same inputs: layers {before.layers} vs "
            f"{after.layers}, patterns {tuple(before.mean_patterns.shape)} vs "
            f"{tuple(after.mean_patterns.shape)}"
        )
    names = [n for n in STATS if not (n == "cls_share" and not before.vision)]
    if before.selectivity is not None and after.selectivity is not None:
        names.append("selectivity")
    diff = {n: getattr(after, n) - getattr(before, n) for n in names}
    change = (after.mean_patterns - before.mean_patterns).abs().nanmean((-1, -2))
    return HeadStatsComparison(before, after, diff, change)
