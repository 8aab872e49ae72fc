"""Planning a patching sweep's forwards: which jobs share a forward, where each copy joins
the batch, and which positions a forward can skip (see :mod:`._stacked` for the runner).

A job is one ``(address, position)`` or a list of them, patched together in one copy of
the base batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hookscope.adapters.transformer import TransformerAdapter
from hookscope.addresses import Address, Slot, slot_address
from hookscope.interventions._stacked import StackedRunner
from hookscope.model import HookedModel


def position_axis(model: HookedModel, slot: Slot) -> int | None:
    if isinstance(model.adapter, TransformerAdapter):
        if slot.kind == "logits" and not model.adapter.spec.token_input:
            return None  # a vision transformer's logits: [batch, classes]
        return 2 if slot.kind == "pattern" else 1
    return None


def pairs(job: Any) -> list[tuple[Address, int | None]]:
    return job if isinstance(job, list) else [job]


def job_start(runner: StackedRunner, job: Any) -> tuple[int | None, int | None]:
    """``(start block, tail layer)`` of a job (see :meth:`StackedRunner.tail_layer`)."""
    slots = [a.slot for a, _ in pairs(job)]
    tail = runner.tail_layer(slots)
    if tail is not None and not _disjoint(job, int(runner.base.shape[-1])):
        tail = None  # overlapping writes: patch through hooks, where writing twice is harmless
    starts = [runner.start(s) for s in slots]
    start = None if None in starts else min(starts)  # type: ignore[type-var]
    return start, tail


def _disjoint(job: Any, n_pos: int) -> bool:
    """Whether a job's pairs write separate values (one slot; no unit and position written
    twice), so that their changes to a block output add up. Conservative: a whole-slot
    pair beside any other counts as overlapping."""
    items = pairs(job)
    if len(items) == 1:
        return True
    if len({a.slot for a, _ in items}) > 1 or any(a.index is None for a, _ in items):
        return False
    seen: dict[int, set[int | None]] = {}
    for address, pos in items:
        at = seen.setdefault(address.index, set())  # type: ignore[arg-type]
        p = None if pos is None else pos % n_pos
        if p in at or (at and (p is None or None in at)):
            return False
        at.add(p)
    return True


def _effective(key: tuple[int | None, int | None]) -> int:
    start, tail = key
    return tail + 1 if tail is not None else -1 if start is None else start


def groups(runner: StackedRunner, part: list) -> list[tuple[tuple[int | None, int | None], list]]:
    """The jobs of one forward grouped by ``(start, tail)``, in the order the runner adds
    them to the batch (ascending start block); ``part`` must already be in that order."""
    out: list[tuple[tuple[int | None, int | None], list]] = []
    for job in part:
        key = job_start(runner, job)
        if out and out[-1][0] == key:
            out[-1][1].append(job)
        else:
            out.append((key, [job]))
    return out


def tail_delta(
    model: HookedModel, part: list, source: dict[str, Tensor], base: dict[str, Tensor], batch: int
) -> Tensor:
    """Per copy, how much its ``z``/``result`` patches change the block output:
    ``[len(part) * batch, pos, d_model]`` (the output projection is linear)."""
    per_head: dict[str, Tensor] = {}  # slot -> each head's change [batch, pos, heads, d_model]
    rows = []
    for job in part:
        total: Tensor | None = None
        for address, pos in pairs(job):
            name = slot_address(address.slot)
            if name not in per_head:
                diff = source[name] - base[name]  # [batch, pos, heads, d_head or d_model]
                if address.slot.kind == "z":
                    w_o, _ = model.adapter.w_o(address.slot.layer)  # type: ignore[attr-defined]
                    w_o = w_o.to(diff.device, diff.dtype)
                    diff = torch.einsum("bphk,hkd->bphd", diff, w_o)
                per_head[name] = diff
            change = per_head[name]
            if address.index is not None:
                change = change[:, :, model.adapter.unit_index(address.slot, address.index)]
            else:
                change = change.sum(2)
            if pos is not None:
                only = torch.zeros_like(change)
                only[:, pos] = change[:, pos]
                change = only
            total = change if total is None else total + change
        rows.append(total)
    return torch.stack(rows).flatten(0, 1)


# The fixed cost of running one block in a forward, in units of one position of one copy
# through one block: on CPUs, reading a block's weights costs about as much as ~50 rows.
_BLOCK_COST = 48


def chunks(
    model: HookedModel,
    jobs: list,
    k: int,
    runner: StackedRunner,
    source: dict[str, Tensor],
    base: dict[str, Tensor],
) -> list[tuple[int, list[int]]]:
    """Job indices in forwards of at most ``k`` copies, as ``(first position, indices)``.

    A forward mixes jobs patching different blocks (each copy joins at its own block, see
    :meth:`StackedRunner.run`), ordered by that block. On causal models with the readout a
    forward also skips the positions before its earliest change; jobs are then sorted by
    first changed position and cut where the positions saved outweigh another forward's
    fixed cost. Jobs outside the blocks (the embedding, logits, vision inputs) run in plain
    forwards of their own.
    """
    keys = [job_start(runner, job) for job in jobs]
    plain = [i for i, key in enumerate(keys) if key[0] is None and key[1] is None]
    stacked = [i for i, key in enumerate(keys) if not (key[0] is None and key[1] is None)]
    out = [(0, plain[j : j + k]) for j in range(0, len(plain), k)]
    if not stacked or runner.records is None:
        return out + [(0, stacked[j : j + k]) for j in range(0, len(stacked), k)]
    n_blocks = len(runner.records)
    if runner.can_skip_prefix():  # (logits and module: sites are plain jobs, never stacked)
        memo: dict = {}
        first = {i: _first_change(model, jobs[i], source, base, memo) for i in stacked}
    else:
        first = dict.fromkeys(stacked, 0)
    stacked.sort(key=lambda i: first[i])
    n_pos = int(runner.base.shape[1]) if runner.base.ndim == 2 else 1
    depth = [n_blocks - _effective(keys[i]) for i in stacked]  # blocks each copy runs
    for a, b in _split([first[i] for i in stacked], depth, n_pos, k):
        idx = sorted(stacked[a:b], key=lambda i: _effective(keys[i]))
        out.append((first[stacked[a]], idx))
    return out


def _first_change(model: HookedModel, job: Any, source, base, memo: dict | None = None) -> int:
    """The first position at which ``job``'s patch writes a value the base run lacks.
    ``memo``: per slot, the first differing position of each unit (shared by a sweep's jobs)."""
    memo = {} if memo is None else memo
    first = None
    for address, pos in pairs(job):
        axis = position_axis(model, address.slot)
        if axis is None:
            return 0
        if pos is not None:
            at = pos % source[slot_address(address.slot)].shape[axis]
        else:
            unit = None
            if address.index is not None:
                unit = model.adapter.unit_index(address.slot, address.index)
            at = _first_difference(model, address.slot, axis, unit, source, base, memo)
        first = at if first is None else min(first, at)
    return first or 0


def _first_difference(
    model: HookedModel, slot: Slot, axis: int, unit: int | None, source, base, memo: dict
) -> int:
    """The first position where ``slot`` (its ``unit``, or all of it) differs between
    source and base; the number of positions where it never does. Computed for every
    unit of a slot at once (``memo``)."""
    key = (slot, unit is not None)
    if key not in memo:
        name = slot_address(slot)
        differs = source[name] != base[name]
        n_pos = differs.shape[axis]
        if unit is None:
            at = differs.movedim(axis, 0).reshape(n_pos, 1, -1).any(-1)  # [pos, 1]
        else:
            u = model.adapter.unit_axis(slot) % differs.ndim
            d = differs.movedim((axis, u), (0, 1))
            at = d.reshape(n_pos, d.shape[1], -1).any(-1)  # [pos, units]
        # first True along positions (argmax returns the first maximum), else n_pos
        memo[key] = torch.where(at.any(0), at.int().argmax(0), n_pos).tolist()
    return memo[key][0 if unit is None else unit]


def _split(firsts: list[int], depth: list[int], n_pos: int, k: int) -> list[tuple[int, int]]:
    """Cut jobs sorted by first changed position into forwards ``[a, b)`` of at most ``k``
    copies, minimising the work: per forward, ``_BLOCK_COST`` for each block it runs, plus
    the positions ``firsts[a]..`` of each copy through its ``depth`` blocks. Cuts are only
    considered between different first positions (and every ``k`` jobs)."""
    n = len(firsts)
    bounds = [0] + [i for i in range(1, n) if firsts[i] != firsts[i - 1]] + [n]
    m = len(bounds)
    seg_max = [max(depth[bounds[i] : bounds[i + 1]]) for i in range(m - 1)]
    seg_sum = [sum(depth[bounds[i] : bounds[i + 1]]) for i in range(m - 1)]
    best = [0.0] + [float("inf")] * (m - 1)
    cut = [0] * m
    for j in range(1, m):
        deepest, blocks_run = 0, 0  # over segments i..j-1, as i goes down
        for i in range(j - 1, max(-1, j - 65), -1):
            deepest, blocks_run = max(deepest, seg_max[i]), blocks_run + seg_sum[i]
            forwards = -(-(bounds[j] - bounds[i]) // k)
            c = (
                best[i]
                + forwards * _BLOCK_COST * deepest
                + blocks_run * (n_pos - firsts[bounds[i]])
            )
            if c < best[j]:
                best[j], cut[j] = c, i
    runs = []
    j = m - 1
    while j > 0:
        a, b = bounds[cut[j]], bounds[j]
        runs += [(x, min(x + k, b)) for x in range(a, b, k)][::-1]
        j = cut[j]
    return runs[::-1]


def unit_index(model: HookedModel, address: Address, pos: int | None, ndim: int) -> list[Any]:
    """Index of ``address``'s unit (at ``pos``) in its slot's tensor of ``ndim`` dimensions."""
    slot = address.slot
    index: list[Any] = [slice(None)] * ndim
    if pos is not None:
        index[position_axis(model, slot)] = pos  # type: ignore[index]
    if address.index is not None:
        axis = model.adapter.unit_axis(slot)
        index[axis % ndim] = model.adapter.unit_index(slot, address.index)
    return index
