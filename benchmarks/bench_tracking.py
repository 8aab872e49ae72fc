"""Cost of ``hs.Tracker`` on the digits trainers, against untracked training and the original project's approach.

Run from the repository root:

    .venv/bin/python benchmarks/bench_tracking.py                  # MLP + CNN, the recipes' 1000 steps
    .venv/bin/python benchmarks/bench_tracking.py --steps 300      # shorter runs (start and close weigh more)
    .venv/bin/python benchmarks/bench_tracking.py --quick          # 60 steps, 2 rounds (smoke run)

Training (both models): ``hookscope.zoo.train_digits.RECIPES[model]`` built by
``build_module``, seed 0, the digits "train" split, batch 64, AdamW (the recipe's lr and weight
decay), cosine schedule over ``--steps``, the recipe's seeded shuffle; ``torch.set_num_threads(1)``
(the tracker's worker thread shares that one intra-op pool). Every run of one model does
exactly the same arithmetic on the same batches.

Two measurements, because this 2-core virtual machine's speed drifts by +-30 % between
identical runs seconds apart, more than the effects measured:

* ``paired`` (the headline, compared with the targets): two copies of the same seeded run
  train step by step in one loop, one tracked and one not, in alternating order (A B, B A,
  ...), each step timed; a round's ratio = (the tracked copy's step times, its ``log``
  calls, its tracker's start and close) / (the untracked copy's step times), and the three
  parts of the extra are reported apart. The drift hits both copies alike. The ratio is the median over ``--rounds`` rounds, with a bootstrap 95 %
  interval over rounds (seeded). It cannot see a slowdown of the whole machine (the worker
  process runs beside both copies), which the second measurement includes.
* ``whole runs``: each round runs every variant once as a whole run, in a seeded random
  order; a variant's ratio is the median over rounds of (its time / the untracked run's time
  in the same round), with the same interval. Noisier, and everything included.

The first tracker of the process forks the worker process that later trackers reuse
(:mod:`hookscope.tracking.worker`); a warm-up run before the rounds pays that, and its start
time is reported (``first start``) beside the later ones'.

Rows (one per model and variant):

* ``untracked``: the plain loop, no hooks;
* ``every=K``: ``hs.Tracker(model, sites="auto", every=K, inputs=None, metrics=(stable_rank,
  participation_ratio, energy_rank, nuclear_norm_ratio), jumps=True)`` (background worker,
  the default), ``tracker.log(step, loss=loss)`` after every step; the clock covers the
  with-block, including ``close()`` (which waits until every queued step is measured);
* ``every=1 bg=False``: the same with ``background=False`` (measured in the training thread);
* ``every=K thread``: the same with ``background="thread"`` (a worker thread instead of the
  default forked worker process: it shares the interpreter lock with the training loop);
* ``probe every=K``: ``inputs=`` the test split's first 256 images (an extra eval forward at
  each logged step);
* ``original every=K``: a re-implementation of the dimensionality-tracking project's tracker:
  a plain forward hook on every hidden layer's activation module (the ReLUs, the same tensors
  as the tracker's ``neuron.L`` sites) that keeps the detached output on every forward, and at
  every logged step, synchronously, a full ``torch.linalg.svd`` of each layer's centred
  ``[batch, features]`` matrix and the four metrics from its singular values (no jump
  detection: the original detected jumps after training).

Memory (measured in extra, untimed runs): ``tracemalloc peak`` = the peak of Python-heap
allocations traced by ``tracemalloc`` during a whole tracked run (numpy arrays included:
the results lists, the detector's arrays), minus the same for an untracked run. tracemalloc
does not see torch's CPU tensor allocator, so the tensors the tracker holds are counted
instead: ``shared ring`` = the shared memory the activations travel through (``queue_size``
slots of one logged step's activations of all sites, each rounded up to 64 bytes), read from the
worker after a run, plus the one step the hooks hold until ``log``; ``ring buffer`` = ``tracker.buffer_bytes`` of a
tracker built with ``checkpoints=`` (a temporary folder; default window (10, 10)), the CPU
copies of model states it preallocates.

Output: a table, and ``results/bench_tracking.json`` (command, versions, machine, load,
every run's seconds, the per-round ratios, medians, intervals, memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import hookscope as hs
from hookscope.data.digits import digits_tensors
from hookscope.zoo.shipped import build_module
from hookscope.zoo.train_digits import RECIPES, training_steps

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")
SEED = 0
PROBE_N = 256
TARGETS = {"every=1": 1.15, "every=5": 1.05, "every=10": 1.03}


# ---------------------------------------------------------------------- the original approach


def svd_metrics(a: Tensor, energy: float = 0.9) -> dict[str, float]:
    """The four metrics from a full SVD of the centred ``[rows, features]`` matrix."""
    m = a.flatten(1).double()
    m = m - m.mean(0)
    s = torch.linalg.svd(m, full_matrices=False).S
    ev = s.square()
    total = ev.sum()
    frac = ev.cumsum(0) / total
    return {
        "stable_rank": float(total / ev[0]),
        "participation_ratio": float(total**2 / ev.square().sum()),
        "energy_rank": int((frac < energy - 1e-12).sum()) + 1,
        "nuclear_norm_ratio": float(s.sum() / s[0]),
    }


class OriginalTracker:
    """Forward hooks that keep each hidden layer's output; SVD metrics at logged steps."""

    def __init__(self, module: nn.Module, every: int) -> None:
        self.every = every
        self.layers = [m for m in module.modules() if isinstance(m, nn.ReLU)]
        self.acts: dict[int, Tensor] = {}
        self.rows: list[dict] = []
        self.handles: list = []
        self.module = module

    def __enter__(self) -> OriginalTracker:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._keep(i)))
        return self

    def _keep(self, i: int):
        def hook(_module, _inputs, output):
            self.acts[i] = output.detach()

        return hook

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def log(self, step: int, loss: Tensor) -> None:
        if step % self.every:
            return
        for i, a in self.acts.items():
            self.rows.append(
                {"step": step, "layer": i, "loss": float(loss.detach()), **svd_metrics(a)}
            )


# ---------------------------------------------------------------------- one training run


def train(model: str, steps: int, variant: dict, probe: Tensor) -> tuple[float, object, dict]:
    """One seeded run; returns (seconds of the loop incl. the tracker's start and close, the
    tracker, {"start": s, "close": s})."""
    module, steps, updates = training_steps(model, seed=SEED, steps=steps)
    kind = variant["kind"]
    if kind == "tracker":
        tracker = hs.Tracker(
            module,
            sites="auto",
            every=variant["every"],
            inputs=probe if variant.get("probe") else None,
            metrics=METRICS,
            jumps=True,
            background=variant.get("background", True),
            checkpoints=variant.get("checkpoints"),
        )
    elif kind == "original":
        tracker = OriginalTracker(module, variant["every"])
    else:
        tracker = None
    start = time.perf_counter()
    if tracker is not None:
        tracker.__enter__()
    started = time.perf_counter()
    try:
        for step, loss in updates:
            if tracker is not None:
                tracker.log(step, loss=loss)
    finally:
        closing = time.perf_counter()
        if tracker is not None:
            tracker.__exit__(None, None, None)
    end = time.perf_counter()
    return end - start, tracker, {"start": started - start, "close": end - closing}


HEADLINE = ("untracked", "every=1", "every=5", "every=10")
PAIRED = (
    "every=1",
    "every=5",
    "every=10",
    "original every=1",
    "original every=5",
    "original every=10",
)


def paired(model: str, steps: int, variant: dict) -> tuple[float, float, dict]:
    """One round of the step-interleaved measurement: (tracked copy's seconds incl. its
    tracker's start, logs and close, untracked copy's seconds, {"log": s, "fixed": s} the
    part of the first in log() calls and in start + close)."""
    tracked_module, _, tracked = training_steps(model, seed=SEED, steps=steps)
    _, _, plain = training_steps(model, seed=SEED, steps=steps)
    if variant["kind"] == "tracker":
        tracker = hs.Tracker(
            tracked_module, sites="auto", every=variant["every"], metrics=METRICS, jumps=True
        )
    else:
        tracker = OriginalTracker(tracked_module, variant["every"])
    clock = time.perf_counter
    t0 = clock()
    tracker.__enter__()
    a = fixed = clock() - t0
    b = logs = 0.0
    try:
        for i in range(steps):
            if i % 2 == 0:
                t0 = clock()
                step, loss = next(tracked)
                tl = clock()
                tracker.log(step, loss=loss)
                t1 = clock()
                next(plain)
                t2 = clock()
                a, b, logs = a + (t1 - t0), b + (t2 - t1), logs + (t1 - tl)
            else:
                t0 = clock()
                next(plain)
                t1 = clock()
                step, loss = next(tracked)
                tl = clock()
                tracker.log(step, loss=loss)
                t2 = clock()
                a, b, logs = a + (t2 - t1), b + (t1 - t0), logs + (t2 - tl)
    finally:
        t0 = clock()
        tracker.__exit__(None, None, None)
        a += clock() - t0
        fixed += clock() - t0
    return a, b, {"log": logs, "fixed": fixed}


def variants() -> dict[str, dict]:
    out: dict[str, dict] = {"untracked": {"kind": "none"}}
    for k in (1, 5, 10):
        out[f"every={k}"] = {"kind": "tracker", "every": k}
    out["every=1 bg=False"] = {"kind": "tracker", "every": 1, "background": False}
    for k in (1, 10):
        out[f"every={k} thread"] = {"kind": "tracker", "every": k, "background": "thread"}
    for k in (5, 10):
        out[f"probe every={k}"] = {"kind": "tracker", "every": k, "probe": True}
    for k in (1, 5, 10):
        out[f"original every={k}"] = {"kind": "original", "every": k}
    return out


# ---------------------------------------------------------------------- memory


def activation_bytes(model: str) -> tuple[int, dict[str, list[int]]]:
    """Bytes of one training forward's activations at the tracker's sites, and their shapes."""
    torch.manual_seed(SEED)
    module = build_module(RECIPES[model].build)
    X, _ = digits_tensors("train")
    hm = hs.HookedModel.wrap(module)
    tracker = hs.Tracker(hm, sites="auto", metrics=METRICS)
    _, cache = hm.run_with_cache(X[: RECIPES[model].batch_size], names=tracker.sites)
    shapes = {str(a): list(cache[a].shape) for a in tracker.sites}
    total = sum(cache[a].numel() * cache[a].element_size() for a in tracker.sites)
    return total, shapes


def memory(model: str, steps: int, probe: Tensor) -> dict:
    """tracemalloc peaks (untracked, every=1, original every=1) and the tracker's held tensors."""
    out: dict = {}
    for name, variant in (
        ("untracked", {"kind": "none"}),
        ("every=1", {"kind": "tracker", "every": 1}),
        ("every=1 bg=False", {"kind": "tracker", "every": 1, "background": False}),
        ("original every=1", {"kind": "original", "every": 1}),
    ):
        tracemalloc.start()
        _, tracker, _ = train(model, steps, variant, probe)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[f"tracemalloc_peak_{name}"] = peak
        if name == "every=1":
            out["shared_ring_bytes"] = tracker._worker.slot_bytes * tracker._worker.queue_size
    out["tracemalloc_extra_every=1"] = (
        out["tracemalloc_peak_every=1"] - out["tracemalloc_peak_untracked"]
    )
    step_bytes, shapes = activation_bytes(model)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(SEED)
        module = build_module(RECIPES[model].build)
        tracker = hs.Tracker(module, every=1, metrics=METRICS, checkpoints=Path(folder) / "ckpt")
        out["ring_buffer_bytes"] = tracker.buffer_bytes
        out["ring_buffer_states"] = tracker.ring.size
        out["queue_size"] = tracker.queue_size
        tracker.close()
    out["state_bytes"] = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    out["activation_bytes_per_step"] = step_bytes
    out["activation_shapes"] = shapes
    return out


# ---------------------------------------------------------------------- main


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def interval(ratios: list[float], seed: int = 0, n: int = 2000) -> list[float]:
    """Bootstrap 95 % interval of the median over rounds."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return [medians[int(0.025 * n)], medians[int(0.975 * n) - 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "vit"]
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per run (default: the recipes' 1000)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds (default 10)")
    parser.add_argument(
        "--whole-rounds", type=int, default=None, help="whole-run rounds (default 3)"
    )
    parser.add_argument("--quick", action="store_true", help="60 steps, 2 rounds of each")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_tracking.json"))
    args = parser.parse_args()
    steps = args.steps or (60 if args.quick else min(RECIPES[m].steps for m in args.models))
    rounds = args.rounds or (2 if args.quick else 10)
    whole_rounds = args.whole_rounds or (2 if args.quick else 3)
    torch.set_num_threads(1)
    from importlib.metadata import version

    versions = {p: version(p) for p in ("torch", "numpy")}
    versions["python"] = platform.python_version()
    versions["hookscope"] = hs.__version__
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{os.cpu_count()} cores, torch threads 1, load average {loadavg()}", flush=True)
    X_test, _ = digits_tensors("test")
    probe = X_test[:PROBE_N]
    names = list(variants())
    wall0 = time.perf_counter()
    results: dict = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_tracking.py", *sys.argv[1:]]),
        "versions": versions,
        "machine": {"cores": os.cpu_count(), "torch_threads": 1, "load_before": loadavg()},
        "steps": steps,
        "rounds": rounds,
        "whole_rounds": whole_rounds,
        "order_seed": SEED,
        "metrics": list(METRICS),
        "probe_images": PROBE_N,
        "targets": TARGETS,
        "models": {},
    }
    order_rng = random.Random(SEED)
    first_start = None
    for model in args.models:
        _, _, t = train(model, 20, {"kind": "tracker", "every": 1}, probe)  # warm-up
        if first_start is None:
            first_start = t["start"]  # the process's first tracker: it forks the worker
        pair_ratios: dict[str, list[float]] = {n: [] for n in PAIRED}
        parts: dict[str, list[dict]] = {n: [] for n in PAIRED}
        for r in range(rounds):
            order = list(PAIRED)
            order_rng.shuffle(order)
            for name in order:
                a, b, part = paired(model, steps, variants()[name])
                pair_ratios[name].append(a / b)
                parts[name].append(
                    {
                        "steps": (a - part["log"] - part["fixed"]) / b - 1,
                        "log": part["log"] / b,
                        "fixed": part["fixed"] / b,
                    }
                )
            print(
                f"{model} paired round {r + 1}/{rounds} done ({time.perf_counter() - wall0:.0f} s)",
                flush=True,
            )
        times: dict[str, list[float]] = {n: [] for n in names}
        ratios: dict[str, list[float]] = {n: [] for n in names}
        starts, closes = [], []
        jumps: dict[str, int] = {}
        for r in range(whole_rounds):
            chosen = list(names)
            order_rng.shuffle(chosen)
            this: dict[str, float] = {}
            for name in chosen:
                seconds, tracker, t = train(model, steps, variants()[name], probe)
                this[name] = seconds
                times[name].append(seconds)
                if isinstance(tracker, hs.Tracker):
                    jumps[name] = len(tracker.jump_table())
                    if name in HEADLINE:
                        starts.append(t["start"])
                        closes.append(t["close"])
            for name, seconds in this.items():
                ratios[name].append(seconds / this["untracked"])
            print(
                f"{model} whole-run round {r + 1}/{whole_rounds} done "
                f"({time.perf_counter() - wall0:.0f} s)",
                flush=True,
            )
        base = statistics.median(times["untracked"])
        results["models"][model] = {
            "paired_ratios_per_round": pair_ratios,
            "paired_ratio": {n: statistics.median(v) for n, v in pair_ratios.items()},
            "paired_ratio_95": {n: interval(v) for n, v in pair_ratios.items()},
            # the extra, as fractions of the untracked copy's time: the tracked copy's own
            # steps (hooks), its log() calls, its tracker's start + close (medians)
            "paired_parts": {
                n: {k: statistics.median(p[k] for p in v) for k in ("steps", "log", "fixed")}
                for n, v in parts.items()
            },
            "seconds": times,
            "ratios_per_round": ratios,
            "ratio": {n: statistics.median(ratios[n]) for n in names},
            "ratio_95": {n: interval(ratios[n]) for n in names},
            "ms_per_step_untracked": 1000 * base / steps,
            "start_ms_median": 1000 * statistics.median(starts),
            "close_ms_median": 1000 * statistics.median(closes),
            "jumps_found": jumps,
        }
        results["models"][model]["memory"] = memory(model, steps, probe)
    results["first_start_ms"] = 1000 * first_start
    results["machine"]["load_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - wall0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")


def table(results: dict, names: Sequence[str], key: str, per_round: str) -> None:
    """One row per variant: each model's median ratio [95 % interval] and rounds; the target."""
    head = f"{'variant':<20}" + "".join(f"{m + ' ratio':>24}" for m in results["models"])
    print(head + f"{'target':>9}")
    for name in names:
        row = f"{name:<20}"
        for m in results["models"].values():
            lo, hi = m[key + "_95"][name]
            row += f"{m[key][name]:>9.3f}x [{lo:.3f}, {hi:.3f}]{len(m[per_round][name]):>3}"
        target = TARGETS.get(name)
        print(row + (f"{'<=' + format(target, '.2f'):>9}" if target else ""))


def report(results: dict) -> None:
    print(f"\n{results['command']}")
    print(
        f"{results['steps']} steps per run, 1 torch thread; ratio = median over rounds "
        "[bootstrap 95 %] (rounds)"
    )
    print(f"\npaired (step-interleaved, tracked / untracked copy), {results['rounds']} rounds:")
    table(results, PAIRED, "paired_ratio", "paired_ratios_per_round")
    print(
        "where the extra goes (fraction of the untracked copy's time: steps / log / start+close):"
    )
    for model, m in results["models"].items():
        for name in ("every=1", "every=5", "every=10"):
            p = m["paired_parts"][name]
            print(
                f"  {model} {name:<9} steps {p['steps']:+.3f}  log {p['log']:.3f}  "
                f"start+close {p['fixed']:.3f}"
            )
    print(
        f"\nwhole runs (each / the untracked run of its round), {results['whole_rounds']} rounds:"
    )
    table(results, list(variants()), "ratio", "ratios_per_round")
    for model, m in results["models"].items():
        print(
            f"{model}: untracked {m['ms_per_step_untracked']:.2f} ms/step; tracker start "
            f"{m['start_ms_median']:.1f} ms, close {m['close_ms_median']:.1f} ms (medians)"
        )
    print(
        f"first tracker of the process: start {results['first_start_ms']:.1f} ms (forks the worker)"
    )
    print("\nmemory (extra, per model):")
    for model, m in results["models"].items():
        mem = m["memory"]
        print(
            f"  {model}: tracemalloc peak extra (every=1) {mem['tracemalloc_extra_every=1'] / 2**10:.0f} KiB "
            f"(untracked {mem['tracemalloc_peak_untracked'] / 2**10:.0f} KiB, every=1 "
            f"{mem['tracemalloc_peak_every=1'] / 2**10:.0f}, bg=False "
            f"{mem['tracemalloc_peak_every=1 bg=False'] / 2**10:.0f}, original "
            f"{mem['tracemalloc_peak_original every=1'] / 2**10:.0f}); activations "
            f"{mem['activation_bytes_per_step'] / 2**10:.0f} KiB/step {mem['activation_shapes']}, "
            f"shared ring {mem['queue_size']} slots = {mem['shared_ring_bytes'] / 2**10:.0f} KiB; "
            f"ring buffer {mem['ring_buffer_states']} states x {mem['state_bytes'] / 2**10:.0f} KiB = "
            f"{mem['ring_buffer_bytes'] / 2**10:.0f} KiB"
        )


if __name__ == "__main__":
    main()
