"""What an action sees: the data, the model, the store, the addresses, the controls.

:func:`load_model` and :func:`load_dataset` turn the config's ``extraction.model`` and
``dataset`` into a :class:`~hookscope.HookedModel` and a ``datasets.Dataset``; every failure
is one :class:`~hookscope.errors.ExperimentError` line naming the config field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hookscope.errors import ExperimentError, HookscopeError, format_choices
from hookscope.experiments.spec import TASKS, DatasetSpec, RunSpec

__all__ = [
    "Context",
    "check_sites",
    "dataset_files",
    "load_dataset",
    "load_model",
    "model_files",
]

DATA_FILES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_model(name: str, device: str = "cpu") -> Any:
    """A zoo name, a local model folder, or a Hugging Face hub name (read from the local
    cache when offline)."""
    from hookscope import zoo
    from hookscope.model import HookedModel

    try:
        if name in zoo.names():
            return zoo.load(name, device=device)
        return HookedModel.from_pretrained(name, device=device)
    except HookscopeError as err:
        first = " ".join(str(err).split())
        raise ExperimentError(f"extraction.model: cannot load {name!r}: {first}") from None


def load_dataset(spec: DatasetSpec, model: Any, seed: int) -> tuple[Any, str | None, str | None]:
    """``(dataset, text_column, input_column)`` for the config's ``dataset``."""
    import datasets

    from hookscope import data as hs_data

    tok = getattr(model, "tokenizer", None)
    text, image = spec.text_column, None
    n = spec.n
    if spec.name == "files":
        if spec.path is None:
            raise ExperimentError("dataset.path: required when dataset.name is 'files'")
        path = Path(spec.path)
        if path.is_dir():
            try:
                ds = datasets.load_from_disk(str(path))
            except (FileNotFoundError, ValueError) as err:
                raise ExperimentError(
                    f"dataset.path: {path} is not a saved dataset ({err})"
                ) from None
            if isinstance(ds, datasets.DatasetDict):
                if spec.source_split not in ds:
                    raise ExperimentError(
                        f"dataset.source_split: {spec.source_split!r} is not a split of {path}; "
                        f"splits: {format_choices(ds)}"
                    )
                ds = ds[spec.source_split]
        elif path.is_file():
            if path.suffix not in DATA_FILES:
                raise ExperimentError(f"dataset.path: a data file ends in {', '.join(DATA_FILES)}")
            try:
                ds = datasets.load_dataset(
                    DATA_FILES[path.suffix], data_files=str(path), split="train"
                )
            except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
                raise ExperimentError(
                    f"dataset.path: cannot read {path}: {' '.join(str(err).split())}"
                ) from None
        else:
            raise ExperimentError(f"dataset.path: {path} does not exist")
        text = text or ("text" if "text" in ds.column_names else None)
        if "image" in ds.column_names and text is None:
            image = "image"
    elif spec.name == "digits":
        try:
            ds = hs_data.digits(spec.source_split)
        except HookscopeError as err:
            raise ExperimentError(f"dataset.source_split: {' '.join(str(err).split())}") from None
        image, text = "image", None
    elif spec.name == "induction":  # token ids: no tokenizer needed
        vocab = getattr(getattr(model.model, "config", None), "vocab_size", None)
        if vocab is None:
            raise ExperimentError(
                "dataset.name: induction needs a language model with a vocab_size"
            )
        ds = _generate(hs_data.induction, spec, n or 500, vocab_size=vocab, seed=seed)
        text = text or "tokens"
    elif tok is None:
        raise ExperimentError(
            f"dataset.name: {spec.name!r} is a text task and this model has no tokenizer (use "
            "induction for token-id models, digits for the vision models)"
        )
    elif spec.name == "agreement":
        ds = _generate(hs_data.agreement, spec, n or 1000, seed=seed, tokenizer=tok)
        text = text or "prompt"
    elif spec.name == "ioi":
        ds = _generate(hs_data.ioi, spec, tok, n or 100, seed=seed)
        text = text or "clean"
    elif spec.name == "factual":
        ds = _generate(hs_data.factual_recall, spec, tok)
        text = text or "prompt"
    else:
        raise ExperimentError(
            f"dataset.name: {spec.name!r} is not a known dataset ({', '.join(TASKS)})"
        )
    if n is not None and spec.name in ("digits", "files", "factual"):  # the others make n rows
        if n > len(ds):
            raise ExperimentError(f"dataset.n: {n} rows asked, the dataset has {len(ds)}")
        ds = ds.select(range(n))
    column = text or image
    if column is not None and column not in ds.column_names:
        raise ExperimentError(
            f"dataset.text_column: {column!r} is not a column; columns: {format_choices(ds.column_names)}"
        )
    return ds, text, image


def dataset_files(spec: DatasetSpec) -> list[Path]:
    """The files a ``files`` dataset is read from: its data file, or every file of its saved
    folder (sorted); none for the generated tasks and digits (their rows follow from the
    config) or for a path that does not exist (:func:`load_dataset` reports that)."""
    if spec.name != "files" or spec.path is None:
        return []
    path = Path(spec.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return []


def model_files(name: str) -> list[Path]:
    """The files of ``extraction.model`` when it is a local model folder (sorted); none for a
    zoo name or a hub name (a zoo model ships with hookscope's version; a hub snapshot is
    named by its commit)."""
    path = Path(name)
    if not path.is_dir():  # checked first: the zoo's names import nothing heavy then
        return []
    from hookscope import zoo

    if name in zoo.names():
        return []
    return sorted(p for p in path.rglob("*") if p.is_file())


def _generate(task: Any, spec: DatasetSpec, *args: Any, **kwargs: Any) -> Any:
    """A task generator of :mod:`hookscope.data` with the config's ``dataset.options``."""
    options = dict(spec.options)
    taken = sorted(set(options) & set(kwargs))
    if taken:
        raise ExperimentError(f"dataset.options: {taken} are set by the config's other fields")
    if tuple(options) and spec.name in ("digits",):
        raise ExperimentError("dataset.options: digits takes no options")
    if tuple(options):
        import inspect

        allowed = [p for p in inspect.signature(task).parameters if p not in kwargs][len(args) :]
        unknown = [k for k in options if k not in allowed]
        if unknown:
            raise ExperimentError(
                f"dataset.options.{unknown[0]}: not an option of {spec.name}; options: "
                f"{format_choices(allowed)}"
            )
    try:
        return task(*args, **kwargs, **options)
    except HookscopeError as err:
        raise ExperimentError(f"dataset: {' '.join(str(err).split())}") from None


def check_sites(model: Any, sites: list[str]) -> None:
    """Every ``extraction.sites`` entry names something the model has."""
    for i, site in enumerate(sites):
        try:
            found = model.resolve(site)
        except HookscopeError as err:
            raise ExperimentError(f"extraction.sites[{i}]: {' '.join(str(err).split())}") from None
        if not found:
            raise ExperimentError(f"extraction.sites[{i}]: {site!r} matches nothing on this model")


@dataclass
class Context:
    """Everything an action may use (see :mod:`hookscope.actions`)."""

    spec: RunSpec
    params: Any
    model: Any
    dataset: Any
    text_column: str | None
    input_column: str | None
    store: Any
    output_dir: Path
    progress: bool = True
    index: list[dict] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def sites(self) -> list[str]:
        return list(self.spec.extraction.sites)

    @property
    def controls(self) -> list[str]:
        return self.spec.control_names

    @property
    def label_column(self) -> str:
        return self.spec.dataset.label_column

    def control_key(self, default: str | None = None) -> str | None:
        """The type column of the control_task control (its ``key``, else ``default``)."""
        for c in self.spec.controls:
            if c.name == "control_task":
                return c.key or default
        return None

    def require_column(self, name: str, where: str) -> None:
        if name not in self.dataset.column_names:
            raise ExperimentError(
                f"{where}: {name!r} is not a column of the dataset; columns: "
                f"{format_choices(self.dataset.column_names)}"
            )

    def extract_options(self) -> dict[str, Any]:
        """The ``ActivationStore.extract`` keywords every extraction of this run shares: the
        config's batch size and dtype, the progress setting and the input column."""
        ex = self.spec.extraction
        column = (
            {"text_column": self.text_column}
            if self.text_column
            else {"input_column": self.input_column}
        )
        return {"batch_size": ex.batch_size, "dtype": ex.dtype, "progress": self.progress, **column}

    def activations(
        self,
        sites: Any = None,
        positions: Any = None,
        model: Any = None,
        dataset: Any = None,
        label: str = "model",
    ) -> Any:
        """Activations of ``sites`` (default: the config's) from the store: extracted once
        (resumable, with a progress bar), then read without a forward. Recorded in the run's
        ``activations_index.json``."""
        ex = self.spec.extraction
        model = model if model is not None else self.model
        data = dataset if dataset is not None else self.dataset
        before = {e["key"] for e in self.store.list() if e["state"] == "complete"}
        acts = self.store.extract(
            model,
            data,
            sites if sites is not None else ex.sites,
            positions if positions is not None else ex.positions,
            **self.extract_options(),
        )
        self.index.append(
            {
                "key": acts.key,
                "model": label,
                "sites": acts.sites,
                "rows": acts.n_rows,
                "positions": acts.manifest["key_fields"]["positions"],
                "store": str(self.store.folder),
                "action": "read" if acts.key in before else "written",
            }
        )
        return acts
