"""Independent references the experiment tests check actions against: numpy CKA as the
paper writes it, the top principal component removed by SVD, and a report table read back
as a DataFrame. No hookscope code."""

from __future__ import annotations

import numpy as np
import pandas as pd


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s linear CKA, feature-space form, on centred columns."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def without_pc1(x: np.ndarray) -> np.ndarray:
    """``x`` centred, with its first principal component projected out."""
    x = x - x.mean(0)
    v = np.linalg.svd(x, full_matrices=False)[2][0]
    return x - np.outer(x @ v, v)


def table(summary: dict, name: str) -> pd.DataFrame:
    """The table ``name`` of an action's summary (metrics.json) as a DataFrame."""
    t = next(t for t in summary["tables"] if t["name"] == name)
    return pd.DataFrame(t["rows"], columns=t["columns"])
