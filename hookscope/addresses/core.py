"""Typed component addresses: the classes, their slots and their order.

An address names one tensor inside a model in terms that mean the same on every
architecture. Addresses are frozen, hashable and ordered by where they occur in the
forward pass. ``parse(text)`` reads the grammar below and ``str(address)`` writes it back,
so ``parse(str(a)) == a`` for every address.

=============================================  ==============================  ======================================
text                                           object                          tensor (language model)
=============================================  ==============================  ======================================
``embed``                                      ``Embed()``                     [batch, pos, d_model] (token embedding)
``resid_pre.3`` / ``resid_mid.3`` / ``.post``  ``Residual(3, "pre"/...)``      [batch, pos, d_model]
``attn_out.3``, ``mlp_out.3``                  ``AttnOut(3)``, ``MLPOut(3)``   [batch, pos, d_model]
``head.3.5`` (= ``head.3.5.z``)                ``AttentionHead(3, 5)``         [batch, pos, d_head] (input of W_O)
``head.3.5.q`` / ``.k`` / ``.v``               ``AttentionHead(3, 5, "q")``    [batch, pos, d_head] (q, k before rotary)
``head.3.5.result``                            ``AttentionHead(3, 5, "result")`` [batch, pos, d_model] (z_h @ W_O[h])
``head.3.5.pattern``                           ``AttentionHead(3, 5, "pattern")`` [batch, dest, src]
``head.3`` / ``head.3.q`` / ...                ``AttentionHead(3)``            [batch, pos, n_heads, d_head]
                                                                                (pattern: [batch, n_heads, dest, src])
``neuron.2.187`` (= ``.post``), ``.pre``       ``MLPNeuron(2, 187)``           [batch, pos]
``neuron.2`` / ``neuron.2.pre``                ``MLPNeuron(2)``                [batch, pos, d_mlp]
``logits``                                     ``Logits()``                    [batch, pos, vocab]
``module:gpt_neox.layers.3.mlp``               ``Module("gpt_neox.layers.3.mlp")``  what that module outputs
=============================================  ==============================  ======================================

The string grammar, selections (``head.*.*``, ``resid_post.0-5``) and TransformerLens
aliases live in :mod:`hookscope.addresses.grammar`, which imports this module (never the
other way round); :mod:`hookscope.addresses` re-exports both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from hookscope.addresses.kinds import (
    HEAD_KINDS,
    HEAD_SITES,
    NEURON_KINDS,
    SLOT_KINDS,
    SLOT_ORDER,
    SlotKind,
    slot_kind,
    unit_position,
)
from hookscope.errors import AddressError, AddressRangeError, suggestion

__all__ = [
    "Address",
    "Embed",
    "Residual",
    "AttnOut",
    "MLPOut",
    "AttentionHead",
    "MLPNeuron",
    "Logits",
    "FinalNorm",
    "Module",
    "Slot",
    "slot_address",
    "KINDS",
    "RESID_SITES",
    "HEAD_SITES",
    "NEURON_SITES",
    "SLOT_ORDER",
    "SLOT_KINDS",
    "SlotKind",
    "slot_kind",
    "unit_position",
    "HEAD_KINDS",
    "NEURON_KINDS",
]

RESID_SITES = ("pre", "mid", "post")
NEURON_SITES = ("post", "pre")
KINDS = (
    "embed",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "head",
    "neuron",
    "final_norm",
    "logits",
    "module",
)


@dataclass(frozen=True, order=True)
class Slot:
    """One layer-level tensor of a model: what hooks attach to and what a cache stores.

    ``kind`` is one of ``embed``, ``logits``, ``module``, ``resid_pre``, ``resid_mid``,
    ``resid_post``, ``attn_out``, ``mlp_out``, ``q``, ``k``, ``v``, ``z``, ``result``,
    ``pattern``, ``neuron_pre``, ``neuron_post``. Per-head and per-neuron addresses are
    views (an index) into the slot of their layer.
    """

    kind: str
    layer: int = -1
    path: str = ""


def _check_index(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise AddressError(
            f"{name} must be a non-negative int, got {value!r} ({type(value).__name__})"
        )
    if value < 0:
        raise AddressRangeError(f"{name} must be >= 0, got {value}")


def _check_site(kind: str, site: object, choices: tuple[str, ...]) -> None:
    if site not in choices:
        raise AddressError(
            f"unknown {kind} site {site!r}; valid sites: {', '.join(choices)}."
            + suggestion(str(site), choices)
        )


class Address:
    """Base class of all typed component addresses (see the module docstring)."""

    kind: ClassVar[str] = ""

    @property
    def slot(self) -> Slot:
        """The layer-level tensor this address reads (itself or a view of it)."""
        raise AddressError(f"{type(self).__name__} has no slot")  # overridden by every subclass

    @property
    def index(self) -> int | None:
        """Head or neuron index into the slot's tensor; None for the whole tensor."""
        return None

    @property
    def layer_index(self) -> int | None:
        """The layer this address lives in, or None (embed, logits, module)."""
        return None

    def _sort_key(self) -> tuple:
        s = self.slot
        stage = {"embed": 0, "final_norm": 2, "logits": 3, "module": 4}.get(s.kind, 1)
        idx = -1 if self.index is None else self.index
        return (stage, s.layer, SLOT_ORDER.get(s.kind, 0), idx, s.path)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return self._sort_key() < other._sort_key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return self == other or self._sort_key() < other._sort_key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return self._sort_key() > other._sort_key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return self == other or self._sort_key() > other._sort_key()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"


@dataclass(frozen=True, eq=True, repr=False)
class Embed(Address):
    """Token embedding output (before positional embeddings are added)."""

    kind: ClassVar[str] = "embed"

    @property
    def slot(self) -> Slot:
        return Slot("embed")

    def __str__(self) -> str:
        return "embed"


@dataclass(frozen=True, eq=True, repr=False)
class Logits(Address):
    """The model's output logits (the unembedding / classifier head output)."""

    kind: ClassVar[str] = "logits"

    @property
    def slot(self) -> Slot:
        return Slot("logits")

    def __str__(self) -> str:
        return "logits"


@dataclass(frozen=True, eq=True, repr=False)
class FinalNorm(Address):
    """The final LayerNorm/RMSNorm's output, what the unembedding reads (alias ``ln_final``)."""

    kind: ClassVar[str] = "final_norm"

    @property
    def slot(self) -> Slot:
        return Slot("final_norm")

    def __str__(self) -> str:
        return "final_norm"


@dataclass(frozen=True, eq=True, repr=False)
class Residual(Address):
    """Residual stream at a layer: ``pre`` (block input), ``mid`` (after attention), ``post``."""

    layer: int
    site: str = "post"
    kind: ClassVar[str] = "resid"

    def __post_init__(self) -> None:
        _check_index("layer", self.layer)
        _check_site("residual", self.site, RESID_SITES)

    @property
    def slot(self) -> Slot:
        return Slot(f"resid_{self.site}", self.layer)

    @property
    def layer_index(self) -> int:
        return self.layer

    def __str__(self) -> str:
        return f"resid_{self.site}.{self.layer}"


@dataclass(frozen=True, eq=True, repr=False)
class AttnOut(Address):
    """Output of a layer's attention block (after the output projection)."""

    layer: int
    kind: ClassVar[str] = "attn_out"

    def __post_init__(self) -> None:
        _check_index("layer", self.layer)

    @property
    def slot(self) -> Slot:
        return Slot("attn_out", self.layer)

    @property
    def layer_index(self) -> int:
        return self.layer

    def __str__(self) -> str:
        return f"attn_out.{self.layer}"


@dataclass(frozen=True, eq=True, repr=False)
class MLPOut(Address):
    """Output of a layer's MLP block."""

    layer: int
    kind: ClassVar[str] = "mlp_out"

    def __post_init__(self) -> None:
        _check_index("layer", self.layer)

    @property
    def slot(self) -> Slot:
        return Slot("mlp_out", self.layer)

    @property
    def layer_index(self) -> int:
        return self.layer

    def __str__(self) -> str:
        return f"mlp_out.{self.layer}"


@dataclass(frozen=True, eq=True, repr=False)
class AttentionHead(Address):
    """One attention head's ``site`` (z, q, k, v, pattern, result); ``head=None`` is all heads.

    With grouped-query attention, ``k``/``v`` of query head ``h`` are those of the shared
    k/v head ``h // (n_heads // n_kv_heads)`` (the grouping Hugging Face's ``repeat_kv``
    uses); ``AttentionHead(l, None, "k")`` is the k/v-head tensor
    [batch, pos, n_kv_heads, d_head].
    """

    layer: int
    head: int | None = None
    site: str = "z"
    kind: ClassVar[str] = "head"

    def __post_init__(self) -> None:
        _check_index("layer", self.layer)
        _check_index("head", self.head, allow_none=True)
        _check_site("head", self.site, HEAD_SITES)

    @property
    def slot(self) -> Slot:
        return Slot(self.site, self.layer)

    @property
    def index(self) -> int | None:
        return self.head

    @property
    def layer_index(self) -> int:
        return self.layer

    def __str__(self) -> str:
        text = f"head.{self.layer}" if self.head is None else f"head.{self.layer}.{self.head}"
        return text if self.site == "z" else f"{text}.{self.site}"


@dataclass(frozen=True, eq=True, repr=False)
class MLPNeuron(Address):
    """One hidden unit of a layer's MLP (``post`` activation or ``pre``); ``neuron=None`` is all.

    For a CNN, neuron ``c`` of conv layer ``L`` is channel ``c`` of its feature map.
    """

    layer: int
    neuron: int | None = None
    site: str = "post"
    kind: ClassVar[str] = "neuron"

    def __post_init__(self) -> None:
        _check_index("layer", self.layer)
        _check_index("neuron", self.neuron, allow_none=True)
        _check_site("neuron", self.site, NEURON_SITES)

    @property
    def slot(self) -> Slot:
        return Slot(f"neuron_{self.site}", self.layer)

    @property
    def index(self) -> int | None:
        return self.neuron

    @property
    def layer_index(self) -> int:
        return self.layer

    def __str__(self) -> str:
        text = (
            f"neuron.{self.layer}" if self.neuron is None else f"neuron.{self.layer}.{self.neuron}"
        )
        return text if self.site == "post" else f"{text}.{self.site}"


_MODULE_PATH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


@dataclass(frozen=True, eq=True, repr=False)
class Module(Address):
    """Escape hatch: the output of any submodule, by its ``named_modules`` path."""

    path: str
    kind: ClassVar[str] = "module"

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not _MODULE_PATH.match(self.path):
            raise AddressError(
                f"module path must be a dotted submodule name like 'gpt_neox.layers.3.mlp', got {self.path!r}"
            )

    @property
    def slot(self) -> Slot:
        return Slot("module", -1, self.path)

    def __str__(self) -> str:
        return f"module:{self.path}"


AddressLike = Address | str


def slot_address(slot: Slot) -> Address:
    """The layer-level address whose tensor is ``slot`` (``head.3.q`` for Slot("q", 3))."""
    kind, layer = slot.kind, slot.layer
    if kind == "embed":
        return Embed()
    if kind == "logits":
        return Logits()
    if kind == "final_norm":
        return FinalNorm()
    if kind == "module":
        return Module(slot.path)
    if kind.startswith("resid_"):
        return Residual(layer, kind[len("resid_") :])
    if kind == "attn_out":
        return AttnOut(layer)
    if kind == "mlp_out":
        return MLPOut(layer)
    if SLOT_KINDS[kind].unit == "neuron":
        return MLPNeuron(layer, None, kind[len("neuron_") :])
    return AttentionHead(layer, None, kind)
