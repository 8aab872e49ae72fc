"""Figures of a tracked run: metrics over steps per layer with jumps, and a layer x step map."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["lines", "heatmap"]


def lines(frame: pd.DataFrame, jumps: pd.DataFrame, metrics: list[str]) -> Figure:
    """One panel per metric: a line per site over steps, its jumps as triangles on it."""
    from hookscope.plot import figure

    sites = list(pd.unique(frame["site"]))
    fig = figure(figsize=(7, 1.9 * len(metrics) + 0.8))
    axes = np.atleast_1d(fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0])
    for ax, metric in zip(axes, metrics, strict=True):
        part = frame[frame["metric"] == metric]
        for k, site in enumerate(sites):
            series = part[part["site"] == site]
            ax.plot(series["step"], series["value"], lw=1, color=f"C{k % 10}", label=site)
            hits = (
                jumps[(jumps["metric"] == metric) & (jumps["site"] == site)]
                if len(jumps)
                else jumps
            )
            if len(hits):
                at = series.set_index("step")["value"].reindex(hits["step"]).to_numpy()
                marker = np.where(hits["direction"].to_numpy() == "up", "^", "v")
                for x, y, m in zip(hits["step"], at, marker, strict=True):
                    ax.plot(x, y, m, color=f"C{k % 10}", ms=7, mec="k", mew=0.6)
        ax.set_ylabel(metric.replace("_", " "), fontsize=8)
    axes[0].legend(fontsize=7, ncol=min(4, len(sites)), loc="best")
    n_jumps = 0 if not len(jumps) else int(jumps["metric"].isin(metrics).sum())
    axes[0].set_title(f"{len(sites)} layers, {n_jumps} jumps (triangles: up / down)", fontsize=9)
    axes[-1].set_xlabel("training step")
    fig.tight_layout()
    return fig


def heatmap(frame: pd.DataFrame, jumps: pd.DataFrame, metric: str) -> Figure:
    """``metric`` as a layer x step image (each layer scaled to its own range), jumps as dots."""
    from hookscope.plot import figure

    part = frame[frame["metric"] == metric]
    sites = list(pd.unique(part["site"]))
    grid = part.pivot(index="site", columns="step", values="value").reindex(sites)
    values = grid.to_numpy(float)
    lo = np.nanmin(values, axis=1, keepdims=True)
    span = np.nanmax(values, axis=1, keepdims=True) - lo
    scaled = (values - lo) / np.where(span > 0, span, 1.0)
    steps = grid.columns.to_numpy(float)
    fig = figure(figsize=(8, 0.5 * len(sites) + 1.6))
    ax = fig.subplots()
    extent = (steps[0], steps[-1], len(sites) - 0.5, -0.5) if len(steps) > 1 else None
    im = ax.imshow(scaled, aspect="auto", interpolation="nearest", cmap="viridis", extent=extent)
    hits = jumps[jumps["metric"] == metric] if len(jumps) else jumps
    if len(hits):
        rows = [sites.index(s) for s in hits["site"]]
        ax.scatter(
            hits["step"], rows, s=18, c="red", edgecolors="white", linewidths=0.5, label="jump"
        )
        ax.legend(fontsize=7, loc="upper right")
    ax.set_yticks(range(len(sites)), sites, fontsize=8)
    ax.set_xlabel("training step")
    ax.set_title(f"{metric.replace('_', ' ')} per layer (each row scaled to its range)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, label="fraction of the layer's range")
    fig.tight_layout()
    return fig
