"""Probes with controls: linear probes over every layer, with baselines, statistics, MDL and
causal erasure.

* :class:`LinearProbe` - logistic / ridge with scikit-learn's estimator API; the batched
  solves of :mod:`.solve` equal scikit-learn's optima.
* :func:`probe_sweep` - a probe per site with shuffle / random-feature / control-task /
  random-init baselines, seeds, bootstrap intervals, permutation p-values (Holm-corrected
  across sites), selectivity and directions (:mod:`.sweep`, :mod:`.controls`,
  :mod:`.stats`).
* :func:`mdl` - online code length (Voita & Titov 2020) (:mod:`.mdl`).
* :func:`erase` - LEACE and INLP erasers usable as hooks, and :func:`amnesic`, the
  behavioural check with and without the concept (:mod:`.erasure`).

>>> from hookscope import probes
>>> sweep = probes.probe_sweep(acts, "label", "resid_post.*", control_task_key="token")  # doctest: +SKIP
"""

from hookscope.probes.controls import CONTROLS, control_task_labels, gaussian_features, random_init
from hookscope.probes.erasure import (
    METHODS,
    AmnesicResult,
    Eraser,
    LeaceFitter,
    amnesic,
    erase,
    leace_factors,
)
from hookscope.probes.linear import LinearProbe
from hookscope.probes.mdl import DEFAULT_PORTIONS, MDLResult, mdl
from hookscope.probes.solve import LinearSolution, fit_logistic, fit_ridge
from hookscope.probes.stats import Interval, bootstrap, holm, permutation_pvalue
from hookscope.probes.sweep import ProbeSweep, probe_sweep

__all__ = [
    "AmnesicResult",
    "CONTROLS",
    "DEFAULT_PORTIONS",
    "Eraser",
    "LeaceFitter",
    "MDLResult",
    "METHODS",
    "amnesic",
    "erase",
    "leace_factors",
    "mdl",
    "Interval",
    "LinearProbe",
    "LinearSolution",
    "ProbeSweep",
    "bootstrap",
    "control_task_labels",
    "fit_logistic",
    "fit_ridge",
    "gaussian_features",
    "holm",
    "permutation_pvalue",
    "probe_sweep",
    "random_init",
]
