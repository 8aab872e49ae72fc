"""Write a tracking results frame (with its metadata and jumps) to disk, and read it back.

The results frame is long: one row per (step, site, metric) with the columns
``step`` (int64), ``site`` (str), ``metric`` (str), ``value``, ``loss``, ``grad_norm``
(float64, NaN when absent) and optionally ``run`` (kept as given); see
:data:`RESULT_COLUMNS`.
``meta`` is a JSON-serialisable dict (library versions, seeds, settings); ``jumps`` an
optional frame of detected jumps (any columns of numbers, strings or booleans).

Four formats, picked by the file suffix. Format version 1 (:data:`FORMAT`, :data:`VERSION`):

========== ===================================================================================
suffix     layout
========== ===================================================================================
.parquet   one Parquet file (pyarrow); its schema metadata holds ``hookscope.format``,
           ``hookscope.meta`` (meta as JSON) and ``hookscope.jumps`` (the jumps frame as
           JSON ``{"columns": {name: [values]}, "dtypes": {name: dtype}}``, or ``null``)
.csv       the results as CSV, plus a sidecar ``<name>.meta.json`` next to it
           (``results.csv`` -> ``results.meta.json``) holding the format, meta, jumps, the
           column dtypes and the sha256 of the CSV bytes; :func:`load_run` refuses a CSV whose
           sidecar is missing or describes other bytes
.json      ``{"format": "hookscope.tracking", "version": 1, "meta": ..., "results":
           {column: [values]}, "dtypes": {column: dtype}, "jumps": ... | null}``;
           NaN is written as ``null``
.h5/.hdf5  HDF5 through h5py (not PyTables): group ``results`` with one dataset per column
           (strings as variable-length UTF-8), group ``jumps`` likewise when there are jumps;
           root attributes ``format``, ``version`` and ``meta`` (JSON); each group's ``columns``
           attribute (JSON list) keeps the column order and ``dtypes`` their pandas dtypes
========== ===================================================================================

Every file is written to a temporary name in the same folder, fsynced and renamed into
place (:func:`hookscope.store.files.atomic_write`), so a reader sees a whole file or none.

>>> export(results, "run.parquet", meta={"seed": 0}, jumps=jumps)     # doctest: +SKIP
>>> results, jumps, meta = load_run("run.parquet")                   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hookscope.errors import InputError, format_choices
from hookscope.store.files import atomic_write

__all__ = [
    "FORMAT",
    "VERSION",
    "SUFFIXES",
    "RESULT_COLUMNS",
    "results_frame",
    "export",
    "load_run",
    "SavedRun",
    "sidecar_path",
]

FORMAT = "hookscope.tracking"
VERSION = 1
SUFFIXES = (".parquet", ".csv", ".json", ".h5", ".hdf5")
#: the results frame's columns and dtypes (``run`` is optional)
RESULT_COLUMNS: dict[str, str] = {
    "step": "int64",
    "site": "str",
    "metric": "str",
    "value": "float64",
    "loss": "float64",
    "grad_norm": "float64",
}
_OPTIONAL = {"run": "str"}
_REQUIRED = ("step", "site", "metric", "value")


def results_frame(rows: Any) -> pd.DataFrame:
    """The results frame from rows (dicts) or a frame, with the canonical column order and
    dtypes: ``step`` int64; ``site``, ``metric`` str; ``value``, ``loss``, ``grad_norm``
    float64 with NaN for absent ``loss`` / ``grad_norm``. ``run`` (as given) and any other
    columns are kept after these."""
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty and not len(df.columns):
        df = pd.DataFrame(
            {c: pd.Series([], dtype=_pandas_dtype(t)) for c, t in RESULT_COLUMNS.items()}
        )
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise InputError(
            f"a results frame needs the columns {', '.join(_REQUIRED)} (and optionally loss, "
            f"grad_norm, run); missing: {', '.join(missing)}; got {format_choices(df.columns)}"
        )
    for col in ("loss", "grad_norm"):
        if col not in df.columns:
            df[col] = np.nan
    order = list(RESULT_COLUMNS) + [c for c in _OPTIONAL if c in df.columns]
    order += [c for c in df.columns if c not in order]
    df = df[order]
    for col, kind in RESULT_COLUMNS.items():
        df[col] = _coerce(df[col], col, kind)
    return df.reset_index(drop=True)


def _pandas_dtype(kind: str) -> Any:
    return pd.Series(["x"]).dtype if kind == "str" else np.dtype(kind)


def _coerce(s: pd.Series, col: str, kind: str) -> pd.Series:
    if kind == "str":
        if s.isna().any():
            raise InputError(f"results column {col!r} has missing values; every row needs one")
        return s.astype(_pandas_dtype("str"))
    if kind == "int64":
        if s.isna().any() or not np.all(np.mod(s.to_numpy(dtype=float), 1) == 0):
            raise InputError(f"results column {col!r} must hold whole numbers without gaps")
        return s.astype("int64")
    return s.astype("float64")


# --------------------------------------------------------------------------- JSON columns


def _meta_json(meta: Any) -> str:
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise InputError(
            f"meta must be a dict (versions, seeds, settings), got {type(meta).__name__}"
        )
    try:
        return json.dumps(dict(meta), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(
            f"meta must be JSON-serialisable (numbers, strings, lists, dicts; no NaN): {err}"
        ) from err


def _column_values(s: pd.Series) -> list:
    """A column as JSON values (NaN/None -> null, numpy scalars -> Python)."""
    out = []
    for v in s.tolist():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif isinstance(v, np.generic):
            out.append(v.item())
        else:
            out.append(v)
    return out


def _frame_to_json(df: pd.DataFrame) -> dict:
    return {
        "columns": {str(c): _column_values(df[c]) for c in df.columns},
        "dtypes": {str(c): str(df[c].dtype) for c in df.columns},
    }


def _frame_from_json(obj: Any, where: str) -> pd.DataFrame:
    if not (isinstance(obj, dict) and isinstance(obj.get("columns"), dict)):
        raise InputError(f"{where}: expected {{'columns': {{name: [values]}}, 'dtypes': ...}}")
    dtypes = obj.get("dtypes") or {}
    df = pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in obj["columns"].items()})
    for c in df.columns:
        if c in dtypes:
            df[c] = _restore(df[c], dtypes[c])
    return df


def _restore(s: pd.Series, dtype: str) -> pd.Series:
    if dtype.startswith("float"):
        return s.astype("float64").astype(dtype)
    if dtype in ("str", "string"):
        return s.astype(_pandas_dtype("str"))
    return s.astype(dtype)


# --------------------------------------------------------------------------- writers


def sidecar_path(path: str | Path) -> Path:
    """The metadata sidecar of a CSV export: ``results.csv`` -> ``results.meta.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".meta.json")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(
            f"cannot tell the format of {str(path)!r} from its suffix {suffix or '(none)'!r}; "
            f"use one of {format_choices(SUFFIXES)} (Parquet, CSV with a .meta.json sidecar, "
            "JSON, HDF5)"
        )
    return suffix


def _require_h5py():
    try:
        import h5py
    except ImportError as err:
        raise InputError(
            f"writing or reading .h5/.hdf5 needs h5py, which is not importable here ({err}); "
            "run `pip install h5py`, or export to .parquet, .csv or .json"
        ) from err
    return h5py


def export(
    results: pd.DataFrame,
    path: str | Path,
    meta: Mapping[str, Any] | None = None,
    jumps: pd.DataFrame | None = None,
) -> Path:
    """Write ``results`` (with ``meta`` and the optional ``jumps`` frame) to ``path``.

    The format comes from the suffix: ``.parquet``, ``.csv`` (plus the sidecar
    ``<name>.meta.json``, see :func:`sidecar_path`), ``.json``, ``.h5`` / ``.hdf5`` (h5py).
    Every argument is checked before anything is written; each file is written atomically.
    Returns ``path``. Read it back with :func:`load_run`.
    """
    path = Path(path)
    suffix = _suffix(path)
    if not isinstance(results, pd.DataFrame):
        raise InputError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    frame = results_frame(results)
    meta_json = _meta_json(meta)
    if jumps is not None and not isinstance(jumps, pd.DataFrame):
        raise InputError(f"jumps must be a pandas DataFrame or None, got {type(jumps).__name__}")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist")
    h5py = _require_h5py() if suffix in (".h5", ".hdf5") else None
    jumps_obj = None if jumps is None else _frame_to_json(jumps.reset_index(drop=True))
    if suffix == ".parquet":
        _write_parquet(frame, path, meta_json, jumps_obj)
    elif suffix == ".csv":
        _write_csv(frame, path, meta_json, jumps_obj)
    elif suffix == ".json":
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "meta": json.loads(meta_json),
            "results": _frame_to_json(frame)["columns"],
            "dtypes": _frame_to_json(frame)["dtypes"],
            "jumps": jumps_obj,
        }
        data = json.dumps(doc, allow_nan=False).encode("utf-8")
        atomic_write(path, lambda f: f.write(data))
    else:
        _write_h5(h5py, frame, path, meta_json, jumps)
    return path


def _write_parquet(frame: pd.DataFrame, path: Path, meta_json: str, jumps_obj: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    extra = {
        b"hookscope.format": json.dumps({"format": FORMAT, "version": VERSION}).encode(),
        b"hookscope.meta": meta_json.encode("utf-8"),
        b"hookscope.jumps": json.dumps(jumps_obj, allow_nan=False).encode("utf-8"),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    atomic_write(path, lambda f: pq.write_table(table, f))


def _write_csv(frame: pd.DataFrame, path: Path, meta_json: str, jumps_obj: Any) -> None:
    data = frame.to_csv(index=False, lineterminator="\n").encode("utf-8")
    sidecar = {
        "format": FORMAT,
        "version": VERSION,
        "results_file": path.name,
        "results_sha256": hashlib.sha256(data).hexdigest(),
        "dtypes": {str(c): str(frame[c].dtype) for c in frame.columns},
        "meta": json.loads(meta_json),
        "jumps": jumps_obj,
    }
    side = json.dumps(sidecar, indent=1, allow_nan=False).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
    atomic_write(sidecar_path(path), lambda f: f.write(side))


def _h5_group(h5py: Any, group: Any, df: pd.DataFrame) -> None:
    for c in df.columns:
        s = df[c]
        if s.dtype.kind in "biuf":
            group.create_dataset(str(c), data=s.to_numpy())
        else:
            values = s.tolist()
            if any(not isinstance(v, str) for v in values):
                raise InputError(
                    f"column {c!r} holds {s.dtype} values that are neither numbers nor strings; "
                    "HDF5 export stores numbers, booleans and strings"
                )
            group.create_dataset(
                str(c), data=np.array(values, dtype=object), dtype=h5py.string_dtype("utf-8")
            )
    group.attrs["columns"] = json.dumps([str(c) for c in df.columns])
    group.attrs["dtypes"] = json.dumps({str(c): str(df[c].dtype) for c in df.columns})


def _write_h5(h5py: Any, frame: pd.DataFrame, path: Path, meta_json: str, jumps: Any) -> None:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["meta"] = meta_json
        _h5_group(h5py, f.create_group("results"), frame)
        if jumps is not None:
            _h5_group(h5py, f.create_group("jumps"), jumps.reset_index(drop=True))
    data = buffer.getvalue()
    atomic_write(path, lambda out: out.write(data))


# --------------------------------------------------------------------------- readers


@dataclass(repr=False)
class SavedRun:
    """What :func:`load_run` read: the results frame, the jumps frame (or None) and meta.

    Unpacks as a tuple: ``results, jumps, meta = load_run(path)``.
    """

    results: pd.DataFrame
    jumps: pd.DataFrame | None
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    def __iter__(self):
        return iter((self.results, self.jumps, self.meta))

    def to_pandas(self) -> pd.DataFrame:
        """The results frame."""
        return self.results

    def __repr__(self) -> str:
        r = self.results
        sites = list(dict.fromkeys(r["site"]))
        metrics = list(dict.fromkeys(r["metric"]))
        steps = r["step"]
        span = f"steps {steps.min()}..{steps.max()}" if len(r) else "no rows"
        jumps = "no jumps" if self.jumps is None else f"{len(self.jumps)} jumps"
        return (
            f"SavedRun({self.path}: {len(r)} rows, {span}, {len(sites)} sites, "
            f"metrics {', '.join(metrics)}; {jumps}; meta keys {', '.join(sorted(self.meta)) or '-'})"
        )


def load_run(path: str | Path) -> SavedRun:
    """Read a file written by :func:`export` (any of the four formats) back."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    if suffix == ".parquet":
        results, jumps, meta = _read_parquet(path)
    elif suffix == ".csv":
        results, jumps, meta = _read_csv(path)
    elif suffix == ".json":
        results, jumps, meta = _read_json(path)
    else:
        results, jumps, meta = _read_h5(_require_h5py(), path)
    return SavedRun(results_frame(results), jumps, meta, path)


def _check_format(header: Any, where: str) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InputError(f"{where} is not a hookscope tracking export (no format {FORMAT!r})")
    if header.get("version") != VERSION:
        raise InputError(
            f"{where} has format version {header.get('version')!r}; this hookscope reads "
            f"version {VERSION}"
        )


def _jumps(obj: Any, where: str) -> pd.DataFrame | None:
    return None if obj is None else _frame_from_json(obj, f"{where} (jumps)")


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    md = table.schema.metadata or {}
    if b"hookscope.format" not in md:
        raise InputError(f"{path} is a Parquet file without hookscope.format metadata")
    _check_format(json.loads(md[b"hookscope.format"]), str(path))
    meta = json.loads(md.get(b"hookscope.meta", b"{}"))
    jumps = _jumps(json.loads(md.get(b"hookscope.jumps", b"null")), str(path))
    return table.to_pandas(), jumps, meta


def _read_csv(path: Path):
    side_path = sidecar_path(path)
    if not side_path.is_file():
        raise InputError(
            f"{path} has no metadata sidecar {side_path.name} next to it; a hookscope CSV "
            "export is the pair (CSV, .meta.json)"
        )
    side = json.loads(side_path.read_text(encoding="utf-8"))
    _check_format(side, str(side_path))
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != side.get("results_sha256"):
        raise InputError(
            f"{side_path.name} describes other bytes than {path.name} (sha256 differs): the "
            "CSV was edited or the pair is from two exports"
        )
    dtypes = side.get("dtypes", {})
    text_cols = [c for c, d in dtypes.items() if d in ("str", "string", "object")]
    df = pd.read_csv(
        io.BytesIO(data),
        float_precision="round_trip",
        dtype={c: str for c in text_cols},
        keep_default_na=False,
        na_values={c: [""] for c in dtypes if c not in text_cols},
    )
    for c, d in dtypes.items():
        if c in df.columns:
            df[c] = _restore(df[c], d)
    return df, _jumps(side.get("jumps"), str(side_path)), side.get("meta", {})


def _read_json(path: Path):
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise InputError(f"{path} is not valid JSON: {err}") from err
    _check_format(doc, str(path))
    if not isinstance(doc.get("results"), dict):
        raise InputError(f"{path}: expected 'results' as {{column: [values]}}")
    results = _frame_from_json({"columns": doc["results"], "dtypes": doc.get("dtypes")}, str(path))
    return results, _jumps(doc.get("jumps"), str(path)), doc.get("meta") or {}


def _h5_frame(group: Any) -> pd.DataFrame:
    columns = json.loads(group.attrs["columns"])
    dtypes = json.loads(group.attrs["dtypes"])
    data = {}
    for c in columns:
        ds = group[c]
        if ds.dtype.kind == "O":
            data[c] = pd.Series(list(ds.asstr()[()]), dtype=object)
        else:
            data[c] = pd.Series(ds[()])
    df = pd.DataFrame(data, columns=columns)
    for c in columns:
        df[c] = _restore(df[c], dtypes[c])
    return df


def _read_h5(h5py: Any, path: Path):
    with h5py.File(path, "r") as f:
        header = {"format": _attr_str(f.attrs.get("format")), "version": f.attrs.get("version")}
        if header["version"] is not None:
            header["version"] = int(header["version"])
        _check_format(header, str(path))
        meta = json.loads(_attr_str(f.attrs["meta"]))
        results = _h5_frame(f["results"])
        jumps = _h5_frame(f["jumps"]) if "jumps" in f else None
    return results, jumps, meta


def _attr_str(v: Any) -> Any:
    return v.decode("utf-8") if isinstance(v, bytes) else v
