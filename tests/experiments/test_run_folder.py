"""hookscope run and its folder: where it writes, what a mistake leaves, when a stage is reused."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from hookscope import actions
from hookscope.cli import main
from hookscope.errors import ExperimentError
from hookscope.experiments import load_spec, run

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "feature_detection_digits.yaml"
SMALL = [
    "dataset.n=200",
    "action.params.seeds=2",
    "action.params.bootstrap=100",
    "action.params.permutations=100",
    "controls=[shuffle]",
]
OUTPUTS = ("metrics.json", "predictions.parquet", "activations_index.json", "report.md")


def cli(*args: str) -> tuple[int, str]:
    """Exit status and stderr of the command line, in this process."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def small(*extra: str) -> list[str]:
    """The command-line flags of SMALL plus ``extra`` overrides."""
    return sum((["--set", s] for s in (*SMALL, *extra)), [])


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A finished run of CONFIG with SMALL (its store inside); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("good") / "fd"
    run(CONFIG, SMALL, out=out, progress=False)
    return out


@pytest.fixture
def copy(good, tmp_path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(good, dest)
    return dest


@pytest.fixture
def forwards():
    """The modules run forward while the test runs."""
    calls: list = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(m))
    yield calls
    handle.remove()


# ------------------------------------------------------------ 1. where the run writes
@pytest.mark.parametrize("name", ["..", "."])
def test_a_dot_run_name_is_refused_and_the_working_folder_untouched(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.md").write_text("my own report")
    (tmp_path / "metrics.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.read_text().replace("output_dir: runs/feature_detection_digits\n", ""))
    before = contents(tmp_path)
    code, err = cli("run", str(config), *small(f"run_name={name}"), "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"hookscope: error: run_name: {name!r} names no folder of its own")
    assert contents(tmp_path) == before and not (tmp_path / "runs").exists()
    with pytest.raises(ExperimentError, match="^run_name: String should have at least 1"):
        load_spec(CONFIG, ["run_name=''"])


def test_an_out_path_through_a_missing_folder_meets_the_not_empty_guard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    busy = tmp_path / "existing"
    busy.mkdir()
    (busy / "report.md").write_text("mine")
    code, err = cli("run", str(CONFIG), *small(), "--out", "missing/../existing", "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert f"{busy} is not empty and holds no hookscope run" in err
    assert contents(busy) == {"report.md": b"mine"}
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------------------ 2. nothing half-written
MISTAKES = {
    "site": (["extraction.sites=[attn_out.*]"], "extraction.sites[0]:"),
    "n": (["dataset.n=100000"], "dataset.n: 100000 rows asked"),
    "label": (["dataset.label_column=digit"], "dataset.label_column: 'digit' is not a column"),
    "split": (["dataset.source_split=bogus"], "dataset.source_split: unknown digits split"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_mistake_writes_nothing_and_the_corrected_config_then_runs(tmp_path, mistake):
    overrides, message = MISTAKES[mistake]
    out = tmp_path / "o"
    code, err = cli("run", str(CONFIG), *small(*overrides), "--out", str(out), "--no-progress")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()
    out.mkdir()  # an empty folder the user made: left as it was
    code, err = cli("run", str(CONFIG), *small(*overrides), "--out", str(out), "--no-progress")
    assert code == 2 and message in err and list(out.iterdir()) == []
    assert run(CONFIG, SMALL, out=out, progress=False).ran == ("action", "report")


def test_a_plugin_failing_in_prepare_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    from hookscope.experiments.actions import feature_detection

    def refuse(self, context):
        context.activations()  # extraction done, then a check of the plug-in fails
        raise ExperimentError("action.params.thing: not accepted")

    monkeypatch.setattr(feature_detection.FeatureDetection, "prepare", refuse)
    out = tmp_path / "o"
    code, err = cli("run", str(CONFIG), *small(), "--out", str(out), "--no-progress")
    assert code == 2 and err == "hookscope: error: action.params.thing: not accepted\n"
    assert sorted(p.name for p in out.iterdir()) == ["store"]  # the extraction, kept
    monkeypatch.undo()
    assert run(CONFIG, SMALL, out=out, progress=False).ran == ("action", "report")


def test_force_with_a_bad_config_keeps_the_good_run(copy):
    before = contents(copy)
    for overrides in (["dataset.label_column=digit"], ["extraction.sites=[attn_out.*]"]):
        code, err = cli(
            "run",
            str(CONFIG),
            *small(*overrides, "seed=1"),
            "--out",
            str(copy),
            "--force",
            "--no-progress",
        )
        assert code == 2 and err.count("\n") == 1
        assert contents(copy) == before
    assert run(CONFIG, SMALL, out=copy, progress=False).ran == ()  # still complete


# ------------------------------------------------------------ 3. a reused stage is intact
def _damage_metrics(folder: Path) -> None:
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["metrics"]["best_score"] = 1.0
    (folder / "metrics.json").write_text(json.dumps(metrics))


DAMAGE = {
    "metrics deleted": lambda f: (f / "metrics.json").unlink(),
    "predictions deleted": lambda f: (f / "predictions.parquet").unlink(),
    "figure deleted": lambda f: (f / "figures" / "probe_sweep.png").unlink(),
    "index deleted": lambda f: (f / "activations_index.json").unlink(),
    "metrics edited": _damage_metrics,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_action_output_redoes_the_action_from_the_store(copy, good, damage, forwards):
    DAMAGE[damage](copy)
    (copy / "report.html").unlink()  # and a report stage to redo (the slow path)
    outcome = run(CONFIG, SMALL, out=copy, progress=False)
    assert outcome.ran == ("action", "report") and forwards == []
    for rel in (*OUTPUTS[:2], "figures/probe_sweep.png"):  # (SVGs carry random ids)
        assert (copy / rel).read_bytes() == (good / rel).read_bytes(), rel
    assert (copy / "figures" / "probe_sweep.svg").is_file()
    art = json.loads((copy / "artifacts.json").read_text())
    assert {"metrics.json", "predictions.parquet", "figures/probe_sweep.png"} <= set(art["files"])
    for rel, digest in art["files"].items():
        assert sha(copy / rel) == digest, rel
    assert run(CONFIG, SMALL, out=copy, progress=False).ran == ()


# ------------------------------------------------------------ 4-6. data files, run.json, question
class _Rows(actions.Action):
    """Counts the rows and sums the label column of the dataset."""

    class Params(actions.Params):
        scale: int = 1

    def prepare(self, context):
        context.require_column(context.label_column, "dataset.label_column")
        return [int(x) for x in context.dataset[context.label_column]]

    def run(self, prepared):
        return actions.ActionResult(metrics={"rows": len(prepared), "total": sum(prepared)})

    def summarize(self, result):
        return {
            "question": "How many rows?",
            "metrics": result.metrics,
            "tables": [],
            "figures": [],
            "notes": [],
        }


@pytest.fixture
def rows_action():
    actions.register("test_rows")(_Rows)
    yield "test_rows"
    actions._REGISTRY.pop("test_rows")


def _files_config(
    tmp_path: Path, data: Path, question: str | None = None, model: str = "digits-mlp"
) -> Path:
    config = tmp_path / "files.yaml"
    config.write_text(
        textwrap.dedent(f"""
            run_name: files_run
            {"question: " + json.dumps(question) if question else ""}
            dataset: {{name: files, path: {data}}}
            extraction: {{model: {model}, sites: ["resid_post.0"], positions: last}}
            action: {{name: test_rows}}
        """)
    )
    return config


def test_a_changed_data_file_redoes_the_action(tmp_path, rows_action):
    data = tmp_path / "t.csv"
    data.write_text("label\n1\n2\n")
    config = _files_config(tmp_path, data)
    out = tmp_path / "o"
    assert run(config, out=out, progress=False).summary["metrics"] == {"rows": 2, "total": 3}
    art = json.loads((out / "artifacts.json").read_text())
    assert art["inputs"][str(data)] == sha(data)
    assert run(config, out=out, progress=False).ran == ()
    data.write_text("label\n1\n2\n40\n")
    again = run(config, out=out, progress=False)
    assert again.ran == ("action", "report")
    assert again.summary["metrics"] == {"rows": 3, "total": 43}
    assert json.loads((out / "metrics.json").read_text())["metrics"]["total"] == 43
    assert json.loads((out / "artifacts.json").read_text())["inputs"][str(data)] == sha(data)
    (out / "report.md").unlink()  # the report-only path checks the data too
    data.write_text("label\n5\n")
    assert run(config, out=out, progress=False).ran == ("action", "report")
    assert json.loads((out / "metrics.json").read_text())["metrics"]["total"] == 5


def test_a_saved_dataset_folder_is_hashed_file_by_file(tmp_path, rows_action):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"label": [1, 2]}).save_to_disk(str(folder))
    config = _files_config(tmp_path, folder)
    out = tmp_path / "o"
    assert run(config, out=out, progress=False).summary["metrics"]["total"] == 3
    shutil.rmtree(folder)
    datasets.Dataset.from_dict({"label": [1, 2, 3]}).save_to_disk(str(folder))
    assert run(config, out=out, progress=False).summary["metrics"]["total"] == 6


def test_new_weights_in_a_local_model_folder_redo_the_action(tmp_path, rows_action):
    import builders

    model = builders.save_pythia_like(tmp_path / "model", seed=0)
    data = tmp_path / "t.csv"
    data.write_text("label\n1\n")
    config = _files_config(tmp_path, data, model=str(model))
    out = tmp_path / "o"
    assert run(config, out=out, progress=False).ran == ("action", "report")
    assert run(config, out=out, progress=False).ran == ()
    builders.save_pythia_like(model, seed=1)  # new weights, same folder
    assert run(config, out=out, progress=False).ran == ("action", "report")
    art = json.loads((out / "artifacts.json").read_text())
    weights = next(model.glob("*.safetensors"))
    assert art["inputs"][str(weights)] == sha(weights)


def test_run_json_is_not_hashed_and_the_configs_question_reaches_the_report(tmp_path, rows_action):
    data = tmp_path / "t.csv"
    data.write_text("label\n1\n")
    out = tmp_path / "o"
    question = "Does the file hold one row?"
    run(_files_config(tmp_path, data, question), out=out, progress=False)
    art = json.loads((out / "artifacts.json").read_text())
    assert "run.json" not in art["files"] and "config.yaml" in art["files"]
    for rel, digest in art["files"].items():
        assert sha(out / rel) == digest, rel
    assert json.loads((out / "metrics.json").read_text())["question"] == question
    assert question in (out / "report.md").read_text()
    assert question in (out / "report.html").read_text()
    assert "How many rows?" not in (out / "report.md").read_text()
    run(_files_config(tmp_path, data), out=tmp_path / "p", progress=False)  # no question
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["question"] == (
        "How many rows?"
    )


# ------------------------------------------------------------ 7. one-line errors
def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, what in ((afile, "is a file, not a folder"), (afile / "sub", "is a file, so")):
        code, err = cli("run", str(CONFIG), *small(), "--out", str(out), "--no-progress")
        assert code == 2 and err.count("\n") == 1 and what in err, err
        assert err.startswith("hookscope: error: --out / output_dir:")
    assert afile.read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_out_where_nothing_can_be_written_is_one_line(tmp_path):
    code, err = cli("run", str(CONFIG), *small(), "--out", "/proc/hookscope-run", "--no-progress")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("hookscope: error: --out / output_dir:") and "/proc/hookscope-run" in err


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", "4294967296"])
def test_a_seed_out_of_range_is_one_line(tmp_path, seed):
    code, err = cli("run", str(CONFIG), "--set", f"seed={seed}", "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("hookscope: error: seed: ")
    assert not (tmp_path / "o").exists()
    assert load_spec(CONFIG, ["seed=4294967295"])[0].seed == 2**32 - 1


@pytest.mark.parametrize("state", ["[1, 2]", '{"config_hash": "x"}', "{not json", "null"])
def test_a_damaged_run_json_is_one_line_and_force_replaces_it(copy, state):
    (copy / "run.json").write_text(state)
    code, err = cli("run", str(CONFIG), *small(), "--out", str(copy), "--no-progress")
    assert code == 2 and err.count("\n") == 1, err
    assert "unreadable run state" in err and "use --force" in err
    if state == "[1, 2]":
        code, err = cli(
            "run", str(CONFIG), *small(), "--out", str(copy), "--force", "--no-progress"
        )
        assert code == 0, err
        assert json.loads((copy / "run.json").read_text())["stages"] == {
            "action": True,
            "report": True,
        }


# ------------------------------------------------------------ config strictness (review)
def test_a_key_given_twice_is_malformed_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("run_name: a\nrun_name: b\n" + CONFIG.read_text())
    with pytest.raises(ExperimentError, match="line 2, column 1: key 'run_name' is given twice"):
        load_spec(config)


@pytest.mark.parametrize(
    "override, message",
    [
        ("controls=[shuffle, shuffle]", "controls: 'shuffle' is listed twice"),
        ("action.params.C=.inf", "action.params.C"),
        ("dataset.options={x: 1}", "digits takes no options"),
        ("dataset.path=t.csv", "path is read by name: files only"),
        ("dataset.text_column=foo", "text_column does not apply"),
    ],
)
def test_config_mistakes_that_used_to_pass_silently(override, message):
    """Controls listed twice, an infinite C, and fields the named dataset does not read are
    each a one-line error naming them (they used to be ignored)."""
    from hookscope.experiments.spec import validate

    with pytest.raises(ExperimentError, match=message):
        spec, _ = load_spec(CONFIG, [override])
        # action parameters are checked by the action's own schema
        validate(actions.get(spec.action.name).Params, spec.action.params, "action.params")


class _Escape(_Rows):
    """Returns a figure whose name would leave the run folder."""

    def run(self, prepared):
        import matplotlib.pyplot as plt

        return actions.ActionResult(
            metrics={"rows": len(prepared)}, figures={"../../x": plt.figure()}
        )


def test_a_figure_name_cannot_leave_the_run_folder(tmp_path):
    actions.register("test_escape")(_Escape)
    try:
        data = tmp_path / "t.csv"
        data.write_text("label\n1\n2\n")
        config = _files_config(tmp_path, data)
        config.write_text(config.read_text().replace("test_rows", "test_escape"))
        with pytest.raises(ExperimentError, match=r"figures named \['\.\./\.\./x'\]"):
            run(config, out=tmp_path / "deep" / "o", progress=False)
        assert not list(tmp_path.rglob("x.png")) and not list(tmp_path.rglob("x.svg"))
    finally:
        actions._REGISTRY.pop("test_escape")
