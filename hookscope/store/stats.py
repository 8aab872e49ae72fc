"""Streaming per-site statistics of activations, mergeable across shards and ranks.

A :class:`RunningMoments` sees an activation site's rows ``[n, dim]`` one batch at a time,
in any float dtype, and keeps in float64: the row count ``n``, the mean, the co-moment
matrix ``M2 = sum_i (x_i - mean)(x_i - mean)^T`` (or only its diagonal when
``covariance=False``), and the count, sum, co-moment, minimum and maximum of the rows' L2
norms. Two accumulators over disjoint data merge into the accumulator of their union.

Update and merge (Chan, Golub & LeVeque's pairwise formula; T. F. Chan, G. H. Golub,
R. J. LeVeque, "Updating formulae and a pairwise algorithm for computing sample variances",
Stanford report STAN-CS-79-773, 1979, and COMPSTAT 1982; the matrix form is in
P. Pebay, "Formulas for robust, one-pass parallel computation of covariances and
arbitrary-order statistical moments", Sandia report SAND2008-6212)::

    n     = n_A + n_B
    delta = mean_B - mean_A
    mean  = mean_A + delta * n_B / n
    M2    = M2_A + M2_B + delta delta^T * n_A n_B / n

A batch is first reduced to its own ``(n_B, mean_B, M2_B)`` with a two-pass centring, then
merged with the formula above. The sums therefore never hold ``sum x x^T`` of uncentred data,
so a large mean (say 1e4 with a spread of 1) costs no precision, where the textbook
``E[x x^T] - mean mean^T`` loses about ``2 log10(mean / std)`` digits to cancellation.

Conventions:

* ``covariance(ddof)`` and ``variance(ddof)`` divide ``M2`` by ``n - ddof`` (``ddof=1``, the
  unbiased sample covariance, by default, like ``np.cov``). When ``n <= ddof`` they raise
  :class:`~hookscope.errors.AnalysisError` instead of returning NaN or Inf; a single row has
  no sample covariance with ``ddof=1`` (its population covariance, ``ddof=0``, is zero).
* ``second_moment()`` is the uncentred ``E[x x^T] = M2 / n + mean mean^T`` (population, no
  ddof).
* ``norms()`` describes the L2 norms of the rows: mean, population standard deviation
  (``ddof=0``), minimum and maximum.
* State lives on the device of the first batch added (CPU when created empty or loaded);
  MPS has no float64, so batches there are reduced on the CPU.

Disk format, version 1: one safetensors file (no pickle), written atomically by :func:`save`,
that any safetensors reader opens. Each site ``S`` contributes the tensors of
:meth:`RunningMoments.state_dict` under ``"S/<field>"``:

=================  ==================  =========================================
field              dtype, shape        meaning
=================  ==================  =========================================
``n``              int64, ``[]``       rows seen
``mean``           float64, ``[dim]``  mean row
``m2``             float64, ``[d, d]`` co-moment matrix (``covariance=True`` only)
``var_sum``        float64, ``[dim]``  its diagonal (``covariance=False`` only)
``norm_sum``       float64, ``[]``     sum of row norms
``norm_m2``        float64, ``[]``     sum of squared deviations of row norms
``norm_min``       float64, ``[]``     smallest row norm (+inf when ``n == 0``)
``norm_max``       float64, ``[]``     largest row norm (-inf when ``n == 0``)
=================  ==================  =========================================

The file's metadata holds ``{"format": "hookscope.store.stats", "version": "1"}``.

>>> stats = {"resid_post.3": for_dim(768)}
>>> for batch in loader: stats["resid_post.3"].add(batch)      # doctest: +SKIP
>>> save(stats, "shard0.stats.safetensors")                     # doctest: +SKIP
>>> total = merge_all(load(p)["resid_post.3"] for p in shard_paths)  # doctest: +SKIP
>>> total.covariance()                                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hookscope.errors import AnalysisError, InputError

__all__ = [
    "COVARIANCE_MAX_DIM",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RunningMoments",
    "for_dim",
    "load",
    "merge_all",
    "save",
]

COVARIANCE_MAX_DIM = 4096
"""Largest ``dim`` for which :func:`for_dim` keeps the full covariance.

A ``[dim, dim]`` float64 co-moment matrix takes ``8 dim^2`` bytes (128 MiB at 4096) and each
batch costs ``n dim^2`` multiply-adds; above this, only the diagonal is kept."""

FORMAT_NAME = "hookscope.store.stats"
FORMAT_VERSION = "1"

_SCALAR_FIELDS = ("n", "norm_sum", "norm_m2", "norm_min", "norm_max")


class RunningMoments:
    """Mean, covariance (or variance) and row-norm statistics of a stream of ``[n, dim]`` rows.

    ``add`` a batch, ``merge`` another accumulator, ``state_dict`` / ``from_state_dict`` to
    move it; all sums are float64 and combined with Chan et al.'s pairwise update (see the
    module docstring for the formula and conventions).

    >>> m = RunningMoments(dim=4)
    >>> m.add(torch.randn(10, 4)); m.add(torch.randn(3, 4, dtype=torch.bfloat16))
    >>> m.n, m.mean.shape, m.covariance().shape
    (13, torch.Size([4]), torch.Size([4, 4]))
    """

    def __init__(self, dim: int, covariance: bool = True) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InputError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.has_covariance = bool(covariance)
        self.n: int = 0
        self.mean: Float[Tensor, " dim"] = torch.zeros(dim, dtype=torch.float64)
        shape = (dim, dim) if self.has_covariance else (dim,)
        self._m2 = torch.zeros(shape, dtype=torch.float64)
        self._norm_sum = 0.0
        self._norm_m2 = 0.0
        self._norm_min = math.inf
        self._norm_max = -math.inf

    # ------------------------------------------------------------------ accumulation

    def add(self, x: Float[Tensor, "n dim"]) -> None:
        """Add a batch of rows ``[n, dim]`` (any real dtype, upcast to float64; ``n`` may be 0)."""
        if not isinstance(x, Tensor):
            raise InputError(f"add() takes a torch.Tensor [n, {self.dim}], got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(
                f"add() takes rows [n, {self.dim}], got shape {list(x.shape)}; "
                f"flatten leading axes first: x.reshape(-1, {self.dim})"
            )
        if x.is_complex() or x.dtype == torch.bool:
            raise InputError(f"add() takes real numbers, got dtype {x.dtype}")
        n_b = x.shape[0]
        if n_b == 0:
            return
        if self.n == 0 and x.device.type != "mps":
            self._to(x.device)
        x = x.detach().to(device=self.mean.device, dtype=torch.float64)
        if not bool(torch.isfinite(x.sum())):  # one cheap reduction; NaN/Inf reach the sum
            bad = ~torch.isfinite(x)
            raise InputError(
                f"add() got {int(bad.sum())} non-finite values (NaN/Inf) in a batch of shape "
                f"{list(x.shape)}; the statistics would all become NaN"
            )
        mean_b = x.mean(dim=0)
        xc = x - mean_b
        m2_b = xc.T @ xc if self.has_covariance else (xc * xc).sum(dim=0)
        norms = torch.linalg.vector_norm(x, dim=1)
        norm_sum_b = float(norms.sum())
        norm_m2_b = float(((norms - norms.mean()) ** 2).sum())
        self._combine(
            n_b,
            mean_b,
            m2_b,
            norm_sum_b,
            norm_m2_b,
            float(norms.min()),
            float(norms.max()),
        )

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold ``other`` (over disjoint data) into this accumulator, in place; returns ``self``."""
        if not isinstance(other, RunningMoments):
            raise InputError(f"merge() takes a RunningMoments, got {type(other).__name__}")
        if other.dim != self.dim or other.has_covariance != self.has_covariance:
            raise InputError(
                "cannot merge RunningMoments with different layouts: "
                f"this one has dim={self.dim}, covariance={self.has_covariance}; "
                f"the other has dim={other.dim}, covariance={other.has_covariance}"
            )
        if other.n == 0:
            return self
        if self.n == 0:
            self._to(other.mean.device)
        dev = self.mean.device
        self._combine(
            other.n,
            other.mean.to(dev),
            other._m2.to(dev),
            other._norm_sum,
            other._norm_m2,
            other._norm_min,
            other._norm_max,
        )
        return self

    def _combine(
        self,
        n_b: int,
        mean_b: Tensor,
        m2_b: Tensor,
        norm_sum_b: float,
        norm_m2_b: float,
        norm_min_b: float,
        norm_max_b: float,
    ) -> None:
        """Chan et al.'s pairwise update of (n, mean, M2) and of the norm moments."""
        n_a = self.n
        n = n_a + n_b
        if n_a == 0:  # copy: ``other`` may be ``self`` or be mutated later
            mean, m2 = mean_b.clone(), m2_b.clone()
            norm_m2 = norm_m2_b
        else:
            delta = mean_b - self.mean
            mean = self.mean + delta * (n_b / n)
            scale = n_a * n_b / n
            cross = torch.outer(delta, delta) if self.has_covariance else delta * delta
            m2 = self._m2 + m2_b + cross * scale
            norm_delta = norm_sum_b / n_b - self._norm_sum / n_a
            norm_m2 = self._norm_m2 + norm_m2_b + norm_delta * norm_delta * scale
        self.n = n
        self.mean = mean
        self._m2 = m2
        self._norm_sum = self._norm_sum + norm_sum_b
        self._norm_m2 = norm_m2
        self._norm_min = min(self._norm_min, norm_min_b)
        self._norm_max = max(self._norm_max, norm_max_b)

    def _to(self, device: torch.device) -> None:
        self.mean = self.mean.to(device)
        self._m2 = self._m2.to(device)

    def copy(self) -> RunningMoments:
        """An independent accumulator with the same state."""
        return RunningMoments.from_state_dict(self.state_dict())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Tensor]:
        """The state as plain CPU tensors (safetensors-saveable); field table in the module doc."""
        f64 = torch.float64
        state = {
            "n": torch.tensor(self.n, dtype=torch.int64),
            "mean": self.mean.detach().cpu().clone(),
            ("m2" if self.has_covariance else "var_sum"): self._m2.detach().cpu().clone(),
            "norm_sum": torch.tensor(self._norm_sum, dtype=f64),
            "norm_m2": torch.tensor(self._norm_m2, dtype=f64),
            "norm_min": torch.tensor(self._norm_min, dtype=f64),
            "norm_max": torch.tensor(self._norm_max, dtype=f64),
        }
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> RunningMoments:
        """Rebuild an accumulator from :meth:`state_dict` output (``covariance`` from the keys)."""
        has_cov, has_diag = "m2" in state, "var_sum" in state
        if has_cov == has_diag:
            raise InputError(
                "a RunningMoments state needs exactly one of 'm2' (covariance) or 'var_sum' "
                f"(diagonal); got keys {sorted(state)}"
            )
        required = ("mean", "m2" if has_cov else "var_sum", *_SCALAR_FIELDS)
        missing = [k for k in required if k not in state]
        if missing:
            raise InputError(f"RunningMoments state is missing {missing}; got keys {sorted(state)}")
        mean = state["mean"]
        if mean.ndim != 1 or mean.shape[0] < 1:
            raise InputError(f"state 'mean' must have shape [dim], got {list(mean.shape)}")
        dim = int(mean.shape[0])
        m2 = state["m2" if has_cov else "var_sum"]
        want = [dim, dim] if has_cov else [dim]
        if list(m2.shape) != want:
            key = "m2" if has_cov else "var_sum"
            raise InputError(
                f"state '{key}' must have shape {want} for dim={dim}, got {list(m2.shape)}"
            )
        for k in _SCALAR_FIELDS:
            if state[k].numel() != 1:
                raise InputError(f"state '{k}' must be a scalar, got shape {list(state[k].shape)}")
        n = int(state["n"].item())
        if n < 0:
            raise InputError(f"state 'n' must be >= 0, got {n}")
        out = cls(dim, covariance=has_cov)
        out.n = n
        out.mean = mean.detach().to(torch.float64).clone()
        out._m2 = m2.detach().to(device=out.mean.device, dtype=torch.float64).clone()
        out._norm_sum = float(state["norm_sum"].item())
        out._norm_m2 = float(state["norm_m2"].item())
        out._norm_min = float(state["norm_min"].item())
        out._norm_max = float(state["norm_max"].item())
        return out

    # ------------------------------------------------------------------ results

    def _need_rows(self, ddof: int, what: str) -> None:
        if self.n <= ddof:
            raise AnalysisError(
                f"{what} with ddof={ddof} needs more than {ddof} rows, got n={self.n}"
                + ("; use ddof=0 for the population value" if self.n >= 1 and ddof > 0 else "")
            )

    def covariance(self, ddof: int = 1) -> Float[Tensor, "dim dim"]:
        """Covariance ``M2 / (n - ddof)`` ``[dim, dim]`` float64 (``ddof=1``: like ``np.cov``)."""
        if not self.has_covariance:
            raise InputError(
                f"this RunningMoments was built with covariance=False (dim={self.dim}), so it "
                "keeps only the diagonal; use variance() for it, or build with covariance=True"
            )
        self._need_rows(ddof, "covariance")
        return self._m2 / (self.n - ddof)

    def variance(self, ddof: int = 1) -> Float[Tensor, " dim"]:
        """Per-feature variance ``diag(M2) / (n - ddof)`` ``[dim]`` float64."""
        self._need_rows(ddof, "variance")
        diag = self._m2.diagonal() if self.has_covariance else self._m2
        return diag / (self.n - ddof)

    def second_moment(self) -> Tensor:
        """Uncentred ``E[x x^T] = M2/n + mean mean^T``: ``[dim, dim]``, or ``[dim]`` (diagonal)."""
        self._need_rows(0, "second_moment")
        if self.has_covariance:
            return self._m2 / self.n + torch.outer(self.mean, self.mean)
        return self._m2 / self.n + self.mean * self.mean

    def norms(self) -> dict[str, float]:
        """Mean, population std (``ddof=0``), min and max of the rows' L2 norms."""
        self._need_rows(0, "norms")
        return {
            "mean": self._norm_sum / self.n,
            "std": math.sqrt(max(self._norm_m2, 0.0) / self.n),
            "min": self._norm_min,
            "max": self._norm_max,
        }

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-friendly summary: ``n``, ``dim``, ``covariance`` and the norm stats."""
        return {
            "n": self.n,
            "dim": self.dim,
            "covariance": self.has_covariance,
            "norm": self.norms() if self.n > 0 else None,
        }

    def __repr__(self) -> str:
        norm = f", norm_mean={self._norm_sum / self.n:.4g}" if self.n else ""
        return f"RunningMoments(dim={self.dim}, covariance={self.has_covariance}, n={self.n}{norm})"


def for_dim(dim: int) -> RunningMoments:
    """An empty accumulator that keeps the full covariance iff ``dim <= COVARIANCE_MAX_DIM``."""
    return RunningMoments(dim, covariance=dim <= COVARIANCE_MAX_DIM)


def merge_all(items: Iterable[RunningMoments]) -> RunningMoments:
    """Merge accumulators over disjoint data by a pairwise tree; the inputs are not changed.

    The result does not depend on the order of ``items`` beyond float rounding.
    """
    level = [m.copy() if isinstance(m, RunningMoments) else m for m in items]
    if not level:
        raise InputError("merge_all() needs at least one RunningMoments, got none")
    for m in level:
        if not isinstance(m, RunningMoments):
            raise InputError(f"merge_all() takes RunningMoments, got {type(m).__name__}")
    while len(level) > 1:
        nxt = [level[i].merge(level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


# ---------------------------------------------------------------------- disk format


def save(moments: dict[str, RunningMoments], path: str | os.PathLike[str]) -> None:
    """Write ``{site: RunningMoments}`` to one safetensors file, atomically.

    The file appears complete or not at all: it is written to a temporary file in the same
    folder, flushed and fsynced, moved over ``path`` with ``os.replace``, and the folder is
    fsynced. Keys are ``"<site>/<field>"`` (format in the module docstring).
    """
    tensors: dict[str, Tensor] = {}
    for site, m in moments.items():
        if not isinstance(site, str) or not site:
            raise InputError(f"site names must be non-empty strings, got {site!r}")
        if not isinstance(m, RunningMoments):
            raise InputError(
                f"save() takes RunningMoments values, got {type(m).__name__} at {site!r}"
            )
        for field, t in m.state_dict().items():
            tensors[f"{site}/{field}"] = t.contiguous()
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT_NAME, "version": FORMAT_VERSION})
        with open(tmp, "rb+") as f:
            _sort_metadata(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if os.name != "nt":  # a folder cannot be opened for fsync on Windows
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _sort_metadata(f: Any) -> None:
    """Rewrite the ``__metadata__`` of the safetensors file open in ``f`` with sorted keys.

    safetensors writes it from a hash map whose order changes from process to process, so
    equal statistics would give different files; sorted, the same length, they give equal
    bytes (the tensors are already in a fixed order)."""
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) <= n:  # padded with spaces, as safetensors pads its header
        f.seek(8)
        f.write(text.ljust(n, b" "))


def load(path: str | os.PathLike[str]) -> dict[str, RunningMoments]:
    """Read a file written by :func:`save` back into ``{site: RunningMoments}`` (on the CPU)."""
    fields: dict[str, dict[str, Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT_NAME:
            raise InputError(
                f"{path} is not a hookscope stats file (metadata format={meta.get('format')!r}, "
                f"expected {FORMAT_NAME!r})"
            )
        if meta.get("version") != FORMAT_VERSION:
            raise InputError(
                f"{path} has stats format version {meta.get('version')!r}; this hookscope "
                f"reads version {FORMAT_VERSION}"
            )
        for key in f.keys():
            site, sep, field = key.rpartition("/")
            if not sep or not site:
                raise InputError(f"{path}: key {key!r} is not of the form '<site>/<field>'")
            fields.setdefault(site, {})[field] = f.get_tensor(key)
    return {site: RunningMoments.from_state_dict(state) for site, state in fields.items()}
