"""The intervention engine: every exact intervention (patching, ablation, knockout,
``localize_circuit``'s confirmation) says only what each job writes; the engine plans the
forwards and runs them with every shortcut, exactly.

::

    jobs: [Write(address, position, value), ...] per patched copy
      │
      ├─ Engine.baseline(...)   one forward: metrics, activations, each block's
      │                         input/output, keys/values, the unembedding's input
      ├─ plan(jobs, facts, k)   → [Forward(prefix, copies=[Copy(jobs, start, tail)])]
      │                           copies grouped by the block they join; cut by the
      │                           first changed position (causal models); rows read at
      │                           different positions: one plan per row group (rows.py)
      └─ Engine.execute(fwd)    replay blocks below, join copies at their block (or
                                after it, with a linear tail's change), skip the prefix
                                (key/value cache), read only the metric's logits
                                → one metric value per job

See :mod:`.plan` (the plan), :mod:`.jobs` (writes), :mod:`.baseline`, :mod:`.execute`,
:mod:`.rows` (row groups) and :mod:`.structure` (what the engine reads off the adapter).
"""

from hookscope.interventions.engine.engine import Engine, metric_value
from hookscope.interventions.engine.jobs import Job, Write, Writer, needs_logits
from hookscope.interventions.engine.plan import Copy, Facts, Forward, plan

__all__ = [
    "Engine",
    "Write",
    "Job",
    "Writer",
    "Facts",
    "Copy",
    "Forward",
    "plan",
    "metric_value",
    "needs_logits",
]
