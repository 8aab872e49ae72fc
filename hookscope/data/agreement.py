"""Subject-verb number agreement sentences with labels, for probing.

Each prompt is a sentence subject that stops just before its verb; the number of the verb
is fixed by the subject noun, not by the noun of the prepositional phrase after it (the
attractor)::

    The key near the cabinets     ->  " is"  (not " are")      label 0 (singular)
    The teachers behind the door  ->  " were" (not " was")     label 1 (plural)

With ``attractors=False`` the subject has an adjective instead ("The old keys"). Rows are
balanced: subject labels differ in count by at most one, and within each label so do the
attractor numbers (half congruent, half not). Prompts are distinct (no duplicate inputs to
leak between a probe's train and test splits). The verb pair does not change the prompt; pairs
are spread evenly over the rows (counts differ by at most one), independently of the prompt.

Schema of :func:`agreement`:

================== ==================== ====================================================
column             type                 meaning
================== ==================== ====================================================
``prompt``         string               the sentence up to (not including) the verb
``subject``        string               the subject noun as written ("keys")
``label``          ClassLabel           number of the subject: 0 singular, 1 plural
``attractor``      string or None       the attractor noun as written; None without
``attractor_label`` ClassLabel          number of the attractor; -1 without attractor
``congruent``      bool or None         attractor number == subject number; None without
``correct_verb``   string               the verb agreeing with the subject (" is")
``incorrect_verb`` string               the same verb in the other number (" are")
``correct``        int64                token id of ``correct_verb``   (with a tokenizer)
``incorrect``      int64                token id of ``incorrect_verb`` (with a tokenizer)
``subject_pos``    int64                position of the subject noun's last token
``end_pos``        int64                position of the prompt's last token
================== ==================== ====================================================

Positions index ``tokenizer(prompt)`` with the tokenizer's default special tokens (what
``HookedModel.to_tokens`` builds). The verb ids are checked to be one token after each
prompt; a tokenizer that splits a verb raises InputError.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from datasets import ClassLabel, Dataset, DatasetInfo, Features, Value

from hookscope.data._tokens import (
    check_tokenizer,
    next_token_ids,
    split_pieces,
    token_at,
    tokenizer_name,
)
from hookscope.errors import InputError, format_choices, suggestion

__all__ = ["NOUNS", "PREPOSITIONS", "ADJECTIVES", "VERB_PAIRS", "LABELS", "agreement"]

LABELS = ("singular", "plural")

#: (singular, plural); regular and irregular plurals, people and things.
NOUNS: tuple[tuple[str, str], ...] = (
    ("key", "keys"), ("cabinet", "cabinets"), ("table", "tables"), ("box", "boxes"),
    ("book", "books"), ("lamp", "lamps"), ("chair", "chairs"), ("window", "windows"),
    ("door", "doors"), ("picture", "pictures"), ("bottle", "bottles"), ("letter", "letters"),
    ("car", "cars"), ("house", "houses"), ("tree", "trees"), ("bridge", "bridges"),
    ("teacher", "teachers"), ("doctor", "doctors"), ("student", "students"),
    ("farmer", "farmers"), ("dog", "dogs"), ("child", "children"), ("man", "men"),
    ("woman", "women"), ("mouse", "mice"), ("person", "people"), ("glass", "glasses"),
    ("church", "churches"), ("city", "cities"), ("painting", "paintings"),
)  # fmt: skip

PREPOSITIONS: tuple[str, ...] = (
    "near", "behind", "beside", "next to", "above", "under", "across from", "in front of",
)  # fmt: skip

ADJECTIVES: tuple[str, ...] = ("old", "new", "small", "big", "red", "blue", "green", "dark")

#: singular verb -> plural verb (each used with its leading space).
VERB_PAIRS: dict[str, str] = {"is": "are", "was": "were", "has": "have"}

FEATURES = Features(
    {
        "prompt": Value("string"),
        "subject": Value("string"),
        "label": ClassLabel(names=list(LABELS)),
        "attractor": Value("string"),
        "attractor_label": ClassLabel(names=list(LABELS)),
        "congruent": Value("bool"),
        "correct_verb": Value("string"),
        "incorrect_verb": Value("string"),
    }
)
TOKEN_FEATURES = {
    "correct": Value("int64"),
    "incorrect": Value("int64"),
    "subject_pos": Value("int64"),
    "end_pos": Value("int64"),
}


def agreement(
    n: int,
    seed: int = 0,
    attractors: bool = True,
    tokenizer: Any = None,
    *,
    verbs: Sequence[str] = ("is", "was", "has"),
) -> Dataset:
    """``n`` distinct subject-verb agreement prompts with balanced subject-number labels.

    ``attractors`` adds a prepositional phrase with a noun of either number after the
    subject; ``verbs`` picks verb pairs by their singular form (keys of :data:`VERB_PAIRS`).
    With a ``tokenizer`` the verb token ids and the subject's token position are added (the
    schema is in the module docstring).

    Example::

        ds = agreement(200, tokenizer=model.tokenizer)
        ds[0]["prompt"], ds[0]["label"], ds[0]["subject_pos"]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InputError(f"agreement needs a positive number of sentences n, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    if not isinstance(attractors, bool):
        raise InputError(f"attractors must be True or False, got {attractors!r}")
    verb_list = _verbs(verbs)
    if tokenizer is not None:
        check_tokenizer(tokenizer, "agreement")
    attractor_labels = (0, 1) if attractors else (None,)
    per_cell = len(NOUNS) * (
        (len(NOUNS) - 1) * len(PREPOSITIONS) if attractors else len(ADJECTIVES)
    )
    capacity = 2 * len(attractor_labels) * per_cell
    if n > capacity:
        raise InputError(
            f"agreement(attractors={attractors}) has {capacity} distinct prompts; n={n} is more"
        )

    # balanced plan: the label alternates fastest, then the attractor number
    cells = [(label, attr) for attr in attractor_labels for label in (0, 1)]
    counts = [len(range(c, n, len(cells))) for c in range(len(cells))]
    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {k: [] for k in FEATURES}
    for (label, attr), k in zip(cells, counts, strict=True):
        for index in rng.sample(range(per_cell), k):
            _add_row(rows, label, attr, index, attractors)
    # verb pairs do not change the prompt: spread them evenly, independently of it
    verbs_per_row = [verb_list[j % len(verb_list)] for j in range(n)]
    rng.shuffle(verbs_per_row)
    for verb, label in zip(verbs_per_row, rows["label"], strict=True):
        forms = (verb, VERB_PAIRS[verb])
        rows["correct_verb"].append(" " + forms[label])
        rows["incorrect_verb"].append(" " + forms[1 - label])
    order = list(range(n))
    rng.shuffle(order)
    rows = {key: [values[i] for i in order] for key, values in rows.items()}

    features = dict(FEATURES)
    if tokenizer is not None:
        _add_token_columns(rows, tokenizer)
        features.update(TOKEN_FEATURES)
    description = (
        f"subject-verb agreement: n={n}, seed={seed}, attractors={attractors}, verbs={verb_list}"
    )
    return Dataset.from_dict(
        rows, info=DatasetInfo(description=description, features=Features(features))
    )


def _verbs(verbs: Sequence[str]) -> list[str]:
    if isinstance(verbs, str) or not isinstance(verbs, Sequence) or not verbs:
        raise InputError(
            f"verbs must be a non-empty list of singular verbs from {format_choices(VERB_PAIRS)}, "
            f"got {verbs!r}"
        )
    for v in verbs:
        if v not in VERB_PAIRS:
            raise InputError(
                f"unknown verb {v!r}; valid (singular forms): {format_choices(VERB_PAIRS)}."
                + suggestion(str(v), VERB_PAIRS)
            )
    return list(dict.fromkeys(verbs))


def _add_row(
    rows: dict[str, list[Any]], label: int, attr: int | None, index: int, attractors: bool
) -> None:
    """Decode ``index`` into (subject, attractor or adjective, preposition) and add the row."""
    if attractors:
        index, prep = divmod(index, len(PREPOSITIONS))
        subject_noun, other = divmod(index, len(NOUNS) - 1)
        other += other >= subject_noun  # the attractor is never the subject's own noun
        subject = NOUNS[subject_noun][label]
        attractor = NOUNS[other][attr]
        prompt = f"The {subject} {PREPOSITIONS[prep]} the {attractor}"
    else:
        subject_noun, adj = divmod(index, len(ADJECTIVES))
        subject = NOUNS[subject_noun][label]
        attractor = None
        prompt = f"The {ADJECTIVES[adj]} {subject}"
    rows["prompt"].append(prompt)
    rows["subject"].append(subject)
    rows["label"].append(label)
    rows["attractor"].append(attractor)
    rows["attractor_label"].append(-1 if attr is None else attr)
    rows["congruent"].append(None if attr is None else attr == label)


def _add_token_columns(rows: dict[str, list[Any]], tokenizer: Any) -> None:
    prompts = rows["prompt"]
    correct = next_token_ids(tokenizer, prompts, rows["correct_verb"])
    incorrect = next_token_ids(tokenizer, prompts, rows["incorrect_verb"])
    split: dict[str, list[str]] = {}
    for i, (a, b) in enumerate(zip(correct, incorrect, strict=True)):
        for ids, column in ((a, "correct_verb"), (b, "incorrect_verb")):
            verb = rows[column][i]
            if ids is None and verb not in split:
                split[verb] = split_pieces(tokenizer, prompts[i], verb)
    if split:
        name = tokenizer_name(tokenizer)
        shown = ", ".join(f"{v!r} -> {p}" for v, p in split.items())
        seen = set(rows["correct_verb"]) | set(rows["incorrect_verb"])
        whole = [
            v
            for v, w in VERB_PAIRS.items()
            if {" " + v, " " + w} <= seen and not {" " + v, " " + w} & set(split)
        ]
        raise InputError(
            f"tokenizer {name} splits verbs after the subject: {shown}; agreement needs "
            f"single-token verbs: choose verbs=[...] among {format_choices(VERB_PAIRS)} "
            f"(single tokens here: {format_choices(whole) or 'none'})"
        )
    enc = tokenizer(prompts, return_offsets_mapping=True)
    rows["correct"] = correct
    rows["incorrect"] = incorrect
    rows["subject_pos"] = []
    rows["end_pos"] = []
    for i, prompt in enumerate(prompts):
        offsets = enc["offset_mapping"][i]
        subject_end = _subject_end(prompt, rows["subject"][i], rows["attractor"][i])
        rows["subject_pos"].append(token_at(offsets, subject_end - 1))
        rows["end_pos"].append(token_at(offsets, len(prompt) - 1))


def _subject_end(prompt: str, subject: str, attractor: str | None) -> int:
    """Character index just after the subject noun in ``prompt``."""
    if attractor is None:
        return len(prompt)  # "The <adjective> <subject>"
    return len("The ") + len(subject)
