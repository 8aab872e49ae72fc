"""Jobs: what one patched copy of the base batch writes, and the arithmetic on writes that
planning and execution share (one write hook for every intervention, the per-copy change
of a linear tail, the first position a job changes, jobs that change nothing).

A :class:`Write` says which unit (an :class:`~hookscope.addresses.Address`: a whole slot, a
head or a neuron), at which position (or all), takes which value: patching writes the
source run's activation, ablation a zero, a mean or a resampled activation. A job is a
tuple of writes done together in one copy. Everything is keyed by
:class:`~hookscope.addresses.Slot`; values are whole-slot tensors of the base batch
(broadcastable: ``[1, ...]`` means the same for every row).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookscope.adapters.base import Adapter
from hookscope.addresses import Address, Slot, slot_address

__all__ = ["Write", "Job", "Writer", "disjoint", "needs_logits", "slots_of", "touches_logits"]


@dataclass(frozen=True, eq=False)
class Write:
    """Write ``value`` into ``address`` at ``position`` (None: every position).

    ``value``: the whole slot's tensor for the base batch (``[batch, ...]``, or anything
    that broadcasts to it); None writes zeros."""

    address: Address
    position: int | None = None
    value: Tensor | None = None

    @property
    def slot(self) -> Slot:
        return self.address.slot


#: the writes of one patched copy, done together
Job = tuple[Write, ...]


def slots_of(job: Job) -> list[Slot]:
    return [w.slot for w in job]


def needs_logits(slots: Iterable[Slot]) -> bool:
    """Whether writing (or reading) ``slots`` needs the model's full output: the logits, or
    a ``module:`` site, which may lie anywhere (then no forward may stop early)."""
    return any(s.kind in ("logits", "module") for s in slots)


def touches_logits(jobs: Sequence[Job]) -> bool:
    """Whether a job writes a slot that needs the full output (:func:`needs_logits`)."""
    return needs_logits(w.slot for job in jobs for w in job)


def disjoint(job: Job, n_pos: int) -> bool:
    """Whether a job's writes touch separate values (one slot; no unit and position written
    twice), so that their changes to a block output add up. Conservative: a whole-slot
    write beside any other counts as overlapping."""
    if len(job) == 1:
        return True
    if len({w.slot for w in job}) > 1 or any(w.address.index is None for w in job):
        return False
    seen: dict[int, set[int | None]] = {}
    for w in job:
        at = seen.setdefault(w.address.index, set())  # type: ignore[arg-type]
        p = None if w.position is None else w.position % n_pos
        if p in at or (at and (p is None or None in at)):
            return False
        at.add(p)
    return True


class Writer:
    """Write arithmetic against the base run's activations ``base`` (one tensor per
    written slot, ``[batch, ...]``) on a model described by ``adapter``."""

    def __init__(self, adapter: Adapter, base: dict[Slot, Tensor]):
        self.adapter, self.base = adapter, base
        self._first: dict[tuple, list[int]] = {}
        self._diffs: dict[tuple, Tensor] = {}

    def full(self, write: Write) -> Tensor:
        """The written value as a tensor of the base activation's shape (a view)."""
        base = self.base[write.slot]
        if write.value is None:
            return base.new_zeros(()).expand(base.shape)
        return write.value.to(base.device).expand(base.shape)

    def index(self, address: Address, pos: int | None, ndim: int) -> list[Any]:
        """Index of ``address``'s unit (at ``pos``) in its slot's tensor of ``ndim`` axes."""
        slot = address.slot
        index: list[Any] = [slice(None)] * ndim
        if pos is not None:
            index[self.adapter.position_axis(slot)] = pos  # type: ignore[index]
        if address.index is not None:
            index[self.adapter.unit_axis(slot) % ndim] = self.adapter.unit_index(
                slot, address.index
            )
        return index

    def is_noop(self, job: Job) -> bool:
        """Whether every write of ``job`` puts back the base run's own values, bit for bit
        (so the copy would reproduce the base run)."""
        for w in job:
            base = self.base[w.slot]
            at = tuple(self.index(w.address, w.position, base.ndim))
            if not torch.equal(self.full(w)[at], base[at]):
                return False
        return True

    def first_change(self, job: Job) -> int:
        """The first position at which ``job`` writes a value the base run lacks (0 for
        slots without a position axis)."""
        first = None
        for w in job:
            axis = self.adapter.position_axis(w.slot)
            if axis is None:
                return 0
            if w.position is not None:
                at = w.position % self.base[w.slot].shape[axis]
            else:
                at = self._first_difference(w, axis)
            first = at if first is None else min(first, at)
        return first or 0

    def _first_difference(self, write: Write, axis: int) -> int:
        """The first position where the written unit (or slot) differs from the base run;
        the number of positions where it never does. Computed for every unit of a slot and
        value at once."""
        unit = write.address.index
        key = (write.slot, id(write.value), unit is not None)  # values live as long as jobs
        if key not in self._first:
            differs = self.full(write) != self.base[write.slot]
            n_pos = differs.shape[axis]
            if unit is None:
                at = differs.movedim(axis, 0).reshape(n_pos, 1, -1).any(-1)  # [pos, 1]
            else:
                u = self.adapter.unit_axis(write.slot) % differs.ndim
                d = differs.movedim((axis, u), (0, 1))
                at = d.reshape(n_pos, d.shape[1], -1).any(-1)  # [pos, units]
            # first True along positions (argmax returns the first maximum), else n_pos
            self._first[key] = torch.where(at.any(0), at.int().argmax(0), n_pos).tolist()
        unit_at = 0 if unit is None else self.adapter.unit_index(write.slot, unit)
        return self._first[key][unit_at]

    def tail_delta(self, jobs: Sequence[Job]) -> Tensor:
        """Per copy, how much its ``z``/``result`` writes change the block output:
        ``[len(jobs) * batch, pos, d_model]`` (the output projection is linear)."""
        rows = []
        for job in jobs:
            total: Tensor | None = None
            for w in job:
                change = self._head_change(w)  # [batch, pos, heads, d_model]
                if w.address.index is not None:
                    change = change[:, :, self.adapter.unit_index(w.slot, w.address.index)]
                else:
                    change = change.sum(2)
                if w.position is not None:
                    only = torch.zeros_like(change)
                    only[:, w.position] = change[:, w.position]
                    change = only
                total = change if total is None else total + change
            rows.append(total)
        return torch.stack(rows).flatten(0, 1)  # type: ignore[arg-type]

    def _head_change(self, write: Write) -> Tensor:
        """Each head's change to the block output, ``[batch, pos, heads, d_model]``."""
        key = (write.slot, id(write.value))
        if key not in self._diffs:
            diff = self.full(write) - self.base[write.slot]  # [batch, pos, heads, d]
            if write.slot.kind == "z":
                w_o, _ = self.adapter.w_o(write.slot.layer)  # type: ignore[attr-defined]
                diff = torch.einsum("bphk,hkd->bphd", diff, w_o.to(diff.device, diff.dtype))
            self._diffs[key] = diff
        return self._diffs[key]

    def hooks(self, copies: Sequence[tuple[int, Job]], batch: int, prefix: int = 0) -> list:
        """One hook per slot writing each copy's values into its rows.

        ``copies``: ``(copy index, job)`` pairs; copy ``i`` occupies rows ``i * batch ..
        (i + 1) * batch``. ``prefix``: the forward runs positions ``prefix..`` only (the
        activations' position axis starts there; values hold every position)."""
        by_slot: dict[Slot, list[tuple[int, Write]]] = {}
        for i, job in copies:
            for w in job:
                by_slot.setdefault(w.slot, []).append((i, w))
        return [
            (slot_address(slot), self._write_hook(slot, entries, batch, prefix))
            for slot, entries in by_slot.items()
        ]

    def _write_hook(self, slot: Slot, entries: list, batch: int, prefix: int):
        axis = self.adapter.position_axis(slot)

        def write(act: Tensor, _address: Address) -> Tensor:
            out = act.clone()
            for i, w in entries:
                value = self.full(w) if slot in self.base else _broadcast(w.value, act, batch)
                src = self.index(w.address, w.position, act.ndim)
                dst = list(src)
                if prefix and axis is not None:
                    if w.position is None:
                        src[axis] = slice(prefix, None)
                    else:
                        dst[axis] = w.position % value.shape[axis] - prefix
                dst[0] = slice(i * batch, (i + 1) * batch)
                out[tuple(dst)] = value[tuple(src)].to(out.device)
            return out

        return write


def _broadcast(value: Tensor | None, act: Tensor, batch: int) -> Tensor:
    """``value`` as one copy's tensor (``[batch, ...]`` of ``act``), when no base run was
    recorded for its slot (whole forwards of plain copies)."""
    shape = (batch, *act.shape[1:])
    if value is None:
        return act.new_zeros(()).expand(shape)
    return value.to(act.device).expand(shape)
