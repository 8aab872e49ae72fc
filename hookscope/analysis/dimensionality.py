"""Dimensionality metrics of an activation matrix: five views of one singular spectrum.

All metrics are functions of the singular values ``s_1 >= s_2 >= ...`` of the activation
matrix ``A`` ([samples, features]), centred by default. Centred, ``s_i**2 / (n - 1)`` are the
eigenvalues ``lambda_i`` of the feature covariance matrix (PCA variances), which is what the
standard definitions use; ``center=False`` measures the raw second-moment matrix instead, where
a large mean offset shows up as one dominant direction (see the centring note below).

========================  ==========================================  =======================
metric                    definition                                  needs
========================  ==========================================  =======================
stable_rank               sum(s**2) / s_1**2                          top singular value
participation_ratio       (sum lambda)**2 / sum(lambda**2)            two traces
effective_rank            exp(entropy(s / sum(s)))  (Roy & Vetterli)  full spectrum
energy_rank(e)            least k with sum_{i<=k} s_i**2 >= e * total full spectrum
nuclear_norm_ratio        sum(s) / s_1  (nuclear / spectral norm)     full spectrum
========================  ==========================================  =======================

Each lies in ``[1, rank(A)]`` and equals ``k`` for a matrix with ``k`` equal non-zero singular
values. Fast paths: the spectrum comes from the eigenvalues of the Gram matrix on the smaller
side (``A^T A`` or ``A A^T``), never a full SVD; the participation ratio uses the traces
``tr(G) = ||A||_F^2`` and ``tr(G^2) = ||G||_F^2`` and needs no spectrum; the top singular value
for the stable rank can come from a warm-started power iteration (:func:`top_singular_value`).

Compatibility note: the dimensionality-tracking project these metrics came from computed a
"participation ratio" as ``(sum s)**2 / sum(s**2)`` on *uncentred singular values*. That is not
the standard covariance-eigenvalue definition; it is available only as
``participation_ratio(A, center=False, form="singular_values")``.

References: O. Roy & M. Vetterli, "The effective rank: a measure of effective dimensionality",
EUSIPCO 2007. P. Gao, E. Trautmann et al., "A theory of multineuronal dimensionality, dynamics
and measurement", 2017 (participation ratio). M. Rudelson & R. Vershynin 2007 (stable rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hookscope.errors import AnalysisError

from ._validate import as_matrix, choice, in_range, maybe_centred, require_signal
from .jumps import Jump, detect_jumps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "METRICS",
    "spectrum",
    "stable_rank",
    "participation_ratio",
    "effective_rank",
    "energy_rank",
    "nuclear_norm_ratio",
    "top_singular_value",
    "layer_metrics",
    "dimensionality_report",
    "DimensionalityReport",
    "DimensionalityTracker",
]

METRICS = (
    "stable_rank",
    "participation_ratio",
    "effective_rank",
    "energy_rank",
    "nuclear_norm_ratio",
)
_TRACE_METRICS = {"stable_rank", "participation_ratio"}


# --------------------------------------------------------------------------- the one spectrum


def smaller_gram(a: Tensor) -> Tensor:
    """``a^T a`` or ``a a^T``, whichever is smaller; both have the eigenvalues ``s_i**2``."""
    return a.T @ a if a.shape[1] <= a.shape[0] else a @ a.T


def _prepared(a: Any, center: bool, name: str = "A") -> Tensor:
    raw = as_matrix(a, name)
    m = maybe_centred(raw, center)
    require_signal(m, raw, name, "its dimensionality")
    return m


def _spectrum_of(m: Tensor) -> Tensor:
    # torch's LAPACK follows torch.set_num_threads; numpy's OpenBLAS spins its own threads
    # (64 x 64: 3.7 ms with 2 OpenBLAS threads on a busy 2-core machine, 0.15-0.4 ms here)
    ev = torch.linalg.eigvalsh(smaller_gram(m)).flip(0)
    # eigenvalues of the Gram matrix carry round-off of order max(n, p) * eps * s_1**2: below
    # that level they are zero (the numerical-rank convention of numpy.linalg.matrix_rank)
    noise = max(m.shape) * torch.finfo(ev.dtype).eps * ev[0]
    return torch.where(ev > noise, ev, torch.zeros_like(ev))


def _numpy_spectrum(a: np.ndarray, center: bool) -> np.ndarray:
    """:func:`spectrum` of a numpy matrix without torch: the same checks, centring and
    round-off rule (an error is raised through the torch path, for the same message)."""
    m = np.asarray(a, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] < 2 or m.shape[1] < 1 or not np.isfinite(m.sum()):
        _prepared(m, center)  # raises the standard AnalysisError
    scale = float(np.abs(m).max())
    if center:
        m = m - m.mean(axis=0, keepdims=True)
    if scale == 0.0 or float(np.abs(m).max()) <= 64 * np.finfo(np.float64).eps * scale:
        _prepared(np.asarray(a, dtype=np.float64), center)  # raises "no variance"
    g = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
    ev = np.linalg.eigvalsh(g)[::-1]
    noise = max(m.shape) * np.finfo(np.float64).eps * ev[0]
    return np.where(ev > noise, ev, 0.0)


def spectrum(A: Float[Tensor, "n p"], center: bool = True) -> Float[Tensor, " k"]:  # k = min(n, p)
    """Squared singular values ``s_i**2`` of ``A`` (centred by default), descending, float64.

    Centred, these are ``(n - 1)`` times the covariance eigenvalues. Computed from the
    eigenvalues of the Gram matrix on the smaller side; values below the round-off level
    ``max(n, p) * eps * s_1**2`` are set to exactly 0.
    """
    return _spectrum_of(_prepared(A, center))


def _from_spectrum(ev: Tensor | np.ndarray, metric: str, energy: float = 0.9) -> float:
    """One metric from a descending spectrum of squared singular values (the one definition).

    Computed in numpy (the spectrum is short; numpy's per-call cost is a fraction of torch's).
    """
    e = ev.detach().cpu().numpy() if isinstance(ev, Tensor) else np.asarray(ev)
    total = e.sum()
    if metric == "stable_rank":
        return float(total / e[0])
    if metric == "participation_ratio":
        return float(total**2 / np.square(e).sum())
    s = np.sqrt(e)
    if metric == "participation_ratio_singular_values":
        return float(s.sum() ** 2 / total)
    if metric == "effective_rank":
        p = s / s.sum()
        p = p[p > 0]
        return float(np.exp(-(p * np.log(p)).sum()))
    if metric == "energy_rank":
        frac = np.cumsum(e) / total
        # a tolerance so that exactly 90 % of equal values counts as reaching 90 %
        k = int(np.searchsorted(frac, energy - 1e-12)) + 1
        return min(k, e.shape[0])
    if metric == "nuclear_norm_ratio":
        return float(s.sum() / s[0])
    raise AnalysisError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


# ------------------------------------------------------------------------- public functions


def stable_rank(A: Float[Tensor, "n p"], center: bool = True) -> float:
    """Stable rank ``||A||_F^2 / ||A||_2^2 = sum(s**2) / s_1**2`` (centred by default)."""
    m = _prepared(A, center)
    top = torch.linalg.eigvalsh(smaller_gram(m))[-1]
    return float(m.square().sum() / top)


def participation_ratio(
    A: Float[Tensor, "n p"], center: bool = True, form: str = "covariance"
) -> float:
    """Participation ratio ``(sum lambda)**2 / sum(lambda**2)`` of the covariance eigenvalues.

    Computed from traces, no spectrum: ``tr(G)**2 / ||G||_F**2`` with ``G`` the smaller Gram
    matrix. ``form="singular_values"`` is a compatibility option only: it returns
    ``(sum s)**2 / sum(s**2)`` on singular values (what the dimensionality-tracking project
    computed, with ``center=False``); it is not the standard participation ratio.
    """
    choice(form, "form", ("covariance", "singular_values"))
    m = _prepared(A, center)
    if form == "singular_values":
        return _from_spectrum(_spectrum_of(m), "participation_ratio_singular_values")
    return float(m.square().sum() ** 2 / smaller_gram(m).square().sum())


def effective_rank(A: Float[Tensor, "n p"], center: bool = True) -> float:
    """Effective rank ``exp(H(p))``, ``p_i = s_i / sum(s)`` (Roy & Vetterli 2007)."""
    return _from_spectrum(spectrum(A, center), "effective_rank")


def energy_rank(A: Float[Tensor, "n p"], energy: float = 0.9, center: bool = True) -> int:
    """Least ``k`` whose top ``k`` squared singular values hold ``energy`` of the total.

    Centred, this is the number of principal components explaining ``energy`` of the variance.
    """
    energy = in_range(energy, "energy", 0.0, 1.0, closed_low=False)
    return _from_spectrum(spectrum(A, center), "energy_rank", energy)


def nuclear_norm_ratio(A: Float[Tensor, "n p"], center: bool = True) -> float:
    """Nuclear over spectral norm, ``sum(s) / s_1``: a rank surrogate in ``[1, rank]``."""
    return _from_spectrum(spectrum(A, center), "nuclear_norm_ratio")


def top_singular_value(
    A: Float[Tensor, "n p"],
    center: bool = True,
    v0: Float[Tensor, " p"] | None = None,
    tol: float = 1e-9,
    max_iter: int = 300,
) -> tuple[float, Float[Tensor, " p"]]:
    """Top singular value ``s_1`` and right singular vector of ``A`` by power iteration.

    Pass the vector returned at the previous training step as ``v0`` (warm start): when the
    top direction moves slowly a few iterations suffice. The iteration runs on the Gram
    matrix of the smaller side, started from ``A v0``; it stops when the Rayleigh quotient
    changes by less than ``tol`` (relative), and falls back to an exact eigendecomposition
    if that has not happened after ``max_iter`` iterations.
    """
    m = _prepared(A, center)
    return _power_top(m, smaller_gram(m), v0, tol, max_iter)


def _power_top(
    m: Tensor, g: Tensor, v0: Any, tol: float = 1e-9, max_iter: int = 300
) -> tuple[float, Tensor]:
    """Power iteration for :func:`top_singular_value` on ``m`` and its smaller Gram ``g``."""
    p = m.shape[1]
    rows_side = m.shape[0] < p  # then g is the n x n Gram matrix (see smaller_gram)
    starts = []
    if v0 is not None:
        v = as_matrix(torch.as_tensor(v0).reshape(1, -1), "v0", min_rows=1)[0].to(m.device)
        if v.shape[0] != p:
            raise AnalysisError(f"v0 has {v.shape[0]} entries but A has {p} features")
        starts.append(v)
    gen = torch.Generator().manual_seed(0)
    starts.append(torch.randn(p, generator=gen, dtype=torch.float64).to(m.device))
    for v in starts:  # a warm start orthogonal to A's row space falls back to a random one
        u = m @ v if rows_side else v
        if float(u.norm()) > 0.0:
            break
    u = u / u.norm()
    prev = 0.0
    for _ in range(max_iter):
        w = g @ u
        rho = float(u @ w)
        u = w / w.norm()
        if abs(rho - prev) <= tol * rho:
            break
        prev = rho
    else:
        evals, evecs = torch.linalg.eigh(g)
        rho, u = float(evals[-1]), evecs[:, -1]
    v = m.T @ u if rows_side else u
    return math.sqrt(max(rho, 0.0)), v / v.norm()


def layer_metrics(
    A: Float[Tensor, "n p"],
    metrics: tuple[str, ...] | list[str] = METRICS,
    center: bool = True,
    energy: float = 0.9,
    v0: Float[Tensor, " p"] | None = None,
) -> tuple[dict[str, float], Float[Tensor, " p"] | None]:
    """The chosen ``metrics`` of ``A`` on the cheapest path, and the top direction for next time.

    When only the stable rank and participation ratio are asked for, no spectrum is computed:
    the participation ratio comes from the traces of the smaller Gram matrix and the top
    singular value from a power iteration warm-started at ``v0`` (pass the vector this
    function returned for the previous step of the same layer; ``None`` when the layer's
    width changed or at the first step). Otherwise one Gram eigendecomposition serves all
    metrics and the returned direction is ``None``. Values equal :func:`dimensionality_report`'s.
    """
    for name in metrics:
        if name not in METRICS:
            choice(name, "metric", METRICS)
    if isinstance(A, np.ndarray):  # numpy in, numpy throughout (a tracker's worker process)
        ev = _numpy_spectrum(A, center)
        return {k: _from_spectrum(ev, k, energy) for k in metrics}, None
    m = _prepared(A, center)
    out: dict[str, float] = {}
    if set(metrics) <= _TRACE_METRICS:
        total, g = m.square().sum(), smaller_gram(m)
        if "participation_ratio" in metrics:
            out["participation_ratio"] = float(total**2 / g.square().sum())
        v = None
        if "stable_rank" in metrics:
            warm = v0 if v0 is not None and v0.shape[0] == m.shape[1] else None
            s1, v = _power_top(m, g, warm)
            out["stable_rank"] = float(total) / s1**2
        return {k: out[k] for k in metrics}, v
    ev = _spectrum_of(m).numpy() if m.device.type == "cpu" else _spectrum_of(m).cpu().numpy()
    return {k: _from_spectrum(ev, k, energy) for k in metrics}, None


# --------------------------------------------------------------------------- result objects


@dataclass(frozen=True, repr=False)
class DimensionalityReport:
    """All five dimensionality metrics of one activation matrix, from one spectrum."""

    stable_rank: float
    participation_ratio: float
    effective_rank: float
    energy_rank: int
    nuclear_norm_ratio: float
    energy: float
    center: bool
    n_samples: int
    n_features: int
    spectrum: Tensor = field(compare=False)  # squared singular values, descending

    def metrics(self) -> dict[str, float]:
        """``{metric name: value}`` for the five metrics."""
        return {name: getattr(self, name) for name in METRICS}

    def to_pandas(self) -> pd.DataFrame:
        """One row per metric: ``metric``, ``value``, plus the conventions used."""
        rows = [
            {"metric": k, "value": v, "center": self.center, "energy": self.energy}
            for k, v in self.metrics().items()
        ]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        head = (
            f"DimensionalityReport({self.n_samples} samples x {self.n_features} features, "
            f"{'centred' if self.center else 'uncentred'}, energy={self.energy:g})"
        )
        lines = [
            f"  {k:<20} {v:>10}" if isinstance(v, int) else f"  {k:<20} {v:>10.4f}"
            for k, v in self.metrics().items()
        ]
        return "\n".join([head, *lines])

    def plot(self) -> Figure:
        """Scree plot of the normalised spectrum with its cumulative energy."""
        ev = self.spectrum.cpu().numpy()
        frac = ev / ev.sum()
        from hookscope.plot import figure

        fig = figure(figsize=(6, 3.5))
        ax = fig.subplots()
        idx = np.arange(1, len(ev) + 1)
        ax.semilogy(idx, np.maximum(frac, 1e-300), ".-", ms=3, label="energy fraction")
        ax.set_xlabel("component")
        ax.set_ylabel("fraction of energy (log)")
        ax2 = ax.twinx()
        ax2.plot(idx, np.cumsum(frac), color="C1", label="cumulative")
        ax2.axhline(self.energy, color="C1", ls=":", lw=0.8)
        ax2.axvline(self.energy_rank, color="C2", ls="--", lw=0.8)
        ax2.set_ylabel("cumulative energy")
        ax2.set_ylim(0, 1.02)
        ax.set_title(
            f"PR={self.participation_ratio:.1f}  eff.rank={self.effective_rank:.1f}  "
            f"{self.energy:.0%} energy at k={self.energy_rank}"
        )
        fig.tight_layout()
        return fig


def dimensionality_report(
    A: Float[Tensor, "n p"], center: bool = True, energy: float = 0.9
) -> DimensionalityReport:
    """All five metrics of ``A`` from one Gram-matrix eigendecomposition."""
    energy = in_range(energy, "energy", 0.0, 1.0, closed_low=False)
    m = _prepared(A, center)
    ev = _spectrum_of(m)
    values = {name: _from_spectrum(ev, name, energy) for name in METRICS}
    return DimensionalityReport(
        **values,
        energy=energy,
        center=bool(center),
        n_samples=m.shape[0],
        n_features=m.shape[1],
        spectrum=ev,
    )


class DimensionalityTracker:
    """Dimensionality metrics of one layer over training steps.

    ``tracker.update(step, activations)`` records the chosen ``metrics``. When only the stable
    rank and participation ratio are asked for, no spectrum is computed: the participation
    ratio comes from traces and the top singular value from a power iteration warm-started
    at the previous step's top direction. Otherwise one Gram eigendecomposition serves all.

    >>> tr = DimensionalityTracker(metrics=("participation_ratio", "stable_rank"))
    >>> for step, acts in checkpoints: tr.update(step, acts)      # doctest: +SKIP
    >>> tr.to_pandas(); tr.jumps("participation_ratio")           # doctest: +SKIP
    """

    def __init__(
        self,
        metrics: tuple[str, ...] | list[str] = METRICS,
        center: bool = True,
        energy: float = 0.9,
    ) -> None:
        if isinstance(metrics, str) or not metrics:
            raise AnalysisError(f"metrics must be a non-empty tuple of names from {METRICS}")
        for name in metrics:
            choice(name, "metric", METRICS)
        self.metrics = tuple(metrics)
        self.center = bool(center)
        self.energy = in_range(energy, "energy", 0.0, 1.0, closed_low=False)
        self.history: list[dict[str, float]] = []
        self._v: Tensor | None = None

    def update(self, step: int, A: Float[Tensor, "n p"]) -> dict[str, float]:
        """Compute the metrics of ``A`` at training ``step`` and record them."""
        if self.history and step <= self.history[-1]["step"]:
            raise AnalysisError(
                f"steps must increase; got step {step} after step {self.history[-1]['step']}"
            )
        values, self._v = layer_metrics(A, self.metrics, self.center, self.energy, self._v)
        row: dict[str, float] = {"step": step, **values}
        self.history.append(row)
        return {k: v for k, v in row.items() if k != "step"}

    def to_pandas(self) -> pd.DataFrame:
        """One row per recorded step, one column per metric."""
        return pd.DataFrame(self.history, columns=["step", *self.metrics])

    def jumps(self, metric: str, **kwargs: Any) -> list[Jump]:
        """Abrupt changes of one metric over steps (:func:`hookscope.analysis.detect_jumps`)."""
        choice(metric, "metric", self.metrics)
        df = self.to_pandas()
        return detect_jumps(df[metric].to_numpy(float), steps=df["step"].to_numpy(), **kwargs)

    def __repr__(self) -> str:
        if not self.history:
            return f"DimensionalityTracker(metrics={self.metrics}, no steps yet)"
        return f"DimensionalityTracker({len(self.history)} steps)\n" + self.to_pandas().to_string(
            index=False, float_format=lambda x: f"{x:.4f}"
        )

    def plot(self) -> Figure:
        """One panel per metric against training step."""
        df = self.to_pandas()
        from hookscope.plot import figure

        fig = figure(figsize=(6, 1.8 * len(self.metrics) + 0.6))
        axes = np.atleast_1d(fig.subplots(len(self.metrics), 1, sharex=True))
        for ax, name in zip(axes, self.metrics, strict=True):
            ax.plot(df["step"], df[name], ".-", ms=3)
            ax.set_ylabel(name.replace("_", " "), fontsize=8)
        axes[-1].set_xlabel("step")
        fig.tight_layout()
        return fig
