"""``LinearProbe``: an L2-regularised logistic or ridge probe with scikit-learn's estimator API.

Hyper-parameters live in ``__init__``, learned state ends in ``_``, and ``get_params`` /
``set_params`` / ``clone`` / ``cross_val_score`` work as with any scikit-learn estimator.
The fit is :func:`hookscope.probes.solve.fit_logistic` (scikit-learn's objective, so the
optimum is ``LogisticRegression``'s with the same ``C``) or the closed-form ridge of
:func:`~hookscope.probes.solve.fit_ridge` (``Ridge(alpha)``'s).

Conventions:

* ``X`` is ``[n, d]`` (torch or numpy, any float dtype; on ``device`` when given, else on
  ``X``'s device); the solve runs in float64.
* ``predict`` / ``predict_proba`` return numpy arrays, as scikit-learn's do (labels may be
  strings); ``coef_``, ``intercept_`` and ``direction_`` are float64 torch tensors on the
  fit's device, since they feed hooks and :mod:`hookscope.analysis`.
* ``coef_`` is ``[1, d]`` for two classes and regression, ``[K, d]`` for ``K`` classes (as
  scikit-learn). ``direction_`` is the unit vector of ``coef_`` in activation space: ``[d]``
  for two classes and regression, ``[K, d]`` (one unit row per class) otherwise.
* ``standardize=True`` fits on ``(X - mean_) / scale_`` and folds the scaling back, so
  ``coef_`` and ``direction_`` act on raw activations; ``mean_`` and ``scale_`` report it.
  The penalty is then on the standardised weights (a different optimum from the raw fit).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.base import BaseEstimator
from torch import Tensor

from hookscope.errors import ProbeError
from hookscope.probes.solve import fit_logistic, fit_ridge, logits, probabilities

__all__ = ["LinearProbe", "TASKS", "as_features", "encode_labels"]

TASKS = ("classification", "regression")


def as_features(X: Any, name: str = "X", device: Any = None) -> Tensor:
    """``X`` as a 2-D floating torch tensor; ProbeError for other ranks, NaN or infinity."""
    if isinstance(X, np.ndarray) or not isinstance(X, Tensor):
        try:
            X = torch.as_tensor(np.asarray(X))
        except (TypeError, ValueError) as e:
            raise ProbeError(f"{name} must be a [rows, features] array or tensor: {e}") from None
    if X.ndim != 2:
        raise ProbeError(f"{name} must be [rows, features]; got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        X = X.to(torch.float32)
    if device is not None:
        X = X.to(device)
    bad = ~torch.isfinite(X)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(1)).flatten()
        raise ProbeError(
            f"{name} has NaN or infinite values in {rows.numel()} rows (first: "
            f"{rows[:5].tolist()}); drop or fix them before probing"
        )
    return X


def encode_labels(y: Any, n: int, name: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """``(classes, codes)``: the sorted distinct labels and each row's index into them."""
    arr = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if arr.ndim != 1:
        raise ProbeError(f"{name} must be one label per row; got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ProbeError(f"{name} has {arr.shape[0]} labels but X has {n} rows; they must align")
    if arr.dtype.kind == "f" and bool(np.isnan(arr).any()):
        raise ProbeError(
            f"{name} has NaN labels at rows {np.flatnonzero(np.isnan(arr))[:5].tolist()}"
        )
    classes, codes = np.unique(arr, return_inverse=True)
    if classes.shape[0] < 2:
        raise ProbeError(
            f"{name} has a single class ({classes[0]!r}); a classification probe needs at least two"
        )
    return classes, codes


class LinearProbe(BaseEstimator):
    """An L2-regularised linear probe: logistic (binary or multinomial) or ridge regression.

    >>> probe = LinearProbe(C=1.0).fit(X_train, y_train)      # doctest: +SKIP
    >>> probe.score(X_test, y_test), probe.direction_.shape    # doctest: +SKIP
    """

    def __init__(
        self,
        task: str = "classification",
        C: float = 1.0,
        alpha: float = 1.0,
        fit_intercept: bool = True,
        standardize: bool = False,
        max_iter: int = 1000,
        tol: float = 1e-8,
        device: Any = None,
    ):
        self.task = task
        self.C = C
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    # scikit-learn reads the estimator type from its tags (>= 1.6) or _estimator_type
    @property
    def _estimator_type(self) -> str:
        return "classifier" if self.task == "classification" else "regressor"

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.estimator_type = self._estimator_type
        if self.task == "classification":
            from sklearn.utils import ClassifierTags

            tags.classifier_tags = ClassifierTags()
        else:
            from sklearn.utils import RegressorTags

            tags.regressor_tags = RegressorTags()
        return tags

    def _check_params(self) -> None:
        if self.task not in TASKS:
            raise ProbeError(f"task must be one of {TASKS}; got {self.task!r}")
        for name in ("C", "alpha", "tol"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
                raise ProbeError(f"{name} must be a positive number; got {value!r}")
        if not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise ProbeError(f"max_iter must be a positive integer; got {self.max_iter!r}")

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> LinearProbe:
        """Fit on ``X [n, d]`` and labels (or targets) ``y [n]``; returns ``self``."""
        self._check_params()
        x = as_features(X, device=self.device).to(torch.float64)
        n = x.shape[0]
        if sample_weight is None:
            w = torch.ones(1, n, dtype=torch.float64, device=x.device)
        else:
            w = torch.as_tensor(np.asarray(sample_weight), dtype=torch.float64, device=x.device)
            if w.shape != (n,) or bool((w < 0).any()) or not bool((w > 0).any()):
                raise ProbeError(f"sample_weight must be {n} non-negative numbers, not all zero")
            w = w[None]
        if self.standardize:
            mean = x.mean(0)
            scale = x.std(0, correction=0)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            x = (x - mean) / scale
        if self.task == "classification":
            arr = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
            if arr.dtype.kind == "f" and not bool(np.all(np.mod(arr[np.isfinite(arr)], 1) == 0)):
                raise ProbeError(
                    "y holds continuous values; a classification probe needs class labels (use "
                    "task='regression' for a continuous target)"
                )
            classes, codes = encode_labels(y, n)
            labels = torch.as_tensor(codes, device=x.device)[None]
            sol = fit_logistic(
                x, labels, w, len(classes), self.C, self.fit_intercept, self.max_iter, self.tol
            )
            self.classes_ = classes
        else:
            t = torch.as_tensor(np.asarray(y, dtype=np.float64), device=x.device)
            if t.shape != (n,):
                raise ProbeError(
                    f"y has shape {tuple(t.shape)} but X has {n} rows; they must align"
                )
            if not bool(torch.isfinite(t).all()):
                raise ProbeError("y has NaN or infinite targets")
            sol = fit_ridge(x, t[None], w, self.alpha, self.fit_intercept)
        coef, intercept = sol.coef[0], sol.intercept[0]
        if self.standardize:
            coef = coef / scale
            intercept = intercept - coef @ mean
            self.mean_, self.scale_ = mean, scale
        self.coef_, self.intercept_ = coef, intercept
        self.n_iter_ = sol.n_iter
        self.converged_ = bool(sol.converged[0])
        if not self.converged_:
            from sklearn.exceptions import ConvergenceWarning

            warnings.warn(
                f"LinearProbe did not reach tol={self.tol} in max_iter={self.max_iter} "
                "iterations; raise max_iter or standardize the features",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.loss_ = float(sol.loss[0])
        self.n_features_in_ = x.shape[1]
        return self

    @classmethod
    def from_coef(cls, coef: Tensor, intercept: Tensor, classes: Any = None, **params: Any):
        """A fitted probe from coefficients ``[K', d]`` and intercepts ``[K']`` on raw
        activations (e.g. one problem of a batched solve, as sweeps keep them)."""
        probe = cls(**params)
        probe.coef_, probe.intercept_ = coef, intercept
        probe.n_features_in_ = coef.shape[-1]
        if classes is not None:
            probe.classes_ = np.asarray(classes)
        return probe

    @property
    def direction_(self) -> Tensor:
        self._check_fitted()
        c = self.coef_
        unit = c / c.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return unit[0] if unit.shape[0] == 1 else unit

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ProbeError("this LinearProbe is not fitted yet; call fit(X, y) first")

    def _features(self, X: Any) -> Tensor:
        self._check_fitted()
        x = as_features(X, device=self.coef_.device).to(torch.float64)
        if x.shape[1] != self.n_features_in_:
            raise ProbeError(
                f"X has {x.shape[1]} features but the probe was fit on {self.n_features_in_}"
            )
        return x

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits ``[n]`` (two classes, regression: the prediction) or ``[n, K]``."""
        z = logits(self._features(X), self.coef_[None], self.intercept_[None])[0]
        z = z[:, 0] if z.shape[1] == 1 else z
        return z.cpu().numpy()

    def predict_proba(self, X: Any) -> Float[np.ndarray, "n k"]:
        """Class probabilities ``[n, K]``, columns in ``classes_`` order."""
        if self.task != "classification":
            raise ProbeError("predict_proba is for task='classification'; this probe regresses")
        p = probabilities(self._features(X), self.coef_[None], self.intercept_[None])[0]
        return p.cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (classification) or values (regression), ``[n]``."""
        self._check_fitted()
        if self.task == "classification":
            return self.classes_[self.predict_proba(X).argmax(1)]
        return self.decision_function(X)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy (classification) or R^2 (regression), as scikit-learn's mixins."""
        from sklearn.metrics import accuracy_score, r2_score

        pred = self.predict(X)
        truth = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
        if self.task == "classification":
            return float(accuracy_score(truth, pred, sample_weight=sample_weight))
        return float(r2_score(truth, pred, sample_weight=sample_weight))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v is not None)
        fitted = ""
        if hasattr(self, "coef_"):
            fitted = f"  # fitted: d={self.n_features_in_}"
            if hasattr(self, "n_iter_"):
                fitted += f", iterations={self.n_iter_}"
            if self.standardize:
                fitted += ", standardised (folded into coef_)"
        return f"LinearProbe({params}){fitted}"
