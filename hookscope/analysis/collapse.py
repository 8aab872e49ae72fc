"""Representation-collapse analysis on a per-layer CKA curve, with the PC1 diagnostic.

A *per-layer curve* is one score per layer, e.g. the CKA of every layer with a reference
representation (the input, one-hot labels, the same layer of another checkpoint) or a probe
accuracy per layer. Collapse is when the curve peaks early and falls by the final layer:

* ``collapse_index(curve) = max(curve) - curve[-1]`` (>= 0; 0 when the final layer is the
  peak, i.e. no collapse).
* ``drop_points(curve, threshold)``: layers ``l`` with ``curve[l-1] - curve[l] >= threshold``.

The PC1 diagnostic: block structure in CKA matrices often comes from one dominant principal
component shared by many layers (Nguyen, Raghu & Kornblith 2021) rather than from a genuinely
shared representation. :func:`pc1_diagnostic` reports CKA before and after projecting out each
representation's first principal component, together with the fraction of variance PC1
carries; :func:`collapse_report` does the same for a whole curve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hookscope.errors import AnalysisError

from ._validate import as_layers, as_matrix, as_vector, centred, choice, in_range, same_rows
from .cka import KINDS, debiased_cka, linear_cka, rbf_cka, without_pc1
from .geometry import pca

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "collapse_index",
    "drop_points",
    "PC1Diagnostic",
    "pc1_diagnostic",
    "CollapseReport",
    "collapse_report",
]


def collapse_index(curve: Float[Tensor, " layers"]) -> float:
    """Peak of a per-layer curve minus its final-layer value (>= 0; 0 = no collapse)."""
    c = as_vector(curve, "curve", min_len=1)
    return float(c.max() - c[-1])


def drop_points(curve: Float[Tensor, " layers"], threshold: float = 0.05) -> list[int]:
    """Layers ``l >= 1`` where the curve falls by at least ``threshold`` from layer ``l - 1``."""
    c = as_vector(curve, "curve", min_len=1)
    threshold = in_range(threshold, "threshold", 0.0, np.inf, closed_low=False)
    return [int(i) + 1 for i in torch.nonzero(c[:-1] - c[1:] >= threshold).flatten()]


def _cka_fn(kind: str, threshold: float) -> Callable[[Tensor, Tensor], float]:
    choice(kind, "kind", KINDS)
    return {
        "linear": linear_cka,
        "debiased": debiased_cka,
        "rbf": partial(rbf_cka, threshold=threshold),
    }[kind]


def _pc1_fraction(m: Tensor) -> float:
    return float(pca(m, k=1).explained_variance_ratio[0])


@dataclass(frozen=True, repr=False)
class PC1Diagnostic:
    """CKA of X and Y before and after removing each one's first principal component."""

    cka: float
    cka_without_pc1: float
    pc1_fraction_x: float
    pc1_fraction_y: float
    kind: str

    def to_pandas(self) -> pd.DataFrame:
        """A one-row table of the four numbers."""
        return pd.DataFrame([self.__dict__])

    def __repr__(self) -> str:
        rows = [
            ("cka", self.cka),
            ("cka_without_pc1", self.cka_without_pc1),
            ("pc1_fraction_x", self.pc1_fraction_x),
            ("pc1_fraction_y", self.pc1_fraction_y),
        ]
        lines = [f"  {k:<16} {v:>8.4f}" for k, v in rows]
        return f"PC1Diagnostic({self.kind} CKA)\n" + "\n".join(lines)

    def plot(self) -> Figure:
        """Bars: CKA with and without PC1, and the PC1 variance fractions."""
        from hookscope.plot import figure

        fig = figure(figsize=(5, 3))
        ax = fig.subplots()
        labels = ["CKA", "CKA w/o PC1", "PC1 frac X", "PC1 frac Y"]
        vals = [self.cka, self.cka_without_pc1, self.pc1_fraction_x, self.pc1_fraction_y]
        ax.bar(labels, vals, color=["C0", "C0", "C1", "C1"])
        ax.set_ylim(min(0.0, min(vals)), 1.0)
        ax.set_title(f"PC1 diagnostic ({self.kind} CKA)")
        fig.tight_layout()
        return fig


def pc1_diagnostic(
    X: Float[Tensor, "n p"], Y: Float[Tensor, "n q"], kind: str = "linear", threshold: float = 0.5
) -> PC1Diagnostic:
    """CKA before/after projecting out PC1 of X and of Y, and the PC1 variance fractions.

    A high CKA that falls sharply without PC1, with a large PC1 fraction, says the similarity
    is carried by one shared dominant direction.
    """
    fn = _cka_fn(kind, threshold)
    x, y = as_matrix(X, "X"), as_matrix(Y, "Y")
    same_rows(x, y)
    return PC1Diagnostic(
        cka=fn(x, y),
        cka_without_pc1=fn(without_pc1(x), without_pc1(y)),
        pc1_fraction_x=_pc1_fraction(centred(x)),
        pc1_fraction_y=_pc1_fraction(centred(y)),
        kind=kind,
    )


@dataclass(frozen=True, repr=False)
class CollapseReport:
    """A per-layer curve with its collapse index and drop points (and optional PC1 columns).

    ``curve``: [L] scores; ``curve_without_pc1`` and ``pc1_fraction``: [L] or None.
    """

    names: list[str]
    curve: Tensor
    drop_threshold: float = 0.05
    curve_without_pc1: Tensor | None = None
    pc1_fraction: Tensor | None = None

    @classmethod
    def from_curve(
        cls, curve: Float[Tensor, " layers"], names: Any = None, drop_threshold: float = 0.05
    ) -> CollapseReport:
        """A report for a curve computed elsewhere (e.g. probe accuracy per layer)."""
        c = as_vector(curve, "curve", min_len=1)
        found = [str(i) for i in range(len(c))] if names is None else [str(n) for n in names]
        if len(found) != len(c):
            raise AnalysisError(f"names has {len(found)} entries but curve has {len(c)}")
        return cls(
            found, c, in_range(drop_threshold, "drop_threshold", 0.0, np.inf, closed_low=False)
        )

    @property
    def collapse_index(self) -> float:
        return collapse_index(self.curve)

    @property
    def collapse_index_without_pc1(self) -> float | None:
        return None if self.curve_without_pc1 is None else collapse_index(self.curve_without_pc1)

    @property
    def peak_layer(self) -> str:
        return self.names[int(torch.argmax(self.curve))]

    @property
    def drop_points(self) -> list[str]:
        """Names of the layers where the curve drops by at least ``drop_threshold``."""
        return [self.names[i] for i in drop_points(self.curve, self.drop_threshold)]

    def to_pandas(self) -> pd.DataFrame:
        """One row per layer: score, drop flag, and the PC1 columns when computed."""
        drops = set(drop_points(self.curve, self.drop_threshold))
        df = pd.DataFrame(
            {
                "layer": self.names,
                "score": self.curve.cpu().numpy(),
                "drop": [i in drops for i in range(len(self.names))],
            }
        )
        if self.curve_without_pc1 is not None:
            df["score_without_pc1"] = self.curve_without_pc1.cpu().numpy()
        if self.pc1_fraction is not None:
            df["pc1_fraction"] = self.pc1_fraction.cpu().numpy()
        return df

    def __repr__(self) -> str:
        head = (
            f"CollapseReport(collapse_index={self.collapse_index:.4f}, peak={self.peak_layer!r}, "
            f"drops={self.drop_points}"
        )
        if self.collapse_index_without_pc1 is not None:
            head += f", collapse_index_without_pc1={self.collapse_index_without_pc1:.4f}"
        body = self.to_pandas().to_string(index=False, float_format=lambda v: f"{v:.4f}")
        return head + ")\n" + body

    def plot(self) -> Figure:
        """The curve (and the curve without PC1) per layer, drops marked."""
        x = np.arange(len(self.names))
        from hookscope.plot import figure

        fig = figure(figsize=(max(5, 0.35 * len(x) + 2), 3.5))
        ax = fig.subplots()
        ax.plot(x, self.curve.cpu().numpy(), "o-", label="score")
        if self.curve_without_pc1 is not None:
            ax.plot(x, self.curve_without_pc1.cpu().numpy(), "s--", label="without PC1")
        for i in drop_points(self.curve, self.drop_threshold):
            ax.axvline(i, color="C3", ls=":", lw=1)
        ax.set_xticks(x, self.names, rotation=90, fontsize=7)
        ax.set_ylabel("score")
        ax.set_title(f"collapse index {self.collapse_index:.3f}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def collapse_report(
    activations: Any,
    reference: Float[Tensor, "n r"],
    kind: str = "linear",
    threshold: float = 0.5,
    names: Any = None,
    sample_dims: int = 1,
    drop_threshold: float = 0.05,
    pc1: bool = True,
    progress: bool = True,
) -> CollapseReport:
    """Collapse analysis of the CKA of every layer with ``reference`` (same samples).

    ``activations`` is a list / dict / cache of ``[samples, ...]`` tensors (see
    :func:`cka_matrix`); ``reference`` is ``[samples, ...]``. With ``pc1=True`` the curve is
    also computed after removing PC1 from every layer and the reference, and each layer's PC1
    variance fraction is reported.
    """
    fn = _cka_fn(kind, threshold)
    found, mats = as_layers(activations, names, sample_dims=sample_dims)
    _, (ref,) = as_layers([reference], ["reference"], sample_dims=sample_dims)
    same_rows(mats[0], ref, (f"layer {found[0]!r}", "reference"))
    ref_wo = without_pc1(ref) if pc1 else None
    curve, curve_wo, frac = [], [], []
    for m in tqdm(mats, desc="collapse", unit="layer", disable=not progress):
        curve.append(fn(m, ref))
        if pc1:
            curve_wo.append(fn(without_pc1(m), ref_wo))
            frac.append(_pc1_fraction(centred(m)))
    as_t = partial(torch.tensor, dtype=torch.float64)
    return CollapseReport(
        found,
        as_t(curve),
        in_range(drop_threshold, "drop_threshold", 0.0, np.inf, closed_low=False),
        as_t(curve_wo) if pc1 else None,
        as_t(frac) if pc1 else None,
    )
