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
  from a curvature-scaled Gram-matrix preconditioner (``_Preconditioner``), in float64. The
  line search moves the margins ``X w + c`` it carries, so an iteration costs one product
  with ``X`` each way. Float32 activations (the store's) are multiplied in float32 when
  ``tol >= 1e-8``; everything else stays float64, and a problem's margins and gradient are
  recomputed in float64 before it counts as converged. Several matrices can be stacked (``design``): e.g.
  a fresh draw of random features per seed, one solve for all of them.
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
_LOW_TOL = 1e-8  # float32 activations multiply in float32 when tol is at least this
_REFRESH = 25  # with float32 products, the margins are recomputed this often


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
    z = _mm(X.to(coef.dtype), coef.reshape(b * k, d).T)  # [n, B*K']
    return z.reshape(-1, b, k).transpose(0, 1) + intercept[:, None, :]


def probabilities(X: Float[Tensor, "n d"], coef: Tensor, intercept: Tensor) -> Tensor:
    """Class probabilities ``[B, n, K]`` of logistic probes (``K = 2`` columns for binary)."""
    z = logits(X, coef, intercept)
    if z.shape[-1] == 1:
        p = torch.sigmoid(z)
        return torch.cat([1 - p, p], dim=-1)
    return torch.softmax(z, dim=-1)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``. On the CPU it goes through numpy's BLAS: the products here are skinny
    (``X [10240, 512] @ W [512, 15]``), where numpy's OpenBLAS ran 3-4x faster than torch's
    MKL on this project's AMD machine (float64: 12 ms against 40 ms, one thread)."""
    if a.device.type == "cpu" and a.dtype == b.dtype and a.dtype in (torch.float64, torch.float32):
        return torch.from_numpy(a.detach().resolve_neg().numpy() @ b.detach().resolve_neg().numpy())
    return a @ b


class _Designs:
    """The activation matrices of a batch: ``X [G, n, d]``, problem ``b`` reading
    ``X[design[b]]`` (``G = 1``: all problems share ``X``). Products go one design at a time,
    so a design's problems share one matrix product and none pays for another's rows. One
    shared ``X`` is also held transposed, ``[d, n]``: with the long axis contiguous on both
    sides, the forward product ``W X'`` ran 1.5x faster than ``X W'`` (float32, 15 problems,
    numpy)."""

    def __init__(self, X: Tensor, design: Tensor):
        self.X, self.design = X, design
        self.G, self.n, self.d = X.shape
        # the copy pays where many problems read one design many times (a sweep's shared X)
        self.XT = X.transpose(1, 2).contiguous() if self.G == 1 else None

    def groups(self, rows: Tensor) -> list[tuple[int, Tensor]]:
        """``(g, positions in rows)`` for every design the problems ``rows`` read."""
        if self.G == 1:
            return [(0, torch.arange(rows.numel(), device=rows.device))]
        des = self.design[rows]
        return [(g, torch.nonzero(des == g).flatten()) for g in torch.unique(des).tolist()]

    def forward(self, w: Tensor, rows: Tensor, exact: bool = False) -> Tensor:
        """``X[design[b]] @ w[b].T`` for ``w [b, K', d]``: ``[b, n, K']`` (float64; with
        ``exact``, multiplied in float64 too)."""
        b, k, d = w.shape
        work = torch.float64 if exact else self.X.dtype
        w = w.to(work)
        out = torch.empty(b, self.n, k, dtype=torch.float64, device=w.device)
        for g, sel in self.groups(rows):
            if self.XT is not None:
                z = _mm(w[sel].reshape(-1, d), self.XT[g].to(work))  # [m*K', n]
            else:
                z = _mm(self.X[g].to(work), w[sel].reshape(-1, d).T).T
            out[sel] = z.reshape(sel.numel(), k, self.n).transpose(1, 2).to(torch.float64)
        return out

    def backward(self, dz: Tensor, rows: Tensor, exact: bool = False) -> Tensor:
        """``dz[b].T @ X[design[b]]`` for ``dz [b, n, K']``: ``[b, K', d]`` (float64; with
        ``exact``, multiplied in float64 too)."""
        b, n, k = dz.shape
        work = torch.float64 if exact else self.X.dtype
        out = dz.new_empty(b, k, self.d)
        dz = dz.to(work)
        for g, sel in self.groups(rows):
            flat = dz[sel].transpose(1, 2).reshape(-1, n)  # [m*K', n]
            x = self.X[g].to(work)
            out[sel] = _mm(flat, x).reshape(sel.numel(), k, self.d).to(out.dtype)
        return out


class _Logistic:
    """Objective and gradient of ``B`` logistic problems; parameters are flat
    ``[B, K' * (d + 1)]`` rows (the weights, then the intercepts). The margins ``z = X w + c``
    ``[B, n, K']`` are the state the solver carries (float64): a line search moves along
    ``z + t X d`` with one product per iteration, whatever the number of trial steps."""

    def __init__(self, X: _Designs, labels: Tensor, weights: Tensor, k: int, C: Tensor, bias: bool):
        self.X, self.k, self.bias = X, k, bias
        self.d = X.d
        self.sw = weights * C[:, None]  # [B, n]: C folded into the sample weights
        self.total = self.sw.sum(1).clamp_min(1e-300)
        if k == 1:
            self.target = labels.to(torch.float64)  # [B, n]
        else:
            self.target = torch.nn.functional.one_hot(labels, k).to(torch.float64)  # [B, n, K]

    def split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        b = theta.shape[0]
        w = theta[:, : self.k * self.d].reshape(b, self.k, self.d)
        c = theta[:, self.k * self.d :] if self.bias else theta.new_zeros(b, self.k)
        return w, c

    def margins(self, theta: Tensor, rows: Tensor, exact: bool = False) -> Tensor:
        """``X w + c`` ``[b, n, K']`` (linear in ``theta``: also the margins' change along a
        direction); ``exact``: multiplied in float64 whatever ``X``'s precision."""
        w, c = self.split(theta)
        return self.X.forward(w, rows, exact) + c[:, None, :]

    def at(self, z: Tensor, theta: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """At margins ``z``: the objective ``[b]``, its derivative in the margins ``[b, n, K']``
        and the mean curvature ``[b]`` (the weighted mean of ``p (1 - p)`` over rows and
        classes)."""
        sw = self.sw[rows]
        y = self.target[rows]
        if self.k == 1:
            z = z[..., 0]
            f = ((torch.nn.functional.softplus(z) - y * z) * sw).sum(1)
            prob = torch.sigmoid(z)
            dz = ((prob - y) * sw)[..., None]  # [b, n, 1]
            curv = (prob * (1 - prob) * sw).sum(1)
        else:
            lse = torch.logsumexp(z, dim=-1)
            f = ((lse - (z * y).sum(-1)) * sw).sum(1)
            prob = torch.softmax(z, dim=-1)
            dz = (prob - y) * sw[..., None]  # [b, n, K]
            curv = (prob * (1 - prob)).mean(-1).mul(sw).sum(1)
        w = theta[:, : self.k * self.d]
        return f + 0.5 * w.square().sum(1), dz, curv / self.total[rows]

    def gradient(self, dz: Tensor, theta: Tensor, rows: Tensor, exact: bool = False) -> Tensor:
        """The gradient ``[b, P]`` from the margins' derivative ``dz``."""
        b = theta.shape[0]
        w, _ = self.split(theta)
        parts = [(self.X.backward(dz, rows, exact) + w).reshape(b, -1)]
        if self.bias:
            parts.append(dz.sum(1))
        return torch.cat(parts, dim=1)


_FULL_MAX_D = 2048  # above this, eigh of the d x d bound costs more than it saves


class _Preconditioner:
    """L-BFGS's initial inverse Hessian, per problem: ``(kappa C X'SX + I)^-1`` on each
    class's weights, the Hessian's form with every row's curvature ``p (1 - p)`` replaced by
    the problem's current weighted mean ``kappa`` (``kappa <= 1/4`` always: at ``kappa =
    1/4`` this is Boehning's 1992 bound). ``kappa`` follows the iterate: near the start it is
    close to 1/4, which suits the ill-conditioned controls (shuffled labels, Gaussian
    features: 5-20 iterations here against 250-550 for plain L-BFGS); on a separable task
    the rows saturate, ``kappa`` falls and the start tends to the identity that suits that
    end of the fit.

    * full (``d <= 2048`` and at least ``d`` rows): ``X'SX`` is the design's Gram matrix
      under its problems' average sample weights, scaled to each problem's total weight:
      one Gram matrix and one ``eigh`` per design (float32), then ``H0 q`` is two ``d x d``
      products.
    * diagonal otherwise: the diagonal of that matrix.

    The intercepts get ``(kappa C sum(s))^-1``. Any positive definite start keeps L-BFGS
    exact; this one only sets how fast it gets there."""

    def __init__(
        self, X: _Designs, weights: Tensor, C: Tensor, k: int, bias: bool, gram: Tensor | None
    ):
        self.X, self.k, self.bias, self.d = X, k, bias, X.d
        self.total = C * weights.sum(1)  # [B]
        self.full = X.d <= _FULL_MAX_D and X.n >= X.d
        self.kappa = torch.full_like(self.total, 0.25)
        everyone = torch.arange(weights.shape[0], device=weights.device)
        if self.full and gram is not None:  # the caller's second moment per unit weight
            self.basis = [None] * X.G
            self.evals = weights.new_empty(weights.shape[0], X.d)
            shared = None
            for g, sel in X.groups(everyone):
                if shared is None or gram.ndim == 3:
                    m = gram if gram.ndim == 2 else gram[g]
                    shared = torch.linalg.eigh(m.to(device=weights.device, dtype=torch.float32))
                evals, evecs = shared
                self.basis[g] = evecs.to(torch.float64)
                self.evals[sel] = self.total[sel, None] * evals.clamp_min(0).to(torch.float64)[None]
        elif self.full:
            self.basis: list[Tensor | None] = [None] * X.G
            self.evals = weights.new_empty(weights.shape[0], X.d)  # [B, d], per problem
            for g, sel in X.groups(everyone):
                # float32 is ample for a preconditioner and halves the cost of both steps
                mean_w = weights[sel].mean(0)
                x = X.X[g].to(torch.float32)
                moment = _mm(x.T, x * mean_w.to(torch.float32)[:, None])
                evals, evecs = torch.linalg.eigh(moment)
                evals, evecs = evals.to(torch.float64), evecs.to(torch.float64)
                self.basis[g] = evecs
                share = self.total[sel] / mean_w.sum().clamp_min(1e-300)
                self.evals[sel] = share[:, None] * evals.clamp_min(0)[None]
        else:
            self.evals = weights.new_empty(weights.shape[0], X.d)
            for g, sel in X.groups(everyone):
                self.evals[sel] = (
                    _mm(weights[sel], X.X[g].to(torch.float64).square()) * C[sel, None]
                )

    def apply(self, q: Tensor, rows: Tensor) -> Tensor:
        """``H0 q`` for the problems ``rows`` (``q [b, P]``)."""
        b = q.shape[0]
        kappa = self.kappa[rows]
        qw = q[:, : self.k * self.d].reshape(b, self.k, self.d)
        scale = (1.0 / (kappa[:, None] * self.evals[rows] + 1.0))[:, None, :]  # [b, 1, d]
        if not self.full:
            out = qw * scale
        else:
            out = torch.empty_like(qw)
            for g, sel in self.X.groups(rows):
                V = self.basis[g]
                u = _mm(qw[sel].reshape(-1, self.d), V).reshape(sel.numel(), self.k, self.d)
                out[sel] = _mm((u * scale[sel]).reshape(-1, self.d), V.T).reshape(u.shape)
        parts = [out.reshape(b, -1)]
        if self.bias:
            inverse = 1.0 / (kappa * self.total[rows]).clamp_min(1e-12)
            parts.append(q[:, self.k * self.d :] * inverse[:, None])
        return torch.cat(parts, dim=1)


def _direction(
    g: Tensor,
    s_hist: Tensor,
    y_hist: Tensor,
    rho: Tensor,
    gamma: Tensor,
    h0: _Preconditioner,
    rows: Tensor,
) -> Tensor:
    """L-BFGS two-loop recursion for every problem at once (rows with ``rho == 0`` are empty
    history slots, newest last), from the initial inverse Hessian ``gamma * H0``."""
    q = g.clone()
    m = s_hist.shape[0]
    alpha = []
    for j in range(m - 1, -1, -1):
        a = rho[j] * (s_hist[j] * q).sum(1)
        q = q - a[:, None] * y_hist[j]
        alpha.append(a)
    r = gamma[:, None] * h0.apply(q, rows)
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


def _check_design(X: Tensor, design: Tensor | None, b: int) -> Tensor:
    """``design`` as a long tensor ``[B]`` (zeros for a 2-D ``X``), checked against ``X``."""
    if X.ndim == 2:
        if design is not None:
            raise ProbeError("design= is for a stacked X [G, n, d]; X here is one matrix [n, d]")
        return torch.zeros(b, dtype=torch.long, device=X.device)
    if X.ndim != 3:
        raise ProbeError(f"X must be [n, d] or a stack [G, n, d]; got shape {tuple(X.shape)}")
    if design is None:
        raise ProbeError(f"X stacks {X.shape[0]} matrices; pass design=[B] saying which each reads")
    design = torch.as_tensor(design, device=X.device).long()
    if design.shape != (b,) or bool(((design < 0) | (design >= X.shape[0])).any()):
        raise ProbeError(
            f"design must be {b} indices in 0..{X.shape[0] - 1}; got {design.tolist()}"
        )
    return design


def fit_logistic(
    X: Float[Tensor, "n d"] | Float[Tensor, "g n d"],
    labels: Int[Tensor, "b n"],
    weights: Float[Tensor, "b n"],
    n_classes: int,
    C: float | Tensor = 1.0,
    fit_intercept: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-7,
    design: Int[Tensor, " b"] | None = None,
    gram: Float[Tensor, "d d"] | Float[Tensor, "g d d"] | None = None,
) -> LinearSolution:
    """``B`` L2-regularised logistic regressions on the rows of ``X`` (see the module).

    ``labels [B, n]`` are class codes in ``0..n_classes-1``; ``weights [B, n]`` are
    non-negative sample weights (0: not in that problem). ``X`` is one matrix ``[n, d]``
    shared by every problem, or a stack ``[G, n, d]`` with ``design [B]`` naming the matrix
    each problem reads (e.g. a fresh draw of random features per seed). A problem has
    converged when the largest entry of the gradient of its objective divided by
    ``C * sum(weights)`` (the mean-loss scale scikit-learn's ``tol`` uses) is at most ``tol``,
    or when a line search can no longer decrease the objective (the optimum in float64).

    ``gram`` (``[d, d]``, or ``[G, d, d]`` per design), when known, is the covariance of the
    rows (e.g. the one Gaussian random features were drawn from): the preconditioner (see
    ``_Preconditioner``) then uses it instead of computing each design's Gram matrix. It
    changes only how fast the solve gets to the optimum, never the optimum.

    Small problems (under ~4 million multiply-adds per pass over ``X``) run on one CPU
    thread: there intra-op threads cost more than they save (5x slower measured with 2
    threads on a loaded 2-core machine); the thread counts are restored afterwards.
    """
    b = labels.shape[0]
    k = 1 if n_classes == 2 else n_classes
    design = _check_design(X, design, b)
    n, d = X.shape[-2:]
    if gram is not None and tuple(gram.shape) not in ((d, d), (X.shape[0], d, d)[-gram.ndim :]):
        raise ProbeError(f"gram must be [{d}, {d}] or one per design; got {tuple(gram.shape)}")
    small = X.device.type == "cpu" and n * d * b * k < (1 << 22)
    args = (X, labels, weights, n_classes, C, fit_intercept, max_iter, tol, design, gram)
    if not small:
        return _fit_logistic(*args)
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            return _fit_logistic(*args)
    finally:
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
    design: Tensor,
    gram: Tensor | None,
) -> LinearSolution:
    # products in the activations' own precision when they are float32 (the store's): the
    # margins, objective, line search and history stay float64, and the margins are
    # recomputed in float64 before a problem is called converged
    low = X.dtype in (torch.float32, torch.float16, torch.bfloat16) and tol >= _LOW_TOL
    work = torch.float32 if low else torch.float64
    X = (X[None] if X.ndim == 2 else X).to(work)
    shift = None
    if fit_intercept:
        # centred on any shift: the same optimum (the intercept absorbs it exactly, below),
        # far better conditioned; so the shift itself needs no more than the work precision
        shift = X.mean(1, keepdim=True)  # [G, 1, d]
        X = X - shift
        shift = shift.to(torch.float64)
    dtype, device = torch.float64, X.device
    b, n = labels.shape
    k = 1 if n_classes == 2 else n_classes
    weights = weights.to(dtype=dtype, device=device)
    C_b = _as_batch(C, b, "C", dtype, device)
    designs = _Designs(X, design)
    problem = _Logistic(designs, labels.to(device), weights, k, C_b, fit_intercept)
    scale = (C_b * weights.sum(1)).clamp_min(1e-300)  # [B]
    p = k * (X.shape[-1] + (1 if fit_intercept else 0))
    theta = torch.zeros(b, p, dtype=dtype, device=device)
    everyone = torch.arange(b, device=device)
    z = torch.zeros(b, n, k, dtype=dtype, device=device)  # the margins at theta = 0
    f, dz, curv = problem.at(z, theta, everyone)
    g = problem.gradient(dz, theta, everyone)
    h0 = _Preconditioner(designs, weights, C_b, k, fit_intercept, gram)
    h0.kappa = curv.clamp(1e-6, 0.25)
    s_hist = torch.zeros(_HISTORY, b, p, dtype=dtype, device=device)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(_HISTORY, b, dtype=dtype, device=device)
    gamma = torch.ones(b, dtype=dtype, device=device)

    def stationarity(grad: Tensor, rows: Tensor) -> Tensor:
        """The largest entry of the gradient in the caller's coordinates (uncentred ``X``:
        the weights' entries gain ``shift * d/dc``), over ``C * sum(weights)``: the test
        scikit-learn's ``tol`` applies."""
        if shift is None:
            return grad.abs().amax(1) / scale[rows]
        kd = k * X.shape[-1]
        gw = grad[:, :kd].reshape(-1, k, X.shape[-1])
        gw = gw + shift[design[rows]] * grad[:, kd:, None]
        return torch.maximum(gw.abs().amax((1, 2)), grad[:, kd:].abs().amax(1)) / scale[rows]

    done = stationarity(g, everyone) <= tol
    optimum = torch.zeros(b, dtype=torch.bool, device=device)
    iters = 0
    for iters in range(1, max_iter + 1):  # noqa: B007 - reported as n_iter
        active = torch.nonzero(~done).flatten()
        if active.numel() == 0:
            iters -= 1
            break
        th, ga, fa, za = theta[active], g[active], f[active], z[active]
        d = _direction(
            ga, s_hist[:, active], y_hist[:, active], rho[:, active], gamma[active], h0, active
        )
        slope = (d * ga).sum(1)
        fresh = (rho[:, active] == 0).all(0)
        bad = slope >= 0  # not a descent direction: restart from the preconditioned gradient
        if bool(bad.any()):
            d[bad] = -h0.apply(ga[bad], active[bad])
            slope[bad] = (d[bad] * ga[bad]).sum(1)
        dzd = problem.margins(d, active)  # the margins' change along d: one product
        step = torch.ones_like(fa)
        first = fresh | bad
        # backtracking: every problem halves its step until Armijo holds (or gives up)
        accepted = torch.zeros_like(fa, dtype=torch.bool)
        f_new, z_new, dz_new = fa.clone(), za.clone(), torch.empty_like(za)
        k_new = h0.kappa[active].clone()
        pending = torch.arange(active.numel(), device=device)
        for _ in range(40):
            t = step[pending]
            zt = za[pending] + t[:, None, None] * dzd[pending]
            ft, dzt, kt = problem.at(zt, th[pending] + t[:, None] * d[pending], active[pending])
            # strict decrease: once the Armijo term is below rounding, a step that changes
            # nothing must count as a failure (the float64 optimum), not as progress
            ok = (ft <= fa[pending] + _ARMIJO * t * slope[pending]) & (ft < fa[pending])
            okp = pending[ok]
            f_new[okp], z_new[okp], dz_new[okp], k_new[okp] = ft[ok], zt[ok], dzt[ok], kt[ok]
            accepted[okp] = True
            pending = pending[~ok]
            if pending.numel() == 0:
                break
            step[pending] *= 0.5
        # no decrease along this direction: from a fresh (preconditioned-gradient) direction
        # that is the optimum at float64 precision; otherwise the history is dropped and it
        # retries
        stuck = ~accepted
        optimum[active[stuck & first]] = True
        reset = active[stuck & ~first]
        if reset.numel():
            rho[:, reset] = 0
            gamma[reset] = 1
        s = step[:, None] * d
        s[stuck] = 0
        th_new = th + s
        g_new = ga.clone()
        moved = torch.nonzero(accepted).flatten()
        if low and moved.numel() and iters % _REFRESH == 0:  # the margins' drift, reset
            z_new[moved] = problem.margins(th_new[moved], active[moved])
            f_new[moved], dz_new[moved], k_new[moved] = problem.at(
                z_new[moved], th_new[moved], active[moved]
            )
        if moved.numel():
            g_new[moved] = problem.gradient(dz_new[moved], th_new[moved], active[moved])
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
            yk = yv[keep]
            gamma[kept] = sy[keep] / (yk * h0.apply(yk, kept)).sum(1)
        small = stationarity(g_new, active) <= tol
        if low and bool(small.any()):  # confirm in float64 before stopping
            sm = torch.nonzero(small).flatten()
            z_new[sm] = problem.margins(th_new[sm], active[sm], exact=True)
            f_new[sm], dz_new[sm], k_new[sm] = problem.at(z_new[sm], th_new[sm], active[sm])
            g_new[sm] = problem.gradient(dz_new[sm], th_new[sm], active[sm], exact=True)
            small = stationarity(g_new, active) <= tol
        theta[active], z[active] = th_new, z_new
        f[active], g[active] = f_new, g_new
        h0.kappa[active] = k_new.clamp(1e-6, 0.25)
        done[active] = small | (stuck & first)
    w, c = problem.split(theta)
    if shift is not None:
        c = c - (w @ shift[design].transpose(1, 2))[..., 0]
    converged = (stationarity(g, everyone) <= tol) | optimum
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
