"""feature_comparison: two tasks over the same sites. Which one becomes decodable first?

For labels A and B the action fits a probe sweep per task over ``extraction.sites`` (with
the run's controls, seeds, bootstrap intervals and Holm-corrected p-values) and reads each
task's *layer curve*: the sweep's score per site, sites in forward-pass order. Per curve:

* ``auc``: the area under the curve by the trapezoid rule over the site positions
  ``0 .. L-1``, divided by ``L - 1`` (so it is the curve's mean height under linear
  interpolation, in the metric's units; with one site, that site's score);
* ``peak``: the site of the highest score (the first one on ties);
* ``first_above``: the first site whose score reaches ``threshold`` (none when no site does).

**The paired test.** The sweeps stratify their splits on their own labels, so their held-out
rows differ and cannot be resampled together. For the differences the action fits one more
probe per site and task on a *common* split (stratified on the pair (A, B), seeded by the
run's seed, the config's test fraction held out), predicts the common held-out rows, and
bootstraps those rows (the same resample for both tasks and every site): each replicate
recomputes both curves, their AUCs and peaks. It reports the AUC difference A - B with its
percentile interval and a two-sided bootstrap p-value, the peak-position difference
(A's peak index minus B's, in sites) with its interval, and the fraction of replicates in
which A peaks strictly before B. The held-out predictions of these probes are the run's
predictions.parquet.

**Labels.** A label is a column of the dataset or one of :data:`DERIVED_LABELS`, computed
from the dataset when no column has that name (the three actions share them):

* ``parity``: the label column modulo 2 (1 = odd), for integer labels;
* ``large``: 1 where the label column is >= 5 (digits 5-9), for integer labels;
* ``ink``: 1 where the image's total ink (the sum of its pixel values) is above the median
  over the dataset's images, for image datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from hookscope.actions import Action, ActionResult, Params, register
from hookscope.errors import ExperimentError, HookscopeError, format_choices
from hookscope.experiments.actions.feature_detection import (
    EXPLAIN,
    json_cell,
    sweep_controls,
    sweep_options,
    table_json,
)

__all__ = [
    "DERIVED_LABELS",
    "FeatureComparison",
    "check_label",
    "curve_auc",
    "forward_order",
    "label_values",
    "sweep_table",
]

DERIVED_LABELS = {
    "parity": "the label column modulo 2 (1 = odd); integer labels",
    "large": "1 where the label column is >= 5 (the digits 5-9), else 0; integer labels",
    "ink": "1 where the image's total ink (sum of its pixel values) is above the median over "
    "the dataset's images, else 0; image datasets",
}

COMPARISON_EXPLAIN = {
    "task": "which label the row's probe decodes",
    "auc": "area under the layer curve (trapezoid over the site positions, divided by the number of steps): the curve's mean height",
    "peak_site": "the site with the highest score (the first on ties)",
    "peak_index": "the peak's position among the sites in forward order (0 = first)",
    "peak_score": "the score at the peak",
    "first_above": "the first site whose score reaches the threshold (empty when none does)",
    "first_above_index": "that site's position among the sites in forward order",
    "statistic": "what is compared between the two tasks, on the common held-out rows",
    "estimate": "its value on all common held-out rows, with the 95% bootstrap interval",
    "p_value": "two-sided bootstrap p-value that the difference is zero (the percentile interval inverted)",
    "replicates": "bootstrap resamples of the common held-out rows",
}


# ---------------------------------------------------------------------------- shared helpers
def check_label(context: Any, name: str, where: str) -> None:
    """ExperimentError naming ``where`` unless ``name`` is a dataset column or a derived
    label this dataset can give."""
    columns = context.dataset.column_names
    if name in columns:
        return
    if name not in DERIVED_LABELS:
        raise ExperimentError(
            f"{where}: {name!r} is neither a column of the dataset nor a derived label; "
            f"columns: {format_choices(columns)}; derived: {format_choices(DERIVED_LABELS)}"
        )
    if name == "ink":
        if context.input_column is None or context.input_column not in columns:
            raise ExperimentError(f"{where}: the derived label 'ink' needs an image dataset")
        return
    base = context.label_column
    if base not in columns:
        raise ExperimentError(
            f"{where}: the derived label {name!r} is computed from dataset.label_column "
            f"{base!r}, which is not a column; columns: {format_choices(columns)}"
        )
    kind = np.asarray(context.dataset[base][:1]).dtype.kind
    if kind not in "iu":
        raise ExperimentError(
            f"{where}: the derived label {name!r} needs integer labels in {base!r}"
        )


def label_values(context: Any, acts: Any, name: str) -> np.ndarray:
    """The label ``name`` (a dataset column or a derived label) for every row of ``acts``."""
    example = acts.index["example"].to_numpy()
    data = context.dataset
    if name in data.column_names:
        return np.asarray(data[name])[example]
    if name == "ink":
        images = np.asarray(data[context.input_column], dtype=np.float64)
        ink = images.reshape(images.shape[0], -1).sum(1)
        return (ink > np.median(ink)).astype(np.int64)[example]
    base = np.asarray(data[context.label_column]).astype(np.int64)
    derived = {"parity": base % 2, "large": (base >= 5).astype(np.int64)}[name]
    return derived[example]


def forward_order(sites: list[str]) -> list[str]:
    """Sites in the order the forward pass meets them (as given where an address has no
    order, e.g. ``module:`` paths of different kinds)."""
    from hookscope.addresses import parse

    try:
        return sorted(sites, key=parse)
    except (HookscopeError, TypeError):
        return list(sites)


def curve_auc(curve: np.ndarray) -> np.ndarray:
    """Trapezoid area over positions ``0 .. L-1`` divided by ``L - 1`` (the last axis); a
    one-site curve's area is its score."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.shape[-1] == 1:
        return curve[..., 0]
    inner = (curve[..., 1:] + curve[..., :-1]).sum(-1) / 2
    return inner / (curve.shape[-1] - 1)


def sweep_table(sweep: Any, order: list[str]) -> pd.DataFrame:
    """A sweep's per-site table (sites in ``order``), without the bookkeeping columns."""
    table = sweep.to_pandas().loc[order]
    return table[[c for c in table.columns if c not in ("metric", "layer", "seeds")]]


def common_split(codes: list[np.ndarray], test: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): each stratum of the joint codes cut by ``test``, seeded."""
    joint = np.unique(np.stack(codes, 1), axis=0, return_inverse=True)[1].reshape(-1)
    rng = np.random.default_rng([seed, 2718])
    held = np.zeros(joint.shape[0], dtype=bool)
    for s in np.unique(joint):
        rows = rng.permutation(np.flatnonzero(joint == s))
        held[rows[: int(np.round(test * rows.shape[0]))]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _quantiles(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------- the action
@dataclass
class _Prepared:
    acts: Any
    names: tuple[str, str]
    labels: tuple[np.ndarray, np.ndarray]
    order: list[str]
    kw: dict
    params: Any
    seed: int
    split: dict
    progress: bool


@register("feature_comparison")
class FeatureComparison(Action):
    """Two labels probed over the same sites: layer curves, first site above a threshold,
    peak and area under the curve, and a paired bootstrap test of the differences (see the
    module docstring)."""

    class Params(Params):
        label_a: str = Field(
            description="task A's label: a dataset column or a derived label (parity, large, ink)"
        )
        label_b: str = Field(
            description="task B's label: a dataset column or a derived label (parity, large, ink)"
        )
        metric: Literal["accuracy", "f1", "auroc"] = Field(
            "accuracy", description="the probes' held-out metric"
        )
        threshold: float = Field(
            0.9, gt=0, le=1, description="a curve's first site reaching this score is reported"
        )
        C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic probes")
        seeds: int = Field(5, ge=1, description="splits and control draws of each sweep")
        bootstrap: int = Field(
            1000, ge=10, description="bootstrap resamples (sweep intervals and the paired test)"
        )
        permutations: int = Field(200, ge=1, description="permutations for each site's p-value")
        standardize: bool = Field(
            False, description="standardise features before fitting (folded back)"
        )

    def prepare(self, context: Any) -> _Prepared:
        p = context.params
        check_label(context, p.label_a, "action.params.label_a")
        check_label(context, p.label_b, "action.params.label_b")
        if p.label_a == p.label_b:
            raise ExperimentError(
                f"action.params.label_b: the same label as label_a ({p.label_a!r}); compare two tasks"
            )
        acts = context.activations()
        labels = (label_values(context, acts, p.label_a), label_values(context, acts, p.label_b))
        kw = sweep_controls(context, acts)
        split = dict(context.spec.dataset.split)
        return _Prepared(
            acts,
            (p.label_a, p.label_b),
            labels,
            forward_order(acts.sites),
            kw,
            p,
            context.seed,
            split,
            context.progress,
        )

    def run(self, prepared: _Prepared) -> ActionResult:
        from hookscope import probes

        p, order = prepared.params, prepared.order
        sweeps, tables, rows = {}, {}, []
        for name, y in zip(prepared.names, prepared.labels, strict=True):
            sweep = probes.probe_sweep(
                prepared.acts,
                y,
                **sweep_options(p, prepared.split, prepared.seed),
                progress=prepared.progress,
                **prepared.kw,
            )
            sweeps[name] = sweep
            tables[name] = sweep_table(sweep, order)
            rows.append(_curve_summary(name, tables[name]["score"].to_numpy(), order, p.threshold))
        summary = pd.DataFrame(rows).set_index("task")
        paired, predictions = _paired_test(prepared)
        curves = pd.concat(
            [t.assign(task=name).set_index("task", append=True) for name, t in tables.items()]
        )
        return ActionResult(
            metrics={
                "sweeps": sweeps,
                "summary": summary,
                "paired": paired,
                "names": prepared.names,
                "order": order,
                "threshold": p.threshold,
                "metric": p.metric,
            },
            tables={"curves": curves, "summary": summary, "paired": paired["table"]},
            figures={"layer_curves": _plot(tables, prepared.names, order, summary, p)},
            predictions=predictions,
        )

    def summarize(self, result: ActionResult) -> dict:
        m = result.metrics
        a, b = m["names"]
        summary, paired = m["summary"], m["paired"]
        sweep = m["sweeps"][a]
        curves = result.tables["curves"].reset_index(level="task")
        curves = curves[["task", *[c for c in curves.columns if c != "task"]]]
        explain = {
            **EXPLAIN,
            **COMPARISON_EXPLAIN,
            "n_train": "training rows per seed",
            "C": "the probes' inverse L2 strength",
        }
        per_task = {}
        for name in (a, b):
            row = summary.loc[name]
            per_task[name] = {
                "curve": {
                    s: json_cell(v)
                    for s, v in result.tables["curves"].xs(name, level="task")["score"].items()
                },
                **{k: json_cell(v) for k, v in row.items()},
            }
        return {
            "question": f"Over the sites {', '.join(m['order'])}, does {a!r} become linearly "
            f"decodable before {b!r} (first site above {m['threshold']:g}, peak, area under the "
            "layer curve), and are the differences larger than the sampling noise?",
            "metrics": {
                "metric": m["metric"],
                "threshold": m["threshold"],
                "label_a": a,
                "label_b": b,
                "sites": m["order"],
                "tasks": per_task,
                "auc_difference": paired["auc_difference"],
                "peak_difference": paired["peak_difference"],
                "a_peaks_first": paired["a_peaks_first"],
                "peaks_tied": paired["peaks_tied"],
                "paired_rows": paired["rows"],
            },
            "tables": [
                table_json(
                    "curves", f"layer curves: {sweep.metric} per site and task", curves, explain
                ),
                table_json(
                    "summary",
                    "per task: area under the curve, peak and first site above the threshold",
                    summary,
                    explain,
                ),
                table_json(
                    "paired",
                    f"{a} minus {b}: paired bootstrap on the common held-out rows",
                    paired["table"],
                    explain,
                ),
            ],
            "figures": [
                {
                    "name": "layer_curves",
                    "title": "Layer curves of both tasks",
                    "caption": f"Each task's held-out {m['metric']} per site with its 95% bootstrap band; "
                    f"dotted: the shuffled-label control; dashed: the threshold {m['threshold']:g}; stars: the peaks.",
                }
            ],
            "notes": [
                f"{sweep.config['seeds']} seeds per sweep; {sweep.config['bootstrap']} bootstrap resamples; "
                f"{sweep.config['permutations']} permutations ({sweep.config['permutation']}); split {sweep.config['split']}.",
                "The paired test refits one probe per site and task on a common split stratified on both "
                f"labels ({paired['rows']} held-out rows; the sweeps' splits stratify on one label each, so "
                "their held-out rows differ) and resamples those rows for both tasks at once.",
                "Derived labels: "
                + "; ".join(f"{k}: {v}" for k, v in DERIVED_LABELS.items())
                + ".",
            ],
        }


def _curve_summary(name: str, curve: np.ndarray, order: list[str], threshold: float) -> dict:
    peak = int(np.argmax(curve))
    above = np.flatnonzero(curve >= threshold)
    first = int(above[0]) if above.size else None
    return {
        "task": name,
        "auc": float(curve_auc(curve)),
        "peak_site": order[peak],
        "peak_index": peak,
        "peak_score": float(curve[peak]),
        "first_above": order[first] if first is not None else None,
        "first_above_index": first,
    }


def _paired_test(prepared: _Prepared) -> tuple[dict, pd.DataFrame]:
    """Both tasks' probes on a common split; the held-out rows bootstrapped together."""
    from hookscope.probes import LinearProbe
    from hookscope.probes.linear import encode_labels
    from hookscope.probes.stats import metric_values, resample_indices

    p, order = prepared.params, prepared.order
    a, b = prepared.names
    n = prepared.acts.n_rows
    coded = [
        encode_labels(y, n, name)[1]
        for name, y in zip(prepared.names, prepared.labels, strict=True)
    ]
    train, test = common_split(coded, prepared.split["test"], prepared.seed)
    gen = torch.Generator().manual_seed(int(prepared.seed) * 7907 + 11)
    idx = resample_indices(len(test), p.bootstrap, gen)
    full = np.zeros((2, len(order)))
    reps = np.zeros((2, p.bootstrap, len(order)))
    frames = []
    for j, site in enumerate(order):
        X = prepared.acts[site]
        X = X.reshape(X.shape[0], -1).to(torch.float64)
        for t, (name, y) in enumerate(zip(prepared.names, prepared.labels, strict=True)):
            probe = LinearProbe(C=p.C, standardize=p.standardize).fit(X[train], y[train])
            proba = torch.as_tensor(probe.predict_proba(X[test]))
            codes = torch.as_tensor(np.searchsorted(probe.classes_, y[test]))
            full[t, j] = float(metric_values(p.metric, codes, proba)[0])
            reps[t, :, j] = metric_values(p.metric, codes, proba, idx).numpy()
            frames.append(
                pd.DataFrame(
                    {
                        "row": test,
                        "site": site,
                        "task": name,
                        "label": y[test],
                        "prediction": probe.classes_[proba.argmax(1).numpy()],
                    }
                )
            )
    auc = curve_auc(full)
    auc_reps = curve_auc(reps)  # [2, R]
    d_auc = auc_reps[0] - auc_reps[1]
    peaks = np.argmax(full, 1)
    peak_reps = np.argmax(reps, 2)  # [2, R]
    d_peak = peak_reps[0] - peak_reps[1]
    r = p.bootstrap
    p_auc = min(1.0, 2 * min(1 + int((d_auc <= 0).sum()), 1 + int((d_auc >= 0).sum())) / (r + 1))
    auc_diff = {
        "estimate": float(auc[0] - auc[1]),
        **dict(zip(("ci_low", "ci_high"), _quantiles(d_auc), strict=True)),
        "p_value": p_auc,
        "auc_a": float(auc[0]),
        "auc_b": float(auc[1]),
    }
    peak_diff = {
        "estimate": int(peaks[0] - peaks[1]),
        **dict(zip(("ci_low", "ci_high"), _quantiles(d_peak), strict=True)),
        "peak_a": order[int(peaks[0])],
        "peak_b": order[int(peaks[1])],
    }
    table = pd.DataFrame(
        [
            {
                "statistic": f"auc ({a} - {b})",
                "estimate": auc_diff["estimate"],
                "ci_low": auc_diff["ci_low"],
                "ci_high": auc_diff["ci_high"],
                "p_value": p_auc,
                "replicates": r,
            },
            {
                "statistic": f"peak position ({a} - {b}, in sites)",
                "estimate": float(peak_diff["estimate"]),
                "ci_low": peak_diff["ci_low"],
                "ci_high": peak_diff["ci_high"],
                "p_value": None,
                "replicates": r,
            },
            {
                "statistic": f"fraction of resamples where {a} peaks first",
                "estimate": float((d_peak < 0).mean()),
                "ci_low": None,
                "ci_high": None,
                "p_value": None,
                "replicates": r,
            },
        ]
    ).set_index("statistic")
    predictions = pd.concat(frames, ignore_index=True)
    if predictions["label"].dtype == object:
        predictions = predictions.astype({"label": str, "prediction": str})
    paired = {
        "auc_difference": auc_diff,
        "peak_difference": peak_diff,
        "a_peaks_first": float((d_peak < 0).mean()),
        "peaks_tied": float((d_peak == 0).mean()),
        "rows": int(len(test)),
        "curves": {
            name: dict(zip(order, full[t].tolist(), strict=True))
            for t, name in enumerate(prepared.names)
        },
        "table": table,
    }
    return paired, predictions


def _plot(tables: dict, names: tuple[str, str], order: list[str], summary: pd.DataFrame, p: Any):
    from hookscope.plot import figure

    x = np.arange(len(order))
    fig = figure(figsize=(max(5.0, 0.6 * len(order) + 2.5), 3.8))
    ax = fig.subplots()
    for k, name in enumerate(names):
        t = tables[name]
        color = f"C{k}"
        ax.fill_between(x, t["ci_low"], t["ci_high"], alpha=0.2, color=color)
        ax.plot(x, t["score"], "o-", color=color, label=name)
        if "shuffle" in t.columns:
            ax.plot(x, t["shuffle"], ":", color=color, lw=1, label=f"{name}: shuffled labels")
        peak = int(summary.loc[name, "peak_index"])
        ax.plot([peak], [t["score"].iloc[peak]], "*", color=color, ms=14, mec="black")
    ax.axhline(p.threshold, color="gray", ls="--", lw=1, label=f"threshold {p.threshold:g}")
    ax.set_xticks(x, order, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(p.metric)
    ax.set_title(f"{names[0]} vs {names[1]}: probe {p.metric} per site")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
