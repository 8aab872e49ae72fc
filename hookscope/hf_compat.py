"""The one place hookscope knows how transformers versions differ.

Each difference is decided by what a call does, never by reading a version string or a
signature alone (a renamed keyword must not silently turn a feature off):

* **The key/value cache keyword.** transformers 5.2x renamed the forward's
  ``past_key_values`` to ``cache``. A caller passes a fresh cache under each name of
  :func:`kv_cache_candidates` in turn and keeps (:func:`kv_cache_found`) the first that the
  forward filled (:func:`kv_cache_filled`); on current versions the first one does, so no
  forward is spent on finding out.
* **The cache object.** :func:`new_cache` makes an empty ``DynamicCache``;
  :func:`cache_kv` reads layer ``i``'s keys and values from its ``layers`` (4.56 and later)
  or its ``key_cache`` / ``value_cache`` lists (earlier).
* **Parameter names.** GPT-NeoX's output embedding is ``embed_out`` up to transformers
  5.x's early releases and ``lm_head`` later; :func:`renamed_state` maps a saved state dict
  onto the names the model in hand uses.
* **Device maps.** :func:`auto_device_map` resolves ``device_map="auto"`` (and the other
  strategies) to the module -> device dict transformers would compute, before loading.
* **Progress bars.** :func:`progress_bars` turns transformers' own bars ("Loading weights")
  off for a block, as ``--no-progress`` asks.
* **Attention functions.** :func:`register_attention` adds an attention function and its
  mask function under a name that ``config._attn_implementation`` can select;
  :func:`attention_function` / :func:`mask_function` look up what a name stands for.

Tested range: see the README (``make test-oldest`` and ``make test-latest``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from hookscope.errors import SiteUnavailableError

__all__ = [
    "KV_KEYWORDS",
    "kv_cache_candidates",
    "kv_cache_filled",
    "kv_cache_found",
    "new_cache",
    "cache_kv",
    "register_attention",
    "attention_function",
    "mask_function",
    "set_attention",
    "renamed_state",
    "auto_device_map",
    "progress_bars",
]

#: parameter names that differ between transformers versions (each pair: either name)
_RENAMED = (("embed_out.", "lm_head."),)

#: forward keywords that take a key/value cache object, newest first
KV_KEYWORDS = ("cache", "past_key_values")
_KV_KEYWORD: dict[type | None, str | None] = {}


def new_cache() -> Any:
    """An empty ``transformers.DynamicCache``."""
    from transformers import DynamicCache

    return DynamicCache()


def cache_kv(cache: Any) -> list[tuple[Tensor, Tensor]] | None:
    """Every layer's (keys, values) ``[batch, kv_heads, pos, d_head]`` held by ``cache``, or
    None for a cache of another kind."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        if all(isinstance(getattr(layer, "keys", None), Tensor) for layer in layers):
            return [(layer.keys, layer.values) for layer in layers]
        return None
    keys, values = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)
    if isinstance(keys, list) and isinstance(values, list):
        return list(zip(keys, values, strict=True))
    return None


def _names(forward: Callable, keyword: str) -> bool:
    """Whether ``forward`` has a parameter called ``keyword``."""
    import inspect

    try:
        return keyword in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no readable signature
        return False


def kv_cache_candidates(model: nn.Module) -> tuple[str, ...]:
    """The keywords to try for passing ``model`` a key/value cache object: the one found
    before for its class (none if none worked), else each candidate its forward names
    (newest first). Report what a forward showed with :func:`kv_cache_found`: the name only
    nominates a keyword, the filled cache decides."""
    key = _memo_key(model)
    if key in _KV_KEYWORD:
        found = _KV_KEYWORD[key]
        return () if found is None else (found,)
    return tuple(k for k in KV_KEYWORDS if _names(model.forward, k))


def _memo_key(model: nn.Module) -> type | None:
    """Findings are kept per model class; a model with its own instance ``forward`` is
    looked at afresh each time."""
    return None if "forward" in model.__dict__ else type(model)


def kv_cache_filled(cache: Any, n_layers: int, n_pos: int) -> bool:
    """Whether a forward over ``n_pos`` positions filled ``cache`` on every layer."""
    kv = cache_kv(cache)
    return (
        kv is not None
        and len(kv) == n_layers
        and all(k.shape[-2] == n_pos and v.shape[-2] == n_pos for k, v in kv)
    )


def kv_cache_found(model: nn.Module, keyword: str | None) -> None:
    """Remember for ``model``'s class the keyword that filled a cache (None: none did)."""
    key = _memo_key(model)
    if key is not None:
        _KV_KEYWORD[key] = keyword


def _registries() -> tuple[Any, Any]:
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        raise SiteUnavailableError(
            "attention patterns need transformers' attention-function registry "
            "(transformers >= 4.48); upgrade transformers"
        ) from None
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # before 4.53 the models build their masks themselves
        ALL_MASK_ATTENTION_FUNCTIONS = None
    return ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS


_REGISTERED: set[str] = set()


def register_attention(name: str, fn: Callable, mask: Callable[..., Any] | None) -> None:
    """Make ``config._attn_implementation = name`` select ``fn`` (and ``mask`` to build the
    attention mask, where transformers builds masks through a registry). Idempotent."""
    if name in _REGISTERED:
        return
    attention, masks = _registries()
    attention.register(name, fn)
    if masks is not None and mask is not None:
        masks.register(name, mask)
    _REGISTERED.add(name)


def attention_function(name: str) -> Callable | None:
    """The registered attention function ``name`` selects, or None for ``eager`` (each model
    class's own function) and unknown names."""
    attention, _ = _registries()
    if name == "eager" or name not in attention:
        return None
    return attention[name]


def mask_function(name: str) -> Callable | None:
    """The mask function ``name`` selects where transformers has a mask registry."""
    _, masks = _registries()
    if masks is None or name not in masks:
        return None
    return masks[name]


def default_eager_mask() -> Callable | None:
    _, masks = _registries()
    if masks is None:
        return None
    from transformers.masking_utils import eager_mask

    return eager_mask


def set_attention(config: Any, name: str) -> None:
    """Select attention implementation ``name`` on ``config`` for later forwards."""
    config._attn_implementation = name


def renamed_state(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with parameter names that another transformers version gave (GPT-NeoX's
    ``embed_out`` / ``lm_head``) renamed to those ``model`` has; other names unchanged."""
    own = set(model.state_dict())
    out = {}
    for key, value in state.items():
        if key not in own:
            for a, b in _RENAMED:
                for old, new in ((a, b), (b, a)):
                    if key.startswith(old) and new + key[len(old) :] in own:
                        key = new + key[len(old) :]
        out[key] = value
    return out


def auto_device_map(model: nn.Module, strategy: str, max_memory: dict | None) -> dict[str, Any]:
    """The device map ``from_pretrained(device_map=strategy, max_memory=max_memory)`` computes
    for ``model`` (a skeleton on the ``meta`` device): transformers' own computation where
    this version has it (``transformers.integrations.accelerate._get_device_map``, which
    knows each model's tied and unsplittable modules), else accelerate's public functions
    it is built on. ``strategy``: auto, balanced, balanced_low_0 or sequential."""
    try:
        from transformers.integrations.accelerate import _get_device_map
    except ImportError:  # other versions: the same computation from accelerate's parts
        from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

        no_split = list(getattr(model, "_no_split_modules", None) or [])
        memory = (
            get_max_memory(max_memory)
            if strategy == "sequential"
            else get_balanced_memory(
                model,
                max_memory=max_memory,
                no_split_module_classes=no_split,
                low_zero=strategy == "balanced_low_0",
            )
        )
        return dict(
            infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
        )
    return dict(_get_device_map(model, strategy, max_memory, None))


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights") inside the block unless
    ``enabled``; the previous setting is restored."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
