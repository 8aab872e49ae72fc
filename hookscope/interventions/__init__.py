"""Causal interventions: activation patching with structured metrics.

>>> from hookscope import interventions as iv
>>> metric = iv.logit_diff(pairs["correct"], pairs["incorrect"])
>>> res = iv.activation_patching(model, clean=..., corrupted=..., metric=metric, sites="head.*.*")
>>> res.scores; res.top(10); res.to_pandas(); res.plot()
"""

from hookscope.interventions.ablation import Knockout, ablate, knockout
from hookscope.interventions.attribution import attribution_patching
from hookscope.interventions.metrics import Metric, logit, logit_diff, loss, prob
from hookscope.interventions.patching import activation_patching
from hookscope.interventions.result import PatchingResult

__all__ = [
    "Knockout",
    "Metric",
    "PatchingResult",
    "ablate",
    "activation_patching",
    "attribution_patching",
    "knockout",
    "logit",
    "logit_diff",
    "loss",
    "prob",
]
