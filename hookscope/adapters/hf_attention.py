"""An eager attention function for Hugging Face models that exposes the pattern.

Hugging Face attention modules call a function looked up by
``config._attn_implementation``. Only while a ``pattern`` site is hooked or cached,
hookscope switches that name to ``"hookscope_eager"``: the same arithmetic as the
models' own eager attention (scores = q k^T * scaling + mask, softmax in float32, cast back,
dropout, @ v), with the post-softmax pattern [batch, n_heads, dest, src] passed through the
handlers registered for that attention module. Outside such calls the model runs its own
attention implementation untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

NAME = "hookscope_eager"

#: id(attention module) -> handlers applied in order to its pattern
_HANDLERS: dict[int, list[Callable[[Tensor], Tensor]]] = {}
_REGISTERED = False


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
    for handler in _HANDLERS.get(id(module), ()):
        pattern = handler(pattern)
    probs = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, pattern


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(NAME, hookscope_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    _REGISTERED = True


@contextmanager
def pattern_handlers(
    root: nn.Module, handlers: dict[nn.Module, Callable[[Tensor], Tensor]]
) -> Iterator[None]:
    """Route ``root``'s attention through :func:`hookscope_attention` with these handlers.

    The config's attention implementation and the handler table are restored on exit,
    also when the forward raises.
    """
    _register()
    config = root.config
    previous = config._attn_implementation
    added: list[tuple[int, Callable[[Tensor], Tensor]]] = []
    try:
        for module, handler in handlers.items():
            _HANDLERS.setdefault(id(module), []).append(handler)
            added.append((id(module), handler))
        config._attn_implementation = NAME
        yield
    finally:
        config._attn_implementation = previous
        for key, handler in added:
            chain = _HANDLERS.get(key, [])
            if handler in chain:
                chain.remove(handler)
            if not chain:
                _HANDLERS.pop(key, None)
