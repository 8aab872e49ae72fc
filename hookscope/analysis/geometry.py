"""Representation geometry and neuron statistics.

PCA per layer or checkpoint, k-means clustering with silhouette scores, linear separability,
principal angles and subspace overlap between two activation sets, dead neurons and class
selectivity (with a before/after comparison). Activations are ``[samples, features]``.

PCA follows the same conventions as :mod:`hookscope.analysis.dimensionality`: centred by
default, computed from the Gram matrix on the smaller side. Component signs are fixed so that
the largest-magnitude entry of every component is positive (deterministic output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookscope.errors import AnalysisError

from ._validate import (
    as_labels,
    as_layers,
    as_matrix,
    choice,
    maybe_centred,
    positive_int,
    require_signal,
)
from .dimensionality import smaller_gram

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PCAResult",
    "pca",
    "pca_by_layer",
    "ClusteringResult",
    "kmeans",
    "silhouette",
    "linear_separability",
    "principal_angles",
    "subspace_overlap",
    "dead_neurons",
    "class_selectivity",
    "NeuronStatsComparison",
    "compare_neuron_stats",
]


# ------------------------------------------------------------------------------------- PCA


@dataclass(frozen=True, repr=False)
class PCAResult:
    """Principal components of one activation matrix.

    ``components``: [k, p], orthonormal rows, descending variance. ``explained_variance``:
    [k], covariance eigenvalues ``s_i**2 / (n - 1)``. ``explained_variance_ratio``: [k],
    fraction of the total variance (of all components, not only the k kept).
    """

    components: Tensor
    explained_variance: Tensor
    explained_variance_ratio: Tensor
    mean: Tensor
    n_samples: int
    center: bool

    def transform(self, X: Float[Tensor, "n p"]) -> Float[Tensor, "n k"]:
        """Coordinates of the rows of ``X`` on the components (after removing ``mean``)."""
        x = as_matrix(X, "X", min_rows=1)
        if x.shape[1] != self.components.shape[1]:
            raise AnalysisError(
                f"X has {x.shape[1]} features but the PCA was fit on {self.components.shape[1]}"
            )
        return (x - self.mean) @ self.components.T

    def to_pandas(self) -> pd.DataFrame:
        """One row per component: variance, ratio and cumulative ratio."""
        ratio = self.explained_variance_ratio.cpu().numpy()
        return pd.DataFrame(
            {
                "component": np.arange(1, len(ratio) + 1),
                "explained_variance": self.explained_variance.cpu().numpy(),
                "explained_variance_ratio": ratio,
                "cumulative_ratio": np.cumsum(ratio),
            }
        )

    def __repr__(self) -> str:
        k, p = self.components.shape
        df = self.to_pandas().head(10)
        more = f"\n  ... {k - 10} more components" if k > 10 else ""
        return (
            f"PCAResult({k} components of {p} features, {self.n_samples} samples, "
            f"{'centred' if self.center else 'uncentred'})\n"
            + df.to_string(index=False, float_format=lambda v: f"{v:.4f}")
            + more
        )

    def plot(self) -> Figure:
        """Explained-variance ratio per component with the cumulative curve."""
        df = self.to_pandas()
        from hookscope.plot import figure

        fig = figure(figsize=(6, 3.5))
        ax = fig.subplots()
        ax.bar(df["component"], df["explained_variance_ratio"], color="C0")
        ax.plot(df["component"], df["cumulative_ratio"], color="C1", marker=".")
        ax.set_xlabel("component")
        ax.set_ylabel("explained variance ratio")
        ax.set_ylim(0, 1.02)
        fig.tight_layout()
        return fig


def _pca_tensor(
    x: Tensor, k: int | None, center: bool, method: str, cap: bool = False, name: str = "A"
) -> PCAResult:
    m = maybe_centred(x, center)
    require_signal(m, x, name, "PCA")
    n, p = m.shape
    if method == "svd":
        _, s, vt = torch.linalg.svd(m, full_matrices=False)
        ev, vecs = s.square(), vt
    elif p <= n:
        ev, vecs = torch.linalg.eigh(smaller_gram(m))
        ev, vecs = ev.flip(0), vecs.flip(1).T
    else:
        ev, u = torch.linalg.eigh(smaller_gram(m))
        ev, u = ev.flip(0), u.flip(1)
        vecs = None
    total = ev.clamp_min(0).sum()
    rank = int((ev > max(n, p) * torch.finfo(ev.dtype).eps * ev[0]).sum())
    if k is None:
        k = rank
    elif cap:
        k = min(positive_int(k, "k"), rank)
    elif positive_int(k, "k") > rank:
        raise AnalysisError(f"asked for k={k} components but {name} has numerical rank {rank}")
    ev = ev[:k]
    if vecs is None:
        vecs = (m.T @ u[:, :k] / ev.sqrt()).T
        vecs = vecs / vecs.norm(dim=1, keepdim=True)
    comps = vecs[:k]
    biggest = comps.abs().argmax(dim=1)
    signs = torch.sign(comps.gather(1, biggest[:, None]))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    dof = n - 1 if center else n
    return PCAResult(
        components=comps,
        explained_variance=ev / dof,
        explained_variance_ratio=ev / total,
        mean=x.mean(0) if center else torch.zeros_like(x[0]),
        n_samples=n,
        center=bool(center),
    )


def pca(
    A: Float[Tensor, "n p"], k: int | None = None, center: bool = True, method: str = "gram"
) -> PCAResult:
    """Top ``k`` principal components of ``A`` (all non-zero ones when ``k`` is None).

    ``method="gram"`` (default) diagonalises the Gram matrix on the smaller side, fast when
    ``n`` and ``p`` differ a lot; ``method="svd"`` runs a thin SVD, more accurate for the
    smallest components of ill-conditioned data.
    """
    choice(method, "method", ("gram", "svd"))
    return _pca_tensor(as_matrix(A, "A"), k, center, method)


def pca_by_layer(
    activations: Any, k: int | None = 10, center: bool = True, names: Any = None
) -> dict[str, PCAResult]:
    """:func:`pca` of every layer (or checkpoint) of a list / dict / cache of activations.

    With ``k`` larger than a layer's rank, that layer keeps all its non-zero components.
    """
    found, mats = as_layers(activations, names)
    out = {}
    for name, m in zip(found, mats, strict=True):
        out[name] = _pca_tensor(m, k, center, "gram", cap=True)
    return out


# -------------------------------------------------------------------------------- clusters


@dataclass(frozen=True, repr=False)
class ClusteringResult:
    """k-means clustering: ``labels`` [n], ``centers`` [k, p], ``inertia``, ``silhouette``."""

    labels: Tensor
    centers: Tensor
    inertia: float
    silhouette: float

    def to_pandas(self) -> pd.DataFrame:
        """One row per cluster: its size."""
        sizes = torch.bincount(self.labels, minlength=self.centers.shape[0]).numpy()
        return pd.DataFrame({"cluster": np.arange(len(sizes)), "size": sizes})

    def __repr__(self) -> str:
        return (
            f"ClusteringResult(k={self.centers.shape[0]}, inertia={self.inertia:.4g}, "
            f"silhouette={self.silhouette:.4f})\n" + self.to_pandas().to_string(index=False)
        )

    def plot(self) -> Figure:
        """Cluster sizes as bars, titled with the silhouette score."""
        df = self.to_pandas()
        from hookscope.plot import figure

        fig = figure(figsize=(5, 3))
        ax = fig.subplots()
        ax.bar(df["cluster"], df["size"])
        ax.set_xlabel("cluster")
        ax.set_ylabel("samples")
        ax.set_title(f"k-means, silhouette {self.silhouette:.3f}")
        fig.tight_layout()
        return fig


def silhouette(A: Float[Tensor, "n p"], labels: Int[Tensor, " n"]) -> float:
    """Mean silhouette coefficient (Rousseeuw 1987) of a labelling, Euclidean distance."""
    from sklearn.metrics import silhouette_score

    x = as_matrix(A, "A")
    y = as_labels(labels, x.shape[0])
    if int(torch.unique(y).numel()) >= x.shape[0]:
        raise AnalysisError("silhouette needs fewer clusters than samples")
    return float(silhouette_score(x.cpu().numpy(), y.cpu().numpy()))


def kmeans(A: Float[Tensor, "n p"], k: int, seed: int = 0, n_init: int = 10) -> ClusteringResult:
    """k-means (scikit-learn, k-means++ with ``n_init`` restarts) with its silhouette score."""
    from sklearn.cluster import KMeans

    x = as_matrix(A, "A", min_rows=3)
    k = positive_int(k, "k", minimum=2)
    if k >= x.shape[0]:
        raise AnalysisError(f"k must be smaller than the number of samples ({x.shape[0]}); got {k}")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x.cpu().numpy())
    labels = torch.from_numpy(km.labels_.astype(np.int64))
    n_found = int(torch.unique(labels).numel())
    sil = silhouette(x, labels) if n_found >= 2 else float("nan")
    return ClusteringResult(labels, torch.from_numpy(km.cluster_centers_), float(km.inertia_), sil)


def linear_separability(
    A: Float[Tensor, "n p"], labels: Int[Tensor, " n"], cv: int = 5, C: float = 1.0, seed: int = 0
) -> float:
    """Cross-validated accuracy of a logistic-regression probe on standardised features.

    Stratified ``cv``-fold; compare with the majority-class rate for chance level.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = as_matrix(A, "A")
    y = as_labels(labels, x.shape[0]).cpu().numpy()
    cv = positive_int(cv, "cv", minimum=2)
    smallest = int(np.unique(y, return_counts=True)[1].min())
    if smallest < cv:
        raise AnalysisError(f"the smallest class has {smallest} samples; need at least cv={cv}")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    return float(cross_val_score(model, x.cpu().numpy(), y, cv=folds).mean())


# ------------------------------------------------------------------------------- subspaces


def _basis(a: Tensor, k: int, name: str) -> Tensor:
    return _pca_tensor(a, k, True, "gram", name=name).components.T  # [p, k] orthonormal columns


def principal_angles(
    X: Float[Tensor, "n1 p"], Y: Float[Tensor, "n2 p"], k: int = 10
) -> Float[Tensor, " k"]:
    """Principal angles (radians, ascending) between the top-``k`` PCA subspaces of X and Y.

    X and Y live in the same feature space (same ``p``) but may hold different samples.
    ``cos(angles)`` are the singular values of ``Q_X^T Q_Y`` (Björck & Golub 1973).
    """
    x, y = as_matrix(X, "X"), as_matrix(Y, "Y")
    if x.shape[1] != y.shape[1]:
        raise AnalysisError(f"X has {x.shape[1]} features but Y has {y.shape[1]} features")
    k = positive_int(k, "k")
    cos = torch.linalg.svdvals(_basis(x, k, "X").T @ _basis(y, k, "Y"))
    return torch.arccos(cos.clamp(-1.0, 1.0))


def subspace_overlap(X: Float[Tensor, "n1 p"], Y: Float[Tensor, "n2 p"], k: int = 10) -> float:
    """Mean squared cosine of the principal angles, ``||Q_X^T Q_Y||_F^2 / k``, in [0, 1]."""
    return float(torch.cos(principal_angles(X, Y, k)).square().mean())


# ------------------------------------------------------------------------ neuron statistics


def dead_neurons(A: Float[Tensor, "n p"], threshold: float = 0.0) -> torch.BoolTensor:
    """Neurons whose activation never exceeds ``threshold`` on any sample: [p] bool."""
    x = as_matrix(A, "A", min_rows=1)
    return (x <= float(threshold)).all(dim=0)


def class_selectivity(A: Float[Tensor, "n p"], labels: Int[Tensor, " n"]) -> Float[Tensor, " p"]:
    """Class-selectivity index per neuron (Morcos et al. 2018), in [0, 1].

    ``(mu_max - mu_rest) / (mu_max + mu_rest)`` with ``mu_max`` the largest class-conditional
    mean activation and ``mu_rest`` the mean of the other class means. Defined for non-negative
    activations (e.g. after a ReLU); a neuron that is zero everywhere gets 0.
    """
    x = as_matrix(A, "A")
    y = as_labels(labels, x.shape[0]).to(x.device)
    if bool((x < 0).any()):
        raise AnalysisError(
            "class selectivity needs non-negative activations (e.g. post-ReLU); A has "
            f"{int((x < 0).sum())} negative values"
        )
    classes, idx = torch.unique(y, return_inverse=True)
    c = classes.numel()
    sums = x.new_zeros(c, x.shape[1]).index_add_(0, idx, x)
    means = sums / torch.bincount(idx, minlength=c)[:, None].to(x.dtype)
    top = means.max(dim=0).values
    rest = (means.sum(0) - top) / (c - 1)
    denom = top + rest
    return torch.where(denom > 0, (top - rest) / denom.clamp_min(1e-300), torch.zeros_like(top))


@dataclass(frozen=True, repr=False)
class NeuronStatsComparison:
    """Dead neurons and class selectivity before and after (training, an edit, ...)."""

    dead_before: Tensor
    dead_after: Tensor
    selectivity_before: Tensor
    selectivity_after: Tensor

    def summary(self) -> dict[str, float]:
        """Dead fractions, newly dead / revived counts and mean selectivities."""
        b, a = self.dead_before, self.dead_after
        return {
            "dead_fraction_before": float(b.double().mean()),
            "dead_fraction_after": float(a.double().mean()),
            "newly_dead": int((a & ~b).sum()),
            "revived": int((b & ~a).sum()),
            "mean_selectivity_before": float(self.selectivity_before.mean()),
            "mean_selectivity_after": float(self.selectivity_after.mean()),
        }

    def to_pandas(self) -> pd.DataFrame:
        """One row per neuron."""
        return pd.DataFrame(
            {
                "neuron": np.arange(self.dead_before.shape[0]),
                "dead_before": self.dead_before.cpu().numpy(),
                "dead_after": self.dead_after.cpu().numpy(),
                "selectivity_before": self.selectivity_before.cpu().numpy(),
                "selectivity_after": self.selectivity_after.cpu().numpy(),
            }
        )

    def __repr__(self) -> str:
        lines = [f"  {k:<24} {v:.4g}" for k, v in self.summary().items()]
        return f"NeuronStatsComparison({self.dead_before.shape[0]} neurons)\n" + "\n".join(lines)

    def plot(self) -> Figure:
        """Histograms of class selectivity before and after."""
        from hookscope.plot import figure

        fig = figure(figsize=(5, 3.2))
        ax = fig.subplots()
        bins = np.linspace(0, 1, 26)
        ax.hist(self.selectivity_before.cpu().numpy(), bins, alpha=0.6, label="before")
        ax.hist(self.selectivity_after.cpu().numpy(), bins, alpha=0.6, label="after")
        s = self.summary()
        ax.set_title(
            f"dead {s['dead_fraction_before']:.1%} -> {s['dead_fraction_after']:.1%}", fontsize=9
        )
        ax.set_xlabel("class selectivity")
        ax.set_ylabel("neurons")
        ax.legend()
        fig.tight_layout()
        return fig


def compare_neuron_stats(
    before: Float[Tensor, "n p"],
    after: Float[Tensor, "n p"],
    labels: Int[Tensor, " n"],
    threshold: float = 0.0,
) -> NeuronStatsComparison:
    """Dead neurons and class selectivity of the same neurons on the same samples, twice."""
    b, a = as_matrix(before, "before"), as_matrix(after, "after")
    if b.shape != a.shape:
        raise AnalysisError(
            f"before has shape {tuple(b.shape)} but after has {tuple(a.shape)}; compare the "
            "same neurons on the same samples"
        )
    if not math.isfinite(float(threshold)):
        raise AnalysisError(f"threshold must be finite; got {threshold!r}")
    return NeuronStatsComparison(
        dead_neurons(b, threshold),
        dead_neurons(a, threshold),
        class_selectivity(b, labels),
        class_selectivity(a, labels),
    )
