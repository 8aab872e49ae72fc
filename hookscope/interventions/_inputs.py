"""Inputs of interventions: token ids from tensors, texts and tokenizer dicts, and what
prompts of different token lengths ask of the model and the metric.

Texts of different token lengths are right-padded (``HookedModel.to_tokens``), so position
``p`` is the ``p``-th token of every row. On a causal language model the padding after a
row's last token cannot change anything at or before it, so a sweep over such a batch is
exact as long as the metric reads each row at a real token: a structured metric's
negative position then counts from each row's own end (``-1``: its last token). Clean and
corrupted rows must have the same lengths (their positions pair up). A sweep's positions
are columns counted from the start (a column past a row's end patches padding, which
changes nothing there); negative sweep positions are refused, as they would count from
the padded width. Models that attend in both directions, plain-callable metrics, ``loss``
and resampling references would see the padding: such inputs are refused with a message,
never patched silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hookscope.adapters.transformer import TransformerAdapter
from hookscope.errors import InputError
from hookscope.interventions.metrics import Metric
from hookscope.model import HookedModel, _is_texts


def tokens_of(model: HookedModel, inputs: Any) -> tuple[Tensor, Tensor | None]:
    """``(inputs as a tensor, each row's length)``; lengths only where rows are padded
    (texts of different token lengths, a tokenizer dict with padding), else None."""
    if _is_texts(inputs):
        enc = model._tokenize(inputs)
        ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"]
    elif isinstance(inputs, Mapping):  # a tokenizer's output
        if "input_ids" not in inputs:
            raise InputError(f"a dict input needs 'input_ids'; got keys {sorted(inputs)}")
        ids, mask = torch.as_tensor(inputs["input_ids"]), inputs.get("attention_mask")
        ids = (ids[None] if ids.ndim == 1 else ids).to(model.device)
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.numel() != ids.numel():
                raise InputError(
                    f"attention_mask {tuple(mask.shape)} does not match input_ids "
                    f"{tuple(ids.shape)}"
                )
            mask = mask.reshape(ids.shape)
    elif isinstance(inputs, Tensor):
        token_row = inputs.ndim == 1 and not inputs.is_floating_point()
        return (inputs.unsqueeze(0) if token_row else inputs), None
    else:
        return model.to_tokens(inputs), None
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


def is_causal_lm(model: HookedModel) -> bool:
    """A language model whose position ``t`` sees tokens ``<= t`` only."""
    adapter = model.adapter
    return (
        isinstance(adapter, TransformerAdapter)
        and adapter.spec.token_input
        and bool(getattr(adapter.attention_module(0), "is_causal", False))
    )


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
    """``lengths``, after checking that padding after each row cannot reach its tokens."""
    if lengths is not None and not is_causal_lm(model):
        raise InputError(
            f"prompts of different token lengths ({lengths.tolist()}) are right-padded, and "
            f"{model.adapter.name} is not a causal language model: its positions see the "
            "padding. Use prompts of equal token length"
        )
    return lengths


def fit_metric(metric: Any, lengths: Tensor | None) -> Any:
    """``metric`` reading each padded row at its own tokens (:meth:`Metric.for_lengths`);
    ``metric`` itself when nothing is padded."""
    if lengths is None:
        return metric
    fitted = metric.for_lengths(lengths) if isinstance(metric, Metric) else None
    if fitted is None:
        name = getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__))
        raise InputError(
            f"prompts of different token lengths ({lengths.tolist()}) are right-padded, so the "
            "metric must read each row at its own tokens: logit_diff, logit and prob do (a "
            f"negative position counts from each row's end); {name} cannot. Use prompts of "
            "equal token length, or one of those metrics"
        )
    return fitted


def copies_per_forward(inputs_t: Tensor, chunk_size: int | None) -> int:
    """Copies of ``inputs_t`` stacked per forward: ``chunk_size``, by default about 4096
    tokens' worth (one copy per image for vision inputs)."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    tokens = inputs_t.ndim >= 2 and not inputs_t.is_floating_point()
    return chunk_size or max(1, 4096 // (inputs_t.shape[0] * (inputs_t.shape[1] if tokens else 1)))
