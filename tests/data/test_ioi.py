"""IOI pairs: same token length, differences only at the name slots, single-token answers.

Tokenizers are trained here, offline: a byte-level BPE (GPT-2 style) and a Metaspace BPE
with a BOS token (Llama / sentencepiece style) on the templates filled with every name, so
that names are single tokens; a byte-level BPE with no merges splits every name. The
references are the tokenizers themselves, called directly on the prompts.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hookscope.data._tokens import next_token_ids
from hookscope.data.ioi import IOI_NAMES, IOI_TEMPLATES, ioi, ioi_tokens, single_token_names
from hookscope.errors import HookscopeError, InputError

import builders

EOS = "<|endoftext|>"


def _filled(names=IOI_NAMES, templates=IOI_TEMPLATES) -> list[str]:
    return [t.format(A=x, B=x, S=x) + " " + x for x in names for t in templates]


def _bpe(corpus, *, style="bytelevel", vocab_size=8000, bos=False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    alphabet: list[str] = []
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:  # whitespace only: punctuation stays attached to words
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{EOS} $A", special_tokens=[(EOS, tok.token_to_id(EOS))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """Byte-level BPE in which every built-in name is one token with its leading space."""
    return _bpe(_filled())


@pytest.fixture(scope="module")
def sp_tok() -> PreTrainedTokenizerFast:
    """Metaspace BPE that prepends a BOS token: positions shift by one."""
    return _bpe(_filled(), style="metaspace", bos=True)


@pytest.fixture(scope="module")
def char_tok() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges at all: every name is several tokens."""
    return _bpe(["Mary and John"], vocab_size=257)


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _check_pairs(pairs, tokenizer, corruption: str) -> None:
    """The properties every row must have, computed from the tokenizer directly."""
    for row in pairs:
        a, b = _ids(tokenizer, row["clean"]), _ids(tokenizer, row["corrupted"])
        assert len(a) == len(b)
        differ = {k for k in range(len(a)) if a[k] != b[k]}
        slots = {row["io_pos"], row["s1_pos"], row["s2_pos"]}
        assert len(slots) == 3
        # abc: all three names are fresh; flip: only the repeated subject changes
        assert differ == (slots if corruption == "abc" else {row["s2_pos"]})
        assert a[row["io_pos"]] == row["correct"]
        assert a[row["s1_pos"]] == a[row["s2_pos"]] == row["incorrect"]
        assert row["correct"] != row["incorrect"]
        assert row["end_pos"] == len(a) - 1
        # the answers are exactly one token after the prompt
        for name, answer in ((row["io"], row["correct"]), (row["s"], row["incorrect"])):
            plain = _ids(tokenizer, row["clean"], special=False)
            assert _ids(tokenizer, row["clean"] + " " + name, special=False) == plain + [answer]
        # the prompt is the template with the names in its slots
        template = IOI_TEMPLATES[row["template"]]
        A, B, S = row["names"]
        assert row["clean"] == template.format(A=A, B=B, S=S)
        cA, cB, cS = row["corrupted_names"]
        assert row["corrupted"] == template.format(A=cA, B=cB, S=cS)
        io, s = row["io"], row["s"]
        assert [A, B, S] == ([io, s, s] if row["order"] == "ABBA" else [s, io, s])
        if corruption == "abc":
            assert len({io, s, cA, cB, cS}) == 5
        else:
            assert [cA, cB, cS] == [A, B, io]


@pytest.mark.parametrize("corruption", ["abc", "flip"])
@pytest.mark.parametrize("which", ["tok", "sp_tok"])
def test_pairs_differ_only_at_name_slots(request, which, corruption):
    tokenizer = request.getfixturevalue(which)
    pairs = ioi(tokenizer, n=48, seed=3, corruption=corruption)
    assert len(pairs) == 48
    _check_pairs(pairs, tokenizer, corruption)


def test_default_corruption_is_abc(tok):
    assert (
        ioi(tok, n=8, seed=1)["corrupted"] == ioi(tok, n=8, seed=1, corruption="abc")["corrupted"]
    )


def test_answer_ids_decode_to_the_names_with_a_leading_space(tok):
    pairs = ioi(tok, n=40, seed=0)
    for row in pairs:
        assert tok.decode([row["correct"]]) == " " + row["io"]
        assert tok.decode([row["incorrect"]]) == " " + row["s"]
        assert row["clean"].split().count(row["s"]) == 2
        assert row["clean"].split().count(row["io"]) == 1
        # abc: neither answer appears in the corrupted prompt
        assert row["io"] not in row["corrupted"].split()
        assert row["s"] not in row["corrupted"].split()


def test_bos_tokenizer_positions_count_the_special_token(sp_tok):
    pairs = ioi(sp_tok, n=10, seed=0, corruption="flip")
    bos = sp_tok.convert_tokens_to_ids(EOS)
    for row in pairs:
        ids = _ids(sp_tok, row["clean"])
        assert ids[0] == bos
        assert sp_tok.convert_ids_to_tokens(ids[row["io_pos"]]) == "▁" + row["io"]
        assert sp_tok.convert_ids_to_tokens(row["incorrect"]) == "▁" + row["s"]


def test_templates_and_orders_are_balanced(tok):
    n = 2 * len(IOI_TEMPLATES) * 3
    pairs = ioi(tok, n=n, seed=5)
    assert set(Counter(pairs["template"]).values()) == {6}
    assert Counter(pairs["order"]) == {"ABBA": n // 2, "BABA": n // 2}
    odd = ioi(tok, n=37, seed=5)
    counts = Counter(odd["template"])
    assert len(counts) == len(IOI_TEMPLATES)
    assert max(counts.values()) - min(counts.values()) <= 1
    only = ioi(tok, n=9, seed=5, order="BABA")
    assert set(only["order"]) == {"BABA"}
    assert all(r["s1_pos"] < r["io_pos"] < r["s2_pos"] for r in only)


def test_seed_reproducible_and_different_seeds_differ(tok):
    assert ioi(tok, n=20, seed=7).to_dict() == ioi(tok, n=20, seed=7).to_dict()
    assert ioi(tok, n=20, seed=7)["clean"] != ioi(tok, n=20, seed=8)["clean"]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    corruption=st.sampled_from(["abc", "flip"]),
)
def test_any_seed_and_n_give_valid_pairs(tok, n, seed, corruption):
    pairs = ioi(tok, n=n, seed=seed, corruption=corruption)
    assert len(pairs) == n
    _check_pairs(pairs, tok, corruption)


def test_custom_templates(tok):
    templates = ["Later {A} and {B} sat down, and {S} waved to"]
    corpus = _filled(templates=templates)
    local = _bpe(corpus)
    pairs = ioi(local, n=6, templates=templates)
    for row in pairs:
        A, B, S = row["names"]
        assert row["clean"] == f"Later {A} and {B} sat down, and {S} waved to"
    for bad in [
        "{A} and {B}, {S} gave to",
        "When {A} and {B} met, {S} gave to ",
        "When {A} met {S}",
    ]:
        with pytest.raises(InputError, match="template"):
            ioi(tok, n=2, templates=[bad])


def test_names_are_kept_only_when_single_tokens(tok):
    # builders' tokenizer learned only a few names: compare with a direct tokenization
    small = builders.make_tokenizer()
    kept, split = single_token_names(small)
    single = {x for x in IOI_NAMES if len(_ids(small, " " + x, special=False)) == 1}
    assert set(kept) == single
    assert set(split) == set(IOI_NAMES) - single
    for name, pieces in split.items():
        assert "".join(pieces).replace("Ġ", " ") == " " + name
    for name, i in kept.items():
        assert small.decode([i]) == " " + name
    pairs = ioi(small, n=10, names=sorted(single))
    assert set(pairs["io"]) | set(pairs["s"]) <= single


def test_names_must_be_single_tokens_in_every_slot():
    # punctuation stays on words here: "Mary," is learned as one token, "Mary" too
    names = ["Mary", "John", "Anna", "Paul", "Kate", "Lisa"]
    templates = ["Then {A}, {B} and friends left, and {S} waved to"]
    corpus = _filled(names=names, templates=["{A} {B} {S} to"]) + ["Mary, Mary, Mary,"] * 50
    local = _bpe(corpus, style="whitespace")
    assert len(_ids(local, "to Mary", special=False)) == 2
    kept, split = single_token_names(local, names, templates)
    assert "Mary" in split and "Mary" not in kept
    assert set(kept) == set(names) - {"Mary"}
    pairs = ioi(local, n=12, templates=templates, names=names)
    assert "Mary" not in set(pairs["io"]) | set(pairs["s"])


def test_tokenizer_that_splits_names_is_an_input_error(char_tok):
    with pytest.raises(InputError) as err:
        ioi(char_tok, n=4)
    message = str(err.value)
    assert "'Mary' -> " in message and "'John' -> " in message
    assert "needs at least 5 single-token names, 0 remain" in message
    assert isinstance(err.value, HookscopeError)


def test_too_few_names_for_the_corruption(tok):
    four = ["Mary", "John", "Anna", "Paul"]
    with pytest.raises(InputError, match="at least 5 single-token names, 4 remain"):
        ioi(tok, n=4, names=four)
    pairs = ioi(tok, n=4, names=four[:2], corruption="flip")  # flip needs only two
    assert {tuple(sorted((r["io"], r["s"]))) for r in pairs} == {("John", "Mary")}
    with pytest.raises(InputError, match="'Zyxwvut' -> "):
        ioi(tok, n=4, names=["Mary", "Zyxwvut"], corruption="flip")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "positive number of pairs"),
        ({"n": -3}, "positive number of pairs"),
        ({"n": 2.5}, "positive number of pairs"),
        ({"n": True}, "positive number of pairs"),
        ({"n": 4, "seed": "x"}, "seed must be an int"),
        ({"n": 4, "corruption": "abd"}, "valid: abc, flip. Did you mean 'abc'"),
        ({"n": 4, "order": "ABAB"}, "valid: ABBA, BABA, both"),
        ({"n": 4, "names": "Mary"}, "names must be a list"),
        ({"n": 4, "names": ["Mary", " John"]}, "without surrounding spaces"),
        ({"n": 4, "templates": []}, "non-empty list"),
    ],
)
def test_bad_arguments(tok, kwargs, match):
    with pytest.raises(InputError, match=match):
        ioi(tok, **kwargs)


def test_not_a_fast_tokenizer(tok):
    with pytest.raises(InputError, match="fast Hugging Face tokenizer"):
        ioi(tok.backend_tokenizer, n=2)
    with pytest.raises(InputError, match="fast Hugging Face tokenizer"):
        ioi("gpt2", n=2)


def test_ioi_tokens_pads_right_and_matches_the_tokenizer(sp_tok):
    pairs = ioi(sp_tok, n=24, seed=2)
    t = ioi_tokens(pairs, sp_tok)
    n = len(pairs)
    lengths = [len(_ids(sp_tok, c)) for c in pairs["clean"]]
    assert len(set(lengths)) > 1  # templates differ in length: padding is exercised
    assert t.clean_tokens.shape == t.corrupted_tokens.shape == (n, max(lengths))
    assert t.pad_id == sp_tok.eos_token_id
    for i, row in enumerate(pairs):
        L = lengths[i]
        assert t.clean_tokens[i, :L].tolist() == _ids(sp_tok, row["clean"])
        assert t.corrupted_tokens[i, :L].tolist() == _ids(sp_tok, row["corrupted"])
        assert (t.clean_tokens[i, L:] == t.pad_id).all()
        assert (t.corrupted_tokens[i, L:] == t.pad_id).all()
        assert t.attention_mask[i].tolist() == [1] * L + [0] * (max(lengths) - L)
    rows = torch.arange(n)
    assert torch.equal(t.end_pos, torch.tensor(lengths) - 1)
    assert torch.equal(t.clean_tokens[rows, t.io_pos], t.correct)
    assert torch.equal(t.clean_tokens[rows, t.s2_pos], t.incorrect)
    assert t.correct.dtype == torch.long and t.correct.tolist() == list(pairs["correct"])
    assert t.incorrect.tolist() == list(pairs["incorrect"])


def test_ioi_tokens_rejects_another_tokenizer_and_other_data(tok, sp_tok):
    pairs = ioi(sp_tok, n=6)
    with pytest.raises(InputError, match="does not match tokenizer"):
        ioi_tokens(pairs, tok)
    with pytest.raises(InputError, match="missing"):
        ioi_tokens(pairs.remove_columns(["io_pos"]), sp_tok)
    with pytest.raises(InputError, match="Dataset made by ioi"):
        ioi_tokens(pairs.to_dict(), sp_tok)


def test_next_token_ids(tok):
    prompt = "When Mary and John went to the store, John gave a drink to"
    ids = next_token_ids(tok, [prompt, prompt, prompt], [" Mary", " Mary and", " Zyxwvut"])
    assert ids[0] == _ids(tok, " Mary", special=False)[0]
    assert ids[1:] == [None, None]


# ---------------------------------------------------------------------------- real weights


@pytest.mark.optional_model
def test_smollm2_solves_the_pairs_and_corruptions_remove_the_signal():
    from hookscope import zoo
    from hookscope.zoo import packaged

    if not packaged.installed("smollm2-135m"):
        pytest.skip("smollm2-135m is not installed (python -m hookscope.zoo install smollm2-135m)")
    model = zoo.load("smollm2-135m")
    rows = torch.arange(32)
    for corruption, corrupted_range in (("abc", (-1.0, 1.0)), ("flip", (-20.0, -2.0))):
        t = ioi_tokens(ioi(model.tokenizer, n=32, corruption=corruption), model.tokenizer)
        with torch.no_grad():
            clean = model(t.clean_tokens)[rows, t.end_pos]
            corrupted = model(t.corrupted_tokens)[rows, t.end_pos]
        diff_clean = clean[rows, t.correct] - clean[rows, t.incorrect]
        diff_corrupted = corrupted[rows, t.correct] - corrupted[rows, t.incorrect]
        # measured: clean 5.0 (abc) / 5.3 (flip); corrupted -0.01 (abc) / -4.8 (flip)
        assert diff_clean.mean() > 3 and (diff_clean > 0).float().mean() > 0.9
        assert corrupted_range[0] < diff_corrupted.mean() < corrupted_range[1]
