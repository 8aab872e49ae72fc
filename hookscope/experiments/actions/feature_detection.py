"""feature_detection: does each site linearly encode the label? A probe sweep with controls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from hookscope.actions import Action, ActionResult, Params, register
from hookscope.errors import ExperimentError

__all__ = [
    "FeatureDetection",
    "ProbeParams",
    "sweep_controls",
    "sweep_options",
    "table_json",
    "json_cell",
    "EXPLAIN",
]

EXPLAIN = {
    "site": "the activation site (address) the probes read",
    "ci_low": "the lower end of the score's 95% bootstrap interval",
    "ci_high": "the upper end of the score's 95% bootstrap interval",
    "n_train": "training rows per seed",
    "C": "the inverse L2 strength of the logistic probe (picked on validation rows from a grid)",
    "score": "the probe's metric on held-out rows, mean over seeds, with its 95% bootstrap interval",
    "sd": "the standard deviation of the score over seeds (splits and control draws)",
    "shuffle": "the same probe trained on shuffled labels: what chance looks like",
    "random_features": "the probe on Gaussian features with the site's mean and covariance: no information, same shape",
    "control_task": "Hewitt & Liang's control task: one random label per type; high means the probe can memorise types",
    "random_init": "the same site of the same architecture with untrained weights",
    "selectivity": "score minus the control task score: what the representation, not the probe, explains",
    "effect": "score minus the shuffled-label score, with its paired bootstrap interval",
    "p_value": "one-sided permutation p-value that the probe beats chance",
    "p_holm": "the p-value after Holm's correction across the sites of the sweep",
    "n_test": "held-out rows per seed",
}


def table_json(name: str, title: str, df: pd.DataFrame, explain: dict[str, str]) -> dict:
    """A DataFrame as the report's table record (index as the first column; NaN as null)."""
    frame = df.reset_index()
    rows = []
    for rec in frame.itertuples(index=False):
        rows.append([json_cell(v) for v in rec])
    cols = [str(c) for c in frame.columns]
    return {
        "name": name,
        "title": title,
        "columns": cols,
        "rows": rows,
        "explain": {c: _explained(c, explain) for c in cols if _explained(c, explain)},
    }


_SUFFIXES = (
    ("_sd", "its standard deviation over seeds"),
    ("_ci_low", "the lower end of its 95% bootstrap interval"),
    ("_ci_high", "the upper end of its 95% bootstrap interval"),
)


def _explained(column: str, explain: dict[str, str]) -> str:
    """The sentence for ``column``: its own, or one derived from its base column's
    (``shuffle_sd``: the shuffled-label score's sd)."""
    if column in explain:
        return explain[column]
    for suffix, text in _SUFFIXES:
        base = column[: -len(suffix)]
        if column.endswith(suffix) and base in explain:
            return f"{base}: {text}"
    return ""


def json_cell(v: Any) -> Any:
    """A table cell or metric as JSON: numpy scalars as Python ones, NaN and inf as null."""
    if isinstance(v, (np.floating, float)):
        return None if not np.isfinite(v) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    return v if isinstance(v, (int, str)) or v is None else str(v)


_SWEEP_PARAMS = ("metric", "C", "alpha", "seeds", "bootstrap", "permutations", "standardize", "cv")


def sweep_options(params: Any, split: Any, seed: int) -> dict[str, Any]:
    """:func:`~hookscope.probes.probe_sweep` keywords from an action's parameters (those of
    metric, C, alpha, seeds, bootstrap, permutations, standardize and cv it has; ``probe``
    picks the task, logistic when absent) and the run's split and seed."""
    out = {k: getattr(params, k) for k in _SWEEP_PARAMS if hasattr(params, k)}
    probe = getattr(params, "probe", "logistic")
    out["task"] = "classification" if probe == "logistic" else "regression"
    return {**out, "split": split, "seed": seed}


def sweep_controls(context: Any, acts: Any) -> dict[str, Any]:
    """probe_sweep keyword arguments for the run's controls (the control task's type column,
    the untrained model's activations)."""
    from hookscope import probes

    kw: dict[str, Any] = {"controls": context.controls}
    if "control_task" in context.controls:
        key = context.control_key()
        if key is None:
            index = list(acts.index.columns)
            key = "token" if "token" in index else None
            if key is None:
                raise ExperimentError(
                    "controls: control_task needs a type column (key: ...); this extraction's "
                    f"index has {index} and the dataset has {context.dataset.column_names}"
                )
        kw["control_task_key"] = key
    if "random_init" in context.controls:
        fresh = probes.random_init(context.model, seed=context.seed)
        kw["random_init"] = context.activations(model=fresh, label="random_init")
    return kw


@dataclass
class _Prepared:
    acts: Any
    label: str
    kw: dict
    params: Any
    seed: int
    split: dict
    progress: bool


class ProbeParams(Params):
    """The probe sweep's parameters, shared by the actions that run one."""

    probe: Literal["logistic", "ridge"] = Field(
        "logistic", description="logistic: classification; ridge: regression"
    )
    metric: Literal["accuracy", "f1", "auroc", "r2"] | None = Field(
        None, description="probe metric; default accuracy (logistic) or r2 (ridge)"
    )
    label: str | None = Field(None, description="the label column (default dataset.label_column)")
    C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic probe")
    alpha: float = Field(1.0, gt=0, description="L2 strength of the ridge probe")
    seeds: int = Field(5, ge=1, description="splits and control draws")
    bootstrap: int = Field(1000, ge=1, description="bootstrap resamples of the held-out rows")
    permutations: int = Field(1000, ge=1, description="permutations for the p-value")
    standardize: bool = Field(
        False, description="standardise features before fitting (folded back)"
    )

    def checked_label(self, context: Any) -> str:
        """The label column the probes read (``label``, else the dataset's), checked to exist,
        and the metric checked against the probe."""
        label = self.label or context.label_column
        where = "action.params.label" if self.label else "dataset.label_column"
        context.require_column(label, where)
        if self.probe == "ridge" and self.metric in ("accuracy", "f1", "auroc"):
            raise ExperimentError(
                f"action.params.metric: {self.metric!r} is for logistic probes; ridge takes r2"
            )
        if self.probe == "logistic" and self.metric == "r2":
            raise ExperimentError(
                "action.params.metric: 'r2' is for ridge probes; logistic takes accuracy, f1, auroc"
            )
        return label


@register("feature_detection")
class FeatureDetection(Action):
    """A probe per site (``extraction.sites``) for the dataset's label, with the run's
    controls, seeds, bootstrap intervals, permutation p-values (Holm across sites) and
    selectivity."""

    class Params(ProbeParams):
        cv: int | None = Field(
            None, ge=2, description="k-fold cross-validation instead of the dataset's split"
        )

    def prepare(self, context: Any) -> _Prepared:
        p = context.params
        label = p.checked_label(context)
        acts = context.activations()
        kw = sweep_controls(context, acts)
        split = None if p.cv else dict(context.spec.dataset.split)
        return _Prepared(acts, label, kw, p, context.seed, split, context.progress)

    def run(self, prepared: _Prepared) -> ActionResult:
        from hookscope import probes

        p = prepared.params
        sweep = probes.probe_sweep(
            prepared.acts,
            prepared.label,
            **sweep_options(p, prepared.split, prepared.seed),
            progress=prepared.progress,
            **prepared.kw,
        )
        return ActionResult(
            metrics={"sweep": sweep},
            tables={"sites": sweep.to_pandas()},
            figures={"probe_sweep": sweep.plot()},
            predictions=_predictions(sweep, prepared.acts, prepared.label),
        )

    def summarize(self, result: ActionResult) -> dict:
        sweep = result.metrics["sweep"]
        table = result.tables["sites"]
        keep = [c for c in table.columns if c not in ("metric", "layer", "seeds")]
        best = table["score"].idxmax()
        return {
            "question": f"Which sites linearly encode the label, beyond what the controls ({', '.join(sweep.controls) or 'none'}) explain?",
            "metrics": {
                "metric": sweep.metric,
                "best_site": best,
                "best_score": float(table.loc[best, "score"]),
                "sites": {
                    s: {k: json_cell(v) for k, v in row.items()}
                    for s, row in table[keep].to_dict(orient="index").items()
                },
            },
            "tables": [
                table_json(
                    "sites", f"{sweep.task} probe per site ({sweep.metric})", table[keep], EXPLAIN
                )
            ],
            "figures": [
                {
                    "name": "probe_sweep",
                    "title": "Probe score per site",
                    "caption": "The probe's held-out score with its bootstrap band; the controls beneath (± sd over seeds).",
                }
            ],
            "notes": [
                f"{sweep.config['seeds']} seeds; {sweep.config['bootstrap']} bootstrap resamples; "
                f"{sweep.config['permutations']} permutations ({sweep.config['permutation']}); "
                f"split {sweep.config['split'] or str(sweep.config['cv']) + '-fold cv'}.",
            ],
        }


def _predictions(sweep: Any, acts: Any, label: str) -> pd.DataFrame:
    """Seed 0's held-out predictions of every site's probe (one row per row and site)."""
    rows = sweep.splits[0]
    held = rows["test"] if "test" in rows else np.flatnonzero(rows["folds"] == 0)
    truth = np.asarray(acts.column(label) if label in acts.columns.columns else acts.index[label])
    frames = []
    for site, probe in sweep.probes.items():
        X = acts[site][held]
        frames.append(
            pd.DataFrame(
                {"row": held, "site": site, "label": truth[held], "prediction": probe.predict(X)}
            )
        )
    return pd.concat(frames, ignore_index=True)
