"""The :class:`Engine`: one base batch and metric, its recorded baseline, and
:meth:`Engine.run` scoring any list of jobs (plan, then execute each forward)."""

from __future__ import annotations

import copy as _copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookscope.addresses import Slot, slot_address
from hookscope.errors import InputError
from hookscope.interventions.engine import baseline as _baseline
from hookscope.interventions.engine.execute import read_position_only, run_forward
from hookscope.interventions.engine.jobs import Job, Writer, touches_logits
from hookscope.interventions.engine.plan import Copy, Facts, Forward, plan
from hookscope.interventions.engine.rows import (
    copies_for,
    restrict_jobs,
    restrict_recorded,
    restrict_value,
    row_groups,
)
from hookscope.interventions.engine.structure import Structure
from hookscope.interventions.metrics import Metric, Unembed
from hookscope.model import HookedModel

__all__ = ["Engine", "metric_value"]


def metric_value(metric: Callable[[Tensor], Any], output: Any) -> float:
    """``metric(output)`` as a float; InputError unless it is a scalar tensor."""
    value = metric(output)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise InputError(
            f"metric must return a scalar tensor, got "
            f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
        )
    return float(value)


class Engine:
    """Scores jobs (tuples of :class:`~.jobs.Write`) on copies of ``base`` with ``metric``.

    :meth:`baseline` runs first (one forward, recording what the shortcuts replay); then
    :meth:`run` plans the jobs into forwards (:func:`~.plan.plan`) and runs each
    (:meth:`execute`). Every shortcut is exact: each job's value equals one plain forward
    of the base batch with that job's writes."""

    def __init__(self, model: HookedModel, base: Tensor, metric: Metric | Callable):
        self.model, self.base, self.metric = model, base, metric
        self.batch = int(base.shape[0])
        self.structure = Structure.of(model)
        head = self.structure.unembed
        #: the metric reads the unembedding's input (None: full logits)
        self.unembed = Unembed(head) if isinstance(metric, Metric) and head is not None else None
        self.kv_keyword: str | None = None  # the keyword the model's key/value cache takes
        self.recorded = _baseline.Recorded()
        self.base_acts: dict[Slot, Tensor] = {}  # written slots on the base rows
        self.read_position = self._read_position()

    @property
    def shortcuts_off(self) -> dict[str, str]:
        return self.structure.shortcuts_off

    def _read_position(self) -> Tensor | None:
        """The position each base row's metric reads (absolute), if one per row."""
        position = getattr(self.metric, "single_position", None)
        if self.structure.blocks is None or self.base.ndim != 2:
            return None
        n_pos = self.base.shape[1]
        if isinstance(position, int) and -n_pos <= position < n_pos:
            return torch.full((self.batch,), position % n_pos, device=self.base.device)
        if isinstance(position, Tensor) and position.shape == (self.batch,):
            if bool(((position >= -n_pos) & (position < n_pos)).all()):
                return (position % n_pos).to(self.base.device)
        return None

    def readout(self, uses_logits: bool = False) -> bool:
        """Whether forwards read the metric from the unembedding's input."""
        return self.unembed is not None and not uses_logits

    def read_position_only(self, slots: Sequence[Slot], prefix: int = 0) -> list:
        return read_position_only(self, slots, prefix)

    def baseline(
        self, inputs: Tensor, rows: slice, slots: Sequence[Slot], uses_logits: bool = False
    ) -> tuple[list[float], dict[Slot, Tensor]]:
        """One forward of ``inputs`` (the base batch is ``inputs[rows]``): the metric of
        each ``len(inputs) // batch`` row block and the activations of ``slots``."""
        slots = list(dict.fromkeys(slots))
        out, cache = _baseline.record(self, inputs, rows, slots, uses_logits)
        acts = {slot: cache[slot_address(slot)] for slot in slots}
        self.base_acts = {slot: act[rows] for slot, act in acts.items()}
        n = inputs.shape[0] // self.batch
        return self.values(out, n, hidden=self.readout(uses_logits)), acts

    def facts(self) -> Facts:
        rec = self.recorded
        recorded = rec.outputs is not None and rec.inputs is not None
        return Facts(
            n_blocks=len(rec.outputs) if recorded else None,  # type: ignore[arg-type]
            n_pos=int(self.base.shape[1]) if self.base.ndim == 2 else 1,
            linear_head_tail=recorded and self.structure.linear_head_tail,
            skip_prefix=(
                recorded and rec.prefix_kv is not None and rec.hidden is not None and self.readout()
            ),
        )

    def shortcuts(self) -> set[str]:
        """The shortcuts this engine's forwards take (after :meth:`baseline`): ``replay``
        (blocks below a copy), ``readout`` (only the metric's logits), ``prefix`` (positions
        before the first change), ``linear_tail`` (head writes added after their block),
        ``read_position`` (the last block's MLP at the read position only), ``onednn``
        (oneDNN matrix products and gated MLPs) and ``row_groups`` (rows of different
        read positions run in groups, each to its last read position, where that saves
        work for the jobs at hand). What cannot run on a model, with why:
        :attr:`shortcuts_off`."""
        facts = self.facts()
        on = {
            "replay": facts.n_blocks is not None,
            "readout": self.readout(),
            "prefix": facts.skip_prefix,
            "linear_tail": facts.linear_head_tail,
            "read_position": self.read_position is not None and bool(self.read_position_only([])),
            "onednn": bool(self.structure.fast),
            "row_groups": self._trims_rows() and len(set(self.read_position.tolist())) > 1,  # type: ignore[union-attr]
        }
        return {name for name, taken in on.items() if taken}

    def plan(self, jobs: Sequence[Job], k: int, writer: Writer | None = None) -> list[Forward]:
        """The forwards that score ``jobs``, at most ``k`` copies each (``writer``: given,
        jobs that write back the base run's values are left out)."""
        facts = self.facts()
        if writer is None:
            writer, live = Writer(self.model.adapter, self.base_acts), range(len(jobs))
        else:
            live = [i for i, job in enumerate(jobs) if not writer.is_noop(job)]
        todo = [jobs[i] for i in live]
        firsts = [writer.first_change(job) for job in todo] if facts.skip_prefix else None
        forwards = plan(todo, facts, k, firsts)
        if isinstance(live, range):
            return forwards
        return [
            Forward(f.prefix, tuple(Copy(tuple(live[i] for i in c.jobs), c.start, c.tail)
                                    for c in f.copies))
            for f in forwards
        ]  # fmt: skip

    def run(
        self, jobs: Sequence[Job], k: int, base_value: float | None = None,
        progress: bool = False, desc: str = "patching",
    ) -> list[float]:  # fmt: skip
        """The metric of each job's copy, ``k`` copies per forward. With ``base_value``
        (the base run's metric), a job that writes back the base run's own values bit for
        bit is not run: its value is ``base_value``. Rows of different read positions run
        in groups (:func:`~.rows.row_groups`), each to its own last read position; a job's
        value is then the row-weighted mean of its groups' values."""
        writer = Writer(self.model.adapter, self.base_acts)
        found = [base_value] * len(jobs)
        todo = list(range(len(jobs)))
        if base_value is not None:
            todo = [i for i in todo if not writer.is_noop(jobs[i])]
        part = [jobs[i] for i in todo]
        runs = [self._group(part, k, writer, *group) for group in self._row_groups(part, k)]
        n_forwards = sum(len(forwards) for _, _, _, forwards, _ in runs)
        total = sum(len(f.jobs) for *_, forwards, _ in runs for f in forwards)
        values = [0.0] * len(part)
        with tqdm(total=total, desc=desc, disable=not progress or n_forwards < 2) as bar:
            for engine, share, group_jobs, forwards, group_writer in runs:
                for i, value in enumerate(engine._score(group_jobs, forwards, group_writer, bar)):
                    values[i] += share * value
        for i, value in zip(todo, values, strict=True):
            found[i] = value
        return found  # type: ignore[return-value]

    def _row_groups(self, jobs: Sequence[Job], k: int) -> list[tuple[Tensor | None, int]]:
        """``(rows, length)`` groups the jobs run in (``[(None, n_pos)]``: all rows)."""
        whole: list[tuple[Tensor | None, int]] = [(None, int(self.base.shape[-1]))]
        read = self.read_position
        if read is None or bool((read == read[0]).all()):
            return whole  # (one read position: nothing to trim)
        if not self._trims_rows() or touches_logits(jobs):
            return whole
        slots = {w.slot for job in jobs for w in job}
        if any(s.kind == "pattern" or s not in self.base_acts for s in slots):
            return whole  # (a pattern has a second position axis, the keys')
        groups = row_groups(read, len(jobs), k)
        return whole if len(groups) == 1 else groups  # type: ignore[return-value]

    def _trims_rows(self) -> bool:
        """Whether rows may stop at their read position: a causal model whose metric reads
        one position per row from the unembedding's input, recorded block by block."""
        read, rec = self.read_position, self.recorded
        return (
            read is not None
            and self.model.adapter.causal
            and self.readout()
            and rec.hidden is not None
            and self.facts().n_blocks is not None
            and self.metric.rows(torch.arange(self.batch), read) is not None  # type: ignore[union-attr]
        )

    def _group(
        self, jobs: Sequence[Job], k: int, writer: Writer, index: Tensor | None, length: int
    ) -> tuple[Engine, float, list[Job], list[Forward], Writer]:
        """What one row group runs: ``(engine, share of the rows, jobs, forwards, writer)``."""
        if index is None:
            return self, 1.0, list(jobs), self.plan(jobs, k), writer
        n_pos = int(self.base.shape[-1])
        group = self.restricted(index, length)
        adapter = self.model.adapter
        group_jobs = restrict_jobs(jobs, writer.full, adapter, index, length, n_pos)
        group_writer = Writer(adapter, group.base_acts)
        k_group = copies_for(k, self.batch, len(index), len(jobs))
        forwards = group.plan(group_jobs, k_group, group_writer)
        return group, len(index) / self.batch, group_jobs, forwards, group_writer

    def restricted(self, index: Tensor, length: int) -> Engine:
        """This engine on base rows ``index`` and positions ``..length`` (recorded
        baseline, written activations, metric and read positions cut to them)."""
        read = self.read_position[index]  # type: ignore[index]
        group = _copy.copy(self)
        group.base, group.batch = self.base[index, :length], len(index)
        group.read_position = read
        group.metric = self.metric.rows(index, read)  # type: ignore[union-attr, assignment]
        group.recorded = restrict_recorded(self.recorded, index, length)
        group.base_acts = {
            slot: restrict_value(act, self.model.adapter.position_axis(slot), index, length)
            for slot, act in self.base_acts.items()
        }
        return group

    def _score(
        self, jobs: Sequence[Job], forwards: Sequence[Forward], writer: Writer, bar: Any
    ) -> list[float]:
        """Each job's metric: the planned ``forwards``; jobs they leave out (writing back
        the base run's values) have the base run's."""
        found: list[float | None] = [None] * len(jobs)
        for forward in forwards:
            for i, value in zip(forward.jobs, self.execute(forward, jobs, writer), strict=True):
                found[i] = value
            bar.update(len(forward.jobs))
        if None in found:
            base = self.values(self.recorded.hidden, 1, hidden=True)[0]  # type: ignore[arg-type]
            found = [base if v is None else v for v in found]
        return found  # type: ignore[return-value]

    def execute(self, forward: Forward, jobs: Sequence[Job], writer: Writer) -> list[float]:
        """The metric of each copy of ``forward`` (of ``jobs``), in ``forward.jobs`` order."""
        groups, hooked, i = [], [], 0
        for copy in forward.copies:
            members = [jobs[j] for j in copy.jobs]
            if copy.tail is not None:
                groups.append((copy.tail + 1, len(members), writer.tail_delta(members)))
            else:
                groups.append((copy.start, len(members), None))
                hooked += [(i + j, job) for j, job in enumerate(members)]
            i += len(members)
        hooks = writer.hooks(hooked, self.batch, forward.prefix)
        run = [jobs[j] for j in forward.jobs]
        uses_logits = touches_logits(run)
        slots = [w.slot for job in run for w in job]
        out = run_forward(self, forward, hooks, groups, uses_logits, slots)
        return self.values(out, len(run), hidden=self.readout(uses_logits))

    @torch.no_grad()
    def values(self, out: Tensor, n: int, hidden: bool) -> list[float]:
        """The metric of each of the ``n`` row blocks of ``out`` (``hidden``: the
        unembedding's input, read through :meth:`Metric.per_example_hidden`)."""
        b = out.shape[0] // n
        if hidden and n > 1 and (stacked := self.metric.repeated(n, b)) is not None:  # type: ignore[union-attr]
            per_row = stacked.per_example_hidden(out, self.unembed)  # type: ignore[arg-type]
            return per_row.view(n, b).mean(1).tolist()
        values = []
        for i in range(n):
            rows = out[i * b : (i + 1) * b]
            if hidden:
                rows = self.metric.per_example_hidden(rows, self.unembed)  # type: ignore[union-attr]
                values.append(metric_value(lambda r: r.mean(), rows))
            else:
                values.append(metric_value(self.metric, rows))
        return values
