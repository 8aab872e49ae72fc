"""Experiments from YAML: one config, one command, reproducible artifacts and a report.

* :mod:`.spec` - the config schemas (``RunSpec`` and its parts), YAML loading, ``--set``.
* :mod:`hookscope.actions` - the action registry (built-in and entry-point plug-ins).
* :mod:`.context` - what an action sees (data, model, store, addresses, controls).
* :mod:`.runner` - the stages and the run folder's artifacts.
* :mod:`.report` - report.md and the self-contained report.html.

    hookscope run configs/feature_detection_digits.yaml --set seed=1
    hookscope report runs/feature_detection_digits
    hookscope actions
"""

from hookscope.experiments.runner import RunOutcome, run, run_spec
from hookscope.experiments.spec import RunSpec, load_spec

__all__ = ["RunOutcome", "RunSpec", "load_spec", "run", "run_spec"]
