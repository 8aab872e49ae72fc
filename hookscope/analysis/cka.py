"""Centered kernel alignment (CKA): similarity of two representations of the same samples.

``X`` is ``[n, p]`` and ``Y`` is ``[n, q]``: the same ``n`` samples (rows, in the same order)
seen by two layers or models, with any numbers of features. With Gram matrices ``K`` (of X)
and ``L`` (of Y) and the Hilbert-Schmidt independence criterion HSIC,

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L)).

* :func:`linear_cka` - linear kernel, biased HSIC ``tr(K_c L_c)`` (Kornblith et al. 2019). The
  feature-space form ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` costs
  O(n p q) instead of O(n^2 (p + q)); the cheaper form is chosen automatically.
* :func:`rbf_cka` - kernel ``exp(-d^2 / (2 sigma^2))`` with ``sigma^2 = threshold^2 * median``
  of the full n x n matrix of squared distances, as in Kornblith's reference code.
* :func:`debiased_cka` - the unbiased HSIC estimator of Song et al. (2012), as used by
  Nguyen, Raghu & Kornblith (2021); near 0 for independent representations at any ``n``.
* :class:`MinibatchCKA` / :class:`MinibatchCKAMatrix` - the unbiased HSIC averaged over
  minibatches (Nguyen et al. 2021), for data sets that do not fit in memory.
* :func:`cka_matrix` / :func:`cka_report` - layer-by-layer similarity matrix with a heatmap.

Linear and RBF CKA lie in [0, 1] and are invariant to orthogonal transforms, isotropic scaling
and translation of either representation, but not to general invertible linear maps. Collapse
analysis (collapse index, drop points, the PC1 diagnostic) is in :mod:`.collapse`.

References: S. Kornblith, M. Norouzi, H. Lee, G. Hinton, "Similarity of Neural Network
Representations Revisited", ICML 2019. L. Song et al., "Feature Selection via Dependence
Maximization", JMLR 2012. T. Nguyen, M. Raghu, S. Kornblith, "Do Wide and Deep Networks Learn
the Same Things?", ICLR 2021.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hookscope.errors import AnalysisError

from ._validate import as_layers, as_matrix, centred, choice, in_range, require_signal, same_rows
from .dimensionality import smaller_gram
from .geometry import pca

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "KINDS",
    "linear_cka",
    "rbf_cka",
    "debiased_cka",
    "MinibatchCKA",
    "MinibatchCKAMatrix",
    "cka_matrix",
    "cka_report",
    "CKAMatrix",
    "without_pc1",
]

KINDS = ("linear", "debiased", "rbf")
MIN_BATCH = 4  # the unbiased HSIC estimator divides by n (n - 3)


# ------------------------------------------------------------------------ HSIC building blocks


def _cross_fro2(x: Tensor, y: Tensor) -> Tensor:
    """``||x^T y||_F^2 = tr(K L)`` for linear Gram matrices, by the cheaper of the two forms."""
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if x is y:
        return smaller_gram(x).square().sum()
    if p * q <= n * (p + q):
        return (x.T @ y).square().sum()
    return ((x @ x.T) * (y @ y.T)).sum()


def _hsic1_linear(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased HSIC (Song et al. 2012) for linear kernels, in feature space: O(n p q).

    With ``K~, L~`` the Gram matrices with zeroed diagonals,
    ``HSIC_1 = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3))``;
    every term is expanded so that no n x n matrix is formed.
    """
    n = x.shape[0]
    xd, yd = x.square().sum(1), y.square().sum(1)  # diagonals of K and L
    tr = _cross_fro2(x, y) - (xd * yd).sum()
    sx, sy = x.sum(0), y.sum(0)
    k1, l1 = x @ sx - xd, y @ sy - yd  # K~ 1 and L~ 1
    ones = (k1.sum() * l1.sum()) / ((n - 1) * (n - 2))
    return (tr + ones - 2.0 * (k1 @ l1) / (n - 2)) / (n * (n - 3))


def _hsic1_gram(k: Tensor, m: Tensor) -> Tensor:
    """Unbiased HSIC of two n x n Gram matrices (same estimator as :func:`_hsic1_linear`)."""
    n = k.shape[0]
    k, m = k.clone(), m.clone()
    k.fill_diagonal_(0.0)
    m.fill_diagonal_(0.0)
    k1, m1 = k.sum(1), m.sum(1)
    ones = (k1.sum() * m1.sum()) / ((n - 1) * (n - 2))
    return ((k * m).sum() + ones - 2.0 * (k1 @ m1) / (n - 2)) / (n * (n - 3))


def _center_gram(k: Tensor) -> Tensor:
    """``H K H`` with ``H = I - 11'/n``, in O(n^2)."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _median_all(t: Tensor) -> Tensor:
    """Median of all entries, averaging the two middle ones for an even count (numpy's)."""
    flat = t.reshape(-1)
    size = flat.numel()
    hi = flat.kthvalue(size // 2 + 1).values
    return hi if size % 2 else 0.5 * (hi + flat.kthvalue(size // 2).values)


def _rbf_gram(x: Tensor, threshold: float, name: str) -> Tensor:
    """RBF Gram matrix with ``sigma^2 = threshold^2 * median(squared distances)``."""
    g = x @ x.T
    sq = g.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * g).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    med = float(_median_all(d2))
    if med <= 0.0:
        raise AnalysisError(
            f"{name}: the median squared distance between samples is 0 (more than half of the "
            "sample pairs are identical), so the RBF bandwidth is undefined"
        )
    return torch.exp(-d2 / (2.0 * threshold**2 * med))


def _ratio(xy: Tensor, xx: Tensor, yy: Tensor, names: tuple[str, str]) -> float:
    for value, name in ((xx, names[0]), (yy, names[1])):
        if float(value) <= 0.0:
            raise AnalysisError(
                f"the HSIC of {name} with itself is {float(value):.3g} <= 0 (no usable "
                "variance at this sample size), so CKA is undefined"
            )
    return float(xy / torch.sqrt(xx * yy))


def _pair(X: Any, Y: Any, min_rows: int) -> tuple[Tensor, Tensor]:
    x, y = as_matrix(X, "X", min_rows=min_rows), as_matrix(Y, "Y", min_rows=min_rows)
    same_rows(x, y)
    xc, yc = centred(x), centred(y)
    require_signal(xc, x, "X", "CKA")
    require_signal(yc, y, "Y", "CKA")
    return xc, yc


# --------------------------------------------------------------------------- the three CKAs


def linear_cka(X: Float[Tensor, "n p"], Y: Float[Tensor, "n q"]) -> float:
    """Linear CKA (Kornblith et al. 2019) in [0, 1], by the feature-space form when n is large.

    Independent random representations give about ``sqrt(p q / ((n + p)(n + q)))``, not 0; use
    :func:`debiased_cka` to compare representations with many features relative to samples.
    """
    x, y = _pair(X, Y, 2)
    return _ratio(_cross_fro2(x, y), _cross_fro2(x, x), _cross_fro2(y, y), ("X", "Y"))


def debiased_cka(X: Float[Tensor, "n p"], Y: Float[Tensor, "n q"]) -> float:
    """Linear CKA from the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021).

    Near 0 for independent representations; can be slightly negative. Needs ``n >= 4``.
    """
    x, y = _pair(X, Y, MIN_BATCH)
    return _ratio(_hsic1_linear(x, y), _hsic1_linear(x, x), _hsic1_linear(y, y), ("X", "Y"))


def rbf_cka(
    X: Float[Tensor, "n p"], Y: Float[Tensor, "n q"], threshold: float = 0.5, debiased: bool = False
) -> float:
    """CKA with RBF kernels, bandwidth ``threshold`` times the median distance (Kornblith 2019).

    ``sigma^2 = threshold^2 * median`` of the full n x n squared-distance matrix (diagonal
    included), per representation. Forms two n x n matrices: memory O(n^2).
    """
    threshold = in_range(threshold, "threshold", 0.0, math.inf, closed_low=False)
    x, y = _pair(X, Y, MIN_BATCH if debiased else 2)
    k, m = _rbf_gram(x, threshold, "X"), _rbf_gram(y, threshold, "Y")
    if debiased:
        return _ratio(_hsic1_gram(k, m), _hsic1_gram(k, k), _hsic1_gram(m, m), ("X", "Y"))
    kc, mc = _center_gram(k), _center_gram(m)
    return _ratio((kc * mc).sum(), kc.square().sum(), mc.square().sum(), ("X", "Y"))


# ------------------------------------------------------------------------------ minibatch CKA


class MinibatchCKAMatrix:
    """Layer-by-layer debiased linear CKA accumulated over minibatches (Nguyen et al. 2021).

    Each ``update`` adds the unbiased HSIC of every pair of layers on one minibatch; ``value``
    is ``mean HSIC(i, j) / sqrt(mean HSIC(i, i) * mean HSIC(j, j))``. Memory is one minibatch
    plus an L x L accumulator; every batch needs at least 4 samples.

    >>> acc = MinibatchCKAMatrix()
    >>> acc.accumulate(batches)        # an iterable of lists / dicts of layer activations
    >>> acc.value()                    # [L, L] tensor; acc.report() gives a CKAMatrix
    """

    def __init__(self, names: Iterable[str] | None = None, sample_dims: int = 1) -> None:
        self.names = None if names is None else [str(n) for n in names]
        self.sample_dims = sample_dims
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._sum: Tensor | None = None
        self._features: list[int] | None = None
        self.n_batches = 0
        self.n_samples = 0

    def update(self, activations: Any) -> None:
        """Add one minibatch: a list / dict of ``[batch, ...]`` activations, one per layer."""
        names, mats = as_layers(activations, self.names, sample_dims=self.sample_dims, min_rows=1)
        if mats[0].shape[0] < MIN_BATCH:
            raise AnalysisError(
                f"need at least {MIN_BATCH} samples per minibatch, got {mats[0].shape[0]}"
            )
        features = [m.shape[1] for m in mats]
        if self._features is None:
            self._features, self.names = features, names
            self._sum = torch.zeros(len(mats), len(mats), dtype=torch.float64)
        elif features != self._features:
            raise AnalysisError(
                f"this batch has {len(features)} layers with {features} features but earlier "
                f"batches had {len(self._features)} with {self._features}"
            )
        xs = [centred(m) for m in mats]
        for i in range(len(xs)):
            for j in range(i, len(xs)):
                h = _hsic1_linear(xs[i], xs[i] if i == j else xs[j]).cpu()
                self._sum[i, j] += h
                if i != j:
                    self._sum[j, i] += h
        self.n_batches += 1
        self.n_samples += mats[0].shape[0]

    def accumulate(self, batches: Iterable[Any], progress: bool = True) -> MinibatchCKAMatrix:
        """``update`` with every batch of an iterable, with a progress bar; returns self."""
        for batch in tqdm(batches, desc="minibatch CKA", unit="batch", disable=not progress):
            self.update(batch)
        return self

    def value(self) -> Float[Tensor, "layers layers"]:
        """The accumulated debiased CKA matrix, float64."""
        if self._sum is None:
            raise AnalysisError("no minibatch has been added yet; call update() first")
        diag = self._sum.diagonal()
        bad = [self.names[i] for i in range(len(diag)) if float(diag[i]) <= 0.0]
        if bad:
            raise AnalysisError(f"layers {bad} have no usable variance; CKA is undefined")
        out = self._sum / torch.sqrt(diag[:, None] * diag[None, :])
        out.fill_diagonal_(1.0)
        return out

    def report(self) -> CKAMatrix:
        """The accumulated matrix as a :class:`CKAMatrix`."""
        return CKAMatrix(self.value(), list(self.names or []), "debiased (minibatch)")


class MinibatchCKA:
    """Debiased linear CKA of one pair of representations accumulated over minibatches.

    >>> mb = MinibatchCKA()
    >>> for xb, yb in loader: mb.update(xb, yb)     # doctest: +SKIP
    >>> mb.value()                                  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._acc = MinibatchCKAMatrix(names=("X", "Y"))

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._acc.reset()

    @property
    def n_batches(self) -> int:
        return self._acc.n_batches

    @property
    def n_samples(self) -> int:
        return self._acc.n_samples

    def update(self, X: Float[Tensor, "b p"], Y: Float[Tensor, "b q"]) -> None:
        """Add one minibatch of matching rows of X and Y (at least 4 samples)."""
        x, y = as_matrix(X, "X", min_rows=1), as_matrix(Y, "Y", min_rows=1)
        same_rows(x, y)
        self._acc.update([x, y])

    def accumulate(self, batches: Iterable[tuple[Any, Any]], progress: bool = True) -> MinibatchCKA:
        """``update`` with every ``(X, Y)`` batch of an iterable, with a progress bar."""
        for x, y in tqdm(batches, desc="minibatch CKA", unit="batch", disable=not progress):
            self.update(x, y)
        return self

    def value(self) -> float:
        """The accumulated debiased CKA."""
        return float(self._acc.value()[0, 1])


# ------------------------------------------------------------------------ layer-by-layer CKA


def _matrix(mats: list[Tensor], kind: str, threshold: float, progress: bool) -> Tensor:
    n_layers = len(mats)
    if kind == "linear":
        reps = [centred(m) for m in mats]
        hsic = _cross_fro2
    elif kind == "debiased":
        if mats[0].shape[0] < MIN_BATCH:
            raise AnalysisError(f"debiased CKA needs at least {MIN_BATCH} samples")
        reps = [centred(m) for m in mats]
        hsic = _hsic1_linear
    else:
        reps = [
            _center_gram(_rbf_gram(centred(m), threshold, f"layer {i}")) for i, m in enumerate(mats)
        ]

        def hsic(a: Tensor, b: Tensor) -> Tensor:
            return (a * b).sum()

    out = torch.eye(n_layers, dtype=torch.float64)
    self_terms = []
    for i, r in enumerate(reps):
        s = hsic(r, r)
        if float(s) <= 0.0:
            raise AnalysisError(f"layer {i} has no usable variance; CKA is undefined")
        self_terms.append(s)
    pairs = [(i, j) for i in range(n_layers) for j in range(i + 1, n_layers)]
    for i, j in tqdm(pairs, desc=f"{kind} CKA", unit="pair", disable=not progress):
        value = float(hsic(reps[i], reps[j]) / torch.sqrt(self_terms[i] * self_terms[j]))
        out[i, j] = out[j, i] = value
    return out


def without_pc1(m: Tensor) -> Tensor:
    """``m`` centred, with its first principal component projected out."""
    c = centred(m)
    top = pca(c, k=1, center=False).components  # [1, p]
    return c - (c @ top.T) @ top


def cka_matrix(
    activations: Any,
    kind: str = "linear",
    threshold: float = 0.5,
    sample_dims: int = 1,
    remove_pc1: bool = False,
    progress: bool = True,
) -> Float[Tensor, "layers layers"]:
    """CKA between every pair of layers of a list / dict / activation cache: [L, L] float64.

    Each activation is ``[samples, ...]``; the first ``sample_dims`` dimensions index samples
    and the rest are flattened into features. ``kind`` is ``"linear"`` (feature-space form,
    O(L^2 n d^2)), ``"debiased"`` or ``"rbf"`` (O(L n^2) memory). ``remove_pc1=True`` projects
    each layer's first principal component out first (see :func:`pc1_diagnostic`).
    """
    return _layer_matrix(activations, None, kind, threshold, sample_dims, remove_pc1, progress)[1]


def _layer_matrix(
    activations: Any,
    names: Any,
    kind: str,
    threshold: float,
    sample_dims: int,
    remove_pc1: bool,
    progress: bool,
) -> tuple[list[str], Tensor]:
    choice(kind, "kind", KINDS)
    threshold = in_range(threshold, "threshold", 0.0, math.inf, closed_low=False)
    found, mats = as_layers(activations, names, sample_dims=sample_dims)
    if remove_pc1:
        mats = [without_pc1(m) for m in mats]
    return found, _matrix(mats, kind, threshold, progress)


class CKAMatrix:
    """A layer-by-layer CKA matrix with its layer names.

    ``matrix``: [L, L] float64; ``names``: L layer names; ``kind``: which CKA.
    """

    def __init__(self, matrix: Tensor, names: list[str], kind: str) -> None:
        if len(names) != matrix.shape[0]:
            raise AnalysisError(f"{len(names)} names for a {matrix.shape[0]}-layer matrix")
        self.matrix, self.names, self.kind = matrix, list(names), kind

    def to_pandas(self) -> pd.DataFrame:
        """The matrix as a DataFrame indexed by layer name on both axes."""
        return pd.DataFrame(self.matrix.cpu().numpy(), index=self.names, columns=self.names)

    def __repr__(self) -> str:
        body = self.to_pandas().to_string(float_format=lambda v: f"{v:.3f}")
        return f"CKAMatrix({self.kind}, {len(self.names)} layers)\n{body}"

    def plot(self, annotate: bool | None = None) -> Figure:
        """Heatmap of the matrix (annotated with values when there are at most 12 layers)."""
        mat = self.matrix.cpu().numpy()
        n = len(self.names)
        from hookscope.plot import figure

        fig = figure(figsize=(1.2 + 0.45 * max(n, 6), 0.8 + 0.45 * max(n, 6)))
        ax = fig.subplots()
        im = ax.imshow(mat, vmin=min(0.0, float(mat.min())), vmax=1.0, cmap="magma")
        fig.colorbar(im, ax=ax, label=f"{self.kind} CKA")
        step = max(1, n // 30)
        ax.set_xticks(np.arange(0, n, step), self.names[::step], rotation=90, fontsize=7)
        ax.set_yticks(np.arange(0, n, step), self.names[::step], fontsize=7)
        if annotate if annotate is not None else n <= 12:
            for i in range(n):
                for j in range(n):
                    color = "black" if mat[i, j] > 0.6 else "white"
                    ax.text(
                        j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6, color=color
                    )
        ax.set_title("layer-by-layer CKA")
        fig.tight_layout()
        return fig


def cka_report(
    activations: Any,
    kind: str = "linear",
    threshold: float = 0.5,
    names: Any = None,
    sample_dims: int = 1,
    remove_pc1: bool = False,
    progress: bool = True,
) -> CKAMatrix:
    """:func:`cka_matrix` wrapped in a :class:`CKAMatrix` (names, table, heatmap)."""
    found, matrix = _layer_matrix(
        activations, names, kind, threshold, sample_dims, remove_pc1, progress
    )
    return CKAMatrix(matrix, found, kind + (" without PC1" if remove_pc1 else ""))
