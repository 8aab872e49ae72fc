"""Typed component addresses and their string grammar (one public module, two parts).

* :mod:`hookscope.addresses.core` - the address classes (``Residual``, ``AttentionHead``,
  ``MLPNeuron``, ...), ``Slot`` (the layer-level tensor a hook attaches to) and the
  forward order; the table of the grammar is in its docstring.
* :mod:`hookscope.addresses.grammar` - ``parse``, selections (``head.*.*``,
  ``resid_post.0-5``) and TransformerLens aliases; it imports ``core``, and nothing in
  ``core`` imports it, so the package has no import cycle.

>>> from hookscope.addresses import parse
>>> str(parse("blocks.3.attn.hook_z"))
'head.3'
"""

from hookscope.addresses.core import (
    HEAD_KINDS,
    HEAD_SITES,
    KINDS,
    NEURON_KINDS,
    NEURON_SITES,
    RESID_SITES,
    SLOT_KINDS,
    SLOT_ORDER,
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
    Slot,
    SlotKind,
    slot_address,
    slot_kind,
    unit_position,
)
from hookscope.addresses.grammar import Dimensions, Selection, iter_addresses, parse

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
    "Selection",
    "Dimensions",
    "parse",
    "iter_addresses",
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
