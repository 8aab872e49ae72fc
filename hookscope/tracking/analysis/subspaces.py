"""How the top-k activation subspace of one site moves over training.

At every step the activations ``A_t`` ([n, d], the same n inputs at every step) are centred
(:func:`hookscope.analysis._validate.centred`) and the span of their top-``k`` right singular
vectors, an orthonormal basis ``Q_t`` [d, k], is the step's subspace (the top-k PCA
subspace).

* Principal angles between consecutive steps (radians, ascending) follow Björck & Golub
  (1973) as scipy does: ``cos theta_i`` are the singular values of ``Q_a^T Q_b`` and
  ``sin theta_i`` those of ``Q_b - Q_a Q_a^T Q_b``; the sine is used where ``cos^2 >= 1/2``
  (small angles, where arccos loses precision), the cosine elsewhere.
* Similarity between any two steps: ``mean_i cos^2 theta_i = ||Q_a^T Q_b||_F^2 / k``,
  1 for the same subspace and 0 for orthogonal ones.

The k-th singular value must be clearly non-zero at every step (else the subspace is not
determined by the data) and should be separated from the (k+1)-th; ``gap`` in the table
reports ``s_k / s_{k+1}`` so a near-degenerate choice of k can be spotted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hookscope.analysis._validate import centred, positive_int
from hookscope.errors import AnalysisError

from ._frames import step_matrices, table_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SubspaceEvolution", "subspace_evolution", "subspace_angles"]


def subspace_angles(qa: Tensor, qb: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the spans of orthonormal ``qa``, ``qb``.

    Both are ``[d, k]`` with the same ``k``.
    """
    m = qa.T @ qb
    cos = torch.linalg.svdvals(m).clamp(max=1.0)  # descending -> angles ascending
    sin = torch.linalg.svdvals(qb - qa @ m).clamp(max=1.0).flip(0)  # ascending -> ascending
    small = cos.square() >= 0.5
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


@dataclass(frozen=True, repr=False)
class SubspaceEvolution:
    """Top-k subspaces over steps: consecutive angles and the all-pairs similarity.

    ``angles``: one row per consecutive pair: ``step_from``, ``step_to``, ``angle_1`` ..
    ``angle_k`` (radians, ascending), ``max_angle_deg``. ``similarity``: [steps x steps]
    DataFrame of mean cos^2. ``spectrum``: one row per step: ``s_k`` and ``gap``
    (``s_k / s_{k+1}``, inf when ``s_{k+1} = 0``).
    """

    angles: pd.DataFrame
    similarity: pd.DataFrame
    spectrum: pd.DataFrame
    k: int

    def to_pandas(self) -> pd.DataFrame:
        """The consecutive principal angles, one row per pair of steps."""
        return self.angles.copy()

    def __repr__(self) -> str:
        head = f"SubspaceEvolution(k={self.k}, {len(self.similarity)} steps)"
        return "\n".join([head, table_text(self.angles), "", "similarity (mean cos^2):",
                          table_text(self.similarity.reset_index(names="step"))])  # fmt: skip

    def plot(self) -> Figure:
        """Similarity heat map over all steps, and the largest consecutive angle over steps."""
        from hookscope.plot import figure

        fig = figure(figsize=(9, 3.8))
        ax1, ax2 = fig.subplots(1, 2)
        steps = [str(s) for s in self.similarity.index]
        im = ax1.imshow(self.similarity.to_numpy(), vmin=0, vmax=1, cmap="viridis")
        fig.colorbar(im, ax=ax1, label="mean cos^2")
        ticks = np.arange(0, len(steps), max(1, len(steps) // 8))
        ax1.set_xticks(ticks, [steps[i] for i in ticks], rotation=45, fontsize=7)
        ax1.set_yticks(ticks, [steps[i] for i in ticks], fontsize=7)
        ax1.set_title(f"top-{self.k} subspace similarity")
        ax2.plot(self.angles["step_to"], self.angles["max_angle_deg"], ".-")
        ax2.set_xlabel("step")
        ax2.set_ylabel("largest angle to previous step (deg)")
        fig.tight_layout()
        return fig


def subspace_evolution(activations: Any, k: int = 5) -> SubspaceEvolution:
    """Principal angles and similarity of the top-``k`` PCA subspaces across steps.

    ``activations``: ``{step: [n, d] tensor or array}``, the same ``n`` inputs at each step
    (at least two steps).
    """
    steps, mats = step_matrices(activations)
    if len(steps) < 2:
        raise AnalysisError(f"activations has {len(steps)} step; need at least 2")
    n, d = mats[0].shape
    k = positive_int(k, "k")
    if k > min(n - 1, d):
        raise AnalysisError(
            f"k={k} is too large: centred [{n}, {d}] activations span at most "
            f"min(n - 1, d) = {min(n - 1, d)} dimensions"
        )
    bases, spec = [], []
    for step, m in zip(steps, mats, strict=True):
        _, s, vh = torch.linalg.svd(centred(m), full_matrices=False)
        if s[k - 1] <= max(n, d) * torch.finfo(s.dtype).eps * s[0]:
            raise AnalysisError(
                f"step {step!r}: the activations have rank < k={k} after centring, so the "
                "top-k subspace is not determined; choose a smaller k"
            )
        nxt = float(s[k]) if s.numel() > k else 0.0
        spec.append({"step": step, "s_k": float(s[k - 1]),
                     "gap": float(s[k - 1]) / nxt if nxt > 0 else float("inf")})  # fmt: skip
        bases.append(vh[:k].T)
    rows = []
    for i in range(len(steps) - 1):
        ang = subspace_angles(bases[i], bases[i + 1]).cpu().numpy()
        rows.append({"step_from": steps[i], "step_to": steps[i + 1],
                     **{f"angle_{j + 1}": float(a) for j, a in enumerate(ang)},
                     "max_angle_deg": float(np.degrees(ang.max()))})  # fmt: skip
    q = torch.stack(bases)  # [T, d, k]
    sim = torch.einsum("adk,bdl->abkl", q, q).square().sum(dim=(2, 3)) / k
    sim_df = pd.DataFrame(sim.cpu().numpy(), index=steps, columns=steps)
    return SubspaceEvolution(pd.DataFrame(rows), sim_df, pd.DataFrame(spec), k)
