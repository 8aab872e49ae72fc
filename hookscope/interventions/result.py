"""PatchingResult: scores of a sweep over addresses (and positions), ranked, tabled, plotted."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from hookscope.addresses import Address
from hookscope.errors import InputError

__all__ = ["PatchingResult"]


@dataclass
class PatchingResult:
    """Scores of a patching / attribution sweep.

    ``scores`` is shaped by the sweep (``dims`` names each axis, e.g. ``("layer", "head")``
    for ``head.*.*`` or ``("layer", "pos")`` for ``resid_pre.*`` swept over positions);
    ``flat`` holds the same numbers in job order, one per ``(address, position)`` of ``jobs``.
    """

    scores: Tensor
    dims: tuple[str, ...]
    jobs: list[tuple[Address, int | None]]
    flat: Tensor
    method: str = "activation_patching"
    direction: str = "denoise"
    metric: str = "metric"
    normalised: bool = True
    baselines: dict[str, float] = field(default_factory=dict)
    higher_is_better: bool = True

    @property
    def effects(self) -> Tensor:
        """How much of the behaviour each job carries, in job order (larger = more important).

        Normalised denoising: the score (fraction restored). Normalised noising and ablation:
        ``1 - score`` (fraction destroyed). Raw scores: the change of the metric towards the
        clean value (denoising, from the ``corrupted`` baseline) or away from it (noising and
        ablation), signed by ``higher_is_better``.
        """
        if self.normalised:
            return self.flat if self.direction == "denoise" else 1.0 - self.flat
        sign = 1.0 if self.higher_is_better else -1.0
        if self.direction == "denoise":
            return sign * (self.flat - self.baselines["corrupted"])
        return sign * (self.baselines["clean"] - self.flat)

    @property
    def addresses(self) -> list[Address]:
        return list(dict.fromkeys(a for a, _ in self.jobs))

    @property
    def positions(self) -> list[int] | None:
        found = list(dict.fromkeys(p for _, p in self.jobs))
        return None if found == [None] else found  # type: ignore[return-value]

    def top(self, k: int = 10) -> list[tuple[Address, int | None, float]]:
        """The ``k`` most important (address, position, score), ranked by :attr:`effects`.

        For denoising that is the highest score first; for noising and ablation the lowest
        (the sites whose patching destroys the most).
        """
        order = self.effects.argsort(descending=True, stable=True)[:k]
        return [(self.jobs[i][0], self.jobs[i][1], float(self.flat[i])) for i in order.tolist()]

    def to_pandas(self):
        """One row per (address, position) with its score."""
        import pandas as pd

        return pd.DataFrame(
            {
                "address": [str(a) for a, _ in self.jobs],
                "position": [p for _, p in self.jobs],
                "score": self.flat.tolist(),
                "effect": self.effects.tolist(),
            }
        )

    def plot(self, ax=None, values: str = "score"):
        """Heatmap of a 2-D sweep (bar chart for 1-D); returns the matplotlib Figure.

        ``values``: ``"score"`` (the sweep's scores) or ``"effect"`` (:attr:`effects`, so
        that important sites stand out in either direction).
        """
        from matplotlib.figure import Figure

        if values not in ("score", "effect"):
            raise InputError(f"values must be one of score, effect, got {values!r}")
        fig = ax.figure if ax is not None else Figure(figsize=(7, 4.5))
        ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
        data = self.scores if values == "score" else self.effects.reshape(self.scores.shape)
        data = data.detach().float().cpu()
        title = f"{self.method} ({self.direction}, {self.metric}{', normalised' if self.normalised else ''})"
        if data.ndim >= 2:
            data = data.reshape(data.shape[0], -1)
            lim = float(data.abs().max()) or 1.0
            image = ax.imshow(data.numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_ylabel(self.dims[0])
            ax.set_xlabel(" x ".join(self.dims[1:]))
            rows, cols = data.shape
            ax.set_yticks(range(0, rows, max(1, rows // 24)))
            ax.set_xticks(range(0, cols, max(1, cols // 32)))
            fig.colorbar(image, ax=ax, label=values)
        else:
            values = data.reshape(-1).numpy()
            ax.bar(range(len(values)), values)
            ax.set_xticks(
                range(len(values)),
                [str(a) if p is None else f"{a}@{p}" for a, p in self.jobs],
                rotation=90,
            )
            ax.set_ylabel("score")
        ax.set_title(title)
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        head = (
            f"PatchingResult({self.method}, {self.direction}, metric {self.metric}"
            f"{' normalised' if self.normalised else ''}; scores {tuple(self.scores.shape)} over {self.dims})"
        )
        lines = [head, f"  {'rank':<5}{'address':<24}{'position':<10}score"]
        for rank, (address, pos, score) in enumerate(self.top(10), 1):
            lines.append(
                f"  {rank:<5}{str(address):<24}{'all' if pos is None else pos!s:<10}{score:+.4f}"
            )
        return "\n".join(lines)
