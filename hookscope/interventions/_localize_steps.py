"""The steps of :func:`~hookscope.interventions.localize_circuit` after the screen: confirm
the best candidates exactly, score sets of components, keep the smallest set reaching the
threshold, and refuse NaN at each step (see :mod:`hookscope.interventions.localize`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hookscope.addresses import Address
from hookscope.errors import InputError, format_choices
from hookscope.interventions.patching import Patcher
from hookscope.interventions.result import PatchingResult, metric_name, rank

#: one screened component: an address, and a position or None (every position)
Component = tuple[Address, int | None]


def label(component: Component) -> str:
    """``head.1.3``, or ``head.1.3@5`` for a component at one position."""
    address, pos = component
    return str(address) if pos is None else f"{address}@{pos}"


def confirm(patcher: Patcher, screen: PatchingResult, k: int, method: str, direction: str,
            metric) -> PatchingResult:  # fmt: skip
    """The exact (normalised) patching score of the screen's top ``k`` components: read
    from an exact screen, else one patched run each."""
    jobs: list[Component] = screen.jobs
    picked = [jobs[i] for i in rank(screen.effects)[:k]]
    if method == "exact":
        exact = dict(zip(jobs, screen.flat.tolist(), strict=True))
        fractions = torch.tensor([exact[c] for c in picked], dtype=torch.float64)
        if not screen.normalised:
            fractions = patcher.fraction(fractions)
    else:
        fractions = patcher.fraction(torch.tensor(patcher.run(picked), dtype=torch.float64))
    confirmed = PatchingResult(
        scores=fractions.clone(),
        dims=("candidate",),
        jobs=picked,
        flat=fractions,
        method="activation_patching",
        direction=direction,
        metric=metric_name(metric),
        normalised=True,
        baselines={"clean": patcher.m_clean, "corrupted": patcher.m_corrupted},
    )
    refuse_nan(confirmed.effects, picked, "the exact (confirmed) score")
    return confirmed


def smallest_circuit(set_score, ranking: list, k: int, threshold: float):
    """``(curve, circuit, score, reached)``: the set score of each top-``n`` prefix of
    ``ranking``, the shortest prefix reaching ``threshold`` (else all ``k``) with members
    the threshold does not need dropped, its score, and whether it reached it."""
    curve = set_score([ranking[:n] for n in range(1, k + 1)])
    refuse_nan(torch.tensor(curve), [f"top {n}" for n in range(1, k + 1)], "the set score", "sets")
    size = next((n for n, s in enumerate(curve, 1) if s >= threshold), None)
    reached = size is not None
    circuit = ranking[: size or k]
    score = curve[(size or k) - 1]
    if reached:
        for member in reversed(list(circuit)):  # drop members the threshold does not need
            if len(circuit) == 1:
                break
            trial = [c for c in circuit if c != member]
            value = set_score([trial])[0]
            refuse_nan(torch.tensor([value]), [f"circuit without {label(member)}"],
                       "the set score", "sets")  # fmt: skip
            if value >= threshold:
                circuit, score = trial, value
    return curve, circuit, score, reached


def refuse_nan(values: Tensor, items: list, what: str, kind: str = "components") -> None:
    """InputError naming the ``items`` whose value is NaN (an undefined rank)."""
    bad = [items[i] for i in torch.isnan(values).nonzero().flatten().tolist()]
    if bad:
        labels = [i if isinstance(i, str) else label(i) for i in bad]
        raise InputError(
            f"{what} is NaN for {len(bad)} of {len(items)} {kind} ({format_choices(labels, 8)}): "
            "the metric returned NaN on their patched runs, so they cannot be ranked or "
            "judged against the threshold. Check the metric (a log, a division or a softmax "
            "that patched activations push out of range) or leave those sites out"
        )


def set_scorer(
    model, clean, corrupted, metric, sites, patcher: Patcher, jobs, criterion, chunk_size, progress
) -> Callable[[list[list[Component]]], list[float]]:
    """A function scoring sets of components (each set one patched run, stacked)."""
    if criterion == "patch":

        def score(sets: list[list[Component]]) -> list[float]:
            fractions = patcher.fraction(torch.tensor(patcher.run(sets), dtype=torch.float64))
            kept = fractions if patcher.direction == "denoise" else 1.0 - fractions
            return kept.tolist()

        return score
    noiser = (
        patcher
        if patcher.direction == "noise"
        else Patcher(model, clean, corrupted, metric, sites, "noise", chunk_size, progress, True)
    )

    def keep_only(sets: list[list[Component]]) -> list[float]:
        complements = [[c for c in jobs if c not in set(s)] for s in sets]
        return noiser.fraction(torch.tensor(noiser.run(complements), dtype=torch.float64)).tolist()

    return keep_only
