"""Re-analyse the dimensionality project's own Phase-1 result files with hookscope's detector.

The project (github.com/Javihaus/ndt) reported from these files that 83.3 % of its 2,991
jumps fall in the first 10 % of training, none after 50 %, and that 51 % of CNN jumps are in
the first layer. Its files were deleted from the repository later; they are in its history
at commit 69033c2556 (experiments/new/results/phase1_full/*.json). Fetch them with

    git -C ndt show 69033c2556:experiments/new/results/phase1_full/<name>.json > <folder>/<name>.json

for every name listed by ``git -C ndt ls-tree --name-only 69033c2556
experiments/new/results/phase1_full/``, then run

    python examples/ndt_reanalysis.py <folder>

Each series (file x layer x metric) goes through ``hs.analysis.jump_report`` with its
validated defaults (offline, both sides of each point as reference; integer-valued
``energy_rank`` with its rounding-noise floor). Shares come with 95 % bootstrap intervals
that resample files (runs), not jumps. The metrics are the project's own (uncentred, its
participation ratio on singular values, conv layers as per-channel spatial means; see
``hs.tracking.load_ndt``): only the detector changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import hookscope as hs
from hookscope.analysis.jumps import jump_report
from hookscope.tracking.analysis import phase_distribution
from hookscope.tracking.online import INTEGER_METRICS, INTEGER_NOISE


def jumps_of(path: Path) -> tuple[pd.DataFrame, int, list[str]]:
    """All jumps of one Phase-1 file, its training length and its layers (depth order)."""
    run = hs.tracking.load_ndt(path)
    frame = run.results
    rows = []
    for (site, metric), series in frame.groupby(["site", "metric"], sort=False):
        series = series.sort_values("step")
        noise = INTEGER_NOISE if metric in INTEGER_METRICS else 0.0
        report = jump_report(series["value"], series["step"], noise_floor=noise)
        rows += [
            {
                "run": path.stem,
                "site": site,
                "metric": metric,
                "step": j.step,
                "magnitude": j.magnitude,
                "direction": j.direction,
            }
            for j in report.jumps
        ]
    n_steps = int(run.meta.get("num_steps") or frame["step"].max())
    columns = ["run", "site", "metric", "step", "magnitude", "direction"]
    return pd.DataFrame(rows, columns=columns), n_steps, run.sites


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder holding the Phase-1 *.json files")
    args = parser.parse_args(argv)
    files = sorted(p for p in args.folder.glob("*.json") if p.stem != "experiment_summary")
    if not files:
        sys.exit(f"no Phase-1 files in {args.folder}")
    found, lengths, first = [], {}, {}
    for path in files:
        jumps, n_steps, sites = jumps_of(path)
        found.append(jumps)
        lengths[path.stem], first[path.stem] = n_steps, sites[0]
    jumps = pd.concat(found, ignore_index=True)
    jumps["arch"] = jumps["run"].str.split("_").str[0]
    jumps["first_layer"] = jumps["site"] == jumps["run"].map(first)
    rows = []
    groups = [
        ("all metrics", jumps),
        ("continuous (no energy rank)", jumps[jumps.metric != "energy_rank"]),
    ]
    groups += [
        (f"{arch}, continuous", g[g.metric != "energy_rank"]) for arch, g in jumps.groupby("arch")
    ]
    for name, part in groups:
        runs = sorted(part["run"].unique())
        dist = phase_distribution(part, {r: lengths[r] for r in runs}, seed=0)
        table = dist.table.set_index("phase")
        boot = np.random.default_rng(0).choice(len(runs), (2000, len(runs)))
        counts = part.groupby("run").size().reindex(runs).to_numpy()
        firsts = part.groupby("run")["first_layer"].sum().reindex(runs).to_numpy()
        first_ci = np.percentile(firsts[boot].sum(1) / counts[boot].sum(1), [2.5, 97.5])
        rows.append(
            {
                "group": name,
                "runs": len(runs),
                "jumps": len(part),
                "early (<10 %)": _fmt(table.loc["early"]),
                "late (>=50 %)": _fmt(table.loc["late"]),
                "first layer": f"{firsts.sum() / counts.sum():.1%} [{first_ci[0]:.1%}, {first_ci[1]:.1%}]",
                "runs with a late jump": f"{(part.assign(f=part.step / part.run.map(lengths)).groupby('run')['f'].max() >= 0.5).mean():.0%}",
            }
        )
    out = pd.DataFrame(rows)
    print(
        f"{len(files)} Phase-1 files; the project reported 2,991 jumps, 83.3 % early, 0 % late, CNN 51 % first layer"
    )
    print(out.to_string(index=False))
    return out


def _fmt(row: pd.Series) -> str:
    return f"{row['share']:.1%} [{row['ci_low']:.1%}, {row['ci_high']:.1%}]"


if __name__ == "__main__":
    main()
