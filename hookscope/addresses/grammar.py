"""The address grammar: ``parse(text)``, selections with ``*`` and ranges, TransformerLens aliases.

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
from typing import Protocol

from hookscope.addresses.core import (
    HEAD_SITES,
    KINDS,
    NEURON_SITES,
    Address,
    AttentionHead,
    AttnOut,
    Embed,
    FinalNorm,
    Logits,
    MLPNeuron,
    MLPOut,
    Module,
    Residual,
)
from hookscope.errors import AddressParseError, AddressRangeError, suggestion

__all__ = ["Dimensions", "Selection", "parse", "iter_addresses"]


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


class Dimensions(Protocol):
    """What a selection needs to know about a model to expand (HookedModel and the cache's
    layout provide it)."""

    n_layers: int

    def n_heads(self, layer: int, site: str) -> int: ...

    def n_neurons(self, layer: int, site: str) -> int: ...


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
_TL_GLOBAL = {
    "hook_embed": "embed",
    "unembed.hook_out": "logits",
    "ln_final.hook_normalized": "final_norm",
    "ln_final": "final_norm",
}
_GLOBAL = {"embed": Embed, "logits": Logits, "final_norm": FinalNorm}
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
        "valid forms: embed, final_norm (or ln_final), logits, resid_pre.L, resid_mid.L, "
        "resid_post.L, attn_out.L, mlp_out.L, "
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
    if raw in _GLOBAL:
        return _GLOBAL[raw]()
    parts = raw.split(".")
    kind = parts[0]
    if kind not in KINDS or kind in ("embed", "logits", "final_norm", "module"):
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
    return _unit_address(kind, layers, rest, text)


def _unit_address(
    kind: str, layers: _Index, rest: list[str], text: str
) -> AttentionHead | MLPNeuron | Selection:
    """The ``head``/``neuron`` address after its layer index: ``rest`` holds an optional
    unit index and an optional site (``text``: the whole address, for errors)."""
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
