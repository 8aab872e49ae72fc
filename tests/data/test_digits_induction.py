"""hookscope.data.digits and hookscope.data.induction against independent ground truth:
scikit-learn's own ``load_digits`` arrays, and repeat structure found by brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from hookscope.data.digits import digits, digits_tensors, split_indices
from hookscope.data.induction import as_batch, induction, induction_tensors
from hookscope.errors import InputError


@pytest.fixture(scope="module")
def sk():
    return load_digits()


# ---------------------------------------------------------------- digits


def test_digits_split_sizes_disjoint_and_covering(sk):
    train, test, every = (digits(s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(every)) == (1347, 450, 1797)
    tr, te = set(train["index"]), set(test["index"])
    assert not tr & te
    assert tr | te == set(range(len(sk.target)))
    assert list(every["index"]) == list(range(1797))


def test_digits_rows_equal_sklearn_arrays(sk):
    for split in ("train", "test", "all"):
        ds = digits(split)
        idx = np.array(ds["index"])
        images = np.array(ds["image"], dtype=np.float32)
        assert images.shape == (len(idx), 8, 8)
        np.testing.assert_array_equal(images, sk.images[idx].astype(np.float32) / 16)
        np.testing.assert_array_equal(np.array(ds["label"]), sk.target[idx])
        assert images.min() == 0.0 and images.max() == 1.0


def test_digits_tensors_match_dataset(sk):
    for split in ("train", "test"):
        X, y = digits_tensors(split)
        idx = split_indices(split)
        assert X.shape == (len(idx), 1, 8, 8) and X.dtype == torch.float32
        assert y.shape == (len(idx),) and y.dtype == torch.long
        expected = torch.from_numpy(sk.images[idx].astype(np.float32) / 16)
        assert torch.equal(X[:, 0], expected)
        assert torch.equal(y, torch.from_numpy(sk.target[idx]).long())


def test_digits_split_is_stratified(sk):
    test_labels = np.array(digits("test")["label"])
    for digit in range(10):
        total = int((sk.target == digit).sum())
        assert abs(int((test_labels == digit).sum()) - 0.25 * total) <= 1


def test_digits_split_is_fixed_whatever_the_global_rng():
    first = split_indices("test")
    np.random.seed(123)
    torch.manual_seed(123)
    np.random.rand(10)
    assert np.array_equal(split_indices("test"), first)
    # the documented definition: sklearn's stratified split, test_size=0.25, random_state=0
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    _, ref = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    assert np.array_equal(first, np.sort(ref))


def test_digits_bad_split_names_the_choices():
    with pytest.raises(InputError, match=r"train, test, all.*Did you mean 'test'"):
        digits("tset")
    with pytest.raises(InputError, match="train, test, all"):
        digits_tensors("validation")


# ---------------------------------------------------------------- induction


def _most_recent_earlier(row: list[int], t: int) -> int | None:
    for j in range(t - 1, -1, -1):
        if row[j] == row[t]:
            return j
    return None


def test_induction_structure_by_brute_force():
    vocab, lo, hi = 30, 3, 9
    ds = induction(200, vocab, prefix_len=(lo, hi), seed=5)
    assert ds.column_names == ["tokens", "prefix_len", "repeat_start", "repeat_end"]
    for row in ds:
        tok, L = row["tokens"], row["prefix_len"]
        assert len(tok) == 1 + 2 * hi and tok[0] == 0
        assert lo <= L <= hi
        assert all(0 < t < vocab for t in tok[1:])
        prefix = tok[1 : 1 + L]
        assert len(set(prefix)) == L  # distinct
        assert tok[1 + L : 1 + 2 * L] == prefix  # the repeated half equals the prefix
        assert row["repeat_start"] == 1 + L and row["repeat_end"] == 1 + 2 * L
        # every repeated token's most recent earlier occurrence is L back; none before
        for t in range(1, 1 + L):
            assert _most_recent_earlier(tok, t) is None
        for t in range(1 + L, 1 + 2 * L):
            assert _most_recent_earlier(tok, t) == t - L


def test_induction_prefix_lengths_vary_over_the_whole_range():
    lengths = induction_tensors(2000, 50, prefix_len=(4, 20), seed=0).prefix_len
    assert set(lengths.tolist()) == set(range(4, 21))
    counts = torch.bincount(lengths)[4:].double()
    assert counts.min() > 0.5 * counts.mean()  # roughly uniform


def test_induction_three_repeats_and_no_bos():
    b = induction_tensors(50, 20, prefix_len=(2, 5), n_repeats=3, seed=2, bos=None)
    assert b.tokens.shape == (50, 15)
    for row, L in zip(b.tokens.tolist(), b.prefix_len.tolist()):
        assert row[L : 2 * L] == row[:L] and row[2 * L : 3 * L] == row[:L]
    assert torch.equal(b.repeat_start, b.prefix_len)
    assert torch.equal(b.repeat_end, 3 * b.prefix_len)
    # bos=None: token 0 is an ordinary token and may appear anywhere
    assert (b.tokens == 0).any()


def test_induction_tensors_equal_dataset_and_seeds_are_fixed():
    kw = dict(n=64, vocab_size=40, prefix_len=(3, 12), seed=11, seq_len=30)
    ds = induction(**kw)
    b = induction_tensors(**kw)
    back = as_batch(ds, vocab_size=40)
    for name in ("tokens", "prefix_len", "repeat_start", "repeat_end"):
        assert torch.equal(getattr(back, name), getattr(b, name))
    assert b.tokens.shape == (64, 30)
    assert torch.equal(induction_tensors(**kw).tokens, b.tokens)
    assert not torch.equal(induction_tensors(**{**kw, "seed": 12}).tokens, b.tokens)


def test_repeated_mask_by_brute_force():
    b = induction_tensors(40, 25, prefix_len=(2, 8), seed=3)
    mask = b.repeated_mask()
    for i, row in enumerate(b.tokens.tolist()):
        L = int(b.prefix_len[i])
        expected = [1 + L <= t < 1 + 2 * L for t in range(len(row))]
        assert mask[i].tolist() == expected
    sub = b[torch.tensor([3, 7])]
    assert torch.equal(sub.tokens, b.tokens[[3, 7]]) and len(sub) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0, vocab_size=10), "n must be positive"),
        (dict(n=-3, vocab_size=10), "n must be positive"),
        (dict(n=5, vocab_size=10, prefix_len=(3, 10)), r"10 distinct tokens .* hi <= 9"),
        (dict(n=5, vocab_size=10, prefix_len=(6, 4)), "lo <= hi"),
        (dict(n=5, vocab_size=10, prefix_len=(0, 4)), "lo <= hi"),
        (dict(n=5, vocab_size=10, prefix_len=5), r"pair \(lo, hi\)"),
        (dict(n=5, vocab_size=10, n_repeats=1), "n_repeats must be at least 2"),
        (dict(n=5, vocab_size=10, bos=10), "outside the vocabulary"),
        (dict(n=5, vocab_size=10, prefix_len=(2, 4), seq_len=8), "at least 9"),
        (dict(n=2.5, vocab_size=10), "n must be an int"),
    ],
)
def test_induction_bad_arguments(kwargs, message):
    kwargs.setdefault("prefix_len", (2, 4))
    with pytest.raises(InputError, match=message):
        induction_tensors(**kwargs)
    with pytest.raises(InputError, match=message):
        induction(**kwargs)


def test_as_batch_rejects_other_datasets():
    with pytest.raises(InputError, match="missing column"):
        as_batch(digits("test"), vocab_size=10)
