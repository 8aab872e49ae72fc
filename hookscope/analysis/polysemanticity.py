"""Polysemanticity: how probe directions sit relative to the neuron basis.

A probe for feature ``k`` is a weight vector ``w_k`` over the ``d`` neurons of a layer
(``W``: [k, d], one row per probe). Three numbers per direction measure neuron alignment:

* ``max_cos``: largest ``|cos(w, e_j)| = max_j |w_j| / ||w||`` with a basis vector;
  1 for a one-hot direction (the feature is one neuron).
* ``participation_ratio``: ``(sum w_j^2)^2 / sum w_j^4``, the effective number of neurons
  the direction uses; 1 for one-hot, ``d`` for a uniform vector, ``(d + 2) / 3`` on average
  for a random direction.
* ``kurtosis``: excess kurtosis of the entries (Fisher, population moments, centred as
  ``scipy.stats.kurtosis``); about 0 for a random direction, large for a sparse one.

Each is compared with the *random-direction baseline* for the same ``d``: the distribution
of the same number over uniformly random unit vectors (Monte Carlo, seeded). A direction is
*neuron-aligned* (monosemantic at the neuron level) when ``max_cos >= alignment_threshold``
and above the baseline's 99.9th percentile.

Across probes, the *loading z-score* of neuron ``j`` on probe ``k`` is
``sqrt(d) * w_kj / ||w_k||``: the entry in units of its standard deviation under a random
direction (each coordinate of a random unit vector has variance exactly ``1/d``). The
multi-feature loading index of a neuron is the number of probes on which ``|z| >= z_threshold``;
a *candidate polysemantic neuron* loads highly on at least two probes whose directions are
unrelated (``|cos(w_a, w_b)| < unrelated_below``).

References: N. Elhage et al., "Toy Models of Superposition", 2022; A. Scherlis et al.,
"Polysemanticity and Capacity in Neural Networks", 2022.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from hookscope.errors import AnalysisError

from ._validate import as_matrix, in_range, positive_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ALIGNMENT_METRICS",
    "RandomDirectionBaseline",
    "random_direction_baseline",
    "NeuronAlignment",
    "neuron_alignment",
    "loading_zscores",
    "multi_feature_loading_index",
    "polysemantic_candidates",
    "PolysemanticityReport",
    "polysemanticity_report",
]

ALIGNMENT_METRICS = ("max_cos", "participation_ratio", "kurtosis")
_QUANTILES = (0.001, 0.01, 0.5, 0.99, 0.999)


def _named(W: Any, names: Any) -> tuple[Any, Any]:
    """A ``{name: direction}`` mapping (e.g. a probe sweep's ``directions``) as stacked rows
    and its names; anything else unchanged. Multiclass entries ([K, d]) give K rows each."""
    if not isinstance(W, Mapping):
        return W, names
    rows, found = [], []
    for key, value in W.items():
        v = torch.as_tensor(value) if not isinstance(value, Tensor) else value
        v = v.reshape(1, -1) if v.ndim == 1 else v
        rows.append(v)
        found += [str(key)] if v.shape[0] == 1 else [f"{key}[{k}]" for k in range(v.shape[0])]
    if not rows:
        raise AnalysisError("W is an empty mapping; give at least one direction")
    widths = {r.shape[1] for r in rows}
    if len(widths) != 1:
        raise AnalysisError(f"the directions in W have different widths {sorted(widths)}")
    return torch.cat(rows), names if names is not None else found


def _directions(W: Any, name: str = "W") -> Tensor:
    w = torch.as_tensor(W) if not isinstance(W, Tensor) else W
    if w.ndim == 1:
        w = w.reshape(1, -1)
    w = as_matrix(w, name, min_rows=1)
    if w.shape[1] < 2:
        raise AnalysisError(f"{name} needs at least 2 neurons (columns); got {w.shape[1]}")
    zero = torch.nonzero(w.norm(dim=1) == 0).flatten().tolist()
    if zero:
        raise AnalysisError(f"{name} rows {zero} are all zero: a direction needs a non-zero norm")
    return w


def _direction_metrics(w: Tensor) -> dict[str, Tensor]:
    """The three alignment metrics of every row of ``w`` ([k, d]): each a [k] tensor."""
    sq = w.square()
    c = w - w.mean(dim=1, keepdim=True)
    m2, m4 = c.square().mean(dim=1), c.pow(4).mean(dim=1)
    return {
        "max_cos": w.abs().max(dim=1).values / sq.sum(dim=1).sqrt(),
        "participation_ratio": sq.sum(dim=1).square() / sq.square().sum(dim=1),
        "kurtosis": torch.where(m2 > 0, m4 / m2.clamp_min(1e-300).square() - 3.0, 0.0),
    }


@dataclass(frozen=True, repr=False)
class RandomDirectionBaseline:
    """Distribution of the alignment metrics over random unit vectors in ``dim`` dimensions.

    ``samples[metric]``: [n_samples] values; ``mean``, ``std`` and ``quantile`` summarise them.
    """

    dim: int
    samples: dict[str, Tensor]

    def mean(self, metric: str) -> float:
        return float(self.samples[metric].mean())

    def std(self, metric: str) -> float:
        return float(self.samples[metric].std())

    def quantile(self, metric: str, q: float) -> float:
        return float(torch.quantile(self.samples[metric], q))

    def percentile_of(self, metric: str, value: float) -> float:
        """Fraction of random directions whose ``metric`` is below ``value``."""
        return float((self.samples[metric] < value).double().mean())

    def to_pandas(self) -> pd.DataFrame:
        """One row per metric: mean, std and quantiles."""
        rows = []
        for m in ALIGNMENT_METRICS:
            row = {"metric": m, "mean": self.mean(m), "std": self.std(m)}
            row.update({f"q{q:g}": self.quantile(m, q) for q in _QUANTILES})
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        n = len(self.samples["max_cos"])
        return (
            f"RandomDirectionBaseline(dim={self.dim}, {n} samples)\n"
            + self.to_pandas().to_string(index=False, float_format=lambda v: f"{v:.4f}")
        )

    def plot(self) -> Figure:
        """Histograms of the three metrics over random directions."""
        from hookscope.plot import figure

        fig = figure(figsize=(9, 2.8))
        for ax, m in zip(fig.subplots(1, 3), ALIGNMENT_METRICS, strict=True):
            ax.hist(self.samples[m].cpu().numpy(), bins=40)
            ax.set_title(m, fontsize=9)
        fig.tight_layout()
        return fig


def random_direction_baseline(
    dim: int, n_samples: int = 2000, seed: int = 0
) -> RandomDirectionBaseline:
    """Alignment metrics of ``n_samples`` uniformly random unit vectors in ``dim`` dimensions."""
    dim = positive_int(dim, "dim", minimum=2)
    n_samples = positive_int(n_samples, "n_samples", minimum=10)
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64)
    return RandomDirectionBaseline(dim, _direction_metrics(g))


@dataclass(frozen=True, repr=False)
class NeuronAlignment:
    """Per-probe neuron alignment against the random-direction baseline."""

    names: list[str]
    metrics: dict[str, Tensor]  # each [k]
    top_neuron: Tensor  # [k]
    aligned: Tensor  # [k] bool
    baseline: RandomDirectionBaseline
    alignment_threshold: float

    def to_pandas(self) -> pd.DataFrame:
        """One row per probe: metrics, their baseline z-scores and the aligned flag."""
        df = pd.DataFrame({"probe": self.names, "top_neuron": self.top_neuron.cpu().numpy()})
        for m in ALIGNMENT_METRICS:
            values = self.metrics[m].cpu().numpy()
            df[m] = values
            df[f"{m}_z"] = (values - self.baseline.mean(m)) / self.baseline.std(m)
        df["aligned"] = self.aligned.cpu().numpy()
        return df

    def __repr__(self) -> str:
        return (
            f"NeuronAlignment({len(self.names)} probes, d={self.baseline.dim}, "
            f"{int(self.aligned.sum())} neuron-aligned)\n"
            + self.to_pandas().to_string(index=False, float_format=lambda v: f"{v:.3f}")
        )

    def plot(self) -> Figure:
        """max |cos| against participation ratio, with the random baseline's 1-99.9 % band."""
        from hookscope.plot import figure

        fig = figure(figsize=(5.5, 4))
        ax = fig.subplots()
        b = self.baseline
        ax.axvspan(
            b.quantile("max_cos", 0.001),
            b.quantile("max_cos", 0.999),
            color="gray",
            alpha=0.2,
            label="random 0.1-99.9 %",
        )
        ax.axvline(self.alignment_threshold, color="C3", ls=":", lw=1)
        ax.scatter(self.metrics["max_cos"].numpy(), self.metrics["participation_ratio"].numpy())
        for i, name in enumerate(self.names[:40]):
            ax.annotate(
                name,
                (float(self.metrics["max_cos"][i]), float(self.metrics["participation_ratio"][i])),
                fontsize=7,
            )
        ax.set_xlabel("max |cos| with a neuron")
        ax.set_ylabel("weight participation ratio")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def _names(names: Any, k: int) -> list[str]:
    if names is None:
        return [f"probe{i}" for i in range(k)]
    found = [str(n) for n in names]
    if len(found) != k:
        raise AnalysisError(f"names has {len(found)} entries but W has {k} probes (rows)")
    return found


def neuron_alignment(
    W: Float[Tensor, "k d"],
    names: Any = None,
    alignment_threshold: float = 0.7,
    baseline: RandomDirectionBaseline | None = None,
    n_baseline: int = 2000,
    seed: int = 0,
) -> NeuronAlignment:
    """Neuron alignment of probe directions ``W`` ([k, d] or [d], or ``{name: direction}``
    such as a probe sweep's ``directions``) against random directions.

    A probe is neuron-aligned when ``max_cos >= alignment_threshold`` (0.7: half its squared
    weight on one neuron) and above the baseline's 99.9th percentile.
    """
    W, names = _named(W, names)
    w = _directions(W)
    thr = in_range(alignment_threshold, "alignment_threshold", 0.0, 1.0, closed_low=False)
    if baseline is None:
        baseline = random_direction_baseline(w.shape[1], n_baseline, seed)
    elif baseline.dim != w.shape[1]:
        raise AnalysisError(f"baseline is for dimension {baseline.dim} but W has {w.shape[1]}")
    metrics = _direction_metrics(w)
    aligned = (metrics["max_cos"] >= thr) & (
        metrics["max_cos"] > baseline.quantile("max_cos", 0.999)
    )
    top = w.abs().argmax(dim=1)
    return NeuronAlignment(_names(names, w.shape[0]), metrics, top, aligned, baseline, thr)


def loading_zscores(W: Float[Tensor, "k d"]) -> Float[Tensor, "k d"]:
    """``sqrt(d) * w_kj / ||w_k||``: each weight in units of its random-direction std."""
    w = _directions(W)
    return w.shape[1] ** 0.5 * w / w.norm(dim=1, keepdim=True)


def multi_feature_loading_index(
    W: Float[Tensor, "k d"], z_threshold: float = 4.0
) -> Float[Tensor, " d"]:
    """Per neuron, the number of probes it loads highly on (``|loading z| >= z_threshold``)."""
    z_threshold = in_range(z_threshold, "z_threshold", 0.0, np.inf, closed_low=False)
    return (loading_zscores(W).abs() >= z_threshold).sum(dim=0)


def _candidates(
    z: Tensor, w: Tensor, z_threshold: float, unrelated_below: float
) -> dict[int, list[int]]:
    unit = w / w.norm(dim=1, keepdim=True)
    related = (unit @ unit.T).abs() >= unrelated_below
    high = z.abs() >= z_threshold
    out = {}
    for j in torch.nonzero(high.sum(dim=0) >= 2).flatten().tolist():
        probes = torch.nonzero(high[:, j]).flatten()
        sub = related[probes][:, probes]
        if bool((~sub).any()):  # at least one pair of unrelated probes
            out[j] = probes.tolist()
    return out


def polysemantic_candidates(
    W: Float[Tensor, "k d"], z_threshold: float = 4.0, unrelated_below: float = 0.5
) -> list[int]:
    """Neurons loading highly on at least two unrelated probes, ascending neuron index."""
    w = _directions(W)
    z_threshold = in_range(z_threshold, "z_threshold", 0.0, np.inf, closed_low=False)
    unrelated_below = in_range(unrelated_below, "unrelated_below", 0.0, 1.0, closed_low=False)
    return sorted(_candidates(loading_zscores(w), w, z_threshold, unrelated_below))


@dataclass(frozen=True, repr=False)
class PolysemanticityReport:
    """Alignment per probe, loading z-scores, loading index and candidate neurons."""

    alignment: NeuronAlignment
    loading_z: Tensor  # [k, d]
    loading_index: Tensor  # [d]
    candidates: dict[int, list[int]]  # neuron -> probes it loads highly on
    z_threshold: float

    def to_pandas(self) -> pd.DataFrame:
        """One row per candidate neuron: the probes it loads on and its largest |z|."""
        names = self.alignment.names
        rows = [
            {
                "neuron": j,
                "n_features": len(p),
                "features": ", ".join(names[i] for i in p),
                "max_abs_z": float(self.loading_z[p, j].abs().max()),
            }
            for j, p in self.candidates.items()
        ]
        return pd.DataFrame(rows, columns=["neuron", "n_features", "features", "max_abs_z"])

    def __repr__(self) -> str:
        head = (
            f"PolysemanticityReport({len(self.alignment.names)} probes over "
            f"{self.loading_z.shape[1]} neurons, {int(self.alignment.aligned.sum())} "
            f"neuron-aligned, {len(self.candidates)} candidate polysemantic neurons)"
        )
        if not self.candidates:
            return head
        return (
            head + "\n" + self.to_pandas().to_string(index=False, float_format=lambda v: f"{v:.2f}")
        )

    def plot(self, max_neurons: int = 40) -> Figure:
        """Heatmap of |loading z| for the neurons with the highest loading index."""
        order = torch.argsort(self.loading_z.abs().max(dim=0).values, descending=True)
        cols = sorted(set(self.candidates) | set(order[:max_neurons].tolist()))[:max_neurons]
        data = self.loading_z[:, cols].abs().cpu().numpy()
        from hookscope.plot import figure

        fig = figure(figsize=(1.5 + 0.22 * len(cols), 1.2 + 0.3 * data.shape[0]))
        ax = fig.subplots()
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, label="|loading z|")
        ax.set_xticks(np.arange(len(cols)), [str(c) for c in cols], rotation=90, fontsize=6)
        ax.set_yticks(np.arange(data.shape[0]), self.alignment.names, fontsize=7)
        ax.set_xlabel("neuron (candidates and top loaders)")
        fig.tight_layout()
        return fig


def polysemanticity_report(
    W: Float[Tensor, "k d"],
    names: Any = None,
    z_threshold: float = 4.0,
    unrelated_below: float = 0.5,
    alignment_threshold: float = 0.7,
    n_baseline: int = 2000,
    seed: int = 0,
) -> PolysemanticityReport:
    """Everything above for a set of probe directions ``W`` ([k, d], one probe per row; or
    ``{name: direction}``)."""
    W, names = _named(W, names)
    w = _directions(W)
    z_threshold = in_range(z_threshold, "z_threshold", 0.0, np.inf, closed_low=False)
    unrelated_below = in_range(unrelated_below, "unrelated_below", 0.0, 1.0, closed_low=False)
    z = loading_zscores(w)
    return PolysemanticityReport(
        alignment=neuron_alignment(w, names, alignment_threshold, None, n_baseline, seed),
        loading_z=z,
        loading_index=(z.abs() >= z_threshold).sum(dim=0),
        candidates=_candidates(z, w, z_threshold, unrelated_below),
        z_threshold=z_threshold,
    )
