"""``run``: one config -> one run folder of artifacts and a report.

Stages, under one progress bar on stderr named after the stage in progress (``progress=False``
or ``--no-progress``: no bar): **load** (model, data), **extract** (the action's ``prepare``:
through the activation store, with the store's own bar; done once, resumable, no forward on
a rerun), **run** (the action: fitting probes, interventions, with their own bars),
**figures** (PNG and SVG, predictions, metrics) and **report**. The run folder::

    run.json               the mutable state: config hash, finished stages, the sha256 of
                           the action's outputs and of the local files it read (a ``files``
                           dataset, a local model folder), the request that finished it
                           (replaced atomically; not in artifacts.json)
    config.yaml            the resolved config (overrides applied, defaults filled in)
    metrics.json           the action's summary: question (the config's ``question`` when it
                           has one), metrics, tables, figures, notes
    predictions.parquet    per-row predictions where the action has them
    activations_index.json what was read from or written to the store
    figures/NAME.png|svg   every figure
    report.md, report.html the report (self-contained HTML)
    artifacts.json         versions, git commit, seeds, sha256 of every input (the config
                           file, a ``files`` dataset's files, a local model folder's files)
                           and every output but run.json, store keys, durations
    store/                 the activation store (unless extraction.store points elsewhere)

The output folder is resolved first (``runs/..`` or ``missing/../x`` name the folder they
lead to). Nothing is written before every check on the config has passed: the model loads,
the sites exist, the dataset loads with its columns, and the action's ``prepare`` accepts it
(extraction through the store included). Only then is the folder claimed (run.json,
config.yaml) and, with ``force``, the previous run's outputs removed. A mistake therefore
leaves the folder as it was; an interruption after the claim leaves a resumable run, one
before it a store to resume from.

A folder holding a different run (another config hash), a damaged run.json, or files but no
run is refused unless ``force``, which starts the run over (its outputs replaced, the store
kept). A rerun of the same config skips the action when its stage is finished and intact:
every output it wrote still has the sha256 run.json recorded, and a ``files`` dataset's files
and a local model folder's files are those it read. Otherwise it redoes the action (reading
the store, no forward when the extraction is there) and the report. An interrupted run
(Ctrl-C included) continues from the store.

A rerun of a complete run does nothing: when run.json records the action and the report for
the same request (the config as given, before the action's defaults are filled in) under the
same hookscope version, the local inputs are unchanged, and every output and input still
has the sha256 artifacts.json recorded, :func:`run_spec` reads metrics.json and returns,
without importing the action, the model or torch. A missing or changed report file
(report.html deleted or edited, say) rebuilds the report; a missing or changed action output
redoes the action. The check trusts that a hookscope version fills in the same defaults;
``force`` reruns regardless.

Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hookscope.errors import ExperimentError
from hookscope.experiments.context import dataset_files, model_files
from hookscope.experiments.spec import RunSpec, config_hash, load_spec, validate

__all__ = ["RunOutcome", "finished_summary", "run", "run_spec", "versions"]

RUN_FILE = "run.json"
OWN_FILES = (
    "run.json",
    "config.yaml",
    "metrics.json",
    "predictions.parquet",
    "activations_index.json",
    "report.md",
    "report.html",
    "artifacts.json",
)


@dataclass(frozen=True)
class RunOutcome:
    """Where the run is, its summary (metrics.json) and which stages ran this time
    (``("action", "report")``, ``("report",)``, or ``()`` when the run was already complete)."""

    run_dir: Path
    summary: dict
    ran: tuple[str, ...]


def _write(path: Path, data: bytes) -> None:
    from hookscope.store.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def _json(obj: Any) -> bytes:
    return (
        json.dumps(obj, indent=1, sort_keys=False, default=_default, allow_nan=False) + "\n"
    ).encode()


def _default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import hookscope

    out = {"hookscope": hookscope.__version__, "python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "datasets", "scikit-learn", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> str | None:
    """The commit of the hookscope checkout this runs from (None when installed from a
    wheel or git is unavailable)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


class _StageBar:
    """One tqdm bar on stderr over a run's stages, its description the stage in progress; the
    stages' own bars (extraction, probing sites, interventions) open beneath it. Disabled,
    it draws nothing."""

    def __init__(self, total: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            desc="hookscope run",
            unit="stage",
            file=sys.stderr,
            disable=not progress,
            bar_format="{desc} |{bar}| stage {n_fmt}/{total_fmt} [{elapsed}]",
        )

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        """Show ``name`` (and ``detail``) while the block runs; count it done when it ends
        without an exception (an interrupted stage stays undone, on screen and in run.json)."""
        self.bar.set_description_str(f"hookscope run: {name}" + (f" ({detail})" if detail else ""))
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _output_folder(spec: RunSpec, out: str | Path | None) -> Path:
    """The run folder, resolved (``missing/../x`` is ``x``, ``runs/..`` the parent), and
    checked to be a folder, or nothing yet under a writable folder, before anything runs."""
    given = out or spec.output_dir or Path("runs") / spec.run_name
    try:
        folder = Path(given).expanduser().resolve()
        if folder.exists() and not folder.is_dir():
            raise ExperimentError(f"--out / output_dir: {folder} is a file, not a folder")
        parent = folder
        while not parent.exists():
            parent = parent.parent
    except OSError as err:
        raise ExperimentError(f"--out / output_dir: cannot use {given}: {err}") from None
    if not parent.is_dir():
        raise ExperimentError(
            f"--out / output_dir: {parent} is a file, so {folder} cannot be a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExperimentError(
            f"--out / output_dir: {parent} is not writable; choose another folder"
        )
    return folder


def _read_state(out: Path) -> dict | None:
    """run.json of ``out`` (None when there is none); anything but a run record is refused."""
    path = out / RUN_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExperimentError(f"{path}: unreadable run state ({err}); use --force") from None
    if not (
        isinstance(state, dict)
        and isinstance(state.get("config_hash"), str)
        and isinstance(state.get("stages"), dict)
    ):
        raise ExperimentError(
            f"{path}: unreadable run state (not an object with config_hash and stages); use --force"
        )
    return state


def _check_folder(out: Path, digest: str, force: bool) -> dict | None:
    """The run state of ``out`` when it holds this config's run, None when the run starts
    afresh there. Refuses a folder of another run, a damaged run.json, or a non-empty folder
    holding no run (an activation store alone does not count), unless ``force``. Writes
    nothing: :func:`_claim` does, once every check on the config has passed."""
    if force:
        return None
    state = _read_state(out)
    if state is not None:
        if state["config_hash"] == digest:
            return state
        raise ExperimentError(
            f"{out} holds a different run ({state.get('run_name')!r}, another config); "
            "choose another --out or pass --force to replace it"
        )
    if out.is_dir() and any(p.name != "store" for p in out.iterdir()):
        raise ExperimentError(
            f"{out} is not empty and holds no hookscope run; choose another --out or pass --force"
        )
    return None


def _claim(out: Path, state: dict | None, digest: str, resolved: RunSpec) -> dict:
    """Make ``out`` this config's run with its action to (re)do: run.json first (no stage
    finished, so an interruption from here on leaves a resumable run), then the previous
    outputs removed (the store kept) and config.yaml written."""
    state = dict(state or {"run_name": resolved.run_name, "config_hash": digest})
    state["stages"] = {}
    state.pop("outputs", None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / RUN_FILE, _json(state))
        for name in OWN_FILES:
            if name != RUN_FILE:
                (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "figures", ignore_errors=True)
        _write_config(out, resolved)
    except OSError as err:
        raise ExperimentError(
            f"--out / output_dir: cannot write the run into {out}: {err}"
        ) from None
    return state


def _write_config(out: Path, resolved: RunSpec) -> None:
    _write(
        out / "config.yaml",
        yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False).encode(),
    )


def _input_files(spec: RunSpec) -> list[Path]:
    """The local files the action reads besides the config: a ``files`` dataset's files and a
    local model folder's files (weights, config, tokenizer)."""
    return [*dataset_files(spec.dataset), *model_files(spec.extraction.model)]


def _inputs_sha256(files: list[Path]) -> str | None:
    """One sha256 over ``files`` (their paths and contents), None without files."""
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path}\0{sha256(path)}\n".encode())
    return h.hexdigest()


def _action_intact(out: Path, state: dict, inputs_digest: str | None) -> bool:
    """Whether the action's stage of ``state`` is finished and still stands: run.json records
    it with the sha256 of each output it wrote (metrics.json, predictions.parquet when there
    are predictions, activations_index.json, figures/*), each file still has it, and the
    local inputs (a ``files`` dataset, a local model folder) are those it read. Anything else
    redoes the action, which reads its activations from the store: the store's keys hash the
    model's weights and the dataset's rows, so a changed model or dataset is extracted anew
    there, never read stale."""
    outputs = state.get("outputs")
    if not (state["stages"].get("action") and isinstance(outputs, dict)):
        return False
    if "metrics.json" not in outputs or state.get("inputs_sha256") != inputs_digest:
        return False
    for rel, digest in outputs.items():
        path = out / rel
        if not (isinstance(digest, str) and path.is_file() and sha256(path) == digest):
            return False
    return True


def run(
    config: str | Path,
    overrides: list[str] | tuple = (),
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunOutcome:
    """Run the config file ``config`` (with ``--set`` style ``overrides``)."""
    spec, _ = load_spec(config, overrides)
    return run_spec(spec, out=out, force=force, progress=progress, inputs=[Path(config)])


def finished_summary(spec: RunSpec, out_dir: Path, inputs: list[Path] | tuple = ()) -> dict | None:
    """metrics.json of ``out_dir`` when it holds ``spec``'s run complete and untouched, else
    None (see the module docstring). Reads run.json, artifacts.json and hashes the files
    artifacts.json lists; imports no action, model or torch."""
    from hookscope import __version__

    try:
        state = json.loads((out_dir / RUN_FILE).read_text())
        record = json.loads((out_dir / "artifacts.json").read_text())
    except (OSError, ValueError):  # absent or half-written: the full path sorts it out
        return None
    if not (isinstance(state, dict) and isinstance(record, dict)):
        return None
    stages = state.get("stages")
    if not (isinstance(stages, dict) and stages.get("action") and stages.get("report")):
        return None
    if state.get("request_hash") != config_hash(spec):
        return None
    if record.get("config_hash") != state.get("config_hash"):
        return None
    recorded_versions = record.get("versions")
    if not isinstance(recorded_versions, dict) or recorded_versions.get("hookscope") != __version__:
        return None
    if state.get("inputs_sha256") != _inputs_sha256(_input_files(spec)):
        return None  # the dataset's or the local model's files changed since the action ran
    files = record.get("files")
    if not (isinstance(files, dict) and {"metrics.json", "report.md", "report.html"} <= set(files)):
        return None
    for rel, digest in files.items():
        path = out_dir / rel
        if rel != RUN_FILE and (not path.is_file() or sha256(path) != digest):
            return None  # run.json (the mutable state) is not hashed; older records listed it
    outputs = state.get("outputs")
    if not isinstance(outputs, dict) or not set(outputs) <= set(files):
        return None  # an action output missing from the record: not a run this version made
    recorded_inputs = record.get("inputs")
    if not isinstance(recorded_inputs, dict):
        return None
    for path in map(Path, inputs):
        if path.is_file() and recorded_inputs.get(str(path)) != sha256(path):
            return None
    return json.loads((out_dir / "metrics.json").read_text())


def run_spec(
    spec: RunSpec,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    inputs: list[Path] | tuple = (),
) -> RunOutcome:
    """Run a validated :class:`RunSpec` (see the module docstring)."""
    out_dir = _output_folder(spec, out)
    if not force:
        summary = finished_summary(spec, out_dir, inputs)
        if summary is not None:
            if progress:
                print(
                    f"hookscope run: {out_dir} holds this run, complete and unchanged; "
                    f"nothing to do (report: {out_dir / 'report.html'}; --force reruns it)",
                    file=sys.stderr,
                    flush=True,
                )
            return RunOutcome(out_dir, summary, ())
    from hookscope import actions

    started = datetime.datetime.now(datetime.timezone.utc)
    action = actions.get(spec.action.name)
    params = validate(action.Params, spec.action.params, prefix="action.params")
    resolved = spec.model_copy(
        update={
            "output_dir": str(out_dir),
            "action": spec.action.model_copy(update={"params": params.model_dump(mode="json")}),
        }
    )
    digest = config_hash(resolved)
    state = _check_folder(out_dir, digest, force)
    input_files = _input_files(spec)
    inputs_digest = _inputs_sha256(input_files)
    todo = state is None or not _action_intact(out_dir, state, inputs_digest)
    recorded = (state or {}).get("durations")
    durations: dict[str, float] = dict(recorded) if isinstance(recorded, dict) else {}
    ran: list[str] = []
    bar = _StageBar(5 if todo else 1, progress)
    try:
        if todo:
            t0 = time.perf_counter()
            ctx, prepared = _prepare_action(action, params, resolved, out_dir, bar, progress)
            # every check on the config has passed: only now is the folder written to
            state = _claim(out_dir, state, digest, resolved)
            summary, outputs = _run_action(action, ctx, prepared, resolved, out_dir, bar)
            durations["action"] = time.perf_counter() - t0
            state["stages"]["action"] = True
            state["outputs"] = outputs
            state["inputs_sha256"] = inputs_digest
            state["durations"] = durations
            state["store_keys"] = sorted({e["key"] for e in ctx.index})
            _write(out_dir / RUN_FILE, _json(state))
            ran.append("action")
        else:
            _write_config(out_dir, resolved)
            summary = json.loads((out_dir / "metrics.json").read_text())
        with bar.stage("report", "" if todo else "rebuilt; the action's stage is finished"):
            t0 = time.perf_counter()
            from hookscope.experiments.report import write_report

            all_inputs = [*inputs, *input_files]
            durations["report"] = time.perf_counter() - t0  # provisional; artifacts carry the final
            _write_artifacts(resolved, out_dir, state, durations, started, all_inputs)
            write_report(out_dir)
            durations["report"] = time.perf_counter() - t0
            _write_artifacts(resolved, out_dir, state, durations, started, all_inputs)
            state["stages"]["report"] = True
            state["request_hash"] = config_hash(spec)
            _write(out_dir / RUN_FILE, _json(state))
            ran.append("report")
    finally:
        bar.close()
    return RunOutcome(out_dir, summary, tuple(ran))


def _prepare_action(
    action: Any, params: Any, spec: RunSpec, out_dir: Path, bar: _StageBar, progress: bool
) -> tuple[Any, Any]:
    """The load and extract stages: model, sites, dataset, then the action's ``prepare``
    (its checks on the config, extraction through the store). Writes nothing into the run
    folder but the store; when a check fails, a store folder this call created and left
    empty is removed again (with the run folder, when this call created it and it is empty),
    so a mistake leaves the folder as it was. An interruption keeps the store (resumable)."""
    from hookscope.experiments.context import Context, check_sites, load_dataset, load_model
    from hookscope.store import ActivationStore

    ex = spec.extraction
    with bar.stage("load", f"{ex.model}, {spec.dataset.name}"):
        from hookscope.hf_compat import progress_bars

        with progress_bars(progress):
            model = load_model(ex.model, ex.device)
        check_sites(model, ex.sites)
        dataset, text, image = load_dataset(spec.dataset, model, spec.seed)
    store_dir = Path(ex.store) if ex.store else out_dir / "store"
    out_existed, store_existed = out_dir.exists(), store_dir.exists()
    try:
        try:
            store = ActivationStore(store_dir)
        except OSError as err:
            where = "extraction.store" if ex.store else "--out / output_dir"
            raise ExperimentError(f"{where}: cannot create the store {store_dir}: {err}") from None
        ctx = Context(spec, params, model, dataset, text, image, store, out_dir, progress)
        with bar.stage("extract", f"{action.name}: prepare, through the store"):
            prepared = action.prepare(ctx)
    except Exception:
        if not store_existed:
            _remove_empty_store(store_dir)
        if not out_existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return ctx, prepared


def _remove_empty_store(folder: Path) -> None:
    """Remove ``folder`` when it is a store holding no entry (just created, nothing extracted)."""
    from hookscope.store.store import MARKER

    if not folder.is_dir() or {p.name for p in folder.iterdir()} - {MARKER, "entries"}:
        return
    entries = folder / "entries"
    if entries.is_dir() and any(entries.iterdir()):
        return
    shutil.rmtree(folder)


def _run_action(
    action: Any, ctx: Any, prepared: Any, spec: RunSpec, out_dir: Path, bar: _StageBar
) -> tuple[dict, dict[str, str]]:
    """The run and figures stages: the action's result, its figures, predictions,
    activations index and metrics.json (the config's ``question`` in place of the action's
    when the config has one). Returns the summary and the sha256 of every file written."""
    with bar.stage("run", action.name):
        result = action.run(prepared)
        summary = action.summarize(result)
    summary = {"action": action.name, **summary}
    if spec.question:
        summary["question"] = spec.question
    outputs: dict[str, str] = {}

    def put(rel: str, data: bytes) -> None:
        _write(out_dir / rel, data)
        outputs[rel] = hashlib.sha256(data).hexdigest()

    bad = [n for n in result.figures if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", str(n))]
    if bad:  # a figure's name becomes a file name inside figures/: nothing may escape it
        raise ExperimentError(
            f"action {action.name!r} returned figures named {bad}; a figure's name must be "
            "letters, digits, '_', '-' and '.' (not starting with '.')"
        )
    with bar.stage("figures", f"{len(result.figures)} figure(s) as PNG and SVG, metrics"):
        import matplotlib.pyplot as plt

        for name, fig in result.figures.items():
            for ext in ("png", "svg"):
                buf = io.BytesIO()
                # no date and fixed element ids: the same run gives the same SVG bytes
                with plt.rc_context({"svg.hashsalt": "hookscope"}):
                    fig.savefig(
                        buf, format=ext, dpi=120 if ext == "png" else None, bbox_inches="tight",
                        metadata={"Date": None} if ext == "svg" else None,
                    )  # fmt: skip
                put(f"figures/{name}.{ext}", buf.getvalue())
            plt.close(fig)
        if result.predictions is not None:
            buf = io.BytesIO()
            result.predictions.to_parquet(buf, index=False)
            put("predictions.parquet", buf.getvalue())
        put(
            "activations_index.json",
            _json({"store": str(ctx.store.folder), "entries": ctx.index}),
        )
        put("metrics.json", _json(summary))
    return summary, outputs


def _write_artifacts(
    spec: RunSpec,
    out_dir: Path,
    state: dict,
    durations: dict,
    started: datetime.datetime,
    inputs: list[Path],
) -> None:
    files = {}
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        if (
            path.is_file()
            and rel.parts[0] != "store"
            and str(rel) not in ("artifacts.json", RUN_FILE)  # run.json: the mutable state
            and not rel.name.startswith(".")
        ):
            files[str(rel)] = sha256(path)
    record = {
        "run_name": spec.run_name,
        "config": spec.model_dump(mode="json"),
        "config_hash": state["config_hash"],
        "versions": versions(),
        "git_commit": git_commit(),
        "seeds": {"seed": spec.seed},
        "inputs": {str(p): sha256(p) for p in inputs if p.is_file()},
        "files": files,
        "store_keys": state.get("store_keys", []),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "durations": {k: round(v, 3) for k, v in durations.items()},
    }
    _write(out_dir / "artifacts.json", _json(record))
