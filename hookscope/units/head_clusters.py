"""Heads clustered by their mean patterns: :func:`cluster_heads` and :func:`cluster_patterns`.

Mean patterns are those of :func:`hookscope.units.head_stats` (conventions:
:mod:`hookscope.units.heads`); how the features, ``k`` and the linkage are chosen is stated in
:func:`cluster_patterns` and :class:`HeadClusters`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hookscope.errors import InputError
from hookscope.modes import in_eval_mode

from ._common import _choice, is_int, positive_int
from .heads import HeadStats, head_stats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["HeadClusters", "cluster_patterns", "cluster_heads"]

CLUSTER_METHODS = ("kmeans", "hierarchical")
LINKAGES = ("ward", "average", "complete", "single")


@dataclass(frozen=True, repr=False, eq=False)
class HeadClusters:
    """Heads clustered on their flattened mean patterns.

    ``labels`` [n] (cluster per head, in ``names`` order), ``k``, ``method``,
    ``silhouette`` of the chosen labelling, ``scores`` {k: silhouette} tried by
    ``k="auto"``, ``linkage``: the scipy linkage matrix ``[n - 1, 4]`` of the features
    (``linkage_method``), drawn by :meth:`plot` whatever ``method`` clustered."""

    names: list[str]
    labels: Tensor
    k: int
    method: str
    silhouette: float
    scores: dict[int, float]
    linkage: np.ndarray
    linkage_method: str
    features: Tensor = field(repr=False)

    def to_pandas(self) -> pd.DataFrame:
        """One row per head: its name and cluster."""
        return pd.DataFrame({"head": self.names, "cluster": self.labels.numpy()})

    def __repr__(self) -> str:
        groups = [
            f"  {c}: "
            + ", ".join(
                n for n, lab in zip(self.names, self.labels.tolist(), strict=True) if lab == c
            )
            for c in range(self.k)
        ]
        tried = ", ".join(f"k={k}: {s:.3f}" for k, s in self.scores.items())
        return (
            f"HeadClusters({len(self.names)} heads, {self.method}, k={self.k}, silhouette "
            f"{self.silhouette:.4f}"
            + (f"; tried {tried}" if len(self.scores) > 1 else "")
            + ")\n"
            + "\n".join(groups)
        )

    def plot(self) -> Figure:
        """Dendrogram of the heads (scipy ``dendrogram`` of :attr:`linkage`): leaves are
        head names (the x tick labels, left to right), leaf labels coloured by cluster."""
        from scipy.cluster.hierarchy import dendrogram

        from hookscope.plot import figure

        fig = figure(figsize=(max(5.0, 0.45 * len(self.names)), 3.8))
        ax = fig.subplots()
        tree = dendrogram(self.linkage, ax=ax, labels=self.names, color_threshold=0)
        for tick in ax.get_xticklabels():
            cluster = int(self.labels[self.names.index(tick.get_text())])
            tick.set_color(f"C{cluster % 10}")
        ax.set_ylabel(f"{self.linkage_method} linkage distance")
        ax.set_title(f"heads: {self.method}, k={self.k} (leaf colour = cluster)", fontsize=9)
        fig.tight_layout()
        fig.dendrogram = tree  # type: ignore[attr-defined]
        return fig


def cluster_patterns(
    patterns: Float[Tensor, "n ..."],
    k: int | str = "auto",
    method: str = "kmeans",
    *,
    names: Sequence[str] | None = None,
    linkage: str = "ward",
    k_range: tuple[int, int] = (2, 8),
    seed: int = 0,
) -> HeadClusters:
    """Cluster ``n`` heads on their patterns ``[n, dest, src]`` (or features ``[n, f]``),
    flattened; NaN entries (never-real query rows) count as 0. InputError for infinite
    values, a head with no finite value, duplicate ``names``, and heads that all have the
    same features (nothing to cluster).

    ``method="kmeans"``: :func:`hookscope.analysis.geometry.kmeans` (k-means++, ``seed``);
    ``"hierarchical"``: scipy ``linkage(features, linkage)`` cut by ``fcluster(...,
    "maxclust")``. ``k="auto"`` tries ``k_range`` (inclusive, capped at ``n - 1``) and keeps
    the largest mean silhouette (:func:`~hookscope.analysis.geometry.silhouette`; ties: the
    smallest k).
    """
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    from hookscope.analysis.geometry import kmeans, silhouette

    if not isinstance(patterns, Tensor) or patterns.ndim < 2:
        raise InputError("patterns must be a tensor [n_heads, dest, src] or [n_heads, features]")
    raw = patterns.detach().to("cpu", torch.float64).reshape(patterns.shape[0], -1)
    if bool(torch.isinf(raw).any()):
        raise InputError("patterns hold infinite values; pass finite mean patterns")
    empty = torch.isnan(raw).all(1).nonzero().flatten().tolist() if raw.shape[1] else []
    if empty or raw.shape[1] == 0:
        raise InputError(f"heads {empty} have no finite pattern value; nothing to cluster them by")
    x = raw.nan_to_num(0.0)
    n = x.shape[0]
    method = _choice(method, "method", CLUSTER_METHODS)
    linkage = _choice(linkage, "linkage", LINKAGES)
    if n < 3:
        raise InputError(f"clustering needs at least 3 heads; got {n}")
    names = [f"unit {i}" for i in range(n)] if names is None else [str(s) for s in names]
    if len(names) != n:
        raise InputError(f"{len(names)} names for {n} heads")
    if len(set(names)) != n:
        twice = sorted({s for s in names if names.count(s) > 1})
        raise InputError(f"names must be unique; repeated: {twice}")
    if not is_int(seed):
        raise InputError(f"seed must be an int; got {seed!r}")
    if bool((x == x[0]).all()):
        raise InputError("every head has the same mean pattern; nothing to cluster")
    if k == "auto":
        if not (isinstance(k_range, (tuple, list)) and len(k_range) == 2):
            raise InputError(f"k_range must be (lowest, highest); got {k_range!r}")
        lo, hi = (positive_int(v, "k_range", 2) for v in k_range)
        hi = min(hi, n - 1)
        if lo > hi:
            raise InputError(f"k_range {tuple(k_range)} holds no k in 2..{n - 1} for {n} heads")
        candidates = list(range(lo, hi + 1))
    elif is_int(k) and 2 <= k <= n - 1:
        candidates = [int(k)]
    else:
        raise InputError(f"k must be 'auto' or an int in 2..{n - 1} for {n} heads; got {k!r}")
    tree = scipy_linkage(x.numpy(), method=linkage, metric="euclidean")
    found: dict[int, tuple[Tensor, float]] = {}
    for kk in candidates:
        if method == "kmeans":
            res = kmeans(x, kk, seed=int(seed))
            labels = res.labels
        else:
            labels = torch.from_numpy(fcluster(tree, kk, "maxclust").astype(np.int64) - 1)
        n_found = int(torch.unique(labels).numel())
        score = silhouette(x, labels) if 2 <= n_found < n else math.nan
        found[kk] = (labels, score)
    scores = {kk: s for kk, (_, s) in found.items()}
    finite = [kk for kk in candidates if not math.isnan(scores[kk])]
    best = max(finite, key=lambda kk: (scores[kk], -kk)) if finite else candidates[0]
    return HeadClusters(
        names=names,
        labels=found[best][0],
        k=best,
        method=method,
        silhouette=scores[best],
        scores=scores,
        linkage=tree,
        linkage_method=linkage,
        features=x,
    )


@in_eval_mode
def cluster_heads(
    model: Any,
    inputs: Any,
    k: int | str = "auto",
    method: str = "kmeans",
    *,
    layers: Any = None,
    linkage: str = "ward",
    k_range: tuple[int, int] = (2, 8),
    seed: int = 0,
    batch_size: int = 64,
    progress: bool | None = None,
) -> HeadClusters:
    """Cluster the heads of ``layers`` on their mean patterns over ``inputs``
    (:func:`head_stats` then :func:`cluster_patterns`; heads named ``head.L.H``).

    ``model`` may also be a :class:`HeadStats` already computed: its heads are clustered,
    ``inputs`` is unused (pass None) and ``layers`` must be None (it would select nothing).
    """
    method = _choice(method, "method", CLUSTER_METHODS)
    _choice(linkage, "linkage", LINKAGES)
    if isinstance(model, HeadStats):
        if layers is not None:
            raise InputError(
                "layers selects the layers head_stats runs; a HeadStats has its layers "
                f"{model.layers} already: pass layers to head_stats, or none here"
            )
        stats = model
    else:
        stats = head_stats(model, inputs, layers=layers, batch_size=batch_size, progress=progress)
    means = stats.mean_patterns
    names = [f"head.{layer}.{h}" for layer in stats.layers for h in range(stats.n_heads)]
    return cluster_patterns(
        means.reshape(-1, *means.shape[2:]), k, method, names=names, linkage=linkage,
        k_range=k_range, seed=seed,
    )  # fmt: skip
