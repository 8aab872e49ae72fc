"""A fixed, curated set of well-known facts as prompt/answer pairs, for real language models.

Each fact is a prompt that a model completes with one word, e.g. "The Eiffel Tower is
located in the city of" -> " Paris". Relations: capitals, landmark cities, official
languages, currencies, the sport of famous athletes, professions of famous people and the
companies behind well-known products (see :data:`RELATIONS`).

Schema of :func:`factual_recall`:

================= ====== ==============================================================
column            type   meaning
================= ====== ==============================================================
``prompt``        string the prompt, ending just before the answer
``answer``        string the answer with its leading space (" Paris")
``relation``      string one of :data:`RELATIONS`
``subject``       string the entity the fact is about, as written in the prompt
``answer_id``     int64  token id of ``answer`` after ``prompt``      (with a tokenizer)
``subject_first`` int64  position of the subject's first token        (with a tokenizer)
``subject_pos``   int64  position of the subject's last token         (with a tokenizer)
``end_pos``       int64  position of the prompt's last token          (with a tokenizer)
================= ====== ==============================================================

Positions index ``tokenizer(prompt)`` with the tokenizer's default special tokens (what
``HookedModel.to_tokens`` builds). With a tokenizer, only facts whose answer is a single
token after the prompt are kept; the others are dropped with a warning that names them
(the count is also in ``dataset.info.description``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

from datasets import Dataset, DatasetInfo, Features, Value

from hookscope.data._tokens import (
    check_tokenizer,
    next_token_ids,
    split_pieces,
    token_at,
    tokenizer_name,
)
from hookscope.errors import InputError, format_choices, suggestion

__all__ = ["Fact", "FACTS", "RELATIONS", "factual_recall"]


class Fact(NamedTuple):
    relation: str
    subject: str
    prompt: str
    answer: str


def _facts(relation: str, form: str, pairs: Sequence[tuple[str, str]]) -> list[Fact]:
    return [Fact(relation, s, form.format(s), " " + a) for s, a in pairs]


FACTS: tuple[Fact, ...] = tuple(
    _facts(
        "capital",
        "The capital of {} is",
        [
            ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
            ("Spain", "Madrid"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
            ("Canada", "Ottawa"), ("Greece", "Athens"), ("Kenya", "Nairobi"),
            ("Norway", "Oslo"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"),
            ("Poland", "Warsaw"), ("Austria", "Vienna"),
        ],
    )
    + _facts(
        "landmark_city",
        "{} is located in the city of",
        [
            ("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("Big Ben", "London"),
            ("The Brandenburg Gate", "Berlin"), ("The Kremlin", "Moscow"),
            ("The Sagrada Familia", "Barcelona"), ("The Acropolis", "Athens"),
            ("The Space Needle", "Seattle"), ("The Louvre", "Paris"),
            ("The Forbidden City", "Beijing"),
        ],
    )
    + _facts(
        "official_language",
        "The official language of {} is",
        [
            ("Brazil", "Portuguese"), ("France", "French"), ("Germany", "German"),
            ("Japan", "Japanese"), ("Mexico", "Spanish"), ("Italy", "Italian"),
            ("Russia", "Russian"), ("Egypt", "Arabic"), ("the Netherlands", "Dutch"),
            ("Greece", "Greek"), ("Sweden", "Swedish"), ("Poland", "Polish"),
            ("Turkey", "Turkish"),
        ],
    )
    + _facts(
        "currency",
        "The currency of {} is the",
        [
            ("Japan", "yen"), ("the United States", "dollar"), ("India", "rupee"),
            ("Russia", "ruble"), ("the United Kingdom", "pound"), ("Germany", "euro"),
        ],
    )
    + _facts(
        "sport",
        "{} became famous for playing professional",
        [
            ("Michael Jordan", "basketball"), ("Tiger Woods", "golf"),
            ("Roger Federer", "tennis"), ("Wayne Gretzky", "hockey"),
            ("Babe Ruth", "baseball"),
        ],
    )
    + _facts(
        "profession",
        "{} was a famous",
        [
            ("Albert Einstein", "physicist"), ("Pablo Picasso", "painter"),
            ("Wolfgang Amadeus Mozart", "composer"), ("Ludwig van Beethoven", "composer"),
            ("Vincent van Gogh", "painter"), ("Charles Darwin", "naturalist"),
        ],
    )
    + _facts(
        "maker",
        "{} is made by the company",
        [
            ("The iPhone", "Apple"), ("The PlayStation", "Sony"), ("The Corolla", "Toyota"),
            ("The Xbox", "Microsoft"), ("The Galaxy smartphone", "Samsung"),
            ("The Pixel phone", "Google"),
        ],
    )
)  # fmt: skip

RELATIONS: tuple[str, ...] = tuple(dict.fromkeys(f.relation for f in FACTS))

FEATURES = Features(
    {
        "prompt": Value("string"),
        "answer": Value("string"),
        "relation": Value("string"),
        "subject": Value("string"),
    }
)
TOKEN_FEATURES = {
    "answer_id": Value("int64"),
    "subject_first": Value("int64"),
    "subject_pos": Value("int64"),
    "end_pos": Value("int64"),
}


def factual_recall(tokenizer: Any = None, *, relations: Sequence[str] | None = None) -> Dataset:
    """The curated facts of :data:`FACTS` as a Dataset (schema in the module docstring).

    ``relations`` keeps only some relations (names from :data:`RELATIONS`). With a
    ``tokenizer``, facts whose answer is not one token after the prompt are dropped (with a
    warning naming them) and token ids and positions are added; InputError if none remain.

    Example::

        facts = factual_recall(model.tokenizer)
        logits = model(list(facts["prompt"]))  # read at facts["end_pos"], compare answer_id
    """
    facts = list(FACTS)
    if relations is not None:
        if isinstance(relations, str) or not isinstance(relations, Sequence) or not relations:
            raise InputError(
                f"relations must be a non-empty list of names from {format_choices(RELATIONS)}"
            )
        for r in relations:
            if r not in RELATIONS:
                raise InputError(
                    f"unknown relation {r!r}; valid: {format_choices(RELATIONS)}."
                    + suggestion(str(r), RELATIONS)
                )
        facts = [f for f in facts if f.relation in relations]
    description = f"factual recall: {len(facts)} facts"
    features = dict(FEATURES)
    rows: dict[str, list[Any]] = {k: [getattr(f, k) for f in facts] for k in FEATURES}
    if tokenizer is not None:
        check_tokenizer(tokenizer, "factual_recall")
        rows, dropped = _with_tokens(rows, tokenizer)
        features.update(TOKEN_FEATURES)
        name = tokenizer_name(tokenizer)
        if not rows["prompt"]:
            raise InputError(
                f"tokenizer {name} splits the answer of every fact into several tokens "
                f"({_shown(dropped)}); factual_recall keeps single-token answers only"
            )
        if dropped:
            message = (
                f"factual_recall kept {len(rows['prompt'])} of {len(facts)} facts; dropped "
                f"{len(facts) - len(rows['prompt'])} whose answer is not a single token for "
                f"tokenizer {name}: {_shown(dropped)}"
            )
            warnings.warn(message, stacklevel=2)
            description = message
        else:
            description += f", all answers single tokens for tokenizer {name}"
    return Dataset.from_dict(
        rows, info=DatasetInfo(description=description, features=Features(features))
    )


def _shown(dropped: dict[str, list[str]]) -> str:
    return format_choices(f"{a!r} -> {p}" for a, p in dropped.items())


def _with_tokens(
    rows: dict[str, list[Any]], tokenizer: Any
) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
    """Rows with single-token answers plus their token columns, and each dropped answer's pieces."""
    ids = next_token_ids(tokenizer, rows["prompt"], rows["answer"])
    dropped = {
        rows["answer"][i]: split_pieces(tokenizer, rows["prompt"][i], rows["answer"][i])
        for i, a in enumerate(ids)
        if a is None
    }
    keep = [i for i, a in enumerate(ids) if a is not None]
    out = {k: [v[i] for i in keep] for k, v in rows.items()}
    out["answer_id"] = [ids[i] for i in keep]
    enc = tokenizer(out["prompt"], return_offsets_mapping=True) if keep else {}
    out["subject_first"], out["subject_pos"], out["end_pos"] = [], [], []
    for j, (prompt, subject) in enumerate(zip(out["prompt"], out["subject"], strict=True)):
        offsets = enc["offset_mapping"][j]
        start = prompt.index(subject)
        out["subject_first"].append(token_at(offsets, start))
        out["subject_pos"].append(token_at(offsets, start + len(subject) - 1))
        out["end_pos"].append(token_at(offsets, len(prompt) - 1))
    return out, dropped
