"""Activation patching: put one run's activation into another run, one site at a time.

``direction="denoise"`` runs the corrupted input and patches in clean activations;
``"noise"`` runs the clean input and patches in corrupted ones. Each (site, position) job
is one patched run; jobs are stacked along the batch (``chunk_size`` patched runs per
forward, each a copy of the input batch), so a sweep of N jobs costs about N / chunk_size
forwards instead of N. The per-job metric is computed on that job's rows only.

On transformers a forward skips everything a job's patch cannot change or the metric does
not read (:mod:`hookscope.interventions._stacked`): blocks below the patch are replayed from
the baseline run, each copy joins the batch at the block it patches, causal models skip the
positions before the first changed one, a head's ``z``/``result`` patch in a parallel block
(GPT-NeoX) is added to the block output instead of recomputing the block, and structured
metrics read only their own logits at their own position. Every shortcut is exact: results
equal one plain patched forward per job (``tests/interventions/test_stacked.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookscope.addresses import Address, Selection, Slot, parse, slot_address
from hookscope.errors import InputError, format_choices
from hookscope.interventions import _plan as plan
from hookscope.interventions._inputs import (
    copies_per_forward,
    fit_metric,
    paired_lengths,
    tokens_of,
)
from hookscope.interventions._plan import position_axis, unit_index
from hookscope.interventions._stacked import StackedRunner
from hookscope.interventions.metrics import Metric
from hookscope.interventions.result import PatchingResult
from hookscope.model import HookedModel

__all__ = ["activation_patching"]

DIRECTIONS = ("denoise", "noise")


def _sweep_dims(sites: Any, model: HookedModel) -> tuple[list[str], list[int]]:
    """Axis names and sizes of a sweep over ``sites`` (before any position axis)."""
    item = parse(sites) if isinstance(sites, (str, Address, Selection)) else None
    if isinstance(item, Selection):
        names, sizes = [], []
        layers = item.layers.values(model.n_layers, "layer")
        if len(layers) > 1 or item.layers.is_all:
            names.append("layer")
            sizes.append(len(layers))
        if item.units is not None:
            unit = "head" if item.kind == "head" else "neuron"
            n = len(item.expand(model._dims)) // max(1, len(layers))
            if n > 1 or item.units.is_all:
                names.append(unit)
                sizes.append(n)
        return names, sizes
    if isinstance(item, Address):
        return [], []
    return ["site"], [len(model.resolve(sites))]


def _metric_value(metric: Callable[[Tensor], Tensor] | Metric, output: Tensor) -> float:
    value = metric(output)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise InputError(
            f"metric must return a scalar tensor, got "
            f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
        )
    return float(value)


def activation_patching(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    metric: Metric | Callable[[Tensor], Tensor],
    sites: Any = "resid_pre.*",
    positions: str | Sequence[int] = "all",
    direction: str = "denoise",
    chunk_size: int | None = None,
    progress: bool = True,
) -> PatchingResult:
    """Patch each site (and position) from the source run into the base run; score each.

    ``sites``: an address, a selection (``"head.*.*"``, ``"resid_pre.*"``) or a list.
    ``positions``: ``"all"`` (every position at once), ``"each"`` (a sweep) or a list of
    positions. Structured metrics (:mod:`hookscope.interventions.metrics`) are normalised
    (corrupted 0, clean 1); a plain callable ``metric(output) -> scalar`` is reported raw.
    ``chunk_size``: patched runs stacked per forward (memory grows with it; default keeps
    a forward under ~4096 tokens). Scores are shaped by the sweep: e.g. ``[layer, head]``
    for ``head.*.*``, ``[layer, pos]`` for ``resid_pre.*`` with ``positions="each"``.
    """
    patcher = Patcher(model, clean, corrupted, metric, sites, direction, chunk_size, progress)
    return patcher.sweep(positions)


def check_inputs(
    model: HookedModel, clean: Any, corrupted: Any, sites: Any, direction: str
) -> tuple[Tensor, Tensor, list[Address], Tensor | None]:
    """Validated ``(clean tokens, corrupted tokens, addresses of sites, row lengths)`` of a
    sweep; row lengths only for right-padded prompts (see :mod:`._inputs`), else None."""
    if direction not in DIRECTIONS:
        raise InputError(
            f"direction must be one of {format_choices(DIRECTIONS)}, got {direction!r}"
        )
    (clean_t, clean_len), (corrupted_t, corrupted_len) = (
        tokens_of(model, clean),
        tokens_of(model, corrupted),
    )
    if clean_t.shape != corrupted_t.shape:
        padded = clean_len is not None or corrupted_len is not None
        if padded and clean_t.shape[0] == corrupted_t.shape[0]:  # name the rows
            paired_lengths(model, clean_t, clean_len, corrupted_len, "the corrupted inputs",
                           other_ids=corrupted_t, this="the clean")  # fmt: skip
        raise InputError(
            f"clean and corrupted inputs must have the same shape, got {tuple(clean_t.shape)} "
            f"and {tuple(corrupted_t.shape)}"
        )
    lengths = paired_lengths(
        model, clean_t, clean_len, corrupted_len, "the corrupted inputs", this="the clean"
    )
    addresses = model.resolve(sites)
    if not addresses:
        raise InputError(f"sites {sites!r} selects no address")
    return clean_t, corrupted_t, addresses, lengths


def resolve_positions(
    model: HookedModel,
    addresses: list[Address],
    positions: str | Sequence[int],
    acts: dict[str, Tensor],
    lengths: Tensor | None = None,
) -> list[int | None]:
    """``positions`` ("all", "each" or a list) as a list (``[None]``: all at once); the
    number of positions is read from the activations ``acts`` of ``addresses``' slots.
    With right-padded rows of ``lengths`` tokens, positions are columns counted from the
    start (a column past a row's end patches its padding, which changes nothing there), and
    negative ones are refused: they would count from the padded width, not from each row's
    end as a metric's position does."""
    if positions == "all":
        return [None]
    if isinstance(positions, str) and positions != "each":
        raise InputError(f"positions must be 'all', 'each' or a list of ints, got {positions!r}")
    axes = [(a, position_axis(model, a.slot)) for a in addresses]
    if any(axis is None for _, axis in axes):
        raise InputError(
            f"{model.adapter.name} activations have no position axis; use positions='all'"
        )
    address, axis = axes[0]
    n_pos = int(acts[slot_address(address.slot)].shape[axis])  # type: ignore[index]
    if positions == "each":
        return list(range(n_pos))
    try:
        pos_list: list[int | None] = [int(p) for p in positions]
    except (TypeError, ValueError):
        raise InputError(
            f"positions must be 'all', 'each' or a list of ints, got {positions!r}"
        ) from None
    bad = [p for p in pos_list if not -n_pos <= p < n_pos]  # type: ignore[operator]
    if bad:
        raise InputError(f"positions {bad} out of range for inputs of {n_pos} positions")
    negative = [p for p in pos_list if p < 0]  # type: ignore[operator]
    if negative and lengths is not None:
        raise InputError(
            f"positions {negative} count from the padded width ({n_pos}), but these prompts are "
            f"{lengths.tolist()} tokens long; give sweep positions from the start (0..{n_pos - 1})"
        )
    return pos_list


def metric_name(metric: Any) -> str:
    return getattr(metric, "name", getattr(metric, "__name__", "metric"))


class Patcher:
    """One patching setup: validated inputs, the clean and corrupted baselines (one forward)
    and the source activations of ``sites``; :meth:`run` scores any list of jobs on it."""

    def __init__(
        self,
        model: HookedModel,
        clean: Any,
        corrupted: Any,
        metric: Metric | Callable[[Tensor], Tensor],
        sites: Any,
        direction: str = "denoise",
        chunk_size: int | None = None,
        progress: bool = True,
        require_gap: bool | None = None,
    ):
        clean_t, corrupted_t, self.addresses, lengths = check_inputs(
            model, clean, corrupted, sites, direction
        )
        metric = fit_metric(metric, lengths)  # padded rows: read at each row's own tokens
        self.lengths = lengths
        self.model, self.metric, self.direction, self.progress = model, metric, direction, progress
        self.sites = sites
        self.clean_t, self.corrupted_t = clean_t, corrupted_t
        slot_names = list(dict.fromkeys(slot_address(a.slot) for a in self.addresses))
        base_t = corrupted_t if direction == "denoise" else clean_t
        self.chunk_size = copies_per_forward(base_t, chunk_size)  # (checked before any run)
        self.runner = StackedRunner(model, base_t, metric)
        self.m_clean, self.m_corrupted, clean_acts, corrupted_acts = _baseline_runs(
            model, self.runner, clean_t, corrupted_t, slot_names, metric, direction
        )
        self.source = clean_acts if direction == "denoise" else corrupted_acts
        self.base_acts = corrupted_acts if direction == "denoise" else clean_acts
        if (isinstance(metric, Metric) if require_gap is None else require_gap) and (
            self.m_clean == self.m_corrupted
        ):
            raise InputError(
                f"the metric is equal on clean and corrupted runs ({self.m_clean:.6g}); normalised "
                "scores are undefined — use inputs that differ in the metric, or a plain callable "
                "metric"
            )
        self.n_pos = clean_t.shape[1] if clean_t.ndim >= 2 else 0

    def sweep(self, positions: str | Sequence[int]) -> PatchingResult:
        """:func:`activation_patching`'s result: every site of this patcher at ``positions``."""
        model, metric, direction = self.model, self.metric, self.direction
        names, sizes = _sweep_dims(self.sites, model)
        pos_list = self.positions(positions)
        jobs = [(a, p) for a in self.addresses for p in pos_list]
        flat = torch.tensor(self.run(jobs), dtype=torch.float64)
        normalised = isinstance(metric, Metric)
        if normalised:
            flat = self.fraction(flat)
        shape = sizes + ([len(pos_list)] if pos_list != [None] else [])
        dims = tuple(names + (["pos"] if pos_list != [None] else []))
        scores = flat.reshape(shape) if shape else flat.reshape(())
        return PatchingResult(
            scores=scores,
            dims=dims,
            jobs=jobs,
            flat=flat,
            direction=direction,
            metric=metric_name(metric),
            normalised=normalised,
            baselines={"clean": self.m_clean, "corrupted": self.m_corrupted},
            higher_is_better=getattr(metric, "higher_is_better", True),
        )

    def positions(self, positions: str | Sequence[int]) -> list[int | None]:
        """The position list of a sweep (``[None]`` for all positions at once)."""
        return resolve_positions(self.model, self.addresses, positions, self.source, self.lengths)

    def run(self, jobs: list) -> list[float]:
        """The raw metric of each job (an ``(address, position)`` or a list of them).

        A job whose source values equal the base run's values bit for bit (e.g. a residual
        position before the first corrupted token) would reproduce the base run exactly, so
        it is not run: its metric is the base run's.
        """
        todo = [i for i, job in enumerate(jobs) if not self._is_noop(job)]
        base = self.m_corrupted if self.direction == "denoise" else self.m_clean
        raw = [base] * len(jobs)
        values = _run_jobs(
            self.model, self.runner, [jobs[i] for i in todo], self.source, self.base_acts,
            self.chunk_size, self.progress,
        )  # fmt: skip
        for i, value in zip(todo, values, strict=True):
            raw[i] = value
        return raw

    def _is_noop(self, job: Any) -> bool:
        for address, pos in job if isinstance(job, list) else [job]:
            name = slot_address(address.slot)
            source, base = self.source[name], self.base_acts[name]
            index = tuple(unit_index(self.model, address, pos, source.ndim))
            if not torch.equal(source[index], base[index]):
                return False
        return True

    def fraction(self, raw: Tensor) -> Tensor:
        """Raw metric values as (m - m_corrupted) / (m_clean - m_corrupted)."""
        return (raw - self.m_corrupted) / (self.m_clean - self.m_corrupted)


def _baseline_runs(
    model: HookedModel,
    runner: StackedRunner,
    clean_t: Tensor,
    corrupted_t: Tensor,
    slot_names: list[str],
    metric: Metric | Callable[[Tensor], Tensor],
    direction: str,
) -> tuple[float, float, dict[str, Tensor], dict[str, Tensor]]:
    """Clean and corrupted runs as one forward of both batches: their metrics and the
    activations of ``slot_names`` (the runner records the base half's block outputs)."""
    batch = clean_t.shape[0]
    uses_logits = any(parse(name).slot.kind in ("logits", "module") for name in slot_names)
    rows = slice(batch, None) if direction == "denoise" else slice(0, batch)
    out, cache = runner.baseline(torch.cat([clean_t, corrupted_t]), rows, slot_names, uses_logits)
    m_clean, m_corrupted = runner.values(out, 2, hidden=runner.readout(uses_logits))
    clean_acts = {name: cache[name][:batch] for name in slot_names}
    corrupted_acts = {name: cache[name][batch:] for name in slot_names}
    return m_clean, m_corrupted, clean_acts, corrupted_acts


def _run_jobs(
    model: HookedModel,
    runner: StackedRunner,
    jobs: list,
    source: dict[str, Tensor],
    base: dict[str, Tensor],
    k: int,
    progress: bool,
) -> list[float]:
    """The metric of each job's patched copy of the base batch (a job is one ``(address,
    position)`` or a list of them), at most ``k`` copies per forward."""
    raw = [0.0] * len(jobs)
    chunks = plan.chunks(model, jobs, k, runner, source, base)
    bar = tqdm(total=len(jobs), desc="patching", disable=not progress or len(chunks) < 2)
    with bar:
        for prefix, idx in chunks:
            part = [jobs[i] for i in idx]
            pairs = [pair for job in part for pair in plan.pairs(job)]
            groups: list[tuple[int | None, int, Tensor | None]] = []
            hooked: list[tuple[int, Any]] = []
            i = 0
            for (start, tail), members in plan.groups(runner, part):
                if tail is not None:
                    delta = plan.tail_delta(model, members, source, base, runner.batch)
                    groups.append((tail + 1, len(members), delta))
                else:
                    groups.append((start, len(members), None))
                    hooked += [(i + j, job) for j, job in enumerate(members)]
                i += len(members)
            hooks = _patch_hooks(model, hooked, source, runner.batch, prefix)
            uses_logits = any(a.slot.kind in ("logits", "module") for a, _ in pairs)
            slots = [a.slot for a, _ in pairs]
            values = runner.run(hooks, groups, uses_logits, slots=slots, prefix=prefix)
            for i, value in zip(idx, values, strict=True):
                raw[i] = value
            bar.update(len(idx))
    return raw


def _patch_hooks(model: HookedModel, part: list, source, batch: int, prefix: int = 0):
    """One hook per slot: write the source value of each job's unit/position into its rows.

    ``part``: ``(copy index, job)`` pairs; a job is one ``(address, position)`` or a list of
    them (patched together in its copy).
    ``prefix``: the forward runs positions ``prefix..`` only (the activations' position
    axis starts there; ``source`` holds every position).
    """
    by_slot: dict[Slot, list[tuple[int, Address, int | None]]] = {}
    for i, job in part:
        for address, pos in plan.pairs(job):
            by_slot.setdefault(address.slot, []).append((i, address, pos))
    hooks = []
    for slot, entries in by_slot.items():
        value = source[slot_address(slot)]  # [batch, ...]
        axis = position_axis(model, slot)

        def write(act: Tensor, _address: Address, entries=entries, value=value, axis=axis):
            out = act.clone()
            for i, address, pos in entries:
                src = unit_index(model, address, pos, act.ndim)
                dst = list(src)
                if prefix and axis is not None:
                    if pos is None:
                        src[axis] = slice(prefix, None)
                    else:
                        dst[axis] = pos % value.shape[axis] - prefix
                dst[0] = slice(i * batch, (i + 1) * batch)
                out[tuple(dst)] = value[tuple(src)]
            return out

        hooks.append((slot_address(slot), write))
    return hooks
