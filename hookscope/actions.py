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
_LOADED = {"builtin": False, "plugins": False}


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


def _load() -> None:
    if not _LOADED["builtin"]:
        _LOADED["builtin"] = True
        for module in BUILTIN.values():
            importlib.import_module(module)
    if not _LOADED["plugins"]:
        _LOADED["plugins"] = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in _REGISTRY:
                continue
            try:
                obj = ep.load()
            except ImportError as err:
                raise ExperimentError(
                    f"the action plug-in {ep.name!r} ({ep.value}) cannot be imported: {err}"
                ) from None
            if ep.name not in _REGISTRY:
                register(ep.name)(obj)


def available() -> dict[str, type]:
    """Every registered action (built-in and plug-ins), by name."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def get(name: str, where: str = "action.name") -> Action:
    """A fresh instance of the action ``name``."""
    actions = available()
    if name not in actions:
        from hookscope.experiments.spec import _not_one_of

        raise ExperimentError(f"{where}: {_not_one_of(name, list(actions))}")
    return actions[name]()


def describe(name: str) -> list[dict[str, Any]]:
    """The parameters of an action: name, type, default and description."""
    cls = available()[name]
    out = []
    for key, f in cls.Params.model_fields.items():
        out.append(
            {
                "name": key,
                "type": getattr(f.annotation, "__name__", None)
                or str(f.annotation).replace("typing.", ""),
                "default": None if f.is_required() else f.get_default(call_default_factory=True),
                "required": f.is_required(),
                "description": f.description or "",
            }
        )
    return out


def choices_text() -> str:
    return format_choices(available())
