"""Generation with hooks: transformers' own ``generate``, with hookscope hooks on every forward.

>>> out = model.generate("When Mary and John", max_new_tokens=20,
...                      hooks=[("resid_post.3", lambda act, address: act + 4 * direction)])
>>> model.to_string(out)
>>> def late(act, address, context):          # a third parameter receives a GenerationContext
...     act[:, context.positions >= context.prompt_length] = 0
...     return act
>>> model.generate(prompt, max_new_tokens=5, hooks=[("head.1.2", late)], do_sample=True, top_k=20)

Conventions:

* **Decoding is transformers'.** Greedy search, sampling and every other keyword of
  ``transformers``' ``generate`` (``do_sample``, ``temperature``, ``top_k``,
  ``num_return_sequences``, logits processors, stopping criteria, streamers, ...) work as
  there, with the key/value cache on. Only causal language models (a Hugging Face model
  whose ``can_generate()`` is true, not an encoder-decoder) are accepted.
* **What a hook sees.** With the cache each forward computes only the new positions: the
  prompt forward (``step`` 0) sees the whole prompt, ``[batch, prompt_len, ...]``, and each
  later forward one position, ``[batch, 1, ...]``. Every address keeps its usual layout
  with that ``pos`` axis; a ``pattern`` is ``[batch, new positions (dest), all positions so
  far (src)]``, and ``q/k/v`` hold the new positions only (the cache holds the rest). The
  ``logits`` address sees every new position too (on a hook there hookscope passes
  ``logits_to_keep=0``, which transformers would otherwise set to 1 on the prompt forward).
* **Positions.** A hook ``fn(act, address)`` is called as in ``run_with_hooks``. A hook that
  also takes a parameter named ``context``, or requires a third positional parameter, gets
  a :class:`GenerationContext`: ``positions`` are the absolute columns of the act's ``pos``
  axis in the returned ids, so a hook zeroing ``act[:, positions == 5]`` changes exactly
  what a hook zeroing column 5 of a full-sequence ``run_with_hooks`` changes. The positions
  come from each forward's own inputs (the attention mask's length, else the cache's, minus
  the new tokens), not from a count of calls, so they stay right with ``use_cache=False``
  (each forward then sees everything) or a chunked prefill.
* **Padding.** Prompts of different lengths (a list of texts, or ids with an attention
  mask) are left-padded, as decoder-only generation requires: right-padded input (what
  ``HookedModel.to_tokens`` makes) is moved to the left, and a mask with a gap inside a row
  is refused. ``positions`` count columns of the padded batch, the same for every row;
  ``context.row_positions`` ``[batch, pos]`` counts from each row's first real token
  (negative on its padding), which is the position transformers gives the model there.
  ``output="inputs"`` returns ids, mask and position ids that ``run_with_cache`` takes to
  see exactly what generation saw.
* **Hooks are removed** when generation returns, raises or is interrupted (a
  KeyboardInterrupt in a hook, a logits processor or a streamer): they are installed
  through :class:`hookscope.hooks.installed`, and the step tracker that feeds the context
  through the same kind of :class:`hookscope.scope.Scope`.
* **Progress.** A tqdm bar counts new tokens on stderr; ``progress=None`` shows it from
  :data:`PROGRESS_FROM` new tokens on (short runs stay quiet).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from hookscope._checks import takes_positional
from hookscope.errors import InputError, format_choices, suggestion
from hookscope.hf_compat import KV_KEYWORDS
from hookscope.hooks import Run, installed, wire
from hookscope.inputs import call_arguments
from hookscope.model_inputs import check_hooks, short
from hookscope.scope import Scope

if TYPE_CHECKING:
    from hookscope.model import HookedModel

__all__ = ["GenerationContext", "generate", "OUTPUTS", "PROGRESS_FROM"]

#: what ``generate(output=...)`` returns: token ids, decoded texts, or run_with_cache inputs
OUTPUTS = ("ids", "text", "inputs")
#: ``progress=None`` shows a bar when at least this many new tokens are asked for
PROGRESS_FROM = 32
#: generate keywords hookscope sets itself, and what to use instead
_OWN_KEYWORDS = {
    "input_ids": "pass the prompt as the first argument",
    "inputs": "pass the prompt as the first argument",
    "attention_mask": "pass a dict {'input_ids': ..., 'attention_mask': ...} as the prompt",
    "max_length": "use max_new_tokens",
    "return_dict_in_generate": "generate returns token ids; read scores with a hook on 'logits'",
}
#: keys a dict prompt may hold (position ids are recomputed from the mask, as transformers does)
_PROMPT_KEYS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class GenerationContext:
    """Where one forward of a generation is: passed to hooks that take a ``context``.

    ``positions`` ``[pos]``: the absolute column, in the returned ids, of each entry of the
    act's ``pos`` axis (``arange(prompt_length)`` on the prompt forward, then ``[prompt_length
    + step - 1]``). ``step``: how many generated tokens this forward reads (0: the prompt).
    ``prompt_length``: the prompt's width, padding included. ``pad`` ``[batch]``: each row's
    left padding.
    """

    step: int
    positions: Int[Tensor, " pos"]
    prompt_length: int
    pad: Int[Tensor, " batch"]

    @property
    def is_prompt(self) -> bool:
        return self.step == 0

    @property
    def row_positions(self) -> Int[Tensor, "batch pos"]:
        """Each row's own position of each new entry: column minus the row's left padding."""
        return self.positions.unsqueeze(0) - self.pad.unsqueeze(1)


class _Tracker:
    """A forward pre-hook on the whole model: the context of the forward about to run."""

    def __init__(self, prompt_length: int, bar: Any):
        self.prompt_length = prompt_length
        self.bar = bar
        self.context: GenerationContext | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor):
            raise InputError(
                "generation with hooks needs the model to be called with input_ids; got "
                f"{short(sorted(kwargs))} (inputs_embeds are not supported)"
            )
        new = ids.shape[-1]
        mask = kwargs.get("attention_mask")
        full = isinstance(mask, Tensor) and mask.ndim == 2
        total = mask.shape[-1] if full else _past_length(kwargs) + new
        pad = (
            (mask.cumsum(-1) == 0).sum(-1)
            if full
            else torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        )
        self.context = GenerationContext(
            step=max(0, total - self.prompt_length),
            positions=torch.arange(total - new, total, device=ids.device),
            prompt_length=self.prompt_length,
            pad=pad,
        )
        if total >= self.prompt_length:
            self.bar.update(1)


def _past_length(kwargs: dict) -> int:
    """Positions already in the key/value cache a forward was given (0 without one, as
    transformers calls the model without a mask when nothing is padded and the cache is off)."""
    for key in KV_KEYWORDS:
        length = getattr(kwargs.get(key), "get_seq_length", None)
        if callable(length):
            return int(length())
    return 0


def _with_context(fn: Any, tracker: _Tracker, keyword: bool, act: Tensor, address: Any) -> Any:
    if keyword:
        return fn(act, address, context=tracker.context)
    return fn(act, address, tracker.context)


def _bind_context(hooks: Any, tracker: _Tracker) -> list[tuple[Any, Any]]:
    """``hooks`` checked, with each context-taking fn bound to ``tracker``'s context."""
    bound = []
    for spec, fn in check_hooks(hooks, context=True):
        if _names_context(fn):
            fn = partial(_with_context, fn, tracker, True)
        elif not takes_positional(fn, 2):
            fn = partial(_with_context, fn, tracker, False)
        bound.append((spec, fn))
    return bound


def _names_context(fn: Any) -> bool:
    """Whether ``fn(act, address, context=...)`` is a valid call."""
    try:
        sig = inspect.signature(fn)
        sig.bind(None, None, context=None)
    except (TypeError, ValueError):
        return False
    return "context" in sig.parameters


def _check_causal(model: HookedModel) -> None:
    hf = model.model
    name = type(hf).__name__
    head = "generate needs a causal language model (a Hugging Face *ForCausalLM); "
    if not hasattr(getattr(hf, "config", None), "model_type"):
        raise InputError(
            f"{head}{name} is not a transformers generative model (not a Hugging Face model). "
            "For one forward with hooks use run_with_hooks"
        )
    can = getattr(hf, "can_generate", None)
    if not callable(getattr(hf, "generate", None)) or not callable(can) or not can():
        raise InputError(
            f"{head}{name} cannot generate (transformers gives it no generate method, or "
            "can_generate() is False: an encoder or masked-LM head predicts tokens in place, "
            "not the next one). Use run_with_hooks or run_with_cache for it"
        )
    if getattr(hf.config, "is_encoder_decoder", False):
        raise InputError(
            f"generate supports decoder-only causal language models; {name} is an "
            "encoder-decoder model (its hooks would see the encoder and the decoder)"
        )


def _check_arguments(model: HookedModel, max_new_tokens: Any, output: Any, kwargs: dict) -> int:
    if max_new_tokens is None:
        raise InputError(
            "generate needs max_new_tokens: how many tokens to add (a positive int), e.g. "
            "model.generate(prompt, max_new_tokens=20)"
        )
    try:
        if isinstance(max_new_tokens, bool):
            raise TypeError
        max_new_tokens = operator.index(max_new_tokens)  # an int, numpy or 0-d tensor integer
    except TypeError:
        raise InputError(
            f"max_new_tokens must be a positive int, got {type(max_new_tokens).__name__} "
            f"{short(max_new_tokens)}"
        ) from None
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens}")
    if output not in OUTPUTS:
        raise InputError(
            f"unknown output {short(output)}; choose one of {format_choices(OUTPUTS)}."
            + (suggestion(output, OUTPUTS) if isinstance(output, str) else "")
        )
    if output == "text" and model.tokenizer is None:
        raise InputError(
            "output='text' needs a tokenizer and this model has none; use output='ids' (the "
            "default) and decode the ids yourself"
        )
    for key, instead in _OWN_KEYWORDS.items():
        if key in kwargs:
            raise InputError(f"generate sets {key} itself; {instead}")
    known = _generate_keywords(model.model)
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        raise InputError(
            f"generate got unknown keyword {unknown[0]!r}: it is neither an option of "
            "transformers' generate / GenerationConfig nor an input of the model's forward."
            + suggestion(unknown[0], known)
        )
    return max_new_tokens


def _generate_keywords(hf: nn.Module) -> set[str]:
    """Keywords transformers' generate accepts for ``hf``: its own parameters, every
    GenerationConfig field, and the model's forward inputs (passed through as model kwargs)."""
    from transformers import GenerationConfig

    names = set(inspect.signature(hf.generate).parameters)
    names |= set(GenerationConfig().to_dict())
    names |= set(getattr(hf.generation_config, "to_dict", dict)())
    names |= set(inspect.signature(hf.forward).parameters)
    return {n for n in names if n not in ("self", "kwargs", "args")}


def _pad_id(model: HookedModel, given: Any) -> int:
    """The token that fills padding: ``pad_token_id`` if given, else the tokenizer's pad or
    eos, else the generation config's pad or (first) eos, else 0."""
    tok, gen = model.tokenizer, getattr(model.model, "generation_config", None)
    found = [given, getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)]
    found += [getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)]
    for value in found:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, Tensor):
            value = int(value.reshape(-1)[0]) if value.numel() else None
        if value is not None:
            return int(value)
    return 0


def _left_padded(ids: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """``(ids, mask)`` with each row's tokens moved to the right end; InputError for a row
    without tokens or with a gap inside."""
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.to(torch.long)
    starts = torch.cat([mask[:, :1], (mask[:, 1:] - mask[:, :-1]).clamp(min=0)], 1).sum(-1)
    for row in range(mask.shape[0]):
        if int(starts[row]) == 0:
            raise InputError(f"attention_mask row {row} is all padding; every row needs a token")
        if int(starts[row]) > 1:
            raise InputError(
                f"attention_mask row {row} has padding between tokens "
                f"({mask[row].tolist()}); generation takes left- or right-padded rows only"
            )
    lengths = mask.sum(-1)
    width = ids.shape[1]
    if bool((mask[:, -1] == 1).all()):
        return ids, mask  # already left-padded (or unpadded)
    out_ids = torch.full_like(ids, pad_id)
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        out_ids[row, width - n :] = ids[row][mask[row].bool()]
    cols = torch.arange(width, device=mask.device).unsqueeze(0)
    out_mask = (cols >= width - lengths.unsqueeze(1)).to(torch.long)
    return out_ids, out_mask


def _prompt(model: HookedModel, inputs: Any, pad_id: int) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask [batch, pos], left-padded, on the model's device."""
    if isinstance(inputs, Mapping):
        extra = [k for k in inputs if k not in _PROMPT_KEYS]
        if extra:
            raise InputError(
                f"a dict prompt for generate may hold {format_choices(_PROMPT_KEYS)}; got "
                f"{short(extra)}"
            )
        inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    args, kwargs = call_arguments(model, inputs, {})
    ids = args[0]
    if ids.is_floating_point() or ids.ndim != 2:
        raise InputError(
            f"generate takes text or token ids [batch, pos]; got a {ids.dtype} tensor of shape "
            f"{tuple(ids.shape)}"
        )
    mask = kwargs.get("attention_mask")
    if mask is None:
        return ids, torch.ones_like(ids)
    return _left_padded(ids, mask, pad_id)


def _position_ids(mask: Tensor) -> Tensor:
    """transformers' positions for a left-padded mask: count from each row's first token."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _takes_position_ids(hf: nn.Module) -> bool:
    """transformers' own test for passing position ids to a model in ``generate``."""
    return "position_ids" in inspect.signature(hf.forward).parameters


def _needs_all_logits(plans: Sequence[Any]) -> bool:
    return any(plan.slot.kind == "logits" for plan in plans)


def generate(
    model: HookedModel,
    inputs: Any,
    max_new_tokens: int | None = None,
    *,
    hooks: Any = (),
    output: str = "ids",
    progress: bool | None = None,
    **generate_kwargs: Any,
) -> Any:
    """Generate up to ``max_new_tokens`` tokens with ``hooks`` on every forward (see the
    module docstring for what a hook sees, positions and padding).

    ``inputs``: a string, a list of strings (left-padded), token ids ``[batch, pos]`` or
    ``[pos]``, or a dict with ``input_ids`` and ``attention_mask`` (``position_ids`` there are
    ignored: transformers derives them from the mask). ``generate_kwargs`` go to
    transformers' ``generate`` (``do_sample=True, top_k=..., temperature=...``; greedy by
    default, as there). Returns, by ``output``: ``"ids"`` a LongTensor ``[batch, prompt +
    new]`` (fewer new columns if every row stopped at an end-of-sequence token);
    ``"text"`` the decoded rows without their left padding (a str for a str prompt);
    ``"inputs"`` a dict of ``input_ids``, ``attention_mask`` (and ``position_ids`` for a
    padded batch) that ``run_with_cache`` takes. Every argument is checked before the
    first forward.
    """
    _check_causal(model)
    n_new = _check_arguments(model, max_new_tokens, output, generate_kwargs)
    show = progress if progress is not None else n_new >= PROGRESS_FROM
    pad_id = _pad_id(model, generate_kwargs.get("pad_token_id"))
    hf = model.model
    tracker = _Tracker(0, None)
    plans = model.planner.plans(_bind_context(hooks, tracker))
    ids, mask = _prompt(model, inputs, pad_id)
    tracker.prompt_length = ids.shape[1]
    kwargs = dict(generate_kwargs)
    generation_config = getattr(hf, "generation_config", None)
    if "pad_token_id" not in kwargs and getattr(generation_config, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = pad_id  # else transformers warns and picks eos itself
    if _needs_all_logits(plans) and "logits_to_keep" in inspect.signature(hf.forward).parameters:
        kwargs.setdefault("logits_to_keep", 0)  # a logits hook sees every new position
    from tqdm.auto import tqdm

    with tqdm(total=n_new, desc="generate", unit="tok", disable=not show) as bar:
        tracker.bar = bar
        with Scope() as scope:
            scope.pre_hook(hf, tracker, with_kwargs=True, prepend=True)
            with installed(hf, wire(plans), Run()):
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, **kwargs)
    return _result(model, inputs, out, mask, output)


def _result(model: HookedModel, inputs: Any, out: Tensor, prompt_mask: Tensor, output: str) -> Any:
    if output == "ids":
        return out
    copies = out.shape[0] // prompt_mask.shape[0]  # num_return_sequences
    prompt_mask = prompt_mask.repeat_interleave(copies, 0)
    new = out.shape[1] - prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(out.shape[0], new)], 1)
    if output == "inputs":
        found: dict[str, Tensor] = {"input_ids": out, "attention_mask": mask}
        if not bool(mask.all()) and _takes_position_ids(model.model):
            found["position_ids"] = _position_ids(mask)
        return found
    pad = (mask.cumsum(-1) == 0).sum(-1).tolist()
    texts = [model.tokenizer.decode(row[p:]) for row, p in zip(out.tolist(), pad, strict=True)]
    return texts[0] if isinstance(inputs, str) and len(texts) == 1 else texts
