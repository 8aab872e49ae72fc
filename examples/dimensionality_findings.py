"""Re-test the dimensionality-tracking project's headline findings with hookscope's tracker.

    .venv/bin/python examples/dimensionality_findings.py            # 4 models x 3 seeds (~5 min)
    .venv/bin/python examples/dimensionality_findings.py --quick    # MLP, 1 seed, 200 steps -> results/findings_quick/

The original project reported, over 55 experiments and 2,991 detected jumps: 83.3 % of jumps in
the first 10 % of training, 0 % after 50 %, 51 % of CNN jumps in the first layer, and "all
layers converge at step 0". Its detector flagged every point of a level shift (a run of flags,
not one jump) and z-scored values against windows that straddle the change.

Here every model is trained from scratch under several seeds with ``hs.Tracker(model,
sites="auto", every=1, inputs=None, jumps=True)`` (the training forward, every step, the
validated online detector of :mod:`hookscope.tracking.online`, default settings), and the
findings are recomputed from the tracker's jump tables:

* ``early``: share of jumps with ``step < 0.1 * n_steps``; ``late``: ``step >= 0.5 * n_steps``
  (:func:`hookscope.tracking.analysis.phase_distribution`'s phases); ``first layer``: share
  of jumps at the first tracked site (``neuron.0`` for the MLP / CNN, ``resid_post.0`` for
  the transformers). 95 % CIs: percentile bootstrap over seeds (2,000 resamples of the seeds
  with replacement, jumps pooled within a resample; a resample without jumps is skipped).
* convergence: :func:`hookscope.tracking.analysis.convergence` (first step after which the
  series stays within 5 % of its range of its final value) per seed, site and metric.
* per metric; ``energy_rank`` (an integer: a +-1 flicker against a flat stretch is an
  infinite robust z for any z-score detector) separately from the three continuous metrics.

The models: the digits MLP, CNN and ViT (``hookscope.zoo.train_digits.RECIPES``: data,
AdamW, batch 64, cosine schedule, 1,000 steps; the seed sets the initialisation and the
shuffle), and the tiny induction transformer (``hookscope.zoo.train_induction``: data,
AdamW, warmup + cosine, grad clip; the seed sets the initialisation, ``DATA_SEED + seed``
the sequences), shortened to ``--induction-steps`` (default 600 of its 1,500; warmup scaled
to the same fraction) to fit the time budget.

Writes ``examples/dimensionality_findings.md`` and up to three PNGs next to it.
"""

from __future__ import annotations

import argparse
import math
import pickle
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import hookscope as hs

HERE = Path(__file__).resolve().parent
METRICS = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")
CONTINUOUS = ("stable_rank", "participation_ratio", "nuclear_norm_ratio")
MODELS = ("mlp", "cnn", "vit", "induction")
EARLY, LATE = 0.1, 0.5
ORIGINAL = {
    "early": "83.3 %",
    "late": "0 %",
    "first layer": "51 % (CNN)",
    "convergence": "all layers converge at step 0",
    "jumps": "2,991 jumps in 55 experiments (54.4 per experiment)",
}


@dataclass
class Run:
    """One tracked training run: the tracker's frames and what they were measured on."""

    model: str
    seed: int
    n_steps: int
    sites: list[str]
    results: pd.DataFrame  # tracker.results()
    jumps: pd.DataFrame  # tracker.jump_table()
    seconds: float


# ---------------------------------------------------------------------- training


def _digits_loop(model: str, seed: int, steps: int | None):
    """``train_digits``' loop, seeded by ``seed``: (module, steps, a function giving the
    (step, loss) iterator)."""
    from hookscope.zoo.train_digits import training_steps

    module, steps, updates = training_steps(model, seed=seed, steps=steps)
    return module, steps, lambda: updates


def _induction_loop(seed: int, steps: int):
    """``train_induction.train``'s loop over ``steps`` steps (warmup scaled), seeded."""
    from hookscope.data.induction import induction_tensors
    from hookscope.zoo import train_induction as ti
    from hookscope.zoo.shipped import build_module

    torch.manual_seed(seed)
    module = build_module(ti.build())
    data = induction_tensors(
        steps * ti.BATCH, ti.VOCAB_SIZE, ti.PREFIX_LEN, ti.N_REPEATS,
        seed=ti.DATA_SEED + seed, bos=ti.BOS, seq_len=ti.SEQ_LEN,
    ).tokens  # fmt: skip
    warmup = max(1, round(ti.WARMUP * steps / ti.STEPS))
    opt = torch.optim.AdamW(module.parameters(), lr=ti.LR, weight_decay=ti.WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )

    def loop():
        module.train()
        for step in range(steps):
            tokens = data[step * ti.BATCH : (step + 1) * ti.BATCH]
            logits = module(input_ids=tokens, use_cache=False).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, ti.VOCAB_SIZE), tokens[:, 1:].reshape(-1)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            schedule.step()
            yield step, loss.detach()

    return module, steps, loop


def tracked_run(
    model: str, seed: int, steps: int | None = None, jump_options: dict | None = None
) -> Run:
    """Train ``model`` under ``seed`` with the tracker on every step; its frames.

    ``jump_options``: detector settings other than the defaults (the smoke test lowers the
    threshold to get jumps from a short run; the findings use the defaults)."""
    if model == "induction":
        module, n_steps, loop = _induction_loop(seed, steps or 300)
    else:
        module, n_steps, loop = _digits_loop(model, seed, steps)
    tracker = hs.Tracker(module, sites="auto", every=1, inputs=None, metrics=METRICS, jumps=True,
                         jump_options=jump_options)  # fmt: skip
    start = time.perf_counter()
    with tracker:
        for step, loss in loop():
            tracker.log(step, loss=loss)
    seconds = time.perf_counter() - start
    return Run(
        model, seed, n_steps, list(tracker.names), tracker.results(), tracker.jump_table(), seconds
    )


# ---------------------------------------------------------------------- the findings


def _counts(runs: list[Run], metrics: tuple[str, ...]) -> np.ndarray:
    """Per run: [jumps, early, late, first layer] of the jumps of ``metrics``."""
    out = []
    for r in runs:
        j = r.jumps[r.jumps["metric"].isin(metrics)]
        frac = j["step"].to_numpy(dtype=float) / r.n_steps
        out.append(
            [len(j), (frac < EARLY).sum(), (frac >= LATE).sum(), (j["site"] == r.sites[0]).sum()]
        )
    return np.array(out, dtype=float).reshape(len(runs), 4)


def _ci(counts: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """95 % percentile CIs [3, 2] of the pooled early / late / first-layer shares, seeds resampled."""
    if len(counts) < 2:
        return np.full((3, 2), np.nan)
    rng = np.random.default_rng(seed)
    totals = counts[rng.integers(0, len(counts), size=(n_boot, len(counts)))].sum(axis=1)
    ok = totals[:, 0] > 0
    if not ok.any():
        return np.full((3, 2), np.nan)
    shares = totals[ok, 1:] / totals[ok, :1]
    return np.quantile(shares, [0.025, 0.975], axis=0).T


def findings_table(runs: list[Run], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, metric group): jumps and their early / late / first-layer shares.

    Groups: each metric, ``continuous`` (stable_rank, participation_ratio,
    nuclear_norm_ratio) and ``all 4``. Columns: ``n_runs``, ``n_jumps`` (all seeds),
    ``jumps_per_run``, ``n_early``/``early`` (share) with ``early_lo``/``early_hi`` (95 %
    bootstrap CI over seeds), the same for ``late`` and ``first_layer``.
    """
    groups = {m: (m,) for m in METRICS} | {"continuous": CONTINUOUS, "all 4": METRICS}
    rows = []
    for model in dict.fromkeys(r.model for r in runs):
        mine = [r for r in runs if r.model == model]
        for name, metrics in groups.items():
            c = _counts(mine, metrics)
            total = c.sum(axis=0)
            ci = _ci(c, n_boot, seed)
            events = sum(
                r.jumps.loc[r.jumps["metric"].isin(metrics), "step"].nunique() for r in mine
            )
            row = {"model": model, "metrics": name, "n_runs": len(mine), "n_jumps": int(total[0]),
                   "n_steps_with_jumps": int(events),
                   "jumps_per_run": total[0] / len(mine)}  # fmt: skip
            for k, key in enumerate(("early", "late", "first_layer")):
                row[f"n_{key}"] = int(total[k + 1])
                row[key] = total[k + 1] / total[0] if total[0] else np.nan
                row[f"{key}_lo"], row[f"{key}_hi"] = ci[k]
            rows.append(row)
    return pd.DataFrame(rows)


def phase_check(runs: list[Run], metrics: tuple[str, ...]) -> pd.DataFrame | None:
    """``phase_distribution`` over the runs of one model (its point shares, cross-check)."""
    from hookscope.tracking.analysis import phase_distribution

    frames = [r.jumps[r.jumps["metric"].isin(metrics)].assign(run=f"seed{r.seed}") for r in runs]
    jumps = pd.concat(frames, ignore_index=True)
    if jumps.empty:
        return None
    n_steps = {f"seed{r.seed}": r.n_steps for r in runs}
    return phase_distribution(jumps, n_steps, EARLY, LATE, sites=runs[0].sites)


def convergence_table(runs: list[Run]) -> pd.DataFrame:
    """Per (model, metric): convergence patterns over seeds and median convergence step per site."""
    from hookscope.tracking.analysis import convergence

    rows = []
    for model in dict.fromkeys(r.model for r in runs):
        mine = [r for r in runs if r.model == model]
        frame = pd.concat([r.results.assign(run=f"seed{r.seed}") for r in mine], ignore_index=True)
        for metric in METRICS:
            res = convergence(frame, metric, n_steps={f"seed{r.seed}": r.n_steps for r in mine})
            t = res.table
            row = {"model": model, "metric": metric,
                   "patterns": ", ".join(f"{k} x{v}" for k, v in res.patterns["pattern"].value_counts().items())}  # fmt: skip
            medians, zeros = [], []
            for site in mine[0].sites:
                steps = t.loc[t["site"] == site, "convergence_step"].to_numpy(dtype=float)
                ok = steps[np.isfinite(steps)]
                medians.append(
                    f"{site}: {np.median(ok):.0f}" if ok.size else f"{site}: not converged"
                )
                zeros.append(int((steps == 0).sum()))
            row["median convergence step"] = ", ".join(medians)
            row["seeds converged at step 0 (per site)"] = ", ".join(map(str, zeros))
            loose = convergence(
                frame, metric, 0.2, n_steps={f"seed{r.seed}": r.n_steps for r in mine}
            )
            lt = loose.table
            row["median step, eps 0.2"] = ", ".join(
                f"{site}: {np.nanmedian(lt.loc[lt['site'] == site, 'convergence_step'].to_numpy(dtype=float)):.0f}"
                for site in mine[0].sites
            )
            row["n_at_step_0"] = sum(zeros)
            row["n_series"] = len(t)
            row["n_steps"] = mine[0].n_steps
            rows.append(row)
    return pd.DataFrame(rows)


def earliest_testable(runs: list[Run]) -> dict[str, int]:
    """Earliest step at which a jump can be reported, from the detector's settings."""
    from hookscope.analysis.jumps import MIN_REFERENCE

    # the causal reference of the 1-step difference ending at index t+1 needs MIN_REFERENCE
    # earlier differences (positions 0 .. t-2): t >= MIN_REFERENCE + 1, so index >= MIN_REFERENCE + 2
    return {"index": MIN_REFERENCE + 2}


# ---------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.1f} %"


def _share(row: pd.Series, key: str) -> str:
    if not np.isfinite(row[key]):
        return "n/a (0 jumps)"
    ci = (
        f" [{_pct(row[key + '_lo'])}, {_pct(row[key + '_hi'])}]"
        if np.isfinite(row[key + "_lo"])
        else ""
    )
    return f"{_pct(row[key])}{ci} ({row['n_' + key]}/{row['n_jumps']})"


def _md_table(df: pd.DataFrame) -> str:
    """A frame as a markdown table (floats without decimals: steps)."""

    def cell(v: object) -> str:
        return (
            (f"{v:.0f}" if np.isfinite(v) else "not converged") if isinstance(v, float) else str(v)
        )

    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, *body])


def verdict(table: pd.DataFrame, conv: pd.DataFrame) -> list[str]:
    """Plain sentences: where the valid detector agrees with the original findings and where not."""
    out = []
    cont = table[table["metrics"] == "continuous"].set_index("model")
    for key, claim, value in (
        ("early", "83.3 % of jumps in the first 10 %", 0.833),
        ("late", "0 % of jumps after 50 %", 0.0),
    ):
        parts = []
        for model, row in cont.iterrows():
            if row["n_jumps"] == 0:
                parts.append(
                    f"{model}: no jumps at all in {row['n_runs']} seeds, nothing to share out"
                )
                continue
            lo, hi = row[f"{key}_lo"], row[f"{key}_hi"]
            inside = lo - 1e-9 <= value <= hi + 1e-9
            word = "consistent" if inside else ("higher" if row[key] > value else "lower")
            parts.append(f"{model}: {_pct(row[key])} (CI {_pct(lo)}..{_pct(hi)}), {word}")
        out.append(f"* {claim}: " + "; ".join(parts) + ".")
    if "cnn" in cont.index:
        row = cont.loc["cnn"]
        if row["n_jumps"] == 0:
            text = (
                f"no CNN jumps at all in {row['n_runs']} seeds: not reproduced, nothing to locate."
            )
        else:
            text = f"{_share(row, 'first_layer')}."
        out.append("* 51 % of CNN jumps in the first layer: " + text)
    n_runs = int(table.loc[table["metrics"] == "all 4", "n_runs"].sum())
    n_jumps = int(table.loc[table["metrics"] == "all 4", "n_jumps"].sum())
    out.append(
        f"* 2,991 jumps in 55 experiments (54.4 per experiment): {n_jumps} jumps in {n_runs} runs "
        f"({n_jumps / max(n_runs, 1):.1f} per run, all 4 metrics)."
    )
    out.append(
        f"* 'all layers converge at step 0': {int(conv['n_at_step_0'].sum())} of "
        f"{int(conv['n_series'].sum())} (seed, site, metric) series converge at step 0 (table below)."
    )
    return out


def markdown(table: pd.DataFrame, conv: pd.DataFrame, runs: list[Run], info: dict) -> str:
    lines = ["# The dimensionality project's findings, re-tested with hookscope's tracker", ""]
    lines += [f"Command: `{info['command']}`", "",
              f"Seeds: {info['seeds']}; steps: {info['steps']}; run time {info['seconds']:.0f} s "
              f"({info['threads']} torch threads); versions: {info['versions']}.", ""]  # fmt: skip
    lines += [
        'Every run is tracked at every step (`hs.Tracker(model, sites="auto", every=1, '
        "inputs=None, jumps=True)`, the 4 metrics stable_rank, participation_ratio, energy_rank, "
        "nuclear_norm_ratio, default detector settings). Shares pool the jumps of all seeds; "
        "the brackets are 95 % percentile-bootstrap CIs resampling *seeds* (2,000 resamples), "
        "then the count (jumps in that phase / all jumps). early: step < 10 % of training; "
        "late: step >= 50 %; first layer: the first tracked site.",
        "",
        f"**The first {info['earliest']} logged values (steps 0..{info['earliest'] - 1} here, "
        "every=1) cannot hold a detected jump**: the causal detector needs a reference window "
        f"of {info['earliest'] - 2} earlier differences. That is 1 % of a 1,000-step run and a "
        "tenth of its 'early' phase (steps 0..99), so an 'early' share counts jumps in 90 testable "
        "steps; and a jump at step 0..9, where the original project saw layers 'converge', cannot "
        "be detected at all.",
        "",
        "## Side by side",
        "",
        "| finding | original project | hookscope, continuous metrics (SR, PR, NNR) | hookscope, energy_rank |",
        "|---|---|---|---|",
    ]
    cont = table[table["metrics"] == "continuous"].set_index("model")
    er = table[table["metrics"] == "energy_rank"].set_index("model")
    for key, label in (("early", "jumps in first 10 %"), ("late", "jumps after 50 %")):
        a = "; ".join(f"{m}: {_share(cont.loc[m], key)}" for m in cont.index)
        b = "; ".join(f"{m}: {_share(er.loc[m], key)}" for m in er.index)
        lines.append(f"| {label} | {ORIGINAL[key]} | {a} | {b} |")
    if "cnn" in cont.index:
        lines.append(
            f"| CNN jumps in first layer | {ORIGINAL['first layer']} | {_share(cont.loc['cnn'], 'first_layer')} "
            f"| {_share(er.loc['cnn'], 'first_layer')} |"
        )
    allm = table[table["metrics"] == "all 4"]
    n_runs, n_jumps = int(allm["n_runs"].sum()), int(allm["n_jumps"].sum())
    lines.append(
        f"| jumps | {ORIGINAL['jumps']} | {int(cont['n_jumps'].sum())} in {n_runs} runs "
        f"({cont['n_jumps'].sum() / n_runs:.1f} per run) | {int(er['n_jumps'].sum())} "
        f"({er['n_jumps'].sum() / n_runs:.1f} per run); all 4 metrics: {n_jumps} ({n_jumps / n_runs:.1f} per run) |"
    )
    conv_step0, total_series = conv["n_at_step_0"].sum(), conv["n_series"].sum()
    lines.append(
        f"| convergence | {ORIGINAL['convergence']} | {int(conv_step0)} of {total_series} "
        "(seed, site, metric) series converge at step 0; patterns below | |"
    )
    lines += ["", "## Verdict (continuous metrics; energy_rank in the tables)", ""] + verdict(
        table, conv
    )
    lines += ["", "## Per model and metric", "",
              "| model | metrics | runs | jumps | distinct steps | per run | early | late | first layer |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for _, row in table.iterrows():
        lines.append(
            f"| {row['model']} | {row['metrics']} | {row['n_runs']} | {row['n_jumps']} | "
            f"{row['n_steps_with_jumps']} | "
            f"{row['jumps_per_run']:.1f} | {_share(row, 'early')} | {_share(row, 'late')} | "
            f"{_share(row, 'first_layer')} |"
        )
    lines += ["", "## Convergence per layer", "",
              "`hookscope.tracking.analysis.convergence` (eps = 5 % of the series' range, "
              "final value = mean of the last 3 values; pattern over depth per seed; the last column: "
              "the same with eps = 20 %). "
              "Median convergence step over seeds per site, and how many seeds converge at step 0.",
              "", _md_table(conv.drop(columns=["n_at_step_0", "n_series"])), ""]  # fmt: skip
    lines += ["## Runs", "", "| model | seed | steps | sites | jumps (all 4) | final loss | seconds |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        loss = r.results.groupby("step")["loss"].first()
        lines.append(
            f"| {r.model} | {r.seed} | {r.n_steps} | {', '.join(r.sites)} | {len(r.jumps)} | "
            f"{loss.iloc[-20:].mean():.3f} (mean of last 20) | {r.seconds:.0f} |"
        )
    lines += ["", "## Notes", ""] + [f"* {n}" for n in info["notes"]] + [""]
    return "\n".join(lines)


def figures(runs: list[Run], table: pd.DataFrame, out: Path) -> list[Path]:
    """Up to 3 small PNGs: shares with CIs, jump steps over training, one run's series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hookscope.tracking.plots import lines

    paths = []
    models = list(dict.fromkeys(r.model for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.8))
    for ax, key, title in zip(
        axes,
        ("early", "late", "first_layer"),
        ("first 10 %", "after 50 %", "first layer"),
        strict=True,
    ):
        for k, (group, colour) in enumerate((("continuous", "C0"), ("energy_rank", "C1"))):
            t = table[table["metrics"] == group].set_index("model").loc[models]
            x = np.arange(len(models)) + (k - 0.5) * 0.38
            err = np.nan_to_num(np.stack([t[key] - t[key + "_lo"], t[key + "_hi"] - t[key]]))
            ax.bar(x, t[key].fillna(0), 0.38, yerr=err, capsize=2, color=colour, label=group)
        ax.axhline({"early": 0.833, "late": 0.0, "first_layer": 0.51}[key], color="k", ls="--", lw=1,
                   label="original")  # fmt: skip
        ax.set_xticks(range(len(models)), models)
        ax.set_ylim(0, 1)
        ax.set_title(f"share of jumps: {title}", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "dimensionality_findings_shares.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(
        len(models), 1, figsize=(7, 1.3 * len(models) + 0.6), sharex=True, squeeze=False
    )
    bins = np.linspace(0, 1, 41)
    for ax, model in zip(axes[:, 0], models, strict=True):
        mine = [r for r in runs if r.model == model]
        for group, metrics, colour in (
            ("continuous", CONTINUOUS, "C0"),
            ("energy_rank", ("energy_rank",), "C1"),
        ):
            frac = np.concatenate([
                r.jumps.loc[r.jumps["metric"].isin(metrics), "step"].to_numpy(dtype=float) / r.n_steps for r in mine
            ])  # fmt: skip
            ax.hist(frac, bins=bins, alpha=0.6, color=colour, label=group)
        ax.axvline(EARLY, color="k", lw=0.8, ls=":")
        ax.axvline(LATE, color="k", lw=0.8, ls=":")
        ax.set_ylabel(model, fontsize=8)
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title("jump steps (fraction of training), all seeds", fontsize=9)
    axes[-1, 0].set_xlabel("step / n_steps")
    fig.tight_layout()
    paths.append(out / "dimensionality_findings_steps.png")
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)

    pick = max(runs, key=lambda r: len(r.jumps))  # the run with most jumps
    fig = lines(pick.results, pick.jumps, list(CONTINUOUS))
    paths.append(out / "dimensionality_findings_series.png")
    fig.savefig(paths[-1], dpi=70)
    plt.close(fig)
    return paths


def run_findings(models: tuple[str, ...], seeds: list[int], steps: int | None, induction_steps: int,
                 progress: bool = True, jump_options: dict | None = None) -> tuple[list[Run], pd.DataFrame]:  # fmt: skip
    """Train and track every (model, seed); the runs and :func:`findings_table`."""
    runs = []
    for model in models:
        for seed in seeds:
            run = tracked_run(
                model, seed, induction_steps if model == "induction" else steps, jump_options
            )
            if progress:
                print(
                    f"{model} seed {seed}: {run.n_steps} steps, {len(run.jumps)} jumps, {run.seconds:.0f} s",
                    flush=True,
                )
            runs.append(run)
    return runs, findings_table(runs)


def source_digest() -> str:
    """sha256 (first 12 hex) of the tracker's sources as this process imported them."""
    import hashlib
    import importlib

    h = hashlib.sha256()
    for name in ("tracking.tracker", "tracking.online", "tracking.sites", "analysis.jumps",
                 "analysis.dimensionality"):  # fmt: skip
        h.update(Path(importlib.import_module(f"hookscope.{name}").__file__).read_bytes())
    return h.hexdigest()[:12]


def _versions() -> str:
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (f"hookscope {hs.__version__} (git {commit}, uncommitted tracker), torch {torch.__version__}, "
            f"numpy {version('numpy')}, pandas {version('pandas')}, python {platform.python_version()}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps", type=int, default=None, help="digits steps (default: the recipe's 1000)"
    )
    parser.add_argument("--induction-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="MLP, seed 0, 200 steps")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder (default examples/; --quick: results/findings_quick/)",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="pickle of the runs: reuse or write"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.steps = ["mlp"], [0], 200
    if args.out is None:  # a quick run does not overwrite the full report
        args.out = HERE.parent / "results" / "findings_quick" if args.quick else HERE
    torch.set_num_threads(args.threads)
    digest = source_digest()  # before training: the code these runs use
    start = time.perf_counter()
    cached = args.cache is not None and args.cache.exists()
    if cached:
        saved = pickle.loads(args.cache.read_bytes())
        runs, digest = saved["runs"], saved["digest"]  # the code that trained them
        table = findings_table(runs)
    else:
        runs, table = run_findings(tuple(args.models), args.seeds, args.steps, args.induction_steps)
        if args.cache is not None:
            args.cache.write_bytes(pickle.dumps({"runs": runs, "digest": digest}))
    conv = convergence_table(runs)
    notes = []
    for model in dict.fromkeys(r.model for r in runs):
        mine = [r for r in runs if r.model == model]
        pd_res = phase_check(mine, CONTINUOUS)
        row = table[(table["model"] == model) & (table["metrics"] == "continuous")].iloc[0]
        if pd_res is not None:
            early = float(pd_res.table.set_index("phase").loc["early", "share"])
            assert abs(early - row["early"]) < 1e-12, (model, early, row["early"])
            notes.append(
                f"{model}: `phase_distribution` (continuous metrics) agrees on the point shares "
                f"(early {_pct(early)}, first layer {_pct(pd_res.first_layer_share)}); its CI "
                f"resamples only runs that have jumps, {pd_res.resampling}; the CIs here resample all seeds."
            )
    ind = [r for r in runs if r.model == "induction"]
    if ind:
        final = np.mean([r.results.groupby("step")["loss"].first().iloc[-20:].mean() for r in ind])
        notes.append(
            f"Induction transformer: mean final training loss {final:.2f} nats against ln 64 = "
            f"{math.log(64):.2f} for uniform guessing: in {ind[0].n_steps} steps the model has learned "
            "little (the recipe's 1,500 steps form induction heads), so its rows describe an early, "
            "barely trained run, not the induction-head phase change."
        )
    notes += [
        "Jumps are counted per series (site x metric): one event that moves several series at the "
        "same step counts several times (the 'distinct steps' column counts steps instead).",
        "Digits models: `train_digits.train`'s data, AdamW, batch 64, cosine schedule and steps, with the "
        "seed for torch.manual_seed and the shuffle generator (the shipped recipe uses seed 0).",
        f"Induction transformer: {args.induction_steps} steps instead of the recipe's 1,500 (time budget: ~0.12 s per step on this machine), warmup scaled to the same fraction, data seed DATA_SEED + seed; "
        "its phases are fractions of these shortened runs.",
        "energy_rank is integer-valued: against a flat stretch a +-1 flicker has a robust z of "
        "infinity (MAD 0) for any z-score detector, so its jumps are reported apart from the "
        "three continuous metrics.",
        "The activations of step s are the training forward of step s (weights before that step's update).",
    ]
    info = {
        "command": " ".join(
            [".venv/bin/python", "examples/dimensionality_findings.py", *(argv or sys.argv[1:])]
        ),
        "seeds": args.seeds,
        "steps": f"digits {args.steps or 1000}, induction {args.induction_steps}",
        "seconds": time.perf_counter() - start,
        "threads": args.threads,
        "versions": _versions() + f"; sha256 of hookscope/tracking/{{tracker,online,sites}}.py + "
        f"analysis/{{jumps,dimensionality}}.py: {digest}",
        "earliest": earliest_testable(runs)["index"],
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    paths = figures(runs, table, args.out)
    info["seconds"] = time.perf_counter() - start
    if cached:  # the report of a saved run: its training time, and the command that ran it
        info["seconds"] = sum(r.seconds for r in runs) + info["seconds"]
        notes.append(
            "Rendered from the saved runs (--cache); run time = the runs' training time + analysis."
        )
    info["command"] = " ".join(
        a
        for i, a in enumerate(info["command"].split())
        if "--cache" not in (a, info["command"].split()[i - 1])
    )
    text = markdown(table, conv, runs, info)
    pick = max(runs, key=lambda r: len(r.jumps))
    text += (
        "\nFigures: "
        + ", ".join(f"`{p.name}`" for p in paths)
        + f" (shares with CIs; jump steps as a fraction of training; the series of {pick.model} "
        f"seed {pick.seed}, the run with most jumps, jumps marked)\n"
    )
    (args.out / "dimensionality_findings.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
