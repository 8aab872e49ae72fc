"""The baseline forward: clean and corrupted (or just the inputs) in one batch, recording
what the sweep's forwards replay: each block's input and output on the base rows, their
keys and values (causal models), and the unembedding's input when the metric can be read
from it (checked: the model must return exactly the unembedding's output)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hookscope.addresses import Slot, slot_address
from hookscope.hf_compat import cache_kv, kv_cache_filled, kv_cache_found, new_cache
from hookscope.interventions._forward_edits import Probe, forward_replaced, rows_of
from hookscope.scope import Scope

if TYPE_CHECKING:
    from hookscope.interventions.engine.engine import Engine

__all__ = ["Recorded", "record"]


@dataclass
class Recorded:
    """What the baseline recorded on the base rows (None where it could not)."""

    outputs: list[Any] | None = None  #: each block's output
    inputs: list[Tensor] | None = None  #: each block's input (hidden states)
    prefix_kv: list[tuple[Tensor, Tensor]] | None = None  #: each block's keys and values
    hidden: Tensor | None = None  #: the unembedding's input


def record(
    engine: Engine, inputs: Tensor, rows: slice, slots: list[Slot], uses_logits: bool
) -> tuple[Any, Any]:
    """One forward of ``inputs`` caching ``slots``; fills ``engine.recorded`` and settles
    ``engine.unembed`` and ``engine.kv_keyword``. Returns ``(output, cache)``: the output
    is the unembedding's input when the readout is on, full logits otherwise."""
    blocks = engine.structure.blocks or []
    outputs: list[Any] = [None] * len(blocks)
    block_inputs: list[Any] = [None] * len(blocks)
    names = [slot_address(s) for s in slots]
    probe = Probe(engine.unembed.module) if engine.readout(uses_logits) else None  # type: ignore[union-attr]
    seen: dict[str, Tensor] = {}  # with full logits: the unembedding's input and output
    kwargs: dict[str, Any] = {}

    def keep_input(i: int, module: nn.Module, args: tuple, kw: dict) -> None:
        block_inputs[i] = rows_of(args[0] if args else kw["hidden_states"], rows)

    with Scope() as scope:
        for i, block in enumerate(blocks):
            scope.forward_hook(
                block, lambda module, args, out, i=i: outputs.__setitem__(i, rows_of(out, rows))
            )
            scope.pre_hook(block, partial(keep_input, i), with_kwargs=True)
        if engine.unembed is not None and probe is None:
            scope.forward_hook(
                engine.unembed.module,
                lambda module, args, out: seen.update(hidden=args[0], logits=out),
            )
        if probe is not None:
            for module, fn in engine.read_position_only(slots):
                scope.pre_hook(module, fn, with_kwargs=True, prepend=True)
        edits = {**engine.structure.fast, **({probe.module: probe} if probe else {})}
        with forward_replaced(edits):
            out, cache = _forward(engine, inputs, names, kwargs)
        if probe is not None and not probe.matches(out):
            engine.unembed = None  # the logits are post-processed: read full logits
            with forward_replaced(engine.structure.fast):
                out, cache = _forward(engine, inputs, names, kwargs)
    rec = Recorded()
    if blocks and all(r is not None for r in outputs + block_inputs):
        rec.outputs, rec.inputs = outputs, block_inputs
    if engine.unembed is not None and probe is not None:
        out = probe.hidden
        rec.hidden = out[rows]  # type: ignore[index]
    elif engine.unembed is not None:  # full logits were needed: are they the unembedding's?
        logits = seen.get("logits")
        if _same(out, logits):
            rec.hidden = seen["hidden"][rows]
        else:
            engine.unembed = None
    kv = cache_kv(kwargs[engine.kv_keyword]) if engine.kv_keyword else None
    if kv is not None and len(kv) == len(blocks):
        rec.prefix_kv = [(keys[rows], values[rows]) for keys, values in kv]
    engine.recorded = rec
    return out, cache


def _same(out: Any, logits: Any) -> bool:
    return (
        isinstance(logits, Tensor)
        and isinstance(out, Tensor)
        and out.shape == logits.shape
        and torch.equal(out.to(logits.device, logits.dtype), logits)
    )


def _forward(engine: Engine, inputs: Tensor, names: list, kwargs: dict) -> tuple[Any, Any]:
    """The baseline forward with a fresh key/value cache (which keeps the base rows' keys
    and values) under the first keyword this model's forward fills (hf_compat)."""
    model = engine.model
    tried = engine.structure.kv_keywords
    keyword = None
    for keyword in tried or (None,):  # noqa: B007  (the keyword that filled a cache)
        kwargs.clear()
        if keyword is not None:
            kwargs.update({keyword: new_cache(), "use_cache": True})
        with torch.no_grad():
            result = model.run_with_cache(inputs, names=names, **kwargs)
        n_blocks, n_pos = len(engine.structure.blocks or []), inputs.shape[-1]
        if keyword is None or kv_cache_filled(kwargs[keyword], n_blocks, n_pos):
            break
    else:
        keyword = None  # no keyword filled a cache: no prefix skipping
    if tried:
        kv_cache_found(model.model, keyword)
    engine.kv_keyword = keyword
    return result
