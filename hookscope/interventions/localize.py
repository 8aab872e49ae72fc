"""Circuit localization: rank components, confirm the best exactly, keep a minimal set.

:func:`localize_circuit` answers "which components carry this behaviour?" in four steps:

1. **Screen** every component of ``sites`` (one per address, or per address and position)
   with attribution patching (two forwards and a backward) or exact activation patching.
2. **Confirm** the ``candidates`` best by exact patching, one at a time, and rank them by
   their exact effect (:attr:`PatchingResult.effects`).
3. **Grow** the set of the top ``k`` confirmed components, ``k = 1, 2, ...``, scoring each
   set with one patched run (all sets stacked in one sweep): the *curve*. The circuit is the
   smallest prefix whose score reaches ``threshold``; then each member whose removal keeps
   the score at the threshold is dropped (weakest first), so no member is redundant.
4. **Faithfulness**: the metric with only the circuit kept and every other site of
   ``sites`` ablated (:func:`knockout`, ``ablation="corrupted"`` by default: the other
   sites take their values from the corrupted run), as a fraction of clean behaviour.

The set score depends on ``criterion``:

* ``"patch"`` (default): patch the set in the sweep's ``direction``. Denoising scores the
  fraction of clean behaviour the set *restores* in the corrupted run; noising the fraction
  it *destroys* in the clean run.
* ``"faithfulness"``: keep the set and patch every other component with its corrupted value
  in the clean run; the score is the fraction of clean behaviour left. Use it when the
  components work only together (an induction head needs the previous-token head: patching
  either alone into a corrupted run restores little, and noising the previous-token head
  alone already destroys most, so neither "patch" criterion finds both).

Scores are fractions of ``m(clean) - m(corrupted)`` for any metric (plain callables too).

Every argument is checked before any forward, and the model runs in eval mode with each
submodule's training flag restored afterwards (also on error). NaN is refused, never
ranked: a metric that is NaN/Inf on the clean or corrupted run raises an
:class:`~hookscope.errors.InputError` before the screen, and so does a NaN screening,
confirmed or set score (naming the components), instead of being carried into the circuit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hookscope._choices import CRITERIA, LOCALIZE_METHODS
from hookscope.addresses import Address
from hookscope.interventions._arguments import (
    check_choice,
    check_count,
    check_fraction,
    check_model,
    check_reference,
)
from hookscope.interventions._localize_steps import (
    Component,
    confirm,
    label,
    refuse_nan,
    set_scorer,
    smallest_circuit,
)
from hookscope.interventions.ablation import KNOCKOUT_METHODS, Knockout, knockout
from hookscope.interventions.attribution import attribution_patching
from hookscope.interventions.metrics import Metric
from hookscope.interventions.patching import Patcher
from hookscope.interventions.result import PatchingResult, metric_name, rank
from hookscope.model import HookedModel
from hookscope.modes import EvalMode

__all__ = ["CircuitResult", "localize_circuit"]

METHODS = LOCALIZE_METHODS


@dataclass
class CircuitResult:
    """A localized circuit: its components, how well it does, and how it was found.

    ``components``: the minimal set, in confirmed rank order. ``score``: its set score
    (see ``criterion``); ``reached``: whether it reaches ``threshold`` (if no prefix of the
    candidates does, ``components`` are all candidates and ``reached`` is False).
    ``faithfulness``: the :class:`Knockout` with only the circuit's addresses kept.
    ``screen``: the screening sweep; ``confirmed``: exact scores of the candidates (in
    candidate order); ``curve[k-1]``: the set score of the top ``k`` confirmed candidates.
    """

    components: list[Component]
    score: float
    reached: bool
    threshold: float
    criterion: str
    direction: str
    method: str
    metric: str
    faithfulness: Knockout | None
    screen: PatchingResult
    confirmed: PatchingResult
    ranking: list[Component]
    curve: list[float]
    baselines: dict[str, float] = field(default_factory=dict)

    @property
    def addresses(self) -> list[Address]:
        return list(dict.fromkeys(a for a, _ in self.components))

    def _rows(self) -> list[dict[str, Any]]:  # (no NaN: localize_circuit refuses it)
        screen = dict(zip(self.screen.jobs, self.screen.effects.tolist(), strict=True))
        exact = dict(zip(self.confirmed.jobs, self.confirmed.effects.tolist(), strict=True))
        members = set(self.components)
        return [
            {
                "rank": rank,
                "component": label(c),
                "address": str(c[0]),
                "position": c[1],
                "screen_effect": screen[c],
                "exact_effect": exact[c],
                "set_score": self.curve[rank - 1],
                "in_circuit": c in members,
            }
            for rank, c in enumerate(self.ranking, 1)
        ]

    def to_pandas(self):
        """One row per confirmed candidate, best first: screening and exact effects, the
        score of the set of the top ``rank`` candidates, and circuit membership."""
        import pandas as pd

        return pd.DataFrame(self._rows())

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-serialisable values."""
        knock = self.faithfulness
        return {
            "circuit": [label(c) for c in self.components],
            "score": self.score,
            "reached": self.reached,
            "threshold": self.threshold,
            "criterion": self.criterion,
            "direction": self.direction,
            "method": self.method,
            "metric": self.metric,
            "baselines": self.baselines,
            "faithfulness": None
            if knock is None
            else {
                "faithfulness": knock.faithfulness,
                "value": knock.value,
                "clean": knock.clean,
                "ablated": knock.ablated,
                "method": knock.method,
            },
            "candidates": self._rows(),
            "screen": {
                "dims": list(self.screen.dims),
                "shape": list(self.screen.scores.shape),
                # padding of a ragged grid (NaN) as null: JSON has no NaN
                "scores": _nan_to_none(self.screen.scores.tolist()),
                "widths": None if self.screen.widths is None else list(self.screen.widths),
                "normalised": self.screen.normalised,
                "method": self.screen.method,
            },
        }

    def plot(self):
        """Figure: the screening heatmap with circuit members boxed, and the set-score curve."""
        from matplotlib.patches import Rectangle

        from hookscope.plot import figure

        fig = figure(figsize=(11, 4.5))
        ax_map, ax_curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        self.screen.plot(ax=ax_map, values="effect")
        ax_map.set_title(f"{self.screen.method} effects ({self.direction}); circuit boxed")
        data = self.screen.scores
        if data.ndim >= 2:
            cols = int(torch.tensor(data.shape[1:]).prod())
            for component in self.components:
                row, col = divmod(self.screen.cell(self.screen.jobs.index(component)), cols)
                ax_map.add_patch(
                    Rectangle((col - 0.4, row - 0.4), 0.8, 0.8, fill=False, lw=2, ec="black")
                )
        ks = list(range(1, len(self.curve) + 1))
        ax_curve.plot(ks, self.curve, marker="o")
        ax_curve.axhline(self.threshold, ls="--", c="grey", label=f"threshold {self.threshold}")
        ax_curve.set_xticks(ks, [label(c) for c in self.ranking], rotation=90, fontsize=7)
        ax_curve.set_ylabel(f"set score ({self.criterion}, {self.direction})")
        ax_curve.set_title(f"circuit: {len(self.components)} components")
        ax_curve.legend(loc="lower right")
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        status = "reaches" if self.reached else "does NOT reach"
        lines = [
            f"CircuitResult({self.method} screen, {self.criterion} criterion, {self.direction}, "
            f"metric {self.metric})",
            f"  circuit of {len(self.components)}: {', '.join(label(c) for c in self.components)}",
            f"  set score {self.score:.4f} {status} threshold {self.threshold}",
        ]
        if self.faithfulness is not None:
            lines.append(
                f"  faithfulness {self.faithfulness.faithfulness:.4f} "
                f"(only the circuit kept; other sites: {self.faithfulness.method})"
            )
        lines.append(f"  {'rank':<6}{'component':<24}{'screen':>9}{'exact':>9}{'set':>9}  circuit")
        for row in self._rows():
            line = (
                f"  {row['rank']:<6}{row['component']:<24}{row['screen_effect']:>+9.4f}"
                f"{row['exact_effect']:>+9.4f}{row['set_score']:>9.4f}"
            )
            lines.append(line + ("  *" if row["in_circuit"] else ""))
        return "\n".join(lines)


def localize_circuit(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    metric: Metric | Callable[[Tensor], Tensor],
    sites: Any = "head.*.*",
    method: str = "attribution",
    direction: str = "denoise",
    positions: str | Sequence[int] = "all",
    threshold: float = 0.8,
    candidates: int | None = None,
    criterion: str = "patch",
    ablation: str = "corrupted",
    reference: Any = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> CircuitResult:
    """Find a minimal set of components of ``sites`` that carries the metric's behaviour.

    ``method``: how to screen (``"attribution"`` or ``"exact"``). ``candidates``: how many
    of the best screened components to confirm exactly (default: all up to 20).
    ``criterion``, ``threshold``: what the set must reach (module docstring). ``ablation``:
    how :func:`knockout` removes the other sites for the reported faithfulness
    (``corrupted``, ``mean``, ``zero``, ``resample``; ``reference`` as for knockout, the
    corrupted inputs by default). Returns a :class:`CircuitResult`.

    Runs in eval mode, restoring every submodule's training flag afterwards (also on
    error). Arguments are checked before any forward (an :class:`InputError` naming the
    valid choices); NaN metric values are refused with an InputError (module docstring).
    """
    check_model(model)
    check_choice(method, "method", METHODS)
    check_choice(criterion, "criterion", CRITERIA)
    check_choice(ablation, "ablation", KNOCKOUT_METHODS)
    threshold = check_fraction(threshold, "threshold")
    if candidates is not None:
        candidates = check_count(candidates, "candidates")
    check_reference(reference)
    with EvalMode(model.model):
        return _localize(
            model, clean, corrupted, metric, sites, method, direction, positions, threshold,
            candidates, criterion, ablation, reference, chunk_size, progress,
        )  # fmt: skip


def _localize(
    model, clean, corrupted, metric, sites, method, direction, positions, threshold, candidates,
    criterion, ablation, reference, chunk_size, progress,
) -> CircuitResult:  # fmt: skip
    """:func:`localize_circuit` on checked arguments (in eval mode)."""
    patcher = Patcher(
        model, clean, corrupted, metric, sites, direction, chunk_size, progress, require_gap=True,
        positions=positions,
    )  # fmt: skip
    if method == "attribution":
        screen = attribution_patching(
            model, clean, corrupted, metric, sites, positions, direction, progress
        )
    else:  # the exact screen on the same baselines
        screen = patcher.sweep(positions)
    jobs: list[Component] = screen.jobs
    refuse_nan(screen.effects, jobs, f"the {screen.method} screening score")
    k = min(len(jobs), candidates or 20)
    confirmed = confirm(patcher, screen, k, method, direction, metric)
    ranking = [confirmed.jobs[i] for i in rank(confirmed.effects)]

    set_score = set_scorer(model, clean, corrupted, metric, sites, patcher, jobs, criterion,
                            chunk_size, progress)  # fmt: skip
    curve, circuit, score, reached = smallest_circuit(set_score, ranking, k, threshold)

    faithfulness = knockout(
        model,
        clean,
        list(dict.fromkeys(a for a, _ in jobs)),
        metric,
        keep=list(dict.fromkeys(a for a, _ in circuit)),
        method=ablation,
        reference=corrupted if reference is None and ablation != "zero" else reference,
    )
    return CircuitResult(
        components=circuit,
        score=score,
        reached=reached,
        threshold=threshold,
        criterion=criterion,
        direction=direction,
        method=method,
        metric=metric_name(metric),
        faithfulness=faithfulness,
        screen=screen,
        confirmed=confirmed,
        ranking=ranking,
        curve=curve,
        baselines={"clean": patcher.m_clean, "corrupted": patcher.m_corrupted},
    )


def _nan_to_none(value: Any) -> Any:
    """Nested lists of floats with NaN as None."""
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and value != value else value
