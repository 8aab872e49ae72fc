"""Dimensionality metrics over released training checkpoints (pythia's ``stepN`` revisions).

:func:`over_checkpoints` loads one checkpoint per step through a function you give, runs the
same inputs through each, and measures every chosen site with
:mod:`hookscope.analysis.dimensionality` (one Gram eigendecomposition per site and step):

>>> import hookscope as hs
>>> res = hs.tracking.over_checkpoints(
...     lambda s: hs.zoo.load("pythia-70m", revision=f"step{s}"),
...     steps=[0, 1, 2, 4, 8, 512, 1000, 143000], inputs=tokens, cache_dir="dims-cache")
>>> res.to_pandas(); res.hashes; res.plot()

Conventions:

* **Sites.** ``sites="auto"`` is every hidden layer: ``resid_post.*`` for token models (those
  with attention heads), ``neuron.*`` (post-activation) for MLPs and CNNs. Anything
  :meth:`HookedModel.resolve` accepts works too.
* **Rows.** A site's activation becomes a ``[rows, features]`` matrix: 2-D as it is; in a
  token model ``[batch, pos, d]`` gives one row per token (with a dict input holding an
  ``attention_mask``, padded positions are left out; texts of unequal length are padded by
  the tokenizer and their pad positions count as rows, so pass equal-length texts or a dict);
  in other models one row per example with all other axes flattened (a conv layer's
  ``[B, C, H, W]`` has ``C*H*W`` features).
* **Metrics** are hookscope's: centred by default (``center=True``), energy rank at
  ``energy``, the covariance participation ratio. The results frame is the tracker's
  (``step``, ``site``, ``metric``, ``value``, ``loss``, ``grad_norm``; loss and grad_norm NaN).
* **Identity of a checkpoint is its weights**, not its revision name: EleutherAI's hub served
  wrong weights under some ``stepN`` branches (pythia issues #205, #206). Each step's
  ``state_dict`` is hashed (sha256 over the tensors' bytes in name order, with names, dtypes
  and shapes); two steps with equal hashes raise a warning naming both, and the metrics are
  computed once. The cache key is that hash plus the inputs' bytes and the settings; with
  ``cache_dir`` each key is one JSON file (format ``hookscope.over_checkpoints`` version 1,
  written atomically), and a later call whose weights hash to a cached key reads the file
  and runs no forward pass (the checkpoint is still loaded: its hash is the key).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from hookscope.analysis.dimensionality import METRICS, dimensionality_report
from hookscope.errors import InputError, format_choices, suggestion
from hookscope.model import HookedModel
from hookscope.tracking.files import results_frame
from hookscope.tracking.sites import as_rows, attention_mask, is_token_model, resolve_sites

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["over_checkpoints", "OverCheckpoints", "weights_sha256", "DEFAULT_METRICS"]

DEFAULT_METRICS = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")
CACHE_FORMAT = "hookscope.over_checkpoints"
CACHE_VERSION = 1


# --------------------------------------------------------------------------- hashing


def _tensor_bytes(t: Tensor) -> bytes:
    if t.device.type == "meta":
        raise InputError(
            "a weight is on the meta device (offloaded or not materialised); over_checkpoints "
            "hashes every weight, so load checkpoints fully (no disk offload)"
        )
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def weights_sha256(module: nn.Module) -> str:
    """sha256 of a module's ``state_dict``: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _feed(h: Any, x: Any, where: str) -> None:
    """Hash a model input canonically (tensors by dtype, shape and bytes)."""
    if isinstance(x, Tensor):
        h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
        h.update(_tensor_bytes(x))
    elif isinstance(x, np.ndarray):
        _feed(h, torch.as_tensor(x), where)
    elif isinstance(x, str):
        h.update(b"S" + x.encode("utf-8") + b"\0")
    elif isinstance(x, (bool, int, float)):
        h.update(f"N{type(x).__name__}{x!r}\0".encode())
    elif isinstance(x, Mapping):
        h.update(b"M{")
        for k in sorted(x, key=str):
            h.update(f"{k}=".encode())
            _feed(h, x[k], f"{where}[{k!r}]")
        h.update(b"}")
    elif isinstance(x, (list, tuple)):
        h.update(b"L[")
        for i, v in enumerate(x):
            _feed(h, v, f"{where}[{i}]")
        h.update(b"]")
    else:
        raise InputError(
            f"{where} is a {type(x).__name__}; over_checkpoints hashes its inputs for the cache "
            "key and takes a tensor, a numpy array, a string, a list of strings or token ids, "
            "or a dict of those (input_ids, attention_mask)"
        )


def _inputs_sha256(inputs: Any) -> str:
    h = hashlib.sha256()
    _feed(h, inputs, "inputs")
    return h.hexdigest()


# --------------------------------------------------------------------------- result


@dataclass(repr=False)
class OverCheckpoints:
    """Dimensionality metrics of each checkpoint: the results frame plus provenance.

    ``results``: long frame (``step``, ``site``, ``metric``, ``value``, ``loss``,
    ``grad_norm``). ``hashes``: ``{step: sha256 of its weights}``. ``sources``: ``{step:
    "computed" | "cache" | "same weights as step N"}``. ``settings``: sites, metrics,
    center, energy, inputs hash.
    """

    results: pd.DataFrame
    hashes: dict[int, str]
    sources: dict[int, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_pandas(self) -> pd.DataFrame:
        """The results frame."""
        return self.results

    @property
    def steps(self) -> list[int]:
        return list(self.hashes)

    @property
    def duplicates(self) -> dict[int, int]:
        """``{step: earlier step with identical weights}`` (the wrong-revision symptom)."""
        first: dict[str, int] = {}
        out = {}
        for step, h in self.hashes.items():
            if h in first:
                out[step] = first[h]
            else:
                first[h] = step
        return out

    def __repr__(self) -> str:
        steps = self.steps
        sites = [str(s) for s in pd.unique(self.results["site"])]
        kinds = pd.Series(list(self.sources.values())).map(
            lambda s: "same weights" if s.startswith("same") else s
        )
        counts = ", ".join(f"{n} {k}" for k, n in kinds.value_counts(sort=False).items())
        dup = self.duplicates
        lines = [
            f"OverCheckpoints({len(steps)} steps {steps[0]}..{steps[-1]}, {len(sites)} sites "
            f"({', '.join(sites[:4])}{', ...' if len(sites) > 4 else ''}), metrics "
            f"{', '.join(self.settings.get('metrics', ()))}, "
            f"{'centred' if self.settings.get('center') else 'uncentred'}; {counts})"
        ]
        for step, other in dup.items():
            lines.append(f"  WARNING step {step} has the same weights as step {other}")
        return "\n".join(lines)

    def plot(self, metrics: Sequence[str] | None = None) -> Figure:
        """Each metric per site over steps, one panel per metric; log x when steps span
        decades (symlog when step 0 is among them)."""
        from hookscope.plot import figure

        df = self.results
        held = list(pd.unique(df["metric"]))
        metrics = list(metrics) if metrics is not None else held
        for m in metrics:
            if m not in held:
                raise InputError(
                    f"metric {m!r} is not in these results; they hold {format_choices(held)}."
                    + suggestion(m, held)
                )
        fig = figure(figsize=(4.2 * len(metrics), 3.4))
        axes = np.atleast_1d(fig.subplots(1, len(metrics)))
        steps = np.array(sorted(set(df["step"])))
        positive = steps[steps > 0]
        log = len(positive) > 1 and positive.max() / positive.min() >= 100
        for ax, metric in zip(axes, metrics, strict=True):
            rows = df[df["metric"] == metric]
            for site in pd.unique(rows["site"]):
                s = rows[rows["site"] == site].sort_values("step")
                ax.plot(s["step"], s["value"], ".-", ms=3, label=str(site))
            if log:
                if (steps <= 0).any():
                    ax.set_xscale("symlog", linthresh=float(positive.min()))
                else:
                    ax.set_xscale("log")
            ax.set_xlabel("training step")
            ax.set_title(metric)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------- the sweep


def _checked_steps(steps: Any) -> list[int]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise InputError(f"steps must be a list of ints (training steps), got {steps!r}")
    out = []
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise InputError(f"steps must be ints (training steps); got {s!r}")
        out.append(int(s))
    if not out:
        raise InputError("steps is empty; give at least one training step")
    seen = set()
    for s in out:
        if s in seen:
            raise InputError(f"step {s} appears twice in steps; give each step once")
        seen.add(s)
    return out


def _checked_metrics(metrics: Any) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    if not metrics:
        raise InputError(f"metrics is empty; choose from {', '.join(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            raise InputError(
                f"unknown metric {m!r}; choose from {', '.join(METRICS)}."
                + suggestion(str(m), METRICS)
            )
    return metrics


def _hooked(obj: Any, step: int) -> HookedModel:
    if isinstance(obj, HookedModel):
        return obj
    if isinstance(obj, nn.Module):
        return HookedModel.wrap(obj)
    raise InputError(
        f"loader_fn({step}) returned a {type(obj).__name__}; it must return a HookedModel or a "
        "torch.nn.Module (e.g. lambda s: hs.zoo.load('pythia-70m', revision=f'step{s}'))"
    )


def _compute(
    model: HookedModel,
    inputs: Any,
    addresses: list,
    metrics: tuple[str, ...],
    center: bool,
    energy: float,
) -> dict[str, dict[str, float]]:
    _, cache = model.run_with_cache(inputs, names=addresses)
    token_model = is_token_model(model)
    mask = attention_mask(inputs)
    values: dict[str, dict[str, float]] = {}
    for address in addresses:
        site = str(address)
        report = dimensionality_report(
            as_rows(cache[address], "flatten", token_model, mask), center=center, energy=energy
        )
        values[site] = {m: float(getattr(report, m)) for m in metrics}
    return values


def _read_cache(path: Path, key: str) -> dict[str, dict[str, float]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(
            f"cache file {path} cannot be read ({err}); delete it to recompute that checkpoint"
        ) from err
    if not (
        isinstance(doc, dict)
        and doc.get("format") == CACHE_FORMAT
        and doc.get("version") == CACHE_VERSION
        and doc.get("key") == key
        and isinstance(doc.get("values"), dict)
    ):
        raise InputError(
            f"cache file {path} is not a {CACHE_FORMAT} version {CACHE_VERSION} entry for key "
            f"{key[:12]}...; delete it to recompute that checkpoint"
        )
    return {
        site: {m: math.nan if v is None else float(v) for m, v in vals.items()}
        for site, vals in doc["values"].items()
    }


def _write_cache(path: Path, key: str, weights: str, settings: dict, values: dict) -> None:
    from hookscope.store.files import atomic_write

    doc = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": key,
        "weights_sha256": weights,
        "settings": settings,
        "values": values,
    }
    data = (json.dumps(doc, indent=1) + "\n").encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def over_checkpoints(
    loader_fn: Callable[[int], Any],
    steps: Sequence[int],
    inputs: Any,
    sites: Any = "auto",
    metrics: Sequence[str] = DEFAULT_METRICS,
    center: bool = True,
    energy: float = 0.9,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> OverCheckpoints:
    """Dimensionality metrics of ``sites`` at every training step in ``steps``.

    ``loader_fn(step)`` returns the checkpoint as a HookedModel or a plain ``nn.Module``
    (wrapped with :meth:`HookedModel.wrap`); ``inputs`` go to ``run_with_cache`` unchanged
    at every step. ``metrics``: any of :data:`hookscope.analysis.dimensionality.METRICS`.
    Checkpoints are identified by the sha256 of their weights, not by the step: equal
    weights at two steps warn (naming both) and are measured once. ``cache_dir``: a folder
    of one JSON per (weights, inputs, settings) key; a cached key runs no forward pass.
    ``progress``: a tqdm bar over the steps on stderr. See the module docstring for how
    activations become ``[rows, features]``.
    """
    if not callable(loader_fn):
        raise InputError(
            f"loader_fn must be a function step -> model, got {type(loader_fn).__name__}"
        )
    steps = _checked_steps(steps)
    metrics = _checked_metrics(metrics)
    if not isinstance(center, bool):
        raise InputError(f"center must be True or False, got {center!r}")
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise InputError(f"energy must be a fraction in (0, 1], got {energy!r}")
    inputs_hash = _inputs_sha256(inputs)
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"cache_dir {folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    hashes: dict[int, str] = {}
    sources: dict[int, str] = {}
    by_key: dict[str, tuple[int, dict]] = {}
    rows: list[dict] = []
    settings: dict = {}
    with tqdm(steps, desc="checkpoints", unit="ckpt", disable=not progress) as bar:
        for step in bar:
            bar.set_postfix_str(f"step {step}")
            model = _hooked(loader_fn(step), step)
            addresses = resolve_sites(model, sites)
            weights = weights_sha256(model.model)
            hashes[step] = weights
            settings = {
                "sites": [str(a) for a in addresses],
                "metrics": list(metrics),
                "center": center,
                "energy": float(energy),
                "inputs_sha256": inputs_hash,
            }
            key = hashlib.sha256(
                json.dumps({"weights": weights, **settings}, sort_keys=True).encode()
            ).hexdigest()
            if key in by_key:
                first, values = by_key[key]
                warnings.warn(
                    f"over_checkpoints: steps {first} and {step} have identical weights (sha256 "
                    f"{weights[:12]}...): the loader returned the same checkpoint for both, the "
                    "symptom of a hub revision serving the wrong weights (pythia issues "
                    f"#205/#206); step {step} reuses step {first}'s metrics",
                    UserWarning,
                    stacklevel=2,
                )
                sources[step] = f"same weights as step {first}"
            else:
                path = folder / f"{key}.json" if folder is not None else None
                if path is not None and path.is_file():
                    values = _read_cache(path, key)
                    sources[step] = "cache"
                else:
                    values = _compute(model, inputs, addresses, metrics, center, energy)
                    sources[step] = "computed"
                    if path is not None:
                        _write_cache(path, key, weights, settings, values)
                by_key[key] = (step, values)
            del model
            for site, vals in values.items():
                for metric in metrics:
                    rows.append(
                        {"step": step, "site": site, "metric": metric, "value": vals[metric]}
                    )
    return OverCheckpoints(results_frame(rows), hashes, sources, settings)
