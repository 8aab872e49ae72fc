"""hookscope.tracking.ndt (the ndt project's three JSON shapes) and hookscope.tracking.files
(Parquet, CSV, JSON, HDF5 round trips). Files are built here with known numbers; the one test
that reads a real ndt Phase-1 file needs the read-only mirror and is skipped without it."""

from __future__ import annotations

import builtins
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from hookscope.errors import HookscopeError, InputError
from hookscope.tracking.files import export, load_run, results_frame, sidecar_path
from hookscope.tracking.ndt import NDT_COLUMNS, load_ndt, ndt_view

MIRROR = Path("/work/.mirror/Javihaus+ndt/repo")
PHASE1_COMMIT = "69033c2556"
PHASE1_FILE = "experiments/new/results/phase1_full/cnn_shallow_mnist.json"


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _expected(rows) -> pd.DataFrame:
    """The frame for (step, site, metric, value, loss, grad_norm) tuples, built by hand."""
    cols = ["step", "site", "metric", "value", "loss", "grad_norm"]
    df = pd.DataFrame([dict(zip(cols, r)) for r in rows], columns=cols)
    df["step"] = df["step"].astype("int64")
    for c in ("site", "metric"):
        df[c] = df[c].astype(pd.Series(["x"]).dtype)
    for c in ("value", "loss", "grad_norm"):
        df[c] = df[c].astype("float64")
    return df


# ----------------------------------------------------------------------------- ndt shapes


def test_phase1_shape(tmp_path):
    doc = {
        "measurements": [
            {
                "step": 0,
                "epoch": 1,
                "loss": 2.5,
                "grad_norm": 4.0,
                "layer_metrics": {
                    "conv.0": {
                        "stable_rank": 1.5,
                        "participation_ratio": 2.25,
                        "effective_rank_90": 3.0,
                        "nuclear_norm_ratio": 1.75,
                    },
                    "fc": {
                        "stable_rank": 1.125,
                        "participation_ratio": 1.5,
                        "effective_rank_90": 1.0,
                        "nuclear_norm_ratio": 1.25,
                    },
                },
            },
            {
                "step": 5,
                "epoch": 1,
                "loss": 2.0,
                "grad_norm": 3.5,
                "layer_metrics": {
                    "conv.0": {
                        "stable_rank": 1.0,
                        "participation_ratio": 2.0,
                        "effective_rank_90": 2.0,
                        "nuclear_norm_ratio": 1.5,
                    },
                    "fc": {
                        "stable_rank": 1.0,
                        "participation_ratio": 1.25,
                        "effective_rank_90": 1.0,
                        "nuclear_norm_ratio": 1.0,
                    },
                },
            },
        ],
        "architecture_params": {"depth": 2},
        "final_accuracy": 0.875,
        "arch_name": "cnn_tiny",
        "dataset_name": "mnist",
        "elapsed_time": 1.0,
        "num_steps": 10,
        "measurement_interval": 5,
    }
    run = load_ndt(_write(tmp_path / "p1.json", doc))
    m = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")
    expected = _expected(
        [(0, "conv.0", k, v, 2.5, 4.0) for k, v in zip(m, (1.5, 2.25, 3.0, 1.75))]
        + [(0, "fc", k, v, 2.5, 4.0) for k, v in zip(m, (1.125, 1.5, 1.0, 1.25))]
        + [(5, "conv.0", k, v, 2.0, 3.5) for k, v in zip(m, (1.0, 2.0, 2.0, 1.5))]
        + [(5, "fc", k, v, 2.0, 3.5) for k, v in zip(m, (1.0, 1.25, 1.0, 1.0))]
    )
    assert_frame_equal(run.to_pandas(), expected)
    assert run.sites == ["conv.0", "fc"]
    assert run.meta["arch_name"] == "cnn_tiny" and run.meta["measurement_interval"] == 5
    assert run.meta["final_accuracy"] == 0.875 and run.meta["architecture_params"] == {"depth": 2}
    assert run.meta["shape"] == "phase1" and run.meta["epochs"] == [1, 1]
    # the conventions travel with the object and the frame
    assert run.conventions["center"] is False
    assert "form='singular_values'" in run.conventions["participation_ratio"]
    assert "spatial mean" in run.conventions["conv_layers"]
    assert run.results.attrs["conventions"] == run.conventions
    text = repr(run)
    assert "cnn_tiny" in text and "uncentred" in text and "singular_values" in text


def test_records_shape_with_missing_values(tmp_path):
    doc = {
        "layer2": [
            {
                "step": 10,
                "stable_rank": 2.0,
                "participation_ratio": 3.0,
                "cumulative_90": 4,
                "nuclear_norm_ratio": 2.5,
                "loss": 0.5,
                "grad_norm": None,
            },
            {
                "step": 20,
                "stable_rank": 1.5,
                "participation_ratio": 2.0,
                "cumulative_90": 3,
                "nuclear_norm_ratio": 2.0,
                "loss": 0.25,
                "grad_norm": None,
            },
        ],
        "layer1": [
            {
                "step": 10,
                "stable_rank": 5.0,
                "participation_ratio": 6.0,
                "cumulative_90": 7,
                "nuclear_norm_ratio": 5.5,
                "loss": 0.5,
            }
        ],
    }
    run = load_ndt(_write(tmp_path / "rec.json", doc))
    nan = math.nan
    m = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")
    expected = _expected(
        [(10, "layer2", k, v, 0.5, nan) for k, v in zip(m, (2.0, 3.0, 4.0, 2.5))]
        + [(10, "layer1", k, v, 0.5, nan) for k, v in zip(m, (5.0, 6.0, 7.0, 5.5))]
        + [(20, "layer2", k, v, 0.25, nan) for k, v in zip(m, (1.5, 2.0, 3.0, 2.0))]
    )
    assert_frame_equal(run.results, expected)
    assert run.sites == ["layer2", "layer1"]  # file order is depth order, not sorted
    assert run.meta["shape"] == "records"
    assert "flattened" in run.conventions["conv_layers"]


def test_columnar_shape(tmp_path):
    doc = {
        "a": {
            "step": [0, 3],
            "stable_rank": [1.25, 1.5],
            "participation_ratio": [2.0, 2.5],
            "cumulative_90": [2, 3],
            "nuclear_norm_ratio": [1.5, 1.75],
            "loss": [1.0, 0.75],
        }
    }
    run = load_ndt(_write(tmp_path / "col.json", doc))
    m = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")
    nan = math.nan
    expected = _expected(
        [(0, "a", k, v, 1.0, nan) for k, v in zip(m, (1.25, 2.0, 2.0, 1.5))]
        + [(3, "a", k, v, 0.75, nan) for k, v in zip(m, (1.5, 2.5, 3.0, 1.75))]
    )
    assert_frame_equal(run.results, expected)
    assert run.meta["shape"] == "columnar"


@pytest.mark.parametrize(
    "doc, words",
    [
        ([1, 2], ["top level is a JSON list", "phase1", "records", "columnar"]),
        ({}, ["empty object"]),
        ({"measurements": [{"step": 0, "loss": 1.0}]}, ["phase1 shape", "'layer_metrics'"]),
        ({"measurements": {"step": 0}}, ["phase1 shape", "expected a list"]),
        ({"l": [{"stable_rank": 1.0}]}, ["records shape", "'step'"]),
        ({"l": {"stable_rank": [1.0]}}, ["columnar shape", "'step'"]),
        ({"l": {"step": [0, 1], "stable_rank": [1.0]}}, ["columnar shape", "2 entries"]),
        ({"l": [{"step": 0, "accuracy": 1.0}]}, ["records shape", "no ndt metric"]),
        ({"l": [{"step": 0, "stable_rank": "high"}]}, ["records shape", "expected a number"]),
        ({"a": [], "b": {}}, ["all lists (records)", "all objects (columnar)"]),
    ],
)
def test_malformed_files_name_the_file_and_the_problem(tmp_path, doc, words):
    path = _write(tmp_path / "bad.json", doc)
    with pytest.raises(InputError) as err:
        load_ndt(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg


def test_not_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{ nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_ndt(path)


def _frame() -> pd.DataFrame:
    metrics = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")
    rows = []
    for step in (0, 5, 10):
        for d, site in enumerate(("neuron.0", "neuron.1")):
            for i, metric in enumerate(metrics):
                value = float(i + 1) if metric == "energy_rank" else 1.0 + 0.1 * step + d + i / 7
                rows.append(
                    (step, site, metric, value, 2.0 / (step + 1), math.nan if step == 5 else 0.5)
                )
    return _expected(rows)


def test_ndt_view_is_ndt_get_results_and_round_trips(tmp_path):
    results = _frame()
    view = ndt_view(results)
    assert list(view) == ["neuron.0", "neuron.1"]
    one = view["neuron.1"]
    assert tuple(one.columns) == NDT_COLUMNS
    assert one["step"].tolist() == [0, 5, 10]
    assert one["cumulative_90"].dtype == np.int64 and one["cumulative_90"].tolist() == [3, 3, 3]
    assert one["stable_rank"].tolist() == [2.0, 2.5, 3.0]
    assert one["grad_norm"].isna().tolist() == [False, True, False]
    # exactly what ndt's export_to_json writes: {layer: df.to_dict(orient="records")}
    path = tmp_path / "ndt.json"
    with open(path, "w") as f:
        json.dump({k: df.to_dict(orient="records") for k, df in view.items()}, f, indent=2)
    assert_frame_equal(load_ndt(path).results, results)


def test_ndt_view_missing_metric_is_nan_and_runs_are_refused():
    results = _frame()
    view = ndt_view(results[results.metric != "nuclear_norm_ratio"])
    assert view["neuron.0"]["nuclear_norm_ratio"].isna().all()
    two = pd.concat([results.assign(run="a"), results.assign(run="b")], ignore_index=True)
    with pytest.raises(InputError, match="2 runs"):
        ndt_view(two)


@pytest.mark.skipif(not MIRROR.is_dir(), reason="the ndt mirror is not on this machine")
def test_a_real_phase1_file(tmp_path):
    data = subprocess.run(
        ["git", "-C", str(MIRROR), "show", f"{PHASE1_COMMIT}:{PHASE1_FILE}"],
        capture_output=True,
        check=True,
    ).stdout
    path = tmp_path / "cnn_shallow_mnist.json"
    path.write_bytes(data)
    raw = json.loads(data)
    run = load_ndt(path)
    steps = np.array(sorted(set(run.results["step"])))
    assert set(np.diff(steps)) == {run.meta["measurement_interval"]} == {5}
    assert len(steps) == len(raw["measurements"])
    assert run.sites == ["conv_layers.0", "conv_layers.3", "fc"]
    assert run.meta["arch_name"] == "cnn_shallow" and run.meta["dataset_name"] == "mnist"
    first = run.results[(run.results.step == 0) & (run.results.site == "fc")]
    src = raw["measurements"][0]["layer_metrics"]["fc"]
    assert dict(zip(first.metric, first.value)) == {
        "stable_rank": src["stable_rank"],
        "participation_ratio": src["participation_ratio"],
        "energy_rank": src["effective_rank_90"],
        "nuclear_norm_ratio": src["nuclear_norm_ratio"],
    }


# ----------------------------------------------------------------------------- export


def _jumps() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": [5, 10],
            "site": ["neuron.0", "neuron.1"],
            "metric": ["stable_rank", "energy_rank"],
            "magnitude": [0.5, math.nan],
            "z": [6.25, -7.5],
            "direction": ["up", "down"],
            "confirmed_at": [15, 20],
        }
    )


META = {"versions": {"hookscope": "0.1", "torch": "2.x"}, "seed": 3, "settings": {"every": 5}}


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".h5", ".hdf5"])
def test_export_round_trip(tmp_path, suffix):
    results = _frame().assign(run="seed-3")
    path = export(results, tmp_path / f"run{suffix}", meta=META, jumps=_jumps())
    back = load_run(path)
    assert_frame_equal(back.results, results)
    assert_frame_equal(back.jumps, _jumps())
    assert back.meta == META
    r, j, m = back  # unpacks as a tuple
    assert r is back.results and j is back.jumps and m is back.meta
    assert "3 sites" not in repr(back) and "2 sites" in repr(back)
    # only the file (and for CSV its sidecar): no temporary files left behind
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([path.name] + ([sidecar_path(path).name] if suffix == ".csv" else []))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".h5"])
def test_export_without_jumps_or_meta(tmp_path, suffix):
    results = _frame()[["step", "site", "metric", "value"]]
    back = load_run(export(results, tmp_path / f"r{suffix}"))
    assert back.jumps is None and back.meta == {}
    assert back.results["loss"].isna().all() and back.results["grad_norm"].isna().all()
    assert_frame_equal(back.results, results_frame(results))


def test_formats_are_readable_without_hookscope(tmp_path):
    """The documented layouts, read with pyarrow, json, pandas and h5py directly."""
    import h5py
    import pyarrow.parquet as pq

    results = _frame()
    export(results, tmp_path / "r.parquet", meta=META, jumps=_jumps())
    md = pq.read_schema(tmp_path / "r.parquet").metadata
    assert json.loads(md[b"hookscope.meta"]) == META
    assert json.loads(md[b"hookscope.jumps"])["columns"]["direction"] == ["up", "down"]
    export(results, tmp_path / "r.json", meta=META)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["format"] == "hookscope.tracking" and doc["version"] == 1 and doc["jumps"] is None
    assert doc["results"]["grad_norm"][8] is None  # step 5: NaN as null
    export(results, tmp_path / "r.csv", meta=META)
    assert json.loads((tmp_path / "r.meta.json").read_text())["meta"] == META
    assert pd.read_csv(tmp_path / "r.csv")["value"].tolist() == results["value"].tolist()
    export(results, tmp_path / "r.h5", meta=META, jumps=_jumps())
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert json.loads(f.attrs["meta"]) == META
        assert list(f["results/site"].asstr()[()][:2]) == ["neuron.0", "neuron.0"]
        assert f["results/value"][()].tolist() == results["value"].tolist()
        assert list(f["jumps/direction"].asstr()[()]) == ["up", "down"]


def test_export_errors_come_before_writing(tmp_path):
    results = _frame()
    with pytest.raises(InputError) as err:
        export(results, tmp_path / "r.xlsx")
    for s in (".parquet", ".csv", ".json", ".h5", ".hdf5"):
        assert s in str(err.value)
    with pytest.raises(InputError, match="JSON-serialisable"):
        export(results, tmp_path / "r.json", meta={"x": object()})
    with pytest.raises(InputError, match="missing: metric"):
        export(results.drop(columns="metric"), tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_csv_needs_its_matching_sidecar(tmp_path):
    path = export(_frame(), tmp_path / "r.csv", meta=META)
    path.write_text(path.read_text().replace("neuron.1", "neuron.9"))
    with pytest.raises(InputError, match="sha256 differs"):
        load_run(path)
    sidecar_path(path).unlink()
    with pytest.raises(InputError, match="no metadata sidecar"):
        load_run(path)


def test_h5_without_h5py_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py" or name.startswith("h5py."):
            raise ImportError("No module named 'h5py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(HookscopeError, match="pip install h5py"):
        export(_frame(), tmp_path / "r.h5")
    assert list(tmp_path.iterdir()) == []
    export(_frame(), tmp_path / "r.parquet")  # the other formats do not need it
