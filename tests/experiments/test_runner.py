"""hookscope run: config errors, the run folder, reruns, plug-ins, interrupts, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hookscope import actions
from hookscope.cli import main
from hookscope.errors import ExperimentError
from hookscope.experiments import load_spec, run
from hookscope.experiments.spec import apply_overrides

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "feature_detection_digits.yaml"
SMALL = [
    "dataset.n=200",
    "action.params.seeds=2",
    "action.params.bootstrap=100",
    "action.params.permutations=100",
    "controls=[shuffle]",
]


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def cli(*args: str) -> tuple[int, str]:
    """Exit status and stderr of the command line, in this process."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


# ------------------------------------------------------------------ config errors
def test_spec_errors_are_one_line_with_the_field_path(tmp_path):
    base = CONFIG.read_text()
    bad = write(tmp_path, base.replace("metric: accuracy", "metric: acuracy"))
    code, err = cli("run", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2
    assert err.strip() == (
        "hookscope: error: action.params.metric: 'acuracy' is not one of accuracy, f1, auroc, "
        "r2; did you mean 'accuracy'?"
    )
    assert not (tmp_path / "o").exists()  # nothing half-written
    with pytest.raises(ExperimentError, match=r"^dataset\.nn: unknown key; .*did you mean 'n'\?$"):
        load_spec(write(tmp_path, base.replace("n: 450", "nn: 450")))
    with pytest.raises(ExperimentError, match=r"malformed YAML at line 3, column 8: mapping"):
        load_spec(write(tmp_path, "run_name: x\nseed: 1\n  extra: 2\n"))
    with pytest.raises(ExperimentError, match=r"no such config file"):
        load_spec(tmp_path / "absent.yaml")
    with pytest.raises(
        ExperimentError, match=r"^dataset\.name: 'digit' is not one of .*did you mean 'digits'\?"
    ):
        load_spec(CONFIG, ["dataset.name=digit"])
    with pytest.raises(
        ExperimentError,
        match=r"^action\.name: 'feature_detect' is not one of .*'feature_detection'",
    ):
        run(CONFIG, ["action.name=feature_detect"], out=tmp_path / "o2")
    with pytest.raises(ExperimentError, match=r"^controls\[0\]\.name: 'shufle' is not one of"):
        load_spec(CONFIG, ["controls=[shufle]"])
    with pytest.raises(ExperimentError, match="required but missing"):
        load_spec(write(tmp_path, "run_name: x\n"))
    code, err = cli(
        "run",
        str(CONFIG),
        "--set",
        "extraction.sites=[attn_out.*]",
        "--out",
        str(tmp_path / "o3"),
        "--no-progress",
    )
    assert code == 2 and err.startswith("hookscope: error: extraction.sites[0]:")
    assert err.count("\n") == 1
    code, err = cli(
        "run",
        str(CONFIG),
        *sum((["--set", s] for s in SMALL), []),
        "--set",
        "dataset.label_column=digit",
        "--out",
        str(tmp_path / "o4"),
        "--no-progress",
    )
    assert code == 2 and "dataset.label_column: 'digit' is not a column" in err


def test_set_overrides_parse_yaml_values():
    data = {"seed": 0, "action": {"params": {"metric": "accuracy"}}}
    out = apply_overrides(
        data, ["seed=3", "action.params.metric=auroc", "controls=[a, b]", "extraction.batch_size=8"]
    )
    assert out == {
        "seed": 3,
        "action": {"params": {"metric": "auroc"}},
        "controls": ["a", "b"],
        "extraction": {"batch_size": 8},
    }
    assert data["seed"] == 0  # the input is not modified
    with pytest.raises(ExperimentError, match="dotted.path=value"):
        apply_overrides(data, ["seed"])


# ------------------------------------------------------------------ the run folder
@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "fd"
    outcome = run(CONFIG, SMALL, out=out, progress=False)
    return out, outcome


def test_run_writes_every_artifact_with_hashes(first_run):
    out, outcome = first_run
    assert outcome.ran == ("action", "report")
    for name in (
        "run.json",
        "config.yaml",
        "metrics.json",
        "predictions.parquet",
        "activations_index.json",
        "report.md",
        "report.html",
        "artifacts.json",
        "figures/probe_sweep.png",
        "figures/probe_sweep.svg",
    ):
        assert (out / name).is_file(), name
    art = json.loads((out / "artifacts.json").read_text())
    assert "run.json" not in art["files"]  # the mutable state file, rewritten after
    for rel, digest in art["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel
    assert art["inputs"][str(CONFIG)] == hashlib.sha256(CONFIG.read_bytes()).hexdigest()
    assert art["versions"]["torch"] == torch.__version__.split("+")[0] or art["versions"]["torch"]
    assert art["seeds"] == {"seed": 0} and art["store_keys"]
    if (ROOT / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert art["git_commit"] == head
    resolved = load_spec(out / "config.yaml")[0]
    assert resolved.dataset.n == 200 and resolved.action.params["seeds"] == 2
    assert resolved.action.params["C"] == 1.0  # defaults filled in
    index = json.loads((out / "activations_index.json").read_text())
    assert [e["action"] for e in index["entries"]] == ["written"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["action"] == "feature_detection"
    assert metrics["metrics"]["best_score"] > 0.8


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_rerun_does_no_forward_and_same_seed_gives_identical_metrics(first_run, tmp_path, capsys):
    out, first = first_run
    before = _contents(out)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(m))
    try:
        again = run(CONFIG, SMALL, out=out, progress=False)
        assert again.ran == () and calls == []  # complete and unchanged: nothing to do
        assert again.summary == first.summary
        assert _contents(out) == before  # not a byte written
        # a second folder, same config, the same store: extraction is read, not recomputed
        twin = run(
            CONFIG,
            [*SMALL, f"extraction.store={out / 'store'}"],
            out=tmp_path / "twin",
            progress=False,
        )
        assert twin.ran == ("action", "report")
        # --force starts the run over (the action again, reading the store), same metrics
        forced = run(
            CONFIG,
            [*SMALL, f"extraction.store={out / 'store'}"],
            out=tmp_path / "twin",
            force=True,
            progress=False,
        )
        assert forced.ran == ("action", "report")
    finally:
        handle.remove()
    assert calls == []  # (the untrained control is off here)
    assert capsys.readouterr().err == ""  # progress=False: no bar, no stage line
    assert (tmp_path / "twin" / "metrics.json").read_bytes() == (out / "metrics.json").read_bytes()
    index = json.loads((tmp_path / "twin" / "activations_index.json").read_text())
    assert [e["action"] for e in index["entries"]] == ["read"]
    assert twin.summary == json.loads((out / "metrics.json").read_text())


def test_rerun_of_a_complete_run_imports_no_torch(first_run):
    """The command line on a finished, unchanged run folder: one line on stderr, the usual
    lines on stdout, and torch (so any model, any forward) never imported."""
    out, _ = first_run
    code = textwrap.dedent(f"""
        import sys
        from hookscope.cli import main
        args = ["run", {str(CONFIG)!r}, "--out", {str(out)!r}]
        for s in {SMALL!r}:
            args += ["--set", s]
        status = main(args)
        heavy = [m for m in ("torch", "transformers", "pandas", "matplotlib") if m in sys.modules]
        print("heavy:", heavy)
        sys.exit(status)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"{out}/report.html"
    assert "heavy: []" in done.stdout
    assert done.stderr.count("\n") == 1 and "complete and unchanged; nothing to do" in done.stderr
    assert str(out / "report.html") in done.stderr


def test_a_missing_or_edited_report_is_rebuilt_on_rerun(first_run):
    out, _ = first_run

    def recorded(name: str) -> bool:
        art = json.loads((out / "artifacts.json").read_text())
        return art["files"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()

    (out / "report.html").unlink()
    assert run(CONFIG, SMALL, out=out, progress=False).ran == ("report",)
    assert (out / "report.html").is_file() and recorded("report.html")
    with open(out / "report.md", "a") as f:
        f.write("\nedited by hand\n")
    assert run(CONFIG, SMALL, out=out, progress=False).ran == ("report",)
    assert "edited by hand" not in (out / "report.md").read_text() and recorded("report.md")
    assert run(CONFIG, SMALL, out=out, progress=False).ran == ()  # whole again
    # a changed config file (same values, a new comment): the artifacts record its new hash
    edited = write(out.parent, CONFIG.read_text() + "# a comment\n", "edited.yaml")
    assert run(edited, SMALL, out=out, progress=False).ran == ("report",)
    art = json.loads((out / "artifacts.json").read_text())
    assert art["inputs"] == {str(edited): hashlib.sha256(edited.read_bytes()).hexdigest()}
    assert run(edited, SMALL, out=out, progress=False).ran == ()
    assert run(CONFIG, SMALL, out=out, progress=False).ran == ("report",)  # back to CONFIG


def test_one_progress_bar_over_the_stages_on_stderr(first_run, tmp_path, capsys):
    out, _ = first_run
    small = [*SMALL, f"extraction.store={out / 'store'}"]
    run(CONFIG, small, out=tmp_path / "bar", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    for stage in ("load", "extract", "run", "figures", "report"):
        assert f"hookscope run: {stage} (" in err or f"hookscope run: {stage} |" in err, stage
    assert "stage 5/5" in err
    assert "probing sites" in err  # the action's own bar beneath the stages' bar
    run(CONFIG, small, out=tmp_path / "bar", progress=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "complete and unchanged" in err and "stage" not in err
    (tmp_path / "bar" / "report.html").unlink()
    run(CONFIG, small, out=tmp_path / "bar", progress=True)
    err = capsys.readouterr().err
    assert "report (rebuilt" in err and "stage 1/1" in err and "load" not in err


def test_a_folder_of_another_run_is_refused_unless_forced(first_run, tmp_path):
    out, _ = first_run
    before = (out / "metrics.json").read_bytes()
    code, err = cli(
        "run",
        str(CONFIG),
        *sum((["--set", s] for s in SMALL), []),
        "--set",
        "seed=1",
        "--out",
        str(out),
        "--no-progress",
    )
    assert code == 2 and "holds a different run" in err and "--force" in err
    assert (out / "metrics.json").read_bytes() == before
    stranger = tmp_path / "busy"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ExperimentError, match="not empty and holds no hookscope run"):
        run(CONFIG, SMALL, out=stranger, progress=False)
    assert (stranger / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("progress", [False, True])
def test_interrupt_then_rerun_continues_from_the_store(tmp_path, monkeypatch, progress, capsys):
    from hookscope.experiments.actions import feature_detection

    out = tmp_path / "int"

    def interrupted(self, prepared):
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_detection.FeatureDetection, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(CONFIG, SMALL, out=out, progress=progress)
    assert not (out / "metrics.json").exists()
    assert json.loads((out / "run.json").read_text())["stages"] == {}
    if progress:  # the stages' bar stopped at the interrupted stage
        err = capsys.readouterr().err
        assert "hookscope run: run (feature_detection)" in err and "stage 2/5" in err
        assert "stage 3/5" not in err
    monkeypatch.undo()
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(m))
    try:
        outcome = run(CONFIG, SMALL, out=out, progress=progress)
    finally:
        handle.remove()
    assert outcome.ran == ("action", "report") and calls == []  # extraction came from the store


def test_report_command_and_actions_listing(first_run, capsys):
    out, _ = first_run
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()
    assert main(["actions"]) == 0
    listing = capsys.readouterr().out
    for name in (
        "feature_detection",
        "feature_comparison",
        "circuit_localization",
        "polysemanticity",
        "repr_collapse",
    ):
        assert name in listing
    assert "metric:" in listing and "seeds:" in listing
    code, err = cli("report", str(out / "nowhere"))
    assert code == 2 and "not a finished run folder" in err


def test_a_plugin_action_from_an_entry_point(tmp_path):
    """A package installed the way pip installs one (a module plus a .dist-info with an
    entry_points.txt on sys.path) registers its action in a fresh process."""
    site = tmp_path / "site"
    (site / "demo_action").mkdir(parents=True)
    (site / "demo_action" / "__init__.py").write_text(
        textwrap.dedent('''
        from hookscope.actions import Action, ActionResult, Params

        class Count(Action):
            """Counts the dataset's rows."""
            class Params(Params):
                scale: int = 1
            def prepare(self, context):
                return len(context.dataset) * context.params.scale
            def run(self, prepared):
                return ActionResult(metrics={"rows": prepared})
            def summarize(self, result):
                return {"question": "How many rows?", "metrics": result.metrics,
                        "tables": [], "figures": [], "notes": []}
    ''')
    )
    info = site / "demo_action-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-action\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hookscope.actions]\nrow_count = demo_action:Count\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    listing = subprocess.run(
        [sys.executable, "-m", "hookscope", "actions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listing.returncode == 0, listing.stderr
    assert "row_count  [plug-in: demo_action]" in listing.stdout
    assert "scale: int (default 1)" in listing.stdout
    config = write(
        tmp_path,
        CONFIG.read_text().replace(
            "feature_detection, params: {probe: logistic, metric: accuracy, seeds: 5}",
            "row_count, params: {scale: 3}",
        ),
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hookscope",
            "run",
            str(config),
            "--set",
            "dataset.n=50",
            "--out",
            str(tmp_path / "p"),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["metrics"] == {"rows": 150}
    assert "row_count" not in actions.available()  # not installed in this process


def test_the_pythia70m_config_through_the_hub_cache_path(tmp_path):
    """configs/feature_detection_pythia70m.yaml names EleutherAI/pythia-70m: here a
    pythia-70m-shaped model laid out as the Hugging Face hub cache holds it, offline."""
    import shutil

    import builders

    commit = "0123456789abcdef0123456789abcdef01234567"
    base = tmp_path / "hub" / "models--EleutherAI--pythia-70m"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    builders.save_pythia_like(tmp_path / "model")
    shutil.copytree(tmp_path / "model", base / "snapshots" / commit)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    # the test tokenizer has one single-token verb of the agreement pairs
    small = [
        "dataset.n=120",
        "dataset.options.verbs=[is]",
        "action.params.seeds=2",
        "action.params.bootstrap=100",
        "action.params.permutations=100",
        "extraction.sites=[resid_post.0, resid_post.5]",
        "controls=[shuffle, {name: control_task, key: token}]",
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hookscope",
            "run",
            str(ROOT / "configs" / "feature_detection_pythia70m.yaml"),
            *sum((["--set", s] for s in small), []),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr  # --no-progress silences transformers too
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    sites = metrics["metrics"]["sites"]
    assert list(sites) == ["resid_post.0", "resid_post.5"]
    assert all("control_task" in row and "selectivity" in row for row in sites.values())
    art = json.loads((tmp_path / "run" / "artifacts.json").read_text())
    assert art["config"]["extraction"]["model"] == "EleutherAI/pythia-70m"


def test_an_action_missing_a_method_is_refused_at_registration():
    with pytest.raises(ExperimentError, match="lacks run, summarize"):

        @actions.register("half_done")
        class HalfDone(actions.Action):
            def prepare(self, context):
                return None

    assert "half_done" not in actions.available()


def test_every_column_of_the_sites_table_has_its_sentence(first_run):
    """The report explains every number: each column of the sweep's table, the controls' sd
    and interval columns included (derived from their base column's sentence)."""
    _, outcome = first_run
    table = next(t for t in outcome.summary["tables"] if t["name"] == "sites")
    assert set(table["columns"]) == set(table["explain"])
    assert table["explain"]["shuffle_sd"] == "shuffle: its standard deviation over seeds"
