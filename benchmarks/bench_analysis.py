"""Benchmarks for hookscope.analysis: CKA matrix, dimensionality metrics, jump detection.

Run from the repository root:

    .venv/bin/python benchmarks/bench_analysis.py            # full run (5-8 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_analysis.py --quick    # smaller sizes, fewer repeats
    .venv/bin/python benchmarks/bench_analysis.py --jumps-only

1. Linear CKA matrix of 6 layers (n = 10,000 samples, d = 512): hookscope's feature-space
   form against the n x n Gram-matrix form (Kornblith et al.'s reference: Gram, O(n^2)
   centring, Frobenius inner products), both float64; ratio of medians.
2. Dimensionality metrics of a 256 x 512 activation matrix (hidden ReLU layer of a
   784-512-256-10 MLP on inputs with a 1/i covariance spectrum) against one training step
   of that MLP (batch 256, Adam, float32): full SVD, the five metrics from one Gram
   eigendecomposition, the participation ratio from traces, the top singular value by a
   warm-started power iteration, and a trace-only tracker update.
3. Jump detection validity: recall and false positives on planted-jump, noise and drift
   fixtures, for the default detector, first differences only, and the original detector.

Timings are interleaved (each repeat runs every variant once) and the median of the repeats
is reported. torch's thread count is left at its default. Not run by the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from hookscope import analysis as an


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each function, the repeats interleaved."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def gram_form_cka_matrix(layers: list[torch.Tensor]) -> torch.Tensor:
    """The n x n Gram-matrix form: K_c = H X X' H (by means, O(n^2)), CKA from <K_c, L_c>."""
    grams = []
    for x in layers:
        k = x @ x.T
        grams.append(k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean())
    norms = [g.norm() for g in grams]
    out = torch.eye(len(layers), dtype=torch.float64)
    for i in range(len(layers)):
        for j in range(i + 1, len(layers)):
            out[i, j] = out[j, i] = (grams[i] * grams[j]).sum() / (norms[i] * norms[j])
    return out


def bench_cka(n: int, d: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    layers = []
    for _ in range(6):  # a chain of random layers: related but not identical representations
        h = torch.tanh(h @ torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5)
        layers.append(h)
    ours = an.cka_matrix(layers, progress=False)
    ref = gram_form_cka_matrix(layers)
    t = timed(
        {
            "feature-space (hookscope)": lambda: an.cka_matrix(layers, progress=False),
            "n x n Gram form": lambda: gram_form_cka_matrix(layers),
        },
        repeats,
    )
    base = t["n x n Gram form"][0]
    print(f"\n## Linear CKA matrix, 6 layers, n={n}, d={d}, float64, median of {repeats}")
    print(f"max |difference| between the two forms: {float((ours - ref).abs().max()):.2e}")
    print(f"{'method':<28}{'median s':>10}{'min s':>10}{'speed-up':>10}")
    for name, (med, low) in t.items():
        print(f"{name:<28}{med:>10.3f}{low:>10.3f}{base / med:>9.1f}x")


def mlp_and_activations(batch: int) -> tuple[Callable[[], object], torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    spectrum = torch.arange(1, 785, dtype=torch.float32) ** -0.5  # a 1/i covariance spectrum
    basis, _ = torch.linalg.qr(torch.randn(784, 784))
    x = (torch.randn(batch, 784) * spectrum) @ basis.T * 5
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    with torch.no_grad():
        acts = model[1](model[0](x)).double()  # [batch, 512] hidden ReLU activations
    return step, acts


def bench_dimensionality(repeats: int) -> None:
    step, a = mlp_and_activations(256)
    nxt = a + 0.01 * a.std() * torch.randn_like(a)  # the same layer one training step later
    _, v_prev = an.top_singular_value(a)
    tracker = an.DimensionalityTracker(metrics=("participation_ratio", "stable_rank"))
    tracker.update(0, a)
    counter = iter(range(1, 10**9))

    def full_svd() -> object:
        s = torch.linalg.svdvals(a - a.mean(0))
        lam = s**2
        p = s / s.sum()
        return (
            lam.sum() / lam[0],
            lam.sum() ** 2 / lam.square().sum(),
            torch.exp(-(p * p.log()).sum()),
            int((lam.cumsum(0) / lam.sum() < 0.9).sum()) + 1,
            s.sum() / s[0],
        )

    fns = {
        "MLP training step (b=256)": step,
        "full SVD + five metrics": full_svd,
        "five metrics (Gram eig)": lambda: an.dimensionality_report(a),
        "participation ratio (traces)": lambda: an.participation_ratio(a),
        "top sv, warm power iteration": lambda: an.top_singular_value(nxt, v0=v_prev),
        "tracker update (PR + stable)": lambda: tracker.update(next(counter), nxt),
    }
    t = timed(fns, repeats)
    base = t["MLP training step (b=256)"][0]
    print(f"\n## Dimensionality metrics of a 256 x 512 activation matrix, median of {repeats}")
    print(f"{'method':<32}{'median ms':>10}{'min ms':>8}{'% of step':>11}")
    for name, (med, low) in t.items():
        print(f"{name:<32}{1e3 * med:>10.2f}{1e3 * low:>8.2f}{100 * med / base:>10.0f}%")
    print("target: all five metrics <= 25 % of a training step")


def bench_jumps(n_trials: int) -> None:
    print(f"\n## Jump detection validity ({n_trials} series of 400 points per fixture, seed 0)")
    runs = {
        "default (scales 1, 4)": {},
        "first differences only": {"scales": (1,)},
        "original rolling z-score": {"method": "rolling_zscore"},
    }
    for label, opts in runs.items():
        trials = n_trials if "method" not in opts else max(10, n_trials // 5)
        for size in (12.0, 8.0):
            rep = an.jump_validity(n_trials=trials, jump_size=size, **opts)
            print(f"\n{label}, jump size {size:g} noise sd, {trials} series per fixture")
            print(rep.to_pandas().to_string(index=False, float_format=lambda x: f"{x:.4g}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 7 repeats")
    parser.add_argument("--jumps-only", action="store_true", help="only the jump validity part")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}")
    if not args.jumps_only:
        if args.quick:
            bench_cka(n=2000, d=256, repeats=7)
        else:
            bench_cka(n=10_000, d=512, repeats=7)
        bench_dimensionality(repeats=15 if args.quick else 51)
    bench_jumps(n_trials=50 if args.quick else 500)


if __name__ == "__main__":
    main()
