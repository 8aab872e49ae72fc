"""Minimum description length probing with the online code (Voita & Titov 2020,
"Information-Theoretic Probing with Minimum Description Length").

The labels ``y`` of ``n`` rows are transmitted given the activations ``X`` (the receiver
has all of ``X``). Rows are shuffled once (``torch.randperm(n)`` from
``torch.Generator().manual_seed(seed)``), then cut at the timesteps
``t_i = max(1, floor(portions[i] * n))`` (repeated timesteps of a small ``n`` merged):

* the first block, rows ``[0, t_1)``, is sent with the uniform code, ``t_1 log2 K`` bits;
* block ``i`` (rows ``[t_i, t_{i+1})``) is sent with a probe trained on rows ``[0, t_i)``:
  ``sum -log2 p(y_j | x_j)`` bits.

``online codelength = t_1 log2 K + sum_i sum_{j in block i} -log2 p_i(y_j | x_j)``, the
``uniform codelength`` is ``n log2 K`` and ``compression = uniform / online``, all in bits.
A representation that makes the labels easy to learn from few examples compresses more.

Conventions:

* Classification only (``K >= 2`` classes; labels of any type, encoded in sorted order).
  A float target is refused: the online code of a regression target needs a noise model
  this module does not choose for you.
* The default probe is scikit-learn's L2 logistic regression (objective
  ``C sum CE + ||W||^2 / 2``, intercept unpenalised; sigmoid for two classes, multinomial
  above) and every block's probe comes from ONE batched solve
  (:func:`hookscope.probes.solve.fit_logistic`, 0/1 sample weights marking each training
  prefix). ``probe=`` takes any scikit-learn-style classifier instead (``fit`` /
  ``predict_proba``, cloned for every block, e.g. ``LinearProbe(C=0.1)`` or an MLP as in
  the paper).
* A block whose training rows lack one of the ``K`` classes (possible only in the first,
  tiny blocks) is sent with the uniform code: a logistic probe trained without a class has no
  optimum (its intercept runs to minus infinity) and would give that class probability
  zero. The receiver sees the same labels, so this stays a valid code; ``to_pandas()`` says
  which blocks used it.
* ``standardize=True`` scales every column of ``X`` to mean 0 and variance 1 using all rows
  (allowed: the receiver knows ``X``), before the shuffle.

>>> res = mdl(X, y)                       # doctest: +SKIP
>>> res.compression, res.online_codelength  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from hookscope.errors import ProbeError
from hookscope.probes.linear import as_features, encode_labels
from hookscope.probes.solve import fit_logistic, logits

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["DEFAULT_PORTIONS", "MDLResult", "mdl", "block_bounds"]

DEFAULT_PORTIONS: tuple[float, ...] = (
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.0625,
    0.125,
    0.25,
    0.5,
    1.0,
)
"""Timesteps of Voita & Titov (2020): 0.1%, 0.2%, 0.4%, ..., 50% and 100% of the rows."""

_LN2 = math.log(2.0)


@dataclass(frozen=True)
class MDLResult:
    """Online codelength of a classification task (bits), block by block.

    Block 0 is the uniform-coded first block; block ``i`` holds rows
    ``[block_starts[i], block_starts[i] + block_sizes[i])`` of the shuffled data, sent with a
    probe trained on the ``block_starts[i]`` rows before it (``block_codes[i]`` is
    ``"probe"``) or with the uniform code (``"uniform"``).
    """

    online_codelength: float
    uniform_codelength: float
    compression: float
    block_sizes: tuple[int, ...]
    block_codelengths: tuple[float, ...]
    block_starts: tuple[int, ...]
    block_codes: tuple[str, ...]
    n_classes: int
    n_rows: int

    def to_pandas(self) -> pd.DataFrame:
        """One row per block: ``start`` (the rows before it: the training rows of its probe
        when ``code`` is ``"probe"``), ``end``, ``rows`` sent, ``code``, ``bits``,
        ``bits_per_row`` and ``cumulative_bits``."""
        import pandas as pd

        bits = np.asarray(self.block_codelengths)
        sizes = np.asarray(self.block_sizes)
        starts = np.asarray(self.block_starts)
        return pd.DataFrame(
            {
                "block": np.arange(len(sizes)),
                "start": starts,
                "end": starts + sizes,
                "rows": sizes,
                "code": list(self.block_codes),
                "bits": bits,
                "bits_per_row": bits / sizes,
                "cumulative_bits": np.cumsum(bits),
            }
        )

    def __str__(self) -> str:
        head = (
            f"MDL online code: {self.online_codelength:.1f} bits (uniform {self.uniform_codelength:.1f}"
            f" bits = {self.n_rows} rows x log2 {self.n_classes}); compression "
            f"{self.compression:.3g}x"
        )
        table = self.to_pandas().to_string(index=False, float_format=lambda x: f"{x:.4g}")
        return head + "\n" + table

    def plot(self) -> Figure:
        """Bits per row of every block against the rows its probe was trained on (left), and
        the online codelength accumulating over the rows sent beside the uniform code
        (right)."""
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        from hookscope.plot import figure

        df = self.to_pandas()
        fig = figure(figsize=(9, 3.6))
        ax, axc = fig.subplots(1, 2)
        probe = df[df["code"] == "probe"]
        ax.plot(probe["start"], probe["bits_per_row"], "o-", label="probe")
        ax.axhline(math.log2(self.n_classes), color="gray", ls=":", label="uniform")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training rows (block start)")
        ax.set_ylabel("bits per row of the block")
        ax.legend()
        ends = np.r_[0, df["end"].to_numpy()]
        ax_bits = np.r_[0.0, df["cumulative_bits"].to_numpy()]
        axc.plot(ends, ax_bits, "o-", label="online")
        axc.plot(
            [0, self.n_rows], [0, self.uniform_codelength], color="gray", ls=":", label="uniform"
        )
        axc.set_xlabel("rows sent")
        axc.set_ylabel("codelength (bits)")
        axc.set_title(f"compression {self.compression:.3g}x")
        axc.legend()
        fig.tight_layout()
        return fig


def _check_portions(portions: Any) -> tuple[float, ...]:
    if isinstance(portions, (str, bytes)) or not isinstance(portions, (Sequence, np.ndarray)):
        raise ProbeError(
            f"portions must be a sequence of fractions ending at 1.0 (default "
            f"{DEFAULT_PORTIONS}), got {type(portions).__name__}"
        )
    try:
        values = tuple(float(p) for p in portions)
    except (TypeError, ValueError) as err:
        raise ProbeError(f"portions must be numbers, got {list(portions)!r}") from err
    if len(values) < 2:
        raise ProbeError(
            f"portions needs at least two timesteps (the first block and 1.0), got {values}"
        )
    if not all(0 < p <= 1 for p in values):
        raise ProbeError(f"portions must lie in (0, 1], got {values}")
    if any(b <= a for a, b in zip(values[:-1], values[1:], strict=True)):
        raise ProbeError(f"portions must be strictly increasing, got {values}")
    if values[-1] != 1.0:
        raise ProbeError(
            f"portions must end at 1.0 (the last block ends with the last row), got {values}"
        )
    return values


def block_bounds(n: int, portions: Sequence[float] = DEFAULT_PORTIONS) -> tuple[int, ...]:
    """The timesteps ``t_1 < ... < t_S = n``: ``max(1, floor(p * n))`` for every portion
    ``p``, repeats (small ``n``) dropped."""
    values = _check_portions(portions)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ProbeError(f"MDL needs at least 2 rows, got {n!r}")
    steps = sorted({max(1, math.floor(p * n + 1e-9)) for p in values})
    return tuple(int(t) for t in steps)


def _labels(y: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    arr = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if arr.dtype.kind in "fc":
        raise ProbeError(
            f"MDL probing here is for classification, but y holds {arr.dtype} values (a "
            "regression target?). Pass class labels (integers, strings or booleans); if the "
            "floats are class codes, convert them first, e.g. y.astype(int)"
        )
    return encode_labels(arr, n)


def _log2_probs_batched(
    X: Tensor, codes: Tensor, starts: list[int], ends: list[int], k: int, C: float
) -> tuple[list[float], list[bool]]:
    """Bits of every block from one batched logistic solve (one problem per block)."""
    n = X.shape[0]
    b = len(starts)
    weights = torch.zeros(b, n, dtype=torch.float64, device=X.device)
    for i, t in enumerate(starts):
        weights[i, :t] = 1.0
    sol = fit_logistic(X, codes.expand(b, n), weights, n_classes=k, C=C)
    bits, converged = [], sol.converged.tolist()
    for i, (t, e) in enumerate(zip(starts, ends, strict=True)):
        z = logits(X[t:e], sol.coef[i : i + 1], sol.intercept[i : i + 1])[0]  # [m, K']
        y = codes[t:e]
        if k == 2:  # -log p(y) = softplus(-z) for y = 1, softplus(z) for y = 0
            z = z[:, 0]
            nats = torch.nn.functional.softplus(torch.where(y == 1, -z, z))
        else:
            nats = -torch.log_softmax(z, dim=1).gather(1, y[:, None])[:, 0]
        bits.append(float(nats.sum()) / _LN2)
    return bits, converged


def _log2_probs_estimator(
    probe: Any, X: Tensor, codes: Tensor, starts: list[int], ends: list[int], k: int
) -> list[float]:
    """Bits of every block from a clone of ``probe`` fitted on each training prefix."""
    from sklearn.base import clone

    x = X.cpu().numpy()
    y = codes.cpu().numpy()
    bits = []
    for t, e in zip(starts, ends, strict=True):
        est = clone(probe).fit(x[:t], y[:t])
        classes = np.asarray(getattr(est, "classes_", np.arange(k)))
        if classes.shape != (k,) or not np.array_equal(classes, np.arange(k)):
            raise ProbeError(
                f"probe {type(probe).__name__} was fit on class codes 0..{k - 1} but reports "
                f"classes_ {classes.tolist()}; its predict_proba columns cannot be matched"
            )
        proba = np.asarray(est.predict_proba(x[t:e]), dtype=np.float64)
        p = proba[np.arange(e - t), y[t:e]]
        if not np.all(p > 0):
            raise ProbeError(
                f"probe {type(probe).__name__} trained on {t} rows gives probability 0 to the "
                f"true class of {int(np.sum(~(p > 0)))} rows of block [{t}, {e}); their "
                "codelength is infinite. Use a probe with smoothed probabilities"
            )
        bits.append(float(-np.log2(p).sum()))
    return bits


def mdl(
    X: Float[Tensor, "n d"],
    y: Any,
    portions: Sequence[float] = DEFAULT_PORTIONS,
    C: float | None = None,
    seed: int = 0,
    standardize: bool = False,
    probe: Any = None,
) -> MDLResult:
    """Online codelength (bits) of the labels ``y [n]`` given activations ``X [n, d]``
    (see the module for the code and its conventions).

    ``C``: inverse L2 strength of the built-in logistic probe (default 1.0, as scikit-learn);
    ``probe``: a scikit-learn-style classifier to use instead (set its own hyper-parameters;
    passing ``C`` with it is an error). Example::

        res = mdl(acts, labels)            # res.compression: uniform / online
        print(res)                         # the block table
        res.plot()
    """
    x = as_features(X).to(torch.float64)
    n = x.shape[0]
    classes, codes_np = _labels(y, n)
    k = len(classes)
    bounds = block_bounds(n, portions)  # at least (1, n): two classes need two rows
    if probe is None:
        C = 1.0 if C is None else C
        if isinstance(C, bool) or not isinstance(C, (int, float)) or not C > 0:
            raise ProbeError(f"C must be a positive number, got {C!r}")
    else:
        if C is not None:
            raise ProbeError(
                "C is the built-in probe's regularisation; with probe= set it on the probe "
                f"(e.g. LinearProbe(C={C!r})) and leave C unset"
            )
        if not (hasattr(probe, "fit") and hasattr(probe, "predict_proba")):
            raise ProbeError(
                f"probe must be a classifier with fit and predict_proba (e.g. LinearProbe()), "
                f"got {type(probe).__name__}"
            )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ProbeError(f"seed must be an integer, got {seed!r}")
    if standardize:
        scale = x.std(0, correction=0)
        x = (x - x.mean(0)) / torch.where(scale > 0, scale, torch.ones_like(scale))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    x = x[order.to(x.device)]
    codes = torch.as_tensor(codes_np, dtype=torch.int64)[order].to(x.device)

    # which prefixes hold every class: the first row at which all K have appeared
    first_seen = torch.full((k,), n, dtype=torch.int64)
    first_seen.scatter_reduce_(0, codes.cpu(), torch.arange(n), reduce="amin")
    complete_at = int(first_seen.max()) + 1  # prefixes of at least this many rows
    starts = [0, *bounds[:-1]]
    ends = list(bounds)
    codes_of = ["uniform"] + ["probe" if t >= complete_at else "uniform" for t in bounds[:-1]]
    trained = [i for i, c in enumerate(codes_of) if c == "probe"]
    bits = [(e - s) * math.log2(k) for s, e in zip(starts, ends, strict=True)]
    if trained:
        t_starts = [starts[i] for i in trained]
        t_ends = [ends[i] for i in trained]
        if probe is None:
            fitted, converged = _log2_probs_batched(x, codes, t_starts, t_ends, k, float(C))
            if not all(converged):
                slow = [t_starts[j] for j, ok in enumerate(converged) if not ok]
                warnings.warn(
                    f"the logistic probes trained on {slow} rows did not converge in 1000 "
                    "L-BFGS iterations; their codelengths may be slightly too long",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            fitted = _log2_probs_estimator(probe, x, codes, t_starts, t_ends, k)
        for i, b in zip(trained, fitted, strict=True):
            bits[i] = b
    online = float(sum(bits))
    uniform = n * math.log2(k)
    return MDLResult(
        online_codelength=online,
        uniform_codelength=uniform,
        compression=uniform / online if online > 0 else math.inf,
        block_sizes=tuple(e - s for s, e in zip(starts, ends, strict=True)),
        block_codelengths=tuple(bits),
        block_starts=tuple(starts),
        block_codes=tuple(codes_of),
        n_classes=k,
        n_rows=n,
    )
