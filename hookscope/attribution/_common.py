"""Arguments shared by :mod:`hookscope.attribution` and :mod:`hookscope.units`, each checked
before any forward: the model, the inputs, the targets and the sites.

Targets (what an attribution explains), one per example:

* a class index (``int``), or one per example (a sequence / LongTensor ``[batch]``): the
  logit of that class; for a language model (logits ``[batch, pos, vocab]``) the logit of
  that token at each row's last real position;
* ``"all"`` (Grad-CAM): every class at once, ``[batch, n_classes, ...]``;
* a callable ``output -> Tensor[batch]`` (a per-example scalar, e.g.
  ``lambda logits: logits[:, 3] - logits[:, 5]``); it must be differentiable;
* ``None``: each example's predicted class (the argmax of its logits; for a language model
  at its last real position), from one forward without gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hookscope.addresses import Address, Module, Selection
from hookscope.errors import InputError, format_choices, suggestion
from hookscope.model import HookedModel

__all__ = [
    "as_model",
    "check_arguments",
    "comparison_call",
    "Target",
    "parse_target",
    "predicted_classes",
    "resolve_target",
    "layer_site",
    "Inputs",
    "prepare_inputs",
]


def check_arguments(
    fn: Callable[..., Any], what: str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> None:
    """``fn(model, inputs, *args, **kwargs)`` must be a valid call: InputError naming an
    unknown keyword (and the valid ones) or a missing argument, before anything runs."""
    import inspect

    signature = inspect.signature(fn)
    params = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ][2:]
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise InputError(
            f"{what} takes no keyword {unknown[0]!r}; its keywords are {format_choices(params)}"
        )
    try:
        signature.bind(None, None, *args, **kwargs)
    except TypeError as err:
        raise InputError(f"{what}: {err}") from None


def comparison_call(
    before: Any,
    after: Any,
    method: Any,
    choices: Sequence[str],
    names: Any,
    run_of: Callable[[str], Callable[..., Any]],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> tuple[HookedModel, HookedModel, Callable[..., Any]]:
    """The checks of a two-checkpoint comparison, before anything runs: ``method`` one of
    ``choices``, ``names`` two different strings, both models, and the call's arguments.
    Returns ``(before, after, the method's function)``."""
    if method not in choices:
        raise InputError(
            f"unknown method {method!r}; choose one of {format_choices(choices)}."
            + (suggestion(method, choices) if isinstance(method, str) else "")
        )
    if (
        not isinstance(names, (tuple, list))
        or len(names) != 2
        or not all(isinstance(s, str) for s in names)
        or names[0] == names[1]
    ):
        raise InputError(f"names must be two different strings, got {names!r}")
    before, after = as_model(before, "before"), as_model(after, "after")
    run = run_of(method)
    check_arguments(run, method, args, kwargs)
    return before, after, run


def as_model(model: Any, name: str = "model") -> HookedModel:
    """``model`` as a HookedModel: a HookedModel as is, a torch module wrapped."""
    if isinstance(model, HookedModel):
        return model
    if isinstance(model, nn.Module):
        return HookedModel.wrap(model)
    raise InputError(
        f"{name} must be a hookscope HookedModel (hs.zoo.load(name), hs.HookedModel.wrap(module)) "
        f"or a torch.nn.Module, got {type(model).__name__}"
    )


@dataclass(frozen=True)
class Target:
    """A parsed target: ``kind`` is "index" (``indices`` [batch]), "all" or "fn"."""

    kind: str
    indices: Tensor | None = None
    fn: Callable[[Tensor], Tensor] | None = None
    predicted: bool = False

    def describe(self) -> str:
        if self.predicted:
            return "predicted class"
        if self.kind == "index":
            idx = self.indices.tolist()
            return f"class {idx[0]}" if len(set(idx)) == 1 else "class per example"
        return "all classes" if self.kind == "all" else getattr(self.fn, "__name__", "metric")

    def check_range(self, n_classes: int) -> None:
        """Every class index must be below ``n_classes`` (the output's last dimension)."""
        if self.kind != "index":
            return
        bad = self.indices[(self.indices < 0) | (self.indices >= n_classes)]
        if bad.numel():
            raise InputError(
                f"target {int(bad[0])} is out of range: the model has {n_classes} outputs "
                f"(valid class indices 0..{n_classes - 1})"
            )

    def select(
        self, output: Tensor, examples: Tensor | None = None, last: Tensor | None = None
    ) -> Tensor:
        """The per-row scalar ``[rows]`` of ``output``. ``examples``: the example each row
        belongs to (rows may repeat examples, e.g. the steps of integrated gradients; None:
        row i is example i); ``last``: each example's last real position (3-D outputs)."""
        rows = output.shape[0]
        if self.kind == "fn":
            value = self.fn(output)
            if not isinstance(value, Tensor) or tuple(value.shape) not in ((rows,), ()):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise InputError(
                    f"a target callable must return one value per row of the output, a tensor "
                    f"[{rows}]; got {got}"
                )
            if value.ndim == 0:
                if rows != 1:
                    raise InputError(
                        f"a target callable returned a scalar for {rows} rows; return one value "
                        f"per row, a tensor [{rows}]"
                    )
                value = value.reshape(1)
            if not value.requires_grad and torch.is_grad_enabled():
                raise InputError(
                    "the target callable's value does not depend differentiably on the model "
                    "output (computed under no_grad, detached, or through .item()/argmax?)"
                )
            return value
        if self.kind != "index":
            raise InputError('target="all" is for grad_cam only; pass class indices or a callable')
        if examples is None:
            examples = torch.arange(rows)
        examples = examples.to(output.device)
        if output.ndim == 3:
            pos = (
                torch.full_like(examples, output.shape[1] - 1)
                if last is None
                else last.to(output.device)[examples]
            )
            output = output[torch.arange(rows, device=output.device), pos]
        elif output.ndim != 2:
            raise InputError(
                f"class-index targets need logits [batch, classes] or [batch, pos, vocab]; the "
                f"model returned {tuple(output.shape)}. Pass a callable target: output -> "
                "Tensor[batch]"
            )
        idx = self.indices.to(output.device)[examples]
        return output.gather(1, idx.view(-1, 1)).squeeze(1)


def predicted_classes(model: HookedModel, inputs: Inputs, batch_size: int | None = None) -> Tensor:
    """The model's predicted class per example (argmax of the logits; a language model's at
    each row's last real position), without gradients; LongTensor [batch] on the CPU."""
    size = batch_size or inputs.batch
    found = []
    with torch.no_grad():
        for start in range(0, inputs.batch, size):
            chunk = inputs.rows(start, start + size)
            out = model(chunk.tensor, **chunk.kwargs())
            if not isinstance(out, Tensor) or out.ndim not in (2, 3):
                raise InputError(
                    "target=None means the predicted class, which needs logits [batch, classes] "
                    f"or [batch, pos, vocab]; the model returned "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}. "
                    "Pass a target"
                )
            if out.ndim == 3:
                last = (
                    torch.full((chunk.batch,), out.shape[1] - 1)
                    if chunk.last is None
                    else chunk.last
                )
                out = out[torch.arange(chunk.batch), last.to(out.device)]
            found.append(out.argmax(-1).cpu())
    return torch.cat(found)


def resolve_target(
    model: HookedModel,
    inputs: Inputs,
    target: Any,
    *,
    allow_all: bool = False,
    batch_size: int | None = None,
) -> Target:
    """``target`` parsed (:func:`parse_target`); None means each example's predicted class
    (:func:`predicted_classes`, one forward without gradients)."""
    if target is None:
        return Target("index", predicted_classes(model, inputs, batch_size), predicted=True)
    return parse_target(target, inputs.batch, allow_all=allow_all)


def parse_target(target: Any, batch: int, *, allow_all: bool = False) -> Target:
    """``target`` checked against the batch size (see the module docstring for the forms)."""
    if isinstance(target, str):
        if allow_all and target == "all":
            return Target("all")
        forms = "'all', " if allow_all else ""
        raise InputError(
            f"target {target!r} is not a valid target; pass {forms}a class index, one index per "
            "example (a sequence or LongTensor [batch]) or a callable output -> Tensor[batch]"
        )
    if callable(target) and not isinstance(target, Tensor):
        return Target("fn", fn=target)
    if isinstance(target, np.integer):
        target = int(target)
    elif isinstance(target, np.ndarray):
        target = torch.from_numpy(target)
    if isinstance(target, bool) or target is None:
        raise InputError(
            f"target must be a class index, one index per example or a callable; got {target!r}"
        )
    if isinstance(target, int):
        return Target("index", torch.full((batch,), int(target), dtype=torch.long))
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise InputError(f"target indices must be integers, got a {target.dtype} tensor")
        indices = target.reshape(-1).long().cpu() if target.ndim <= 1 else None
    elif isinstance(target, Sequence) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in target
    ):
        indices = torch.tensor(list(target), dtype=torch.long)
    else:
        raise InputError(
            f"target must be a class index, one index per example (a sequence or LongTensor "
            f"[batch]) or a callable output -> Tensor[batch]; got {type(target).__name__}"
        )
    if indices is None or indices.numel() not in (1, batch):
        shape = tuple(target.shape) if isinstance(target, Tensor) else (len(target),)
        raise InputError(
            f"target has shape {shape} but the batch has {batch} examples; pass one class "
            "index, or one per example"
        )
    if indices.numel() == 1:
        indices = indices.expand(batch).clone()
    return Target("index", indices)


def layer_site(model: HookedModel, site: Any, what: str, kinds: Sequence[str] = ()) -> Address:
    """One layer-level address (``neuron.1``, ``resid_post.0``) or ``module:<path>`` that
    exists on ``model``; ``kinds`` limits the grammar's first word. InputError names the
    choices."""
    choices = [str(a) for a in model.addresses() if not kinds or str(a).split(".")[0] in kinds]
    listed = (
        format_choices(choices)
        if choices
        else "a module:<path> address (this model has no layer addresses)"
    )
    if not isinstance(site, (str, Address, Selection)):
        raise InputError(f"{what} site must be one address; choose from {listed}")
    found = model.resolve(site)
    module = len(found) == 1 and isinstance(found[0], Module) and not kinds
    if len(found) != 1 or not (module or str(found[0]) in choices):
        raise InputError(
            f"{what} needs one layer-level site; {site!r} selects "
            f"{[str(a) for a in found][:4]}. Choose from {listed}"
        )
    return found[0]


@dataclass
class Inputs:
    """The model's input as a tensor, with what the attribution methods need to know:
    ``tokens`` (integer ids) or images/features (float); for token inputs the attention
    ``mask``, each row's ``last`` real position (the last 1 of the mask: right or left
    padding) and ``extra`` keywords of a tokenizer's dict (``token_type_ids``, ...)."""

    tensor: Tensor
    is_tokens: bool
    last: Tensor | None = None
    mask: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.tensor.shape[0]

    def rows(self, start: int, stop: int) -> Inputs:
        """The examples ``start:stop`` (every field sliced alike)."""
        cut = slice(start, stop)
        return Inputs(
            self.tensor[cut],
            self.is_tokens,
            None if self.last is None else self.last[cut],
            None if self.mask is None else self.mask[cut],
            {k: v[cut] for k, v in self.extra.items()},
        )

    def kwargs(self, examples: Tensor | None = None) -> dict[str, Tensor]:
        """The keywords of the forward (the attention mask and the extra keywords), of the
        rows ``examples``."""
        found = dict(self.extra)
        if self.mask is not None:
            found["attention_mask"] = self.mask
        if examples is None:
            return found
        return {k: v[examples] for k, v in found.items()}


def _texts(inputs: Any) -> list[str] | None:
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        return list(inputs)
    return None


def prepare_inputs(model: HookedModel, inputs: Any) -> Inputs:
    """``inputs`` (a float tensor, token ids, texts, or a tokenizer's dict with input_ids,
    attention_mask and other keywords) as an :class:`Inputs`; InputError for anything else,
    before any forward."""
    mask = None
    extra: dict[str, Tensor] = {}
    texts = _texts(inputs)
    if texts is not None:
        ids = model.to_tokens(texts)
        lengths = torch.tensor([model.to_tokens(t).shape[1] for t in texts])
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long().to(ids.device)
        inputs = ids
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise InputError(
                f"a dict input needs 'input_ids' (and may hold attention_mask); got keys "
                f"{sorted(inputs)}"
            )
        mask = inputs.get("attention_mask")
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        inputs = inputs["input_ids"]
    if (
        isinstance(inputs, (list, tuple))
        and inputs
        and all(isinstance(r, (list, tuple)) and all(isinstance(t, int) for t in r) for r in inputs)
    ):
        inputs = torch.tensor(inputs, dtype=torch.long)
    if not isinstance(inputs, Tensor):
        raise InputError(
            "inputs must be a float tensor (images, features), token ids (a LongTensor "
            f"[batch, pos]), texts or a dict with input_ids; got {type(inputs).__name__}"
        )
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise InputError(f"inputs hold no examples: shape {tuple(inputs.shape)}")
    if inputs.is_floating_point():
        if not torch.isfinite(inputs).all():
            raise InputError("inputs hold NaN or Inf values")
        return Inputs(inputs.to(model.device, model.dtype), False)
    if inputs.is_complex() or inputs.dtype == torch.bool or inputs.ndim > 2:
        raise InputError(
            f"integer inputs are token ids [batch, pos]; got a {inputs.dtype} tensor of shape "
            f"{tuple(inputs.shape)}. Images and features must be a float tensor (e.g. "
            "images.float() / 255)"
        )
    if inputs.ndim == 1:
        inputs = inputs.unsqueeze(0)
        if mask is not None and torch.as_tensor(mask).ndim == 1:
            mask = torch.as_tensor(mask).unsqueeze(0)
        extra = {
            k: v.unsqueeze(0) if isinstance(v, Tensor) and v.ndim == 1 else v
            for k, v in extra.items()
        }
    for key, value in extra.items():
        if not isinstance(value, Tensor) or tuple(value.shape[:1]) != (inputs.shape[0],):
            raise InputError(
                f"the dict input's {key!r} must be a tensor with one row per example "
                f"({inputs.shape[0]}), got "
                f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
            )
    extra = {k: v.to(model.device) for k, v in extra.items()}
    last = None
    if mask is not None:
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(inputs.shape):
            raise InputError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape "
                f"{tuple(inputs.shape)}"
            )
        real = mask.bool()
        empty = (~real.any(1)).nonzero().flatten().tolist()
        if empty:
            raise InputError(
                f"row {empty[0]} of attention_mask has no real token (all 0); every row needs "
                "at least one"
            )
        # the last 1 of each row, wherever the padding is
        last = (mask.shape[1] - 1 - real.flip(1).long().argmax(1)).cpu()
        mask = mask.to(model.device)
    return Inputs(inputs.to(model.device), True, last, mask, extra)
