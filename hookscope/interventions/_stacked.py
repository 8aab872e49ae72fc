"""Run many patched copies of one base batch in a single forward, doing no repeated work.

Patching sweeps run ``n`` copies of the base input, each with its own patch. Two things
in such a forward are the same for every copy, and :class:`StackedRunner` computes them
once:

* **Everything below the patched block.** A patch at block ``L`` leaves blocks ``< L``
  equal to the unpatched base run, so the base batch goes through them once and is
  repeated ``n`` times at block ``L``'s input (a forward pre-hook; every later block's
  batch-shaped arguments, such as padding masks, are repeated alongside).
* **The unembedding.** A structured metric needs a few logits (two for ``logit_diff``)
  at one position, not ``[batch, pos, vocab]``: the forward stops at the unembedding's
  input and the metric reads only its own columns (:meth:`Metric.per_example_hidden`).
  Before a sweep relies on this, the runner checks on the base run that the shortcut
  gives the metric of the full forward, and falls back to full logits if it does not
  (e.g. a model that rescales or soft-caps its logits after the unembedding).

Vision models, ``module:`` sites and the embedding fall back to plain repetition of the
input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from hookscope.adapters.base import submodule
from hookscope.adapters.transformer import TransformerAdapter
from hookscope.addresses import Slot
from hookscope.errors import InputError
from hookscope.interventions.metrics import Metric, Unembed
from hookscope.model import HookedModel

__all__ = ["StackedRunner"]

# Slots read inside block ``slot.layer`` (everything but the embedding and the logits).
_OUTSIDE_BLOCKS = ("embed", "logits", "module")


class _Stop(Exception):
    """Raised at the unembedding's input to end a forward early; carries that input."""

    def __init__(self, hidden: Tensor):
        super().__init__("hookscope readout")
        self.hidden = hidden


def _stop(module: nn.Module, args: tuple) -> None:
    raise _Stop(args[0])


def _repeat(t: Tensor, n: int) -> Tensor:
    return t.repeat(n, *([1] * (t.ndim - 1)))


def _expand(
    n: int, batch: int, first: bool, module: nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """Block pre-hook: repeat the base batch ``n`` times (hidden states at the first block;
    batch-shaped arguments such as masks at every block)."""

    def batched(value: Any) -> Any:
        if isinstance(value, Tensor):
            if batch > 1 and value.ndim >= 2 and value.shape[0] == batch:
                return _repeat(value, n)
            return value
        if isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value):
            return tuple(batched(v) for v in value)
        return value

    if args:
        hidden, rest = args[0], args[1:]
        if first:
            hidden = _repeat(hidden, n)
        return (hidden, *(batched(a) for a in rest)), {k: batched(v) for k, v in kwargs.items()}
    kwargs = dict(kwargs)
    hidden = kwargs.pop("hidden_states")
    if first:
        hidden = _repeat(hidden, n)
    return args, {"hidden_states": hidden, **{k: batched(v) for k, v in kwargs.items()}}


class StackedRunner:
    """Runs ``n`` copies of ``base`` with per-copy hooks; returns each copy's metric."""

    def __init__(self, model: HookedModel, base: Tensor, metric: Metric | Callable):
        self.model, self.base, self.metric = model, base, metric
        self.batch = int(base.shape[0])
        adapter = model.adapter
        self.blocks: Sequence[nn.Module] | None = None
        self.unembed: Unembed | None = None
        if isinstance(adapter, TransformerAdapter):
            self.blocks = list(submodule(model.model, adapter.layers_path))  # type: ignore[arg-type]
            head = submodule(model.model, adapter.unembed_path) if adapter.unembed_path else None
            if isinstance(metric, Metric) and isinstance(head, nn.Linear):
                self.unembed = Unembed(head)

    def start(self, slot: Slot) -> int | None:
        """The block whose input first differs between copies when ``slot`` is patched."""
        if self.blocks is None or slot.kind in _OUTSIDE_BLOCKS:
            return None
        return slot.layer

    def check_readout(self, expected: float) -> None:
        """Keep the early-stop readout only if it reproduces the full forward's metric
        (``expected``, the metric of the base batch's full logits)."""
        if self.unembed is not None:
            self._keep_readout(self.run([], 1, None, uses_logits=False)[0], expected)

    def check_readout_from(self, hidden: Tensor, expected: float) -> None:
        """:meth:`check_readout` from the unembedding's input of a base run already done."""
        if self.unembed is not None:
            self._keep_readout(self._values(hidden, 1, hidden=True)[0], expected)

    def _keep_readout(self, got: float, expected: float) -> None:
        if not abs(got - expected) <= 1e-4 * max(1.0, abs(expected)):
            self.unembed = None

    def run(self, hooks: list, n: int, start: int | None, uses_logits: bool = False) -> list[float]:
        """Forward ``n`` copies of the base batch with ``hooks``; one metric value per copy.

        ``start``: the first block where copies differ (None: repeat the input itself).
        ``uses_logits``: a hook reads or writes the logits, so the forward must not stop early.
        """
        handles = []
        inputs = self.base
        try:
            if start is not None and n > 1:
                for i, block in enumerate(self.blocks[start:], start):  # type: ignore[index]
                    handles.append(
                        block.register_forward_pre_hook(
                            partial(_expand, n, self.batch, i == start),
                            with_kwargs=True,
                            prepend=True,
                        )
                    )
            elif n > 1:
                inputs = _repeat(self.base, n)
            readout = self.unembed is not None and not uses_logits
            if readout:
                handles.append(self.unembed.module.register_forward_pre_hook(_stop, prepend=True))  # type: ignore[union-attr]
            try:
                with torch.no_grad():
                    out = self.model.run_with_hooks(inputs, hooks=hooks)
            except _Stop as stop:
                out = stop.hidden
            else:
                readout = False
        finally:
            for handle in handles:
                handle.remove()
        return self._values(out, n, hidden=readout)

    @torch.no_grad()
    def _values(self, out: Tensor, n: int, hidden: bool) -> list[float]:
        b = self.batch
        values = []
        for i in range(n):
            rows = out[i * b : (i + 1) * b]
            if hidden:
                value = self.metric.per_example_hidden(rows, self.unembed).mean()  # type: ignore[union-attr]
            else:
                value = self.metric(rows)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise InputError(
                    f"metric must return a scalar tensor, got "
                    f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
                )
            values.append(float(value))
        return values
