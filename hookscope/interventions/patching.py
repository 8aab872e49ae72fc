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

from hookscope.adapters.transformer import TransformerAdapter
from hookscope.addresses import Address, Slot, parse, slot_address
from hookscope.errors import InputError
from hookscope.interventions import _plan as plan
from hookscope.interventions._arguments import (
    check_baselines,
    check_choice,
    check_finite,
    check_model,
    check_positions,
    resolve_sites,
)
from hookscope.interventions._inputs import (
    copies_per_forward,
    fit_metric,
    paired_lengths,
    tokens_of,
)
from hookscope.interventions._plan import position_axis, unit_index
from hookscope.interventions._stacked import StackedRunner
from hookscope.interventions.metrics import Metric
from hookscope.interventions.result import PatchingResult, sweep_jobs, sweep_result
from hookscope.model import HookedModel
from hookscope.modes import EvalMode

__all__ = ["activation_patching"]

DIRECTIONS = ("denoise", "noise")


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
    for ``head.*.*``, ``[layer, pos]`` for ``resid_pre.*`` with ``positions="each"``;
    layers of different widths (a CNN's 16 and 32 channels) give a ``[layer, max width]``
    grid with NaN past each layer's width and the widths in ``result.widths``.

    The model runs in eval mode (no dropout) and every submodule's training flag is
    restored afterwards, also when the call raises. Bad arguments, NaN/Inf in float inputs
    and a metric that is NaN/Inf on the clean or corrupted baseline raise an
    :class:`~hookscope.errors.InputError` before the sweep.
    """
    check_model(model)
    with EvalMode(model.model):
        patcher = Patcher(
            model, clean, corrupted, metric, sites, direction, chunk_size, progress,
            positions=positions,
        )  # fmt: skip
        return patcher.sweep(positions)


def check_inputs(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    sites: Any,
    direction: str,
    positions: str | Sequence[int] = "all",
) -> tuple[Tensor, Tensor, list[Address], Tensor | None]:
    """Validated ``(clean tokens, corrupted tokens, addresses of sites, row lengths)`` of a
    sweep; row lengths only for right-padded prompts (see :mod:`._inputs`), else None.
    Everything is checked before any forward (positions' range excepted: it needs the
    activations, see :func:`resolve_positions`)."""
    check_model(model)
    check_choice(direction, "direction", DIRECTIONS)
    addresses = resolve_sites(model, sites)
    check_position_axis(model, addresses, positions)
    (clean_t, clean_len), (corrupted_t, corrupted_len) = (
        tokens_of(model, clean),
        tokens_of(model, corrupted),
    )
    check_finite(clean_t, "the clean inputs")
    check_finite(corrupted_t, "the corrupted inputs")
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
    adapter = model.adapter
    if positions != "all" and isinstance(adapter, TransformerAdapter) and adapter.spec.token_input:
        _position_list(positions, int(clean_t.shape[-1]), lengths)  # one position per token
    return clean_t, corrupted_t, addresses, lengths


def check_position_axis(
    model: HookedModel, addresses: list[Address], positions: str | Sequence[int]
) -> None:
    """``positions`` is ``"all"``, ``"each"`` or a list of ints, and a sweep over positions
    has sites with a position axis."""
    check_positions(positions)
    if positions != "all" and any(position_axis(model, a.slot) is None for a in addresses):
        raise InputError(
            f"{model.adapter.name} activations have no position axis; use positions='all'"
        )


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
    check_position_axis(model, addresses, positions)
    if positions == "all":
        return [None]
    address = addresses[0]
    axis = position_axis(model, address.slot)
    n_pos = int(acts[slot_address(address.slot)].shape[axis])  # type: ignore[index]
    return _position_list(positions, n_pos, lengths)


def _position_list(
    positions: str | Sequence[int], n_pos: int, lengths: Tensor | None
) -> list[int | None]:
    """``"each"`` or a list of positions (checked against ``n_pos``) as a list."""
    if positions == "each":
        return list(range(n_pos))
    pos_list: list[int | None] = [int(p) for p in positions]
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
        positions: str | Sequence[int] = "all",
    ):
        clean_t, corrupted_t, self.addresses, lengths = check_inputs(
            model, clean, corrupted, sites, direction, positions
        )
        metric = fit_metric(metric, lengths, model, clean_t)  # checked; padded rows per row
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
        check_baselines(
            {"clean": self.m_clean, "corrupted": self.m_corrupted},
            {"clean": "the clean inputs", "corrupted": "the corrupted inputs"},
        )
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
        pos_list = self.positions(positions)
        flat = torch.tensor(self.run(sweep_jobs(self.addresses, pos_list)), dtype=torch.float64)
        normalised = isinstance(self.metric, Metric)
        return sweep_result(
            self.sites, self.addresses, pos_list, self.fraction(flat) if normalised else flat,
            self.metric, "activation_patching", self.direction, normalised,
            {"clean": self.m_clean, "corrupted": self.m_corrupted},
            shortcuts_off=self.runner.shortcuts_off,
        )  # fmt: skip

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
                out[tuple(dst)] = value[tuple(src)].to(out.device)
            return out

        hooks.append((slot_address(slot), write))
    return hooks
