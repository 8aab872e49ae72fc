"""Result files of the dimensionality-tracking project (``ndt``, github Javihaus/ndt).

:func:`load_ndt` reads the three JSON shapes that project wrote and returns an
:class:`NdtRun` whose ``results`` is hookscope's long results frame (``step``, ``site``,
``metric``, ``value``, ``loss``, ``grad_norm``):

``phase1``
    its Phase-1 calibration files (``experiments/new/phase1_calibration.py``):
    ``{"measurements": [{"step", "epoch", "loss", "grad_norm", "layer_metrics": {layer:
    {"stable_rank", "participation_ratio", "effective_rank_90", "nuclear_norm_ratio"}}}],
    "arch_name", "dataset_name", "num_steps", "measurement_interval", "final_accuracy", ...}``
``records``
    ndt's ``export_to_json``: ``{layer: [{"step", "stable_rank", "participation_ratio",
    "cumulative_90", "nuclear_norm_ratio", "loss", "grad_norm"}, ...]}``
``columnar``
    ``{layer: {"step": [...], "stable_rank": [...], ..., "loss": [...]}}``

Metric names: ``cumulative_90`` and ``effective_rank_90`` become hookscope's ``energy_rank``
(energy 0.9); ``stable_rank``, ``participation_ratio`` and ``nuclear_norm_ratio`` keep their
names. Layer names stay as in the file (they are torch module names, not hookscope
addresses) and their order in the file is the depth order.

**Conventions — these numbers are not hookscope's default metrics.** ndt measured every
metric on *uncentred* activations, and its ``participation_ratio`` is ``(sum s)**2 /
sum(s**2)`` over singular values: hookscope's
``participation_ratio(A, center=False, form="singular_values")``, not the centred
covariance participation ratio hookscope computes by default. Phase-1 reduced each conv
layer's ``[B, C, H, W]`` output to its spatial mean per channel (``[B, C]``) and added
``eps = 1e-10`` to the singular values (a full-rank-1 matrix gives a stable rank of
0.9999999999996, not 1); ndt's own tracker (the source of the other two shapes) flattened
``[B, C, H, W]`` to ``[B, C*H*W]`` and ``[B, T, D]`` to ``[B*T, D]``. :class:`NdtRun`
carries these in ``.conventions`` and in ``results.attrs["conventions"]``, so they travel
with the frame; compare with hookscope numbers only after computing those with the same
conventions.

:func:`ndt_view` turns a results frame into the shape ndt's ``HighFrequencyTracker
.get_results()`` returned (one DataFrame per layer), which ndt's ``export_to_json`` writes
as the ``records`` shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hookscope.errors import InputError, format_choices
from hookscope.tracking.files import results_frame

__all__ = ["load_ndt", "ndt_view", "NdtRun", "NDT_METRICS", "SHAPES", "NDT_COLUMNS"]

#: ndt's metric name -> hookscope's
NDT_METRICS = {
    "stable_rank": "stable_rank",
    "participation_ratio": "participation_ratio",
    "cumulative_90": "energy_rank",
    "effective_rank_90": "energy_rank",
    "nuclear_norm_ratio": "nuclear_norm_ratio",
}
#: the three file shapes load_ndt reads
SHAPES = ("phase1", "records", "columnar")
#: the columns of one layer's frame in ndt's get_results() (see ndt_view)
NDT_COLUMNS = (
    "step",
    "stable_rank",
    "participation_ratio",
    "cumulative_90",
    "nuclear_norm_ratio",
    "loss",
    "grad_norm",
)
_TO_NDT = {
    "stable_rank": "stable_rank",
    "participation_ratio": "participation_ratio",
    "energy_rank": "cumulative_90",
    "nuclear_norm_ratio": "nuclear_norm_ratio",
}
_SCALARS = ("loss", "grad_norm")

_SHARED = {
    "center": False,
    "participation_ratio": (
        "(sum s)^2 / sum(s^2) of the singular values of the uncentred activations = hookscope "
        "participation_ratio(A, center=False, form='singular_values'); NOT hookscope's centred "
        "covariance participation ratio"
    ),
    "energy_rank": "least k whose top k squared singular values hold 90% of sum(s^2), uncentred",
    "stable_rank": "sum(s^2) / s_1^2, uncentred",
    "nuclear_norm_ratio": "sum(s) / s_1, uncentred",
}
_CONVENTIONS = {
    "phase1": {
        **_SHARED,
        "conv_layers": "spatial mean per channel: [B, C, H, W] -> [B, C]",
        "eps": "1e-10 added to the singular values and denominators (values slightly below exact)",
        "rows": "validation examples (5 batches of 32)",
        "source": "ndt experiments/new/phase1_calibration.py",
    },
    "tracker": {
        **_SHARED,
        "conv_layers": "flattened: [B, C, H, W] -> [B, C*H*W] (ndt's tracker; the file does not say)",
        "tokens": "[B, T, D] -> [B*T, D] (ndt's tracker; the file does not say)",
        "source": "ndt HighFrequencyTracker.get_results / export_to_json",
    },
}


@dataclass(repr=False)
class NdtRun:
    """An ndt result file read as hookscope's results frame.

    ``results``: the long frame (``step``, ``site`` = ndt layer name, ``metric``, ``value``,
    ``loss``, ``grad_norm``). ``meta``: what else the file holds (``arch_name``,
    ``dataset_name``, ``num_steps``, ``measurement_interval``, ``final_accuracy``, ... for
    Phase-1) plus ``shape`` and ``path``. ``conventions``: how ndt computed the numbers
    (uncentred; singular-value participation ratio; conv reduction), see the module docstring.
    """

    results: pd.DataFrame
    meta: dict = field(default_factory=dict)
    conventions: dict = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        """Layer names in depth (file) order."""
        return [str(s) for s in pd.unique(self.results["site"])]

    def to_pandas(self) -> pd.DataFrame:
        """The results frame."""
        return self.results

    def __repr__(self) -> str:
        r = self.results
        steps = r["step"]
        span = f"steps {steps.min()}..{steps.max()}" if len(r) else "no steps"
        about = ", ".join(
            f"{k}={self.meta[k]}"
            for k in ("arch_name", "dataset_name", "measurement_interval", "final_accuracy")
            if k in self.meta
        )
        return (
            f"NdtRun({self.meta.get('shape')} file {self.meta.get('path')}: {len(r)} rows, "
            f"{span}, {len(self.sites)} layers ({', '.join(self.sites[:6])}"
            f"{', ...' if len(self.sites) > 6 else ''}), metrics "
            f"{', '.join(pd.unique(r['metric']))}{'; ' + about if about else ''})\n"
            "  conventions: uncentred activations; participation_ratio = (sum s)^2/sum(s^2) "
            "(hookscope: center=False, form='singular_values'); "
            f"conv layers {self.conventions.get('conv_layers', '?')}"
        )


# --------------------------------------------------------------------------- reading


class _Malformed(Exception):
    """Internal: what is wrong with the file, turned into one InputError by load_ndt."""


def load_ndt(path: str | Path) -> NdtRun:
    """Read an ndt result file (any of its three JSON shapes, see the module docstring).

    Raises InputError (one line naming the file, the shape it looked like and the missing or
    wrong key) for a file that is not one of the three shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such ndt result file: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}); expected an ndt result file") from err
    shape = _shape_of(doc)
    try:
        if shape == "phase1":
            rows, meta = _phase1(doc)
        elif shape == "records":
            rows, meta = _records(doc)
        elif shape == "columnar":
            rows, meta = _columnar(doc)
        else:
            raise _Malformed(shape)
    except _Malformed as err:
        raise InputError(f"{path}: {err}") from None
    results = results_frame(
        rows
        if rows
        else pd.DataFrame({c: [] for c in ("step", "site", "metric", "value", "loss", "grad_norm")})
    )
    conventions = dict(_CONVENTIONS["phase1" if shape == "phase1" else "tracker"])
    results.attrs["conventions"] = conventions
    meta = {**meta, "shape": shape, "path": str(path)}
    return NdtRun(results, meta, conventions)


_EXPECTED = (
    "expected one of the three ndt shapes: phase1 {'measurements': [...], ...}, records "
    "{layer: [{'step': ..., metric: ...}, ...]} or columnar {layer: {'step': [...], metric: [...]}}"
)


def _shape_of(doc: Any) -> str:
    if not isinstance(doc, dict):
        return f"the top level is a JSON {type(doc).__name__}; {_EXPECTED}"
    if "measurements" in doc:
        return "phase1"
    if not doc:
        return f"the file holds an empty object; {_EXPECTED}"
    kinds = {type(v).__name__ for v in doc.values()}
    if kinds == {"list"}:
        return "records"
    if kinds == {"dict"}:
        return "columnar"
    return (
        f"no 'measurements' key (phase1) and the layer values are {', '.join(sorted(kinds))} "
        f"rather than all lists (records) or all objects (columnar); {_EXPECTED}"
    )


def _number(v: Any, where: str) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Malformed(f"{where} is {v!r}, expected a number")
    return float(v)


def _step(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise _Malformed(f"{where} is {v!r}, expected a whole-number step")
    return int(v)


def _metric_rows(step: int, layer: str, values: dict, scalars: dict, where: str) -> list[dict]:
    rows = []
    for key, value in values.items():
        if key not in NDT_METRICS:
            continue
        rows.append(
            {
                "step": step,
                "site": layer,
                "metric": NDT_METRICS[key],
                "value": _number(value, f"{where}[{key!r}]"),
                **scalars,
            }
        )
    if not rows:
        raise _Malformed(
            f"{where} holds no ndt metric; expected some of {', '.join(NDT_METRICS)}, "
            f"got {format_choices(values)}"
        )
    return rows


def _phase1(doc: dict) -> tuple[list[dict], dict]:
    ms = doc["measurements"]
    if not isinstance(ms, list):
        raise _Malformed(f"phase1 shape: 'measurements' is a {type(ms).__name__}, expected a list")
    rows: list[dict] = []
    epochs = []
    for i, m in enumerate(ms):
        where = f"phase1 shape: measurements[{i}]"
        if not isinstance(m, dict):
            raise _Malformed(f"{where} is a {type(m).__name__}, expected an object")
        for key in ("step", "layer_metrics"):
            if key not in m:
                raise _Malformed(
                    f"{where} lacks the key {key!r} (each measurement needs step, loss, "
                    "grad_norm, layer_metrics)"
                )
        step = _step(m["step"], f"{where}['step']")
        scalars = {k: _number(m.get(k), f"{where}[{k!r}]") for k in _SCALARS}
        layers = m["layer_metrics"]
        if not isinstance(layers, dict):
            raise _Malformed(
                f"{where}['layer_metrics'] is not an object {{layer: {{metric: value}}}}"
            )
        for layer, values in layers.items():
            lw = f"{where}['layer_metrics'][{layer!r}]"
            if not isinstance(values, dict):
                raise _Malformed(f"{lw} is not an object {{metric: value}}")
            rows += _metric_rows(step, layer, values, scalars, lw)
        epochs.append(m.get("epoch"))
    meta = {k: v for k, v in doc.items() if k != "measurements"}
    if any(e is not None for e in epochs):
        meta["epochs"] = epochs
    return _depth_sorted(rows), meta


def _records(doc: dict) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    for layer, records in doc.items():
        for i, rec in enumerate(records):
            where = f"records shape: [{layer!r}][{i}]"
            if not isinstance(rec, dict):
                raise _Malformed(f"{where} is a {type(rec).__name__}, expected an object")
            if "step" not in rec:
                raise _Malformed(f"{where} lacks the key 'step'")
            step = _step(rec["step"], f"{where}['step']")
            scalars = {k: _number(rec.get(k), f"{where}[{k!r}]") for k in _SCALARS}
            rows += _metric_rows(step, layer, rec, scalars, where)
    return _depth_sorted(rows), {"layers": list(doc)}


def _columnar(doc: dict) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    for layer, cols in doc.items():
        where = f"columnar shape: [{layer!r}]"
        if "step" not in cols:
            raise _Malformed(f"{where} lacks the key 'step'")
        lists = {k: v for k, v in cols.items() if k in NDT_METRICS or k in _SCALARS or k == "step"}
        for k, v in lists.items():
            if not isinstance(v, list):
                raise _Malformed(f"{where}[{k!r}] is a {type(v).__name__}, expected a list")
        n = len(cols["step"])
        bad = {k: len(v) for k, v in lists.items() if len(v) != n}
        if bad:
            raise _Malformed(
                f"{where}: 'step' has {n} entries but "
                + ", ".join(f"{k!r} has {m}" for k, m in bad.items())
            )
        if not any(k in NDT_METRICS for k in lists):
            raise _Malformed(
                f"{where} holds no ndt metric; expected some of {', '.join(NDT_METRICS)}"
            )
        for i in range(n):
            rec = {k: v[i] for k, v in lists.items()}
            w = f"{where} entry {i}"
            step = _step(rec["step"], f"{w} 'step'")
            scalars = {k: _number(rec.get(k), f"{w} {k!r}") for k in _SCALARS}
            rows += _metric_rows(step, layer, rec, scalars, w)
    return _depth_sorted(rows), {"layers": list(doc)}


def _depth_sorted(rows: list[dict]) -> list[dict]:
    """Rows ordered by step, then layer in file (depth) order, then metric order as read."""
    depth = {layer: i for i, layer in enumerate(dict.fromkeys(r["site"] for r in rows))}
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["step"], depth[rows[i]["site"]], i))
    return [rows[i] for i in order]


# --------------------------------------------------------------------------- ndt's shape


def ndt_view(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``{site: DataFrame}`` as ndt's ``HighFrequencyTracker.get_results()`` returned it.

    One frame per site (depth order), one row per step, columns :data:`NDT_COLUMNS`
    (``energy_rank`` becomes ``cumulative_90``; a metric the frame lacks is a NaN column;
    hookscope's ``effective_rank`` has no ndt column and is left out). ``cumulative_90`` is
    int64 when it has no gaps, as in ndt. ndt's ``export_to_json`` of this dict is the
    ``records`` shape :func:`load_ndt` reads. The values are whatever the frame holds: the
    conventions (centring, participation-ratio form) are not converted.
    """
    if not isinstance(results, pd.DataFrame):
        raise InputError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    frame = results_frame(results)
    if "run" in frame.columns and frame["run"].nunique() > 1:
        runs = [str(r) for r in pd.unique(frame["run"])]
        raise InputError(
            f"results hold {len(runs)} runs ({format_choices(runs)}); ndt's shape has one run: "
            "pass results[results.run == RUN]"
        )
    dup = frame.duplicated(["step", "site", "metric"])
    if dup.any():
        r = frame[dup].iloc[0]
        raise InputError(
            f"results hold more than one value for step {r['step']}, site {r['site']!r}, "
            f"metric {r['metric']!r}; ndt's shape has one per step"
        )
    out: dict[str, pd.DataFrame] = {}
    for site in pd.unique(frame["site"]):
        rows = frame[frame["site"] == site]
        wide = rows.pivot(index="step", columns="metric", values="value")
        scal = rows.groupby("step", sort=True)[list(_SCALARS)].first()
        view = pd.DataFrame({"step": wide.index.to_numpy(dtype="int64")})
        for metric, col in _TO_NDT.items():
            view[col] = wide[metric].to_numpy(dtype="float64") if metric in wide.columns else np.nan
        ce = view["cumulative_90"]
        if ce.notna().all() and np.all(np.mod(ce.to_numpy(), 1) == 0):
            view["cumulative_90"] = ce.astype("int64")
        for col in _SCALARS:
            view[col] = scal[col].reindex(wide.index).to_numpy(dtype="float64")
        out[str(site)] = view[list(NDT_COLUMNS)]
    return out
