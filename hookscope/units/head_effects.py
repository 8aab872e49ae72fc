"""What each head's output does and holds: :func:`head_importance` and :func:`head_probe`.

Head names, ``[layer, head]`` grids and the readout position follow
:mod:`hookscope.units._common`. A head's output is its ``z`` (``head.L``, ``[d_head]``) unless
an argument says otherwise; metrics, the train / test split and chance levels are defined in
each function's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookscope.attribution._common import Inputs, prepare_inputs
from hookscope.errors import InputError, format_choices
from hookscope.modes import in_eval_mode

from ._common import (
    _attention_model,
    _choice,
    _chunks,
    _grid_frame,
    _heatmap,
    _pick_layers,
    _readout,
    as_labels,
    is_int,
    is_real,
    positive_int,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["HeadImportance", "head_importance", "HeadProbe", "head_probe"]

ABLATIONS = ("zero", "mean")
METRICS = ("accuracy", "loss")
PROBE_SITES = ("z", "result")
#: LinearProbe settings of head_probe (scikit-learn's LogisticRegression uses tol=1e-4)
PROBE_MAX_ITER, PROBE_TOL = 1000, 1e-6


# -------------------------------------------------------------------------- importance


@dataclass(frozen=True, repr=False, eq=False)
class HeadImportance:
    """Metrics with each head ablated alone: ``clean[m]`` unablated, ``ablated[m]``
    ``[layer, head]``. ``accuracy_drop = clean - ablated``, ``loss_increase = ablated -
    clean`` (cross-entropy in nats)."""

    layers: tuple[int, ...]
    method: str
    clean: dict[str, float]
    ablated: dict[str, Tensor]
    n_examples: int

    @property
    def accuracy_drop(self) -> Tensor | None:
        a = self.ablated.get("accuracy")
        return None if a is None else self.clean["accuracy"] - a

    @property
    def loss_increase(self) -> Tensor | None:
        a = self.ablated.get("loss")
        return None if a is None else a - self.clean["loss"]

    def _changes(self) -> dict[str, Tensor]:
        out = {}
        if self.accuracy_drop is not None:
            out["accuracy_drop"] = self.accuracy_drop
        if self.loss_increase is not None:
            out["loss_increase"] = self.loss_increase
        return out

    def to_pandas(self) -> pd.DataFrame:
        """One row per head: ablated metrics and their changes."""
        cols = {**{f"{m}_ablated": v for m, v in self.ablated.items()}, **self._changes()}
        return _grid_frame(self.layers, cols)

    def __repr__(self) -> str:
        clean = ", ".join(f"{m} {v:.4f}" for m, v in self.clean.items())
        df = self.to_pandas()
        return (
            f"HeadImportance({self.method} ablation of each head, {self.n_examples} examples; "
            f"clean {clean})\n" + df.to_string(index=False, float_format=lambda v: f"{v:.4f}")
        )

    def plot(self) -> Figure:
        """Heatmaps layers x heads of the accuracy drop and the loss increase
        (``fig.axes[0]`` and ``fig.axes[1]``; colour bars follow)."""
        from hookscope.plot import figure

        changes = self._changes()
        fig = figure(figsize=(4.2 * len(changes), 3.2))
        axes = fig.subplots(1, len(changes), squeeze=False)[0]
        for ax, (name, grid) in zip(axes, changes.items(), strict=True):
            _heatmap(ax, grid.float(), f"{name} ({self.method} ablation)", self.layers, "magma")
        fig.tight_layout()
        return fig


def _metric_fn(name: str, y: Tensor) -> Any:
    """Per-batch metric of the ablation sweep on logits [b, classes] or [b, pos, vocab]
    (last position): mean accuracy or mean cross-entropy against ``y``."""

    def read(out: Tensor) -> Tensor:
        logits = out[:, -1] if out.ndim == 3 else out
        return logits.float()

    if name == "accuracy":

        def accuracy(out: Tensor) -> Tensor:
            return (read(out).argmax(-1) == y.to(out.device)).double().mean()

        return accuracy

    def loss(out: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(read(out), y.to(out.device)).double()

    return loss


@in_eval_mode
def head_importance(
    model: Any,
    inputs: Any,
    labels: Any,
    *,
    method: str = "zero",
    metric: str | Sequence[str] = METRICS,
    layers: Any = None,
    reference: Any = None,
    batch_size: int = 512,
    progress: bool | None = None,
) -> HeadImportance:
    """Accuracy drop and loss increase when each head's output ``z`` is ablated alone,
    through :func:`hookscope.interventions.ablate` (one sweep per metric and batch).

    ``method``: ``zero`` or ``mean`` (z replaced by its mean over ``reference``; default
    reference: ``inputs``; a ``reference`` with ``method="zero"`` is an InputError). Any
    number of reference rows; for a language model a reference of the inputs' token length
    gives a mean per position, one of another length a single mean over all its rows and
    positions, used at every position. Images must have the inputs' shape (else
    InputError). ``labels``: the class of each example (one class suffices), read from
    logits ``[batch, classes]``, or for a language model the next token at the last
    position (unpadded prompts of one length). Batches of ``batch_size`` rows are weighted by size,
    so the values are means over all examples.
    """
    from hookscope.interventions import ablate

    hm, valid = _attention_model(model, "head_importance")
    chosen = _pick_layers(layers, valid)
    method = _choice(method, "method", ABLATIONS)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not metrics or len(set(metrics)) != len(metrics):
        raise InputError(f"metric must be one or more of {format_choices(METRICS)}; got {metric!r}")
    for m in metrics:
        _choice(m, "metric", METRICS)
    batch_size = positive_int(batch_size, "batch_size")
    if reference is not None and method != "mean":
        raise InputError(
            f"reference is for method='mean' (the mean it ablates to); method={method!r} takes none"
        )
    data = prepare_inputs(hm, inputs)
    # no class statistics here: one prompt with one answer token is a valid input
    y = as_labels(labels, data.batch, min_classes=1)
    if data.mask is not None and not bool(data.mask.bool().all()):
        raise InputError(
            "head_importance reads the last position: pass prompts of one token length "
            "(these are padded)"
        )
    with torch.no_grad():
        n_out = hm(data.tensor[:1]).shape[-1]
    if int(y.min()) < 0 or int(y.max()) >= n_out:
        raise InputError(
            f"labels must lie in 0..{n_out - 1} (the model has {n_out} outputs); found "
            f"{int(y.min())}..{int(y.max())}"
        )
    if method == "mean" and reference is None:
        reference = data.tensor
    sites = [a for layer in chosen for a in hm.resolve(f"head.{layer}.*")]
    n_heads = len(sites) // len(chosen)
    clean = {m: 0.0 for m in metrics}
    ablated = {m: torch.zeros(len(sites), dtype=torch.float64) for m in metrics}
    parts = list(_chunks(data, batch_size, False, ""))
    show = progress if progress is not None else len(parts) * len(metrics) > 1
    with tqdm(total=len(parts) * len(metrics), desc="head ablation", disable=not show) as bar:
        start = 0
        for chunk in parts:
            rows = y[start : start + chunk.batch]
            weight = chunk.batch / data.batch
            for m in metrics:
                res = ablate(
                    hm, chunk.tensor, sites, method, reference=reference,
                    metric=_metric_fn(m, rows), progress=False,
                )  # fmt: skip
                clean[m] += weight * float(res.baselines["clean"])
                ablated[m] += weight * res.flat.double()
                bar.update(1)
            start += chunk.batch
    return HeadImportance(
        layers=tuple(chosen),
        method=method,
        clean=clean,
        ablated={m: v.reshape(len(chosen), n_heads) for m, v in ablated.items()},
        n_examples=data.batch,
    )


# ------------------------------------------------------------------------------ probing


@dataclass(frozen=True, repr=False, eq=False)
class HeadProbe:
    """Held-out accuracy of linear probes on each head's output (``[layer, head]``).

    ``class_accuracy``: the class from the head's output at the readout position (CLS /
    last real token); ``position_accuracy``: the position index from its output at every
    real position (NaN when not run). ``*_chance``: the accuracy of always predicting the
    most frequent training label on the test rows. ``train_rows`` / ``test_rows``: the
    example indices of the split (all positions of an example fall on one side).
    """

    layers: tuple[int, ...]
    site: str
    class_accuracy: Tensor
    position_accuracy: Tensor
    class_chance: float
    position_chance: float
    train_rows: np.ndarray
    test_rows: np.ndarray

    def to_pandas(self) -> pd.DataFrame:
        """One row per head: class and position accuracy, each with its chance level."""
        df = _grid_frame(
            self.layers,
            {"class_accuracy": self.class_accuracy, "position_accuracy": self.position_accuracy},
        )
        df.insert(3, "class_chance", self.class_chance)
        df["position_chance"] = self.position_chance
        return df

    def __repr__(self) -> str:
        return (
            f"HeadProbe(linear probes on head {self.site}, {len(self.train_rows)} train / "
            f"{len(self.test_rows)} test examples; chance: class {self.class_chance:.3f}, "
            f"position {self.position_chance:.3f})\n"
            + self.to_pandas().to_string(index=False, float_format=lambda v: f"{v:.4f}")
        )

    def plot(self) -> Figure:
        """Heatmaps layers x heads of class and position accuracy (``fig.axes[0]`` and
        ``fig.axes[1]``), chance levels in the titles."""
        from hookscope.plot import figure

        fig = figure(figsize=(8.4, 3.2))
        axes = fig.subplots(1, 2)
        for ax, grid, title in (
            (axes[0], self.class_accuracy, f"class accuracy (chance {self.class_chance:.2f})"),
            (
                axes[1],
                self.position_accuracy,
                f"position accuracy (chance {self.position_chance:.2f})",
            ),
        ):
            _heatmap(ax, grid.float(), title, self.layers)
        fig.tight_layout()
        return fig


def _real_positions(chunk: Inputs, n_pos: int) -> Tensor:
    """[batch, pos] bool: real (unpadded) positions."""
    if chunk.mask is None:
        return torch.ones(chunk.batch, n_pos, dtype=torch.bool)
    return chunk.mask.bool().cpu()


def _split(n: int, test_fraction: Any, seed: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(test_fraction, (float, np.floating)) or not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be a float in (0, 1); got {test_fraction!r}")
    if not is_int(seed):
        raise InputError(f"seed must be an int; got {seed!r}")
    n_test = int(round(test_fraction * n))
    if not 0 < n_test < n:
        raise InputError(f"test_fraction={test_fraction} of {n} examples leaves a part empty")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _chance(train: np.ndarray, test: np.ndarray) -> float:
    values, counts = np.unique(train, return_counts=True)
    return float((test == values[counts.argmax()]).mean())


def _rows(n: int, index: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[index] = True
    return mask


def _probe_heads(
    x: Tensor, targets: np.ndarray, train: np.ndarray, test: np.ndarray, C: float
) -> Tensor:
    """Held-out accuracy of one :class:`~hookscope.probes.LinearProbe` per head: ``x``
    ``[heads, n, d]``, rows ``train`` / ``test`` (bool [n]). The heads are solved together
    by :func:`hookscope.probes.fit_logistic` (one problem per head) on features standardised
    over the training rows, the scaling folded back into each probe as
    ``LinearProbe(standardize=True).fit`` does, so each probe is that fit's optimum."""
    from hookscope.probes import LinearProbe, fit_logistic

    x = x.to(torch.float64)
    n_heads, n = x.shape[:2]
    classes, codes = np.unique(targets[train], return_inverse=True)
    if classes.shape[0] < 2:  # one training class: every probe predicts it
        return torch.full((n_heads,), float((targets[test] == classes[0]).mean()))
    tr = torch.from_numpy(train)
    mean = x[:, tr].mean(1)
    scale = x[:, tr].std(1, correction=0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    labels = torch.zeros(n, dtype=torch.long)
    labels[tr] = torch.from_numpy(codes.astype(np.int64))
    sol = fit_logistic(
        (x - mean[:, None]) / scale[:, None],
        labels.expand(n_heads, n),
        tr.to(torch.float64).expand(n_heads, n),
        classes.shape[0],
        C=float(C),
        max_iter=PROBE_MAX_ITER,
        tol=PROBE_TOL,
        design=torch.arange(n_heads),
    )
    out = torch.empty(n_heads, dtype=torch.float64)
    for h in range(n_heads):
        coef = sol.coef[h] / scale[h]
        probe = LinearProbe.from_coef(
            coef, sol.intercept[h] - coef @ mean[h], classes, C=float(C), standardize=True
        )
        out[h] = probe.score(x[h][torch.from_numpy(test)], targets[test])
    return out


@in_eval_mode
def head_probe(
    model: Any,
    inputs: Any,
    labels: Any,
    *,
    layers: Any = None,
    site: str = "z",
    position: bool = True,
    test_fraction: float = 0.3,
    seed: int = 0,
    C: float = 1.0,
    batch_size: int = 64,
    progress: bool | None = None,
) -> HeadProbe:
    """Class and position decodability of each head's output with
    :class:`hookscope.probes.LinearProbe` (multinomial logistic, ``C``, standardised
    features), fit on a fixed split of the examples (``seed``, ``test_fraction``) and
    scored on the held-out ones.

    ``site``: ``z`` (the head's output [d_head], default) or ``result`` (after ``W_O``
    [d_model]). Class features: the output at the readout position (CLS / last real
    token); position features: the output at every real position, target the position
    index (``position=False`` skips it).
    """
    hm, valid = _attention_model(model, "head_probe")
    chosen = _pick_layers(layers, valid)
    site = _choice(site, "site", PROBE_SITES)
    batch_size = positive_int(batch_size, "batch_size")
    if not is_real(C) or not math.isfinite(C) or not C > 0:
        raise InputError(f"C must be a finite number > 0 (inverse L2 strength); got {C!r}")
    data = prepare_inputs(hm, inputs)
    y = as_labels(labels, data.batch).numpy()
    train, test = _split(data.batch, test_fraction, seed)
    names = [f"head.{layer}" if site == "z" else f"head.{layer}.result" for layer in chosen]
    at_readout: list[Tensor] = []
    everywhere: list[Tensor] = []
    real: list[Tensor] = []
    for chunk in _chunks(data, batch_size, progress, "head outputs"):
        _, cache = hm.run_with_cache(chunk.tensor, names, **chunk.kwargs())
        acts = torch.stack([cache[n] for n in names], 2).detach().to("cpu", torch.float32)
        n_pos = acts.shape[1]  # acts [b, pos, layer, head, d]
        at_readout.append(acts[torch.arange(chunk.batch), _readout(chunk, n_pos)])
        if position:
            everywhere.append(acts)
            real.append(_real_positions(chunk, n_pos))
    feats = torch.cat(at_readout)  # [n, layer, head, d]
    n_l, n_h = feats.shape[1], feats.shape[2]
    class_acc = torch.full((n_l, n_h), math.nan, dtype=torch.float64)
    pos_acc = torch.full((n_l, n_h), math.nan, dtype=torch.float64)
    pos_chance = math.nan
    if position:
        acts = torch.cat(everywhere)
        mask = torch.cat(real)
        n_pos = acts.shape[1]
        pos_ids = torch.arange(n_pos).expand(mask.shape)
        tr_m, te_m = torch.zeros_like(mask), torch.zeros_like(mask)
        tr_m[torch.from_numpy(train)] = mask[torch.from_numpy(train)]
        te_m[torch.from_numpy(test)] = mask[torch.from_numpy(test)]
        pos_chance = _chance(pos_ids[tr_m].numpy(), pos_ids[te_m].numpy())
    show = progress if progress is not None else n_l > 1
    for i in tqdm(range(n_l), desc="head probes", disable=not show):
        x = feats[:, i].transpose(0, 1)  # [head, n, d]
        class_acc[i] = _probe_heads(x, y, _rows(data.batch, train), _rows(data.batch, test), C)
        if position:
            xp = acts[:, :, i].flatten(0, 1).transpose(0, 1)  # [head, n * pos, d]
            targets = pos_ids.flatten().numpy()
            pos_acc[i] = _probe_heads(
                xp, targets, tr_m.flatten().numpy(), te_m.flatten().numpy(), C
            )
    return HeadProbe(
        layers=tuple(chosen),
        site=site,
        class_accuracy=class_acc,
        position_accuracy=pos_acc,
        class_chance=_chance(y[train], y[test]),
        position_chance=pos_chance,
        train_rows=train,
        test_rows=test,
    )
