"""Batched solvers: many L2-regularised linear probes on one activation matrix in one solve.

A sweep fits, at every site, the real task, its controls and several seeds: problems that
share the activations ``X`` and differ in labels and in which rows train them. Here they are
one problem each in a batch ``B``: ``labels [B, n]`` and sample ``weights [B, n]`` (0 leaves a
row out of that problem's training set), so every pass over ``X`` is a matrix product with
all the problems' weights at once, not ``B`` matrix-vector products.

Objectives (scikit-learn's, so the optima are the same):

* logistic: ``C * sum_i w_i * CE(y_i, softmax(W x_i + c)) + ||W||^2 / 2`` with one weight
  vector for two classes (the sigmoid) and ``K`` vectors for ``K > 2`` (the symmetric
  multinomial); the intercept ``c`` is not penalised. Strictly convex in ``W``; solved with
  L-BFGS (vectorised over problems, each with its own history and backtracking line search)
  in float64.
* ridge: ``sum_i w_i (y_i - x_i.w - c)^2 + alpha ||w||^2``, in closed form (weighted
  centring, then a Cholesky solve of ``X'WX + alpha I``, one factorisation per distinct
  weight vector).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hookscope.errors import ProbeError

__all__ = ["LinearSolution", "fit_logistic", "fit_ridge", "probabilities", "logits"]

_HISTORY = 10  # L-BFGS memory
_ARMIJO = 1e-4


@dataclass(frozen=True)
class LinearSolution:
    """Probes of one batched solve: ``coef [B, K', d]`` and ``intercept [B, K']`` in float64
    (``K' = 1`` for two classes and for regression), each problem's objective value at the
    solution (``loss``), the iterations used and whether each problem met the tolerance."""

    coef: Float[Tensor, "b k d"]
    intercept: Float[Tensor, "b k"]
    loss: Float[Tensor, " b"]
    n_iter: int
    converged: Bool[Tensor, " b"]


def logits(X: Float[Tensor, "n d"], coef: Tensor, intercept: Tensor) -> Float[Tensor, "b n k"]:
    """``X @ coef[b].T + intercept[b]`` for every problem ``b``: ``[B, n, K']``."""
    b, k, d = coef.shape
    z = X.to(coef.dtype) @ coef.reshape(b * k, d).T  # [n, B*K']
    return z.reshape(-1, b, k).transpose(0, 1) + intercept[:, None, :]


def probabilities(X: Float[Tensor, "n d"], coef: Tensor, intercept: Tensor) -> Tensor:
    """Class probabilities ``[B, n, K]`` of logistic probes (``K = 2`` columns for binary)."""
    z = logits(X, coef, intercept)
    if z.shape[-1] == 1:
        p = torch.sigmoid(z)
        return torch.cat([1 - p, p], dim=-1)
    return torch.softmax(z, dim=-1)


class _Logistic:
    """Objective and gradient of ``B`` logistic problems sharing ``X``; parameters are flat
    ``[B, K' * (d + 1)]`` rows (the weights, then the intercepts)."""

    def __init__(self, X: Tensor, labels: Tensor, weights: Tensor, k: int, C: Tensor, bias: bool):
        self.X, self.k, self.bias = X, k, bias
        self.d = X.shape[1]
        self.sw = weights * C[:, None]  # [B, n]: C folded into the sample weights
        self.labels = labels
        if k == 1:
            self.target = labels.to(X.dtype)  # [B, n]
        else:
            self.target = torch.nn.functional.one_hot(labels, k).to(X.dtype)  # [B, n, K]

    def split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        b = theta.shape[0]
        w = theta[:, : self.k * self.d].reshape(b, self.k, self.d)
        c = theta[:, self.k * self.d :] if self.bias else theta.new_zeros(b, self.k)
        return w, c

    def __call__(self, theta: Tensor, rows: Tensor, grad: bool = True) -> tuple[Tensor, Tensor]:
        """Objective ``[b]`` and gradient ``[b, P]`` of the problems ``rows`` at ``theta``."""
        w, c = self.split(theta)
        z = logits(self.X, w, c)  # [b, n, K']
        sw = self.sw[rows]
        if self.k == 1:
            z = z[..., 0]
            y = self.target[rows]
            loss = torch.nn.functional.softplus(z) - y * z
            dz = (torch.sigmoid(z) - y) * sw  # [b, n]
            f = (loss * sw).sum(1)
            dz = dz[..., None]
        else:
            lse = torch.logsumexp(z, dim=-1)
            y = self.target[rows]
            f = ((lse - (z * y).sum(-1)) * sw).sum(1)
            dz = (torch.softmax(z, dim=-1) - y) * sw[..., None]  # [b, n, K]
        f = f + 0.5 * w.square().sum((1, 2))
        if not grad:
            return f, theta.new_empty(0)
        b = theta.shape[0]
        gw = (dz.transpose(0, 1).reshape(-1, b * self.k).T @ self.X).reshape(b, self.k, self.d)
        parts = [(gw + w).reshape(b, -1)]
        if self.bias:
            parts.append(dz.sum(1))
        return f, torch.cat(parts, dim=1)


def _direction(
    g: Tensor, s_hist: Tensor, y_hist: Tensor, rho: Tensor, gamma: Tensor, h0: Tensor
) -> Tensor:
    """L-BFGS two-loop recursion for every problem at once (rows with ``rho == 0`` are empty
    history slots, newest last), from the initial inverse Hessian ``gamma * diag(h0)``."""
    q = g.clone()
    m = s_hist.shape[0]
    alpha = []
    for j in range(m - 1, -1, -1):
        a = rho[j] * (s_hist[j] * q).sum(1)
        q = q - a[:, None] * y_hist[j]
        alpha.append(a)
    r = gamma[:, None] * h0 * q
    for j in range(m):
        beta = rho[j] * (y_hist[j] * r).sum(1)
        r = r + (alpha[m - 1 - j] - beta)[:, None] * s_hist[j]
    return -r


def _as_batch(value: float | Tensor, b: int, name: str, dtype: torch.dtype, device) -> Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ProbeError(
            f"{name} must be a number or one value per problem ({b}); got {tuple(t.shape)}"
        )
    if not bool((t > 0).all()):
        raise ProbeError(f"{name} must be positive; got {t.min().item()}")
    return t


def fit_logistic(
    X: Float[Tensor, "n d"],
    labels: Int[Tensor, "b n"],
    weights: Float[Tensor, "b n"],
    n_classes: int,
    C: float | Tensor = 1.0,
    fit_intercept: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-7,
) -> LinearSolution:
    """``B`` L2-regularised logistic regressions on the rows of ``X`` (see the module).

    ``labels [B, n]`` are class codes in ``0..n_classes-1``; ``weights [B, n]`` are
    non-negative sample weights (0: not in that problem). A problem has converged when the
    largest entry of the gradient of its objective divided by ``C * sum(weights)`` (the
    mean-loss scale scikit-learn's ``tol`` uses) is at most ``tol``, or when a line search
    can no longer decrease the objective (the optimum in float64).

    Small problems (under ~4 million multiply-adds per pass over ``X``) run on one CPU
    thread: there intra-op threads cost more than they save (5x slower measured with 2
    threads on a loaded 2-core machine); the thread count is restored afterwards.
    """
    b = labels.shape[0]
    k = 1 if n_classes == 2 else n_classes
    small = X.device.type == "cpu" and X.shape[0] * X.shape[1] * b * k < (1 << 22)
    before = torch.get_num_threads()
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        return _fit_logistic(X, labels, weights, n_classes, C, fit_intercept, max_iter, tol)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _fit_logistic(
    X: Tensor,
    labels: Tensor,
    weights: Tensor,
    n_classes: int,
    C: float | Tensor,
    fit_intercept: bool,
    max_iter: int,
    tol: float,
) -> LinearSolution:
    X = X.to(torch.float64)
    shift = X.mean(0) if fit_intercept else None
    if shift is not None:  # same optimum (the intercept absorbs it), far better conditioned
        X = X - shift
    dtype, device = X.dtype, X.device
    b, n = labels.shape
    k = 1 if n_classes == 2 else n_classes
    weights = weights.to(dtype=dtype, device=device)
    C_b = _as_batch(C, b, "C", dtype, device)
    problem = _Logistic(X, labels.to(device), weights, k, C_b, fit_intercept)
    scale = (C_b * weights.sum(1)).clamp_min(1e-300)  # [B]
    p = k * (X.shape[1] + (1 if fit_intercept else 0))
    theta = torch.zeros(b, p, dtype=dtype, device=device)
    everyone = torch.arange(b, device=device)
    f, g = problem(theta, everyone)
    # diagonal of a bound on the Hessian (the logistic curvature is at most 1/4 per class):
    # L-BFGS's initial inverse Hessian, which makes it indifferent to the features' scales
    curv = 0.25 * C_b[:, None] * (weights @ X.square()) + 1.0  # [B, d]
    parts = [curv.repeat(1, k)]
    if fit_intercept:
        parts.append((0.25 * C_b * weights.sum(1))[:, None].expand(b, k) + 1e-12)
    h0 = 1.0 / torch.cat(parts, dim=1)  # [B, P]
    s_hist = torch.zeros(_HISTORY, b, p, dtype=dtype, device=device)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(_HISTORY, b, dtype=dtype, device=device)
    gamma = torch.ones(b, dtype=dtype, device=device)
    done = (g.abs().amax(1) / scale) <= tol
    optimum = torch.zeros(b, dtype=torch.bool, device=device)
    iters = 0
    for iters in range(1, max_iter + 1):  # noqa: B007 - reported as n_iter
        active = torch.nonzero(~done).flatten()
        if active.numel() == 0:
            iters -= 1
            break
        th, ga, fa = theta[active], g[active], f[active]
        ha = h0[active]
        d = _direction(ga, s_hist[:, active], y_hist[:, active], rho[:, active], gamma[active], ha)
        slope = (d * ga).sum(1)
        fresh = (rho[:, active] == 0).all(0)
        bad = slope >= 0  # not a descent direction: restart from the gradient
        if bool(bad.any()):
            d[bad] = -ha[bad] * ga[bad]
            slope[bad] = (d[bad] * ga[bad]).sum(1)
        step = torch.ones_like(fa)
        first = fresh | bad
        # backtracking: every problem halves its step until Armijo holds (or gives up)
        accepted = torch.zeros_like(fa, dtype=torch.bool)
        f_new = fa.clone()
        g_new = ga.clone()
        pending = torch.arange(active.numel(), device=device)
        for _ in range(40):
            rows = active[pending]
            trial = th[pending] + step[pending, None] * d[pending]
            ft, gt = problem(trial, rows)
            # strict decrease: once the Armijo term is below rounding, a step that changes
            # nothing must count as a failure (the float64 optimum), not as progress
            ok = (ft <= fa[pending] + _ARMIJO * step[pending] * slope[pending]) & (ft < fa[pending])
            okp = pending[ok]
            f_new[okp], g_new[okp] = ft[ok], gt[ok]
            accepted[okp] = True
            pending = pending[~ok]
            if pending.numel() == 0:
                break
            step[pending] *= 0.5
        # no decrease along this direction: from a fresh (scaled-gradient) direction that is
        # the optimum at float64 precision; otherwise the history is dropped and it retries
        stuck = ~accepted
        optimum[active[stuck & first]] = True
        reset = active[stuck & ~first]
        if reset.numel():
            rho[:, reset] = 0
            gamma[reset] = 1
        s = step[:, None] * d
        s[stuck] = 0
        f_new[stuck], g_new[stuck] = fa[stuck], ga[stuck]
        yv = g_new - ga
        sy = (s * yv).sum(1)
        keep = sy > 1e-12 * s.norm(dim=1) * yv.norm(dim=1)
        # shift the histories of the problems that keep their pair
        kept = active[keep]
        if kept.numel():
            s_hist[:, kept] = torch.roll(s_hist[:, kept], -1, dims=0)
            y_hist[:, kept] = torch.roll(y_hist[:, kept], -1, dims=0)
            rho[:, kept] = torch.roll(rho[:, kept], -1, dims=0)
            s_hist[-1, kept] = s[keep]
            y_hist[-1, kept] = yv[keep]
            rho[-1, kept] = 1.0 / sy[keep]
            gamma[kept] = sy[keep] / (yv[keep].square() * h0[kept]).sum(1)
        theta[active] = th + s
        f[active], g[active] = f_new, g_new
        small = (g_new.abs().amax(1) / scale[active]) <= tol
        done[active] = small | (stuck & first)
    w, c = problem.split(theta)
    if shift is not None:
        c = c - w @ shift
    converged = ((g.abs().amax(1) / scale) <= tol) | optimum
    return LinearSolution(w, c, f, iters, converged)


def fit_ridge(
    X: Float[Tensor, "n d"],
    targets: Float[Tensor, "b n"],
    weights: Float[Tensor, "b n"],
    alpha: float | Tensor = 1.0,
    fit_intercept: bool = True,
) -> LinearSolution:
    """``B`` ridge regressions in closed form: ``w = (Xc' S Xc + alpha I)^-1 Xc' S yc`` with
    ``Xc, yc`` centred on the weighted means and ``c = mean(y) - mean(x).w``. Problems with
    the same ``weights`` row share one Cholesky factorisation."""
    X = X.to(torch.float64)
    dtype, device = X.dtype, X.device
    b, n = targets.shape
    targets = targets.to(dtype=dtype, device=device)
    weights = weights.to(dtype=dtype, device=device)
    alphas = _as_batch(alpha, b, "alpha", dtype, device)
    d = X.shape[1]
    coef = torch.empty(b, 1, d, dtype=dtype, device=device)
    intercept = torch.zeros(b, 1, dtype=dtype, device=device)
    groups: dict[tuple, list[int]] = {}
    unique, inverse = torch.unique(weights, dim=0, return_inverse=True)
    for i, u in enumerate(inverse.tolist()):
        groups.setdefault((u, float(alphas[i])), []).append(i)
    eye = torch.eye(d, dtype=dtype, device=device)
    for (u, a), members in groups.items():
        sw = unique[u]
        total = sw.sum()
        if fit_intercept:
            mx = (sw @ X) / total
            Xc = X - mx
        else:
            mx = X.new_zeros(d)
            Xc = X
        gram = Xc.T @ (Xc * sw[:, None]) + a * eye
        ys = targets[members]  # [m, n]
        my = (ys @ sw) / total if fit_intercept else ys.new_zeros(len(members))
        rhs = Xc.T @ ((ys - my[:, None]) * sw).T  # [d, m]
        chol = torch.linalg.cholesky(gram)
        sol = torch.cholesky_solve(rhs, chol).T  # [m, d]
        idx = torch.tensor(members, device=device)
        coef[idx, 0] = sol
        if fit_intercept:
            intercept[idx, 0] = my - sol @ mx
    resid = targets - (X @ coef[:, 0].T).T - intercept
    loss = (weights * resid.square()).sum(1) + alphas * coef.square().sum((1, 2))
    return LinearSolution(coef, intercept, loss, 1, torch.ones(b, dtype=torch.bool, device=device))
