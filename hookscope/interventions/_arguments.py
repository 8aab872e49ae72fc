"""Checks of the public interventions' arguments, all made before any forward (the model,
the sites, counts and choices, NaN/Inf in float inputs), and of the baseline metric values
a sweep normalises by, made after the baseline runs and before the sweep
(:func:`check_baselines`). The metric itself is checked by :mod:`._inputs`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hookscope.addresses import Address, Selection
from hookscope.errors import InputError, format_choices, suggestion
from hookscope.model import HookedModel

SITE_FORMS = (
    "an address ('head.1.3', 'neuron.0.5', 'resid_pre.2'), a selection ('head.*.*', "
    "'neuron.0-1.*', 'resid_post.*') or a list of them"
)
INPUT_FORMS = "token ids, a list of texts, a tokenizer's dict, or float images"


def check_model(model: Any) -> None:
    """``model`` must be a :class:`HookedModel`."""
    if not isinstance(model, HookedModel):
        raise InputError(
            f"model must be a hookscope HookedModel (hs.HookedModel.wrap(module) or "
            f"hs.zoo.load(name)), got {type(model).__name__}"
        )


def resolve_sites(model: HookedModel, sites: Any) -> list[Address]:
    """The addresses of ``sites``; a wrong type or an empty selection is an InputError,
    a malformed or missing address the :class:`~hookscope.errors.AddressError` that names
    the valid forms."""
    single = isinstance(sites, (str, Address, Selection))
    if not single:
        if not isinstance(sites, Iterable) or isinstance(sites, (Mapping, Tensor, bytes)):
            raise InputError(f"sites must be {SITE_FORMS}; got {type(sites).__name__} {sites!r}")
        sites = list(sites)
        wrong = [s for s in sites if not isinstance(s, (str, Address, Selection))]
        if wrong:
            raise InputError(
                f"sites must be {SITE_FORMS}; the list holds {type(wrong[0]).__name__} {wrong[0]!r}"
            )
    addresses = model.resolve(sites)
    if not addresses:
        raise InputError(f"sites {sites!r} selects no address; sites must be {SITE_FORMS}")
    return addresses


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    """``value`` must be one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        hint = suggestion(value, choices) if isinstance(value, str) else ""
        message = f"{name} must be one of {format_choices(choices)}, got {value!r}"
        raise InputError(message + ("." + hint if hint else ""))


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` must be an int (not a bool, not a float) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_int(value: Any, name: str) -> int:
    """``value`` must be an int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_fraction(value: Any, name: str) -> float:
    """``value`` must be a real number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    if math.isnan(value) or not 0 < value <= 1:
        raise InputError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def check_positions(positions: Any) -> None:
    """``positions`` must be ``"all"``, ``"each"`` or a list of ints (range checked later,
    against the activations)."""
    if isinstance(positions, str):
        if positions not in ("all", "each"):
            hint = suggestion(positions, ("all", "each"))
            raise InputError(
                f"positions must be 'all', 'each' or a list of ints, got {positions!r}"
                + ("." + hint if hint else "")
            )
        return
    if isinstance(positions, Tensor):
        positions = positions.tolist() if positions.ndim == 1 else positions
    if (
        not isinstance(positions, Sequence)
        or not positions
        or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) for p in positions)
    ):
        raise InputError(f"positions must be 'all', 'each' or a list of ints, got {positions!r}")


def check_reference(reference: Any, name: str = "reference") -> None:
    """A reference is inputs; a bare string (``"corrupted"``, ``"mean"``) is refused, since
    it would be read as a one-prompt reference."""
    if isinstance(reference, str):
        raise InputError(
            f"{name} must be inputs ({INPUT_FORMS}), not the string {reference!r}: it would be "
            f"read as a single prompt. Pass the reference inputs themselves (a list [text] for "
            "one prompt)"
        )


def check_finite(inputs: Any, what: str) -> None:
    """Float inputs (images) must hold no NaN or Inf: InputError naming the rows."""
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        return
    bad = ~torch.isfinite(inputs)
    n_bad = int(bad.sum())
    if not n_bad:
        return
    kinds = [k for k, found in (("NaN", inputs.isnan()), ("Inf", inputs.isinf())) if found.any()]
    where = f"{n_bad} value{'s' if n_bad > 1 else ''}"
    if bad.ndim:
        rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist()
        where += f", rows {format_choices(map(str, rows), 8)}"
    raise InputError(
        f"{what} hold {' and '.join(kinds)} ({where}); every score would be NaN. Replace or "
        "drop those rows before patching"
    )


def check_gap(m_clean: float, m_corrupted: float) -> None:
    """Normalised scores divide by ``m_clean - m_corrupted``: refuse equal baselines."""
    if m_clean == m_corrupted:
        raise InputError(
            f"the metric is equal on clean and corrupted runs ({m_clean:.6g}); normalised "
            "scores are undefined — use inputs that differ in the metric, or a plain callable "
            "metric"
        )


def check_baselines(values: dict[str, float], causes: dict[str, str]) -> None:
    """Each baseline metric value (``{"clean": ..., "corrupted": ...}``) must be finite;
    ``causes[name]`` names the inputs of that run."""
    for name, value in values.items():
        if not math.isfinite(value):
            others = ", ".join(f"{k} {v:.6g}" for k, v in values.items() if k != name)
            raise InputError(
                f"the metric is {value} on the {name} baseline run"
                + (f" ({others})" if others else "")
                + f": the metric or {causes[name]} produce {'NaN' if math.isnan(value) else 'Inf'}, "
                "so every score would be NaN. Check the metric on that run's output (and the "
                "inputs and weights for NaN/Inf) before sweeping"
            )
