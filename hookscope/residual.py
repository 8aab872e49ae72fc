"""The residual stream taken apart: logit lens stacks, component decomposition, head results, DLA.

:class:`~hookscope.cache.ActivationCache` exposes these as methods (``cache.decompose_resid()``
...); they read the cached tensors and the model's weights (through a weak reference the cache
keeps to its :class:`~hookscope.model.HookedModel`). Conventions:

* A *stack* is [component, batch, pos, d_model] (``pos=`` an int drops the pos axis, a slice
  keeps it). Labels are hookscope addresses (``resid_pre.3``, ``attn_out.3``, ``head.3.5``),
  plus ``embed`` / ``pos_embed``.
* ``apply_ln=True`` means the **final** norm (what the unembedding reads); stacks up to an
  earlier layer cannot take it (a block's own norms are not modelled here).

  - :func:`accumulated_resid` applies the real final norm to each component with the
    component's own statistics (the logit lens: ``stack @ W_U + b_U`` are the lens logits,
    and the last component gives the model's logits).
  - :func:`decompose_resid`, :func:`stack_head_results` and :func:`apply_ln_to_stack` apply the
    final norm *frozen*: centre (LayerNorm), divide by the scale the norm computed from its
    real input (``resid_post`` of the last layer, cached), multiply by its weight; no bias.
    This is linear, so the normalised components sum to the normalised stream minus the
    norm's bias, and their DLA sums to the logit difference exactly (see :func:`logit_attrs`).

* Differences from TransformerLens 4.x, both checked in ``tests/test_residual.py``:
  TransformerLens' ``apply_ln_to_stack`` divides by the scale but leaves the norm's weight out
  (it expects the weight folded into ``W_U``, which the TransformerBridge does only after
  ``enable_compatibility_mode()``); hookscope multiplies by the weight, so its values equal
  the bridge's in compatibility mode and the model's real logits either way. And
  TransformerLens' ``logit_attrs`` always applies the final norm itself, so a stack made with
  ``apply_ln=True`` is normalised twice there (e.g. on SmolLM2 head 23.3 attributes 0.043
  instead of 2.855, ranking unchanged); hookscope's ``logit_attrs`` knows which stacks it
  normalised and applies the norm exactly once.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hookscope.addresses import parse, slot_address
from hookscope.errors import CacheKeyError, HookscopeError, InputError, SiteUnavailableError

if TYPE_CHECKING:
    from hookscope.cache import ActivationCache

__all__ = [
    "accumulated_resid",
    "decompose_resid",
    "stack_head_results",
    "apply_ln_to_stack",
    "logit_attrs",
]

Pos = int | slice | None

# stacks this module returned, by id: (weak reference, normalised by the final norm?)
_MADE: dict[int, tuple[weakref.ref, bool]] = {}


def _tag(stack: Tensor, normalised: bool) -> Tensor:
    key = id(stack)
    _MADE[key] = (weakref.ref(stack, lambda _, key=key: _MADE.pop(key, None)), normalised)
    return stack


def _provenance(cache: ActivationCache, stack: Tensor) -> bool | None:
    """True / False: a stack (or a view of one) made here with / without the final norm, or a
    cached activation (raw); None: a tensor of unknown origin."""
    for t in (stack, stack._base):
        if t is None:
            continue
        entry = _MADE.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
    candidates = {id(stack)} | ({id(stack._base)} if stack._base is not None else set())
    for slot, act in cache._acts.items():
        if id(act) in candidates or (act._base is not None and id(act._base) in candidates):
            if slot.kind == "final_norm":
                return True  # the final norm's output: already normalised (bias included)
            if slot.kind in _STREAM_KINDS and not (slot.kind == "result" and _post_norm(cache)):
                return False
            raise InputError(
                f"{slot_address(slot)} is not a residual-stream vector (d_model) that the "
                "unembedding reads; logit_attrs takes resid_*, attn_out, mlp_out, embed, "
                "final_norm or the stacks of this cache"
                + (
                    " (on this model a head's result passes the post-attention norm first: "
                    "use stack_head_results)"
                    if slot.kind == "result"
                    else ""
                )
            )
    return None


_STREAM_KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "result")


def _post_norm(cache: ActivationCache) -> bool:
    return _model(cache).adapter.block_part(0, "post_attn_norm") is not None


def _model(cache: ActivationCache):
    model = cache._model() if cache._model is not None else None
    if model is None:
        raise InputError(
            "this cache has no model to read weights from (it was built by hand, or its "
            "HookedModel was freed): the decomposition and DLA methods read the model's "
            "final norm and unembedding; keep the HookedModel alive, or call "
            "cache.bind(model)"
        )
    model.weights  # noqa: B018  (a clear error on models without a residual stream)
    return model


def _get(cache: ActivationCache, address: str, why: str) -> Tensor:
    try:
        return cache[address]
    except CacheKeyError:
        model = cache._model() if cache._model is not None else None
        if model is not None:
            try:
                model.adapter.check(parse(address))
            except HookscopeError as err:  # the model has no such tensor at all
                raise InputError(
                    f"{why} needs {address}, which this model does not have: {err}"
                ) from None
        raise CacheKeyError(
            f"{why} needs {address}, which was not cached; run_with_cache with names=None "
            f"caches it, or add {address!r} to names"
        ) from None


def _at(t: Tensor, pos: Pos) -> Tensor:
    """``t`` [..., pos, d] at ``pos`` (int drops the axis)."""
    if pos is None:
        return t
    if isinstance(pos, bool) or not isinstance(pos, (int, slice)):
        raise InputError(f"pos must be None, an int or a slice, got {pos!r}")
    n = t.shape[-2]
    if isinstance(pos, int) and not -n <= pos < n:
        raise InputError(f"pos {pos} out of range for {n} positions")
    return t[..., pos, :]


def _final_layer(model: Any, layer: int | None, what: str, apply_ln: bool) -> int:
    n = model.n_layers
    if layer is None or layer == -1:
        return n
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise InputError(
            f"{what}: layer must be None/-1 (everything, up to the unembedding) or 0-{n} "
            f"(components before that layer's input), got {layer!r}"
        )
    if apply_ln and layer != n:
        raise InputError(
            f"{what}: apply_ln=True applies the final norm, which reads the stream after the "
            f"last layer; for layer={layer} pass apply_ln=False (or layer=None)"
        )
    return layer


def final_scale(cache: ActivationCache, pos: Pos = None) -> Tensor:
    """[batch, pos, 1] (pos as given): the scale the final norm divided the real stream by,
    computed from its cached input (``resid_post`` of the last layer)."""
    model = _model(cache)
    resid = _get(cache, f"resid_post.{model.n_layers - 1}", "the final norm's scale")
    return _at(model.weights.scale(resid), pos)


def apply_ln_to_stack(cache: ActivationCache, stack: Tensor, pos: Pos = None) -> Tensor:
    """The final norm, frozen at the real stream's scale, applied to ``stack``
    [..., batch, pos, d_model] (``pos`` as the stack was sliced): centre (LayerNorm),
    divide by the cached scale, multiply by the weight; no bias."""
    model = _model(cache)
    if _provenance(cache, stack) is True:
        raise InputError(
            "this stack is already normalised (it was made with apply_ln=True); applying the "
            "final norm twice divides by its scale twice"
        )
    return _tag(_frozen(cache, model, stack, pos), True)


def _frozen(cache: ActivationCache, model: Any, stack: Tensor, pos: Pos) -> Tensor:
    scale = final_scale(cache, pos)
    lead = scale.shape[:-1]
    if stack.ndim < scale.ndim or tuple(stack.shape[-scale.ndim : -1]) != tuple(lead):
        raise InputError(
            f"a stack of shape {tuple(stack.shape)} does not line up with the cached stream "
            f"[{', '.join(map(str, lead))}, d_model] at pos={pos!r}; pass the pos the stack "
            "was sliced with"
        )
    return model.weights.frozen_norm(stack, scale.to(stack.device))


def _finish(
    cache: ActivationCache,
    parts: list[Tensor],
    labels: list[str],
    pos: Pos,
    frozen_ln: bool,
    return_labels: bool,
) -> Tensor | tuple[Tensor, list[str]]:
    stack = torch.stack([_at(p, pos) for p in parts])
    if frozen_ln:
        stack = _frozen(cache, _model(cache), stack, pos)
    _tag(stack, frozen_ln)
    return (stack, labels) if return_labels else stack


def accumulated_resid(
    cache: ActivationCache,
    layer: int | None = None,
    *,
    incl_mid: bool = False,
    apply_ln: bool = False,
    pos: Pos = None,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, list[str]]:
    """The stream as it accumulates, as TransformerLens counts: ``resid_pre.0 ...
    resid_pre.{layer}`` (the input of ``layer``), ending with the final ``resid_post.{L-1}``
    when ``layer`` is None/-1/L (``incl_mid`` adds each ``resid_mid`` before ``layer``).
    ``apply_ln=True``: each component through the real final norm with its own statistics
    (the logit lens). [component, batch, pos, d_model]."""
    model = _model(cache)
    n = _final_layer(model, layer, "accumulated_resid", apply_ln)
    parts, labels = [], []
    for layer_ in range(n + 1):  # as TransformerLens: up to and including layer n's input
        if layer_ == model.n_layers:
            parts.append(_get(cache, f"resid_post.{layer_ - 1}", "accumulated_resid"))
            labels.append(f"resid_post.{layer_ - 1}")
            break
        name = f"resid_pre.{layer_}"
        if layer_ and name not in cache and f"resid_post.{layer_ - 1}" in cache:
            name = f"resid_post.{layer_ - 1}"  # the same tensor
        parts.append(_get(cache, name, "accumulated_resid"))
        labels.append(f"resid_pre.{layer_}")
        if incl_mid and layer_ < n:
            parts.append(_get(cache, f"resid_mid.{layer_}", "accumulated_resid(incl_mid=True)"))
            labels.append(f"resid_mid.{layer_}")
    stack = torch.stack([_at(p, pos) for p in parts])
    if apply_ln:
        stack = model.final_norm(stack)
    # through the real norm (own statistics, bias included): logit_attrs takes it as it is
    _tag(stack, apply_ln)
    return (stack, labels) if return_labels else stack


def _embed_parts(cache: ActivationCache, model: Any) -> tuple[list[Tensor], list[str]]:
    why = "decompose_resid"
    if model.adapter.name == "bert":
        raise SiteUnavailableError(
            "BERT's blocks are post-LayerNorm: the stream is renormalised inside every block, "
            "so it is not a sum of component outputs and has no decomposition"
        )
    first = _get(cache, "resid_pre.0", why)
    embed = cache["embed"] if "embed" in cache else None
    if embed is None or embed.shape != first.shape:
        return [first], ["resid_pre.0"]  # a ViT: CLS token and positions join the patches
    if model.W_pos is None:
        return [embed], ["embed"]
    return [embed, first - embed], ["embed", "pos_embed"]


def decompose_resid(
    cache: ActivationCache,
    layer: int | None = None,
    *,
    mode: str = "all",
    apply_ln: bool = False,
    pos: Pos = None,
    incl_embeds: bool = True,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, list[str]]:
    """The stream before ``layer`` (None/-1: after the last) as a sum of components:
    ``embed`` (and ``pos_embed`` = ``resid_pre.0 - embed`` where positions are learned), then
    ``attn_out.l`` and ``mlp_out.l`` of each layer. They sum to ``resid_pre.{layer}`` (to
    ``resid_post.{L-1}`` by default). ``mode``: all, attn or mlp. ``apply_ln``: the frozen
    final norm (module docstring). [component, batch, pos, d_model]."""
    model = _model(cache)
    if mode not in ("all", "attn", "mlp"):
        raise InputError(f"mode must be one of all, attn, mlp; got {mode!r}")
    n = _final_layer(model, layer, "decompose_resid", apply_ln)
    parts, labels = _embed_parts(cache, model) if incl_embeds else ([], [])
    for layer_ in range(n):
        for kind in ("attn_out", "mlp_out"):
            if mode in ("all", kind[:-4]):
                parts.append(_get(cache, f"{kind}.{layer_}", "decompose_resid"))
                labels.append(f"{kind}.{layer_}")
    if not parts:
        raise InputError("decompose_resid: nothing to stack (layer=0 with incl_embeds=False)")
    return _finish(cache, parts, labels, pos, apply_ln, return_labels)


def head_results(cache: ActivationCache, layer: int) -> Tensor:
    """[batch, pos, n_heads, d_model]: what each head of ``layer`` adds to the stream —
    the cached ``result`` (``z_h @ W_O[h]``), or computed from the cached ``z``. On models
    whose attention output is normalised before it joins the stream (Gemma's
    post-attention RMSNorm) each result goes through that norm frozen at the scale of the
    real attention output, so the heads still sum to ``attn_out``."""
    model = _model(cache)
    if f"head.{layer}.result" in cache:
        res = cache[f"head.{layer}.result"]
    else:
        z = _get(cache, f"head.{layer}", "stack_head_results (head results from z)")
        res = torch.einsum("bphd,hdm->bphm", z, model.W_O[layer].to(z.device, z.dtype))
    norm = model.adapter.block_part(layer, "post_attn_norm")
    if norm is not None:  # a norm after the output projection
        from hookscope.adapters.weights import norm_scale

        out = res.sum(-2) + model.b_O[layer].to(res.device, res.dtype)
        readout = model.weights.readout
        eps = float(getattr(norm, "eps", None) or norm.variance_epsilon)
        from hookscope.dispatch import weight as real_weight

        w = real_weight(norm, "weight") + readout.norm_offset
        res = res / norm_scale(out, readout.norm, eps).unsqueeze(-2) * w.to(res.device, res.dtype)
    return res


def stack_head_results(
    cache: ActivationCache,
    layer: int | None = None,
    *,
    apply_ln: bool = False,
    pos: Pos = None,
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, list[str]]:
    """Every head's result before ``layer`` (None/-1: all layers), layer-major:
    [n_layers * n_heads, batch, pos, d_model], labels ``head.l.h``. Biases are not in the
    stack: ``attn_out.l = results of layer l summed over heads + model.b_O[l]``.
    ``apply_ln``: the frozen final norm (module docstring)."""
    model = _model(cache)
    n = _final_layer(model, layer, "stack_head_results", apply_ln)
    parts, labels = [], []
    for layer_ in range(n):
        res = head_results(cache, layer_)
        for h in range(res.shape[-2]):
            parts.append(res[..., h, :])
            labels.append(f"head.{layer_}.{h}")
    if not parts:
        raise InputError("stack_head_results: layer=0 selects no heads")
    return _finish(cache, parts, labels, pos, apply_ln, return_labels)


def _has_pos(cache: ActivationCache, model: Any, stack: Tensor, pos: Pos) -> bool:
    """Whether ``stack`` [..., batch, (pos,) d_model] still has its position axis."""
    if pos is not None:
        return not isinstance(pos, int)
    resid = _get(cache, f"resid_post.{model.n_layers - 1}", "logit_attrs")
    return stack.ndim >= 3 and tuple(stack.shape[-3:-1]) == tuple(resid.shape[:2])


def _directions(model: Any, tokens: Any, what: str) -> Tensor:
    from hookscope.tokens import parse_tokens, resolve

    if isinstance(tokens, Tensor) and tokens.ndim == 2 and not tokens.is_floating_point():
        ids = tokens.long()  # one token per row and position
        if ids.numel() and int(ids.min()) < 0:
            raise InputError(f"logit_attrs: {what} ids must be >= 0, got {int(ids.min())}")
    else:
        ids = resolve(parse_tokens(tokens, what), what, model, "logit_attrs")
    vocab = model.W_U.shape[1]
    if ids.numel() and int(ids.max()) >= vocab:
        raise InputError(f"logit_attrs: {what} id {int(ids.max())} >= vocabulary size {vocab}")
    return model.W_U.T[ids]  # [..., d_model]


def logit_attrs(
    cache: ActivationCache,
    stack: Tensor,
    tokens: Any,
    incorrect: Any = None,
    *,
    pos: Pos = None,
    apply_ln: bool | None = None,
) -> Tensor:
    """Direct logit attribution: each component's contribution to ``tokens``' logits (minus
    ``incorrect``'s): ``final_norm_frozen(component) @ (W_U[:, tokens] - W_U[:, incorrect])``.

    The final norm's scale is the one computed from the cached final-norm input (the real
    stream), TransformerLens' convention, so over a full :func:`decompose_resid` the
    attributions sum to the logit difference exactly, up to the constant the final norm's
    bias and ``b_U`` add (``(model.final_norm bias @ W_U + b_U)[tokens] - ...[incorrect]``,
    zero on Llama-family models); Gemma's final soft-cap is not linear and is left out (the
    attributions are to the logits before the cap).

    ``stack`` [..., batch, pos, d_model] (or [..., batch, d_model] when sliced with an int
    ``pos``, which must then be given). ``apply_ln``: None decides from where the stack
    came: one made with ``apply_ln=True`` is used as it is, one made with ``apply_ln=False``
    (or a cached activation) gets the frozen final norm; any other tensor must say
    (True: apply it; False: the stack is already normalised). ``tokens``/``incorrect``: a
    text of one token (``" Mary"``), an id, or ids per row [batch] or per row and
    position [batch, pos]. Returns [..., batch, pos] (or [..., batch]).
    """
    model = _model(cache)
    known = _provenance(cache, stack)
    if apply_ln is None:
        if known is None:
            raise InputError(
                "logit_attrs cannot tell whether this stack is normalised (it was not made by "
                "this cache's accumulated_resid/decompose_resid/stack_head_results): pass "
                "apply_ln=True if it holds raw residual-stream vectors, apply_ln=False if the "
                "final norm was already applied"
            )
        apply_ln = not known
    elif apply_ln and known is True:
        raise InputError(
            "apply_ln=True on a stack made with apply_ln=True would apply the final norm twice "
            "(TransformerLens does: logit_attrs there always normalises); pass apply_ln=None"
        )
    direction = _directions(model, tokens, "tokens")
    if incorrect is not None:
        other = _directions(model, incorrect, "incorrect")
        if other.shape != direction.shape:
            raise InputError(
                f"tokens and incorrect must have the same shape, got {tuple(direction.shape[:-1])} "
                f"and {tuple(other.shape[:-1])}"
            )
        direction = direction - other
    d_model = model.W_U.shape[0]
    if stack.shape[-1] != d_model:
        raise InputError(
            f"the stack's last axis has {stack.shape[-1]} features; residual-stream vectors "
            f"have d_model = {d_model}"
        )
    if apply_ln:
        stack = _frozen(cache, model, stack, pos)
    has_pos = _has_pos(cache, model, stack, pos)
    lead = stack.shape[-3:-1] if has_pos else stack.shape[-2:-1]  # (batch, pos) or (batch,)
    if direction.ndim == 3:  # one token per row and position: sliced like the stack
        direction = _at(direction, pos)
    elif direction.ndim == 2 and has_pos:
        direction = direction.unsqueeze(-2)  # one direction per row, at every position
    want = tuple(direction.shape[:-1])
    try:
        fits = torch.broadcast_shapes(want, tuple(lead)) == tuple(lead)
    except RuntimeError:
        fits = False
    if not fits:
        raise InputError(
            f"tokens give directions for {list(want)} (batch[, pos]) but the stack has "
            f"{list(lead)} (batch[, pos]) at pos={pos!r}: pass one token, one per row, or "
            "one per row and position"
        )
    return (stack * direction.to(stack.device, stack.dtype)).sum(-1)
