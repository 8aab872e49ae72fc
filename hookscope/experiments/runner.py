"""``run``: one config -> one run folder of artifacts and a report.

Stages, each with a progress bar or a line on stderr: **load** (model, data), **extract**
(through the activation store: done once, resumable, no forward on a rerun), **fit /
intervene** (the action), **report**. The run folder::

    run.json               config hash and finished stages (replaced atomically)
    config.yaml            the resolved config (overrides applied, defaults filled in)
    metrics.json           the action's summary: question, metrics, tables, figures, notes
    predictions.parquet    per-row predictions where the action has them
    activations_index.json what was read from or written to the store
    figures/NAME.png|svg   every figure
    report.md, report.html the report (self-contained HTML)
    artifacts.json         versions, git commit, seeds, sha256 of every input and output,
                           store keys, durations
    store/                 the activation store (unless extraction.store points elsewhere)

A folder holding a different run (another config hash) is refused unless ``force``; a rerun
of the same config skips finished stages, and an interrupted one continues from the store.
Every file is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hookscope.errors import ExperimentError
from hookscope.experiments.spec import RunSpec, config_hash, load_spec, validate

__all__ = ["RunOutcome", "run", "run_spec", "versions"]

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
    """Where the run is, its summary (metrics.json) and which stages ran this time."""

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


def _stage(msg: str, progress: bool) -> None:
    if progress:
        print(f"hookscope run: {msg}", file=sys.stderr, flush=True)


def _claim(out: Path, digest: str, run_name: str, force: bool) -> dict:
    """The run state of ``out`` for this config; refuses a folder of another run."""
    state_path = out / RUN_FILE
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as err:
            raise ExperimentError(
                f"{state_path}: unreadable run state ({err}); use --force"
            ) from None
        if state.get("config_hash") == digest:
            return state
        if not force:
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


def run_spec(
    spec: RunSpec,
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    inputs: list[Path] | tuple = (),
) -> RunOutcome:
    """Run a validated :class:`RunSpec` (see the module docstring)."""
    from hookscope import actions

    started = datetime.datetime.now(datetime.timezone.utc)
    action = actions.get(spec.action.name)
    params = validate(action.Params, spec.action.params, prefix="action.params")
    out_dir = Path(out or spec.output_dir or Path("runs") / spec.run_name)
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
    if not state["stages"].get("action"):
        t0 = time.perf_counter()
        summary, index = _run_action(action, params, resolved, out_dir, progress)
        durations["action"] = time.perf_counter() - t0
        state["stages"]["action"] = True
        state["durations"] = durations
        state["store_keys"] = sorted({e["key"] for e in index})
        _write(out_dir / RUN_FILE, _json(state))
        ran.append("action")
    else:
        _stage("the action's stage is finished; rebuilding the report only", progress)
        summary = json.loads((out_dir / "metrics.json").read_text())
    t0 = time.perf_counter()
    _stage("report", progress)
    from hookscope.experiments.report import write_report

    durations["report"] = time.perf_counter() - t0  # provisional; artifacts carry the final
    _write_artifacts(resolved, out_dir, state, durations, started, list(inputs))
    write_report(out_dir)
    durations["report"] = time.perf_counter() - t0
    _write_artifacts(resolved, out_dir, state, durations, started, list(inputs))
    state["stages"]["report"] = True
    _write(out_dir / RUN_FILE, _json(state))
    ran.append("report")
    return RunOutcome(out_dir, summary, tuple(ran))


def _run_action(
    action: Any, params: Any, spec: RunSpec, out_dir: Path, progress: bool
) -> tuple[dict, list]:
    from hookscope.experiments.context import Context, check_sites, load_dataset, load_model
    from hookscope.store import ActivationStore

    ex = spec.extraction
    _stage(f"load {ex.model} and {spec.dataset.name}", progress)
    model = load_model(ex.model, ex.device)
    check_sites(model, ex.sites)
    dataset, text, image = load_dataset(spec.dataset, model, spec.seed)
    store = ActivationStore(ex.store or out_dir / "store")
    ctx = Context(spec, params, model, dataset, text, image, store, out_dir, progress)
    _stage(f"{action.name}: prepare (extract through the store)", progress)
    prepared = action.prepare(ctx)
    _stage(f"{action.name}: run", progress)
    result = action.run(prepared)
    summary = action.summarize(result)
    summary = {"action": action.name, **summary}
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
