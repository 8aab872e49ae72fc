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
from torch import Tensor, nn

from hookscope._checks import describe_signature, takes_positional
from hookscope.adapters.base import submodule
from hookscope.adapters.transformer import TransformerAdapter
from hookscope.addresses import Slot
from hookscope.errors import InputError
from hookscope.interventions import metrics
from hookscope.interventions.metrics import Metric
from hookscope.model import HookedModel
from hookscope.model_inputs import checked_input, is_int_nest, is_texts


def tokens_of(model: HookedModel, inputs: Any) -> tuple[Tensor, Tensor | None]:
    """``(inputs as a tensor, each row's length)``; lengths only where rows are padded
    (texts of different token lengths, a tokenizer dict with padding), else None. The
    tensor passed the model's input checks (no forward runs)."""
    if is_texts(inputs):
        enc = model._tokenize(inputs)
        ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"]
    elif isinstance(inputs, Mapping):  # a tokenizer's output
        if "input_ids" not in inputs:
            raise InputError(f"a dict input needs 'input_ids'; got keys {sorted(inputs)}")
        ids, mask = _as_ids(inputs["input_ids"]), inputs.get("attention_mask")
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
        ids = checked_input(model, _as_ids(inputs))
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


def _as_ids(inputs: Any) -> Tensor:
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


#: what a sweep's ``metric`` may be (for messages)
METRIC_CHOICES = (
    "a Metric from hookscope.interventions (logit_diff, logit, prob or loss) or a callable "
    "output -> scalar tensor"
)

#: each metric factory of :mod:`.metrics` as a call (for messages)
_FACTORIES = {
    "logit_diff": "iv.logit_diff(correct, incorrect)",
    "logit": "iv.logit(token)",
    "prob": "iv.prob(token)",
    "loss": "iv.loss(tokens)",
}


def _check_metric(metric: Any) -> None:
    """InputError unless ``metric`` is a :class:`Metric` or a callable of one argument."""
    if isinstance(metric, Metric):
        return
    if isinstance(metric, str):
        example = _FACTORIES.get(metric, _FACTORIES["logit_diff"])
        raise InputError(
            f"metric {metric!r} is a name, not a metric; build one, e.g. {example} "
            f"(metric must be {METRIC_CHOICES})"
        )
    name = next((n for n in _FACTORIES if getattr(metrics, n) is metric), None)
    if name is not None:
        raise InputError(
            f"metric is the function iv.{name} itself; call it to build the metric: "
            f"{_FACTORIES[name]}"
        )
    if not callable(metric):
        raise InputError(f"metric must be {METRIC_CHOICES}; got {type(metric).__name__}")
    if not takes_positional(metric, 1):
        raise InputError(
            f"metric {describe_signature(metric)} cannot be called as metric(output); it must "
            f"be {METRIC_CHOICES}"
        )


def output_shape(model: HookedModel, inputs: Tensor) -> tuple[int, ...] | None:
    """The shape of the model's output for ``inputs``, where it is known without a forward:
    ``[batch, pos, vocab]`` for a language model, ``[batch, classes]`` for a classifier
    whose head reads one vector per input (a ViT's CLS token, flattened CNN features, an MLP
    on [batch, features]); None when hookscope cannot tell."""
    adapter = model.adapter
    if "logits" not in adapter.slot_kinds():
        return None
    head = submodule(model.model, adapter.tap(Slot("logits")).module)
    width = int(head.out_features) if isinstance(head, nn.Linear) else None
    if width is None or inputs.ndim == 0:
        return None
    if isinstance(adapter, TransformerAdapter):
        if adapter.spec.token_input:
            return (inputs.shape[0], inputs.shape[-1], width) if inputs.ndim == 2 else None
        return (inputs.shape[0], width)
    flattens = any(
        isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
        for m in model.model.modules()
    )
    return (inputs.shape[0], width) if flattens or inputs.ndim == 2 else None


def fit_metric(
    metric: Any,
    lengths: Tensor | None,
    model: HookedModel | None = None,
    inputs: Tensor | None = None,
) -> Any:
    """The metric a sweep over ``inputs`` of ``model`` uses, checked before any forward:
    a :class:`Metric` bound to the model (token strings resolved, :meth:`Metric.bind`) and
    checked against the output the model will give (:meth:`Metric.check`: positions and
    token ids in range); reading each padded row at its own tokens
    (:meth:`Metric.for_lengths`) when rows have ``lengths``; ``metric`` itself otherwise."""
    _check_metric(metric)
    if isinstance(metric, Metric) and model is not None:
        metric = metric.bind(model)
        shape = output_shape(model, inputs) if inputs is not None else None
        if shape is not None:
            metric.check(shape)
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
