"""Linear concept erasure (LEACE, INLP) and the amnesic check.

>>> eraser = erase(X, y, method="leace")            # X [n, d] activations, y [n] labels
>>> eraser(x)                                       # x [..., d]: same shape, dtype, device
>>> model.run_with_hooks(tokens, hooks=[("resid_post.3", eraser.hook)])
>>> amnesic(model, tokens, "resid_post.3", eraser, metric=lambda logits: ...)

Every eraser is one affine map written with two thin factors, ``L [d, r]`` and ``R [r, d]``::

    r(x) = x - L R (x - b)        (b = 0 for the linear erasers)

so ``projection = I - L R`` is the linear part (``r(x) = b + projection (x - b)``), ``rank``
is ``r``, and applying it to a batch costs two thin matrix products. The methods:

* ``"leace"`` -- LEACE (Belrose et al. 2023), the least-squares affine eraser after which no
  linear function of ``x`` is correlated with the concept (see :func:`leace_factors`).
* ``"inlp"`` -- Iterative Nullspace Projection (Ravfogel et al. 2020): fit a linear
  classifier, project its directions out, repeat (see :func:`erase`).
* ``"directions"`` / ``"random"`` -- the orthogonal projection removing given directions
  (:meth:`Eraser.from_directions`) or ``rank`` seeded random ones (:meth:`Eraser.random`, the
  control of the amnesic check).

The amnesic check (Elazar et al. 2021, "Amnesic Probing") compares a model's behaviour with
the concept erased at one site against the same model with as many random directions
removed there (:func:`amnesic`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from hookscope.errors import ProbeError, format_choices, suggestion
from hookscope.probes.linear import LinearProbe, as_features, encode_labels
from hookscope.store.stats import RunningMoments

__all__ = [
    "METHODS",
    "Eraser",
    "LeaceFitter",
    "erase",
    "leace_factors",
    "amnesic",
    "AmnesicResult",
]

METHODS = ("leace", "inlp")
"""The ``method`` names :func:`erase` accepts."""

_OPTIONS = {
    "leace": ("eig_rtol", "svd_rtol"),
    "inlp": ("n_iter", "tol", "val_fraction", "C", "max_iter", "seed"),
}
_SVD_RTOL = 1e-8  # singular values of W Sigma_xz below this fraction of the largest are zero
_DIRECTION_ATOL = 1e-8  # a unit direction whose part outside the removed span is below this


# --------------------------------------------------------------------------- the eraser


@dataclass(frozen=True, eq=False)
class Eraser:
    """The affine eraser ``r(x) = x - left @ right @ (x - bias)`` (``bias`` None: no shift).

    ``left [d, r]``, ``right [r, d]`` and ``bias [d]`` are float64. Call it on activations
    ``[..., d]`` (any float dtype and device: computed in float64 for float64 input and in
    float32 otherwise, returned in the input's dtype); pass :meth:`hook` to hookscope's
    ``run_with_hooks``. ``accuracies`` (INLP) holds the held-out accuracy of the probe of each
    iteration, fitted before that iteration's directions were removed, and ``chance`` the
    majority-class rate of the held-out rows; both are empty / None for other methods.
    """

    left: Float[Tensor, "d r"]
    right: Float[Tensor, "r d"]
    bias: Float[Tensor, " d"] | None
    method: str
    accuracies: tuple[float, ...] = ()
    chance: float | None = None
    _cast: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        left, right = self.left, self.right
        if left.ndim != 2 or right.ndim != 2 or left.shape[::-1] != right.shape:
            raise ProbeError(
                f"an Eraser needs left [d, r] and right [r, d]; got {tuple(left.shape)} and "
                f"{tuple(right.shape)}"
            )
        if self.bias is not None and self.bias.shape != (left.shape[0],):
            raise ProbeError(
                f"the eraser's bias must have shape [{left.shape[0]}], got {tuple(self.bias.shape)}"
            )

    @property
    def d(self) -> int:
        """Width of the activations it erases."""
        return int(self.left.shape[0])

    @property
    def rank(self) -> int:
        """Number of dimensions removed (the rank of ``I - projection``)."""
        return int(self.right.shape[0])

    @property
    def projection(self) -> Float[Tensor, "d d"]:
        """The linear part ``I - left @ right`` (orthogonal for INLP, oblique for LEACE)."""
        eye = torch.eye(self.d, dtype=self.left.dtype, device=self.left.device)
        return eye - self.left @ self.right

    def _factors(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
        key = (device, dtype)
        found = self._cast.get(key)
        if found is None:
            bias = self.bias.to(device, dtype) if self.bias is not None else None
            found = (self.left.to(device, dtype), self.right.to(device, dtype), bias)
            self._cast[key] = found
        return found

    def __call__(self, x: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch d"]:
        """Erase ``x [..., d]``; the result has ``x``'s shape, dtype and device."""
        return self._apply(x, "the input")

    def _apply(self, x: Tensor, what: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise ProbeError(
                f"an Eraser takes a torch.Tensor [..., {self.d}], got {type(x).__name__}"
            )
        if not x.is_floating_point():
            raise ProbeError(f"an Eraser takes floating activations, got {what} of dtype {x.dtype}")
        if x.ndim == 0 or x.shape[-1] != self.d:
            raise ProbeError(
                f"this {self.method} eraser was fitted on width d={self.d}, but {what} has shape "
                f"{tuple(x.shape)} (last dim {x.shape[-1] if x.ndim else 'none'}); apply it at a "
                f"site of width {self.d}"
            )
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        left, right, bias = self._factors(x.device, dtype)
        xc = x.to(dtype)
        delta = xc - bias if bias is not None else xc
        return (xc - (delta @ right.T) @ left.T).to(x.dtype)

    def hook(self, activation: Float[Tensor, "*batch d"], address: Any) -> Tensor:
        """A hookscope hook, ``fn(activation, address) -> erased activation``:
        ``model.run_with_hooks(tokens, hooks=[("resid_post.3", eraser.hook)])``."""
        return self._apply(activation, f"the activation at {address}")

    def to(self, device: str | torch.device) -> Eraser:
        """A copy with its float64 factors on ``device`` (calls on other devices copy them)."""
        bias = self.bias.to(device) if self.bias is not None else None
        return Eraser(
            self.left.to(device),
            self.right.to(device),
            bias,
            self.method,
            self.accuracies,
            self.chance,
        )

    @classmethod
    def from_directions(
        cls,
        directions: Float[Tensor, "k d"] | Float[Tensor, " d"],
        bias: Float[Tensor, " d"] | None = None,
        method: str = "directions",
    ) -> Eraser:
        """The orthogonal projection removing the span of ``directions`` (rows, any norm):
        ``r(x) = x - Q^T Q (x - bias)`` with ``Q`` an orthonormal basis of that span (its rank
        from an SVD: singular values below ``1e-8`` of the largest are dropped)."""
        dirs = _finite(_real_matrix(directions, "directions", allow_vector=True), "directions")
        if dirs.shape[0] == 0 or not bool(dirs.abs().amax() > 0):
            raise ProbeError(
                f"directions must hold at least one non-zero row, got shape {tuple(dirs.shape)}"
            )
        _, s, vh = torch.linalg.svd(dirs, full_matrices=False)
        q = vh[s > s[0] * _SVD_RTOL]
        if bias is not None:
            bias = _real_matrix(bias[None], "bias")[0].to(q.device)
        return cls(q.T.contiguous(), q, bias, method)

    @classmethod
    def random(
        cls,
        d: int,
        rank: int,
        seed: int = 0,
        bias: Float[Tensor, " d"] | None = None,
        device: str | torch.device | None = None,
    ) -> Eraser:
        """The orthogonal projection removing ``rank`` directions drawn uniformly at random
        (an orthonormal basis of a Gaussian ``[rank, d]`` matrix, CPU generator seeded with
        ``seed``), about ``bias`` when given (``r(x) = x - Q^T Q (x - bias)``)."""
        for name, value, low in (("d", d, 1), ("rank", rank, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ProbeError(f"{name} must be an int >= {low}, got {value!r}")
        if rank > d:
            raise ProbeError(f"cannot remove rank={rank} directions from d={d} dimensions")
        g = torch.Generator().manual_seed(seed)
        gauss = torch.randn(d, rank, generator=g, dtype=torch.float64)
        q = torch.linalg.qr(gauss).Q.T.contiguous()  # [rank, d], orthonormal rows
        if bias is not None:
            bias = _real_matrix(bias[None], "bias")[0].cpu()
        out = cls(q.T.contiguous(), q, bias, "random")
        return out.to(device) if device is not None else out

    def __repr__(self) -> str:
        form = "x - L R (x - bias)" if self.bias is not None else "x - L R x"
        text = f"Eraser({self.method}, d={self.d}, rank={self.rank}: {form}"
        if self.accuracies:
            text += (
                f"; held-out accuracy {self.accuracies[0]:.3f} -> {self.accuracies[-1]:.3f} "
                f"over {len(self.accuracies)} iterations, chance {self.chance:.3f}"
            )
        return text + ")"


# --------------------------------------------------------------------------- LEACE


def leace_factors(
    sigma_xx: Float[Tensor, "d d"],
    sigma_xz: Float[Tensor, "d k"],
    eig_rtol: float | None = None,
    svd_rtol: float = _SVD_RTOL,
) -> tuple[Float[Tensor, "d r"], Float[Tensor, "r d"]]:
    """The LEACE factors ``L = W^+ U``, ``R = U^T W`` from the covariance of ``x`` and its
    cross-covariance with the concept ``z``.

    Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form", Theorem 4.3:
    among affine maps ``r`` with ``Cov(r(x), z) = 0`` (after which no linear function of
    ``x`` beats a constant at predicting ``z``, for any convex loss), the one minimising
    ``E ||r(x) - x||_M^2`` for every positive semi-definite ``M`` at once is::

        r(x) = x - W^+ P_{W Sigma_xz} W (x - E[x])

    with ``W = (Sigma_xx^{1/2})^+`` the whitening transform and ``P_{W Sigma_xz}`` the
    orthogonal projection onto the column space of ``W Sigma_xz``. Here ``Sigma_xx = V diag(l)
    V^T`` (``eigh``); eigenvalues ``l <= eig_rtol * l_max`` count as zero (default ``eig_rtol =
    d * eps``, the cut ``torch.linalg.pinv`` uses), so ``W = V diag(l^{-1/2}) V^T`` and
    ``W^+ = V diag(l^{1/2}) V^T`` on the rest. ``W Sigma_xz = U S V'^T`` (thin SVD); columns
    of ``U`` whose singular value is at most ``svd_rtol`` times the largest are dropped, so
    ``P = U U^T`` and ``r(x) = x - L R (x - E[x])``. Any common scale of the two matrices
    (``1/n`` or ``1/(n-1)``) cancels. ``r = 0`` columns (no correlation at all) give the
    identity.
    """
    sigma_xx = (sigma_xx + sigma_xx.T) / 2
    d = sigma_xx.shape[0]
    lam, v = torch.linalg.eigh(sigma_xx)
    cut = (d * torch.finfo(lam.dtype).eps if eig_rtol is None else eig_rtol) * lam[-1].clamp_min(0)
    keep = lam > cut
    safe = torch.where(keep, lam, torch.ones_like(lam))
    w = (v * torch.where(keep, safe.rsqrt(), 0.0)) @ v.T
    w_inv = (v * torch.where(keep, safe.sqrt(), 0.0)) @ v.T
    u, s, _ = torch.linalg.svd(w @ sigma_xz, full_matrices=False)
    u = u[:, s > s[0] * svd_rtol] if s.numel() and s[0] > 0 else u[:, :0]
    return w_inv @ u, u.T @ w


class LeaceFitter:
    """Streaming LEACE: ``update(x, z)`` batch by batch, then ``.eraser``.

    ``z`` is the concept: ``[n, k]`` real columns (one-hot classes, or continuous targets), or
    ``[n]`` integer class indices in ``0..k-1`` (one-hot encoded here). Leading axes of ``x
    [..., d]`` and ``z`` are flattened together. The statistics are the float64 mean and
    co-moment matrix of the joint rows ``[x, z]`` (a :class:`hookscope.store.stats.
    RunningMoments`, Chan et al.'s pairwise update), so fitters over disjoint data
    :meth:`merge` into the fitter of their union. With all ``k`` one-hot columns the centred
    columns sum to zero, so ``Sigma_xz`` has rank ``k - 1`` at most and its extra, numerically
    zero singular value is dropped by ``svd_rtol``; :func:`erase` passes ``k - 1`` columns
    instead (the same column space, hence the same eraser).

    >>> fitter = LeaceFitter(d=512, k=3)
    >>> for x, labels in batches: fitter.update(x, labels)      # doctest: +SKIP
    >>> fitter.eraser(x)                                         # doctest: +SKIP
    """

    def __init__(
        self,
        d: int,
        k: int,
        *,
        eig_rtol: float | None = None,
        svd_rtol: float = _SVD_RTOL,
    ) -> None:
        for name, value in (("d", d), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProbeError(f"{name} must be a positive int, got {value!r}")
        _check_rtols(eig_rtol, svd_rtol)
        self.d, self.k = d, k
        self.eig_rtol, self.svd_rtol = eig_rtol, svd_rtol
        self.moments = RunningMoments(d + k, covariance=True)
        self._eraser: Eraser | None = None

    @property
    def n(self) -> int:
        """Rows seen so far."""
        return self.moments.n

    @torch.no_grad()
    def update(
        self,
        x: Float[Tensor, "*batch d"],
        z: Float[Tensor, "*batch k"] | Tensor,
    ) -> LeaceFitter:
        """Add a batch of activations ``x [..., d]`` and concept values ``z`` (see the class)."""
        if not isinstance(x, Tensor) or not isinstance(z, Tensor):
            raise ProbeError(
                f"update() takes torch tensors x [..., {self.d}] and z, got "
                f"{type(x).__name__} and {type(z).__name__}"
            )
        if x.ndim == 0 or x.shape[-1] != self.d:
            raise ProbeError(
                f"this fitter has d={self.d}; x has shape {tuple(x.shape)} (last dim must be {self.d})"
            )
        rows = x.reshape(-1, self.d)
        n = rows.shape[0]
        if not z.is_floating_point():
            if z.dtype == torch.bool or z.is_complex() or tuple(z.shape) != tuple(x.shape[:-1]):
                raise ProbeError(
                    f"integer z must hold class indices shaped like x without its last axis, "
                    f"{tuple(x.shape[:-1])}; got {z.dtype} {tuple(z.shape)}"
                )
            codes = z.reshape(-1).long()
            if n and (int(codes.min()) < 0 or int(codes.max()) >= self.k):
                raise ProbeError(
                    f"class indices must lie in 0..{self.k - 1} (k={self.k}); got "
                    f"{int(codes.min())}..{int(codes.max())}"
                )
            zr = torch.nn.functional.one_hot(codes, self.k).to(torch.float64)
        else:
            want = (*x.shape[:-1], self.k)
            if tuple(z.shape) == tuple(x.shape[:-1]) and self.k == 1:
                z = z[..., None]
            if tuple(z.shape) != want:
                raise ProbeError(
                    f"z must have shape {want} (or {tuple(x.shape[:-1])} with k=1, or integer "
                    f"class indices) for x of shape {tuple(x.shape)}; got {tuple(z.shape)}"
                )
            zr = z.reshape(-1, self.k)
        rows = _finite(rows.detach().to(torch.float64), "x")
        zr = _finite(zr.detach().to(device=rows.device, dtype=torch.float64), "z")
        self.moments.add(torch.cat([rows, zr], dim=1))
        self._eraser = None
        return self

    def merge(self, other: LeaceFitter) -> LeaceFitter:
        """Fold ``other`` (a fitter over disjoint data, same ``d`` and ``k``) into this one."""
        if not isinstance(other, LeaceFitter) or (other.d, other.k) != (self.d, self.k):
            what = (
                f"d={other.d}, k={other.k}"
                if isinstance(other, LeaceFitter)
                else type(other).__name__
            )
            raise ProbeError(
                f"can only merge a LeaceFitter with d={self.d}, k={self.k}; got {what}"
            )
        self.moments.merge(other.moments)
        self._eraser = None
        return self

    @property
    def eraser(self) -> Eraser:
        """The LEACE eraser of the data seen so far (computed once per state)."""
        if self.moments.n < 2:
            raise ProbeError(
                f"LEACE needs at least 2 rows to estimate a covariance; this fitter has seen "
                f"{self.moments.n}; call update(x, z) first"
            )
        if self._eraser is None:
            cov = self.moments.covariance(ddof=0)
            d = self.d
            left, right = leace_factors(cov[:d, :d], cov[:d, d:], self.eig_rtol, self.svd_rtol)
            self._eraser = Eraser(left, right, self.moments.mean[:d].clone(), "leace")
        return self._eraser

    def __repr__(self) -> str:
        return f"LeaceFitter(d={self.d}, k={self.k}, n={self.n})"


# --------------------------------------------------------------------------- fitting


def erase(
    X: Float[Tensor, "n d"] | np.ndarray,
    y: Any,
    method: str = "leace",
    **options: Any,
) -> Eraser:
    """Fit an eraser that removes the linearly available information about ``y`` from ``X``.

    ``X [n, d]`` (tensor or numpy; fitted in float64 on its device); ``y [n]`` class labels
    (ints, strings, bools) or, for LEACE, a float target ``[n]`` (one continuous concept
    column) or ``[n, k]`` (k columns). Floating ``y`` is always read as continuous: a 0/1
    float target equals the binary classes; a float 0/1/2 target is one column, not three
    classes.

    ``method="leace"`` (options ``eig_rtol``, ``svd_rtol``; see :func:`leace_factors`): classes
    ``c_0 < ... < c_{K-1}`` become the one-hot columns of ``c_1..c_{K-1}``. The centred one-hot
    columns of all ``K`` classes sum to zero, so any ``K - 1`` of them span the same column
    space of ``Sigma_xz`` and give the same projection ``P_{W Sigma_xz}``; dropping one leaves
    no numerically zero singular value to cut. After erasure the class-conditional means of
    the erased training rows are equal.

    ``method="inlp"`` (options ``n_iter=20``, ``tol=0.01``, ``val_fraction=0.3``, ``C=1.0``,
    ``max_iter=1000``, ``seed=0``): rows are split per class into training and held-out rows
    (``seed``). Each iteration fits an L2 logistic probe (:class:`hookscope.probes.linear.
    LinearProbe`, ``C``) on the projected training rows and scores it on the projected
    held-out rows; when its accuracy is at most ``chance + tol`` (chance: the majority-class
    rate of the held-out rows) the loop stops, otherwise its unit direction(s) (one for two
    classes, ``K`` for ``K`` classes) join the removed set. The eraser is ``x - Q^T Q x`` with
    ``Q`` an orthonormal basis of all removed directions (linear, no bias);
    ``eraser.accuracies`` records the held-out accuracy of each iteration.
    """
    if method not in METHODS:
        raise ProbeError(
            f"unknown erasure method {method!r}; choose one of {format_choices(METHODS)}."
            + suggestion(str(method), METHODS)
        )
    unknown = [k for k in options if k not in _OPTIONS[method]]
    if unknown:
        raise ProbeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method={method!r}; it takes "
            f"{format_choices(_OPTIONS[method])}." + suggestion(unknown[0], _OPTIONS[method])
        )
    X = as_features(X, "X").to(torch.float64)
    n, d = X.shape
    target = _target(y, n, continuous_ok=method == "leace")
    if method == "leace":
        eig_rtol, svd_rtol = options.get("eig_rtol"), options.get("svd_rtol", _SVD_RTOL)
        _check_rtols(eig_rtol, svd_rtol)
        if isinstance(target, Tensor):
            z = target.to(X.device)
        else:
            codes, k = target
            z = torch.nn.functional.one_hot(torch.as_tensor(codes, device=X.device), k)[:, 1:]
        fitter = LeaceFitter(d, z.shape[1], eig_rtol=eig_rtol, svd_rtol=svd_rtol)
        return fitter.update(X, z.to(torch.float64)).eraser
    codes, k = target  # type: ignore[misc]
    return _inlp(X, codes, k, **options)


def _inlp(
    X: Tensor,
    codes: np.ndarray,
    k: int,
    n_iter: int = 20,
    tol: float = 0.01,
    val_fraction: float = 0.3,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> Eraser:
    for name, value in (("n_iter", n_iter), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProbeError(f"{name} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ProbeError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(tol, numbers.Real) or not 0 <= tol < 1:
        raise ProbeError(f"tol must be a number in [0, 1), got {tol!r}")
    if not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ProbeError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
    if not isinstance(C, numbers.Real) or not C > 0:
        raise ProbeError(f"C must be a positive number, got {C!r}")
    train, val = _stratified_split(codes, k, float(val_fraction), seed)
    if val.size == 0:
        raise ProbeError(
            f"INLP needs held-out rows: val_fraction={val_fraction} of {codes.size} rows leaves "
            "none; pass more rows or a larger val_fraction"
        )
    device = X.device
    train_rows, val_rows = (
        torch.as_tensor(train, device=device),
        torch.as_tensor(val, device=device),
    )
    # centred on the training mean: with an unpenalised intercept the probe's weights are the
    # same, and the solver needs fewer iterations without a large common offset
    X = X - X[train_rows].mean(0)
    x_train, x_val = X[train_rows], X[val_rows]
    y_train, y_val = codes[train], codes[val]
    chance = float(np.bincount(y_val, minlength=k).max() / y_val.size)
    q = X.new_zeros(0, X.shape[1])  # orthonormal rows: the removed directions so far
    accuracies: list[float] = []
    for _ in range(n_iter):
        probe = LinearProbe(C=float(C), max_iter=max_iter).fit(_project_out(x_train, q), y_train)
        accuracies.append(float(probe.score(_project_out(x_val, q), y_val)))
        if accuracies[-1] <= chance + tol:
            break
        found = torch.atleast_2d(torch.as_tensor(probe.direction_)).to(device, torch.float64)
        new = _new_basis(found, q)
        if new.shape[0] == 0:  # the probe only found directions already removed
            break
        q = torch.cat([q, new])
    return Eraser(q.T.contiguous(), q, None, "inlp", tuple(accuracies), chance)


def _project_out(x: Tensor, q: Tensor) -> Tensor:
    return x - (x @ q.T) @ q if q.shape[0] else x


def _new_basis(directions: Tensor, q: Tensor) -> Tensor:
    """Orthonormal rows spanning what ``directions`` (unit rows) add to the span of ``q``."""
    rest = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-300)
    for _ in range(2):  # twice: classical Gram-Schmidt loses orthogonality once
        rest = _project_out(rest, q)
    _, s, vh = torch.linalg.svd(rest, full_matrices=False)
    return vh[s > _DIRECTION_ATOL]


def _stratified_split(codes: np.ndarray, k: int, fraction: float, seed: int):
    """Per class: a seeded shuffle, ``round(fraction * n_c)`` rows held out (at least one row
    of every class stays in training)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(codes == c))
        m = min(int(round(fraction * idx.size)), idx.size - 1)
        val.append(idx[:m])
        train.append(idx[m:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# --------------------------------------------------------------------------- inputs


def _real_matrix(x: Any, name: str, allow_vector: bool = False) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise ProbeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.array(arr, dtype=np.float64))
    if t.is_complex() or t.dtype == torch.bool:
        raise ProbeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if allow_vector and t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ProbeError(
            f"{name} must be a matrix [n, d], got shape {tuple(t.shape)}; flatten the leading "
            f"axes first: {name}.reshape(-1, d)"
        )
    return t.to(torch.float64)


def _finite(t: Tensor, name: str) -> Tensor:
    if bool(torch.isfinite(t.sum())):
        return t
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):  # the sum overflowed; the values themselves are finite
        return t
    n_nan = int(torch.isnan(t).sum())
    rows = (
        torch.nonzero(bad.reshape(t.shape[0], -1).any(1)).flatten()[:5].tolist() if t.ndim else []
    )
    raise ProbeError(
        f"{name} contains {int(bad.sum())} non-finite values ({n_nan} NaN) out of {t.numel()} "
        f"(first rows: {rows}); remove or impute them first"
    )


def _target(y: Any, n: int, continuous_ok: bool) -> Tensor | tuple[np.ndarray, int]:
    """A float ``[n, k]`` tensor (continuous concept) or ``(codes [n], K)`` for classes."""
    if isinstance(y, Tensor):
        floating = y.is_floating_point()
    else:
        y = np.asarray(y)
        floating = y.dtype.kind == "f"
    if not floating:
        classes, codes = encode_labels(y, n)
        return np.asarray(codes).reshape(-1).astype(np.int64), int(classes.shape[0])
    if not continuous_ok:
        raise ProbeError(
            "INLP erases classes, but y is a float target; pass integer, string or bool "
            "labels, or use method='leace' for a continuous concept"
        )
    t = (
        y.detach().to(torch.float64)
        if isinstance(y, Tensor)
        else torch.from_numpy(y.astype(np.float64))
    )
    if t.ndim not in (1, 2) or t.shape[0] != n:
        raise ProbeError(
            f"a float target must be [n] or [n, k] with n = {n} (the rows of X); got shape "
            f"{tuple(t.shape)}"
        )
    t = _finite(t.reshape(n, -1), "y")
    if n < 2 or not bool((t.std(dim=0) > 0).all()):
        raise ProbeError(
            "a continuous target needs at least 2 rows and must vary in every column; "
            "a constant concept carries nothing to erase"
        )
    return t


def _check_rtols(eig_rtol: Any, svd_rtol: Any) -> None:
    if eig_rtol is not None and not (isinstance(eig_rtol, numbers.Real) and 0 <= eig_rtol < 1):
        raise ProbeError(f"eig_rtol must be None or a number in [0, 1), got {eig_rtol!r}")
    if not (isinstance(svd_rtol, numbers.Real) and 0 < svd_rtol < 1):
        raise ProbeError(f"svd_rtol must be a number in (0, 1), got {svd_rtol!r}")


# --------------------------------------------------------------------------- amnesic check


@dataclass(frozen=True)
class AmnesicResult:
    """The metric without intervention, with the eraser at ``site``, and with the control:
    the orthogonal projection removing ``rank`` random directions (seeded by
    ``control_seed``) about the eraser's own bias. ``erased_effect`` and ``control_effect``
    are the differences from ``clean``; the eraser's effect means something when it is well
    beyond the control's (Elazar et al. 2021)."""

    site: str
    method: str
    rank: int
    clean: float
    erased: float
    control: float
    control_seed: int
    control_eraser: Eraser = field(repr=False)

    @property
    def erased_effect(self) -> float:
        """``erased - clean``."""
        return self.erased - self.clean

    @property
    def control_effect(self) -> float:
        """``control - clean``."""
        return self.control - self.clean

    def to_pandas(self):
        """One row per condition (clean, erased, control): metric value and change from clean."""
        import pandas as pd

        return pd.DataFrame(
            {
                "condition": ["clean", "erased", "control"],
                "metric": [self.clean, self.erased, self.control],
                "change": [0.0, self.erased_effect, self.control_effect],
                "site": [self.site] * 3,
                "rank": [0, self.rank, self.rank],
            }
        )

    def __str__(self) -> str:
        return "\n".join(
            [
                f"Amnesic check at {self.site}: {self.method} eraser of rank {self.rank}; "
                f"control: {self.rank} random directions (seed {self.control_seed})",
                f"  clean    {self.clean:+.6g}",
                f"  erased   {self.erased:+.6g}  (change {self.erased_effect:+.6g})",
                f"  control  {self.control:+.6g}  (change {self.control_effect:+.6g})",
            ]
        )


def amnesic(
    model: Any,
    inputs: Any,
    site: Any,
    eraser: Eraser,
    metric: Callable[[Any], Any],
    control_seed: int = 0,
) -> AmnesicResult:
    """Amnesic probing (Elazar et al. 2021): ``metric`` of the model output without
    intervention, with ``eraser.hook`` at ``site``, and with a control eraser at ``site`` that
    removes ``eraser.rank`` random directions (:meth:`Eraser.random` with ``control_seed``,
    about the eraser's bias, so both keep the mean of the fitted data).

    ``model`` is a :class:`hookscope.HookedModel`; ``site`` anything its ``run_with_hooks``
    takes (``"resid_post.3"``); ``metric(output)`` must return a number or a one-element
    tensor (e.g. a mean logit difference). Runs under ``torch.no_grad()``; the erased run goes
    first, so a site of the wrong width fails before the other two forwards.

    >>> result = amnesic(model, tokens, "resid_post.3", eraser,
    ...                  metric=lambda logits: (logits[:, -1, a] - logits[:, -1, b]).mean())
    >>> print(result); result.to_pandas()
    """
    from hookscope.model import HookedModel

    if not isinstance(model, HookedModel):
        raise ProbeError(
            f"amnesic() takes a hookscope.HookedModel, got {type(model).__name__}; wrap a torch "
            "module with hookscope.HookedModel.wrap(module)"
        )
    if not isinstance(eraser, Eraser):
        raise ProbeError(
            f"eraser must be a hookscope.probes.Eraser (from probes.erase), got {type(eraser).__name__}"
        )
    if not callable(metric):
        raise ProbeError(f"metric must be a callable output -> number, got {type(metric).__name__}")
    if isinstance(control_seed, bool) or not isinstance(control_seed, int) or control_seed < 0:
        raise ProbeError(f"control_seed must be an int >= 0, got {control_seed!r}")
    model.resolve(site)  # an unknown or unavailable site raises here, before any forward
    control_eraser = Eraser.random(eraser.d, eraser.rank, control_seed, eraser.bias)
    with torch.no_grad():
        erased = _scalar(metric(model.run_with_hooks(inputs, hooks=[(site, eraser.hook)])))
        control = _scalar(metric(model.run_with_hooks(inputs, hooks=[(site, control_eraser.hook)])))
        clean = _scalar(metric(model(inputs)))
    return AmnesicResult(
        str(site), eraser.method, eraser.rank, clean, erased, control, control_seed, control_eraser
    )


def _scalar(value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ProbeError(
                f"metric must return one number, got a tensor of shape {tuple(value.shape)}; "
                "reduce it, e.g. with .mean()"
            )
        out = float(value.item())
    elif isinstance(value, numbers.Real):
        out = float(value)
    else:
        raise ProbeError(
            f"metric must return a number or a one-element tensor, got {type(value).__name__}"
        )
    if not math.isfinite(out):
        raise ProbeError(f"metric returned {out}; it must be finite")
    return out
