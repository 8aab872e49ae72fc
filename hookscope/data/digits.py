"""scikit-learn's bundled 8x8 handwritten digits, with a fixed train/test split.

The data is :func:`sklearn.datasets.load_digits` (1,797 images of the digits 0-9, 8x8
pixels, grey levels 0-16; it ships inside scikit-learn, so no download). The split is
stratified by label and seeded (``test_size=0.25``, ``random_state=0``): 1,347 training
and 450 test images, the same on every machine.

Schema of the ``datasets.Dataset`` returned by :func:`digits` (one row per image):

=========  =======================  =====================================================
column     type                     meaning
=========  =======================  =====================================================
``image``  8 x 8 list of float32    pixel intensities scaled to [0, 1] (sklearn's 0-16 / 16),
                                    row-major: ``image[row][col]``
``label``  int64                    the digit, 0-9
``index``  int64                    row of ``load_digits().images`` / ``.target`` it came from
=========  =======================  =====================================================

Rows are ordered by ``index`` within each split.

>>> train = digits("train")
>>> X, y = digits_tensors("test")      # X [450, 1, 8, 8] float32 in [0, 1], y [450] int64
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from hookscope.errors import InputError, suggestion

__all__ = ["SPLITS", "TEST_FRACTION", "SPLIT_SEED", "digits", "digits_tensors", "split_indices"]

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.25
SPLIT_SEED = 0
#: sklearn's grey levels run 0-16; images are divided by this
PIXEL_MAX = 16.0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(
            f"unknown digits split {split!r}; choose one of {', '.join(SPLITS)}."
            + suggestion(str(split), SPLITS)
        )


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / PIXEL_MAX, bunch.target.astype(np.int64)


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _raw()
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=labels,
    )
    return np.sort(train), np.sort(test)


def split_indices(split: str = "train") -> np.ndarray:
    """Rows of ``load_digits()`` in ``split`` (sorted int64 array; "all" is 0..1796)."""
    _check_split(split)
    if split == "all":
        return np.arange(len(_raw()[1]))
    train, test = _split()
    return (train if split == "train" else test).copy()


def digits(split: str = "train", *, tensors: bool = False):
    """The digits ``split`` ("train", "test" or "all") as a ``datasets.Dataset``.

    Columns ``image`` (8x8 floats in [0, 1]), ``label`` (0-9) and ``index`` (row in
    ``load_digits()``); see the module docstring for the split. ``tensors=True`` returns
    ``(X, y)`` as :func:`digits_tensors` does: ``X, y = hs.data.digits("test", tensors=True)``.
    """
    if not isinstance(tensors, bool):
        raise InputError(f"tensors must be True or False, got {tensors!r}")
    if tensors:
        return digits_tensors(split)
    from datasets import Array2D, Dataset, Features, Value

    rows = split_indices(split)
    images, labels = _raw()
    features = Features(
        {
            "image": Array2D(shape=(8, 8), dtype="float32"),
            "label": Value("int64"),
            "index": Value("int64"),
        }
    )
    return Dataset.from_dict(
        {"image": images[rows], "label": labels[rows], "index": rows.astype(np.int64)},
        features=features,
    )


def digits_tensors(split: str = "train") -> tuple[Tensor, Tensor]:
    """``(X, y)`` for ``split``: X [n, 1, 8, 8] float32 in [0, 1], y [n] int64 labels.

    The same rows, in the same order, as :func:`digits` (ready for a CNN or ``hs.ViT``;
    an MLP flattens X itself, e.g. with a leading ``nn.Flatten``).
    """
    rows = split_indices(split)
    images, labels = _raw()
    X = torch.from_numpy(images[rows]).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels[rows]).contiguous()
    return X, y
