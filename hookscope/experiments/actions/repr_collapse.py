"""repr_collapse: is a label decodable early and lost by the last layer? Where, and why?

* **Decodability curve**: a probe sweep for ``label`` over ``extraction.sites`` (forward
  order) with the run's controls; the *collapse index* is the curve's peak minus its final
  value (:func:`hookscope.analysis.collapse_index`: 0 when the last site is the peak) and
  its *drop points* are the sites where the score falls by at least ``drop_threshold`` from
  the previous site.
* **CKA**: the layer-by-layer ``cka`` matrix (:func:`hookscope.analysis.cka_report`) on at
  most ``max_rows`` rows (a seeded subsample, the same rows for every site), and the same
  matrix with each site's first principal component projected out. The *reference curve* is
  every site's CKA with ``reference`` (``label``: the one-hot label; ``first_site``: the
  first site's activations) with and without PC1 and each site's PC1 variance fraction
  (:func:`hookscope.analysis.collapse_report`), with its own drop points.
* **PC1 diagnostic** (:func:`hookscope.analysis.pc1_diagnostic`) between the decodability
  peak and the final site (the first and the final site when the final site is the peak):
  a high CKA that vanishes without PC1 says one dominant direction carries it.
* **Recoverability** (optional, ``recover_from`` and ``recover_into``): the activation of
  ``recover_into`` is replaced, in the same forward, by the activation of the earlier site
  ``recover_from`` (both extracted sites with the *same per-row shape*: the patch needs equal
  widths, an ExperimentError says so otherwise); every extracted site after
  ``recover_into`` is re-extracted under that patch and probed again on the same splits
  (beside the shuffled-label control when the run has it). If
  the final site's score comes back, the later layers can still carry the label and the
  layers between ``recover_from`` and ``recover_into`` are where it was lost
  (``recovered_fraction``: the final site's gain over the clean run divided by what it lost
  from the peak, reported when it lost at least ``drop_threshold``). The patched
  activations go through a temporary store that is deleted afterwards (they are not the
  model's own activations and never enter the run's store).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from hookscope.actions import Action, ActionResult, Params, register
from hookscope.errors import ExperimentError, HookscopeError, format_choices
from hookscope.experiments.actions.feature_comparison import (
    DERIVED_LABELS,
    check_label,
    forward_order,
    label_values,
    sweep_table,
)
from hookscope.experiments.actions.feature_detection import (
    EXPLAIN,
    json_cell,
    sweep_controls,
    sweep_options,
    table_json,
)

__all__ = ["ReprCollapse"]

COLLAPSE_EXPLAIN = {
    "drop": "the score fell by at least the drop threshold from the previous site",
    "cka_reference": "CKA of the site with the reference (the one-hot label, or the first site)",
    "cka_reference_without_pc1": "the same CKA after projecting out the site's and the reference's first principal component",
    "pc1_fraction": "fraction of the site's variance on its first principal component",
    "cka_drop": "the reference CKA fell by at least the drop threshold from the previous site",
    "clean": "the probe's held-out score at the site in the unpatched model",
    "patched": "the score with recover_from's activation patched into recover_into, with its 95% bootstrap interval",
    "recovered": "patched minus clean: how much of the label the patch brings back",
}


@dataclass
class _Prepared:
    acts: Any
    label: str
    y: np.ndarray
    order: list[str]
    kw: dict
    params: Any
    seed: int
    split: dict
    progress: bool
    patched: dict | None


@register("repr_collapse")
class ReprCollapse(Action):
    """The decodability curve and its collapse index, the layer-by-layer CKA with drop points
    and the PC1 diagnostic, and an optional recoverability patch (see the module docstring)."""

    class Params(Params):
        label: str | None = Field(
            None,
            description="the label: a dataset column or a derived label (parity, large, ink); default dataset.label_column",
        )
        metric: Literal["accuracy", "f1", "auroc"] = Field(
            "accuracy", description="the probes' held-out metric"
        )
        C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic probes")
        seeds: int = Field(5, ge=1, description="splits and control draws")
        bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of the held-out rows")
        permutations: int = Field(200, ge=1, description="permutations for each site's p-value")
        standardize: bool = Field(
            False, description="standardise features before fitting (folded back)"
        )
        drop_threshold: float = Field(
            0.05,
            gt=0,
            description="a fall of at least this from one site to the next is a drop point",
        )
        cka: Literal["linear", "debiased", "rbf"] = Field("linear", description="which CKA")
        reference: Literal["label", "first_site"] = Field(
            "label",
            description="the reference of the CKA curve: the one-hot label or the first site",
        )
        max_rows: int = Field(
            1000, ge=10, description="rows (a seeded subsample) for the CKA computations"
        )
        recover_from: str | None = Field(
            None,
            description="an earlier extracted site whose activation is patched into recover_into",
        )
        recover_into: str | None = Field(
            None,
            description="a later extracted site (same shape as recover_from) replaced by it; the sites after it are probed again",
        )

    def prepare(self, context: Any) -> _Prepared:
        p = context.params
        label = p.label or context.label_column
        check_label(context, label, "action.params.label" if p.label else "dataset.label_column")
        if (p.recover_from is None) != (p.recover_into is None):
            missing = "recover_into" if p.recover_into is None else "recover_from"
            raise ExperimentError(
                f"action.params.{missing}: required with {'recover_from' if missing == 'recover_into' else 'recover_into'}"
            )
        acts = context.activations()
        order = forward_order(acts.sites)
        if len(order) < 2:
            raise ExperimentError(
                f"extraction.sites: a collapse curve needs at least two sites; got {format_choices(order)}"
            )
        y = label_values(context, acts, label)
        kw = sweep_controls(context, acts)
        patched = None
        if p.recover_from is not None:
            source, target, later = _check_patch(p, acts, order)
            patched = {
                "from": source,
                "into": target,
                "sites": later,
                "acts": _patched_activations(context, source, target, later),
            }
        return _Prepared(
            acts,
            label,
            y,
            order,
            kw,
            p,
            context.seed,
            dict(context.spec.dataset.split),
            context.progress,
            patched,
        )

    def run(self, prepared: _Prepared) -> ActionResult:
        from hookscope import analysis, probes

        p, order = prepared.params, prepared.order
        common = {
            **sweep_options(p, prepared.split, prepared.seed),
            "progress": prepared.progress,
        }
        sweep = probes.probe_sweep(prepared.acts, prepared.y, **common, **prepared.kw)
        table = sweep_table(sweep, order)
        curve = analysis.CollapseReport.from_curve(
            torch.tensor(table["score"].to_numpy()), order, p.drop_threshold
        )
        table.insert(4, "drop", [s in curve.drop_points for s in order])
        # ---- CKA on a seeded subsample of rows
        n = prepared.acts.n_rows
        rng = np.random.default_rng([prepared.seed, 31337])
        rows = np.sort(rng.choice(n, p.max_rows, replace=False)) if n > p.max_rows else np.arange(n)
        mats = {}
        for site in order:
            x = prepared.acts[site][torch.from_numpy(rows)]
            mats[site] = x.reshape(x.shape[0], -1).to(torch.float64)
        cka = analysis.cka_report(mats, kind=p.cka, progress=False)
        cka_wo = analysis.cka_report(mats, kind=p.cka, remove_pc1=True, progress=False)
        if p.reference == "label":
            from hookscope.probes.linear import encode_labels

            codes = encode_labels(prepared.y[rows], len(rows), "label")[1]
            ref = torch.nn.functional.one_hot(torch.as_tensor(codes)).to(torch.float64)
        else:
            ref = mats[order[0]]
        ref_curve = analysis.collapse_report(
            mats, ref, kind=p.cka, drop_threshold=p.drop_threshold, pc1=True, progress=False
        )
        table["cka_reference"] = ref_curve.curve.numpy()
        table["cka_reference_without_pc1"] = ref_curve.curve_without_pc1.numpy()
        table["pc1_fraction"] = ref_curve.pc1_fraction.numpy()
        table["cka_drop"] = [s in ref_curve.drop_points for s in order]
        peak, final = curve.peak_layer, order[-1]
        pair = (peak if peak != final else order[0], final)
        pc1 = analysis.pc1_diagnostic(mats[pair[0]], mats[pair[1]], kind=p.cka)
        # ---- recoverability
        recovery = None
        if prepared.patched is not None:
            recovery = _recover(prepared, common, table)
        figures = {
            "collapse": _plot(table, order, curve, ref_curve, p, recovery),
            "cka": cka.plot(),
            "cka_without_pc1": cka_wo.plot(),
        }
        return ActionResult(
            metrics={
                "sweep": sweep,
                "curve": curve,
                "ref_curve": ref_curve,
                "cka": cka,
                "cka_without_pc1": cka_wo,
                "pc1": pc1,
                "pc1_pair": pair,
                "rows": len(rows),
                "label": prepared.label,
                "params": p,
                "recovery": recovery,
                "order": order,
            },
            tables={
                "curve": table,
                "cka": cka.to_pandas(),
                "cka_without_pc1": cka_wo.to_pandas(),
                **({"recovery": recovery["table"]} if recovery else {}),
            },
            figures=figures,
            predictions=_predictions(sweep, prepared.acts, order, prepared.y),
        )

    def summarize(self, result: ActionResult) -> dict:
        m = result.metrics
        p, curve, ref_curve, pc1 = m["params"], m["curve"], m["ref_curve"], m["pc1"]
        table = result.tables["curve"]
        explain = {
            **EXPLAIN,
            **COLLAPSE_EXPLAIN,
            "n_train": "training rows per seed",
            "C": "the probes' inverse L2 strength",
        }
        cka_explain = {
            s: f"{p.cka} CKA of the row's site with {s} (1 = the same representation up to rotation and scale)"
            for s in m["order"]
        }
        ref_name = (
            "the one-hot label" if p.reference == "label" else f"the first site ({m['order'][0]})"
        )
        metrics = {
            "label": m["label"],
            "metric": p.metric,
            "sites": m["order"],
            "curve": {s: json_cell(v) for s, v in table["score"].items()},
            "collapse_index": curve.collapse_index,
            "peak_site": curve.peak_layer,
            "peak_score": float(curve.curve.max()),
            "final_score": float(curve.curve[-1]),
            "drop_points": curve.drop_points,
            "drop_threshold": p.drop_threshold,
            "cka_kind": p.cka,
            "cka_rows": m["rows"],
            "cka_reference": p.reference,
            "cka_reference_curve": {
                s: float(v) for s, v in zip(m["order"], ref_curve.curve.tolist(), strict=True)
            },
            "cka_reference_collapse_index": ref_curve.collapse_index,
            "cka_reference_collapse_index_without_pc1": ref_curve.collapse_index_without_pc1,
            "cka_reference_drop_points": ref_curve.drop_points,
            "pc1_diagnostic": {
                "sites": list(m["pc1_pair"]),
                "cka": pc1.cka,
                "cka_without_pc1": pc1.cka_without_pc1,
                "pc1_fraction_x": pc1.pc1_fraction_x,
                "pc1_fraction_y": pc1.pc1_fraction_y,
            },
        }
        tables = [
            table_json(
                "curve",
                f"decodability of {m['label']!r} per site ({p.metric}), with the reference CKA",
                table,
                explain,
            ),
            table_json(
                "cka",
                f"layer-by-layer {p.cka} CKA ({m['rows']} rows)",
                result.tables["cka"].rename_axis("site"),
                cka_explain,
            ),
            table_json(
                "cka_without_pc1",
                f"{p.cka} CKA after projecting out each site's first principal component",
                result.tables["cka_without_pc1"].rename_axis("site"),
                cka_explain,
            ),
        ]
        figures = [
            {
                "name": "collapse",
                "title": "Decodability and reference CKA per site",
                "caption": f"The probe's held-out {p.metric} with its 95% bootstrap band (dotted: shuffled labels), the CKA with "
                f"{ref_name} with and without PC1, drop points as red lines"
                + ("; the patched run's scores as squares." if m["recovery"] else "."),
            },
            {
                "name": "cka",
                "title": f"Layer-by-layer {p.cka} CKA",
                "caption": f"On {m['rows']} rows, the same for every site.",
            },
            {
                "name": "cka_without_pc1",
                "title": "CKA without each site's first principal component",
                "caption": "Block structure that vanishes here was carried by one dominant direction.",
            },
        ]
        notes = [
            f"Collapse index = peak score - final score = {curve.collapse_index:.3f} (peak at {curve.peak_layer}).",
            f"PC1 diagnostic between {m['pc1_pair'][0]} and {m['pc1_pair'][1]}: {p.cka} CKA {pc1.cka:.3f}, "
            f"{pc1.cka_without_pc1:.3f} without PC1; PC1 carries {pc1.pc1_fraction_x:.0%} and {pc1.pc1_fraction_y:.0%} of their variance.",
            "Derived labels: " + "; ".join(f"{k}: {v}" for k, v in DERIVED_LABELS.items()) + ".",
        ]
        rec = m["recovery"]
        if rec:
            metrics["recoverability"] = {k: v for k, v in rec.items() if k != "table"}
            tables.append(
                table_json(
                    "recovery",
                    f"{rec['recover_from']} patched into {rec['recover_into']}: the later sites probed again",
                    rec["table"],
                    explain,
                )
            )
            notes.append(
                f"Recoverability: with {rec['recover_from']} patched into {rec['recover_into']}, the final site scores "
                f"{rec['recovered_score']:.3f} (clean {rec['clean_final_score']:.3f}, peak {rec['peak_score']:.3f}); "
                "the patched activations were extracted through a temporary store, not the run's."
            )
        return {
            "question": f"Is {m['label']!r} linearly decodable early in the network and lost by its last site "
            f"({m['order'][-1]})? Where does it drop, does the representation's similarity structure drop with it, "
            "and is one dominant principal component behind that structure?",
            "metrics": metrics,
            "tables": tables,
            "figures": figures,
            "notes": notes,
        }


# ---------------------------------------------------------------------------- recoverability
def _canonical(site: str, where: str) -> str:
    from hookscope.addresses import parse

    try:
        return str(parse(site))
    except HookscopeError as err:
        raise ExperimentError(f"{where}: {' '.join(str(err).split())}") from None


def _check_patch(p: Any, acts: Any, order: list[str]) -> tuple[str, str, list[str]]:
    """(source, target, the extracted sites after the target), or an ExperimentError."""
    source = _canonical(p.recover_from, "action.params.recover_from")
    target = _canonical(p.recover_into, "action.params.recover_into")
    for name, site in (("recover_from", source), ("recover_into", target)):
        if site not in order:
            raise ExperimentError(
                f"action.params.{name}: {site!r} is not an extracted site; extraction.sites gives "
                f"{format_choices(order)}"
            )
    if order.index(source) >= order.index(target):
        raise ExperimentError(
            f"action.params.recover_into: {target!r} must come after recover_from {source!r} in the forward pass"
        )
    shapes = acts.manifest["site_shapes"]
    if list(shapes[source]) != list(shapes[target]):
        raise ExperimentError(
            f"action.params.recover_into: patching needs equal widths; {source} is "
            f"{list(shapes[source])} per row but {target} is {list(shapes[target])}"
        )
    later = order[order.index(target) + 1 :]
    if not later:
        raise ExperimentError(
            f"action.params.recover_into: no extracted site comes after {target!r} to probe again; "
            "add a later site to extraction.sites"
        )
    return source, target, later


def _patched_activations(context: Any, source: str, target: str, sites: list[str]) -> dict:
    """``sites`` re-extracted with ``target``'s activation replaced by ``source``'s (the same
    forward), through a temporary store: ``{site: [rows, ...] tensor}`` in memory."""
    from hookscope.store import ActivationStore

    held: dict[str, torch.Tensor] = {}

    def keep(activation: torch.Tensor, address: Any) -> None:
        held["x"] = activation.detach().clone()

    def replace(activation: torch.Tensor, address: Any) -> torch.Tensor:
        return held["x"].to(activation.dtype)

    with tempfile.TemporaryDirectory(prefix="hookscope-patched-") as folder:
        store = ActivationStore(folder)
        with context.model.hooks([(source, keep), (target, replace)]):
            acts = store.extract(
                context.model,
                context.dataset,
                sites,
                context.spec.extraction.positions,
                **context.extract_options(),
            )
        return {s: acts[s].clone() for s in sites}


def _recover(prepared: _Prepared, common: dict, clean: pd.DataFrame) -> dict:
    from hookscope import probes

    patch = prepared.patched
    controls = ["shuffle"] if "shuffle" in clean.columns else []
    sweep = probes.probe_sweep(patch["acts"], prepared.y, controls=controls, **common)
    table = sweep.to_pandas().loc[patch["sites"]]
    out = pd.DataFrame(
        {
            "clean": clean.loc[patch["sites"], "score"],
            "patched": table["score"],
            "ci_low": table["ci_low"],
            "ci_high": table["ci_high"],
        }
    )
    if controls:
        out["shuffle"] = table["shuffle"]
    out["recovered"] = out["patched"] - out["clean"]
    out.index.name = "site"
    final = patch["sites"][-1]
    peak, clean_final = float(clean["score"].max()), float(clean.loc[final, "score"])
    lost = peak - clean_final
    recovered = float(out.loc[final, "patched"])
    return {
        "recover_from": patch["from"],
        "recover_into": patch["into"],
        "sites": {s: {k: json_cell(v) for k, v in out.loc[s].items()} for s in out.index},
        "recovered_score": recovered,
        "clean_final_score": clean_final,
        "peak_score": peak,
        # of what the final site lost; undefined unless it lost at least a drop's worth
        "recovered_fraction": (recovered - clean_final) / lost
        if lost >= prepared.params.drop_threshold
        else None,
        "table": out,
    }


def _predictions(sweep: Any, acts: Any, order: list[str], y: np.ndarray) -> pd.DataFrame:
    """Seed 0's held-out predictions of every site's probe."""
    held = sweep.splits[0]["test"]
    frames = []
    for site in order:
        X = acts[site][held]
        frames.append(
            pd.DataFrame(
                {
                    "row": held,
                    "site": site,
                    "label": y[held],
                    "prediction": sweep.probes[site].predict(X.reshape(X.shape[0], -1)),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    return out.astype({"label": str, "prediction": str}) if out["label"].dtype == object else out


def _plot(
    table: pd.DataFrame, order: list[str], curve: Any, ref_curve: Any, p: Any, recovery: dict | None
):
    from hookscope.plot import figure

    x = np.arange(len(order))
    fig = figure(figsize=(max(5.0, 0.6 * len(order) + 2.5), 3.8))
    ax = fig.subplots()
    ax.fill_between(x, table["ci_low"], table["ci_high"], alpha=0.2, color="C0")
    ax.plot(x, table["score"], "o-", color="C0", label=f"probe {p.metric}")
    if "shuffle" in table.columns:
        ax.plot(x, table["shuffle"], ":", color="C0", lw=1, label="shuffled labels")
    ax.plot(
        x,
        table["cka_reference"],
        "^-",
        color="C1",
        label=f"CKA with {p.reference.replace('_', ' ')}",
    )
    ax.plot(x, table["cka_reference_without_pc1"], "v--", color="C1", lw=1, label="... without PC1")
    for s in curve.drop_points:
        ax.axvline(order.index(s), color="C3", ls=":", lw=1)
    if recovery:
        sites = list(recovery["table"].index)
        ax.plot(
            [order.index(s) for s in sites],
            recovery["table"]["patched"],
            "s",
            color="C2",
            ms=8,
            label=f"{recovery['recover_from']} into {recovery['recover_into']}",
        )
    ax.set_xticks(x, order, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(min(0.0, float(np.nanmin(table[["score", "cka_reference"]].to_numpy()))), 1.02)
    ax.set_title(f"collapse index {curve.collapse_index:.3f} (peak {curve.peak_layer})")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
