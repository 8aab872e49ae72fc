"""Factual recall: the curated set, single-token answers for a tokenizer, dropping with a warning."""

from __future__ import annotations

import warnings

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hookscope.data.factual import FACTS, RELATIONS, factual_recall
from hookscope.errors import HookscopeError, InputError

import builders


def _bpe(corpus) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=6000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def full_tok() -> PreTrainedTokenizerFast:
    """Every prompt word and every answer is one token."""
    return _bpe([f.prompt + f.answer for f in FACTS] * 3)


@pytest.fixture(scope="module")
def half_tok() -> PreTrainedTokenizerFast:
    """Only capitals and currencies are words of the corpus: other answers are split."""
    keep = ("capital", "currency")
    return _bpe([f.prompt + (f.answer if f.relation in keep else "") for f in FACTS] * 3)


def _ids(tok, text: str, special: bool = True) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def test_the_curated_set():
    ds = factual_recall()
    assert len(ds) == len(FACTS) >= 40
    assert ds.column_names == ["prompt", "answer", "relation", "subject"]
    assert len(set(ds["prompt"])) == len(ds)
    assert set(ds["relation"]) == set(RELATIONS) and len(RELATIONS) >= 5
    for row in ds:
        assert row["answer"].startswith(" ") and row["answer"].strip() == row["answer"][1:]
        assert " " not in row["answer"][1:]  # one word
        assert row["subject"] in row["prompt"]
        assert row["prompt"] == row["prompt"].rstrip()
    known = {(r["prompt"], r["answer"]) for r in ds}
    assert ("The Eiffel Tower is located in the city of", " Paris") in known
    assert ("The capital of Japan is", " Tokyo") in known
    assert ("The official language of Brazil is", " Portuguese") in known


def test_relations_filter():
    ds = factual_recall(relations=["capital", "currency"])
    assert set(ds["relation"]) == {"capital", "currency"}
    assert len(ds) == sum(f.relation in ("capital", "currency") for f in FACTS)
    with pytest.raises(InputError, match="Did you mean 'capital'"):
        factual_recall(relations=["capitals"])
    with pytest.raises(InputError, match="non-empty list"):
        factual_recall(relations="capital")


def test_all_single_tokens_nothing_dropped(full_tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = factual_recall(full_tok)
    assert len(ds) == len(FACTS)
    for row in ds:
        plain = _ids(full_tok, row["prompt"], special=False)
        assert _ids(full_tok, row["prompt"] + row["answer"], special=False) == plain + [
            row["answer_id"]
        ]
        assert full_tok.decode([row["answer_id"]]) == row["answer"]
        ids = _ids(full_tok, row["prompt"])
        subject = full_tok.decode(ids[row["subject_first"] : row["subject_pos"] + 1])
        assert subject.strip() == row["subject"]
        assert row["end_pos"] == len(ids) - 1
    assert "all answers single tokens" in ds.info.description


def test_multi_token_answers_are_dropped_with_a_warning(half_tok):
    with pytest.warns(UserWarning, match="dropped") as record:
        ds = factual_recall(half_tok)
    single = [
        f
        for f in FACTS
        if len(_ids(half_tok, f.prompt + f.answer, special=False))
        == len(_ids(half_tok, f.prompt, special=False)) + 1
    ]
    assert 0 < len(single) < len(FACTS)  # the fixture keeps some and splits others
    assert ds["prompt"] == [f.prompt for f in single]
    dropped = len(FACTS) - len(single)
    message = str(record[0].message)
    assert f"kept {len(single)} of {len(FACTS)} facts; dropped {dropped}" in message
    assert message in ds.info.description
    assert "' Portuguese' -> " in message  # never a word of a prompt
    for row in ds:
        assert half_tok.decode([row["answer_id"]]) == row["answer"]


def test_subject_positions_when_the_subject_is_split():
    # answers are words of the corpus, subjects are not: subjects span several tokens
    tok = _bpe([f.answer for f in FACTS] * 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = factual_recall(tok)
    spans = []
    for row in ds:
        enc = tok(row["prompt"], return_offsets_mapping=True)
        start = row["prompt"].index(row["subject"])
        first = enc["offset_mapping"][row["subject_first"]]
        last = enc["offset_mapping"][row["subject_pos"]]
        assert first[0] <= start < first[1]
        assert last[0] < start + len(row["subject"]) <= last[1]
        ids = enc["input_ids"][row["subject_first"] : row["subject_pos"] + 1]
        assert tok.decode(ids).strip() == row["subject"]
        spans.append(row["subject_pos"] - row["subject_first"])
    assert min(spans) >= 1  # every subject is several tokens here


def test_no_single_token_answer_is_an_input_error():
    with pytest.raises(InputError) as err:
        factual_recall(builders.make_tokenizer())
    assert "splits the answer of every fact" in str(err.value)
    assert "' Tokyo' -> " in str(err.value)
    assert isinstance(err.value, HookscopeError)


def test_not_a_fast_tokenizer(full_tok):
    with pytest.raises(InputError, match="fast Hugging Face tokenizer"):
        factual_recall(full_tok.backend_tokenizer)


@pytest.mark.optional_model
def test_smollm2_recalls_most_facts():
    import torch

    from hookscope import zoo
    from hookscope.zoo import packaged

    if not packaged.installed("smollm2-135m"):
        pytest.skip("smollm2-135m is not installed (python -m hookscope.zoo install smollm2-135m)")
    model = zoo.load("smollm2-135m")
    with pytest.warns(UserWarning, match="dropped 3"):  # ' yen', ' rupee', ' ruble'
        ds = factual_recall(model.tokenizer)
    rows = torch.arange(len(ds))
    with torch.no_grad():
        logits = model(list(ds["prompt"]))[rows, torch.tensor(list(ds["end_pos"]))]
    top1 = (logits.argmax(-1) == torch.tensor(list(ds["answer_id"]))).float().mean()
    assert top1 > 0.45  # measured 0.62
