"""The action registry: what ``hookscope run`` can do.

An action is a class with a ``Params`` schema (a pydantic model: its fields are the
``action.params`` a config may set) and three methods::

    @hs.actions.register("my_action")
    class MyAction(hs.actions.Action):
        class Params(hs.actions.Params):
            threshold: float = 0.5
        def prepare(self, context): ...            # read data / activations -> anything
        def run(self, prepared) -> ActionResult: ...
        def summarize(self, result) -> dict: ...    # the report: question, tables, figures

``context`` (:class:`hookscope.experiments.context.Context`) holds the dataset and its
columns, the model, the store and activations, the addresses, the controls, the seed and the
validated params. Third-party packages register actions through the entry-point group
``hookscope.actions`` (``name = "package.module:Class"``); they are loaded on first use.

The built-in actions: feature_detection, feature_comparison, circuit_localization,
polysemanticity, repr_collapse.
"""

from __future__ import annotations

import abc
import importlib
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from hookscope.errors import ExperimentError, format_choices
from hookscope.experiments.spec import Strict

__all__ = [
    "Action",
    "ActionResult",
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "Params",
    "available",
    "describe",
    "get",
    "names",
    "register",
]

ENTRY_POINT_GROUP = "hookscope.actions"
BUILTIN = {
    "feature_detection": "hookscope.experiments.actions.feature_detection",
    "feature_comparison": "hookscope.experiments.actions.feature_comparison",
    "circuit_localization": "hookscope.experiments.actions.circuit_localization",
    "polysemanticity": "hookscope.experiments.actions.polysemanticity",
    "repr_collapse": "hookscope.experiments.actions.repr_collapse",
}
_REGISTRY: dict[str, type] = {}


class Params(Strict):
    """Base of an action's parameter schema (unknown keys are errors)."""


@dataclass
class ActionResult:
    """What an action found: ``metrics`` (whatever its ``summarize`` reads), named ``tables``
    (pandas DataFrames), named matplotlib ``figures`` (saved as PNG and SVG) and per-row
    ``predictions`` (a DataFrame for predictions.parquet, or None)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    predictions: Any = None


class Action(abc.ABC):
    """Base class of actions (see the module docstring); the three methods are abstract."""

    name: str = ""
    Params: type[Params] = Params

    @abc.abstractmethod
    def prepare(self, context: Any) -> Any:
        """Read what the action needs (data, activations through ``context``)."""

    @abc.abstractmethod
    def run(self, prepared: Any) -> ActionResult:
        """Compute the results from what ``prepare`` returned."""

    @abc.abstractmethod
    def summarize(self, result: ActionResult) -> dict:
        """The report record: question, metrics, tables, figures, notes."""


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register an action under ``name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ExperimentError(f"an action name must be an identifier, got {name!r}")

    def decorate(cls: type) -> type:
        missing = [
            m
            for m in ("prepare", "run", "summarize")
            if not callable(getattr(cls, m, None)) or m in getattr(cls, "__abstractmethods__", ())
        ]
        if missing:
            raise ExperimentError(
                f"action {name!r} ({cls.__qualname__}) lacks {', '.join(missing)}"
            )
        params = getattr(cls, "Params", None)
        if not (isinstance(params, type) and issubclass(params, Strict)):
            raise ExperimentError(
                f"action {name!r}: Params must subclass hookscope.actions.Params (a strict "
                "pydantic model)"
            )
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ExperimentError(
                f"action {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _plugin_points() -> dict[str, Any]:
    """The installed plug-ins' entry points, by action name (nothing imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    """Every action name: registered, built-in and installed plug-ins (nothing imported)."""
    return sorted(set(_REGISTRY) | set(BUILTIN) | set(_plugin_points()))


def _load(name: str) -> None:
    """Import what registers ``name``: its built-in module or its plug-in's entry point. A
    plug-in that fails to import raises an ExperimentError naming it and its error."""
    if name in _REGISTRY:
        return
    if name in BUILTIN:
        importlib.import_module(BUILTIN[name])
        return
    ep = _plugin_points().get(name)
    if ep is None:
        return
    try:
        obj = ep.load()
    except Exception as err:  # a third party's import failure, reported with its name
        raise ExperimentError(
            f"the action plug-in {name!r} ({ep.value}) cannot be imported: "
            f"{type(err).__name__}: {err}"
        ) from err
    if name not in _REGISTRY:
        register(name)(obj)


def available() -> dict[str, type]:
    """Every action that loads, by name (built-in and plug-ins). A plug-in that cannot be
    imported is left out with a warning naming it, so one broken package does not stop the
    others; asking for it by name (:func:`get`) raises its error."""
    for name in names():
        try:
            _load(name)
        except ExperimentError as err:
            warnings.warn(f"{err}; it is left out", stacklevel=2)
    return dict(sorted(_REGISTRY.items()))


def get(name: str, where: str = "action.name") -> Action:
    """A fresh instance of the action ``name`` (only its own module is imported)."""
    if name not in names():
        from hookscope.experiments.spec import _not_one_of

        raise ExperimentError(f"{where}: {_not_one_of(name, names())}")
    _load(name)
    return _REGISTRY[name]()


def _type_text(annotation: Any) -> str:
    """A parameter's type as a user reads it: a Literal's choices, ``X | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:  # list[str], dict[str, float]
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def describe(name: str) -> list[dict[str, Any]]:
    """The parameters of an action: name, type, default and description."""
    cls = available()[name]
    out = []
    for key, f in cls.Params.model_fields.items():
        out.append(
            {
                "name": key,
                "type": _type_text(f.annotation),
                "default": None if f.is_required() else f.get_default(call_default_factory=True),
                "required": f.is_required(),
                "description": f.description or "",
            }
        )
    return out


def choices_text() -> str:
    return format_choices(available())
