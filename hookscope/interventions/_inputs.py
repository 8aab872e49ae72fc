"""Inputs of interventions: the metric a sweep uses, and what prompts of different token
lengths ask of the model and the metric. Token ids come from tensors, texts and tokenizer
dicts through :mod:`hookscope.inputs` (``tokens_of``, ``paired_lengths``, ``causal_only``).

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

from typing import Any

from torch import Tensor, nn

from hookscope._checks import describe_signature, takes_positional
from hookscope.adapters.base import submodule
from hookscope.addresses import Slot
from hookscope.errors import InputError
from hookscope.interventions import metrics
from hookscope.interventions.metrics import Metric
from hookscope.interventions.result import metric_name
from hookscope.model import HookedModel

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
    if adapter.blocks() is not None:  # a transformer: a language model or a ViT (CLS)
        if adapter.token_input:
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
        name = metric_name(metric)
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
