"""The HookscopeError tree.

Every mistake a user can make (a malformed address, an index out of range, a site an
architecture does not have, an input of the wrong shape) raises a subclass of
:class:`HookscopeError` whose message names what was wrong, the valid choices and, for
names, the closest match. Subclasses also derive from the matching builtin
(``ValueError``, ``KeyError``, ``IndexError``, ``TypeError``) so generic handlers keep
working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "HookscopeError",
    "AddressError",
    "AddressParseError",
    "AddressRangeError",
    "SiteUnavailableError",
    "AdapterError",
    "InputError",
    "CacheKeyError",
    "ModelLoadError",
    "HookError",
    "AnalysisError",
    "StoreError",
    "ProbeError",
    "ExperimentError",
    "closest_match",
    "format_choices",
]


class HookscopeError(Exception):
    """Base class of every error hookscope raises on purpose."""


class AddressError(HookscopeError, ValueError):
    """An address that does not name a component of this model."""


class AddressParseError(AddressError):
    """A string that does not follow the address grammar."""


class AddressRangeError(AddressError, IndexError):
    """A layer, head or neuron index outside the model's range."""


class SiteUnavailableError(AddressError):
    """An address kind or site that this architecture does not have (e.g. pythia's resid_mid)."""


class AdapterError(HookscopeError, TypeError):
    """No adapter fits the wrapped module, or an adapter name is unknown."""


class InputError(HookscopeError, ValueError):
    """Model input of the wrong type, shape or dtype; or a bad argument to a call."""


class CacheKeyError(HookscopeError, KeyError):
    """A cache lookup for an address that was not cached."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ModelLoadError(HookscopeError, OSError):
    """Weights or a tokenizer could not be loaded."""


class HookError(HookscopeError, RuntimeError):
    """A hook function returned something that cannot replace the activation."""


class AnalysisError(HookscopeError, ValueError):
    """Bad input to a function of ``hookscope.analysis`` (NaN/Inf, too few samples, ...)."""


class StoreError(HookscopeError, OSError):
    """An activation-store folder, entry or argument that cannot be used (see hookscope.store)."""


class ProbeError(HookscopeError, ValueError):
    """A probe, sweep, control or eraser given data it cannot use (misaligned labels, one
    class, NaN activations, a missing site or column, too few examples for a split)."""


class ExperimentError(HookscopeError, ValueError):
    """An experiment config, action, run folder or report that cannot be used; the message is
    one line naming the config field's dotted path where there is one."""


def closest_match(word: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``word``, or None when nothing is close."""
    found = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return found[0] if found else None


def format_choices(choices: Iterable[str], limit: int = 12) -> str:
    """``a, b, c`` with an ellipsis and a count past ``limit`` entries."""
    items = [str(c) for c in choices]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items)} in all)"


def suggestion(word: str, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` or an empty string."""
    best = closest_match(word, choices)
    return f" Did you mean {best!r}?" if best is not None else ""
