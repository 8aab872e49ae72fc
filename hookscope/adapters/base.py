"""What an adapter is: a table from address slots to taps on real modules.

A :class:`Tap` says where one layer-level tensor (a :class:`~hookscope.addresses.Slot`)
lives in the wrapped module: which submodule, whether its input or output, and the view
from that module tensor to the slot tensor (e.g. GPT-NeoX's fused, per-head interleaved QKV
output viewed as q / k / v of shape [batch, pos, n_heads, d_head]). Views are real views, so
per-head and per-neuron entries never copy, and writing through a view changes exactly that
head or neuron.

Three taps are not a plain module boundary and say so in ``special``:

* ``resid_mid`` on sequential-residual transformers is ``attn_out + resid_pre`` (the same
  addition the block performs, so reading it is exact); a replacement is written back as a
  new attention output ``new - resid_pre``.
* ``pattern`` on Hugging Face models is the softmax output inside the attention function;
  hookscope registers an eager attention function that exposes it (see ``hf_attention``).
* ``result`` (per-head output, z_h @ W_O[h]) is computed from the output projection's
  input; when written to, the projection output becomes the sum of the per-head results
  plus the bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hookscope.addresses import SLOT_KINDS, Address, Slot
from hookscope.errors import (
    AddressRangeError,
    InputError,
    SiteUnavailableError,
    format_choices,
)

__all__ = ["Tap", "Adapter", "ModuleAdapter", "submodule", "output_tensor"]

View = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Tap:
    """Where a slot's tensor is read and written.

    ``event`` is ``"output"`` (forward hook), ``"input"`` (forward pre-hook; ``arg`` is the
    positional index and ``kwarg`` the keyword name the argument may be passed under) or
    ``"attention_fn"`` (the Hugging Face attention function, for ``pattern``).
    """

    module: str
    event: str = "output"
    arg: int = 0
    kwarg: str | None = None
    view: View | None = None
    special: str = ""
    stash: Slot | None = None  # resid_mid: the resid_pre slot to add
    clone_on_record: bool = False  # an in-place op later overwrites the module tensor


def submodule(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (walked through ``_modules`` on every call, so a
    replaced submodule is always the one found), with a hookscope error naming close paths."""
    module = root
    try:
        for part in path.split(".") if path else ():
            module = module._modules[part]  # type: ignore[assignment]
    except (KeyError, TypeError):
        from hookscope.errors import suggestion

        names = [n for n, _ in root.named_modules() if n]
        raise SiteUnavailableError(
            f"module {path!r} does not exist in {type(root).__name__}." + suggestion(path, names)
        ) from None
    return module


def output_tensor(output: object) -> Tensor:
    """The tensor a module produced: itself, or the first tensor of a tuple/ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "values"):
        for value in output.values():  # transformers ModelOutput
            if isinstance(value, Tensor):
                return value
    raise InputError(f"module output of type {type(output).__name__} holds no tensor to hook")


@dataclass
class Dims:
    """Sizes an adapter reads off its model."""

    n_layers: int
    d_model: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_head: int | None = None
    d_mlp: int | None = None
    d_vocab: int | None = None
    extra: dict = field(default_factory=dict)


class Adapter:
    """Maps slots to taps for one wrapped module. Subclasses fill in the table."""

    name = "base"
    #: unit axis (head or neuron dimension) of each slot kind's tensor
    unit_axes: dict[str, int] = {}

    def __init__(self, root: nn.Module):
        self.root = root
        self.dims = self._read_dims()

    # ------------------------------------------------------------------ table
    def _read_dims(self) -> Dims:
        return Dims(n_layers=0)

    def slot_kinds(self) -> tuple[str, ...]:
        """Slot kinds this model has (``resid_pre``, ``q``, ``neuron_post``, ...)."""
        return ()

    def _tap(self, slot: Slot) -> Tap:
        raise SiteUnavailableError(self._unavailable(slot.kind))

    def tap(self, slot: Slot) -> Tap:
        self.check_slot(slot)
        return Tap(slot.path) if slot.kind == "module" else self._tap(slot)

    # ------------------------------------------------------------------ sizes
    @property
    def n_layers(self) -> int:
        return self.dims.n_layers

    def n_heads(self, layer: int, site: str) -> int:
        raise SiteUnavailableError(self._unavailable(site))

    def n_neurons(self, layer: int, site: str) -> int:
        raise SiteUnavailableError(self._unavailable(f"neuron_{site}"))

    def unit_axis(self, slot: Slot) -> int:
        """Axis of the slot's tensor that indexes heads or neurons."""
        return self.unit_axes[slot.kind]

    def unit_index(self, slot: Slot, index: int) -> int:
        """Position along the slot's unit axis of head/neuron ``index`` (GQA maps k/v here)."""
        return index

    # ------------------------------------------------------------------ checks
    def _unavailable(self, kind: str) -> str:
        have = sorted({_kind_name(k) for k in self.slot_kinds()} - {"module:<path>"}) + [
            "module:<path>"
        ]
        return (
            f"{_kind_name(kind)} does not exist on this {self.name} model; "
            f"available here: {format_choices(have, 20)}"
        )

    def check_slot(self, slot: Slot) -> None:
        if slot.kind == "module":
            submodule(self.root, slot.path)
            return
        if slot.kind not in self.slot_kinds():
            raise SiteUnavailableError(self._unavailable(slot.kind) + self._why_missing(slot.kind))
        if slot.layer >= 0 and slot.layer >= self.n_layers:
            raise AddressRangeError(
                f"layer {slot.layer} out of range: this {self.name} model has {self.n_layers} layers "
                f"(0-{self.n_layers - 1})"
            )

    def _why_missing(self, kind: str) -> str:
        return ""

    def check(self, address: Address) -> None:
        """Raise a HookscopeError unless ``address`` names a real tensor of this model."""
        slot = address.slot
        self.check_slot(slot)
        if address.index is None:
            return
        if address.kind == "head":
            n, what = self.n_heads(slot.layer, slot.kind), "head"
        else:
            n, what = self.n_neurons(slot.layer, slot.kind.split("_")[1]), "neuron"
        if address.index >= n:
            raise AddressRangeError(
                f"{what} {address.index} out of range in {address}: layer {slot.layer} has {n} {what}s (0-{n - 1})"
            )

    def check_input(self, inputs: Tensor) -> None:
        """Raise InputError for model input of the wrong dtype/shape (before any hook runs)."""

    # ------------------------------------------------------------------ structure
    # What code outside adapters/ may know about a model's structure (the intervention
    # engine, residual-stream tools, generation): nothing reaches into adapter internals.
    # The defaults describe a model without transformer blocks (an MLP, a CNN, any module).

    #: the input is token ids (a language model), not images or features
    token_input: bool = False

    @property
    def causal(self) -> bool:
        """Whether position ``t`` depends on the inputs at positions ``<= t`` only."""
        return False

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (grouped-query attention; 1 without it)."""
        return 1

    def blocks(self) -> list[nn.Module] | None:
        """The residual blocks in forward order (block ``L`` computes ``resid_post.L`` from
        ``resid_pre.L``), or None for a model without them."""
        return None

    def unembed_module(self) -> nn.Module | None:
        """The unembedding (the module whose output is ``logits``), if the model has one."""
        return None

    def position_axis(self, slot: Slot) -> int | None:
        """The axis of ``slot``'s tensor that indexes positions (tokens, patches), or None."""
        return None

    def block_part(self, layer: int, part: str) -> nn.Module | None:
        """A module of block ``layer``: ``"mlp"`` (the whole MLP), ``"out_proj"`` (the
        attention output projection, whose input is ``z``), ``"post_attn_norm"`` (a norm
        between the output projection and the residual addition, as in Gemma), or a gated
        MLP's ``"gate"``, ``"up"`` and ``"down"`` projections and ``"act"`` activation
        (``mlp(x) = down(act(gate(x)) * up(x))``); None where the block has no such module."""
        check_choice_part(part)
        return None

    @property
    def linear_head_tail(self) -> bool:
        """Whether a head's ``z``/``result`` reaches its block's output through the output
        projection alone, added to the residual stream in parallel with the MLP (GPT-NeoX's
        parallel residual without a post-attention norm): then a patch of heads changes the
        block output by a sum of per-head terms."""
        return False

    def describe(self) -> str:
        return self.name


BLOCK_PARTS = ("mlp", "out_proj", "post_attn_norm", "gate", "up", "down", "act")


def check_choice_part(part: str) -> None:
    if part not in BLOCK_PARTS:
        raise InputError(f"block part {part!r} is not one of {format_choices(BLOCK_PARTS)}")


def _kind_name(kind: str) -> str:
    """Address-grammar name of a slot kind (``q`` -> ``head.L.H.q``)."""
    known = SLOT_KINDS.get(kind)
    return known.grammar if known is not None else f"{kind}.L"


class ModuleAdapter(Adapter):
    """Fallback for any ``nn.Module``: only ``module:<path>`` addresses."""

    name = "module"

    def slot_kinds(self) -> tuple[str, ...]:
        return ("module",)


def check_token_input(inputs: Tensor, vocab: int | None) -> None:
    """Token ids: integer dtype, [batch, pos] or [pos], every id below the vocabulary size."""
    if not isinstance(inputs, Tensor):
        raise InputError(f"expected token ids as a tensor, got {type(inputs).__name__}")
    if inputs.dtype.is_floating_point or inputs.dtype == torch.bool or inputs.is_complex():
        raise InputError(
            f"token ids must be an integer tensor (torch.long), got dtype {inputs.dtype}; "
            "pass strings to have the tokenizer make them"
        )
    if inputs.ndim != 2:
        raise InputError(
            f"token ids must be [batch, pos] or [pos], got shape {tuple(inputs.shape)}"
        )
    if inputs.shape[1] == 0:
        raise InputError("token ids are empty (0 positions)")
    if inputs.numel() and vocab is not None:
        lo, hi = int(inputs.min()), int(inputs.max())
        if lo < 0 or hi >= vocab:
            raise InputError(
                f"token ids must lie in 0-{vocab - 1} (vocabulary size {vocab}); found {lo}..{hi}"
            )
