"""``probe_sweep``: one linear probe per site, with controls, seeds and statistics.

For every site (read one at a time, so memory holds one site's activations) the real task,
each control and every seed (and fold, and ``C`` of a grid) are problems of one batched solve
(:mod:`hookscope.probes.solve`). What each number means:

* ``score``: the metric on held-out rows (the test split, or out-of-fold predictions with
  ``cv``), mean over ``seeds`` (each seed draws its own split and controls; the splits are
  the same at every site, so sites compare on the same rows); ``sd`` over seeds.
* ``ci_low`` / ``ci_high``: percentile bootstrap interval of that seed-mean, over both
  sources of variation: each replicate draws the seeds with replacement, then resamples each
  drawn seed's held-out rows (the probes are not refit; predictions are reused).
* controls (see :mod:`hookscope.probes.controls`): their seed-mean scores; ``effect`` =
  score - shuffle and ``selectivity`` = score - control_task, each with a paired bootstrap
  interval (task and control resampled on the same rows).
* ``p_value``: one-sided, that the probe beats chance. ``permutation="predictions"``
  permutes seed 0's held-out labels against its fixed predictions (no refits; a valid test
  of "held-out score = chance"); ``"refit"`` retrains ``permutations`` probes on shuffled
  training labels (the Ojala & Garriga test). ``p_holm``: Holm-corrected across the sites.
* ``directions``: each site's task probe direction (unit ``coef_``), averaged over seeds and
  renormalised, in activation space.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope.errors import ProbeError, format_choices
from hookscope.probes import stats
from hookscope.probes.controls import (
    CONTROLS,
    control_task_labels,
    covariance,
    gaussian_features,
)
from hookscope.probes.linear import LinearProbe, as_features, encode_labels
from hookscope.probes.result import ProbeSweep, _json_value, _versions
from hookscope.probes.solve import (
    LinearSolution,
    fit_logistic,
    fit_ridge,
    logits,
    probabilities,
)
from hookscope.probes.splits import Split, check_sizes, check_split, rows_of, splits

__all__ = ["ProbeSweep", "probe_sweep"]

_PERMUTATION_MODES = ("predictions", "refit")
_CHUNK = 256  # problems per batched solve


# ---------------------------------------------------------------------------- sources
class _Source:
    """Sites, labels and columns from a StoredActivations or a ``{site: tensor}`` dict."""

    def __init__(self, acts: Any, name: str = "acts"):
        from hookscope.store import StoredActivations

        self.name = name
        if isinstance(acts, StoredActivations):
            self.stored = acts
            self.sites = list(acts.sites)
            self.n = acts.n_rows
        elif isinstance(acts, Mapping):
            self.stored = None
            self.tensors = {}
            for k, v in acts.items():
                t = v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v))
                if t.ndim != 2:
                    raise ProbeError(
                        f"{name}[{k!r}] must be [rows, features]; got shape {tuple(t.shape)}"
                        + (" (flatten positions into rows first)" if t.ndim > 2 else "")
                    )
                self.tensors[str(k)] = t
            if not self.tensors:
                raise ProbeError(f"{name} is an empty dict; give {{site: [rows, d] tensor}}")
            self.sites = list(self.tensors)
            sizes = {k: int(v.shape[0]) for k, v in self.tensors.items()}
            if len(set(sizes.values())) != 1:
                raise ProbeError(f"the sites of {name} have different numbers of rows: {sizes}")
            self.n = next(iter(sizes.values()))
        else:
            raise ProbeError(
                f"{name} must be a hookscope StoredActivations or a dict {{site: [rows, d] "
                f"tensor}}; got {type(acts).__name__}"
            )

    def select(self, sites: Any) -> list[str]:
        if sites is None:
            return list(self.sites)
        if isinstance(sites, str):
            patterns = [sites]
        elif isinstance(sites, (list, tuple)) and sites and all(isinstance(p, str) for p in sites):
            patterns = list(sites)
        else:
            raise ProbeError(
                f"sites must be a site name, a glob pattern or a non-empty list of them; got "
                f"{sites!r}; sites: {format_choices(self.sites)}"
            )
        picked: list[str] = []
        for p in patterns:
            hits = [s for s in self.sites if fnmatch.fnmatchcase(s, str(p))]
            if not hits:
                raise ProbeError(
                    f"no site of {self.name} matches {p!r}; sites: {format_choices(self.sites)}"
                )
            picked += [h for h in hits if h not in picked]
        return sorted(picked, key=_site_order)

    def get(self, site: str, device: Any) -> Tensor:
        if self.stored is not None:
            x = self.stored[site]
        else:
            x = self.tensors[site]
        if x.ndim != 2:  # a stored site with extra axes (e.g. conv feature maps): one row each
            x = x.reshape(x.shape[0], -1)
        return as_features(x, name=f"{self.name}[{site!r}]", device=device).to(torch.float64)

    def column(self, value: Any, what: str) -> np.ndarray:
        """A label or type column: a name (a dataset or index column of the store) or an
        array aligned with the rows."""
        if isinstance(value, str):
            if self.stored is None:
                raise ProbeError(
                    f"{what}={value!r} names a column, but {self.name} is a dict of tensors; "
                    f"pass the {what} as an array with one value per row"
                )
            columns = list(self.stored.columns.columns)
            if value in columns:
                return self.stored.column(value)
            index = self.stored.index
            if value in index.columns:
                return index[value].to_numpy()
            raise ProbeError(
                f"{what}={value!r} is not a column of the store entry; columns: "
                f"{format_choices(columns + list(index.columns))}"
            )
        arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        if arr.ndim != 1 or arr.shape[0] != self.n:
            raise ProbeError(
                f"{what} has {arr.shape[0] if arr.ndim else 0} values but {self.name} has "
                f"{self.n} rows; they must align"
            )
        return arr


def _site_order(site: str) -> tuple:
    parts = re.split(r"(\d+)", site)
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _layer_of(site: str) -> float:
    m = re.search(r"\.(\d+)", site)
    return float(m.group(1)) if m else math.nan


# ---------------------------------------------------------------------------- problems
@dataclass
class _Problem:
    kind: str  # "task", a control, or "permutation"
    seed: int
    fold: int
    c_index: int
    labels: np.ndarray  # codes (classification) or targets, [n]
    train: np.ndarray  # bool [n]


@dataclass
class _Fitted:
    """Held-out predictions of one (kind, seed), after choosing C on the validation rows."""

    pred: Tensor  # [m, K] probabilities or [m] values on the held-out rows
    rows: np.ndarray  # the held-out row numbers
    target: np.ndarray  # what the held-out rows are scored against (control labels for
    # control_task; the task's own labels otherwise: shuffles permute training rows only)
    directions: list[Tensor] = field(default_factory=list)
    C: float = math.nan


def _solve(
    X: Tensor,
    problems: list[_Problem],
    task: str,
    n_classes: int,
    grid: list[float],
    alpha: float,
    standardize: bool,
    max_iter: int,
    tol: float,
    design: list[int] | None = None,
    gram: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Coefficients ``[B, K', d]`` and intercepts ``[B, K']`` of every problem, on raw ``X``
    (``[n, d]``, or a stack ``[G, n, d]`` with problem ``b`` reading ``X[design[b]]``)."""
    x = X
    if standardize:
        mean, scale = X.mean(-2, keepdim=True), X.std(-2, correction=0, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = (X - mean) / scale
    coefs, intercepts = [], []
    for start in range(0, len(problems), _CHUNK):
        chunk = problems[start : start + _CHUNK]
        weights = torch.as_tensor(
            np.stack([p.train for p in chunk]), dtype=torch.float64, device=X.device
        )
        which = None if design is None else torch.tensor(design[start : start + _CHUNK])
        if task == "classification":
            labels = torch.as_tensor(np.stack([p.labels for p in chunk]), device=X.device)
            C = torch.tensor([grid[p.c_index] for p in chunk], dtype=torch.float64)
            sol = fit_logistic(
                x, labels, weights, n_classes, C.to(X.device), True, max_iter, tol,
                design=None if which is None else which.to(X.device),
                gram=None if standardize else gram,  # a hint about raw X only
            )  # fmt: skip
        else:
            targets = torch.as_tensor(
                np.stack([p.labels for p in chunk]), dtype=torch.float64, device=X.device
            )
            sol = _ridge(x, targets, weights, alpha, which)
        if not bool(sol.converged.all()):
            from sklearn.exceptions import ConvergenceWarning

            lagging = int((~sol.converged).sum())
            warnings.warn(
                f"{lagging} of {len(chunk)} probes did not reach tol={tol} in max_iter={max_iter} "
                "iterations; raise max_iter or pass standardize=True",
                ConvergenceWarning,
                stacklevel=3,
            )
        coefs.append(sol.coef)
        intercepts.append(sol.intercept)
    coef, intercept = torch.cat(coefs), torch.cat(intercepts)
    if standardize:
        if design is not None:  # each problem's own design's statistics
            idx = torch.tensor(design, device=X.device)
            mean, scale = mean[idx], scale[idx]  # [B, 1, d]
        coef = coef / scale
        intercept = intercept - (coef @ mean.transpose(-1, -2))[..., 0]
    return coef, intercept


def _ridge(
    X: Tensor, targets: Tensor, weights: Tensor, alpha: float, design: Tensor | None
) -> LinearSolution:
    """:func:`fit_ridge` of every problem on its own design (one call per design)."""
    if design is None:
        return fit_ridge(X, targets, weights, alpha, True)
    b = targets.shape[0]
    coef = torch.empty(b, 1, X.shape[-1], dtype=torch.float64, device=X.device)
    intercept = torch.empty(b, 1, dtype=torch.float64, device=X.device)
    loss = torch.empty(b, dtype=torch.float64, device=X.device)
    for g in torch.unique(design).tolist():
        sel = torch.nonzero(design == g).flatten().to(X.device)
        sol = fit_ridge(X[g], targets[sel], weights[sel], alpha, True)
        coef[sel], intercept[sel], loss[sel] = sol.coef, sol.intercept, sol.loss
    return LinearSolution(
        coef, intercept, loss, 1, torch.ones(b, dtype=torch.bool, device=X.device)
    )


def _predict(X: Tensor, coef: Tensor, intercept: Tensor, rows: np.ndarray, task: str) -> Tensor:
    x = X[torch.as_tensor(rows, device=X.device)]
    if task == "classification":
        return probabilities(x, coef[None], intercept[None])[0]
    return logits(x, coef[None], intercept[None])[0, :, 0]


# ---------------------------------------------------------------------------- the sweep
def probe_sweep(
    acts: Any,
    label: Any,
    sites: Any = None,
    *,
    task: str | None = None,
    split: dict | None = None,
    cv: int | None = None,
    controls: Sequence[str] | None = None,
    control_task_key: Any = None,
    random_init: Any = None,
    seeds: int = 5,
    bootstrap: int = 1000,
    permutations: int = 1000,
    permutation: str = "predictions",
    metric: str | None = None,
    C: float | Sequence[float] = 1.0,
    alpha: float = 1.0,
    standardize: bool = False,
    confidence: float = 0.95,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-7,
    device: Any = None,
    progress: bool | None = None,
) -> ProbeSweep:
    """Probe every site of ``acts`` for ``label``, with controls and statistics.

    ``acts``: a :class:`~hookscope.store.StoredActivations` (sites read one at a time) or a
    dict ``{site: [rows, d] tensor}``. ``label`` and ``control_task_key``: column names of
    the store entry (dataset columns, or ``token``/``position``/``example`` of its index) or
    arrays with one value per row. ``sites``: names or glob patterns (``"resid_post.*"``).

    ``task``: "classification" (default for integer, string or boolean labels) or
    "regression" (default for float labels); ``metric``: accuracy (default), f1, auroc for
    classification, r2 (default) for regression. ``split`` (default train 0.8 / test 0.2,
    or 0.6 / 0.2 / 0.2 with a grid of ``C``, chosen on ``val``) or ``cv`` folds.
    ``controls``: any of shuffle, random_features, control_task (needs
    ``control_task_key``), random_init (needs ``random_init=``, activations of the same
    sites and rows from :func:`hookscope.probes.random_init`'s model); default shuffle and
    random_features, plus control_task when a key is given. ``seeds`` splits and control
    draws; ``bootstrap`` resamples; ``permutations`` for the p-value (``permutation``:
    "predictions" or "refit"). See the module docstring for every column of the result.

    >>> sweep = probes.probe_sweep(acts, "label", "resid_post.*", control_task_key="token")  # doctest: +SKIP
    >>> sweep.to_pandas(); print(sweep); sweep.plot(); sweep.directions                    # doctest: +SKIP
    """
    source = _Source(acts)
    names = source.select(sites)
    # ---- check every argument before reading activations
    controls = _check_controls(controls, control_task_key, random_init)
    if permutation not in _PERMUTATION_MODES:
        raise ProbeError(f"permutation must be one of {_PERMUTATION_MODES}; got {permutation!r}")
    for name, value, low in (
        ("seeds", seeds, 1),
        ("bootstrap", bootstrap, 1),
        ("permutations", permutations, 1),
        ("max_iter", max_iter, 1),
        ("seed", seed, 0),
    ):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ProbeError(f"{name} must be an integer >= {low}; got {value!r}")
    for name, value in (("confidence", confidence), ("alpha", alpha), ("tol", tol)):
        if not _positive(value) or (name == "confidence" and not value < 1):
            bounds = "in (0, 1)" if name == "confidence" else "a positive number"
            raise ProbeError(f"{name} must be {bounds}; got {value!r}")
    values = list(C) if isinstance(C, (Sequence, np.ndarray)) and not isinstance(C, str) else [C]
    if not values or not all(_positive(c) for c in values):
        raise ProbeError(f"C must be a positive number or a list of them; got {C!r}")
    grid = [float(c) for c in values]
    if permutation == "refit" and len(grid) > 1:
        raise ProbeError(
            "permutation='refit' with a grid of C would need the grid refit per permutation; "
            "use one C, or permutation='predictions'"
        )
    raw = source.column(label, "label")
    task = _infer_task(raw, task)
    metric = stats.check_metric(metric or ("accuracy" if task == "classification" else "r2"), task)
    if task == "classification":
        classes, codes = encode_labels(raw, source.n, "label")
        y_all: np.ndarray = codes.astype(np.int64)
        strata = y_all
    else:
        classes = None
        if raw.dtype.kind not in "biuf":
            raise ProbeError(
                f"task='regression' needs numeric labels; label holds {raw.dtype} values (use "
                "task='classification' for categories)"
            )
        y_all = raw.astype(np.float64)
        if not np.isfinite(y_all).all():
            raise ProbeError("label has NaN or infinite regression targets")
        strata = np.zeros(source.n, dtype=np.int64)
    if task == "regression" and len(grid) > 1:
        raise ProbeError("a grid of C is for classification; ridge probes take one alpha")
    split, cv = check_split(split, cv, len(grid) > 1)
    check_sizes(strata, split, cv, task)
    types = (
        source.column(control_task_key, "control_task_key") if "control_task" in controls else None
    )
    rand_source = None
    if "random_init" in controls:
        rand_source = _Source(random_init, "random_init")
        if rand_source.n != source.n:
            raise ProbeError(
                f"random_init has {rand_source.n} rows but acts has {source.n}; extract the "
                "untrained model on the same dataset and positions"
            )
        missing = [s for s in names if s not in rand_source.sites]
        if missing:
            raise ProbeError(
                f"random_init lacks the sites {missing}; it has {format_choices(rand_source.sites)}"
            )
    n_classes = len(classes) if classes is not None else 1
    plan = splits(strata, split, cv, seeds, seed)
    config = {
        "sites": names,
        "label": label if isinstance(label, str) else "<array>",
        "task": task,
        "metric": metric,
        "split": split,
        "cv": cv,
        "controls": list(controls),
        "control_task_key": control_task_key
        if isinstance(control_task_key, str)
        else (None if control_task_key is None else "<array>"),
        "seeds": seeds,
        "seed": seed,
        "bootstrap": bootstrap,
        "permutations": permutations,
        "permutation": permutation,
        "C": grid if len(grid) > 1 else grid[0],
        "alpha": alpha,
        "standardize": standardize,
        "confidence": confidence,
        "n_rows": source.n,
        "classes": None if classes is None else [_json_value(c) for c in classes],
        "versions": _versions(),
    }
    # ---- per seed, the labels of every problem (the same at every site)
    shared = _problems(y_all, types, plan, controls, grid, permutations, permutation, seed, task)
    from tqdm.auto import tqdm

    show = progress if progress is not None else len(names) > 1
    # the bootstrap's Poisson(1) count of every row in every replicate, drawn once: the sites
    # share their rows, so one draw serves all of them (and pairs them)
    gen = torch.Generator().manual_seed(int(seed) * 104729 + 3)
    row_counts = torch.empty(bootstrap, len(y_all), dtype=torch.uint8)
    step = max(1, (1 << 23) // max(len(y_all), 1))
    for start in range(0, bootstrap, step):
        size = min(step, bootstrap - start)
        ones = torch.ones(size, len(y_all), dtype=torch.float32)
        row_counts[start : start + size] = torch.poisson(ones, generator=gen).clamp_max_(255)
    rows, directions, fitted_probes = [], {}, {}
    for site in tqdm(names, desc="probing sites", disable=not show):
        X = source.get(site, device)

        def fit(x: Tensor, **kind: Any) -> dict[tuple[str, int], _Fitted]:
            return _fit_kind(
                x, shared, plan, task, n_classes, grid, alpha, standardize, max_iter, tol, **kind
            )

        fits = fit(X, exclude=("random_features", "random_init"))
        if "random_features" in controls:
            # a fresh Gaussian draw per seed, stacked [seeds, n, d]: seed s's problems read
            # draw s only, and all seeds are one batched solve; in the covariance's
            # eigenbasis (rotate=False: the same scores, no rotation of every row)
            gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
            cov = covariance(X)
            Xr = gaussian_features(X, gen, draws=seeds, cov=cov, rotate=False)
            gram = torch.diag(torch.linalg.eigvalsh(cov).clamp_min(0))
            Xr = Xr.reshape(seeds, *X.shape)
            fits.update(fit(Xr, only="random_features", relabel="task", stacked=True, gram=gram))
            del Xr
        if "random_init" in controls:
            Xi = rand_source.get(site, device)
            fits.update(fit(Xi, only="random_init", relabel="task"))
            del Xi
        row, direction, probe = _summarise(
            site,
            fits,
            y_all,
            plan,
            controls,
            metric,
            task,
            bootstrap,
            permutations,
            permutation,
            confidence,
            seed,
            classes,
            X.shape[1],
            grid,
            row_counts,
        )
        rows.append(row)
        directions[site] = direction
        fitted_probes[site] = probe
        del X
    p = torch.tensor([r["p_value"] for r in rows], dtype=torch.float64)
    for r, adj in zip(rows, stats.holm(p).tolist(), strict=True):
        r["p_holm"] = adj
    split_rows = [rows_of(part) for part in plan]
    return ProbeSweep(
        metric, task, tuple(controls), rows, directions, fitted_probes, config, split_rows
    )


def _positive(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0


def _check_controls(controls: Any, key: Any, random_init: Any) -> tuple[str, ...]:
    if controls is None:
        chosen = ["shuffle", "random_features"] + (["control_task"] if key is not None else [])
        if random_init is not None:
            chosen.append("random_init")
        return tuple(chosen)
    chosen = [controls] if isinstance(controls, str) else list(controls)
    bad = [c for c in chosen if c not in CONTROLS]
    if bad:
        raise ProbeError(f"unknown controls {bad}; choose from {format_choices(CONTROLS)}")
    if "control_task" in chosen and key is None:
        raise ProbeError(
            "the control_task control needs control_task_key= (the type column, e.g. 'token', "
            "whose values each get one random label)"
        )
    if "random_init" in chosen and random_init is None:
        raise ProbeError(
            "the random_init control needs random_init= (the same sites extracted from "
            "hookscope.probes.random_init(model) on the same dataset)"
        )
    return tuple(dict.fromkeys(chosen))


def _infer_task(raw: np.ndarray, task: str | None) -> str:
    if task is not None:
        if task not in ("classification", "regression"):
            raise ProbeError(f"task must be 'classification' or 'regression'; got {task!r}")
        return task
    return "regression" if raw.dtype.kind == "f" else "classification"


def _problems(
    y: np.ndarray,
    types: np.ndarray | None,
    plan: list[Split],
    controls: tuple[str, ...],
    grid: list[float],
    permutations: int,
    permutation: str,
    base: int,
    task: str,
) -> list[_Problem]:
    out = []
    for s, part in enumerate(plan):
        rng = np.random.default_rng([base, s, 1])
        control = (
            control_task_labels(types, y, int(rng.integers(2**31))) if types is not None else None
        )
        for f, train in enumerate(part.train):
            for ci in range(len(grid)):
                out.append(_Problem("task", s, f, ci, y, train))
                if "shuffle" in controls:
                    shuffled = y.copy()
                    idx = np.flatnonzero(train)
                    shuffled[idx] = y[rng.permutation(idx)]
                    out.append(_Problem("shuffle", s, f, ci, shuffled, train))
                if control is not None:
                    out.append(_Problem("control_task", s, f, ci, control, train))
    if permutation == "refit":
        rng = np.random.default_rng([base, 2])
        part = plan[0]
        for r in range(permutations):
            for f, train in enumerate(part.train):
                shuffled = y.copy()
                idx = np.flatnonzero(train)
                shuffled[idx] = y[rng.permutation(idx)]
                out.append(_Problem(f"permutation{r}", 0, f, 0, shuffled, train))
    return out


def _fit_kind(
    X: Tensor,
    shared: list[_Problem],
    plan: list[Split],
    task: str,
    n_classes: int,
    grid: list[float],
    alpha: float,
    standardize: bool,
    max_iter: int,
    tol: float,
    exclude: tuple = (),
    only: str | None = None,
    relabel: str | None = None,
    stacked: bool = False,
    gram: Tensor | None = None,
) -> dict[tuple[str, int], _Fitted]:
    """Fit the problems (all but ``exclude``; or the ``relabel`` problems under the name
    ``only``) on ``X``; choose C on validation rows; return held-out predictions per
    (kind, seed). With ``stacked``, ``X`` is ``[seeds, n, d]`` and seed ``s``'s problems
    train and predict on ``X[s]`` only. ``gram``: the rows' covariance, when known (a speed
    hint to :func:`fit_logistic`)."""
    if only is not None:
        problems = [
            _Problem(only, p.seed, p.fold, p.c_index, p.labels, p.train)
            for p in shared
            if p.kind == relabel
        ]
    else:
        problems = [p for p in shared if p.kind not in exclude]
    design = [p.seed for p in problems] if stacked else None
    coef, intercept = _solve(
        X, problems, task, n_classes, grid, alpha, standardize, max_iter, tol, design, gram
    )
    groups: dict[tuple[str, int, int], list[int]] = {}
    for b, p in enumerate(problems):
        groups.setdefault((p.kind, p.seed, p.fold), []).append(b)
    out: dict[tuple[str, int], _Fitted] = {}
    for (kind, s, f), members in groups.items():
        part = plan[s]
        b = members[0]
        if len(members) > 1:  # a grid of C: pick on the validation rows by the likelihood
            val_rows = np.flatnonzero(part.val[f])
            b = max(
                members,
                key=lambda m: _val_score(
                    X[s] if stacked else X,
                    coef[m],
                    intercept[m],
                    val_rows,
                    problems[m].labels[val_rows],
                    task,
                ),
            )
        rows = np.flatnonzero(part.test[f])
        pred = _predict(X[s] if stacked else X, coef[b], intercept[b], rows, task)
        empty = _Fitted(pred.new_empty((0, *pred.shape[1:])), rows[:0], problems[b].labels[:0])
        fitted = out.setdefault((kind, s), empty)
        fitted.pred = torch.cat([fitted.pred, pred])
        fitted.rows = np.concatenate([fitted.rows, rows])
        fitted.target = np.concatenate([fitted.target, problems[b].labels[rows]])
        c = coef[b]
        fitted.directions.append(c / c.norm(dim=1, keepdim=True).clamp_min(1e-300))
        fitted.C = grid[problems[b].c_index]
        if (kind, s) == ("task", 0) and f == 0:
            fitted.coef, fitted.intercept = coef[b], intercept[b]  # type: ignore[attr-defined]
    return out


def _val_score(
    X: Tensor, coef: Tensor, intercept: Tensor, rows: np.ndarray, y: np.ndarray, task: str
) -> float:
    p = _predict(X, coef, intercept, rows, task)
    picked = p[torch.arange(len(rows)), torch.as_tensor(y, device=p.device)]
    return float(torch.log(picked.clamp_min(1e-300)).mean())


def _summarise(
    site: str,
    fits: dict,
    y: np.ndarray,
    plan: list[Split],
    controls: tuple[str, ...],
    metric: str,
    task: str,
    n_boot: int,
    permutations: int,
    permutation: str,
    confidence: float,
    base: int,
    classes: Any,
    d: int,
    grid: list[float],
    row_counts: Tensor,
) -> tuple[dict, Tensor, LinearProbe]:
    seeds = len(plan)
    gen = torch.Generator().manual_seed(int(base) * 104729 + 5)
    kinds = ["task", *controls]
    per_seed: dict[str, list[float]] = {k: [] for k in kinds}
    n_rows = len(y)
    for s in range(seeds):
        for k in kinds:
            fit = fits[(k, s)]
            ys, pred = torch.as_tensor(fit.target), fit.pred.cpu()
            per_seed[k].append(float(stats.metric_values(metric, ys, pred)[0]))
    # two-level bootstrap of the seed mean. Rows: every replicate draws one Poisson(1) count
    # per row of the data set, shared by all seeds (their held-out rows overlap) and by the
    # task and its controls (paired differences). Seeds: every replicate draws the seeds with
    # replacement. With one seed it is the plain (Poisson) row bootstrap.
    table = {k: torch.empty(seeds, n_boot, dtype=torch.float64) for k in kinds}
    chunk = max(1, (1 << 23) // max(n_rows, 1))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        counts = row_counts[start : start + size]
        for s in range(seeds):
            rows, w = None, None
            for k in kinds:
                fit = fits[(k, s)]
                if rows is None or not np.array_equal(rows, fit.rows):  # a seed's kinds share
                    rows = fit.rows
                    w = counts[:, torch.as_tensor(rows)].to(torch.float64)
                table[k][s, start : start + size] = stats.weighted_values(
                    metric, torch.as_tensor(fit.target), fit.pred.cpu(), w
                )
    pick = torch.randint(0, seeds, (n_boot, seeds), generator=gen) if seeds > 1 else None
    reps = {}
    for k in kinds:
        reps[k] = table[k][0] if pick is None else table[k].gather(0, pick.T).mean(0)
    alpha = (1 - confidence) / 2
    row: dict[str, Any] = {"site": site, "layer": _layer_of(site), "metric": metric}
    score, sd = stats.mean_sd(per_seed["task"])
    lo, hi = _quantiles(reps["task"], alpha)
    row.update(score=score, sd=sd, ci_low=lo, ci_high=hi)
    for c in controls:
        row[c], row[c + "_sd"] = stats.mean_sd(per_seed[c])
        lo, hi = _quantiles(reps[c], alpha)
        row[c + "_ci_low"], row[c + "_ci_high"] = lo, hi
    if "shuffle" in controls:
        row["effect"] = score - row["shuffle"]
        row["effect_ci_low"], row["effect_ci_high"] = _quantiles(
            reps["task"] - reps["shuffle"], alpha
        )
    if "control_task" in controls:
        row["selectivity"] = score - row["control_task"]
        row["selectivity_ci_low"], row["selectivity_ci_high"] = _quantiles(
            reps["task"] - reps["control_task"], alpha
        )
    # ---- p-value on seed 0
    first = fits[("task", 0)]
    y0 = torch.as_tensor(first.target)
    if permutation == "predictions":
        p = stats.permutation_pvalue(metric, y0, first.pred.cpu(), permutations, seed=base)
    else:
        observed = per_seed["task"][0]
        null = [
            float(stats.metric_values(metric, y0, fits[(f"permutation{r}", 0)].pred.cpu())[0])
            for r in range(permutations)
        ]
        p = (1 + sum(v >= observed - 1e-12 for v in null)) / (1 + permutations)
    row["p_value"] = p
    row["n_train"] = (
        int(plan[0].train[0].sum())
        if len(plan[0].train) == 1
        else int(np.mean([t.sum() for t in plan[0].train]))
    )
    row["n_test"] = len(first.rows)
    row["seeds"] = seeds
    row["C"] = fits[("task", 0)].C  # seed 0's (with a grid, each seed picks its own)
    # ---- direction: mean of the seeds' unit directions (fold 0 of each), renormalised
    units = torch.stack([fits[("task", s)].directions[0] for s in range(seeds)]).mean(0)
    units = units / units.norm(dim=1, keepdim=True).clamp_min(1e-300)
    direction = units[0] if units.shape[0] == 1 else units
    params = {"task": task, "C": row["C"]} if task == "classification" else {"task": task}
    probe = LinearProbe.from_coef(first.coef, first.intercept, classes, **params)
    return row, direction, probe


def _quantiles(replicates: Tensor, alpha: float) -> tuple[float, float]:
    r = replicates[torch.isfinite(replicates)]
    if r.numel() == 0:
        return math.nan, math.nan
    q = torch.quantile(r, torch.tensor([alpha, 1 - alpha], dtype=r.dtype))
    return float(q[0]), float(q[1])
