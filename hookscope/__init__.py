"""hookscope: mechanistic interpretability for any PyTorch model.

Typed component addresses (:class:`Residual`, :class:`AttentionHead`, :class:`MLPNeuron`,
...) name the same internals on every architecture; :class:`HookedModel` caches and hooks
them. See README.md for a tour.

``import hookscope`` loads the addresses and the errors only (no torch, transformers,
matplotlib or datasets), so that the command line starts fast; every other public name
(``hs.HookedModel``, ``from hookscope import ActivationCache``, ``hs.data``, ...) imports
its module on first use (PEP 562).
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

__version__ = "0.1.0"

#: subpackages and modules that load on first use (``hs.data``, ``hs.model``, ...); the
#: public ones are in ``__all__``, the others stay reachable as before the imports were lazy
_LAZY = (
    "actions",
    "adapters",
    "analysis",
    "attribution",
    "cache",
    "data",
    "dispatch",
    "experiments",
    "hooks",
    "inputs",
    "interventions",
    "model",
    "models",
    "plot",
    "probes",
    "store",
    "tracking",
    "units",
    "zoo",
)

#: public names defined in modules that load on first use (torch, transformers, ...)
_LAZY_NAMES = {
    "HookedModel": "hookscope.model",
    "ActivationCache": "hookscope.cache",
    "ViT": "hookscope.models",
    "logit_lens": "hookscope.lens",
    "LogitLens": "hookscope.lens",
    "GenerationContext": "hookscope.generation",
    "ActivationStore": "hookscope.store",
    "StoredActivations": "hookscope.store",
    "Tracker": "hookscope.tracking.tracker",
}

if TYPE_CHECKING:
    from hookscope import (
        actions,
        analysis,
        attribution,
        data,
        dispatch,
        experiments,
        interventions,
        plot,
        probes,
        store,
        tracking,
        units,
        zoo,
    )
    from hookscope.cache import ActivationCache
    from hookscope.generation import GenerationContext
    from hookscope.lens import LogitLens, logit_lens
    from hookscope.model import HookedModel
    from hookscope.models import ViT
    from hookscope.store import ActivationStore, StoredActivations
    from hookscope.tracking.tracker import Tracker


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
    "actions",
    "analysis",
    "attribution",
    "data",
    "dispatch",
    "experiments",
    "interventions",
    "plot",
    "probes",
    "store",
    "tracking",
    "units",
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
    "Tracker",
    "ViT",
    "parse",
]
