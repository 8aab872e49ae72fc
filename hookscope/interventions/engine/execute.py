"""Running one planned :class:`~.plan.Forward`: blocks below every copy replay the
baseline, each :class:`~.plan.Copy` joins the batch at its block (with its linear tail's
change added), positions before the forward's prefix come from the recorded keys and
values, the last block computes its MLP and output projection at the read position only,
and the unembedding is the identity when the metric reads its input."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hookscope.addresses import SLOT_ORDER, Slot
from hookscope.hf_compat import new_cache
from hookscope.interventions._forward_edits import (
    at_read_position,
    batch_args,
    first_tensor,
    forward_replaced,
    identity,
    join_input,
    join_output,
    positions,
    repeat,
    replay,
)
from hookscope.interventions.engine.plan import Forward
from hookscope.scope import Scope

if TYPE_CHECKING:
    from hookscope.interventions.engine.engine import Engine

__all__ = ["run_forward", "read_position_only"]

# Slots computed before a block's attention output projection (whose input is z), and
# from its MLP on: a write at one of the latter needs the MLP at every position.
_OUT_PROJ_INPUT = SLOT_ORDER["z"]
_MLP_START = SLOT_ORDER["neuron_pre"]

#: one group of copies joining a forward: (join block or None, copies, change or None)
Group = tuple[int | None, int, Tensor | None]


def run_forward(
    engine: Engine, forward: Forward, hooks: list, groups: Sequence[Group], uses_logits: bool,
    slots: Sequence[Slot],
) -> Tensor:  # fmt: skip
    """The output of ``forward`` (its ``groups`` built from its copies, ``hooks`` writing
    the hooked copies): the unembedding's input when the readout is on, else the output."""
    rec, structure = engine.recorded, engine.structure
    n = sum(g[1] for g in groups)
    starts = [g[0] for g in groups]
    if rec.outputs is None or rec.inputs is None or None in starts:
        if forward.prefix or any(g[2] is not None for g in groups):
            raise ValueError("without block records a forward takes plain copies only")
        return _plain(engine, hooks, n, uses_logits)
    blocks: list[nn.Module] = structure.blocks  # type: ignore[assignment]
    n_blocks, prefix = len(rec.outputs), forward.prefix
    cut, first = slice(prefix, None), int(starts[0])  # type: ignore[arg-type]
    replace: dict[nn.Module, Callable] = dict(structure.fast)
    for i in range(first):  # below every copy: the base run, recorded
        replace[blocks[i]] = partial(replay, positions(rec.outputs[i], cut))
    pre_hooks, out_hooks = _joins(engine, groups, cut, first)
    if engine.batch > 1:
        pre_hooks += [(block, partial(batch_args, engine.batch)) for block in blocks[first:]]
    kwargs: dict[str, Any] = {}
    if prefix:
        rows_at = [engine.batch * sum(k for s, k, _ in groups if s <= i) for i in range(n_blocks)]  # type: ignore[operator]
        kwargs = {engine.kv_keyword: _prefix_cache(engine, rows_at, prefix), "use_cache": True}
    readout = engine.readout(uses_logits)
    if readout:
        replace[engine.unembed.module] = identity  # type: ignore[union-attr]
        if first < n_blocks:
            pre_hooks += read_position_only(engine, slots, prefix)
    with Scope() as scope:
        for module, fn in reversed(pre_hooks):  # prepended: the first listed runs first
            scope.pre_hook(module, fn, with_kwargs=True, prepend=True)
        for module, fn in out_hooks:
            scope.forward_hook(module, fn, prepend=True)
        with forward_replaced(replace), torch.no_grad():
            out = engine.model.run_with_hooks(engine.base[:, cut], hooks=hooks, **kwargs)
    if prefix:  # positions before the prefix are the base run's
        before = repeat(rec.hidden[:, :prefix], n).to(out.device)  # type: ignore[index]
        out = torch.cat([before, out], dim=1)
    return out


def _joins(engine: Engine, groups: Sequence[Group], cut: slice, first: int) -> tuple[list, list]:
    """Hooks joining each group's copies to the batch at its block: ``(pre-hooks, forward
    hooks)``; a group's copies are the base rows' recorded input there plus its change."""
    rec, blocks = engine.recorded, engine.structure.blocks
    n_blocks = len(rec.outputs)  # type: ignore[arg-type]
    joins: dict[int, list[Tensor]] = {}
    for start, k, delta in groups:
        base_in = rec.inputs[start] if start < n_blocks else first_tensor(rec.outputs[-1])  # type: ignore[index, operator]
        rows = repeat(base_in[:, cut], k)
        if delta is not None:  # (on the block's device: a dispatched model has several)
            rows = rows + delta[:, cut].to(rows.device)
        joins.setdefault(start, []).append(rows)  # type: ignore[arg-type]
    pre_hooks, out_hooks = [], []
    for start, parts in joins.items():
        if start == 0:
            pre_hooks.append((blocks[0], partial(join_input, parts)))  # type: ignore[index]
        else:
            out_hooks.append((blocks[start - 1], partial(join_output, parts, start == first)))  # type: ignore[index]
    return pre_hooks, out_hooks


def read_position_only(engine: Engine, slots: Sequence[Slot], prefix: int = 0) -> list:
    """Pre-hooks computing the last block's MLP (and attention output projection) at the
    metric's read position only, as far as no write in ``slots`` needs them elsewhere;
    positions are counted from ``prefix``."""
    read, structure = engine.read_position, engine.structure
    if read is None or int(read.min()) < prefix:
        return []
    last = len(structure.blocks or []) - 1
    in_last = [SLOT_ORDER[s.kind] for s in slots if s.layer == last and s.kind in SLOT_ORDER]
    at = partial(at_read_position, read - prefix)
    hooks = []
    if structure.last_out_proj is not None and all(o < _OUT_PROJ_INPUT for o in in_last):
        hooks.append((structure.last_out_proj, at))
    if structure.last_mlp is not None and all(o < _MLP_START for o in in_last):
        hooks.append((structure.last_mlp, at))
    return hooks


def _plain(engine: Engine, hooks: list, n: int, uses_logits: bool) -> Tensor:
    """``n`` copies of the whole input written by ``hooks`` (no shortcut but the readout)."""
    replace = dict(engine.structure.fast)
    if engine.readout(uses_logits):
        replace[engine.unembed.module] = identity  # type: ignore[union-attr]
    with forward_replaced(replace), torch.no_grad():
        return engine.model.run_with_hooks(repeat(engine.base, n), hooks=hooks)


def _prefix_cache(engine: Engine, rows_at: list[int], prefix: int) -> Any:
    """A key-value cache holding the base rows' first ``prefix`` positions, repeated to
    ``rows_at[i]`` rows at layer ``i``."""
    cache = new_cache()
    for i, (keys, values) in enumerate(engine.recorded.prefix_kv):  # type: ignore[arg-type]
        k = max(1, rows_at[i] // engine.batch)
        cache.update(repeat(keys[:, :, :prefix], k), repeat(values[:, :, :prefix], k), i)
    return cache
