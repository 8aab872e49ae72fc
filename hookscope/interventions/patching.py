"""Activation patching: put one run's activation into another run, one site at a time.

``direction="denoise"`` runs the corrupted input and patches in clean activations;
``"noise"`` runs the clean input and patches in corrupted ones. Each (site, position) job
is one patched run; jobs are stacked along the batch (``chunk_size`` patched runs per
forward, each a copy of the input batch), so a sweep of N jobs costs about N / chunk_size
forwards instead of N. The per-job metric is computed on that job's rows only.

On transformers a forward skips everything a job's patch cannot change or the metric does
not read (:mod:`hookscope.interventions.engine`): blocks below the patch are replayed from
the baseline run, each copy joins the batch at the block it patches, causal models skip the
positions before the first changed one, a head's ``z``/``result`` patch in a parallel block
(GPT-NeoX) is added to the block output instead of recomputing the block, and structured
metrics read only their own logits at their own position. Every shortcut is exact: results
equal one plain patched forward per job (``tests/test_contract.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from hookscope._choices import DIRECTIONS
from hookscope.addresses import Address, Slot
from hookscope.errors import InputError
from hookscope.inputs import paired_lengths, tokens_of
from hookscope.interventions._arguments import (
    check_baselines,
    check_choice,
    check_finite,
    check_gap,
    check_model,
    check_positions,
    resolve_sites,
)
from hookscope.interventions._inputs import copies_per_forward, fit_metric
from hookscope.interventions.engine import Engine, Write, needs_logits
from hookscope.interventions.metrics import Metric
from hookscope.interventions.result import PatchingResult, sweep_jobs, sweep_result
from hookscope.model import HookedModel
from hookscope.modes import EvalMode

__all__ = ["activation_patching"]


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
    a forward under ~4096 tokens; where rows read at different positions run in groups, a
    group of fewer rows stacks proportionally more runs). Scores are shaped by the sweep: e.g. ``[layer, head]``
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
    if positions != "all" and adapter.token_input:
        _position_list(positions, int(clean_t.shape[-1]), lengths)  # one position per token
    return clean_t, corrupted_t, addresses, lengths


def check_position_axis(
    model: HookedModel, addresses: list[Address], positions: str | Sequence[int]
) -> None:
    """``positions`` is ``"all"``, ``"each"`` or a list of ints, and a sweep over positions
    has sites with a position axis."""
    check_positions(positions)
    if positions != "all" and any(model.adapter.position_axis(a.slot) is None for a in addresses):
        raise InputError(
            f"{model.adapter.name} activations have no position axis; use positions='all'"
        )


def resolve_positions(
    model: HookedModel,
    addresses: list[Address],
    positions: str | Sequence[int],
    acts: dict[Slot, Tensor],
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
    axis = model.adapter.position_axis(address.slot)
    n_pos = int(acts[address.slot].shape[axis])  # type: ignore[index]
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
        base_t = corrupted_t if direction == "denoise" else clean_t
        self.chunk_size = copies_per_forward(base_t, chunk_size)  # (checked before any run)
        self.engine = Engine(model, base_t, metric)
        self.m_clean, self.m_corrupted, self.source = _baseline_runs(
            self.engine, clean_t, corrupted_t, [a.slot for a in self.addresses], direction
        )
        check_baselines(
            {"clean": self.m_clean, "corrupted": self.m_corrupted},
            {"clean": "the clean inputs", "corrupted": "the corrupted inputs"},
        )
        if isinstance(metric, Metric) if require_gap is None else require_gap:
            check_gap(self.m_clean, self.m_corrupted)
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
            shortcuts_off=self.engine.shortcuts_off,
        )  # fmt: skip

    def positions(self, positions: str | Sequence[int]) -> list[int | None]:
        """The position list of a sweep (``[None]`` for all positions at once)."""
        return resolve_positions(self.model, self.addresses, positions, self.source, self.lengths)

    def run(self, jobs: list) -> list[float]:
        """The raw metric of each job (an ``(address, position)`` or a list of them, patched
        together). A job whose source values equal the base run's bit for bit (e.g. a
        residual position before the first corrupted token) is not run: its metric is the
        base run's."""
        base = self.m_corrupted if self.direction == "denoise" else self.m_clean
        writes = [
            tuple(Write(a, pos, self.source[a.slot]) for a, pos in _pairs(job)) for job in jobs
        ]
        return self.engine.run(writes, self.chunk_size, base, self.progress, "patching")

    def fraction(self, raw: Tensor) -> Tensor:
        """Raw metric values as (m - m_corrupted) / (m_clean - m_corrupted)."""
        return (raw - self.m_corrupted) / (self.m_clean - self.m_corrupted)


def _pairs(job: Any) -> list[tuple[Address, int | None]]:
    return job if isinstance(job, list) else [job]


def _baseline_runs(
    engine: Engine, clean_t: Tensor, corrupted_t: Tensor, slots: list[Slot], direction: str
) -> tuple[float, float, dict[Slot, Tensor]]:
    """Clean and corrupted runs as one forward of both batches: their metrics and the source
    run's activations of ``slots`` (the engine records the base half)."""
    batch = clean_t.shape[0]
    uses_logits = needs_logits(slots)
    rows = slice(batch, None) if direction == "denoise" else slice(0, batch)
    (m_clean, m_corrupted), acts = engine.baseline(
        torch.cat([clean_t, corrupted_t]), rows, slots, uses_logits
    )
    source = slice(0, batch) if direction == "denoise" else slice(batch, None)
    return m_clean, m_corrupted, {slot: act[source] for slot, act in acts.items()}
