"""An eager attention function for Hugging Face models that exposes the pattern.

Hugging Face attention modules call a function looked up by
``config._attn_implementation``. Only while a ``pattern`` site is hooked or cached,
hookscope switches that name to ``"hookscope_eager"``: the same arithmetic as the
models' own eager attention (scores = q k^T * scaling + mask, softmax in float32, cast back,
dropout, @ v), with the post-softmax pattern [batch, n_heads, dest, src] passed through the
handlers that call attached to that attention module. Outside such calls the model runs its
own attention implementation untouched.

State is per call and per thread: a call's handlers live on its attention modules (as
``(thread, handler)`` entries under :data:`ATTR`, removed by the call's
:class:`~hookscope.scope.Scope`), and the switch of ``config._attn_implementation`` is
counted per config, so nested calls may end in any order and the setting is restored when
the last one ends. A forward in a thread that holds no switch (another thread's plain
forward while this one caches patterns) is handed to the implementation the config had
before, mask and attention alike, and computes exactly what it would have.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from hookscope import hf_compat
from hookscope.scope import Scope

NAME = "hookscope_eager"
#: attribute of an attention module holding ``(thread id, handler)`` pairs for its pattern
ATTR = "_hookscope_pattern_handlers"


@dataclass
class _Switch:
    config: weakref.ref
    previous: str
    users: dict[object, int] = field(default_factory=dict)  # token -> thread id


#: id(config) -> its switch, while any call routes that config's attention here
_SWITCHES: dict[int, _Switch] = {}
_LOCK = threading.Lock()


def _switch(config: Any) -> _Switch | None:
    rec = _SWITCHES.get(id(config))
    return rec if rec is not None and rec.config() is config else None


def _routed(config: Any) -> bool:
    """Whether the current thread asked for hookscope's attention on ``config``."""
    rec = _switch(config)
    return rec is not None and threading.get_ident() in rec.users.values()


def _switch_on(config: Any, token: object, owner: int) -> None:
    with _LOCK:
        rec = _switch(config)
        if rec is None:
            rec = _Switch(weakref.ref(config), config._attn_implementation)
            _SWITCHES[id(config)] = rec
        rec.users[token] = owner
        hf_compat.set_attention(config, NAME)


def _switch_off(config: Any, token: object) -> None:
    with _LOCK:
        rec = _switch(config)
        if rec is None:
            return
        rec.users.pop(token, None)
        if not rec.users:
            hf_compat.set_attention(config, rec.previous)
            del _SWITCHES[id(config)]


def active_switches() -> int:
    """How many configs are switched to hookscope's attention now (for tests)."""
    return len(_SWITCHES)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, p, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, p, d).reshape(b, h * n_rep, p, d)


def hookscope_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Eager attention; q/k/v are [batch, heads, pos, d_head]. Returns ([b, pos, h, d], pattern)."""
    config = getattr(module, "config", None)
    if config is not None and not _routed(config):  # another thread's forward
        rec = _switch(config)
        fn = hf_compat.attention_function(rec.previous) if rec is not None else None
        if fn is not None:
            return fn(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
        handlers: list = []
    else:
        me = threading.get_ident()
        handlers = [h for owner, h in module.__dict__.get(ATTR, ()) if owner == me]
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    elif getattr(module, "is_causal", False) and query.shape[2] > 1:
        q, k = query.shape[2], key.shape[2]
        allowed = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    for handler in handlers:
        pattern = handler(pattern)
    probs = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, pattern


def _mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """The mask for :data:`NAME`: eager's for a routed thread, else the previous one's."""
    if config is not None and not _routed(config):
        rec = _switch(config)
        fn = hf_compat.mask_function(rec.previous) if rec is not None else None
        if fn is not None:
            return fn(*args, config=config, **kwargs)
    return hf_compat.default_eager_mask()(*args, config=config, **kwargs)  # type: ignore[misc]


def route_patterns(scope: Scope, root: nn.Module, handlers: dict[nn.Module, Any]) -> None:
    """Route ``root``'s attention through :func:`hookscope_attention` for ``scope``'s thread,
    with ``handlers[module]`` applied to that attention module's pattern; undone when
    ``scope`` closes."""
    hf_compat.register_attention(NAME, hookscope_attention, _mask)
    config = root.config
    token = object()
    scope.defer(partial(_switch_off, config, token))
    _switch_on(config, token, scope.owner)
    for module, handler in handlers.items():
        scope.attach(module, ATTR, (scope.owner, handler))
