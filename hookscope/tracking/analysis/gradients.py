"""Gradient statistics per parameter at saved checkpoints.

For each checkpoint (in increasing step order) the state is loaded into ``module``,
``loss_fn(module, batch)`` is evaluated and its gradient with respect to every parameter that
requires grad is taken with :func:`torch.autograd.grad` — not ``backward()``, so the
parameters' ``.grad`` fields are never written and stay exactly as they were. The module's
original state (parameters and buffers) is restored afterwards, also when a checkpoint or the
loss function raises.

Per parameter: ``mean`` and ``std`` (population, ``correction=0``) of the gradient entries,
``max_abs`` = max |g|, ``l2`` = ||g||_2, and ``sparsity`` = fraction of entries with
``|g| < zero_threshold`` (absolute, in gradient units; default 1e-8). A parameter the loss
does not depend on gets NaN statistics and ``used=False``. The module's train/eval mode is
left as the caller set it (dropout stays active in train mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from hookscope.analysis._validate import in_range
from hookscope.errors import AnalysisError, format_choices

from ._frames import table_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["GradientFlow", "gradient_flow"]

_STATS = ("mean", "std", "max_abs", "l2", "sparsity")


@dataclass(frozen=True, repr=False)
class GradientFlow:
    """Gradient statistics per (step, parameter), and the loss per step.

    ``table``: ``step``, ``parameter``, ``numel``, ``used``, ``mean``, ``std``, ``max_abs``,
    ``l2``, ``sparsity``. ``losses``: ``step``, ``loss``.
    """

    table: pd.DataFrame
    losses: pd.DataFrame
    zero_threshold: float

    def to_pandas(self) -> pd.DataFrame:
        """One row per (step, parameter)."""
        return self.table.copy()

    def __repr__(self) -> str:
        head = (
            f"GradientFlow({self.losses.shape[0]} checkpoints, "
            f"{self.table['parameter'].nunique()} parameters, "
            f"zero_threshold={self.zero_threshold:g})"
        )
        return head + "\n" + table_text(self.table)

    def plot(self) -> Figure:
        """Gradient L2 norm per parameter over steps (log y)."""
        from hookscope.plot import figure

        fig = figure(figsize=(6.5, 3.8))
        ax = fig.subplots()
        for name, rows in self.table.groupby("parameter", sort=False):
            ax.plot(rows["step"], rows["l2"], ".-", ms=3, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("gradient L2 norm")
        if self.table["parameter"].nunique() <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        return fig


def _checkpoints(checkpoints: Any, expected: set[str]) -> list[tuple[Any, dict]]:
    if not (hasattr(checkpoints, "items") and callable(checkpoints.items)):
        raise AnalysisError(
            "checkpoints must be a dict {step: state_dict} (or have .items()); "
            f"got {type(checkpoints).__name__}"
        )
    pairs = list(checkpoints.items())
    if not pairs:
        raise AnalysisError("checkpoints is empty")
    for step, state in pairs:
        if not hasattr(state, "keys"):
            raise AnalysisError(
                f"checkpoint {step!r} is not a state_dict; got {type(state).__name__}"
            )
        missing, extra = expected - set(state.keys()), set(state.keys()) - expected
        if missing or extra:
            raise AnalysisError(
                f"checkpoint {step!r} does not fit the module: missing "
                f"{format_choices(sorted(missing)) or 'nothing'}; unexpected "
                f"{format_choices(sorted(extra)) or 'nothing'}"
            )
    try:
        return sorted(pairs, key=lambda p: p[0])
    except TypeError as err:
        raise AnalysisError(f"checkpoint steps must be comparable numbers: {err}") from err


def _stats(g: torch.Tensor | None, threshold: float) -> dict[str, float]:
    if g is None:
        return {"used": False, **dict.fromkeys(_STATS, float("nan"))}
    g = g.detach().to(torch.float64).flatten()
    return {
        "used": True,
        "mean": float(g.mean()),
        "std": float(g.std(correction=0)),
        "max_abs": float(g.abs().max()),
        "l2": float(g.norm()),
        "sparsity": float((g.abs() < threshold).double().mean()),
    }


def gradient_flow(
    module: nn.Module,
    checkpoints: Any,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    zero_threshold: float = 1e-8,
) -> GradientFlow:
    """Gradient mean, std, max |g|, L2 and sparsity per parameter at every checkpoint.

    ``checkpoints``: ``{step: state_dict}`` of ``module``. ``loss_fn(module, batch)`` must
    return a scalar tensor. ``.grad`` fields and the module's state are left as they were.

    >>> def loss_fn(m, b): return nn.functional.mse_loss(m(b[0]), b[1])  # doctest: +SKIP
    >>> gradient_flow(model, {0: sd0, 100: sd100}, (x, y), loss_fn).plot()  # doctest: +SKIP
    """
    if not isinstance(module, nn.Module):
        raise AnalysisError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    if not callable(loss_fn):
        raise AnalysisError(f"loss_fn must be callable as loss_fn(module, batch); got {loss_fn!r}")
    zero_threshold = in_range(zero_threshold, "zero_threshold", 0.0, np.inf)
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    pairs = _checkpoints(checkpoints, set(original))
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        raise AnalysisError("module has no parameters that require grad")
    rows, losses = [], []
    try:
        for step, state in pairs:
            module.load_state_dict(state)
            with torch.enable_grad():
                loss = loss_fn(module, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
                    raise AnalysisError(f"loss_fn must return a scalar tensor; got {shape}")
                if not loss.requires_grad:
                    raise AnalysisError(
                        "loss_fn's result does not depend on the parameters (computed under "
                        "torch.no_grad() or detached?)"
                    )
                grads = torch.autograd.grad(
                    loss.reshape(()), [p for _, p in params], allow_unused=True
                )
            losses.append({"step": step, "loss": float(loss.detach())})
            for (name, p), g in zip(params, grads, strict=True):
                rows.append({"step": step, "parameter": name, "numel": p.numel(),
                             **_stats(g, zero_threshold)})  # fmt: skip
    finally:
        module.load_state_dict(original)
    return GradientFlow(pd.DataFrame(rows), pd.DataFrame(losses), zero_threshold)
