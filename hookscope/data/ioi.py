"""Indirect-object identification (IOI) prompts as clean/corrupted pairs for a given tokenizer.

A clean prompt names two people and repeats one of them (the subject, S); the next token
is the other one (the indirect object, IO)::

    When Mary and John went to the store, John gave a drink to      ->  " Mary"

Templates have three name slots: ``{A}`` and ``{B}`` (the pair introduced first) and ``{S}``
(the repeated subject). Order ``"ABBA"`` puts the IO first (``A = IO, B = S``), ``"BABA"``
the subject first (``A = S, B = IO``).

Corruptions (``corruption=``):

* ``"abc"`` (default): the three slots get three other names, distinct from each other and
  from IO and S ("When Lisa and Paul went to the store, Kate gave a drink to"). Neither
  answer is in the corrupted prompt, so its logit difference is near zero.
* ``"flip"``: only the ``{S}`` slot changes, to the IO ("When Mary and John went to the
  store, Mary gave a drink to"); the right answer becomes S, so the logit difference flips
  sign.

Names are kept only where they are one token with a leading space in every slot of every
template and as the answer after the prompt. Every generated pair is checked with the
tokenizer: clean and corrupted prompts have the same number of tokens and differ only at
the name slots.

Schema of :func:`ioi` (one row per pair; token positions index ``tokenizer(prompt)``, i.e.
with the tokenizer's default special tokens, as ``HookedModel.to_tokens`` builds them, and
are the same in the clean and the corrupted prompt):

=================== ============= ========================================================
column              type          meaning
=================== ============= ========================================================
``clean``           string        clean prompt
``corrupted``       string        corrupted prompt
``correct``         int64         token id of the IO with its leading space (" Mary")
``incorrect``       int64         token id of S with its leading space (" John")
``io``, ``s``       string        the IO and subject names
``order``           string        ``"ABBA"`` or ``"BABA"``
``template``        int64         index into the templates used (``IOI_TEMPLATES`` by default)
``names``           list[string]  names in slots A, B, S of the clean prompt
``corrupted_names`` list[string]  names in slots A, B, S of the corrupted prompt
``io_pos``          int64         position of the IO's token
``s1_pos``          int64         position of the subject's first mention
``s2_pos``          int64         position of the subject's second mention (slot ``{S}``)
``end_pos``         int64         position of the prompt's last token (where the answer is read)
=================== ============= ========================================================

:func:`ioi_tokens` turns such a data set into padded token tensors for patching code.

The tokenizer helpers at the end (:func:`check_tokenizer`, :func:`next_token_ids`,
:func:`split_pieces`, :func:`token_at`, :func:`tokenizer_name`) are shared with
:mod:`.agreement` and :mod:`.factual`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, DatasetInfo, Features, Value
from datasets import Sequence as ListOf
from jaxtyping import Int
from torch import Tensor

from hookscope.data._tokens import (
    check_tokenizer,
    next_token_ids,
    split_pieces,
    token_at,
    tokenizer_name,
)
from hookscope.errors import InputError, format_choices, suggestion

__all__ = [
    "IOI_TEMPLATES",
    "IOI_NAMES",
    "CORRUPTIONS",
    "ORDERS",
    "ioi",
    "single_token_names",
    "IOITokens",
    "ioi_tokens",
]

IOI_TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the store, {S} gave a drink to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "After {A} and {B} finished dinner at the cafe, {S} handed the bill to",
    "While {A} and {B} were cleaning the kitchen, {S} passed a towel to",
    "Yesterday {A} and {B} visited the museum, and {S} showed a painting to",
    "Once {A} and {B} arrived at the station, {S} lent an umbrella to",
    "Since {A} and {B} were working in the garden, {S} threw a shovel to",
    "When {A} and {B} met at the library, {S} returned a book to",
)

IOI_NAMES: tuple[str, ...] = (
    "Mary", "John", "Anna", "James", "Sarah", "David", "Emma", "Michael", "Laura", "Robert",
    "Lisa", "Daniel", "Kate", "Paul", "Rachel", "Mark", "Helen", "Peter", "Alice", "Thomas",
    "Susan", "Steven", "Karen", "George", "Julia", "Kevin", "Jessica", "Brian", "Amy", "Eric",
    "Linda", "Adam", "Grace", "Frank", "Rose", "Henry", "Emily", "Jack", "Sophie", "Sam",
    "Claire", "Ryan", "Nancy", "Scott", "Diana", "Jason", "Ruth", "Chris", "Maria", "Tom",
    "Lucy", "Andrew", "Amanda", "Joseph", "Anne", "Richard", "Jane", "Charles", "Betty",
    "William", "Martha", "Edward", "Victoria", "Luke", "Hannah", "Matt", "Olivia", "Kyle",
    "Alex", "Ben",
)  # fmt: skip

CORRUPTIONS = ("abc", "flip")
ORDERS = ("ABBA", "BABA")
_NAMES_NEEDED = {"abc": 5, "flip": 2}  # IO, S and, for abc, three fresh names
_SLOTS = ("A", "B", "S")
_SLOT_RE = re.compile(r"\{(A|B|S)\}")

FEATURES = Features(
    {
        "clean": Value("string"),
        "corrupted": Value("string"),
        "correct": Value("int64"),
        "incorrect": Value("int64"),
        "io": Value("string"),
        "s": Value("string"),
        "order": Value("string"),
        "template": Value("int64"),
        "names": ListOf(Value("string")),
        "corrupted_names": ListOf(Value("string")),
        "io_pos": Value("int64"),
        "s1_pos": Value("int64"),
        "s2_pos": Value("int64"),
        "end_pos": Value("int64"),
    }
)
_GENERATED = tuple(FEATURES)[:10]  # the columns set while sampling; positions come after


# ------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class _Template:
    """A template split at its name slots: ``parts[0] A parts[1] B parts[2] S parts[3]``."""

    text: str
    parts: tuple[str, str, str, str]

    def fill(self, names: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        """The prompt with ``names`` in slots A, B, S, and each name's character span."""
        out, spans, at = [], [], 0
        for part, name in zip(self.parts, [*names, ""], strict=True):
            out.append(part)
            at += len(part)
            if name:
                spans.append((at, at + len(name)))
                out.append(name)
                at += len(name)
        return "".join(out), spans


def _parse_template(text: Any) -> _Template:
    if not isinstance(text, str):
        raise InputError(f"an IOI template must be a string, got {type(text).__name__}")
    pieces = _SLOT_RE.split(text)  # [pre, slot, mid, slot, mid, slot, post]
    slots = tuple(pieces[1::2])
    parts = pieces[0::2]
    rule = (
        "each of {A}, {B}, {S} exactly once in that order, each after a space and not followed "
        "by a letter or digit, and text after {S} (the prompt ends just before the answer), "
        f"e.g. {IOI_TEMPLATES[0]!r}"
    )
    if slots != _SLOTS:
        raise InputError(f"IOI template {text!r} has slots {list(slots)}; it needs {rule}")
    for i, part in enumerate(parts[:3]):
        nxt = parts[i + 1]
        if not part.endswith(" ") or (nxt[:1].isalnum()):
            raise InputError(f"IOI template {text!r} has a badly placed slot; it needs {rule}")
    if not parts[3].strip() or parts[3] != parts[3].rstrip():
        raise InputError(
            f"IOI template {text!r} must end with text after {{S}} and no trailing space; "
            f"it needs {rule}"
        )
    return _Template(text, (parts[0], parts[1], parts[2], parts[3]))


def _templates(templates: Sequence[str] | None) -> list[_Template]:
    if templates is None:
        templates = IOI_TEMPLATES
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise InputError("templates must be a non-empty list of template strings (or None)")
    return [_parse_template(t) for t in templates]


# ---------------------------------------------------------------------------------- names


def _name_list(names: Sequence[str] | None) -> list[str]:
    if names is None:
        return list(IOI_NAMES)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise InputError(f"names must be a list of strings, got {type(names).__name__}")
    bad = [x for x in names if not isinstance(x, str) or not x or x != x.strip()]
    if bad:
        raise InputError(f"names must be non-empty strings without surrounding spaces: {bad}")
    return list(dict.fromkeys(names))  # de-duplicated, order kept


def single_token_names(
    tokenizer: Any,
    names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Which names are a single token (with a leading space) for ``tokenizer``.

    A name is kept when it is one token, always the same id, in every slot of every template
    and as the continuation of every prompt. Returns ``(kept, split)``: ``kept`` maps each
    single-token name to its id; ``split`` maps every other name to the pieces the tokenizer
    cuts it into after "... to".
    """
    check_tokenizer(tokenizer, "single_token_names")
    pool = _name_list(names)
    tpls = _templates(templates)
    prompts, spans, owners = [], [], []
    for name in pool:
        for tpl in tpls:
            text, sp = tpl.fill([name, name, name])
            prompts.append(text)
            spans.append(sp)
            owners.append(name)
    enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    answers = next_token_ids(tokenizer, prompts, [" " + o for o in owners])
    ids: dict[str, set[int | None]] = {name: set() for name in pool}
    for k, name in enumerate(owners):
        pos = _slot_positions(enc["offset_mapping"][k], spans[k])
        row = enc["input_ids"][k]
        ids[name].update(None if p is None else row[p] for p in pos)
        ids[name].add(answers[k])
    kept = {name: int(next(iter(s))) for name, s in ids.items() if len(s) == 1 and None not in s}
    split = {
        name: split_pieces(tokenizer, tpls[0].fill([name, name, name])[0], " " + name)
        for name in pool
        if name not in kept
    }
    return kept, split


# ------------------------------------------------------------------------------- the data


def ioi(
    tokenizer: Any,
    n: int = 100,
    *,
    seed: int = 0,
    corruption: str = "abc",
    order: str = "both",
    templates: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> Dataset:
    """``n`` IOI clean/corrupted prompt pairs with answer token ids for ``tokenizer``.

    ``corruption`` is ``"abc"`` (three fresh names) or ``"flip"`` (the repeated subject
    becomes the IO); ``order`` is ``"ABBA"``, ``"BABA"`` or ``"both"``; ``templates`` are
    strings with slots ``{A}``, ``{B}``, ``{S}`` (default :data:`IOI_TEMPLATES`); ``names``
    default to :data:`IOI_NAMES`, filtered to single tokens. Templates and orders are
    balanced (counts differ by at most one); names are drawn at random with ``seed``. The
    schema is in the module docstring.

    Example::

        pairs = ioi(model.tokenizer, n=32)
        pairs[0]["clean"], pairs[0]["corrupted"], pairs[0]["correct"]
    """
    check_tokenizer(tokenizer, "ioi")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InputError(f"ioi needs a positive number of pairs n, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    corruption = _choice(corruption, CORRUPTIONS, "corruption")
    orders = ORDERS if order == "both" else (_choice(order, (*ORDERS, "both"), "order"),)
    tpls = _templates(templates)
    kept, split = single_token_names(tokenizer, names, [t.text for t in tpls])
    need = _NAMES_NEEDED[corruption]
    if len(kept) < need:
        shown = format_choices(f"{k!r} -> {v}" for k, v in split.items())
        raise InputError(
            f"tokenizer {tokenizer_name(tokenizer)} splits {len(split)} of "
            f"{len(split) + len(kept)} names into several tokens: {shown}; "
            f"ioi(corruption={corruption!r}) needs at least {need} single-token names, "
            f"{len(kept)} remain ({format_choices(kept) or 'none'}). Pass names=[...] that "
            "are single tokens (with a leading space) for this tokenizer."
        )
    pool = list(kept)
    rng = random.Random(seed)
    cells = [(t, o) for t in range(len(tpls)) for o in orders]
    plan: list[tuple[int, str]] = []
    while len(plan) < n:
        block = cells[:]
        rng.shuffle(block)
        plan.extend(block)
    rows: dict[str, list[Any]] = {k: [] for k in FEATURES}
    clean_spans, corrupted_spans = [], []
    for t, o in plan[:n]:
        io, s = rng.sample(pool, 2)
        slot_names = [io, s, s] if o == "ABBA" else [s, io, s]
        if corruption == "abc":
            fresh = rng.sample([x for x in pool if x != io and x != s], 3)
        else:
            fresh = [slot_names[0], slot_names[1], io]
        clean, sp_clean = tpls[t].fill(slot_names)
        corrupted, sp_corrupted = tpls[t].fill(fresh)
        clean_spans.append(sp_clean)
        corrupted_spans.append(sp_corrupted)
        values = (clean, corrupted, kept[io], kept[s], io, s, o, t, slot_names, fresh)
        for key, value in zip(_GENERATED, values, strict=True):
            rows[key].append(value)
    _locate_and_verify(tokenizer, rows, clean_spans, corrupted_spans, kept)
    description = (
        f"IOI pairs: n={n}, seed={seed}, corruption={corruption!r}, orders={list(orders)}, "
        f"{len(tpls)} templates, {len(pool)} single-token names for "
        f"{tokenizer_name(tokenizer)}"
    )
    return Dataset.from_dict(rows, info=DatasetInfo(description=description, features=FEATURES))


def _locate_and_verify(
    tokenizer: Any,
    rows: dict[str, list[Any]],
    clean_spans: list[list[tuple[int, int]]],
    corrupted_spans: list[list[tuple[int, int]]],
    ids: dict[str, int],
) -> None:
    """Fill the position columns; check equal lengths, name ids and differences at slots only."""
    clean = tokenizer(rows["clean"], return_offsets_mapping=True)
    corrupted = tokenizer(rows["corrupted"], return_offsets_mapping=True)
    answers = next_token_ids(tokenizer, rows["clean"], [" " + x for x in rows["io"]])
    subjects = next_token_ids(tokenizer, rows["clean"], [" " + x for x in rows["s"]])
    for i in range(len(rows["clean"])):
        a, b = clean["input_ids"][i], corrupted["input_ids"][i]
        pos = _slot_positions(clean["offset_mapping"][i], clean_spans[i])
        pos_b = _slot_positions(corrupted["offset_mapping"][i], corrupted_spans[i])
        expected = [ids[x] for x in rows["names"][i]], [ids[x] for x in rows["corrupted_names"][i]]
        ok = (
            len(a) == len(b)
            and None not in pos
            and pos == pos_b
            and [a[p] for p in pos] == expected[0]
            and [b[p] for p in pos] == expected[1]
            and all(a[k] == b[k] for k in range(len(a)) if k not in pos)
            and (answers[i], subjects[i]) == (rows["correct"][i], rows["incorrect"][i])
        )
        if not ok:
            raise InputError(
                f"tokenizer {tokenizer_name(tokenizer)} does not keep names as separate single "
                f"tokens in {rows['clean'][i]!r} / {rows['corrupted'][i]!r} (clean tokens "
                f"{tokenizer.convert_ids_to_tokens(a)}, corrupted tokens "
                f"{tokenizer.convert_ids_to_tokens(b)}); pass other templates= or names="
            )
        first = 0 if rows["order"][i] == "ABBA" else 1
        rows["io_pos"].append(pos[first])
        rows["s1_pos"].append(pos[1 - first])
        rows["s2_pos"].append(pos[2])
        rows["end_pos"].append(token_at(clean["offset_mapping"][i], len(rows["clean"][i]) - 1))


def _slot_positions(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int | None]:
    """The one token covering each name span (and at most its leading space), else None."""
    out: list[int | None] = []
    for c0, c1 in spans:
        hits = [k for k, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]
        ok = len(hits) == 1 and offsets[hits[0]][0] >= c0 - 1 and offsets[hits[0]][1] <= c1
        out.append(hits[0] if ok else None)
    return out


# --------------------------------------------------------------------------- token tensors


@dataclass(frozen=True)
class IOITokens:
    """Token tensors of an IOI data set, right-padded with ``pad_id``.

    Prompts from different templates differ in length, so rows are right-padded: the
    answer is read at ``end_pos`` (the last real token of each row), not at position -1.
    Clean and corrupted rows have the same length, so their padding is identical.
    """

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    end_pos: Int[Tensor, " batch"]
    correct: Int[Tensor, " batch"]
    incorrect: Int[Tensor, " batch"]
    io_pos: Int[Tensor, " batch"]
    s1_pos: Int[Tensor, " batch"]
    s2_pos: Int[Tensor, " batch"]
    pad_id: int


def ioi_tokens(pairs: Dataset, tokenizer: Any) -> IOITokens:
    """Tokenize an :func:`ioi` data set into right-padded ``[n, pos]`` tensors.

    Tokens are ``tokenizer(prompt)`` with the tokenizer's default special tokens (what
    ``HookedModel.to_tokens`` feeds the model), right-padded with ``pad_id`` = the
    tokenizer's pad token, else its eos token, else 0; ``attention_mask`` is 1 on real
    tokens. Read logits at ``end_pos``, e.g. ``logits[arange(n), t.end_pos]``. Raises
    InputError when the data set was built for another tokenizer.
    """
    check_tokenizer(tokenizer, "ioi_tokens")
    if not isinstance(pairs, Dataset):
        raise InputError(f"ioi_tokens needs the Dataset made by ioi(), got {type(pairs).__name__}")
    missing = [c for c in FEATURES if c not in pairs.column_names]
    if missing:
        raise InputError(
            f"ioi_tokens needs the columns of ioi(); missing {missing} "
            f"(has {format_choices(pairs.column_names)})"
        )
    cols = {c: list(pairs[c]) for c in ("clean", "corrupted", "correct", "incorrect", "io_pos")}
    clean = tokenizer(cols["clean"])["input_ids"]
    corrupted = tokenizer(cols["corrupted"])["input_ids"]
    for i, (a, b) in enumerate(zip(clean, corrupted, strict=True)):
        io_pos = cols["io_pos"][i]
        if len(a) != len(b) or io_pos >= len(a) or a[io_pos] != cols["correct"][i]:
            raise InputError(
                f"row {i} of the IOI data set does not match tokenizer "
                f"{tokenizer_name(tokenizer)} (clean and corrupted lengths {len(a)}, {len(b)}; "
                "answer id not at io_pos); build the data set with ioi(this tokenizer)"
            )
    pad = next((p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id) if p is not None), 0)
    width = max(len(a) for a in clean)

    def padded(seqs: list[list[int]]) -> Tensor:
        return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)

    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in clean], dtype=torch.long)

    def column(name: str) -> Tensor:
        return torch.tensor(list(pairs[name]), dtype=torch.long)

    return IOITokens(
        clean_tokens=padded(clean),
        corrupted_tokens=padded(corrupted),
        attention_mask=mask,
        end_pos=column("end_pos"),
        correct=column("correct"),
        incorrect=column("incorrect"),
        io_pos=column("io_pos"),
        s1_pos=column("s1_pos"),
        s2_pos=column("s2_pos"),
        pad_id=int(pad),
    )


def _choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise InputError(
            f"unknown {what} {value!r}; valid: {format_choices(choices)}."
            + suggestion(str(value), choices)
        )
    return value
