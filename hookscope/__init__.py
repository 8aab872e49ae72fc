"""hookscope: mechanistic interpretability for any PyTorch model.

Typed component addresses (:class:`Residual`, :class:`AttentionHead`, :class:`MLPNeuron`,
...) name the same internals on every architecture; :class:`HookedModel` caches and hooks
them. See README.md for a tour.
"""

import importlib
from typing import TYPE_CHECKING, Any

from hookscope.addresses import (
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
    ProbeError,
    SiteUnavailableError,
    StoreError,
)
from hookscope.model import HookedModel
from hookscope.models import ViT

__version__ = "0.1.0"

# Subpackages with heavy dependencies (matplotlib, scipy, datasets) load on first use, so
# that ``import hookscope`` and the command line start fast; ``hs.data`` works as before.
_LAZY = ("analysis", "data", "dispatch", "plot", "probes", "store", "zoo")

if TYPE_CHECKING:
    from hookscope import analysis, data, dispatch, plot, probes, store, zoo
    from hookscope.generation import GenerationContext
    from hookscope.lens import LogitLens, logit_lens
    from hookscope.store import ActivationStore, StoredActivations


#: public names defined in modules that load on first use
_LAZY_NAMES = {
    "logit_lens": "hookscope.lens",
    "LogitLens": "hookscope.lens",
    "GenerationContext": "hookscope.generation",
    "ActivationStore": "hookscope.store",
    "StoredActivations": "hookscope.store",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY:
        module = importlib.import_module(f"hookscope.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'hookscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_NAMES))


__all__ = [
    "analysis",
    "data",
    "dispatch",
    "plot",
    "probes",
    "store",
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
    "FinalNorm",
    "logit_lens",
    "LogitLens",
    "GenerationContext",
    "ActivationStore",
    "StoredActivations",
    "StoreError",
    "ProbeError",
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
