"""Repeated random token sequences, the task that makes induction heads form.

Each sequence is ``[bos] + prefix * n_repeats + filler``:

* ``prefix`` is ``L`` distinct tokens drawn uniformly without replacement from the
  vocabulary minus ``bos``; ``L`` is drawn per sample, uniformly from the inclusive range
  ``prefix_len=(lo, hi)``. Varying ``L`` matters: with one fixed repeat offset a model can
  solve the task with positional attention and never forms a previous-token head.
* the prefix is repeated back to back ``n_repeats`` times (the first copy included);
* ``filler`` is uniform random tokens (``bos`` excluded, repeats allowed) padding every
  sequence to one length, ``seq_len = offset + n_repeats * hi`` by default.

``offset`` is 1 with a BOS token (position 0) and 0 with ``bos=None``. Because the prefix
tokens are distinct, every repeated token has exactly one most recent earlier occurrence,
``prefix_len`` positions back.

Schema of the ``datasets.Dataset`` returned by :func:`induction`:

================  ==============  ====================================================
column            type            meaning
================  ==============  ====================================================
``tokens``        list of int64   the sequence, ``seq_len`` ids in ``[0, vocab_size)``
``prefix_len``    int64           ``L``, the repeat period
``repeat_start``  int64           first position of the second copy (``offset + L``)
``repeat_end``    int64           one past the last repeated position
                                  (``offset + n_repeats * L``); filler from here on
================  ==============  ====================================================

Positions ``repeat_start <= t < repeat_end`` hold the *repeated tokens*:
``tokens[t] == tokens[t - L]``, and the token after the earlier occurrence is
``tokens[t - L + 1]``. :class:`InductionBatch` holds the same as tensors.

>>> ds = induction(1000, vocab_size=64, prefix_len=(4, 20), seed=0)
>>> batch = induction_tensors(1000, vocab_size=64, prefix_len=(4, 20), seed=0)
>>> batch.tokens.shape                         # [1000, 41]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hookscope.errors import InputError

__all__ = ["InductionBatch", "induction", "induction_tensors", "as_batch"]


@dataclass(frozen=True)
class InductionBatch:
    """Induction sequences as tensors (all int64).

    ``tokens`` [batch, pos]; ``prefix_len``, ``repeat_start``, ``repeat_end`` [batch] (see
    the module docstring); ``vocab_size`` and ``n_repeats`` as generated.
    """

    tokens: Tensor
    prefix_len: Tensor
    repeat_start: Tensor
    repeat_end: Tensor
    vocab_size: int
    n_repeats: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, rows: slice | Tensor) -> InductionBatch:
        """The sub-batch of ``rows`` (a slice or an index tensor)."""
        return InductionBatch(
            self.tokens[rows],
            self.prefix_len[rows],
            self.repeat_start[rows],
            self.repeat_end[rows],
            self.vocab_size,
            self.n_repeats,
        )

    def repeated_mask(self) -> Tensor:
        """[batch, pos] bool: True at the repeated tokens, ``repeat_start <= t < repeat_end``."""
        pos = torch.arange(self.tokens.shape[1])
        return (pos >= self.repeat_start[:, None]) & (pos < self.repeat_end[:, None])


def _check_args(
    n: int, vocab_size: int, prefix_len: tuple[int, int], n_repeats: int, bos: int | None
) -> tuple[int, int]:
    for name, value in (("n", n), ("vocab_size", vocab_size), ("n_repeats", n_repeats)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{name} must be an int, got {type(value).__name__}")
    if n <= 0:
        raise InputError(f"n must be positive (number of sequences), got {n}")
    if n_repeats < 2:
        raise InputError(
            f"n_repeats must be at least 2 (the prefix and one repeat), got {n_repeats}"
        )
    try:
        lo, hi = (int(v) for v in prefix_len)
    except (TypeError, ValueError):
        raise InputError(
            f"prefix_len must be a pair (lo, hi) of ints, got {prefix_len!r}"
        ) from None
    if not 1 <= lo <= hi:
        raise InputError(f"prefix_len=(lo, hi) needs 1 <= lo <= hi, got ({lo}, {hi})")
    if bos is not None and not 0 <= bos < vocab_size:
        raise InputError(f"bos token {bos} is outside the vocabulary 0-{vocab_size - 1}")
    usable = vocab_size - (bos is not None)
    if hi > usable:
        raise InputError(
            f"a prefix of {hi} distinct tokens does not fit in a vocabulary of {vocab_size}"
            + (f" without the bos token {bos}" if bos is not None else "")
            + f": use prefix_len with hi <= {usable} or a larger vocab_size"
        )
    return lo, hi


def _generate(
    n: int,
    vocab_size: int,
    prefix_len: tuple[int, int],
    n_repeats: int,
    seed: int,
    bos: int | None,
    seq_len: int | None,
) -> dict[str, np.ndarray]:
    lo, hi = _check_args(n, vocab_size, prefix_len, n_repeats, bos)
    offset = 0 if bos is None else 1
    longest = offset + n_repeats * hi
    if seq_len is None:
        seq_len = longest
    elif seq_len < longest:
        raise InputError(
            f"seq_len {seq_len} is too short for {n_repeats} copies of a {hi}-token prefix"
            f"{' after the bos token' if bos is not None else ''}: it must be at least {longest}"
        )
    # token ids available to prefix and filler: the vocabulary without bos
    pool = np.array([t for t in range(vocab_size) if t != bos], dtype=np.int64)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    # filler everywhere first, then overwrite bos and the repeated prefix
    tokens = pool[rng.integers(0, len(pool), size=(n, seq_len))]
    # n random permutations of the pool, one row each; the first L of row i are its prefix
    perms = np.argsort(rng.random((n, len(pool))), axis=1)[:, :hi]
    prefixes = pool[perms]
    if bos is not None:
        tokens[:, 0] = bos
    pos = np.arange(n_repeats * hi)
    for length in np.unique(lengths):
        rows = np.nonzero(lengths == length)[0]
        span = pos[: n_repeats * length]
        tokens[rows[:, None], offset + span] = prefixes[rows[:, None], span % length]
    return {
        "tokens": tokens,
        "prefix_len": lengths.astype(np.int64),
        "repeat_start": (offset + lengths).astype(np.int64),
        "repeat_end": (offset + n_repeats * lengths).astype(np.int64),
    }


def induction(
    n: int,
    vocab_size: int,
    prefix_len: tuple[int, int] = (4, 20),
    n_repeats: int = 2,
    seed: int = 0,
    bos: int | None = 0,
    seq_len: int | None = None,
):
    """``n`` induction sequences as a ``datasets.Dataset`` (schema in the module docstring).

    ``prefix_len=(lo, hi)`` is the inclusive range of the per-sample repeat period;
    ``bos=None`` drops the BOS token; ``seq_len`` defaults to the longest sequence,
    ``1 + n_repeats * hi``. The same arguments give the same rows on every machine
    (numpy's ``default_rng(seed)``).
    """
    from datasets import Dataset, Features, Sequence, Value

    data = _generate(n, vocab_size, prefix_len, n_repeats, seed, bos, seq_len)
    features = Features(
        {
            "tokens": Sequence(Value("int64")),
            "prefix_len": Value("int64"),
            "repeat_start": Value("int64"),
            "repeat_end": Value("int64"),
        }
    )
    return Dataset.from_dict({k: list(v) for k, v in data.items()}, features=features)


def induction_tensors(
    n: int,
    vocab_size: int,
    prefix_len: tuple[int, int] = (4, 20),
    n_repeats: int = 2,
    seed: int = 0,
    bos: int | None = 0,
    seq_len: int | None = None,
) -> InductionBatch:
    """The same sequences as :func:`induction` with the same arguments, as an InductionBatch."""
    data = _generate(n, vocab_size, prefix_len, n_repeats, seed, bos, seq_len)
    return InductionBatch(
        **{k: torch.from_numpy(v) for k, v in data.items()},
        vocab_size=vocab_size,
        n_repeats=n_repeats,
    )


def as_batch(dataset, vocab_size: int, n_repeats: int = 2) -> InductionBatch:
    """An InductionBatch from a Dataset made by :func:`induction` (tokens [n, pos] int64)."""
    missing = {"tokens", "prefix_len", "repeat_start", "repeat_end"} - set(dataset.column_names)
    if missing:
        raise InputError(
            f"not an induction dataset: missing column(s) {', '.join(sorted(missing))}"
        )
    cols = {
        k: torch.tensor(dataset[k], dtype=torch.long)
        for k in ("tokens", "prefix_len", "repeat_start", "repeat_end")
    }
    return InductionBatch(**cols, vocab_size=vocab_size, n_repeats=n_repeats)
