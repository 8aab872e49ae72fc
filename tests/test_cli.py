"""The ``hookscope`` command line: the localize job end to end, help, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hookscope as hs
from hookscope import cli

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INDUCTION_HEADS = {"head.1.0", "head.1.1", "head.1.2", "head.1.3"}  # tiny-induction's card


@pytest.fixture(scope="module")
def run_module(tmp_path_factory):
    """One real `python -m hookscope localize` in a subprocess (the entry point, end to end)."""
    cwd = tmp_path_factory.mktemp("cli_run")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "hookscope", "localize", "--model", "tiny-induction"]
        + ["--task", "induction", "--n", "16", "--out", "tmp"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, cwd / "tmp"


def test_python_m_hookscope_localize_end_to_end(run_module):
    proc, out = run_module
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    record = json.loads((out / "result.json").read_text())
    circuit = set(record["result"]["circuit"])
    assert "head.0.3" in circuit  # the previous-token head
    assert circuit & INDUCTION_HEADS  # and at least one induction head
    assert record["result"]["reached"] is True and record["result"]["score"] >= 0.8
    assert record["model"] == "tiny-induction" and record["task"]["name"] == "induction"
    assert record["task"]["n"] == 16 and record["hookscope_version"] == hs.__version__
    assert record["arguments"]["method"] == "attribution"
    assert record["options"]["direction"] == "noise"  # the task's default
    assert set(record["timing"]) == {"load_s", "task_s", "localize_s", "total_s"}
    assert len(record["result"]["candidates"]) == 8  # every head of the 2 x 4 model
    assert (out / "heatmap.png").read_bytes()[:8] == PNG_MAGIC
    # stdout: the result's table, then the two paths
    assert "rank  component" in proc.stdout
    assert "circuit of" in proc.stdout and "head.0.3" in proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == f"wrote {Path('tmp') / 'result.json'}"
    assert lines[-1] == f"wrote {Path('tmp') / 'heatmap.png'}"
    assert "%|" in proc.stderr  # the tqdm bar is on stderr, not stdout
    assert "%|" not in proc.stdout


def test_in_process_exact_no_progress(tmp_path, capsys):
    out = tmp_path / "nested" / "out"  # missing parents are created
    argv = ["localize", "--model", "tiny-induction", "--task", "induction", "--n", "8"]
    argv += ["--method", "exact", "--candidates", "5", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --no-progress: nothing on stderr
    assert "CircuitResult(exact screen" in captured.out
    record = json.loads((out / "result.json").read_text())
    assert record["result"]["method"] == "exact" and len(record["result"]["candidates"]) == 5
    assert record["arguments"]["candidates"] == 5 and record["arguments"]["no_progress"] is True
    assert (out / "heatmap.png").read_bytes()[:8] == PNG_MAGIC


def test_help_lists_tasks_and_models(capsys):
    assert cli.main(["localize", "--help"]) == 0
    text = capsys.readouterr().out
    for name in ["tiny-induction", "smollm2-135m", "pythia-14m ... pythia-12b", "--method"]:
        assert name in text, name
    lines = text.splitlines()
    for name, description in hs.interventions.TASKS.items():  # one line per task
        assert any(line.split() == [name, *description.split()] for line in lines), name
    assert cli.main(["--help"]) == 0
    assert "localize" in capsys.readouterr().out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hookscope {hs.__version__}"


LOCALIZE = ["localize", "--model", "tiny-induction", "--task", "induction", "--no-progress"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["localize", "--model", "tiny-inductoin", "--task", "induction"],
            ["unknown zoo model 'tiny-inductoin'", "tiny-induction, digits-mlp", "Did you mean"],
        ),
        (
            ["localize", "--model", "tiny-induction", "--task", "inductoin"],
            ["unknown task 'inductoin'", "induction, ioi", "Did you mean 'induction'?"],
        ),
        (LOCALIZE + ["--method", "exactly"], ["--method", "attribution, exact", "'exact'"]),
        (LOCALIZE + ["--direction", "up"], ["--direction", "denoise, noise"]),
        (LOCALIZE + ["--criterion", "x"], ["--criterion", "patch, faithfulness"]),
        (LOCALIZE + ["--threshold", "2"], ["--threshold", "(0, 1]", "got 2"]),
        (LOCALIZE + ["--threshold", "0"], ["--threshold", "(0, 1]"]),
        (LOCALIZE + ["--threshold", "nan"], ["--threshold", "(0, 1]"]),
        (LOCALIZE + ["--threshold", "high"], ["--threshold", "(0, 1]", "'high'"]),
        (LOCALIZE + ["--n", "0"], ["--n", "at least 1", "got 0"]),
        (LOCALIZE + ["--n", "many"], ["--n", "positive integer"]),
        (LOCALIZE + ["--candidates", "-3"], ["--candidates", "at least 1"]),
        (["localize", "--task", "induction"], ["required", "--model"]),
        ([], ["required", "COMMAND"]),
        (["frobnicate"], ["invalid choice", "localize"]),
        (LOCALIZE + ["--bogus"], ["unrecognized arguments: --bogus"]),
    ],
)
def test_mistakes_print_one_line_and_exit_2(argv, expected, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hookscope: error: ")
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in captured.err and captured.out == ""


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hookscope: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker / "sub", blocker):  # under a file; an existing file
        assert cli.main(LOCALIZE + ["--out", str(out)]) == 2
        line = _one_error_line(capsys)
        assert f"--out {out}: cannot create or write the output folder" in line
    assert blocker.read_text() == "not a folder"


def test_hookscope_error_deep_in_the_run_is_one_line(tmp_path, capsys):
    # an address out of range is found by localize_circuit, after the model is loaded
    assert cli.main(LOCALIZE + ["--sites", "head.9.*", "--out", str(tmp_path)]) == 2
    assert "layer 9 out of range" in _one_error_line(capsys)
    # a task the model cannot do (no tokenizer for ioi)
    argv = ["localize", "--model", "tiny-induction", "--task", "ioi", "--no-progress"]
    assert cli.main(argv + ["--out", str(tmp_path)]) == 2
    assert "tokenizer" in _one_error_line(capsys)


def test_model_load_error_is_one_line(tmp_path, capsys, monkeypatch):
    def unavailable(name, **kwargs):
        raise hs.ModelLoadError(f"{name} is not installed;\nrun `make models`")

    monkeypatch.setattr(hs.zoo, "load", unavailable)
    argv = ["localize", "--model", "smollm2-135m", "--task", "ioi", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)  # even with progress on, and the message joined to one line
    assert line == "hookscope: error: smollm2-135m is not installed; run `make models`"


def test_ctrl_c_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(name, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hs.zoo, "load", interrupted)
    assert cli.main(LOCALIZE + ["--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.splitlines() == ["hookscope: interrupted"]


def test_import_leaves_plotting_and_datasets_until_first_use():
    """``import hookscope`` (and so the command line) does not import matplotlib, scipy or
    datasets; ``hs.analysis`` / ``hs.data`` / ``hs.zoo`` load on first use."""
    code = (
        "import sys, hookscope as hs\n"
        "heavy = [m for m in ('matplotlib', 'scipy', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert {'analysis', 'data', 'zoo'} <= set(dir(hs))\n"
        "assert callable(hs.data.ioi) and callable(hs.zoo.load) and hs.analysis.cka\n"
        "from hookscope import data\n"
        "assert data is hs.data\n"
        "try:\n"
        "    hs.no_such_thing\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_thing' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_output_piped_into_a_reader_that_stops_early_is_not_a_traceback(tmp_path):
    """`hookscope localize ... | head -2`: the closed pipe ends the run quietly."""
    command = (
        f"{sys.executable} -m hookscope localize --model tiny-induction --task induction "
        f"--out {tmp_path} --no-progress | head -2"
    )
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], capture_output=True,
                          text=True)  # fmt: skip
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert len(done.stdout.splitlines()) == 2
