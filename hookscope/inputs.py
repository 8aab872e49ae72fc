"""Model inputs as tensors: texts, tokenizer dicts, lists of token ids and tensors, turned
into what a :class:`~hookscope.model.HookedModel` runs, the same way everywhere
(``model(...)``, ``run_with_cache``, ``generate``, the interventions).

Padding: texts of different token lengths are padded here, on the right, whatever the
tokenizer's own padding side, so position ``p`` is the ``p``-th token of every row; the pad
id is the tokenizer's pad token, else its eos token, else 0 (:func:`pad_token`), and the
attention mask marks the padding either way. :func:`tokens_of` gives the ids with each row's
length (``None`` when no row is padded); :func:`paired_lengths` and :func:`causal_only`
check what right-padded rows ask of a sweep (see :mod:`hookscope.interventions._inputs`).
Every wrong input raises an InputError naming what was wrong, before any forward.

>>> enc = tokenize(model.tokenizer, ["When Mary", "When Mary and John"])
>>> enc["input_ids"].shape, enc["attention_mask"].sum(1)       # [2, 4], tensor([2, 4])
>>> ids, lengths = tokens_of(model, ["When Mary", "When Mary and John"])
>>> args, kwargs = call_arguments(model, "When Mary", {})     # what model.model(...) gets
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hookscope.errors import InputError
from hookscope.model_inputs import aligned, check_keywords, checked_input, short

if TYPE_CHECKING:
    from hookscope.model import HookedModel

__all__ = [
    "as_ids",
    "as_tokens",
    "call_arguments",
    "causal_only",
    "is_int_nest",
    "is_texts",
    "need_tokenizer",
    "pad_token",
    "paired_lengths",
    "tokenize",
    "tokens_of",
]


def is_texts(x: Any) -> bool:
    """A string, or a sized sequence of strings (list, tuple, a datasets column, ...)."""
    if isinstance(x, str):
        return True
    if isinstance(x, (Tensor, Mapping)) or not hasattr(x, "__len__") or not hasattr(x, "__iter__"):
        return False
    return len(x) > 0 and all(isinstance(t, str) for t in x)


def is_int_nest(x: Any) -> bool:
    """A non-empty list of ints, or of equal-length lists of ints (token ids)."""
    if not x:
        return False
    if all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        return True
    return (
        all(isinstance(r, (list, tuple)) and r and is_int_nest(r) for r in x)
        and len({len(r) for r in x}) == 1
    )


def need_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer``, or InputError if the model has none."""
    if tokenizer is None:
        raise InputError("this model has no tokenizer; pass token ids (a LongTensor [batch, pos])")
    return tokenizer


def pad_token(tokenizer: Any) -> int:
    """The id padding is filled with: the tokenizer's pad token, else its eos token, else 0."""
    return next((p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id) if p is not None), 0)


def tokenize(tokenizer: Any, text: str | Sequence[str]) -> dict[str, Tensor]:
    """``{"input_ids": [batch, pos], "attention_mask": [batch, pos]}`` (on the CPU) for a
    text or a list of texts, right-padded with :func:`pad_token`. InputError for anything
    but a string or a non-empty list of strings, a missing tokenizer, or a text that gives
    no tokens."""
    if not is_texts(text):
        what = type(text).__name__ if not isinstance(text, (list, tuple)) else "a list"
        raise InputError(
            f"text input must be a string or a non-empty list of strings, got {what} "
            f"{short(text)}; token ids go to the model directly (a LongTensor [batch, pos])"
        )
    tok = need_tokenizer(tokenizer)
    text = [text] if isinstance(text, str) else list(text)
    rows = tok(list(text))["input_ids"]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise InputError(
            f"text {text[empty[0]]!r} (row {empty[0]}) gives no tokens; every row needs at "
            "least one token"
        )
    width = max(len(r) for r in rows)
    pad = pad_token(tok)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def as_ids(inputs: Any) -> Tensor:
    """A tensor input as it is; a list of equal-length lists of token ids as a LongTensor."""
    if isinstance(inputs, Tensor):
        return inputs
    if isinstance(inputs, (list, tuple)) and is_int_nest(inputs):
        return torch.tensor(inputs, dtype=torch.long)
    raise InputError(
        "inputs must be a tensor (token ids [batch, pos], or images for a vision model), a "
        "string, a list of strings, a list of equal-length lists of token ids, or a tokenizer's "
        f"dict; got {type(inputs).__name__}"
    )


def call_arguments(model: HookedModel, inputs: Any, kwargs: dict) -> tuple[tuple, dict]:
    """The module's ``(args, kwargs)`` for ``inputs`` (a text or texts, a tokenizer dict,
    token ids as a tensor or lists, images) and extra ``kwargs``; every check runs here,
    before the module is called. Floating inputs (images) are cast to the model's parameter
    dtype (float64 images into a float32 CNN just work); token ids are never changed. A
    keyword the module's forward does not take raises InputError (a Hugging Face model
    would ignore it); an attention mask must have the input ids' shape."""
    is_hf = hasattr(model.model, "config") and hasattr(model.model.config, "model_type")
    kwargs = dict(kwargs)
    if is_texts(inputs):
        enc = tokenize(model.tokenizer, inputs)
        kwargs = {**{k: v.to(model.device) for k, v in enc.items()}, **kwargs}
        inputs = kwargs.pop("input_ids")
    elif isinstance(inputs, Mapping):
        kwargs = {**{k: v for k, v in inputs.items() if k != "input_ids"}, **kwargs}
        if "input_ids" not in inputs:
            raise InputError(
                f"a dict input needs 'input_ids' (and may hold attention_mask); got keys "
                f"{sorted(inputs)}"
            )
        inputs = inputs["input_ids"]
    if isinstance(inputs, (list, tuple)) and is_int_nest(inputs):
        inputs = torch.tensor(inputs, dtype=torch.long)
    if not isinstance(inputs, Tensor):
        raise InputError(
            "model input must be a tensor, a string or a list of strings, got "
            f"{type(inputs).__name__} {short(inputs)} (token ids may also be a list of "
            "equal-length lists of ints)"
        )
    inputs = checked_input(model, inputs)
    check_keywords(model.model, kwargs, is_hf)
    for key in ("attention_mask", "token_type_ids"):
        if key in kwargs:
            kwargs[key] = aligned(key, kwargs[key], inputs).to(model.device)
    dtype = model.dtype
    cast = dtype if inputs.is_floating_point() and dtype.is_floating_point else None
    inputs = inputs.to(device=model.device, dtype=cast)
    if is_hf:
        kwargs.setdefault("use_cache", False)
    return (inputs,), kwargs


def tokens_of(model: HookedModel, inputs: Any) -> tuple[Tensor, Tensor | None]:
    """``(inputs as a tensor, each row's length)``; lengths only where rows are padded
    (texts of different token lengths, a tokenizer dict with padding), else None. The
    tensor passed the model's input checks (no forward runs). Padding must be on the right
    (InputError otherwise)."""
    if is_texts(inputs):
        enc = tokenize(model.tokenizer, inputs)
        ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"]
    elif isinstance(inputs, Mapping):  # a tokenizer's output
        if "input_ids" not in inputs:
            raise InputError(f"a dict input needs 'input_ids'; got keys {sorted(inputs)}")
        ids, mask = as_ids(inputs["input_ids"]), inputs.get("attention_mask")
        ids = checked_input(model, ids).to(model.device)  # a row [pos] becomes [1, pos]
        if mask is not None:
            mask = torch.as_tensor(mask)
            mask = mask[None] if mask.ndim == 1 and ids.shape[0] == 1 else mask
            if mask.shape != ids.shape:
                raise InputError(
                    f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape "
                    f"{tuple(ids.shape)}; they must be equal (one entry per token)"
                )
    else:
        ids = checked_input(model, as_ids(inputs))
        return ids, None
    if mask is None:
        return ids, None
    mask = torch.as_tensor(mask).bool().cpu()
    if bool(mask.all()):
        return ids, None
    lengths = mask.sum(-1)
    if not torch.equal(mask, torch.arange(mask.shape[-1]) < lengths[:, None]):
        raise InputError(
            "the attention_mask pads rows on the left or has gaps; interventions read "
            "right-padded rows (padding after each row's last token), as to_tokens builds them"
        )
    return ids, lengths.to(ids.device)


def as_tokens(model: HookedModel, inputs: Any, what: str, advice: str) -> Tensor:
    """Inputs as a tensor, refusing padded rows (``what`` names who needs them unpadded,
    ``advice`` what to do instead)."""
    ids, lengths = tokens_of(model, inputs)
    if lengths is not None:
        raise InputError(
            f"{what} needs prompts of equal token length; these rows are {lengths.tolist()} "
            f"tokens long ({advice})"
        )
    return ids


def paired_lengths(
    model: HookedModel,
    ids: Tensor,
    lengths: Tensor | None,
    other: Tensor | None,
    what: str,
    other_ids: Tensor | None = None,
    this: str = "the inputs",
) -> Tensor | None:
    """The row lengths shared by two aligned inputs (``lengths``, ``other``; None for an
    unpadded one, whose rows are as long as its ``ids`` / ``other_ids``), or None when
    neither is padded. ``this`` and ``what`` name the two inputs in messages."""
    if lengths is None and other is None and (other_ids is None or other_ids.shape == ids.shape):
        return None
    other_ids = ids if other_ids is None else other_ids
    a = torch.full((ids.shape[0],), ids.shape[1], device=ids.device) if lengths is None else lengths
    b = (
        torch.full((ids.shape[0],), other_ids.shape[1], device=a.device)
        if other is None
        else other.to(a.device)
    )
    if not torch.equal(a, b):
        rows = (a != b).nonzero().flatten().tolist()
        mixed = (lengths is None) != (other is None)
        raise InputError(
            f"rows {rows} differ in token length between {this} and {what} "
            f"({a[rows].tolist()} vs {b[rows].tolist()} tokens); aligned rows must have the "
            "same length (pair prompts of one template"
            + (
                "; a tensor of ids counts every column as a token: pass both as texts)"
                if mixed
                else ")"
            )
        )
    return causal_only(model, a)


def causal_only(model: HookedModel, lengths: Tensor | None) -> Tensor | None:
    """``lengths``, after checking that padding after each row cannot reach its tokens (a
    causal language model); InputError otherwise."""
    if lengths is not None and not model.adapter.causal:
        raise InputError(
            f"prompts of different token lengths ({lengths.tolist()}) are right-padded, and "
            f"{model.adapter.name} is not a causal language model: its positions see the "
            "padding. Use prompts of equal token length"
        )
    return lengths
