"""The ``hookscope`` command line.

    hookscope localize --model tiny-induction --task induction --out results/localize
    python -m hookscope localize --model smollm2-135m --task ioi --method exact
    hookscope localize --help          # every option, the tasks and the zoo models
    hookscope --version

``localize`` loads a zoo model, builds a task's clean/corrupted prompts and metric, runs
:func:`hookscope.interventions.localize_circuit` (a tqdm progress bar on stderr unless
``--no-progress``), prints the ranked components and the minimal circuit to stdout, and
writes ``DIR/result.json`` and ``DIR/heatmap.png``.

``store`` works an activation store (:mod:`hookscope.store`)::

    hookscope store extract --model smollm2-135m --data agreement:2000 --sites 'resid_post.*' \
        --positions last --dtype float16 --out acts/
    torchrun --nproc_per_node 4 -m hookscope store extract ...    # data-parallel, same result
    hookscope store ls acts/           # the entries (exit 0)
    hookscope store verify acts/       # every shard's size and sha256 (exit 1 on a problem)
    hookscope store merge acts/ node0/acts node1/acts     # per-node folders into one store

Under ``torchrun`` (its ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` variables set) ``store
extract`` joins the process group (nccl where CUDA is available, each rank on GPU
``LOCAL_RANK``; gloo otherwise) and leaves it at the end; rank 0 prints the result.

Every mistake (an unknown model, task or method, a threshold outside (0, 1], an output
folder that cannot be written, any :class:`~hookscope.errors.HookscopeError`) prints one
line ``hookscope: error: <message>`` to stderr and exits with status 2; Ctrl-C exits with
status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hookscope._choices import CRITERIA, DIRECTIONS, LOCALIZE_METHODS
from hookscope.errors import HookscopeError, format_choices, suggestion

__all__ = ["main", "build_parser"]

PROG = "hookscope"
METHODS = LOCALIZE_METHODS
DEFAULT_OUT = "results/localize"


class CLIError(Exception):
    """A usage mistake: printed as one ``hookscope: error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, not printed) and an epilog built only for --help."""

    def __init__(self, *args: Any, epilog_factory: Callable[[], str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.epilog_factory = epilog_factory

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(message)

    def format_help(self) -> str:
        if self.epilog_factory is not None and self.epilog is None:
            self.epilog = self.epilog_factory()  # imports the task registry: only when asked
        return super().format_help()


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must lie in (0, 1] (a fraction of the effect); got {text}"
        )
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse type naming the valid choices and the closest one in its error."""

    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r}; valid: {', '.join(choices)}.{suggestion(text, choices)}"
            )
        return text

    return check


def _tasks_text() -> str:
    from hookscope.interventions.tasks import TASKS

    width = max(len(n) for n in TASKS)
    return "\n".join(f"  {name:<{width}}  {desc}" for name, desc in TASKS.items())


def _models_text() -> str:
    from hookscope import zoo
    from hookscope.zoo import hub

    lines = []
    for c in zoo.available():
        if c.kind == "hub":
            continue
        state = "ready" if c.ready else "not installed: make models"
        lines.append(f"  {c.name:<15} {c.kind:<8} [{state}] {c.architecture.split(' ')[0]}")
    sizes = hub.PYTHIA_SIZES
    lines.append(
        f"  pythia-{sizes[0]} ... pythia-{sizes[-1]} (and -deduped)  hub  "
        "[needs the Hugging Face hub or its local cache]"
    )
    return "\n".join(lines)


def _localize_epilog() -> str:
    return (
        f"tasks:\n{_tasks_text()}\n\n"
        f"zoo models (language models fit the tasks):\n{_models_text()}\n\n"
        "example:\n  hookscope localize --model tiny-induction --task induction --out results/localize"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``hookscope`` argument parser (subcommands ``localize`` and ``store``)."""
    from hookscope import __version__

    parser = _Parser(
        prog=PROG,
        description="hookscope: mechanistic interpretability for any PyTorch model.",
        epilog="Run 'hookscope localize --help' for the circuit-localization job and "
        "'hookscope store --help' for activation stores.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    loc = sub.add_parser(
        "localize",
        help="find the minimal circuit of attention heads (or other sites) behind a task",
        description=textwrap.fill(
            "Localize the circuit behind a task: screen every site with attribution (or exact) "
            "patching, confirm the best candidates exactly, then keep the smallest set of "
            "components that reaches --threshold of the clean-vs-corrupted effect. Prints the "
            "ranked components and the circuit, and writes DIR/result.json and DIR/heatmap.png.",
            width=78,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog_factory=_localize_epilog,
    )
    loc.add_argument("--model", required=True, metavar="NAME", help="zoo model name (see below)")
    loc.add_argument("--task", required=True, metavar="TASK", help="task name (see below)")
    loc.add_argument(
        "--n", type=_positive_int, default=32, metavar="N", help="prompt pairs (default 32)"
    )
    loc.add_argument("--seed", type=int, default=0, metavar="S", help="data seed (default 0)")
    loc.add_argument(
        "--sites",
        metavar="SEL",
        default=None,
        help="address selection to screen, e.g. 'head.*.*' or 'head.1.*' (default: the task's)",
    )
    loc.add_argument(
        "--method",
        type=_choice(METHODS),
        default="attribution",
        metavar="{attribution,exact}",
        help="screening: attribution patching (one forward and backward) or exact "
        "activation patching (one forward per site); default attribution",
    )
    loc.add_argument(
        "--direction",
        type=_choice(DIRECTIONS),
        default=None,
        metavar="{denoise,noise}",
        help="denoise: patch clean into the corrupted run; noise: corrupted into clean "
        "(default: the task's)",
    )
    loc.add_argument(
        "--criterion",
        type=_choice(CRITERIA),
        default=None,
        metavar="{patch,faithfulness}",
        help="what a set of components must reach: patch (the set patched alone) or "
        "faithfulness (the set kept, every other site corrupted); default: the task's",
    )
    loc.add_argument(
        "--threshold",
        type=_threshold,
        default=0.8,
        metavar="F",
        help="fraction of the effect the circuit must restore, in (0, 1] (default 0.8)",
    )
    loc.add_argument(
        "--candidates",
        type=_positive_int,
        default=None,
        metavar="K",
        help="how many top-ranked components to verify exactly (default: localize_circuit's)",
    )
    loc.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})"
    )
    loc.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    loc.set_defaults(run=_localize)
    from hookscope.cli_store import add_store_parser

    add_store_parser(sub)
    from hookscope.cli_run import add_run_parsers

    add_run_parsers(sub)
    return parser


def _output_folder(text: str) -> Path:
    """Create DIR and prove it writable before the (possibly long) run."""
    out = Path(text)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".hookscope-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise CLIError(
            f"--out {text}: cannot create or write the output folder ({reason})"
        ) from None
    return out


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / torch arrays and scalars
        return obj.tolist()
    return str(obj)  # addresses, selections, paths


def _localize(args: argparse.Namespace) -> int:
    from hookscope import __version__, zoo
    from hookscope.interventions.tasks import TASKS, build_task

    zoo.card(args.model)  # an unknown name fails here, naming the zoo
    if args.task not in TASKS:
        raise CLIError(
            f"unknown task {args.task!r}; available: {format_choices(TASKS)}."
            + suggestion(args.task, TASKS)
        )
    out = _output_folder(args.out)
    progress = not args.no_progress

    import matplotlib

    matplotlib.use("Agg")
    from hookscope.interventions import localize_circuit

    start = time.perf_counter()
    from hookscope.hf_compat import progress_bars

    with progress_bars(progress):
        model = zoo.load(args.model)
    loaded = time.perf_counter()
    task = build_task(args.task, model, n=args.n, seed=args.seed)
    built = time.perf_counter()
    options: dict[str, Any] = {
        "sites": args.sites if args.sites is not None else task.sites,
        "method": args.method,
        "direction": args.direction if args.direction is not None else task.direction,
        "criterion": args.criterion if args.criterion is not None else task.criterion,
        "positions": task.positions,
        "threshold": args.threshold,
        "progress": progress,
    }
    if args.candidates is not None:
        options["candidates"] = args.candidates
    result = localize_circuit(model, task.clean, task.corrupted, task.metric, **options)
    done = time.perf_counter()

    print(f"{args.model} / {task.name}: {task.description}")
    print(repr(result))

    record = {
        "hookscope_version": __version__,
        "model": args.model,
        "task": {
            "name": task.name,
            "description": task.description,
            "n": args.n,
            "seed": args.seed,
        },
        "arguments": {k: v for k, v in vars(args).items() if k not in ("run", "command")},
        "options": {k: v for k, v in options.items() if k != "progress"},
        "timing": {
            "load_s": round(loaded - start, 3),
            "task_s": round(built - loaded, 3),
            "localize_s": round(done - built, 3),
        },
    }
    record["result"] = result.to_dict()
    json_path = out / "result.json"
    png_path = out / "heatmap.png"
    fig = result.plot()
    try:
        fig.savefig(png_path, dpi=120, bbox_inches="tight")
        record["timing"]["total_s"] = round(time.perf_counter() - start, 3)
        json_path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    except OSError as err:
        raise CLIError(f"--out {args.out}: cannot write results ({err.strerror or err})") from None
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    print(f"wrote {json_path}")
    print(f"wrote {png_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 2 for a mistake, 130 for Ctrl-C)."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # --help / --version
            return stop.code if isinstance(stop.code, int) else 0
        return args.run(args)
    except (CLIError, HookscopeError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (e.g. `| head`) stopped early: not an error of ours
        with contextlib.suppress(OSError):  # keep Python from failing again at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
