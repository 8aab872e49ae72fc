"""The run config: strict schemas, YAML loading, ``--set`` overrides and one-line errors.

Every mistake becomes an :class:`~hookscope.errors.ExperimentError` whose message is one line
naming the field's dotted path: ``action.params.metric: 'acuracy' is not one of accuracy,
f1, auroc; did you mean 'accuracy'?``; unknown keys name the closest valid key; YAML syntax
errors give the line and column.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hookscope.errors import ExperimentError, closest_match, format_choices

__all__ = [
    "ActionSpec",
    "ControlSpec",
    "DatasetSpec",
    "ExtractionSpec",
    "RunSpec",
    "Strict",
    "apply_overrides",
    "config_hash",
    "describe_error",
    "load_spec",
    "validate",
]

TASKS = ("agreement", "ioi", "induction", "factual", "digits")
DTYPES = ("float32", "float16", "bfloat16")
CONTROL_NAMES = ("shuffle", "random_features", "control_task", "random_init")
SEED_MAX = 2**32 - 1  # numpy's RandomState takes seeds in 0 .. 2**32 - 1


class Strict(BaseModel):
    """Unknown keys are errors; values are not coerced across types; inf and NaN are not
    numbers a config may hold."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True, allow_inf_nan=False)


class DatasetSpec(Strict):
    """Where the rows come from and how probes split them.

    ``name``: a task of :mod:`hookscope.data` (agreement, ioi, induction, factual, digits) or
    ``files`` with ``path`` (a ``save_to_disk`` folder, or a CSV / JSON / Parquet file).
    ``options``: keyword arguments of the task's generator (e.g. ``{verbs: [is]}`` for
    agreement, ``{corruption: abc}`` for ioi, ``{prefix_len: [4, 12]}`` for induction)."""

    name: str
    n: int | None = Field(None, gt=0)
    path: str | None = None
    source_split: str = "train"
    text_column: str | None = None
    label_column: str = "label"
    options: dict[str, Any] = Field(default_factory=dict)
    split: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "test": 0.2})

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in (*TASKS, "files"):
            raise ValueError(_not_one_of(v, (*TASKS, "files")))
        return v

    @model_validator(mode="after")
    def _read(self) -> DatasetSpec:
        """A field the named dataset does not read is a mistake, not a silent no-op."""
        if self.path is not None and self.name != "files":
            raise ValueError(f"path is read by name: files only, not by {self.name!r}")
        if self.name == "digits" and self.options:
            raise ValueError(f"digits takes no options; got {sorted(self.options)}")
        if self.name == "digits" and self.text_column is not None:
            raise ValueError("digits are images: text_column does not apply")
        return self

    @field_validator("split")
    @classmethod
    def _parts(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = [k for k in v if k not in ("train", "val", "test")]
        if unknown:
            raise ValueError(f"unknown part {unknown[0]!r}; parts are train, val, test")
        if "train" not in v or "test" not in v:
            raise ValueError("needs at least train and test")
        if any(x <= 0 for x in v.values()) or abs(sum(v.values()) - 1) > 1e-6:
            raise ValueError(f"fractions must be positive and sum to 1, got {v}")
        return v


class ExtractionSpec(Strict):
    """Which model, which sites, which positions; stored in ``store`` (default: the run's
    ``store/`` folder)."""

    model: str
    sites: list[str] = Field(min_length=1)
    positions: str | int | list[int] = "last"
    batch_size: int = Field(32, gt=0)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    store: str | None = None
    device: str = "cpu"


class ActionSpec(Strict):
    """The action's registered name and its parameters (checked by the action's schema)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ControlSpec(Strict):
    """A baseline: shuffle, random_features, control_task (``key``: the type column) or
    random_init."""

    name: str
    key: str | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in CONTROL_NAMES:
            raise ValueError(_not_one_of(v, CONTROL_NAMES))
        return v


class RunSpec(Strict):
    """One run: data, extraction, one action, its controls, where the outputs go."""

    run_name: str = Field(min_length=1)
    question: str | None = None
    seed: int = Field(0, ge=0, le=SEED_MAX)
    dataset: DatasetSpec
    extraction: ExtractionSpec
    action: ActionSpec
    controls: list[ControlSpec] = Field(default_factory=list)
    output_dir: str | None = None

    @field_validator("controls")
    @classmethod
    def _once(cls, v: list[ControlSpec]) -> list[ControlSpec]:
        seen = [c.name for c in v]
        twice = sorted({n for n in seen if seen.count(n) > 1})
        if twice:
            raise ValueError(f"{twice[0]!r} is listed twice; each control runs once")
        return v

    @field_validator("run_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError("use letters, digits, '_', '-' and '.' only (it names a folder)")
        if v in (".", ".."):  # runs/. and runs/.. are not folders of their own
            raise ValueError(
                f"{v!r} names no folder of its own; use letters, digits, '_', '-' and '.'"
            )
        return v

    @field_validator("controls", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": c} if isinstance(c, str) else c for c in v]
        return v

    @property
    def control_names(self) -> list[str]:
        return [c.name for c in self.controls]


# ---------------------------------------------------------------------------- errors
def _not_one_of(value: Any, choices: tuple | list) -> str:
    best = closest_match(str(value), choices)
    hint = f"; did you mean {best!r}?" if best else ""
    return f"{value!r} is not one of {format_choices(choices)}{hint}"


def _path(loc: tuple, prefix: str = "") -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in ("function-after[_known(), str]",) or str(item).startswith("function-"):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "(config)"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the (nested) model that ``loc`` points into."""
    current: Any = model
    for item in loc[:-1]:
        if isinstance(item, int) or not (
            isinstance(current, type) and issubclass(current, BaseModel)
        ):
            continue
        field = current.model_fields.get(str(item))
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        nested = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = nested[0] if nested else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def describe_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first error of ``err`` as one line naming the field's dotted path."""
    e = err.errors(include_url=False)[0]
    loc = tuple(e["loc"])
    where = _path(loc, prefix)
    kind = e["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(model, loc)
        best = closest_match(str(loc[-1]), valid)
        hint = f"; did you mean {best!r}?" if best else ""
        return f"{where}: unknown key; valid keys: {format_choices(valid)}{hint}"
    if kind == "missing":
        return f"{where}: required but missing"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", e.get("ctx", {}).get("expected", ""))
        return f"{where}: {_not_one_of(e.get('input'), choices)}"
    msg = e["msg"]
    msg = msg.removeprefix("Value error, ")
    shown = e.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{where}: {msg} (got {shown!r})"
    return f"{where}: {msg}"


def validate(model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    """``model.model_validate(data)`` with the one-line error."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ExperimentError(describe_error(err, model, prefix)) from None


# ---------------------------------------------------------------------------- loading
class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ExperimentError(f"{where}: malformed YAML{at}: {problem}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``--set a.b.c=value`` (the value read as YAML: numbers, lists, booleans)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ExperimentError(f"--set {item}: use dotted.path=value, e.g. --set seed=1")
        value = _parse_yaml(raw, f"--set {item}")
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ExperimentError(
                    f"--set {item}: {where} is a {type(child).__name__}, not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return out


def load_spec(path: str | Path, overrides: list[str] | tuple = ()) -> tuple[RunSpec, dict]:
    """The validated run config of a YAML file with ``--set`` overrides applied, and the raw
    (overridden) mapping."""
    p = Path(path)
    if not p.is_file():
        raise ExperimentError(f"{path}: no such config file")
    data = _parse_yaml(p.read_text(), str(path))
    if not isinstance(data, dict):
        raise ExperimentError(
            f"{path}: a config is a YAML mapping (run_name, dataset, ...), got {type(data).__name__}"
        )
    data = apply_overrides(data, list(overrides))
    return validate(RunSpec, data), data


def config_hash(spec: RunSpec) -> str:
    """sha256 of the resolved config (canonical JSON), without ``output_dir``."""
    data = spec.model_dump(mode="json", exclude={"output_dir"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
