"""Edits to one forward of a Hugging Face model, as hooks and temporary ``forward``
replacements: what the intervention engine (:mod:`hookscope.interventions.engine`) uses to
join patched copies to the batch, replay recorded blocks and stop at the unembedding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from hookscope import dispatch
from hookscope.scope import Scope, protected


def repeat(t: Tensor, n: int) -> Tensor:
    return t.repeat(n, *([1] * (t.ndim - 1)))


def rows_of(value: Any, rows: slice) -> Any:
    """``value`` (a tensor, or a tuple holding tensors) restricted to batch ``rows``."""
    if isinstance(value, Tensor):
        return value[rows]
    if isinstance(value, tuple):
        return tuple(rows_of(v, rows) for v in value)
    return value


def positions(value: Any, cut: slice) -> Any:
    """A recorded block output (a tensor [batch, pos, ...] or a tuple starting with one)
    restricted to positions ``cut``."""
    if isinstance(value, Tensor):
        return value[:, cut]
    return (value[0][:, cut], *value[1:])


def first_tensor(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else value[0]


def batch_args(batch: int, module: nn.Module, args: tuple, kwargs: dict):
    """Block pre-hook: repeat batch-shaped arguments (such as padding masks) to as many
    copies of the base batch as the hidden states hold."""
    hidden = args[0] if args else kwargs["hidden_states"]
    n = hidden.shape[0] // batch

    def batched(value: Any) -> Any:
        if isinstance(value, Tensor):
            if value is not hidden and value.ndim >= 2 and value.shape[0] == batch:
                return repeat(value, n)
            return value
        if isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value):
            return tuple(batched(v) for v in value)
        return value

    if n == 1:
        return None
    return tuple(batched(a) for a in args), {k: batched(v) for k, v in kwargs.items()}


def join_input(parts: list[Tensor], module: nn.Module, args: tuple, kwargs: dict):
    """Block 0 pre-hook: its input becomes the copies that start there."""
    hidden = torch.cat(parts) if len(parts) > 1 else parts[0]
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def join_output(parts: list[Tensor], first: bool, module: nn.Module, args: tuple, out: Any):
    """Block forward hook: the copies starting at the next block join the batch (at the
    first start they replace the base rows, which no copy uses)."""
    hidden = first_tensor(out)
    joined = torch.cat(parts if first else [hidden, *parts])
    return joined if isinstance(out, Tensor) else (joined, *out[1:])


def replay(output: Any, *args: Any, **kwargs: Any) -> Any:
    """A block forward that returns a recorded output instead of computing it."""
    return output


def identity(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden


class Probe:
    """An unembedding forward that keeps its input and computes a few logit columns only:
    if the model returns exactly those, nothing follows the unembedding and sweeps may
    read the metric from its input."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.hidden: Tensor | None = None
        self.logits: Tensor | None = None

    def __call__(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # replacing the forward bypasses accelerate's hook on a dispatched model: read the
        # (possibly offloaded) weights through dispatch.weight, on its execution device
        weight = dispatch.weight(self.module, "weight")
        bias = dispatch.weight(self.module, "bias") if self.module.bias is not None else None
        cols = torch.linspace(0, weight.shape[0] - 1, min(16, weight.shape[0])).long()
        cols = cols.to(weight.device)
        hidden = hidden.to(weight.device)
        self.hidden = hidden
        self.logits = nn.functional.linear(
            hidden, weight[cols], bias[cols] if bias is not None else None
        )
        return self.logits

    def matches(self, out: Any) -> bool:
        ref = self.logits
        return (
            ref is not None
            and isinstance(out, Tensor)
            and out.shape == ref.shape
            and torch.equal(out.to(ref.device, ref.dtype), ref)
        )


def at_read_position(position: Tensor, module: nn.Module, args: tuple, kwargs: dict):
    """MLP pre-hook: keep only each row's read position (``position``: one per row of the
    base batch, counted in the tensor the MLP sees) of the input, as [rows, 1, d]."""
    x = args[0] if args else next(iter(kwargs.values()))
    reps = x.shape[0] // position.shape[0]
    x = x[torch.arange(x.shape[0], device=x.device), position.to(x.device).repeat(reps)][:, None]
    if args:
        return (x, *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: x}


class forward_replaced(Scope):
    """``with forward_replaced({module: fn}):`` each module gets the instance ``forward`` ``fn``
    for the block, in this thread (hooks still run); the previous forward is back however
    the block ends (a :class:`~hookscope.scope.Scope`)."""

    def __init__(self, replacements: dict[nn.Module, Callable]):
        super().__init__()
        self.replacements = replacements

    @protected(rollback=lambda self: self.close())
    def __enter__(self) -> forward_replaced:
        self.open()
        for module, fn in self.replacements.items():
            self.replace_forward(module, fn)
        return self
