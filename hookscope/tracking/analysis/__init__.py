"""Training-dynamics analyses over the tracker's frames, checkpoints and activations.

Frames follow the schemas in :mod:`._frames` (results: ``step, site, metric, value`` with
optional ``loss``, ``grad_norm``, ``run``; jumps: ``step, site, metric, magnitude, z,
direction`` with optional ``run``). Every function returns a frozen result with
``.to_pandas()``, a text ``repr`` and ``.plot()``; bad input raises
:class:`hookscope.errors.AnalysisError` before any expensive work.

* :func:`convergence` - when each site settles, and whether layers settle bottom-up,
  top-down, simultaneously or mixed.
* :func:`characterize_jumps`, :func:`cluster_jumps` - size, speed and phase of each jump;
  kinds of jumps by k-means with k chosen by silhouette.
* :func:`critical_periods` - velocity, acceleration, critical windows, their coordination
  across sites and their link to loss improvement.
* :func:`phase_distribution` - shares of jumps early / mid / late and per site, with
  (cluster) bootstrap CIs.
* :func:`gradient_flow` - gradient statistics per parameter at saved checkpoints.
* :func:`subspace_evolution` - principal angles and similarity of top-k subspaces over steps.
* :func:`disentanglement` - class separability, silhouette, variance ratio, per-class PCA
  dimension over steps.
* :func:`smoothness` - derivative spread across runs (Levene, Kruskal-Wallis).

>>> from hookscope.tracking.analysis import convergence
>>> convergence(results, "participation_ratio").pattern  # doctest: +SKIP
"""

from .convergence import PATTERNS, ConvergenceResult, convergence
from .critical import CriticalPeriods, critical_periods
from .disentanglement import Disentanglement, disentanglement
from .gradients import GradientFlow, gradient_flow
from .jump_character import JumpCharacteristics, characterize_jumps
from .jump_clusters import FEATURES, JumpClusters, cluster_jumps
from .phases import PhaseDistribution, phase_distribution
from .smoothness import Smoothness, smoothness
from .subspaces import SubspaceEvolution, subspace_angles, subspace_evolution

__all__ = [
    "convergence",
    "ConvergenceResult",
    "PATTERNS",
    "characterize_jumps",
    "JumpCharacteristics",
    "cluster_jumps",
    "JumpClusters",
    "FEATURES",
    "critical_periods",
    "CriticalPeriods",
    "phase_distribution",
    "PhaseDistribution",
    "gradient_flow",
    "GradientFlow",
    "subspace_evolution",
    "SubspaceEvolution",
    "subspace_angles",
    "disentanglement",
    "Disentanglement",
    "smoothness",
    "Smoothness",
]
