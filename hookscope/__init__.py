"""hookscope: mechanistic interpretability for any PyTorch model.

Typed component addresses (:class:`Residual`, :class:`AttentionHead`, :class:`MLPNeuron`,
...) name the same internals on every architecture; :class:`HookedModel` caches and hooks
them. See README.md for a tour.
"""

from hookscope import analysis, data, zoo
from hookscope.addresses import (
    Address,
    AttentionHead,
    AttnOut,
    Embed,
    Logits,
    MLPNeuron,
    MLPOut,
    Module,
    Residual,
    Selection,
    parse,
)
from hookscope.cache import ActivationCache
from hookscope.errors import (
    AdapterError,
    AddressError,
    AddressParseError,
    AddressRangeError,
    CacheKeyError,
    HookError,
    HookscopeError,
    InputError,
    ModelLoadError,
    SiteUnavailableError,
)
from hookscope.model import HookedModel
from hookscope.models import ViT

__version__ = "0.1.0"

__all__ = [
    "analysis",
    "data",
    "zoo",
    "Address",
    "ActivationCache",
    "AdapterError",
    "AddressError",
    "AddressParseError",
    "AddressRangeError",
    "AttentionHead",
    "AttnOut",
    "CacheKeyError",
    "Embed",
    "HookError",
    "HookedModel",
    "HookscopeError",
    "InputError",
    "Logits",
    "MLPNeuron",
    "MLPOut",
    "ModelLoadError",
    "Module",
    "Residual",
    "Selection",
    "SiteUnavailableError",
    "ViT",
    "parse",
]
