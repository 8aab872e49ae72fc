"""Kinds of jumps: k-means on standardised jump characteristics, k by silhouette.

Features (from :func:`characterize_jumps`): ``log(magnitude)``, ``relative_magnitude``,
``log(speed)`` and ``phase_fraction``, each standardised to zero mean and unit variance
(a constant feature stays 0). Jumps whose speed or magnitude is not positive and finite
cannot be placed and are left out; their number is stated in the result.

``k="auto"`` fits k-means (scikit-learn, ``n_init=10``, ``random_state=seed``) for every k in
``k_range`` (inclusive, capped at ``n - 1`` jumps) and keeps the k with the best mean
silhouette score (Rousseeuw 1987); an int ``k`` is used as given (``k=1``: one cluster, no
silhouette).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hookscope.analysis._validate import positive_int
from hookscope.errors import AnalysisError

from ._frames import require_frame, table_text
from .jump_character import JumpCharacteristics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FEATURES", "JumpClusters", "cluster_jumps"]

FEATURES = ("log_magnitude", "relative_magnitude", "log_speed", "phase_fraction")
_NEEDED = ("magnitude", "relative_magnitude", "speed", "phase_fraction")


@dataclass(frozen=True, repr=False)
class JumpClusters:
    """Cluster of every usable jump.

    ``table``: the characteristics with a ``cluster`` column (0..k-1). ``k``: clusters used.
    ``scores``: silhouette per tried k (empty for a given k). ``centers``: mean of each
    feature per cluster, in the features' own units. ``n_dropped``: jumps left out.
    """

    table: pd.DataFrame
    k: int
    scores: pd.DataFrame
    centers: pd.DataFrame
    n_dropped: int
    seed: int

    def to_pandas(self) -> pd.DataFrame:
        """One row per clustered jump, with its ``cluster``."""
        return self.table.copy()

    def __repr__(self) -> str:
        head = f"JumpClusters(k={self.k}, {len(self.table)} jumps, {self.n_dropped} left out)"
        parts = [head, table_text(self.centers)]
        if len(self.scores):
            parts += ["", "silhouette by k:", table_text(self.scores)]
        return "\n".join(parts)

    def plot(self) -> Figure:
        """Magnitude against phase fraction, coloured by cluster."""
        from hookscope.plot import figure

        fig = figure(figsize=(6, 3.5))
        ax = fig.subplots()
        for c, rows in self.table.groupby("cluster"):
            ax.scatter(rows["phase_fraction"], rows["magnitude"], s=20, label=f"cluster {c}")
        ax.set_xlabel("phase (step / n_steps)")
        ax.set_ylabel("magnitude")
        ax.set_yscale("log")
        ax.set_title(f"jump clusters (k={self.k})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def _features(t: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    mag = t["magnitude"].to_numpy(dtype=float)
    speed = t["speed"].to_numpy(dtype=float)
    rel = t["relative_magnitude"].to_numpy(dtype=float)
    phase = t["phase_fraction"].to_numpy(dtype=float)
    ok = (mag > 0) & (speed > 0) & np.isfinite(mag) & np.isfinite(speed) & np.isfinite(rel)
    ok &= np.isfinite(phase)
    x = np.stack([np.log(mag[ok]), rel[ok], np.log(speed[ok]), phase[ok]], axis=1)
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return z, ok


def cluster_jumps(
    characterized: JumpCharacteristics | pd.DataFrame,
    k: int | str = "auto",
    k_range: tuple[int, int] = (2, 6),
    seed: int = 0,
) -> JumpClusters:
    """Group jumps by size, speed and phase with k-means (module docstring).

    ``characterized``: the result of :func:`characterize_jumps` or its ``.to_pandas()``.
    ``k``: ``"auto"`` (best silhouette over ``k_range``, inclusive) or a number of clusters.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    t = characterized.table if isinstance(characterized, JumpCharacteristics) else characterized
    t = require_frame(t, "characterized", _NEEDED)
    seed = positive_int(seed, "seed", minimum=0)
    if isinstance(k, str) and k != "auto":
        raise AnalysisError(f"k must be 'auto' or a number of clusters >= 1; got {k!r}")
    if k != "auto":
        k = positive_int(k, "k")
    else:
        if not (isinstance(k_range, tuple) and len(k_range) == 2):
            raise AnalysisError(f"k_range must be a tuple (low, high); got {k_range!r}")
        lo, hi = (positive_int(x, "k_range entry", minimum=2) for x in k_range)
        if hi < lo:
            raise AnalysisError(f"k_range must have low <= high; got {k_range!r}")
    z, ok = _features(t)
    n = z.shape[0]
    n_distinct = len(np.unique(z.round(12), axis=0)) if n else 0
    scores = pd.DataFrame(columns=["k", "silhouette"])
    if k == "auto":
        if n_distinct < 3:
            raise AnalysisError(
                f"choosing k needs at least 3 distinct jumps; got {n_distinct} (of {n} usable, "
                f"{int((~ok).sum())} left out for a non-positive or undefined speed or "
                "magnitude); pass k=1 to put them in one cluster"
            )
        tried = range(lo, min(hi, n_distinct - 1) + 1)
        if not tried:
            raise AnalysisError(
                f"k_range {k_range!r} asks for more clusters than {n_distinct} distinct jumps allow"
            )
        rows, fits = [], {}
        for kk in tried:
            fits[kk] = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(z)
            rows.append({"k": kk, "silhouette": float(silhouette_score(z, fits[kk].labels_))})
        scores = pd.DataFrame(rows)
        k = int(scores["k"].iloc[int(np.argmax(scores["silhouette"].to_numpy()))])
        labels = fits[k].labels_
    else:
        if k > n_distinct:
            raise AnalysisError(
                f"k={k} clusters need at least {k} distinct jumps; got {n_distinct}"
            )
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z).labels_
    table = t[ok].reset_index(drop=True).copy()
    table["cluster"] = labels.astype(int)
    feats = pd.DataFrame(
        {"cluster": labels.astype(int), "log_magnitude": np.log(table["magnitude"]),
         "relative_magnitude": table["relative_magnitude"],
         "log_speed": np.log(table["speed"]), "phase_fraction": table["phase_fraction"]}
    )  # fmt: skip
    centers = feats.groupby("cluster").mean().reset_index()
    centers.insert(1, "n_jumps", feats.groupby("cluster").size().to_numpy())
    return JumpClusters(table, int(k), scores, centers, int((~ok).sum()), seed)
