"""Typed component addresses and their string grammar.

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

Selections put ``*`` or an inclusive range ``a-b`` in any index: ``head.*.*``,
``resid_post.0-5``, ``neuron.2.*``, ``head.1-2.0-3.pattern``. They expand against a model
(:meth:`Selection.expand`). TransformerLens hook names (``blocks.3.hook_resid_post``,
``blocks.3.attn.hook_z``, ``blocks.3.mlp.hook_post``, ``hook_embed``, ...) are accepted as
aliases, wildcards included (``blocks.*.attn.hook_pattern``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from hookscope.errors import AddressError, AddressParseError, AddressRangeError, suggestion

__all__ = [
    "Address",
    "Embed",
    "Residual",
    "AttnOut",
    "MLPOut",
    "AttentionHead",
    "MLPNeuron",
    "Logits",
    "Module",
    "Slot",
    "Selection",
    "parse",
    "slot_address",
    "KINDS",
    "RESID_SITES",
    "HEAD_SITES",
    "NEURON_SITES",
]

RESID_SITES = ("pre", "mid", "post")
HEAD_SITES = ("z", "q", "k", "v", "result", "pattern")
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
    "logits",
    "module",
)

# Order of the layer-level tensors inside one layer, as the forward pass meets them.
_SLOT_ORDER = {
    "resid_pre": 0,
    "q": 1,
    "k": 2,
    "v": 3,
    "pattern": 4,
    "z": 5,
    "result": 6,
    "attn_out": 7,
    "resid_mid": 8,
    "neuron_pre": 9,
    "neuron_post": 10,
    "mlp_out": 11,
    "resid_post": 12,
}


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
        stage = {"embed": 0, "logits": 2, "module": 3}.get(s.kind, 1)
        idx = -1 if self.index is None else self.index
        return (stage, s.layer, _SLOT_ORDER.get(s.kind, 0), idx, s.path)

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
    """One attention head's ``site`` (z, q, k, v, result, pattern); ``head=None`` is all heads.

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
    if kind == "module":
        return Module(slot.path)
    if kind.startswith("resid_"):
        return Residual(layer, kind[len("resid_") :])
    if kind == "attn_out":
        return AttnOut(layer)
    if kind == "mlp_out":
        return MLPOut(layer)
    if kind.startswith("neuron_"):
        return MLPNeuron(layer, None, kind[len("neuron_") :])
    return AttentionHead(layer, None, kind)


# ---------------------------------------------------------------------------- selections


@dataclass(frozen=True)
class _Index:
    """One index position of a selection: a single value, an inclusive range, or ``*``."""

    lo: int | None = None  # None with hi None means '*'
    hi: int | None = None

    @property
    def is_all(self) -> bool:
        return self.lo is None

    def values(self, size: int, what: str) -> list[int]:
        if self.is_all:
            return list(range(size))
        assert self.lo is not None and self.hi is not None
        if self.hi >= size:
            raise AddressRangeError(
                f"{what} {self.hi} out of range: valid {what}s are 0-{size - 1}"
                if size
                else f"there are no {what}s"
            )
        return list(range(self.lo, self.hi + 1))

    def __str__(self) -> str:
        if self.is_all:
            return "*"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


class Dimensions:
    """What a selection needs to know about a model to expand (implemented by HookedModel)."""

    n_layers: int

    def n_heads(self, layer: int, site: str) -> int:  # pragma: no cover - interface
        raise AddressError("no heads")

    def n_neurons(self, layer: int, site: str) -> int:  # pragma: no cover - interface
        raise AddressError("no neurons")


@dataclass(frozen=True)
class Selection:
    """A pattern over addresses (``head.*.*``, ``resid_post.0-5``); expand it against a model."""

    kind: str
    layers: _Index = field(default_factory=_Index)
    units: _Index | None = None  # head / neuron index; None = layer-level address
    site: str = ""

    def expand(self, dims: Dimensions) -> list[Address]:
        """Concrete addresses in forward order; raises AddressRangeError past the model's size."""
        out: list[Address] = []
        for layer in self.layers.values(dims.n_layers, "layer"):
            if self.kind == "head":
                if self.units is None:
                    out.append(AttentionHead(layer, None, self.site))
                else:
                    n = dims.n_heads(layer, self.site)
                    out += [
                        AttentionHead(layer, h, self.site) for h in self.units.values(n, "head")
                    ]
            elif self.kind == "neuron":
                if self.units is None:
                    out.append(MLPNeuron(layer, None, self.site))
                else:
                    n = dims.n_neurons(layer, self.site)
                    out += [MLPNeuron(layer, i, self.site) for i in self.units.values(n, "neuron")]
            elif self.kind.startswith("resid_"):
                out.append(Residual(layer, self.kind[len("resid_") :]))
            elif self.kind == "attn_out":
                out.append(AttnOut(layer))
            else:
                out.append(MLPOut(layer))
        return out

    def __str__(self) -> str:
        if self.kind in ("head", "neuron"):
            text = f"{self.kind}.{self.layers}"
            if self.units is not None:
                text += f".{self.units}"
            default = "z" if self.kind == "head" else "post"
            return text if self.site == default else f"{text}.{self.site}"
        return f"{self.kind}.{self.layers}"

    def __repr__(self) -> str:
        return f"<Selection {self}>"


# ---------------------------------------------------------------------------- parsing

_INT = r"(?:0|[1-9][0-9]*)"
_IDX = rf"(?:\*|{_INT}(?:-{_INT})?)"
_LAYER_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

# TransformerLens hook names -> hookscope grammar ({L} is the layer token).
_TL_BLOCK = {
    "hook_resid_pre": "resid_pre.{L}",
    "hook_resid_mid": "resid_mid.{L}",
    "hook_resid_post": "resid_post.{L}",
    "hook_attn_out": "attn_out.{L}",
    "hook_mlp_out": "mlp_out.{L}",
    "attn.hook_z": "head.{L}",
    "attn.hook_q": "head.{L}.q",
    "attn.hook_k": "head.{L}.k",
    "attn.hook_v": "head.{L}.v",
    "attn.hook_result": "head.{L}.result",
    "attn.hook_pattern": "head.{L}.pattern",
    "mlp.hook_pre": "neuron.{L}.pre",
    "mlp.hook_post": "neuron.{L}",
}
_TL_GLOBAL = {"hook_embed": "embed", "unembed.hook_out": "logits"}
_TL_RE = re.compile(rf"^blocks\.({_IDX})\.(.+)$")


def _tl_alias(text: str) -> str | None:
    if text in _TL_GLOBAL:
        return _TL_GLOBAL[text]
    m = _TL_RE.match(text)
    if m is None:
        return None
    target = _TL_BLOCK.get(m.group(2))
    if target is None:
        raise AddressParseError(
            f"TransformerLens hook name {text!r} has no hookscope equivalent; supported block hooks: "
            + ", ".join(f"blocks.L.{k}" for k in _TL_BLOCK)
            + "."
            + suggestion(m.group(2), _TL_BLOCK)
        )
    return target.format(L=m.group(1))


def _parse_index(token: str, what: str, text: str) -> _Index:
    if not re.fullmatch(_IDX, token):
        raise AddressParseError(
            f"{what} {token!r} in {text!r} must be a non-negative integer, '*' or a range like '0-5'"
        )
    if token == "*":
        return _Index()
    lo, _, hi = token.partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if hi_i < lo_i:
        raise AddressParseError(f"empty range {token!r} in {text!r}: write low-high")
    return _Index(lo_i, hi_i)


def _grammar_help() -> str:
    return (
        "valid forms: embed, logits, resid_pre.L, resid_mid.L, resid_post.L, attn_out.L, mlp_out.L, "
        "head.L[.H][.z|q|k|v|result|pattern], neuron.L[.I][.post|pre], module:<path>; "
        "indices may be '*' or a range 'a-b'; TransformerLens names like blocks.L.hook_resid_post work too"
    )


def parse(text: str | Address | Selection) -> Address | Selection:
    """Read one address (or selection) from its string form; objects pass through.

    >>> parse("head.3.5.pattern")
    <AttentionHead head.3.5.pattern>
    >>> parse("resid_post.0-5")
    <Selection resid_post.0-5>
    """
    if isinstance(text, (Address, Selection)):
        return text
    if not isinstance(text, str):
        raise AddressParseError(
            f"an address must be a string, an Address or a Selection, got {type(text).__name__}"
        )
    raw = text.strip()
    if raw.startswith("module:"):
        return Module(raw[len("module:") :])
    raw = _tl_alias(raw) or raw
    if raw in ("embed", "logits"):
        return Embed() if raw == "embed" else Logits()
    parts = raw.split(".")
    kind = parts[0]
    if kind not in KINDS or kind in ("embed", "logits", "module"):
        raise AddressParseError(
            f"unknown address {text!r}; {_grammar_help()}." + suggestion(kind, KINDS)
        )
    if len(parts) < 2:
        raise AddressParseError(f"{text!r} needs a layer index, e.g. '{kind}.0'; {_grammar_help()}")
    layers = _parse_index(parts[1], "layer", text)
    rest = parts[2:]
    if kind in _LAYER_KINDS:
        if rest:
            raise AddressParseError(f"{text!r}: {kind} takes only a layer index, e.g. '{kind}.3'")
        if layers.is_all or layers.lo != layers.hi:
            return Selection(kind, layers)
        layer = layers.lo
        assert layer is not None
        if kind == "attn_out":
            return AttnOut(layer)
        if kind == "mlp_out":
            return MLPOut(layer)
        return Residual(layer, kind[len("resid_") :])
    sites = HEAD_SITES if kind == "head" else NEURON_SITES
    units: _Index | None = None
    site = sites[0]
    if rest and not rest[0][:1].isalpha():
        units = _parse_index(rest[0], "head" if kind == "head" else "neuron", text)
        rest = rest[1:]
    if rest:
        site = rest[0]
        if site not in sites:
            raise AddressParseError(
                f"unknown {kind} site {site!r} in {text!r}; valid sites: {', '.join(sites)}."
                + suggestion(site, sites)
            )
        rest = rest[1:]
    if rest:
        raise AddressParseError(
            f"{text!r} has trailing parts {'.'.join(rest)!r}; {_grammar_help()}"
        )
    concrete_layer = not layers.is_all and layers.lo == layers.hi
    concrete_unit = units is None or (not units.is_all and units.lo == units.hi)
    if not (concrete_layer and concrete_unit):
        return Selection(kind, layers, units, site)
    unit = None if units is None else units.lo
    if kind == "head":
        return AttentionHead(layers.lo, unit, site)  # type: ignore[arg-type]
    return MLPNeuron(layers.lo, unit, site)  # type: ignore[arg-type]


def iter_addresses(
    spec: object, dims: Dimensions, *, allow: Callable[[Address], None] | None = None
) -> Iterator[Address]:
    """Expand an address, a string, a selection or an iterable of those to addresses."""
    if isinstance(spec, (str, Address, Selection)):
        item = parse(spec)
        found: Iterable[Address] = item.expand(dims) if isinstance(item, Selection) else [item]
        for a in found:
            if allow is not None:
                allow(a)
            yield a
        return
    if isinstance(spec, Iterable):
        for one in spec:
            if not isinstance(one, (str, Address, Selection)):
                raise AddressParseError(
                    f"expected addresses (str, Address or Selection), got {type(one).__name__} inside {type(spec).__name__}"
                )
            yield from iter_addresses(one, dims, allow=allow)
        return
    raise AddressParseError(
        f"expected an address, a selection string or a list of them, got {type(spec).__name__}"
    )
