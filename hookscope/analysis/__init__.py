"""Representation analysis: pure tensor mathematics over activations (imports no model code).

* :mod:`.cka` - linear / RBF / debiased / minibatch CKA and layer-by-layer CKA matrices.
* :mod:`.collapse` - collapse index, drop points and the PC1 diagnostic on per-layer curves.
* :mod:`.dimensionality` - stable rank, participation ratio, effective rank, energy rank,
  nuclear-norm ratio (centred by default) and a tracker over training steps.
* :mod:`.jumps` - jump detection in metric time series, with a validity harness.
* :mod:`.polysemanticity` - neuron alignment of probe directions against a random baseline,
  multi-feature loading, candidate polysemantic neurons.
* :mod:`.geometry` - PCA, k-means and silhouette, linear separability, principal angles,
  dead neurons and class selectivity.

Activations are ``[samples, features]`` (float64 inside); scalar metrics return Python
numbers, matrices return float64 tensors, and bad input raises
:class:`hookscope.errors.AnalysisError`.

>>> from hookscope import analysis as an
>>> an.linear_cka(X, Y); an.participation_ratio(A); an.detect_jumps(values, steps)  # doctest: +SKIP
"""

from .cka import (
    CKAMatrix,
    MinibatchCKA,
    MinibatchCKAMatrix,
    cka_matrix,
    cka_report,
    debiased_cka,
    linear_cka,
    rbf_cka,
)
from .collapse import (
    CollapseReport,
    PC1Diagnostic,
    collapse_index,
    collapse_report,
    drop_points,
    pc1_diagnostic,
)
from .dimensionality import (
    DimensionalityReport,
    DimensionalityTracker,
    dimensionality_report,
    effective_rank,
    energy_rank,
    nuclear_norm_ratio,
    participation_ratio,
    spectrum,
    stable_rank,
    top_singular_value,
)
from .geometry import (
    ClusteringResult,
    NeuronStatsComparison,
    PCAResult,
    class_selectivity,
    compare_neuron_stats,
    dead_neurons,
    kmeans,
    linear_separability,
    pca,
    pca_by_layer,
    principal_angles,
    silhouette,
    subspace_overlap,
)
from .jumps import Jump, JumpReport, ValidityReport, detect_jumps, jump_report, jump_validity
from .polysemanticity import (
    NeuronAlignment,
    PolysemanticityReport,
    RandomDirectionBaseline,
    loading_zscores,
    multi_feature_loading_index,
    neuron_alignment,
    polysemantic_candidates,
    polysemanticity_report,
    random_direction_baseline,
)

__all__ = [
    # cka
    "linear_cka",
    "rbf_cka",
    "debiased_cka",
    "MinibatchCKA",
    "MinibatchCKAMatrix",
    "cka_matrix",
    "cka_report",
    "CKAMatrix",
    # collapse
    "collapse_index",
    "drop_points",
    "pc1_diagnostic",
    "PC1Diagnostic",
    "collapse_report",
    "CollapseReport",
    # dimensionality
    "spectrum",
    "stable_rank",
    "participation_ratio",
    "effective_rank",
    "energy_rank",
    "nuclear_norm_ratio",
    "top_singular_value",
    "dimensionality_report",
    "DimensionalityReport",
    "DimensionalityTracker",
    # jumps
    "Jump",
    "detect_jumps",
    "jump_report",
    "JumpReport",
    "jump_validity",
    "ValidityReport",
    # polysemanticity
    "neuron_alignment",
    "NeuronAlignment",
    "random_direction_baseline",
    "RandomDirectionBaseline",
    "loading_zscores",
    "multi_feature_loading_index",
    "polysemantic_candidates",
    "polysemanticity_report",
    "PolysemanticityReport",
    # geometry
    "pca",
    "pca_by_layer",
    "PCAResult",
    "kmeans",
    "silhouette",
    "ClusteringResult",
    "linear_separability",
    "principal_angles",
    "subspace_overlap",
    "dead_neurons",
    "class_selectivity",
    "compare_neuron_stats",
    "NeuronStatsComparison",
]
