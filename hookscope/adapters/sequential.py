"""Plain MLPs and CNNs: stacks of Linear / Conv layers with activations between them.

The leaf modules are read in registration order (the order of an ``nn.Sequential``, and
of the attributes in a custom ``__init__``: keep it the execution order). They are cut into
blocks, one per Linear/Conv ("compute") module, each with the norm / activation / dropout /
pooling modules that follow it. The last compute module is the output head.

For hidden block ``L``:

* ``neuron.L.I.pre`` is the compute module's output; ``neuron.L.I`` (post) the output of the
  block's activation module (equal to pre when the activation is functional, i.e. not a
  module, since no hook can see it). Linear: [batch, d] with unit ``I`` -> [batch];
  Conv2d: [batch, C, H, W] with channel ``c`` -> [batch, H, W].
* ``resid_pre.L`` is the compute module's input; ``resid_post.L`` the block's output
  (e.g. the pooled feature map).
* ``logits`` is the head's output.

There are no heads, attention or MLP sub-blocks, and no ``embed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hookscope.adapters.base import Adapter, Dims, Tap
from hookscope.addresses import Slot
from hookscope.errors import AdapterError, InputError

__all__ = ["SequentialAdapter", "is_sequential"]

COMPUTE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FOLLOWERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.PReLU,
)
BOUNDARIES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Softmax, nn.LogSoftmax)


@dataclass
class _Block:
    compute: str
    module: nn.Module
    activation: str | None = None
    last: str = ""
    inplace_after_compute: bool = False


def _leaves(root: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in root.named_modules() if n and not list(m.children())]


def is_sequential(root: nn.Module) -> bool:
    """True when every leaf module is a compute, activation, norm, pool or reshape module."""
    leaves = _leaves(root)
    if not leaves or not any(isinstance(m, COMPUTE) for _, m in leaves):
        return False
    known = COMPUTE + FOLLOWERS + ACTIVATIONS + BOUNDARIES
    return all(isinstance(m, known) for _, m in leaves)


class SequentialAdapter(Adapter):
    """MLP (Linear only) or CNN (with Conv layers); see the module docstring."""

    def __init__(self, root: nn.Module):
        if not is_sequential(root):
            raise AdapterError(
                f"{type(root).__name__} is not a stack of Linear/Conv layers with activations; "
                "wrap it with adapter='module' to use module:<path> addresses"
            )
        blocks: list[_Block] = []
        open_block = False  # followers attach only until a reshape/boundary module
        for name, mod in _leaves(root):
            if isinstance(mod, COMPUTE):
                blocks.append(_Block(name, mod, last=name))
                open_block = True
            elif open_block and isinstance(mod, FOLLOWERS + ACTIVATIONS):
                b = blocks[-1]
                if getattr(mod, "inplace", False) and b.last == b.compute:
                    b.inplace_after_compute = True  # it overwrites the compute output
                if isinstance(mod, ACTIVATIONS) and b.activation is None:
                    b.activation = name
                b.last = name
            else:
                open_block = False
        if len(blocks) < 2:
            raise AdapterError(
                f"{type(root).__name__} has {len(blocks)} Linear/Conv layer(s); a hidden layer needs at least two"
            )
        self.layer_groups = blocks[:-1]
        self.head = blocks[-1]
        self.is_cnn = any(isinstance(b.module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for b in blocks)
        self.name = "cnn" if self.is_cnn else "mlp"
        super().__init__(root)

    def _read_dims(self) -> Dims:
        widths = [_width(b.module) for b in self.layer_groups]
        return Dims(n_layers=len(self.layer_groups), d_mlp=None, extra={"widths": widths})

    def slot_kinds(self) -> tuple[str, ...]:
        return ("resid_pre", "resid_post", "neuron_pre", "neuron_post", "logits")

    def n_neurons(self, layer: int, site: str) -> int:
        return _width(self.layer_groups[layer].module)

    def _is_conv(self, layer: int) -> bool:
        return not isinstance(self.layer_groups[layer].module, nn.Linear)

    def unit_axis(self, slot: Slot) -> int:
        return 1 if self._is_conv(slot.layer) else -1

    def _tap(self, slot: Slot) -> Tap:
        if slot.kind == "logits":
            return Tap(self.head.compute)
        b = self.layer_groups[slot.layer]
        if slot.kind == "resid_pre":
            return Tap(b.compute, "input", 0, "input")
        if slot.kind == "resid_post":
            return Tap(b.last)
        if slot.kind == "neuron_pre":
            return Tap(b.compute, clone_on_record=b.inplace_after_compute)
        return Tap(
            b.activation or b.compute,
            clone_on_record=b.activation is None and b.inplace_after_compute,
        )

    def check_input(self, inputs: Tensor) -> None:
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise InputError(
                f"{self.name} input must be a float tensor, got "
                f"{inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__}"
            )
        first = self.layer_groups[0].module
        leaves = _leaves(self.root)
        flattens = leaves and isinstance(leaves[0][1], nn.Flatten)
        if isinstance(first, nn.Linear):
            got = int(torch.tensor(inputs.shape[1:]).prod()) if flattens else inputs.shape[-1]
            if inputs.ndim < 2 or got != first.in_features:
                raise InputError(
                    f"{self.name} expects [batch, {first.in_features}] input"
                    + (" (after flattening)" if flattens else "")
                    + f", got shape {tuple(inputs.shape)}"
                )
        else:
            want = first.in_channels  # type: ignore[union-attr]
            nd = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}[type(first)]  # type: ignore[index]
            if inputs.ndim != nd or inputs.shape[1] != want:
                raise InputError(
                    f"{self.name} expects input [batch, {want}, ...] with {nd} dimensions, got shape {tuple(inputs.shape)}"
                )

    def describe(self) -> str:
        widths = ", ".join(str(w) for w in self.dims.extra["widths"])
        return f"{self.name}: {self.n_layers} hidden layers of width {widths}; head {self.head.compute}"


def _width(m: nn.Module) -> int:
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)  # type: ignore[union-attr]
