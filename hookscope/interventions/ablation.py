"""Ablation: replace what an address names by zero, its mean, or a resampled activation.

:func:`ablate` scores each site ablated alone (or returns the output with all of them
ablated at once); :func:`knockout` measures a circuit's faithfulness: the metric with every
site outside the circuit ablated, on a scale where the clean run is 1 and the run with
every site ablated is 0.

Ablation values, per slot (one layer-level tensor), for an input batch of ``B`` rows:

- ``zero``: 0.
- ``mean``: the mean over the ``reference`` rows; per position when the reference has the
  inputs' positions (``per_position``), else over rows and positions. Vision activations
  without a position axis: over rows.
- ``resample``: in draw ``d`` each input row gets the activation of one reference row, the
  rows being the ``d``-th ``torch.randint(n_ref, (B,), generator=torch.Generator()
  .manual_seed(seed))``; draw ``d`` uses the same rows at every site. Metrics (and outputs)
  are averaged over the ``n_draws`` draws.
- ``corrupted`` (:func:`knockout` only): row ``i`` of the reference run for input row ``i``.

Only the unit an address names changes: one head's slice of z/q/k/v/result/pattern, one
neuron or CNN channel, or the whole tensor of resid/attn_out/mlp_out. Runs are stacked along
the batch as in :func:`~hookscope.interventions.activation_patching`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookscope.addresses import Address
from hookscope.errors import InputError, format_choices
from hookscope.inputs import causal_only, tokens_of
from hookscope.interventions._ablation_values import Values
from hookscope.interventions._arguments import (
    check_baselines,
    check_choice,
    check_count,
    check_finite,
    check_int,
    check_model,
    check_reference,
    resolve_sites,
)
from hookscope.interventions._forward_edits import forward_replaced
from hookscope.interventions._inputs import copies_per_forward, fit_metric
from hookscope.interventions._onednn import fast_forwards, shortcuts_off
from hookscope.interventions.engine import Engine, Write, Writer, needs_logits
from hookscope.interventions.metrics import Metric
from hookscope.interventions.result import PatchingResult, metric_name, sweep_result
from hookscope.model import HookedModel
from hookscope.modes import EvalMode

__all__ = ["ablate", "knockout", "Knockout"]

METHODS = ("zero", "mean", "resample")
KNOCKOUT_METHODS = (*METHODS, "corrupted")

#: one ablated run: the addresses ablated together and the resampling draw
Job = tuple[tuple[Address, ...], int]
MetricFn = Metric | Callable[[Tensor], Tensor]


def _checked(
    model: HookedModel,
    inputs: Any,
    sites: Any,
    method: str,
    choices: tuple[str, ...],
    reference: Any,
    n_draws: Any,
    seed: Any,
) -> tuple[Tensor, Tensor | None, list[Address]]:
    """``(inputs as a tensor, row lengths, addresses of sites)`` after checking the
    arguments :func:`ablate` and :func:`knockout` share (no forward runs)."""
    check_model(model)
    check_choice(method, "method", choices)
    check_count(n_draws, "n_draws")
    check_int(seed, "seed")
    check_reference(reference)
    addresses = resolve_sites(model, sites)
    inputs_t, lengths = tokens_of(model, inputs)
    check_finite(inputs_t, "the inputs")
    if isinstance(reference, Tensor):
        check_finite(reference, "the reference inputs")
    return inputs_t, lengths, addresses


def _writes(values: Values, job: Job) -> tuple[Write, ...]:
    """An ablation job as the writes of one copy: each address takes its ablation value."""
    addresses, draw = job
    return tuple(Write(a, None, values.get(a.slot, draw)) for a in addresses)


def _run_jobs(
    model: HookedModel,
    inputs_t: Tensor,
    values: Values,
    jobs: list[Job],
    chunk_size: int | None = None,
    progress: bool = False,
) -> list[Any]:
    """The output of each job's ablated copy of the inputs, ``chunk_size`` jobs per forward."""
    k = copies_per_forward(inputs_t, chunk_size)
    batch = inputs_t.shape[0]
    found: list[Any] = []
    chunks = range(0, len(jobs), k)
    fast, _ = fast_forwards(model)  # (the output is a tensor: nothing to report)
    writer = Writer(model.adapter, {})
    for start in tqdm(chunks, desc="ablation", disable=not progress or len(chunks) < 2):
        part = [_writes(values, job) for job in jobs[start : start + k]]
        stacked = inputs_t.repeat(len(part), *([1] * (inputs_t.ndim - 1)))
        hooks = writer.hooks(list(enumerate(part)), batch)
        with torch.no_grad(), forward_replaced(fast):
            out = model.run_with_hooks(stacked, hooks=hooks)
        if len(part) == 1:
            found.append(out)
            continue
        if not isinstance(out, Tensor):
            raise InputError(
                f"stacking ablated runs needs a tensor output, got {type(out).__name__}; "
                "pass chunk_size=1"
            )
        found += [out[i * batch : (i + 1) * batch] for i in range(len(part))]
    return found


def _metric_jobs(
    model: HookedModel,
    inputs_t: Tensor,
    values: Values,
    jobs: list[Job],
    metric: MetricFn,
    chunk_size: int | None = None,
    progress: bool = False,
) -> tuple[float, list[float]]:
    """``(the unablated metric, each job's metric)``, through the intervention
    :class:`~hookscope.interventions.engine.Engine` (``chunk_size`` copies per forward)."""
    k = copies_per_forward(inputs_t, chunk_size)
    engine = Engine(model, inputs_t, metric)
    slots = list(dict.fromkeys(a.slot for addresses, _ in jobs for a in addresses))
    uses_logits = needs_logits(slots)
    (clean,), _ = engine.baseline(inputs_t, slice(0, inputs_t.shape[0]), slots, uses_logits)
    check_baselines({"unablated": clean}, {"unablated": "the inputs"})
    writes = [_writes(values, job) for job in jobs]
    return clean, engine.run(writes, k, clean, progress, "ablation")


def ablate(
    model: HookedModel,
    inputs: Any,
    sites: Any,
    method: str = "zero",
    reference: Any = None,
    metric: MetricFn | None = None,
    n_draws: int = 8,
    seed: int = 0,
    per_position: bool | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> Tensor | PatchingResult:
    """Ablate ``sites`` (zero / mean / resample; see the module docstring for the values).

    ``sites``: an address, a selection (``"head.*.*"``) or a list. ``reference``: inputs
    (token ids, texts, float images) whose activations give the mean or the resampled rows
    (a mean is accumulated over forwards of ~4096 tokens, so the reference may be large;
    resampling runs only the rows it draws).
    ``per_position``: None = per position when the reference has the inputs' positions, True
    forces it, False averages over positions too. ``chunk_size``: ablated runs stacked per
    forward (default keeps a forward near 4096 tokens).

    ``metric=None``: the model output with every site ablated at once (resample: the mean
    output over draws). With a metric: a :class:`PatchingResult` with the raw metric after
    ablating each site alone (resample: averaged over draws), shaped by the sweep; its
    ``baselines["clean"]`` is the unablated metric and ``effects`` ``clean - score``.

    Scores are shaped as :func:`~hookscope.interventions.activation_patching`'s (layers of
    different widths: NaN past each layer's width, widths in ``result.widths``). The model
    runs in eval mode and every submodule's training flag is restored afterwards (also on
    error); bad arguments, NaN/Inf in float inputs or references, and a metric that is
    NaN/Inf on the unablated run raise an :class:`~hookscope.errors.InputError` before any
    site is ablated.

    >>> res = ablate(model, tokens, "head.*.*", "mean", reference=more_tokens, metric=m)
    >>> res.scores.shape  # [layer, head]
    """
    inputs_t, lengths, addresses = _checked(
        model, inputs, sites, method, METHODS, reference, n_draws, seed
    )
    lengths = causal_only(model, lengths)  # padded prompts: causal models only
    if metric is not None:
        metric = fit_metric(metric, lengths, model, inputs_t)  # checked; per-row reads
    with EvalMode(model.model):
        return _ablate(
            model, inputs_t, lengths, addresses, sites, method, reference, metric, n_draws,
            seed, per_position, chunk_size, progress,
        )  # fmt: skip


def _ablate(
    model, inputs_t, lengths, addresses, sites, method, reference, metric, n_draws, seed,
    per_position, chunk_size, progress,
) -> Tensor | PatchingResult:  # fmt: skip
    """:func:`ablate` on checked arguments (in eval mode)."""
    values = Values(
        model, addresses, method, inputs_t, reference, per_position, n_draws, seed, progress,
        lengths,
    )  # fmt: skip
    draws = range(values.n_draws)
    if metric is None:
        jobs: list[Job] = [(tuple(addresses), d) for d in draws]
        outs = _run_jobs(model, inputs_t, values, jobs, chunk_size, progress)
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)
    jobs = [((a,), d) for a in addresses for d in draws]
    clean, raw = _metric_jobs(model, inputs_t, values, jobs, metric, chunk_size, progress)
    flat = torch.tensor(raw, dtype=torch.float64).reshape(len(addresses), len(draws)).mean(1)
    return sweep_result(
        sites, addresses, [None], flat, metric, f"{method} ablation", "noise", False,
        {"clean": clean}, shortcuts_off=shortcuts_off(model.model),
    )  # fmt: skip


def _check_shared_units(model: HookedModel, kept: list[Address], removed: tuple) -> None:
    """InputError when a kept address shares its tensor slice with an ablated one (with
    grouped-query attention, the query heads of one group share their k and v head): the
    kept one would be ablated too."""
    kept_at = {(a.slot, _unit(model, a)): a for a in kept}
    for a in removed:
        other = kept_at.get((a.slot, _unit(model, a)))
        if other is not None:
            raise InputError(
                f"{other} is kept but shares its values with {a}, which is ablated (their "
                f"query heads share one key/value head); keep or ablate both"
            )


def _unit(model: HookedModel, address: Address) -> int | None:
    """Where ``address`` lies on its slot's unit axis (None: the whole slot)."""
    if address.index is None:
        return None
    return model.adapter.unit_index(address.slot, address.index)


@dataclass
class Knockout:
    """A circuit's faithfulness: the metric with only ``kept`` of the sites left intact.

    ``faithfulness = (value - ablated) / (clean - ablated)``: 1 when the kept sites alone
    carry the clean behaviour, 0 when they carry none of it.
    """

    value: float  #: metric with every site except ``kept`` ablated
    clean: float  #: metric without ablation
    ablated: float  #: metric with every site ablated
    faithfulness: float
    kept: list[Address]
    removed: int  #: how many sites were ablated for ``value``
    method: str
    metric: str = "metric"

    def to_pandas(self):
        """A one-row frame: faithfulness, value, clean, ablated, kept, removed, method, metric."""
        import pandas as pd

        row = {**self.__dict__, "kept": ", ".join(str(a) for a in self.kept)}
        return pd.DataFrame([row])

    def __repr__(self) -> str:
        kept = format_choices(self.kept, 8) if self.kept else "nothing"
        return (
            f"Knockout({self.method}, metric {self.metric}): faithfulness {self.faithfulness:.4f}\n"
            f"  value {self.value:+.4f}  clean {self.clean:+.4f}  ablated {self.ablated:+.4f}\n"
            f"  kept {len(self.kept)} of {len(self.kept) + self.removed} sites: {kept}"
        )


def knockout(
    model: HookedModel,
    inputs: Any,
    sites: Any,
    metric: MetricFn,
    keep: Any = (),
    method: str = "mean",
    reference: Any = None,
    n_draws: int = 8,
    seed: int = 0,
    per_position: bool | None = None,
) -> Knockout:
    """Ablate every address of ``sites`` except those of ``keep`` at once; score faithfulness.

    ``method``: ``zero``, ``mean``, ``resample`` (as :func:`ablate`) or ``corrupted``:
    ``reference`` are corrupted inputs aligned row by row with ``inputs`` (same shape) and an
    ablated site takes that row's value in the corrupted run (noising the complement).
    ``keep``: addresses or selections, each among the resolved ``sites``.

    Runs in eval mode, restoring every submodule's training flag afterwards (also on
    error). A metric that is NaN/Inf on the unablated run raises an
    :class:`~hookscope.errors.InputError` before anything is ablated; one that is NaN/Inf
    with every site ablated (faithfulness's zero point) raises one after that run.

    >>> knockout(model, clean, "head.*.*", metric, keep=["head.0.1", "head.1.3"],
    ...          method="corrupted", reference=corrupted).faithfulness
    """
    inputs_t, lengths, addresses = _checked(
        model, inputs, sites, method, KNOCKOUT_METHODS, reference, n_draws, seed
    )
    metric = fit_metric(metric, causal_only(model, lengths), model, inputs_t)  # checked
    with EvalMode(model.model):
        return _knockout(
            model, inputs_t, lengths, addresses, metric, keep, method, reference, n_draws,
            seed, per_position,
        )  # fmt: skip


def _knockout(
    model, inputs_t, lengths, addresses, metric, keep, method, reference, n_draws, seed,
    per_position,
) -> Knockout:  # fmt: skip
    """:func:`knockout` on checked arguments (in eval mode)."""
    kept = model.resolve(keep) if keep is not None else []
    site_set, kept_set = set(addresses), set(kept)
    outside = [a for a in kept if a not in site_set]
    if outside:
        raise InputError(
            f"keep must be among the sites; {format_choices(outside)} "
            f"{'is' if len(outside) == 1 else 'are'} not among the {len(addresses)} sites "
            f"({format_choices(addresses)})"
        )
    removed = tuple(a for a in addresses if a not in kept_set)
    _check_shared_units(model, kept, removed)
    values = Values(
        model, addresses, method, inputs_t, reference, per_position, n_draws, seed, False, lengths
    )
    draws = range(values.n_draws)
    jobs: list[Job] = [(tuple(addresses), d) for d in draws]
    if 0 < len(removed) < len(addresses):
        jobs += [(removed, d) for d in draws]
    clean, raw = _metric_jobs(model, inputs_t, values, jobs, metric)
    ablated = fmean(raw[: len(draws)])
    if not removed:
        value = clean
    elif len(removed) == len(addresses):
        value = ablated
    else:
        value = fmean(raw[len(draws) :])
    check_baselines(
        {"all-ablated": ablated, "kept": value},
        {"all-ablated": "the ablation values", "kept": "the ablation values"},
    )
    if clean == ablated:
        raise InputError(
            f"the metric is equal with and without ablating every site ({clean:.6g}); "
            "faithfulness is undefined — choose sites or inputs the metric depends on"
        )
    return Knockout(
        value=value,
        clean=clean,
        ablated=ablated,
        faithfulness=(value - ablated) / (clean - ablated),
        kept=list(dict.fromkeys(kept)),
        removed=len(removed),
        method=f"{method} ablation" if method != "corrupted" else "corrupted",
        metric=metric_name(metric),
    )
