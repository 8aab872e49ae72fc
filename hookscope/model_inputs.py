"""Checks on what a user passes to a :class:`~hookscope.model.HookedModel`: model inputs
(texts, token ids, images), their masks and keywords, and hook specifications. Each wrong
input raises an InputError naming what was wrong and the valid choices, before any forward.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hookscope._checks import describe_signature, takes_positional
from hookscope.errors import InputError, format_choices, suggestion
from hookscope.hooks import HookFn

HookSpec = tuple[Any, HookFn]

if TYPE_CHECKING:
    from hookscope.model import HookedModel


def check_hooks(hooks: Any, *, context: bool = False) -> list[HookSpec]:
    """``hooks`` as a list of ``(address, fn)`` pairs (a dict ``{address: fn}`` and one pair
    are accepted too); each fn must take ``(activation, address)``, or with ``context=True``
    (``HookedModel.generate``) also ``(activation, address, context)``. Checked at
    registration, before any forward."""
    if isinstance(hooks, Mapping):
        hooks = list(hooks.items())
    elif isinstance(hooks, tuple) and len(hooks) == 2 and callable(hooks[1]):
        hooks = [hooks]
    if isinstance(hooks, (str, bytes)) or callable(hooks):
        raise InputError(
            f"hooks must be a list of (address, fn) pairs, got {type(hooks).__name__} "
            f"{short(hooks)}; e.g. hooks=[('resid_post.0', fn)]"
        )
    try:
        entries = list(hooks)
    except TypeError:
        raise InputError(
            f"hooks must be a list of (address, fn) pairs, got {type(hooks).__name__}"
        ) from None
    for entry in entries:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and callable(entry[1])):
            raise InputError(
                "each hook must be an (address, fn) pair: an address or selection first, then "
                f"a callable fn(activation, address); got {short(entry)}"
            )
        fn = entry[1]
        if takes_positional(fn, 2):
            continue
        takes_context = takes_positional(fn, 3)
        if not takes_context:  # fn(act, address, *, context)
            try:
                inspect.signature(fn).bind(None, None, context=None)
                takes_context = True
            except (TypeError, ValueError):
                pass
        if context and takes_context:
            continue
        if takes_context:
            raise InputError(
                f"the hook on {short(entry[0])} is {describe_signature(fn)}: a third "
                "parameter (context) is passed only by model.generate; here hooks are called "
                "as fn(activation, address)"
            )
        forms = "fn(activation, address)" + (" or fn(activation, address, context)" * context)
        raise InputError(
            f"the hook on {short(entry[0])} is {describe_signature(fn)}, but hooks are "
            f"called as {forms}: give it a second parameter (def fn(act, address): ...)"
        )
    return entries  # type: ignore[return-value]


def short(x: Any, limit: int = 60) -> str:
    """``repr(x)``, cut to ``limit`` characters for messages."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def token_ids(tokens: Any, what: str) -> Tensor:
    """Token ids [pos] or [batch, pos] (an integer tensor or list), or InputError."""
    choices = "token ids: an integer tensor or list of ints, [pos] or [batch, pos]"
    if isinstance(tokens, str):
        raise InputError(f"{what} takes {choices}; got a string (to_tokens makes ids from text)")
    try:
        t = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} takes {choices}; got {type(tokens).__name__}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{what} takes {choices}; got dtype {t.dtype}")
    if t.ndim > 2:
        raise InputError(f"{what} takes {choices}; got shape {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        raise InputError(f"{what} takes {choices}; got a negative id {int(t.min())}")
    return t


def checked_input(model: HookedModel, inputs: Tensor) -> Tensor:
    """``inputs`` after the adapter's checks (a token row [pos] becomes [1, pos]); InputError
    for an empty batch."""
    adapter = model.adapter
    if adapter.token_input and inputs.ndim == 1:
        inputs = inputs.unsqueeze(0)
    if inputs.ndim >= 1 and inputs.shape[0] == 0:
        raise InputError(
            f"the input batch is empty: shape {tuple(inputs.shape)} has 0 rows; pass at least one"
        )
    if inputs.ndim >= 2 and inputs.numel() == 0:
        raise InputError(
            f"the input is empty: shape {tuple(inputs.shape)} holds no values (0 positions?); "
            "every row needs at least one token / value"
        )
    adapter.check_input(inputs)
    return inputs


def aligned(key: str, value: Any, inputs: Tensor) -> Tensor:
    """``value`` (an attention mask, token type ids) shaped like ``inputs``, or InputError."""
    if isinstance(value, (list, tuple)):
        try:
            value = torch.tensor(value)
        except (TypeError, ValueError):
            raise InputError(f"{key} must be a tensor shaped like input_ids") from None
    if not isinstance(value, Tensor):
        raise InputError(
            f"{key} must be a tensor shaped like input_ids {tuple(inputs.shape)}, got "
            f"{type(value).__name__}"
        )
    if value.ndim == 1 and inputs.ndim == 2 and inputs.shape[0] == 1:
        value = value.unsqueeze(0)
    if tuple(value.shape) != tuple(inputs.shape):
        raise InputError(
            f"{key} has shape {tuple(value.shape)} but input_ids has shape "
            f"{tuple(inputs.shape)}; they must be equal (one entry per token)"
        )
    return value


#: keywords every Hugging Face model takes through ``**kwargs`` whatever its signature names
#: (output switches, and the key-value cache under its older names)
_HF_KEYWORDS = frozenset(
    {"output_attentions", "output_hidden_states", "return_dict", "past_key_values", "cache_params"}
)
#: what a tokenizer's dict holds besides input ids; dropped where the forward does not take it
_TOKENIZER_KEYS = frozenset(
    {
        "token_type_ids",
        "special_tokens_mask",
        "offset_mapping",
        "length",
        "overflow_to_sample_mapping",
    }
)


def _forward_keywords(module: nn.Module, is_hf: bool) -> tuple[frozenset[str] | None, str | None]:
    """(the keywords ``module.forward`` takes, or None for any; its input's name).

    Named parameters; a Hugging Face model's ``**kwargs`` adds :data:`_HF_KEYWORDS` and the
    keys of its ``Unpack[...]`` annotation. Another module's ``**kwargs`` takes anything.
    Read once per class (unless the instance has its own ``forward``).
    """
    if "forward" in vars(module):
        try:
            params = tuple(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            return None, None
        return _keywords(params, is_hf)
    return _class_keywords(type(module), is_hf)


@functools.lru_cache(maxsize=128)
def _class_keywords(cls: type, is_hf: bool) -> tuple[frozenset[str] | None, str | None]:
    try:
        params = tuple(inspect.signature(cls.forward).parameters.values())[1:]  # no self
    except (TypeError, ValueError):
        return None, None
    return _keywords(params, is_hf)


def _keywords(
    params: tuple[inspect.Parameter, ...], is_hf: bool
) -> tuple[frozenset[str] | None, str | None]:
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    first = next((p.name for p in params if p.kind in positional), None)
    named = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    } - {first}
    var_kw = next((p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_kw is None:
        return frozenset(named), first
    if not is_hf:
        return None, first
    for typed in typing.get_args(var_kw.annotation):  # Unpack[TypedDict]
        named |= set(getattr(typed, "__annotations__", {}))
    return frozenset(named | _HF_KEYWORDS), first


def check_keywords(module: nn.Module, kwargs: dict, is_hf: bool) -> None:
    """InputError for a keyword the forward does not take (unknown tokenizer keys dropped)."""
    if not kwargs:
        return
    accepted, first = _forward_keywords(module, is_hf)
    if first is not None and first in kwargs:
        raise InputError(
            f"{first} is given twice: as the input and as a keyword; pass it once, as the input"
        )
    if accepted is None:
        return
    for key in [k for k in kwargs if k not in accepted and k in _TOKENIZER_KEYS]:
        del kwargs[key]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not accepted:
        raise InputError(
            f"{type(module).__name__}.forward takes no keyword arguments; got {unknown[0]!r}. "
            "Pass the input alone"
        )
    if unknown:
        raise InputError(
            f"{type(module).__name__}.forward takes no keyword {unknown[0]!r}; its keywords: "
            f"{format_choices(sorted(accepted), 40)}." + suggestion(unknown[0], accepted)
        )
