"""Dimensionality tracking during training.

:class:`Tracker` wraps any training loop (a plain ``nn.Module`` or a :class:`HookedModel`,
any optimiser): every ``every`` training steps it measures dimensionality metrics of each
tracked layer (:mod:`hookscope.analysis.dimensionality`), runs the validated jump detector
(:mod:`hookscope.analysis.jumps`) online on every series, and saves the model states around
each confirmed jump from a ring buffer (:mod:`hookscope.tracking.checkpoints`).

>>> tracker = hs.Tracker(model, sites="auto", every=5, checkpoints="ckpt/")
>>> with tracker:
...     for step, (x, y) in enumerate(loader):
...         loss = train_step(x, y)
...         tracker.log(step, loss=loss)
>>> tracker.results(); tracker.jumps("stable_rank"); tracker.plot()

Also: :func:`load_ndt` (the dimensionality-tracking project's result files),
:func:`export` / :func:`load_run` (Parquet, CSV, JSON, HDF5), :func:`over_checkpoints`
(released training checkpoints such as pythia's), :func:`plan_checkpoints`, the
training-dynamics analyses in :mod:`hookscope.tracking.analysis`, and
:func:`shutdown_workers` / :func:`worker_processes` (the reused worker process).

The results frame every part shares is long: one row per (step, site, metric) with columns
``step`` (training step), ``site`` (address), ``metric``, ``value``, ``loss``, ``grad_norm``
(NaN when not logged), and ``run`` where several runs are concatenated.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY_NAMES = {
    "Tracker": "hookscope.tracking.tracker",
    "TrackedJump": "hookscope.tracking.online",
    "OnlineJumps": "hookscope.tracking.online",
    "Checkpoints": "hookscope.tracking.checkpoints",
    "plan_checkpoints": "hookscope.tracking.checkpoints",
    "load_ndt": "hookscope.tracking.ndt",
    "ndt_view": "hookscope.tracking.ndt",
    "export": "hookscope.tracking.files",
    "load_run": "hookscope.tracking.files",
    "over_checkpoints": "hookscope.tracking.revisions",
    "shutdown_workers": "hookscope.tracking.worker",
    "worker_processes": "hookscope.tracking.worker",
}
_LAZY_MODULES = ("analysis",)

__all__ = [*_LAZY_NAMES, *_LAZY_MODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        module = importlib.import_module(f"hookscope.tracking.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'hookscope.tracking' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
