"""The one table of slot kinds: every kind of layer-level tensor (a
:class:`~hookscope.addresses.Slot`'s ``kind``) with its forward order, unit axis, grammar
name and stack alias; the orders, site lists and unit rules every module uses derive from
it. Imports nothing of hookscope."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SlotKind",
    "SLOT_KINDS",
    "SLOT_ORDER",
    "HEAD_SITES",
    "HEAD_KINDS",
    "NEURON_KINDS",
    "slot_kind",
    "unit_position",
]


@dataclass(frozen=True)
class SlotKind:
    """One kind of layer-level tensor (a :class:`Slot`'s ``kind``), as every module sees it.

    ``order``: its place inside a layer in forward order (None: outside the layers);
    ``unit``: what its unit axis indexes (``"head"``, ``"neuron"`` or None: no units);
    ``grammar``: how the address grammar writes it (``head.L.H.q``); ``alias``: the other
    name ``ActivationCache.stack`` takes for it (``head`` for ``z``)."""

    name: str
    order: int | None
    unit: str | None
    grammar: str
    alias: str | None = None

    @property
    def in_block(self) -> bool:
        """Whether the tensor is computed inside block ``slot.layer``."""
        return self.order is not None


#: every slot kind, in forward order (the one table of slot kinds)
SLOT_KINDS: dict[str, SlotKind] = {
    k.name: k
    for k in (
        SlotKind("embed", None, None, "embed"),
        SlotKind("resid_pre", 0, None, "resid_pre.L"),
        SlotKind("q", 1, "head", "head.L.H.q"),
        SlotKind("k", 2, "head", "head.L.H.k"),
        SlotKind("v", 3, "head", "head.L.H.v"),
        SlotKind("pattern", 4, "head", "head.L.H.pattern"),
        SlotKind("z", 5, "head", "head.L.H", alias="head"),
        SlotKind("result", 6, "head", "head.L.H.result"),
        SlotKind("attn_out", 7, None, "attn_out.L"),
        SlotKind("resid_mid", 8, None, "resid_mid.L"),
        SlotKind("neuron_pre", 9, "neuron", "neuron.L.I.pre"),
        SlotKind("neuron_post", 10, "neuron", "neuron.L.I", alias="neuron"),
        SlotKind("mlp_out", 11, None, "mlp_out.L"),
        SlotKind("resid_post", 12, None, "resid_post.L"),
        SlotKind("final_norm", None, None, "final_norm"),
        SlotKind("logits", None, None, "logits"),
        SlotKind("module", None, None, "module:<path>"),
    )
}

#: order of the layer-level tensors inside one layer, as the forward pass meets them
SLOT_ORDER = {k.name: k.order for k in SLOT_KINDS.values() if k.order is not None}
#: the ``site`` of a head address (``z``, the default, first)
HEAD_SITES = ("z", *(k.name for k in SLOT_KINDS.values() if k.unit == "head" and k.name != "z"))
HEAD_KINDS = tuple(k.name for k in SLOT_KINDS.values() if k.unit == "head")
NEURON_KINDS = tuple(k.name for k in SLOT_KINDS.values() if k.unit == "neuron")


def unit_position(kind: str, index: int, kv_group: int = 1) -> int:
    """Where unit ``index`` of a ``kind`` tensor lies on its unit axis. With grouped-query
    attention ``kv_group`` query heads share one key/value head: head ``h``'s ``k`` and
    ``v`` are at ``h // kv_group``."""
    return index // kv_group if kind in ("k", "v") else index


def slot_kind(kind: str) -> SlotKind:
    """The :class:`SlotKind` of ``kind`` (KeyError for an unknown kind)."""
    return SLOT_KINDS[kind]
