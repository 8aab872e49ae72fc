"""Where a gradient attribution takes its gradient, and the small checks every method shares.

* image / feature inputs (a float tensor), ``site=None``: the input itself;
* token inputs, ``site=None``: the ``embed`` address (the token embeddings);
* ``site="resid_post.1"`` (any layer-level address, or ``module:<path>``): that activation -
  the forward runs with the activation replaced by a tensor that requires grad (a hookscope
  hook), so the gradient is the model's derivative with respect to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from hookscope.addresses import Address
from hookscope.attribution._common import (
    Inputs,
    layer_site,
)
from hookscope.errors import InputError, format_choices
from hookscope.model import HookedModel

__all__ = ["Where", "check_count", "check_grad_mode", "chunks", "output_width"]


def check_count(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{name} must be a positive integer or None, got {value!r}")


# ---------------------------------------------------------------------------- where


class Where:
    """Where the gradient is taken: the model's float input, or an address whose activation
    the forward replaces with a given tensor."""

    def __init__(self, model: HookedModel, inputs: Inputs, site: Any, what: str):
        self.model, self.inputs = model, inputs
        if site is None and inputs.is_tokens:
            site = "embed"
            if "embed" not in [str(a) for a in model.addresses()]:
                raise InputError(
                    f"{what} over token inputs needs the model's embed address; "
                    f"{model.adapter.name} has none. Pass site= one of "
                    f"{format_choices([str(a) for a in model.addresses()])}"
                )
        self.address: Address | None = None if site is None else layer_site(model, site, what)
        self.site = "input" if self.address is None else str(self.address)

    def per_token(self, point: Tensor) -> bool:
        """Token inputs and a site over their positions ([batch, pos, ...]): the values are
        reduced to one per token."""
        pos = self.inputs.tensor.shape[1] if self.inputs.is_tokens else None
        return pos is not None and point.ndim >= 3 and point.shape[1] == pos

    def activation(self, examples: Tensor | None = None) -> Tensor:
        """The value the gradient is taken at (detached), for the rows ``examples``."""
        x = self.inputs.tensor if examples is None else self.inputs.tensor[examples]
        if self.address is None:
            return x.detach()
        _, cache = self.model.run_with_cache(x, [self.address], **self.inputs.kwargs(examples))
        return cache[self.address].detach()

    def forward(self, examples: Tensor, value: Tensor) -> Tensor:
        """The model's output on rows ``examples`` with the gradient point set to ``value``."""
        if self.address is None:
            return self.model(value)
        x = self.inputs.tensor[examples]

        def put(act: Tensor, address: Any) -> Tensor:
            if act.shape != value.shape:
                raise InputError(
                    f"the activation at {self.site} has shape {tuple(act.shape)} but the value "
                    f"given for it has {tuple(value.shape)}"
                )
            return value

        hooks = [(self.address, put)]
        return self.model.run_with_hooks(x, hooks=hooks, **self.inputs.kwargs(examples))

    def forward_leaf(self, examples: Tensor) -> tuple[Tensor, Tensor]:
        """One forward of rows ``examples`` (grad enabled) with the gradient point made a
        leaf that requires grad: ``(output, leaf)``."""
        if self.address is None:
            leaf = self.inputs.tensor[examples].detach().clone().requires_grad_(True)
            return self.model(leaf), leaf
        held: list[Tensor] = []

        def grab(act: Tensor, address: Any) -> Tensor:
            held.append(act.detach().clone().requires_grad_(True))
            return held[-1]

        x = self.inputs.tensor[examples]
        out = self.model.run_with_hooks(
            x, hooks=[(self.address, grab)], **self.inputs.kwargs(examples)
        )
        return out, held[0]

    def tokens(self, point: Tensor) -> list[list[str]] | None:
        """Each row's tokens as strings up to its last real one, when the values are per
        token (left padding shows as pad tokens with value 0)."""
        if not self.per_token(point):
            return None
        ids = self.inputs.tensor.cpu()
        lengths = (
            [ids.shape[1]] * ids.shape[0]
            if self.inputs.last is None
            else (self.inputs.last + 1).tolist()
        )
        rows = []
        for row, n in zip(ids.tolist(), lengths, strict=True):
            row = row[:n]
            if self.model.tokenizer is None:
                rows.append([str(t) for t in row])
            else:
                rows.append([self.model.tokenizer.decode([t]) for t in row])
        return rows


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def output_width(out: Tensor) -> int:
    return int(out.shape[-1])


def check_grad_mode(what: str) -> None:
    if torch.is_inference_mode_enabled():
        raise InputError(
            f"{what} needs gradients, which torch.inference_mode() turns off; call it outside "
            "the inference_mode block"
        )
