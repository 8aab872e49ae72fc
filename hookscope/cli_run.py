"""``hookscope run / report / actions``: experiments from YAML (:mod:`hookscope.experiments`).

    hookscope run configs/feature_detection_digits.yaml --set seed=1 --out runs/x [--force]
    hookscope report runs/x           # rebuild report.md / report.html from the artifacts
    hookscope actions                 # the registered actions and their parameters

A rerun of a complete run whose files are unchanged prints where it is and returns at once
(no model or torch import); a missing or edited report is rebuilt.

Mistakes (malformed YAML, a missing file, an unknown action, dataset or key, sites the model
lacks, a missing label column, a seed out of 0..2**32-1, an output folder holding another run
or a damaged run.json, an --out that is a file or cannot be written) print one line and exit
with status 2, and write nothing: the folder is claimed (and, with --force, the previous run's
outputs removed) only once every check has passed. Ctrl-C exits with 130 and leaves the run
resumable.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["add_run_parsers"]


def add_run_parsers(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run an experiment config (YAML): extraction, action, artifacts, report",
        description="Run CONFIG: load the data and model, extract through the activation store, "
        "run the action, write the artifacts and report.html into the output folder. A rerun "
        "of the same config reuses the store and finished stages; a rerun of a complete, "
        "unchanged run does nothing.",
    )
    run.add_argument("config", metavar="CONFIG", help="a YAML run config (see configs/)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted path, e.g. --set seed=1 "
        "--set action.params.metric=auroc (repeatable)",
    )
    run.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: the config's output_dir, else runs/RUN_NAME)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="start over: replace the folder's run (a different one, or a finished one of "
        "this config), keeping its activation store",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    run.set_defaults(run=_run)
    rep = sub.add_parser(
        "report",
        help="rebuild report.md and report.html of a run folder",
        description="Rebuild report.md and report.html from a run folder's artifacts.",
    )
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.set_defaults(run=_report)
    act = sub.add_parser(
        "actions",
        help="list the registered actions and their parameters",
        description="The registered actions (built-in and plug-ins from the "
        "'hookscope.actions' entry-point group) with their parameters.",
    )
    act.set_defaults(run=_actions)


def _run(args: argparse.Namespace) -> int:
    from hookscope.experiments import run

    outcome = run(
        args.config, args.overrides, out=args.out, force=args.force, progress=not args.no_progress
    )
    summary = outcome.summary
    print(f"{outcome.run_dir}/report.html")
    for key in ("best_site", "best_score"):
        if key in summary.get("metrics", {}):
            print(f"{key}: {summary['metrics'][key]}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from hookscope.errors import ExperimentError
    from hookscope.experiments.report import write_report

    folder = Path(args.run_dir)
    if not (folder / "metrics.json").is_file():
        raise ExperimentError(f"{folder}: not a finished run folder (no metrics.json)")
    md, html = write_report(folder)
    print(html)
    return 0


def _actions(args: argparse.Namespace) -> int:
    from hookscope import actions

    for name, cls in actions.available().items():
        # the docstring's first paragraph, re-wrapped (its first line alone may stop mid-sentence)
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        origin = "" if cls.__module__.startswith("hookscope.") else f"  [plug-in: {cls.__module__}]"
        print(f"{name}{origin}")
        if summary:
            print(textwrap.fill(summary, 92, initial_indent="    ", subsequent_indent="    "))
        for p in actions.describe(name):
            default = "required" if p["required"] else f"default {p['default']!r}"
            print(f"    {p['name']}: {p['type']} ({default}) {p['description']}".rstrip())
    return 0
