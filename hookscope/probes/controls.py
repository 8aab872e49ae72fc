"""Baselines a probe's score is read against.

* ``shuffle`` - the labels permuted within the training rows: what a probe of this capacity
  scores when the labels carry nothing the activations could explain (the null).
* ``control_task`` - Hewitt & Liang (2019): every *type* (a token id, a word, any column)
  gets one fixed random label drawn from the task's empirical label distribution (seeded,
  the same in every split). A probe that scores high on it is memorising types, so
  selectivity = task score - control score says how much of the task score the
  representation, not the probe, explains.
* ``random_features`` - Gaussian features with the site's mean and covariance, drawn
  independently of the inputs: the same width and second-order statistics, no information.
  (A random *projection* of the activations to the same width is not a control: a linear
  probe on ``X R`` spans the same functions as one on ``X`` when ``R`` is invertible, so it
  scores like the task up to the penalty.)
* ``random_init`` - the same sites of the same architecture with untrained weights
  (:func:`random_init` builds the model; extract it through the store and pass the result
  to :func:`~hookscope.probes.probe_sweep` as ``random_init=``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope.errors import ProbeError

__all__ = ["CONTROLS", "control_task_labels", "covariance", "gaussian_features", "random_init"]

CONTROLS = ("shuffle", "random_features", "control_task", "random_init")


def control_task_labels(types: Any, labels: np.ndarray, seed: int) -> np.ndarray:
    """Hewitt & Liang's control labels: one label per distinct value of ``types``, drawn from
    the empirical distribution of ``labels`` (class codes or regression targets) with
    ``seed``; each row gets its type's label."""
    t = np.asarray(types)
    if t.shape[0] != labels.shape[0]:
        raise ProbeError(
            f"control_task_key has {t.shape[0]} values but there are {labels.shape[0]} rows"
        )
    kinds, which = np.unique(t, return_inverse=True)
    rng = np.random.default_rng(seed)
    drawn = labels[rng.integers(0, labels.shape[0], size=kinds.shape[0])]
    return drawn[which.reshape(-1)]


def covariance(X: Tensor) -> Tensor:
    """The covariance of the rows of ``X`` (float64 ``[d, d]``, ``n - 1`` in the denominator)."""
    from hookscope.probes.solve import _mm

    x = X.to(torch.float64)
    centred = x - x.mean(0)
    return _mm(centred.T, centred) / max(x.shape[0] - 1, 1)


def gaussian_features(
    X: Tensor,
    generator: torch.Generator,
    draws: int = 1,
    cov: Tensor | None = None,
    rotate: bool = True,
) -> Tensor:
    """``draws`` blocks of rows drawn from ``N(mean(X), cov(X))``, each as many rows as
    ``X`` has, stacked: ``[draws * n, d]`` (one eigendecomposition for all of them; pass
    ``cov`` when :func:`covariance` of ``X`` is at hand). The moments are float64; the draws
    are float32 (random numbers need no more).

    ``rotate=False`` returns the same kind of draw expressed in the covariance's eigenbasis
    and centred, ``N(0, diag(eigenvalues))``: ``Z = mean + G L^1/2 V'`` becomes
    ``G L^1/2``. A linear probe cannot tell them apart: with ``u = V'w`` (an orthogonal
    map) both its penalty ``||w||^2`` and its margins are the same up to the intercept, so
    its optimum, predictions and scores are too; the sweep uses this form, which skips the
    ``[n, d] x [d, d]`` product."""
    from hookscope.probes.solve import _mm

    if cov is None:
        cov = covariance(X)
    # a symmetric square root (eigh) stays real for rank-deficient activations
    evals, evecs = torch.linalg.eigh(cov)
    scale = evals.clamp_min(0).sqrt().to(torch.float32)
    shape = (draws * X.shape[0], X.shape[1])
    z = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu").to(X.device)
    if not rotate:
        return z.mul_(scale)
    mean = X.to(torch.float64).mean(0).to(torch.float32)
    return _mm(z, (evecs.to(torch.float32) * scale).T).add_(mean)


def random_init(model: Any, seed: int = 0) -> Any:
    """A copy of ``model`` (a :class:`~hookscope.HookedModel`) with untrained weights: the
    architecture's own initialisation (Hugging Face models are rebuilt from their config
    under ``torch.manual_seed(seed)``; other modules are deep-copied and every submodule's
    ``reset_parameters`` is called). Same adapter, tokenizer and device; ``model`` is left
    untouched."""
    from hookscope.model import HookedModel

    if not isinstance(model, HookedModel):
        raise ProbeError(f"random_init takes a hookscope.HookedModel; got {type(model).__name__}")
    inner = model.model
    param = next(inner.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        config = getattr(inner, "config", None)
        if config is not None and hasattr(type(inner), "_from_config"):
            fresh = type(inner)._from_config(config, dtype=dtype)
        else:
            fresh = copy.deepcopy(inner)
            missing = []
            for name, module in fresh.named_modules():
                own = list(module.parameters(recurse=False))
                if not own:
                    continue
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                else:
                    missing.append(name or type(module).__name__)
            if missing:
                raise ProbeError(
                    f"cannot re-initialise {missing}: these modules hold parameters but have "
                    "no reset_parameters(); build the untrained model yourself and wrap it "
                    "with hookscope.HookedModel"
                )
    finally:
        torch.random.set_rng_state(state)
    fresh = fresh.to(device).eval()
    return HookedModel.wrap(fresh, model.tokenizer, adapter=model.adapter.name)
