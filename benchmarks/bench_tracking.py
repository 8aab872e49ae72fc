"""Cost of ``hs.Tracker`` on the digits trainers, against untracked training and the original project's approach.

Run from the repository root:

    .venv/bin/python benchmarks/bench_tracking.py                  # MLP + CNN, 300 steps, 5 repeats
    .venv/bin/python benchmarks/bench_tracking.py --steps 1000     # the recipes' full length (~3x longer)
    .venv/bin/python benchmarks/bench_tracking.py --quick          # 60 steps, 1 repeat (smoke run)

Training (both models): ``hookscope.zoo.train_digits.RECIPES[model]`` built by
``build_module``, seed 0, the digits "train" split, batch 64, AdamW (the recipe's lr and weight
decay), cosine schedule over ``--steps``, the recipe's seeded shuffle; ``torch.set_num_threads(1)``
(the tracker's worker thread shares that one intra-op pool). Every run of one model does
exactly the same arithmetic on the same batches. The recipes train 1000 steps; the default here
is 300 per run so that the whole bench (2 models x 10 variants x 5 repeats) stays under ~8
minutes on 2 shared cores: the per-step overhead ratios do not depend on the length.

Rows (one per model and variant; each the median wall time of ``--repeats`` runs):

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

Variants run interleaved: each repeat runs every variant once, in an order rotated by one
per repeat, so that machine load drifts hit all variants alike. ``ratio`` = median variant
time / median untracked time of the same model.

Memory (measured in extra, untimed runs): ``tracemalloc peak`` = the peak of Python-heap
allocations traced by ``tracemalloc`` during a whole tracked run (numpy arrays included:
the results lists, the detector's arrays), minus the same for an untracked run. tracemalloc
does not see torch's CPU tensor allocator, so the tensors the tracker holds are counted
instead: ``activations held`` = bytes of one logged step's activations of all sites x
(``queue_size`` + 2) (the bounded queue, the step being measured, the step being recorded),
the bound on what waits for the worker; ``ring buffer`` = ``tracker.buffer_bytes`` of a
tracker built with ``checkpoints=`` (a temporary folder; default window (10, 10)), the CPU
copies of model states it preallocates.

Output: a table, and ``results/bench_tracking.json`` (command, versions, machine, load,
every run's seconds, medians, ratios, memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
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


def train(model: str, steps: int, variant: dict, probe: Tensor) -> tuple[float, object]:
    """One seeded run; returns (seconds of the loop incl. the tracker's close, the tracker)."""
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
    try:
        for step, loss in updates:
            if tracker is not None:
                tracker.log(step, loss=loss)
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
    return time.perf_counter() - start, tracker


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
        train(model, steps, variant, probe)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[f"tracemalloc_peak_{name}"] = peak
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
    out["activations_held_bound"] = step_bytes * (out["queue_size"] + 2)
    return out


# ---------------------------------------------------------------------- main


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "vit"]
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per run (default 300)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (default 5)")
    parser.add_argument("--quick", action="store_true", help="60 steps, 1 repeat")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_tracking.json"))
    args = parser.parse_args()
    steps = args.steps or (60 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 5)
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
        "repeats": repeats,
        "metrics": list(METRICS),
        "probe_images": PROBE_N,
        "targets": TARGETS,
        "models": {},
    }
    for model in args.models:
        train(model, 20, {"kind": "tracker", "every": 1}, probe)  # warm-up (imports, allocator)
        times: dict[str, list[float]] = {n: [] for n in names}
        jumps: dict[str, int] = {}
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                seconds, tracker = train(model, steps, variants()[name], probe)
                times[name].append(seconds)
                if isinstance(tracker, hs.Tracker):
                    jumps[name] = len(tracker.jump_table())
            print(
                f"{model} repeat {r + 1}/{repeats} done ({time.perf_counter() - wall0:.0f} s)",
                flush=True,
            )
        medians = {n: statistics.median(t) for n, t in times.items()}
        base = medians["untracked"]
        results["models"][model] = {
            "seconds": times,
            "median_s": medians,
            "ratio": {n: medians[n] / base for n in names},
            "ms_per_step": {n: 1000 * medians[n] / steps for n in names},
            "jumps_found": jumps,
        }
        results["models"][model]["memory"] = memory(model, steps, probe)
    results["machine"]["load_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - wall0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")


def report(results: dict) -> None:
    print(f"\n{results['command']}")
    print(
        f"{results['steps']} steps per run, median of {results['repeats']} interleaved runs, 1 torch thread"
    )
    head = (
        f"{'variant':<20}"
        + "".join(f"{m + ' s':>10}{m + ' x':>9}{'ms/step':>9}" for m in results["models"])
        + f"{'target':>8}"
    )
    print(head)
    for name in variants():
        row = f"{name:<20}"
        for m in results["models"].values():
            row += f"{m['median_s'][name]:>10.2f}{m['ratio'][name]:>8.2f}x{m['ms_per_step'][name]:>9.2f}"
        target = TARGETS.get(name)
        print(row + (f"{'<=' + format(target, '.2f'):>8}" if target else ""))
    print("\nmemory (extra, per model):")
    for model, m in results["models"].items():
        mem = m["memory"]
        print(
            f"  {model}: tracemalloc peak extra (every=1) {mem['tracemalloc_extra_every=1'] / 2**10:.0f} KiB "
            f"(untracked {mem['tracemalloc_peak_untracked'] / 2**10:.0f} KiB, every=1 "
            f"{mem['tracemalloc_peak_every=1'] / 2**10:.0f}, bg=False "
            f"{mem['tracemalloc_peak_every=1 bg=False'] / 2**10:.0f}, original "
            f"{mem['tracemalloc_peak_original every=1'] / 2**10:.0f}); activations "
            f"{mem['activation_bytes_per_step'] / 2**10:.0f} KiB/step {mem['activation_shapes']}, held <= "
            f"{mem['activations_held_bound'] / 2**10:.0f} KiB (queue {mem['queue_size']} + 2); ring buffer "
            f"{mem['ring_buffer_states']} states x {mem['state_bytes'] / 2**10:.0f} KiB = "
            f"{mem['ring_buffer_bytes'] / 2**10:.0f} KiB"
        )


if __name__ == "__main__":
    main()
