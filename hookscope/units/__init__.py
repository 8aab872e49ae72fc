"""Unit analysis: what single attention heads and neurons compute, hold and change into.

* :mod:`~hookscope.units.heads`: attention-pattern statistics per head (entropy, Gini
  sparsity, distance, CLS share, class selectivity), :func:`head_stats`, :func:`compare_heads`.
* :mod:`~hookscope.units.head_clusters`: heads clustered by their mean patterns,
  :func:`cluster_heads`, :func:`cluster_patterns`.
* :mod:`~hookscope.units.head_effects`: ablation importance (:func:`head_importance`) and
  linear-probe decodability (:func:`head_probe`) of each head's output.
* :mod:`~hookscope.units.neurons`: per-unit statistics of a neuron layer (mean, sparsity,
  dead, selectivity), :func:`neuron_stats`, :func:`compare_neurons`.
* :mod:`~hookscope.units.top_activating`: the inputs or token positions where one unit
  activates most, :func:`top_activating`.
* :mod:`~hookscope.units.composition`: ridge composition of late units from early ones,
  :func:`composition`.
* :mod:`~hookscope.units.receptive_field`: effective receptive field of a CNN unit,
  :func:`receptive_field`.
* :mod:`~hookscope.units.checkpoints`: one analysis on two checkpoints, :func:`compare`.

Shared conventions (sites, samples, head grids, the readout position) are in
:mod:`hookscope.units._common`. The functions named like their module (``composition``,
``top_activating``, ``receptive_field``) are what ``units.<name>`` gives; import the module
itself with ``from hookscope.units.composition import ...``.

>>> import hookscope as hs
>>> vit, (X, y) = hs.zoo.load("digits-vit"), hs.data.digits("test", tensors=True)
>>> hs.units.head_stats(vit, X[:200], y[:200]).plot()  # doctest: +ELLIPSIS
<Figure size ...>
"""

from .checkpoints import ANALYSES, UnitComparison, compare
from .composition import Composition, composition
from .head_clusters import HeadClusters, cluster_heads, cluster_patterns
from .head_effects import HeadImportance, HeadProbe, head_importance, head_probe
from .heads import (
    STATS,
    HeadStats,
    HeadStatsComparison,
    PatternStatistics,
    compare_heads,
    head_stats,
    patch_distances,
    pattern_stats,
    token_distances,
)
from .neurons import NeuronComparison, NeuronStats, compare_neurons, neuron_stats
from .receptive_field import ReceptiveField, receptive_field
from .top_activating import TopActivating, top_activating

__all__ = [
    # heads
    "STATS",
    "PatternStatistics",
    "pattern_stats",
    "token_distances",
    "patch_distances",
    "HeadStats",
    "head_stats",
    "HeadStatsComparison",
    "compare_heads",
    # head_clusters
    "HeadClusters",
    "cluster_patterns",
    "cluster_heads",
    # head_effects
    "HeadImportance",
    "head_importance",
    "HeadProbe",
    "head_probe",
    # neurons
    "NeuronStats",
    "neuron_stats",
    "NeuronComparison",
    "compare_neurons",
    # top_activating
    "TopActivating",
    "top_activating",
    # composition
    "Composition",
    "composition",
    # receptive_field
    "ReceptiveField",
    "receptive_field",
    # checkpoints
    "ANALYSES",
    "UnitComparison",
    "compare",
]
