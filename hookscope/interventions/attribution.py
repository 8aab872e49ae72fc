"""Attribution patching: activation patching estimated to first order, for every site at once.

Patching a site from the source run into the base run changes the metric by about
``grad_base · (source_act - base_act)`` (a first-order Taylor expansion around the base run),
so one forward of the source input, one forward and one backward of the base input give
an estimate for every (site, position) job of a sweep, however many there are
(Nanda 2023, "Attribution patching"). ``direction="denoise"``: the base is the corrupted
run and the source the clean one; ``"noise"``: the other way round. The estimate is exact
when the metric is linear in the patched activation, and its error shrinks with the square
of the activation difference; it can be poor where the model is far from linear in between
(a saturated softmax or LayerNorm), so confirm the top sites with
:func:`~hookscope.interventions.activation_patching`.

Each unit's estimate sums the product over its slice of the slot (one head, one neuron or
the whole tensor), over the positions (all, or one per job) and over the batch; the metric
is a batch mean, so its gradient already carries the ``1 / batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookscope.addresses import Slot, slot_address
from hookscope.errors import InputError
from hookscope.interventions._arguments import check_baselines, check_gap, check_model
from hookscope.interventions._forward_edits import Probe, forward_replaced
from hookscope.interventions._inputs import fit_metric
from hookscope.interventions.engine import Engine, metric_value, needs_logits
from hookscope.interventions.metrics import Metric
from hookscope.interventions.patching import check_inputs, resolve_positions
from hookscope.interventions.result import PatchingResult, sweep_result
from hookscope.model import HookedModel
from hookscope.modes import EvalMode
from hookscope.scope import Scope

__all__ = ["attribution_patching"]


def attribution_patching(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    metric: Metric | Callable[[Tensor], Tensor],
    sites: Any = "resid_pre.*",
    positions: str | Sequence[int] = "all",
    direction: str = "denoise",
    progress: bool = True,
) -> PatchingResult:
    """Estimate :func:`~hookscope.interventions.activation_patching` to first order.

    Same arguments, scores, shapes and normalisation as ``activation_patching`` (without
    ``chunk_size``): ``sites`` an address, selection or list; ``positions`` ``"all"``,
    ``"each"`` or a list. Each job's patched metric is estimated as
    ``m_base + sum(grad_base * (source_act - base_act))``; a structured :class:`Metric`
    reports ``(estimate - m_corrupted) / (m_clean - m_corrupted)``, a plain callable the raw
    estimate. Costs two forwards and one backward for any number of sites; no parameter
    ``.grad`` is touched.

    The model runs in eval mode (gradients still flow; dropout is off) and every
    submodule's training flag is restored afterwards, also when the call raises. Bad
    arguments, NaN/Inf in float inputs and a metric that is NaN/Inf on the clean or
    corrupted run raise an :class:`~hookscope.errors.InputError` before any estimate.

    >>> res = iv.attribution_patching(model, clean, corrupted, iv.logit_diff(a, b), "neuron.*.*")
    >>> res.top(20)   # candidates; check them with activation_patching
    """
    check_model(model)
    with EvalMode(model.model):
        return _attribution_patching(
            model, clean, corrupted, metric, sites, positions, direction, progress
        )


def _attribution_patching(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    metric: Metric | Callable[[Tensor], Tensor],
    sites: Any,
    positions: str | Sequence[int],
    direction: str,
    progress: bool,
) -> PatchingResult:
    """:func:`attribution_patching` (in eval mode)."""
    clean_t, corrupted_t, addresses, lengths = check_inputs(
        model, clean, corrupted, sites, direction, positions
    )
    metric = fit_metric(metric, lengths, model, clean_t)  # checked; padded rows per row
    slot_names = list(dict.fromkeys(slot_address(a.slot) for a in addresses))
    base_t, source_t = (corrupted_t, clean_t) if direction == "denoise" else (clean_t, corrupted_t)

    unembed = Engine(model, base_t, metric).unembed
    if needs_logits(a.slot for a in addresses):
        unembed = None  # the logits themselves are a site: keep the full unembedding
    m_source, source_cache, unembed = _source_run(model, source_t, slot_names, metric, unembed)
    base_cache = _base_run(model, base_t, slot_names, metric, unembed)
    m_base = float(base_cache.backward_value)  # type: ignore[arg-type]
    m_clean, m_corrupted = (m_source, m_base) if direction == "denoise" else (m_base, m_source)
    check_baselines(
        {"clean": m_clean, "corrupted": m_corrupted},
        {"clean": "the clean inputs", "corrupted": "the corrupted inputs"},
    )
    normalised = isinstance(metric, Metric)
    if normalised:
        check_gap(m_clean, m_corrupted)

    acts = {a.slot: source_cache[slot_address(a.slot)] for a in addresses}
    pos_list = resolve_positions(model, addresses, positions, acts, lengths)

    deltas = _deltas(model, addresses, pos_list, base_cache, source_cache, progress)
    flat = m_base + deltas.reshape(-1)
    if normalised:
        flat = (flat - m_corrupted) / (m_clean - m_corrupted)
    baselines = {"clean": m_clean, "corrupted": m_corrupted}
    return sweep_result(
        sites, addresses, pos_list, flat, metric, "attribution_patching", direction, normalised,
        baselines,
    )  # fmt: skip


def _source_run(model: HookedModel, source_t: Tensor, slot_names: list, metric, unembed):
    """``(metric, cache, unembed)`` of the source run. It computes a few logit columns only;
    if the model returns exactly those (nothing follows the unembedding), the metric is
    read from the unembedding's input, else (soft-capped logits) the run is repeated with
    full logits and ``unembed`` becomes None."""
    probe = Probe(unembed.module) if unembed is not None else None
    with forward_replaced({probe.module: probe} if probe is not None else {}):
        source_out, source_cache = model.run_with_cache(source_t, names=slot_names)
    if probe is not None and probe.matches(source_out):
        with torch.no_grad():
            m_source = float(metric.per_example_hidden(probe.hidden, unembed).mean())  # type: ignore[union-attr, arg-type]
        return m_source, source_cache, unembed
    if probe is not None:  # post-processed logits (e.g. soft-capped): the full forward
        source_out, source_cache = model.run_with_cache(source_t, names=slot_names)
    return metric_value(metric, source_out), source_cache, None


def _deltas(model, addresses, pos_list, base_cache, source_cache, progress) -> Tensor:
    """Per address, the estimated change at each requested position: [address, position]."""
    deltas = torch.zeros(len(addresses), len(pos_list), dtype=torch.float64)
    by_slot: dict[Slot, list[int]] = {}
    for i, address in enumerate(addresses):
        by_slot.setdefault(address.slot, []).append(i)
    slots = tqdm(by_slot.items(), desc="attribution", disable=not progress or len(by_slot) < 2)
    for slot, members in slots:
        name = slot_address(slot)
        table = _unit_table(
            model,
            slot,
            base_cache.grad(name),
            source_cache[name] - base_cache[name],
            per_unit=any(addresses[i].index is not None for i in members),
            pos_list=pos_list,
        )  # [units (+1 for the whole slot), positions]
        rows = [
            table.shape[0] - 1
            if addresses[i].index is None
            else model.adapter.unit_index(slot, addresses[i].index)  # type: ignore[arg-type]
            for i in members
        ]
        deltas[members] = table[rows]
    return deltas


def _base_run(model: HookedModel, base_t: Tensor, slot_names: list[str], metric, unembed):
    """The base run with gradients of the metric at ``slot_names``. With ``unembed``, the
    unembedding gets zero positions (so nothing of [batch, pos, vocab] is built or
    differentiated) and the metric reads its own logits from the unembedding's input."""
    if unembed is None:
        return model.run_with_cache(base_t, names=slot_names, backward=_differentiable(metric))[1]
    stash: list[Tensor] = []

    def cut(module, args):
        stash.append(args[0])
        return (args[0][..., :0, :],)

    with Scope() as scope:
        scope.pre_hook(unembed.module, cut)
        _, cache = model.run_with_cache(
            base_t,
            names=slot_names,
            backward=lambda out: metric.per_example_hidden(stash[-1], unembed).mean(),
        )
    return cache


def _differentiable(metric: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def value(output: Tensor) -> Tensor:
        out = metric(output)
        if isinstance(out, Tensor) and not out.requires_grad:
            raise InputError(
                "attribution patching needs the metric's gradient, but the metric's value does not "
                "depend differentiably on the model output (computed under no_grad, detached or "
                "via .item()/argmax?)"
            )
        return out

    return value


def _unit_table(
    model: HookedModel,
    slot: Slot,
    grad: Tensor,
    diff: Tensor,
    per_unit: bool,
    pos_list: list[int | None],
) -> Tensor:
    """``grad * diff`` of one slot summed to ``[units + 1, positions]`` (float64, on the CPU).

    Row ``u`` is unit ``u`` (a head, k/v head or neuron at its position on the unit axis),
    the last row the whole slot; one column per entry of ``pos_list`` (one column summing
    every position when it is ``[None]``). Everything else, the batch included, is summed.
    """
    product = grad.to(torch.float64) * diff.to(torch.float64)
    ndim = product.ndim
    keep: list[int] = []
    if per_unit:
        keep.append(model.adapter.unit_axis(slot) % ndim)
    if pos_list != [None]:
        keep.append(model.adapter.position_axis(slot) % ndim)  # type: ignore[operator]
    summed = [d for d in range(ndim) if d not in keep]
    reduced = product.sum(summed) if summed else product
    if len(keep) == 2 and keep[0] > keep[1]:
        reduced = reduced.T  # sum keeps axis order: make it [unit, pos]
    if not per_unit:
        reduced = reduced.unsqueeze(0)
    if pos_list == [None]:
        reduced = reduced.unsqueeze(-1)
    else:
        n = reduced.shape[-1]
        reduced = reduced[:, [p % n for p in pos_list]]  # type: ignore[operator]
    whole = reduced.sum(0, keepdim=True)
    return torch.cat([reduced, whole]).cpu() if per_unit else whole.cpu()
