"""polysemanticity: probes for several features at one site, read against the neuron basis.

For every label in ``labels`` (dataset columns or the derived labels of
:mod:`.feature_comparison`: parity, large, ink) a probe sweep at ``site`` gives the probe's
held-out score with the run's controls and its direction (the unit ``coef_`` averaged over
seeds; a K-class label gives one direction per class, named ``label=class``). The directions
then go to :func:`hookscope.analysis.polysemanticity_report`:

* per direction, neuron alignment (``max_cos``, weight ``participation_ratio``,
  ``kurtosis``), each with its z-score against uniformly random unit directions of the
  same width, and whether it is neuron-aligned (``max_cos >= alignment_threshold`` and
  above the random baseline's 99.9th percentile);
* per neuron, the multi-feature loading index: on how many directions its loading z-score
  ``sqrt(d) w_j / ||w||`` reaches ``z_threshold``;
* the candidate polysemantic neurons: those loading highly on at least two directions whose
  mutual ``|cos|`` is below ``unrelated_below``.

The neuron basis is the site's own coordinates: use an MLP hidden site (``neuron.L``) for
neurons in the usual sense. A direction is only as meaningful as its probe: read the score
and its controls beside each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from hookscope.actions import Action, ActionResult, Params, register
from hookscope.errors import ExperimentError, format_choices
from hookscope.experiments.actions.feature_comparison import (
    DERIVED_LABELS,
    check_label,
    label_values,
)
from hookscope.experiments.actions.feature_detection import (
    EXPLAIN,
    json_cell,
    sweep_controls,
    sweep_options,
    table_json,
)

__all__ = ["Polysemanticity"]

POLY_EXPLAIN = {
    "p_holm": "the p-value after Holm's correction across the features",
    "direction": "the probe direction: the label, and for a multi-class label the class (one direction per class)",
    "feature": "the label the probe decodes",
    "top_neuron": "the neuron with the largest |weight| in the direction",
    "max_cos": "largest |cosine| of the direction with one neuron's axis: 1 = a single neuron carries it",
    "max_cos_z": "max_cos in standard deviations above random unit directions of the same width",
    "participation_ratio": "effective number of neurons the direction uses, (sum w^2)^2 / sum w^4: 1 = one neuron",
    "participation_ratio_z": "participation ratio in standard deviations from random directions (negative = sparser)",
    "kurtosis": "excess kurtosis of the direction's weights: about 0 for a random direction, large for a sparse one",
    "kurtosis_z": "kurtosis in standard deviations from random directions",
    "aligned": "neuron-aligned: max_cos at least the alignment threshold and above the random baseline's 99.9th percentile",
    "high_loadings": "how many neurons load on this direction with |z| at least the z threshold",
    "neuron": "the neuron's index at the site",
    "n_features": "on how many directions the neuron loads highly (its multi-feature loading index)",
    "features": "those directions",
    "max_abs_z": "the neuron's largest |loading z| among them",
}


@dataclass
class _Prepared:
    acts: Any
    site: str
    labels: dict[str, np.ndarray]
    kw: dict
    params: Any
    seed: int
    split: dict
    progress: bool


@register("polysemanticity")
class Polysemanticity(Action):
    """Probes for several labels at one site; neuron alignment of their directions against
    random directions, the multi-feature loading index and the candidate polysemantic
    neurons (see the module docstring)."""

    class Params(Params):
        labels: list[str] = Field(
            min_length=2,
            description="the features: dataset columns or derived labels (parity, large, ink)",
        )
        site: str | None = Field(
            None, description="the site probed (one of extraction.sites; default: the only one)"
        )
        metric: Literal["accuracy", "f1", "auroc"] = Field(
            "accuracy", description="the probes' held-out metric"
        )
        C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic probes")
        seeds: int = Field(
            3, ge=1, description="splits and control draws; the direction is their mean"
        )
        bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of the held-out rows")
        permutations: int = Field(200, ge=1, description="permutations for each probe's p-value")
        standardize: bool = Field(
            False,
            description="standardise features before fitting (folded back: directions act on raw activations)",
        )
        z_threshold: float = Field(
            4.0, gt=0, description="|loading z| at which a neuron loads highly on a direction"
        )
        unrelated_below: float = Field(
            0.5, gt=0, le=1, description="two directions are unrelated when |cos| is below this"
        )
        alignment_threshold: float = Field(
            0.7, gt=0, le=1, description="max |cos| from which a direction counts as neuron-aligned"
        )
        n_baseline: int = Field(2000, ge=10, description="random unit directions in the baseline")

    def prepare(self, context: Any) -> _Prepared:
        p = context.params
        for i, name in enumerate(p.labels):
            check_label(context, name, f"action.params.labels[{i}]")
        dup = [x for i, x in enumerate(p.labels) if x in p.labels[:i]]
        if dup:
            raise ExperimentError(f"action.params.labels: {dup[0]!r} is listed twice")
        acts = context.activations()
        site = _pick_site(p.site, acts.sites)
        labels = {name: label_values(context, acts, name) for name in p.labels}
        kw = sweep_controls(context, acts)
        return _Prepared(
            acts,
            site,
            labels,
            kw,
            p,
            context.seed,
            dict(context.spec.dataset.split),
            context.progress,
        )

    def run(self, prepared: _Prepared) -> ActionResult:
        from hookscope import analysis, probes

        p, site = prepared.params, prepared.site
        directions: dict[str, torch.Tensor] = {}
        rows, feature_of, frames = [], {}, []
        for name, y in prepared.labels.items():
            sweep = probes.probe_sweep(
                prepared.acts,
                y,
                sites=[site],
                **sweep_options(p, prepared.split, prepared.seed),
                progress=False,
                **prepared.kw,
            )
            row = sweep.to_pandas().loc[site]
            rows.append(
                {
                    "feature": name,
                    **{k: row[k] for k in row.index if k not in ("metric", "layer", "seeds")},
                }
            )
            d = sweep.directions[site]
            classes = sweep.config["classes"]
            if d.ndim == 1:
                directions[name] = d
                feature_of[name] = name
            else:
                for k, c in enumerate(classes):
                    directions[f"{name}={c}"] = d[k]
                    feature_of[f"{name}={c}"] = name
            frames.append(_held_out(sweep, prepared.acts, site, name, y))
        report = analysis.polysemanticity_report(
            directions,
            z_threshold=p.z_threshold,
            unrelated_below=p.unrelated_below,
            alignment_threshold=p.alignment_threshold,
            n_baseline=p.n_baseline,
            seed=prepared.seed,
        )
        probes_table = pd.DataFrame(rows).set_index("feature")
        # one site per sweep: the family to correct is the features
        probes_table["p_holm"] = probes.holm(probes_table["p_value"].tolist()).numpy()
        alignment = report.alignment.to_pandas().rename(columns={"probe": "direction"})
        alignment.insert(1, "feature", [feature_of[d] for d in alignment["direction"]])
        alignment["high_loadings"] = (report.loading_z.abs() >= p.z_threshold).sum(1).numpy()
        candidates = report.to_pandas()
        predictions = pd.concat(frames, ignore_index=True)
        if predictions["label"].dtype == object:
            predictions = predictions.astype({"label": str, "prediction": str})
        return ActionResult(
            metrics={
                "report": report,
                "site": site,
                "width": int(report.loading_z.shape[1]),
                "params": p,
                "metric": p.metric,
                "seeds": p.seeds,
                "seed": prepared.seed,
                "directions": {k: v.tolist() for k, v in directions.items()},
            },
            tables={
                "probes": probes_table,
                "alignment": alignment.set_index("direction"),
                "candidates": candidates.set_index("neuron") if len(candidates) else candidates,
            },
            figures={"loadings": report.plot(), "alignment": report.alignment.plot()},
            predictions=predictions,
        )

    def summarize(self, result: ActionResult) -> dict:
        m = result.metrics
        report, p = m["report"], m["params"]
        base = report.alignment.baseline
        alignment = result.tables["alignment"]
        candidates = result.tables["candidates"]
        index = report.loading_index.numpy()
        counts = {str(k): int((index == k).sum()) for k in range(int(index.max()) + 1)}
        explain = {
            **EXPLAIN,
            **POLY_EXPLAIN,
            "n_train": "training rows per seed",
            "C": "the probes' inverse L2 strength",
        }
        cand_table = (
            candidates
            if len(candidates)
            else pd.DataFrame(
                columns=["n_features", "features", "max_abs_z"], index=pd.Index([], name="neuron")
            )
        )
        return {
            "question": f"At {m['site']} ({m['width']} units), are the features "
            f"{', '.join(p.labels)} each carried by single neurons, or spread across neurons, "
            "and which neurons load on several unrelated features?",
            "metrics": {
                "site": m["site"],
                "width": m["width"],
                "metric": m["metric"],
                "probes": {
                    f: {k: json_cell(r[k]) for k in ("score", "ci_low", "ci_high", "p_holm")}
                    for f, r in result.tables["probes"].iterrows()
                },
                "alignment": {
                    d: {
                        k: json_cell(r[k])
                        for k in ("top_neuron", "max_cos", "max_cos_z", "aligned")
                    }
                    for d, r in alignment.iterrows()
                },
                "n_aligned": int(report.alignment.aligned.sum()),
                "n_directions": len(alignment),
                "random_baseline": {
                    "max_cos_mean": base.mean("max_cos"),
                    "max_cos_q999": base.quantile("max_cos", 0.999),
                    "participation_ratio_mean": base.mean("participation_ratio"),
                    "kurtosis_mean": base.mean("kurtosis"),
                    "samples": p.n_baseline,
                },
                "loading_index_counts": counts,
                "candidates": [int(j) for j in report.candidates],
                "z_threshold": p.z_threshold,
                "unrelated_below": p.unrelated_below,
                "alignment_threshold": p.alignment_threshold,
            },
            "tables": [
                table_json(
                    "probes",
                    f"the probe of each feature at {m['site']} ({m['metric']})",
                    result.tables["probes"],
                    explain,
                ),
                table_json(
                    "alignment",
                    "neuron alignment of each direction against random directions",
                    alignment,
                    explain,
                ),
                table_json(
                    "candidates",
                    f"candidate polysemantic neurons (|z| >= {p.z_threshold:g} on unrelated directions)",
                    cand_table,
                    explain,
                ),
            ],
            "figures": [
                {
                    "name": "loadings",
                    "title": "Loading z-scores of the top neurons",
                    "caption": "|loading z| of each direction (rows) on the candidate and most loaded neurons (columns).",
                },
                {
                    "name": "alignment",
                    "title": "Neuron alignment of each direction",
                    "caption": "max |cos| with a neuron against the weight participation ratio; grey: the "
                    "random directions' 0.1-99.9% range; red dotted: the alignment threshold.",
                },
            ],
            "notes": [
                f"Directions: the mean of {m['seeds']} seeds' unit probe directions, renormalised; a "
                "K-class label gives one direction per class.",
                f"Random baseline: {p.n_baseline} uniformly random unit vectors in {m['width']} dimensions "
                f"(seed {m['seed']}).",
                "Derived labels: "
                + "; ".join(f"{k}: {v}" for k, v in DERIVED_LABELS.items())
                + ".",
            ],
        }


def _pick_site(site: str | None, sites: list[str]) -> str:
    if site is None:
        if len(sites) != 1:
            raise ExperimentError(
                f"action.params.site: required when extraction.sites gives several sites "
                f"({format_choices(sites)})"
            )
        return sites[0]
    if site in sites:
        return site
    from hookscope.addresses import parse
    from hookscope.errors import HookscopeError

    try:
        canonical = str(parse(site))
    except HookscopeError as err:
        raise ExperimentError(f"action.params.site: {' '.join(str(err).split())}") from None
    if canonical not in sites:
        raise ExperimentError(
            f"action.params.site: {site!r} is not an extracted site; extraction.sites gives "
            f"{format_choices(sites)}"
        )
    return canonical


def _held_out(sweep: Any, acts: Any, site: str, name: str, y: np.ndarray) -> pd.DataFrame:
    """Seed 0's held-out predictions of the feature's probe."""
    held = sweep.splits[0]["test"]
    X = acts[site][held]
    X = X.reshape(X.shape[0], -1)
    return pd.DataFrame(
        {
            "row": held,
            "feature": name,
            "label": y[held],
            "prediction": sweep.probes[site].predict(X),
        }
    )
