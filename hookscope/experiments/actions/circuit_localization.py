"""circuit_localization: which components carry the label's information and the model's
behaviour? Probe the streams, rank the candidates, intervene on the best, localize a circuit.

1. **Probe** every site of ``extraction.sites`` for the label with the run's controls
   (:func:`hookscope.probes.probe_sweep`): the separate streams of a transformer
   (``resid_post``, ``attn_out``, ``mlp_out``, single heads ``head.L.H``); on the digits MLP
   and CNN, which have no attention, ``resid_post.L``, layers ``neuron.L`` and single
   neurons or channels ``neuron.L.I``.
2. **Rank** the ``candidates`` (probed sites; default all) by ``rank_by`` (the probe score,
   its effect over shuffled labels, or its selectivity over the control task).
3. **Intervene** on the ``top_k`` best, one at a time, on every row of the dataset:
   ``ablation`` writes the ``mean`` of the component over every row (and every real token
   of a text; images: over rows) or ``zero``; ``patching`` writes the component's value
   from the row's corrupted input (``corrupted_column``, e.g. IOI's ABC prompts). Each
   intervention is one hooked :meth:`~hookscope.HookedModel.run_with_cache` per batch, so
   the hooks leave with the call, also on error. Two drops, each *clean minus intervened*:

   * **probe drop** at every ``readouts`` site: the seed-0 probe of that site, fitted on
     the clean activations and never refit, scored (``metric``) on its held-out rows with
     the site's activations re-collected under the intervention (read at
     ``extraction.positions``, as the store reads them). A readout upstream of the
     component is untouched (drop 0); a component that is its own readout drops to what a
     constant feature gives.
   * **behaviour drop**: ``accuracy``, the classifier's own accuracy on the labels
     (digits); ``logit_diff``, the logit of the dataset's ``correct`` token minus its
     ``incorrect`` one at each prompt's last token (agreement verbs, IOI names; the
     definition of :func:`hookscope.interventions.logit_diff`); ``task``, the localize
     task's metric. Signed so that positive means worse behaviour (for a loss, intervened
     minus clean).

4. **Localize** (``localize``: ``ioi`` or ``induction``; ``auto``: the dataset's task when
   it is one of them): :func:`hookscope.interventions.localize_circuit` on ``localize_n``
   clean/corrupted pairs of :func:`hookscope.interventions.build_task` with the task's
   metric and defaults, as ``hookscope localize`` runs it (IOI: ABC-corrupted prompts,
   logit difference; induction: repeated random tokens, loss on the repeats). Reports the
   ranked components and the minimal circuit.

**Behaviour-only mode.** Without a text or image column to extract (a model without a
tokenizer, e.g. tiny-induction), steps 1-2 cannot run: the candidates are
localize_circuit's ranking, intervened on the task's clean inputs and scored by the task
metric alone; the report says so.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor

from hookscope.actions import Action, ActionResult, register
from hookscope.errors import ExperimentError, HookscopeError, format_choices
from hookscope.experiments.actions.feature_detection import (
    EXPLAIN,
    ProbeParams,
    sweep_controls,
    sweep_options,
    table_json,
)
from hookscope.inputs import pad_token

__all__ = ["CircuitLocalization", "CIRCUIT_EXPLAIN"]

BEHAVIOUR = "behaviour_drop"  # the impact matrix's behaviour column

CIRCUIT_EXPLAIN = {
    **EXPLAIN,
    "rank": "the candidate's place when ranked by the probe statistic named in the title (1 = best)",
    "intervened": "whether the candidate is among the top_k intervened on",
    "probe_drop": "the primary readout probe's held-out metric on clean activations minus the same probe (not refit) with this component intervened on",
    "behaviour_drop": "the model's behaviour metric on clean inputs minus with this component intervened on; positive = worse behaviour",
    "screen_effect": "localize_circuit's screening effect (attribution or exact patching) of the component",
    "exact_effect": "its exact activation-patching effect, as a fraction of the clean-vs-corrupted gap",
    "set_score": "the set score of the top-`rank` confirmed components together",
    "in_circuit": "whether the component is in the minimal circuit",
    "component": "the address intervened on",
    "address": "the component's address",
    "position": "the token position patched (empty: every position)",
}


@register("circuit_localization")
class CircuitLocalization(Action):
    """Probe the streams, rank the candidates by probe score, ablate or patch the best and
    measure the probe and behaviour drops (a causal impact matrix); localize a minimal
    circuit with :func:`~hookscope.interventions.localize_circuit` on IOI / induction."""

    class Params(ProbeParams):
        seeds: int = Field(3, ge=1, description="splits and control draws of the probe sweep")
        candidates: list[str] | None = Field(
            None,
            description="probed sites (or glob patterns) to rank and intervene on; default every probed site",
        )
        readouts: list[str] | None = Field(
            None,
            description="probed sites (or globs) whose probes are re-scored under each intervention; default the layer-level probed sites",
        )
        rank_by: Literal["score", "effect", "selectivity"] = Field(
            "score",
            description="score; effect (needs the shuffle control); selectivity (needs control_task)",
        )
        top_k: int = Field(
            5, ge=1, description="how many of the best-ranked candidates to intervene on"
        )
        intervention: Literal["ablation", "patching"] = Field(
            "ablation", description="ablation (see ablation) or patching from the corrupted input"
        )
        ablation: Literal["mean", "zero"] = Field(
            "mean", description="mean: the component's mean over the rows (and tokens); zero"
        )
        corrupted_column: str = Field(
            "corrupted",
            description="patching: the column of corrupted inputs aligned row by row with the clean ones",
        )
        behaviour: Literal["auto", "accuracy", "logit_diff", "task", "none"] = Field(
            "auto",
            description="accuracy (classifiers), logit_diff (correct/incorrect token columns), task (the localize task's metric), none; auto picks",
        )
        localize: Literal["auto", "ioi", "induction", "none"] = Field(
            "auto",
            description="run localize_circuit on this task; auto: the dataset's task when it is ioi or induction",
        )
        localize_sites: str | None = Field(
            None, description="sites localize_circuit screens (default the task's, head.*.*)"
        )
        localize_n: int = Field(32, ge=1, description="clean/corrupted pairs for localize_circuit")
        localize_method: Literal["attribution", "exact"] = Field(
            "attribution", description="localize_circuit's screen"
        )
        threshold: float = Field(
            0.8, gt=0, le=1, description="the fraction of the behaviour the circuit must reach"
        )
        localize_candidates: int | None = Field(
            None,
            ge=1,
            description="components localize_circuit confirms exactly (default its own, up to 20)",
        )

    # ------------------------------------------------------------------ prepare
    def prepare(self, context: Any) -> _Prepared:
        p = context.params
        model = context.model
        task = _localize_task(context)
        probing = context.text_column is not None or context.input_column is not None
        labelled = (p.label or context.label_column) in context.dataset.column_names
        if probing and not labelled and task is not None and p.label is None:
            probing = False  # e.g. induction token rows: nothing to probe, behaviour only
        prep = _Prepared(
            model=model, params=p, seed=context.seed, progress=context.progress, task=task
        )
        if not probing:
            return _prepare_behaviour_only(context, prep)
        label = p.checked_label(context)
        needs = {"effect": "shuffle", "selectivity": "control_task"}.get(p.rank_by)
        if needs is not None and needs not in context.controls:
            raise ExperimentError(
                f"action.params.rank_by: {p.rank_by!r} needs the {needs} control; controls are "
                f"{format_choices(context.controls) or 'none'}"
            )
        policy = _policy(context)
        behaviour = _behaviour(context, label)
        if p.intervention == "patching":
            context.require_column(p.corrupted_column, "action.params.corrupted_column")
        names = list(
            dict.fromkeys(str(a) for a in model.resolve(context.sites))
        )  # the store's site names
        candidates = (
            _match(p.candidates, names, "action.params.candidates") if p.candidates else names
        )
        if p.readouts:
            readouts = _match(p.readouts, names, "action.params.readouts")
        else:
            readouts = [s for s in names if model.resolve(s)[0].index is None] or names
        acts = context.activations()
        examples = acts.index["example"].to_numpy() if "example" in acts.index.columns else None
        if acts.n_rows != len(context.dataset) or (
            examples is not None and not np.array_equal(examples, np.arange(acts.n_rows))
        ):
            raise ExperimentError(
                f"extraction.positions: circuit_localization needs one stored row per example "
                f"in dataset order; the entry has {acts.n_rows} rows for {len(context.dataset)} examples"
            )
        missing = [s for s in (*candidates, *readouts) if s not in acts.sites]
        if missing:
            raise ExperimentError(
                f"extraction.sites: the store entry lacks {format_choices(missing)}; it has {format_choices(acts.sites)}"
            )
        prep.acts, prep.label, prep.sites = acts, label, list(acts.sites)
        prep.sweep_kw = sweep_controls(context, acts)
        prep.split = dict(context.spec.dataset.split)
        prep.candidates = candidates
        prep.readouts = sorted(readouts, key=lambda s: model.resolve(s)[0])  # forward order
        prep.behaviour = behaviour
        prep.data = _dataset_batches(context, policy, p)
        prep.labels = np.asarray(context.dataset[label])
        return prep

    # ------------------------------------------------------------------ run
    def run(self, prepared: _Prepared) -> ActionResult:
        if prepared.acts is None:
            return _run_behaviour_only(prepared)
        return _run_probing(prepared)

    # ------------------------------------------------------------------ summarize
    def summarize(self, result: ActionResult) -> dict:
        m = result.metrics
        p = m["params"]
        what = _intervention_name(p)
        tables, figures, notes = [], [], list(m["notes"])
        ranking = result.tables["ranking"]
        if m["mode"] == "probing":
            model_part = f" and the model's {m['behaviour']}" if m["behaviour"] else ""
            question = (
                f"Which probed components linearly encode the column '{m['label']}', and does "
                f"intervening on the {p['top_k']} that encode it best ({what}) cost the probes "
                f"downstream{model_part} alike?"
            )
            tables.append(
                table_json(
                    "ranking",
                    f"Candidates ranked by probe {p['rank_by']} ({m['probe_metric']}); the top {p['top_k']} {what}",
                    ranking,
                    CIRCUIT_EXPLAIN,
                )
            )
        else:
            question = (
                f"Which components carry the {m['task']} behaviour ({m['behaviour']}), and how much "
                f"of it is lost when the {p['top_k']} best are {what}?"
            )
            tables.append(
                table_json(
                    "ranking",
                    f"Components ranked by localize_circuit (exact effect); the top {p['top_k']} {what}",
                    ranking,
                    CIRCUIT_EXPLAIN,
                )
            )
        impact = result.tables["impact"]
        explain = {c: _impact_explain(c, m) for c in impact.columns}
        tables.append(
            table_json(
                "impact",
                f"Causal impact matrix: the drop of each metric when the component is {what}",
                impact,
                explain,
            )
        )
        figures.append(
            {
                "name": "impact",
                "title": "Causal impact matrix",
                "caption": "Rows: the components intervened on; columns: the probe metric at each readout and the "
                "behaviour metric. Numbers: clean minus intervened; colour: that drop as a fraction "
                "of the clean value.",
            }
        )
        if "probe_sweep" in result.figures:
            figures.append(
                {
                    "name": "probe_sweep",
                    "title": "Probe score per site",
                    "caption": "The probe's held-out score with its bootstrap band; the controls beneath.",
                }
            )
        if "circuit" in result.tables and m["mode"] == "probing":
            tables.append(
                table_json(
                    "circuit",
                    f"localize_circuit on {m['task']}: confirmed components, best first",
                    result.tables["circuit"],
                    CIRCUIT_EXPLAIN,
                )
            )
        if "circuit" in result.figures:
            figures.append(
                {
                    "name": "circuit",
                    "title": f"Circuit localized on {m['task']}",
                    "caption": "Left: the screening effects with the circuit's members boxed; right: the "
                    "set score of the top k confirmed components and the threshold.",
                }
            )
        return {
            "question": question,
            "metrics": m["summary"],
            "tables": tables,
            "figures": figures,
            "notes": notes,
        }


# ---------------------------------------------------------------------------- data
@dataclass
class _Batch:
    """Rows of one forward: model inputs, the aligned corrupted inputs (patching), the
    dataset rows, the real-token mask of padded text and each row's read position."""

    inputs: Any
    corrupted: Any
    rows: np.ndarray
    mask: Tensor | None = None
    read: Tensor | None = None  # [b] the position features are read at (None: mean / image)
    extra: dict = field(default_factory=dict)  # per-row behaviour inputs (labels, answer ids)


@dataclass
class _Data:
    batches: list[_Batch]
    positional: bool  # token inputs: activations have a position axis (1)
    policy: str  # last / mean / fixed / column / image / task


@dataclass
class _Behaviour:
    name: str  # accuracy | logit_diff | task
    higher_is_better: bool = True
    metric: Any = None  # the task's Metric (task behaviour)


@dataclass
class _Prepared:
    model: Any
    params: Any
    seed: int
    progress: bool
    task: _LocalizeTask | None = None  # what localize_circuit runs on
    acts: Any = None
    label: str | None = None
    sites: list[str] = field(default_factory=list)
    sweep_kw: dict = field(default_factory=dict)
    split: dict | None = None
    candidates: list[str] = field(default_factory=list)
    readouts: list[str] = field(default_factory=list)
    behaviour: _Behaviour | None = None
    data: _Data | None = None
    labels: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _LocalizeTask:
    name: str
    clean: Tensor
    corrupted: Tensor
    metric: Any
    direction: str
    criterion: str
    sites: str


def _match(patterns: list[str], sites: list[str], where: str) -> list[str]:
    picked: list[str] = []
    for i, pattern in enumerate(patterns):
        hits = [s for s in sites if fnmatch.fnmatchcase(s, pattern)]
        if not hits:
            raise ExperimentError(
                f"{where}[{i}]: {pattern!r} matches no probed site; probed: {format_choices(sites)}"
            )
        picked += [h for h in hits if h not in picked]
    return picked


def _policy(context: Any) -> Any:
    from hookscope.store.positions import parse_policy

    ex = context.spec.extraction
    vision = context.text_column is None
    try:
        policy = parse_policy(ex.positions, list(context.dataset.column_names), vision)
    except HookscopeError as err:
        raise ExperimentError(f"extraction.positions: {' '.join(str(err).split())}") from None
    if not policy.one_row:
        raise ExperimentError(
            f"extraction.positions: circuit_localization needs one row per example (last, mean, "
            f"one int, a position column{', image' if vision else ''}); got {ex.positions!r}"
        )
    return policy


def _behaviour(context: Any, label: str) -> _Behaviour | None:
    p = context.params
    text = context.text_column is not None
    columns = context.dataset.column_names
    choice = p.behaviour
    if choice == "auto":
        if not text:
            choice = "accuracy"
        elif "correct" in columns and "incorrect" in columns:
            choice = "logit_diff"
        else:
            return None
    if choice == "none":
        return None
    if choice == "task":
        raise ExperimentError(
            "action.params.behaviour: 'task' scores the localize task's inputs, which only the "
            "behaviour-only mode (nothing to extract) intervenes on; use accuracy or logit_diff"
        )
    if choice == "accuracy":
        if text:
            raise ExperimentError(
                "action.params.behaviour: 'accuracy' is a classifier's accuracy on the labels "
                "(digits); this is a language model: use logit_diff"
            )
        values = np.asarray(context.dataset[label])
        if values.dtype.kind not in "iu" or values.min() < 0:
            raise ExperimentError(
                f"action.params.behaviour: 'accuracy' compares the model's argmax with the "
                f"label column {label!r}, which must hold class indices 0..K-1"
            )
        return _Behaviour("accuracy")
    if not text or "correct" not in columns or "incorrect" not in columns:
        raise ExperimentError(
            "action.params.behaviour: 'logit_diff' needs a language model and the token-id columns "
            f"'correct' and 'incorrect' (agreement or ioi); the dataset has {format_choices(columns)}"
        )
    return _Behaviour("logit_diff")


def _dataset_batches(context: Any, policy: Any, p: Any) -> _Data:
    """The dataset's rows as model inputs in ``extraction.batch_size`` batches, tokenized
    and padded as the store does (right padding, the tokenizer's default special tokens)."""
    ds, bs = context.dataset, context.spec.extraction.batch_size
    n = len(ds)
    patching = p.intervention == "patching"
    extra_cols = {}
    if "correct" in ds.column_names and "incorrect" in ds.column_names:
        extra_cols = {
            k: torch.as_tensor(np.asarray(ds[k], dtype=np.int64)) for k in ("correct", "incorrect")
        }
    label_values = np.asarray(ds[p.label or context.label_column])
    labels = torch.as_tensor(label_values) if label_values.dtype.kind in "iub" else None
    batches = []
    if context.text_column is None:  # images
        images = _images(ds, context.input_column)
        corrupted = _images(ds, p.corrupted_column) if patching else None
        if corrupted is not None and corrupted.shape != images.shape:
            raise ExperimentError(
                f"action.params.corrupted_column: {p.corrupted_column!r} holds inputs of shape "
                f"{tuple(corrupted.shape[1:])}, the clean ones {tuple(images.shape[1:])}"
            )
        for lo in range(0, n, bs):
            rows = np.arange(lo, min(n, lo + bs))
            extra = {"label": labels[rows]} if labels is not None else {}
            batches.append(
                _Batch(
                    images[lo : lo + bs],
                    None if corrupted is None else corrupted[lo : lo + bs],
                    rows,
                    extra=extra,
                )
            )
        return _Data(batches, positional=False, policy="image")
    tok = context.model.tokenizer
    ids = _tokenize(tok, list(ds[context.text_column]))
    lengths = np.asarray([len(r) for r in ids])
    bad_ids = None
    if patching:
        bad_ids = _tokenize(tok, [str(t) for t in ds[p.corrupted_column]])
        differ = [i for i, (a, b) in enumerate(zip(ids, bad_ids, strict=True)) if len(a) != len(b)]
        if differ:
            raise ExperimentError(
                f"action.params.corrupted_column: patching needs corrupted inputs of the clean ones' "
                f"token lengths; row {differ[0]} has {len(bad_ids[differ[0]])} tokens, its clean "
                f"input {len(ids[differ[0]])} ({len(differ)} rows differ)"
            )
    column = list(ds[policy.column]) if policy.column else None
    read = (
        None
        if policy.kind == "mean"
        else np.asarray([int(r[0]) for r in policy.positions(lengths, column)])
    )
    pad = pad_token(tok)
    for lo in range(0, n, bs):
        rows = np.arange(lo, min(n, lo + bs))
        width = int(lengths[rows].max())
        mask = torch.as_tensor(np.arange(width) < lengths[rows][:, None]).long()
        clean = {"input_ids": _padded([ids[i] for i in rows], width, pad), "attention_mask": mask}
        bad = None
        if bad_ids is not None:
            bad = {
                "input_ids": _padded([bad_ids[i] for i in rows], width, pad),
                "attention_mask": mask,
            }
        extra = {k: v[rows] for k, v in extra_cols.items()}
        extra["last"] = torch.as_tensor(lengths[rows] - 1)
        batches.append(
            _Batch(
                clean, bad, rows, mask, None if read is None else torch.as_tensor(read[rows]), extra
            )
        )
    return _Data(batches, positional=True, policy=policy.kind)


def _tokenize(tok: Any, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for at in range(0, len(texts), 256):
        out += tok(texts[at : at + 256], return_attention_mask=False)["input_ids"]
    return out


def _padded(rows: list[list[int]], width: int, pad: int) -> Tensor:
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def _images(ds: Any, column: str) -> Tensor:
    x = torch.from_numpy(np.asarray(ds[column], dtype=np.float32))
    return x.unsqueeze(1) if x.ndim == 3 else x  # [n, h, w] images: one channel (as the store)


def _localize_task(context: Any) -> _LocalizeTask | None:
    """The clean/corrupted pairs, metric and defaults localize_circuit runs with (those of
    :func:`hookscope.interventions.build_task`, as ``hookscope localize``), or None."""
    from hookscope import interventions as iv

    p = context.params
    name = p.localize
    if name == "auto":
        dataset = context.spec.dataset.name
        name = dataset if dataset in iv.TASKS else "none"
    if name == "none":
        return None
    try:
        task = iv.build_task(name, context.model, n=p.localize_n, seed=context.seed)
    except HookscopeError as err:
        raise ExperimentError(f"action.params.localize: {' '.join(str(err).split())}") from None
    return _LocalizeTask(
        task.name,
        task.clean,
        task.corrupted,
        task.metric,
        task.direction,
        task.criterion,
        p.localize_sites or task.sites,
    )


def _prepare_behaviour_only(context: Any, prep: _Prepared) -> _Prepared:
    p = context.params
    if prep.task is None:
        raise ExperimentError(
            f"action.params.localize: the dataset {context.spec.dataset.name!r} gives this model "
            "nothing to extract (no text or image column), so only the behaviour of a localize "
            "task can be measured; set localize to induction (or ioi)"
        )
    if p.behaviour not in ("auto", "task"):
        raise ExperimentError(
            f"action.params.behaviour: {p.behaviour!r} needs dataset rows to run on; with nothing to "
            "extract, the behaviour is the localize task's metric (auto or task)"
        )
    for key in ("candidates", "readouts"):
        if getattr(p, key):
            raise ExperimentError(
                f"action.params.{key}: there are no probed sites in the behaviour-only mode"
            )
    task = prep.task
    prep.behaviour = _Behaviour(
        "task",
        bool(getattr(task.metric, "higher_is_better", True)),
        task.metric.bind(context.model),
    )
    prep.data = _Data(
        [_Batch(task.clean, task.corrupted, np.arange(task.clean.shape[0]))],
        positional=True,
        policy="task",
    )
    prep.notes.append(
        f"Behaviour-only mode: dataset {context.spec.dataset.name!r} gives the model "
        f"{context.spec.extraction.model} no text or image column to extract "
        f"(it has no tokenizer), so extraction.sites ({', '.join(context.sites)}) were not probed. The candidates "
        f"are localize_circuit's ranking on {task.name}, and each intervention is scored by the task's "
        f"metric ({getattr(task.metric, 'name', 'metric')}) on its {task.clean.shape[0]} clean sequences."
    )
    return prep


# ---------------------------------------------------------------------------- interventions
@dataclass
class _Pass:
    """One pass over the batches: per-row behaviour values (and the classifier's
    predictions), readout features of the held-out rows, component means."""

    behaviour: np.ndarray | None
    prediction: np.ndarray | None
    features: dict[str, Tensor]
    means: dict[str, Tensor]


def _features(t: Tensor, batch: _Batch, data: _Data) -> Tensor:
    """A site's activation ``t`` of one batch as the store's rows: [b, width] float32."""
    b = t.shape[0]
    if data.policy == "mean":
        m = batch.mask.to(t.device, torch.float32).reshape(b, -1, *([1] * (t.ndim - 2)))
        t = (t.float() * m).sum(1) / m.sum(1)
    elif batch.read is not None:
        t = t[torch.arange(b, device=t.device), batch.read.to(t.device)]
    return t.reshape(b, -1).float().cpu()


def _behaviour_values(
    out: Tensor, batch: _Batch, behaviour: _Behaviour
) -> tuple[Tensor, Tensor | None]:
    """Per-row behaviour of one batch's output (and the classifier's argmax)."""
    from hookscope import interventions as iv

    if behaviour.name == "accuracy":
        if out.ndim != 2:
            raise ExperimentError(
                f"action.params.behaviour: 'accuracy' needs a classifier output [batch, classes]; the "
                f"model returns {tuple(out.shape)}"
            )
        pred = out.argmax(-1).cpu()
        return (pred == batch.extra["label"]).double(), pred
    if behaviour.name == "logit_diff":
        metric = iv.logit_diff(
            batch.extra["correct"], batch.extra["incorrect"], position=batch.extra["last"]
        )
        return metric.per_example(out).double().cpu(), None
    return behaviour.metric.per_example(out).double().cpu(), None


def _run_pass(
    model: Any,
    data: _Data,
    behaviour: _Behaviour | None,
    readouts: list[str],
    keep: np.ndarray | None,
    component: str | None = None,
    make_hook: Any = None,
    means_of: tuple[str, ...] = (),
) -> _Pass:
    """Every batch through the model (``component`` replaced by ``make_hook(batch)``'s hook);
    features of ``readouts`` kept for the dataset rows ``keep``; means of ``means_of``."""
    values, preds = [], []
    feats: dict[str, list[Tensor]] = {r: [] for r in readouts}
    sums: dict[str, _Mean] = {}
    names = list(dict.fromkeys([*readouts, *means_of]))
    for batch in data.batches:
        hooks = [] if component is None else [(component, make_hook(batch, component))]
        with torch.no_grad():
            out, cache = model.run_with_cache(batch.inputs, names=names, hooks=hooks)
        if behaviour is not None:
            v, pred = _behaviour_values(out, batch, behaviour)
            values.append(v)
            preds.append(pred)
        if readouts:
            sel = np.flatnonzero(np.isin(batch.rows, keep))
            for r in readouts:
                feats[r].append(_features(cache[r], batch, data)[torch.as_tensor(sel)])
        for c in means_of:
            sums.setdefault(c, _Mean()).add(
                cache[c], batch.mask if data.positional else None, data.positional
            )
    behaviour_rows = torch.cat(values).numpy() if values else None
    prediction = torch.cat(preds).numpy() if preds and preds[0] is not None else None
    features = {r: torch.cat(v) for r, v in feats.items()}
    means = {c: m.value for c, m in sums.items()}
    return _Pass(behaviour_rows, prediction, features, means)


class _Mean:
    """Streaming mean of a component's activation over rows and, for token inputs, over
    every real token (padding excluded), summed in float64; ``value`` broadcasts against
    one batch's activation (ablation's mean convention without per-position means)."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0.0
        self.dtype = torch.float32

    def add(self, act: Tensor, mask: Tensor | None, positional: bool) -> None:
        dims = [0, 1] if positional else [0]
        w = torch.ones(act.shape[: len(dims)], dtype=torch.float64, device=act.device)
        if mask is not None:
            w = mask.to(act.device, torch.float64)
        w = w.reshape(*w.shape, *([1] * (act.ndim - len(dims))))
        total = (act.double() * w).sum(dims, keepdim=True)
        self.total = total if self.total is None else self.total + total
        self.count += float(w.sum())
        self.dtype = act.dtype

    @property
    def value(self) -> Tensor:
        assert self.total is not None
        return (self.total / self.count).to(self.dtype)


def _hook_factory(model: Any, p: Any, means: dict[str, Tensor]) -> Any:
    """``make_hook(batch, component)``: the hook writing the intervention's value."""
    if p.intervention == "patching":

        def make_patch(batch: _Batch, component: str):
            with torch.no_grad():
                _, cache = model.run_with_cache(batch.corrupted, names=[component])
            value = cache[component]
            return lambda act, address: value.to(act.device, act.dtype)

        return make_patch
    if p.ablation == "zero":
        return lambda batch, component: lambda act, address: torch.zeros_like(act)

    def make_mean(batch: _Batch, component: str):
        value = means[component]
        return lambda act, address: value.to(act.device, act.dtype).expand_as(act)

    return make_mean


def _drop(clean: float, value: float, higher_is_better: bool = True) -> float:
    return clean - value if higher_is_better else value - clean


def _probe_score(probe: Any, X: Tensor, y: np.ndarray, metric: str) -> float:
    """``metric`` of a fitted sweep probe on features ``X`` against labels ``y`` (the sweep's
    own definition, :func:`hookscope.probes.stats.metric_values`)."""
    from hookscope.probes.stats import metric_values

    if probe.task == "classification":
        target = torch.as_tensor(np.searchsorted(probe.classes_, y))
        pred = torch.as_tensor(probe.predict_proba(X))
    else:
        target = torch.as_tensor(y, dtype=torch.float64)
        pred = torch.as_tensor(probe.decision_function(X))
    return float(metric_values(metric, target, pred)[0])


def _intervene(
    prep: _Prepared, top: list[str], readouts: list[str], keep: np.ndarray | None, score: Any
) -> tuple[dict, dict, list[pd.DataFrame], _Pass]:
    """The clean pass and one intervened pass per component of ``top``: (clean values by
    impact column, {component: {impact column: drop}}, per-row behaviour frames, the clean
    pass). Impact columns: ``probe_drop[<readout>]`` and ``behaviour_drop``."""
    from tqdm.auto import tqdm

    p, model, data, behaviour = prep.params, prep.model, prep.data, prep.behaviour
    mean_needed = p.intervention == "ablation" and p.ablation == "mean"
    base = _run_pass(
        model, data, behaviour, readouts, keep, means_of=tuple(top) if mean_needed else ()
    )
    clean = {_probe_column(r): score(r, base.features[r]) for r in readouts}
    if behaviour is not None:
        clean[BEHAVIOUR] = float(base.behaviour.mean())
    make_hook = _hook_factory(model, p, base.means)
    rows = np.concatenate([b.rows for b in data.batches])
    frames = [_frame(rows, "clean", base)] if behaviour is not None else []
    drops: dict[str, dict[str, float]] = {}
    for component in tqdm(top, desc="intervene", disable=not prep.progress):
        res = _run_pass(model, data, behaviour, readouts, keep, component, make_hook)
        drops[component] = {
            _probe_column(r): clean[_probe_column(r)] - score(r, res.features[r]) for r in readouts
        }
        if behaviour is not None:
            drops[component][BEHAVIOUR] = _drop(
                clean[BEHAVIOUR], float(res.behaviour.mean()), behaviour.higher_is_better
            )
            frames.append(_frame(rows, component, res))
    return clean, drops, frames, base


def _probe_column(readout: str) -> str:
    return f"probe_drop[{readout}]"


def _frame(rows: np.ndarray, component: str, res: _Pass) -> pd.DataFrame:
    out = pd.DataFrame({"row": rows, "component": component, "behaviour": res.behaviour})
    if res.prediction is not None:
        out["prediction"] = res.prediction
    return out


def _run_probing(prep: _Prepared) -> ActionResult:
    from hookscope import probes

    p = prep.params
    sweep = probes.probe_sweep(
        prep.acts,
        prep.label,
        **sweep_options(p, prep.split, prep.seed),
        progress=prep.progress,
        **prep.sweep_kw,
    )
    table = sweep.to_pandas()
    key = table.loc[prep.candidates, p.rank_by].to_numpy(dtype=float)
    order = sorted(
        range(len(key)), key=lambda i: (np.isnan(key[i]), -key[i] if not np.isnan(key[i]) else 0, i)
    )
    ranked = [prep.candidates[i] for i in order]
    top = ranked[: p.top_k]
    test = sweep.splits[0]["test"]  # store rows = dataset rows (checked in prepare)
    keep = np.sort(test)
    y = prep.labels[keep]

    def score(readout: str, X: Tensor) -> float:
        return _probe_score(sweep.probes[readout], X, y, sweep.metric)

    clean, drops, frames, base = _intervene(prep, top, prep.readouts, keep, score)
    stored = {
        r: _recollection_error(prep.acts[r][torch.as_tensor(keep)], base.features[r])
        for r in prep.readouts
    }
    primary = _probe_column(prep.readouts[-1])
    keep_cols = [
        c
        for c in table.columns
        if c not in ("metric", "layer", "seeds", "C", "n_train") and not c.endswith("_sd")
    ]
    ranking = table.loc[ranked, keep_cols].copy()
    ranking.insert(0, "rank", range(1, len(ranked) + 1))
    ranking["intervened"] = [s in drops for s in ranked]
    ranking["probe_drop"] = [drops[s][primary] if s in drops else np.nan for s in ranked]
    if prep.behaviour is not None:
        ranking["behaviour_drop"] = [drops[s][BEHAVIOUR] if s in drops else np.nan for s in ranked]
    ranking.index.name = "site"
    impact = pd.DataFrame.from_dict(drops, orient="index")
    impact.index.name = "component"
    figures = {"impact": _impact_figure(impact, clean), "probe_sweep": sweep.plot()}
    tables = {"ranking": ranking, "impact": impact}
    notes = list(prep.notes)
    circuit = None
    if prep.task is not None:
        circuit = _localize(prep)
        tables["circuit"] = _circuit_table(circuit)
        figures["circuit"] = circuit.plot()
    kinds = sorted({_kind(s) for s in prep.sites})
    notes.append(
        f"Probed {len(prep.sites)} sites ({', '.join(kinds)}) with {sweep.config['seeds']} seeds, "
        f"{sweep.config['bootstrap']} bootstrap resamples and controls {', '.join(sweep.controls) or 'none'}; "
        f"{len(prep.candidates)} candidates ranked by {p.rank_by}."
    )
    if not any(_kind(s) in ("attn_out", "head", "mlp_out") for s in prep.sites):
        notes.append(
            "This model has no attention or MLP sub-blocks among the probed sites (the digits MLP and CNN have "
            "none: their streams are resid_post.L and the neurons / channels neuron.L.I), so the candidates are "
            "layers and units."
        )
    notes.append(
        f"Interventions ({_intervention_name(p.model_dump())}) run on all {len(prep.labels)} rows; probe drops are "
        f"scored on the {len(keep)} held-out rows of seed 0's split with the seed-0 probes (not refit); "
        f"re-collected clean activations match the store to a relative error of "
        f"{max(stored.values()):.2g} at most."
    )
    summary: dict[str, Any] = {
        "probe_metric": sweep.metric,
        "rank_by": p.rank_by,
        "intervention": _intervention_name(p.model_dump()),
        "behaviour": None if prep.behaviour is None else prep.behaviour.name,
        "clean": _clean_summary(clean),
        "primary_readout": prep.readouts[-1],
        "top": {
            c: {"rank": i + 1, p.rank_by: float(table.loc[c, p.rank_by]), **drops[c]}
            for i, c in enumerate(top)
        },
    }
    if circuit is not None:
        summary["circuit"] = _circuit_summary(circuit)
    metrics = {
        "mode": "probing",
        "params": p.model_dump(),
        "label": prep.label,
        "probe_metric": sweep.metric,
        "behaviour": None if prep.behaviour is None else prep.behaviour.name,
        "task": None if prep.task is None else prep.task.name,
        "notes": notes,
        "summary": summary,
        "sweep": sweep,
        "clean": clean,
        "drops": drops,
        "ranked": ranked,
        "circuit": circuit,
        "test_rows": keep,
    }
    predictions = pd.concat(frames, ignore_index=True) if frames else None
    return ActionResult(metrics=metrics, tables=tables, figures=figures, predictions=predictions)


def _recollection_error(stored: Tensor, fresh: Tensor) -> float:
    """Relative error of the re-collected clean activations against the store's; an
    ExperimentError when they disagree (the positions would not be the probed ones)."""
    a, b = stored.double().reshape(fresh.shape[0], -1), fresh.double()
    err = float((a - b).norm() / a.norm().clamp_min(1e-30))
    tol = 1e-3 if stored.dtype == torch.float32 else 2e-2
    if err > tol:
        raise ExperimentError(
            f"extraction.positions: the activations re-collected for the interventions differ from the "
            f"stored ones (relative error {err:.3g}); the read positions are not reproduced"
        )
    return err


def _kind(site: str) -> str:
    return site.split(".")[0]


def _localize(prep: _Prepared) -> Any:
    from hookscope.interventions import localize_circuit

    p, t = prep.params, prep.task
    return localize_circuit(
        prep.model,
        t.clean,
        t.corrupted,
        t.metric,
        sites=t.sites,
        method=p.localize_method,
        direction=t.direction,
        threshold=p.threshold,
        candidates=p.localize_candidates,
        criterion=t.criterion,
        progress=prep.progress,
    )


def _circuit_table(circuit: Any) -> pd.DataFrame:
    """localize_circuit's confirmed components, best first (address and position only where
    a component is one position)."""
    table = circuit.to_pandas().set_index("rank")
    if table["position"].isna().all():
        table = table.drop(columns=["address", "position"])
    return table


def _clean_summary(clean: dict) -> dict:
    """The clean values by metric: ``probe`` (per readout) and ``behaviour``."""
    out: dict[str, Any] = {
        "probe": {c[len("probe_drop[") : -1]: v for c, v in clean.items() if c != BEHAVIOUR}
    }
    if BEHAVIOUR in clean:
        out["behaviour"] = clean[BEHAVIOUR]
    return out


def _circuit_summary(circuit: Any) -> dict:
    d = circuit.to_dict()
    out = {
        k: d[k]
        for k in (
            "circuit",
            "score",
            "reached",
            "threshold",
            "criterion",
            "direction",
            "method",
            "metric",
        )
    }
    out["baselines"] = d["baselines"]
    if d["faithfulness"] is not None:
        out["faithfulness"] = d["faithfulness"]["faithfulness"]
    return out


def _run_behaviour_only(prep: _Prepared) -> ActionResult:
    p = prep.params
    circuit = _localize(prep)
    top = [str(a) for a, pos in circuit.ranking if pos is None][
        : p.top_k
    ]  # the tasks patch all positions
    clean, drops, frames, _ = _intervene(prep, top, [], None, None)
    table = _circuit_table(circuit)
    table["intervened"] = table["component"].isin(list(drops))
    table["behaviour_drop"] = [
        drops[c][BEHAVIOUR] if c in drops else np.nan for c in table["component"]
    ]
    impact = pd.DataFrame.from_dict(drops, orient="index")
    impact.index.name = "component"
    notes = list(prep.notes)
    notes.append(
        f"localize_circuit ({circuit.method} screen, {circuit.criterion} criterion, {circuit.direction}) found "
        f"{len(circuit.components)} components ({', '.join(str(a) for a in circuit.addresses)}) with set score "
        f"{circuit.score:.3f} ({'reaches' if circuit.reached else 'does not reach'} {circuit.threshold})."
    )
    summary = {
        "intervention": _intervention_name(p.model_dump()),
        "behaviour": f"task ({getattr(prep.task.metric, 'name', 'metric')})",
        "clean": _clean_summary(clean),
        "top": {c: {"rank": i + 1, **drops[c]} for i, c in enumerate(top)},
        "circuit": _circuit_summary(circuit),
    }
    metrics = {
        "mode": "behaviour-only",
        "params": p.model_dump(),
        "label": None,
        "probe_metric": None,
        "behaviour": f"{prep.task.name} {getattr(prep.task.metric, 'name', 'metric')}",
        "task": prep.task.name,
        "notes": notes,
        "summary": summary,
        "clean": clean,
        "drops": drops,
        "ranked": top,
        "circuit": circuit,
    }
    figures = {"impact": _impact_figure(impact, clean), "circuit": circuit.plot()}
    return ActionResult(
        metrics=metrics,
        tables={"ranking": table, "impact": impact},
        figures=figures,
        predictions=pd.concat(frames, ignore_index=True),
    )


# ---------------------------------------------------------------------------- report
def _intervention_name(p: dict) -> str:
    if p["intervention"] == "patching":
        return "patched from the corrupted input"
    return f"{p['ablation']}-ablated"


def _impact_explain(column: str, m: dict) -> str:
    clean = m["clean"].get(column)
    at = f" (clean {clean:.3f})" if isinstance(clean, float) else ""
    if column == BEHAVIOUR:
        return f"{m['behaviour']} on clean inputs{at} minus with the component intervened on; positive = worse"
    site = column[len("probe_drop[") : -1]  # see _probe_column
    return (
        f"the {m['probe_metric']} of {site}'s probe on its held-out rows{at} minus the same probe on "
        "activations re-collected with the component intervened on (0: the site is upstream)"
    )


def _impact_figure(impact: pd.DataFrame, clean: dict) -> Any:
    from hookscope.plot import figure

    cols = list(impact.columns)
    values = impact.to_numpy(dtype=float)
    scale = np.array([abs(clean[c]) if abs(clean[c]) > 1e-12 else 1.0 for c in cols])
    frac = np.clip(values / scale, -1, 1)
    fig = figure(figsize=(1.6 + 1.3 * len(cols), 1.4 + 0.45 * len(impact)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(
                j,
                i,
                f"{values[i, j]:+.3f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(frac[i, j]) > 0.6 else "black",
            )
    ax.set_xticks(
        range(len(cols)),
        [c.replace("probe_drop", "probe Δ").replace("behaviour_drop", "behaviour Δ") for c in cols],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_yticks(range(len(impact)), list(impact.index), fontsize=8)
    ax.set_xlabel("metric (clean − intervened)")
    ax.set_ylabel("component")
    fig.colorbar(im, ax=ax, label="drop / |clean value|")
    fig.tight_layout()
    return fig
