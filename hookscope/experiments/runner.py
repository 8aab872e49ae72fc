"""``run``: one config -> one run folder of artifacts and a report.

Stages, under one progress bar on stderr named after the stage in progress (``progress=False``
or ``--no-progress``: no bar): **load** (model, data), **extract** (the action's ``prepare``:
through the activation store, with the store's own bar; done once, resumable, no forward on
a rerun), **run** (the action: fitting probes, interventions, with their own bars),
**figures** (PNG and SVG, predictions, metrics) and **report**. The run folder::

    run.json               config hash, finished stages, the request that finished it
                           (replaced atomically)
    config.yaml            the resolved config (overrides applied, defaults filled in)
    metrics.json           the action's summary: question, metrics, tables, figures, notes
    predictions.parquet    per-row predictions where the action has them
    activations_index.json what was read from or written to the store
    figures/NAME.png|svg   every figure
    report.md, report.html the report (self-contained HTML)
    artifacts.json         versions, git commit, seeds, sha256 of every input and output,
                           store keys, durations
    store/                 the activation store (unless extraction.store points elsewhere)

A folder holding a different run (another config hash) is refused unless ``force``, which
starts the run over (its outputs replaced, the store kept). A rerun of the same config skips
finished stages, and an interrupted one (Ctrl-C included) continues from the store.

A rerun of a complete run does nothing: when run.json records the action and the report for
the same request (the config as given, before the action's defaults are filled in) under the
same hookscope version, and every output and input still has the sha256 artifacts.json
recorded, :func:`run_spec` reads metrics.json and returns, without importing the action, the
model or torch. A missing or changed file (report.html deleted or edited, say) makes it
rebuild the report as a rerun always did. The check trusts that a hookscope version fills in
the same defaults; ``force`` reruns regardless.

Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
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


def _claim(out: Path, digest: str, run_name: str, force: bool) -> dict:
    """The run state of ``out`` for this config; refuses a folder of another run unless
    ``force``, which starts over (the outputs removed, the store kept)."""
    state_path = out / RUN_FILE
    if state_path.exists():
        if not force:
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError) as err:
                raise ExperimentError(
                    f"{state_path}: unreadable run state ({err}); use --force"
                ) from None
            if state.get("config_hash") == digest:
                return state
            raise ExperimentError(
                f"{out} holds a different run ({state.get('run_name')!r}, another config); "
                "choose another --out or pass --force to replace it"
            )
    elif out.exists() and any(p.name != "store" for p in out.iterdir()) and not force:
        raise ExperimentError(
            f"{out} is not empty and holds no hookscope run; choose another --out or pass --force"
        )
    # a fresh run (or a forced replacement): remove the previous run's outputs, keep the store
    if out.exists():
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "figures", ignore_errors=True)
    return {"run_name": run_name, "config_hash": digest, "stages": {}}


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
    stages = state.get("stages", {})
    if not (stages.get("action") and stages.get("report")):
        return None
    if state.get("request_hash") != config_hash(spec):
        return None
    if record.get("config_hash") != state.get("config_hash"):
        return None
    if (record.get("versions") or {}).get("hookscope") != __version__:
        return None
    files = record.get("files")
    if not (isinstance(files, dict) and {"metrics.json", "report.md", "report.html"} <= set(files)):
        return None
    for rel, digest in files.items():
        path = out_dir / rel
        if rel != RUN_FILE and (not path.is_file() or sha256(path) != digest):
            return None  # run.json is rewritten after artifacts.json: not compared
    recorded_inputs = record.get("inputs", {})
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
    out_dir = Path(out or spec.output_dir or Path("runs") / spec.run_name)
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
    state = _claim(out_dir, digest, spec.run_name, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(
        out_dir / "config.yaml",
        yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False).encode(),
    )
    _write(out_dir / RUN_FILE, _json(state))
    durations: dict[str, float] = dict(state.get("durations", {}))
    ran: list[str] = []
    todo = not state["stages"].get("action")
    bar = _StageBar(5 if todo else 1, progress)
    try:
        if todo:
            t0 = time.perf_counter()
            summary, index = _run_action(action, params, resolved, out_dir, bar, progress)
            durations["action"] = time.perf_counter() - t0
            state["stages"]["action"] = True
            state["durations"] = durations
            state["store_keys"] = sorted({e["key"] for e in index})
            _write(out_dir / RUN_FILE, _json(state))
            ran.append("action")
        else:
            summary = json.loads((out_dir / "metrics.json").read_text())
        with bar.stage("report", "" if todo else "rebuilt; the action's stage is finished"):
            t0 = time.perf_counter()
            from hookscope.experiments.report import write_report

            durations["report"] = time.perf_counter() - t0  # provisional; artifacts carry the final
            _write_artifacts(resolved, out_dir, state, durations, started, list(inputs))
            write_report(out_dir)
            durations["report"] = time.perf_counter() - t0
            _write_artifacts(resolved, out_dir, state, durations, started, list(inputs))
            state["stages"]["report"] = True
            state["request_hash"] = config_hash(spec)
            _write(out_dir / RUN_FILE, _json(state))
            ran.append("report")
    finally:
        bar.close()
    return RunOutcome(out_dir, summary, tuple(ran))


def _run_action(
    action: Any, params: Any, spec: RunSpec, out_dir: Path, bar: _StageBar, progress: bool
) -> tuple[dict, list]:
    from hookscope.experiments.context import Context, check_sites, load_dataset, load_model
    from hookscope.store import ActivationStore

    ex = spec.extraction
    with bar.stage("load", f"{ex.model}, {spec.dataset.name}"):
        model = load_model(ex.model, ex.device)
        check_sites(model, ex.sites)
        dataset, text, image = load_dataset(spec.dataset, model, spec.seed)
        store = ActivationStore(ex.store or out_dir / "store")
    ctx = Context(spec, params, model, dataset, text, image, store, out_dir, progress)
    with bar.stage("extract", f"{action.name}: prepare, through the store"):
        prepared = action.prepare(ctx)
    with bar.stage("run", action.name):
        result = action.run(prepared)
        summary = action.summarize(result)
    summary = {"action": action.name, **summary}
    with bar.stage("figures", f"{len(result.figures)} figure(s) as PNG and SVG, metrics"):
        for name, fig in result.figures.items():
            for ext in ("png", "svg"):
                buf = io.BytesIO()
                fig.savefig(buf, format=ext, dpi=120 if ext == "png" else None, bbox_inches="tight")
                _write(out_dir / "figures" / f"{name}.{ext}", buf.getvalue())
            import matplotlib.pyplot as plt

            plt.close(fig)
        if result.predictions is not None:
            buf = io.BytesIO()
            result.predictions.to_parquet(buf, index=False)
            _write(out_dir / "predictions.parquet", buf.getvalue())
        _write(
            out_dir / "activations_index.json",
            _json({"store": str(store.folder), "entries": ctx.index}),
        )
        _write(out_dir / "metrics.json", _json(summary))
    return summary, ctx.index


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
            and rel.name != "artifacts.json"
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
