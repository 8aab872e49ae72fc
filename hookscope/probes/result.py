"""``ProbeSweep``: the result of :func:`hookscope.probes.probe_sweep` (table, text, plot,
JSON artifact)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope.errors import ProbeError, format_choices
from hookscope.probes.linear import LinearProbe

__all__ = ["ProbeSweep"]


_SUMMARY = ("score", "sd", "ci_low", "ci_high")


@dataclass
class ProbeSweep:
    """A probe per site with its controls and statistics (see :mod:`hookscope.probes.sweep`
    for what each column means). ``to_pandas()``, ``str()``, ``plot()``, ``to_json(path)``.

    ``directions``: ``{site: unit direction}`` (feeds :func:`hookscope.analysis.neuron_alignment`
    as it is); ``probes``: seed 0's task probe per site (fold 0 with ``cv``), a fitted
    :class:`LinearProbe`; ``splits``: per seed, the row numbers of each part."""

    metric: str
    task: str
    controls: tuple[str, ...]
    rows: list[dict]
    directions: dict[str, Tensor]
    probes: dict[str, LinearProbe]
    config: dict
    splits: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)

    @property
    def sites(self) -> list[str]:
        return [r["site"] for r in self.rows]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("site")

    def __getitem__(self, site: str) -> dict:
        for r in self.rows:
            if r["site"] == site:
                return r
        raise ProbeError(
            f"{site!r} is not a site of this sweep; sites: {format_choices(self.sites)}"
        )

    def __str__(self) -> str:
        head = [f"{'site':<16}", f"{self.metric:>20}"]
        head += [f"{c:>15}" for c in self.controls]
        if "control_task" in self.controls:
            head.append(f"{'selectivity':>12}")
        head += [f"{'p (Holm)':>9}", f"{'n test':>7}"]
        lines = [
            f"ProbeSweep: {self.task} probes, {self.metric}, {self.config['seeds']} seeds, "
            f"{int(self.config['confidence'] * 100)}% bootstrap CI",
            " ".join(head),
        ]
        for r in self.rows:
            cells = [
                f"{r['site']:<16}",
                f"{r['score']:.3f}±{_fmt(r['sd'])} [{r['ci_low']:.3f},{r['ci_high']:.3f}]".rjust(
                    20
                ),
            ]
            cells += [f"{r[c]:.3f}±{_fmt(r[c + '_sd'])}".rjust(15) for c in self.controls]
            if "control_task" in self.controls:
                cells.append(f"{r['selectivity']:+.3f}".rjust(12))
            star = "*" if r["p_holm"] <= 0.05 else " "
            cells += [f"{r['p_holm']:.3g}{star}".rjust(9), f"{r['n_test']:>7}"]
            lines.append(" ".join(cells))
        lines.append("* p (Holm) <= 0.05; ± is the sd over seeds")
        return "\n".join(lines)

    __repr__ = __str__

    def plot(self):
        """The metric per site with its confidence band, the controls beneath."""
        from hookscope.plot import figure

        df = self.to_pandas()
        x = np.arange(len(df))
        fig = figure(figsize=(max(5.0, 0.5 * len(df) + 2), 3.6))
        ax = fig.subplots()
        ax.fill_between(
            x,
            df["ci_low"],
            df["ci_high"],
            alpha=0.25,
            color="C0",
            label=f"{int(self.config['confidence'] * 100)}% CI",
        )
        ax.plot(x, df["score"], "o-", color="C0", label="probe")
        for k, c in enumerate(self.controls):
            ax.errorbar(
                x,
                df[c],
                yerr=df[c + "_sd"].fillna(0),
                fmt=".--",
                color=f"C{k + 1}",
                lw=1,
                capsize=2,
                label=c.replace("_", " "),
            )
        ax.set_xticks(x, list(df.index), rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(self.metric)
        ax.set_title(f"{self.task} probe per site ({self.config['seeds']} seeds)")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig

    def to_json(self, path: str | Path) -> Path:
        """Write the table, directions (as lists), configuration, versions and seeds,
        atomically."""
        from hookscope.store.files import atomic_write

        payload = {
            "kind": "hookscope.probes.ProbeSweep",
            "format": 1,
            "metric": self.metric,
            "task": self.task,
            "controls": list(self.controls),
            "rows": self.rows,
            "directions": {k: v.tolist() for k, v in self.directions.items()},
            "config": self.config,
        }
        data = json.dumps(_json_value(payload), indent=1, allow_nan=False).encode()
        path = Path(path)
        atomic_write(path, lambda f: f.write(data))
        return path


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.3f}"


def _json_value(v: Any) -> Any:
    """``v`` with numpy scalars as Python numbers and NaN / infinity as null (strict JSON)."""
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def _versions() -> dict:
    from importlib.metadata import version

    import hookscope

    return {
        "hookscope": hookscope.__version__,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "scikit-learn": version("scikit-learn"),
        "numpy": np.__version__,
    }
