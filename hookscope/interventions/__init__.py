"""Causal interventions: activation patching, ablation, attribution patching, circuits.

>>> from hookscope import interventions as iv
>>> metric = iv.logit_diff(pairs["correct"], pairs["incorrect"])
>>> res = iv.activation_patching(model, clean=..., corrupted=..., metric=metric, sites="head.*.*")
>>> res.scores; res.top(10); res.to_pandas(); res.plot()
>>> atp = iv.attribution_patching(model, clean=..., corrupted=..., metric=metric, sites="head.*.*")
>>> abl = iv.ablate(model, inputs, sites=["head.1.3"], method="mean", reference=..., metric=metric)
>>> circuit = iv.localize_circuit(model, clean=..., corrupted=..., metric=metric)
"""

from hookscope.interventions.ablation import Knockout, ablate, knockout
from hookscope.interventions.attribution import attribution_patching
from hookscope.interventions.localize import CircuitResult, localize_circuit
from hookscope.interventions.metrics import Metric, logit, logit_diff, loss, prob
from hookscope.interventions.patching import activation_patching
from hookscope.interventions.result import PatchingResult
from hookscope.interventions.tasks import TASKS, Task, build_task

__all__ = [
    "CircuitResult",
    "Knockout",
    "Metric",
    "PatchingResult",
    "TASKS",
    "Task",
    "ablate",
    "activation_patching",
    "attribution_patching",
    "build_task",
    "knockout",
    "localize_circuit",
    "logit",
    "logit_diff",
    "loss",
    "prob",
]
