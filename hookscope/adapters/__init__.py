"""Architecture adapters: one declarative table per family, chosen automatically."""

from hookscope.adapters.base import Adapter, Tap
from hookscope.adapters.registry import ADAPTERS, detect, make_adapter
from hookscope.adapters.transformer import TransformerAdapter, TransformerSpec

__all__ = [
    "Adapter",
    "Tap",
    "ADAPTERS",
    "detect",
    "make_adapter",
    "TransformerAdapter",
    "TransformerSpec",
]
