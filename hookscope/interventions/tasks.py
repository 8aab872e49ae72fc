"""Ready-made localization tasks: clean/corrupted inputs, a metric and sensible defaults.

* ``induction``: random token prefixes of length 10 repeated once after a BOS token
  (:func:`hookscope.data.induction_tensors`); the corrupted run replaces every token after
  BOS by fresh uniform tokens, so nothing repeats. Metric: next-token loss on the predictable
  repeated tokens (positions 12-20 of 21), lower is better. Defaults: noising, the
  ``faithfulness`` criterion (induction heads need the previous-token head, so only sets
  kept together carry the behaviour), every head.
* ``ioi``: indirect-object identification prompt pairs (:func:`hookscope.data.ioi`, "ABC"
  corruption: three fresh names); metric: logit difference between the indirect object and
  the subject at each prompt's last token. Defaults: denoising, the ``patch`` criterion,
  every head.

>>> task = build_task("induction", model, n=32)
>>> iv.localize_circuit(model, task.clean, task.corrupted, task.metric, sites=task.sites,
...                     direction=task.direction, criterion=task.criterion)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookscope.errors import InputError, format_choices
from hookscope.interventions.metrics import Metric, logit_diff, loss
from hookscope.model import HookedModel

__all__ = ["TASKS", "Task", "build_task"]

TASKS = {
    "induction": "repeated random tokens vs fresh ones; loss on the repeats (noising)",
    "ioi": "indirect-object identification, ABC corruption; logit difference (denoising)",
}

PREFIX = 10  # induction: the repeat period


@dataclass
class Task:
    """Inputs, metric and localization defaults of one task on one model."""

    name: str
    clean: Tensor
    corrupted: Tensor
    metric: Metric
    direction: str
    criterion: str
    sites: str
    positions: str
    description: str


def build_task(name: str, model: HookedModel, n: int = 32, seed: int = 0) -> Task:
    """Task ``name`` (one of :data:`TASKS`) with ``n`` examples for ``model``."""
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; choose one of {format_choices(list(TASKS))}")
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    return (_induction if name == "induction" else _ioi)(model, n, seed)


def _induction(model: HookedModel, n: int, seed: int) -> Task:
    from hookscope.data import induction_tensors

    vocab = model.cfg.d_vocab
    if not vocab:
        raise InputError(f"the induction task needs a language model, got {model.adapter.name}")
    bos = getattr(getattr(model.model, "config", None), "bos_token_id", None)
    bos = 0 if bos is None or bos >= vocab else int(bos)
    batch = induction_tensors(n, int(vocab), prefix_len=(PREFIX, PREFIX), seed=seed, bos=bos)
    clean = batch.tokens
    generator = torch.Generator().manual_seed(seed + 1)
    fresh = torch.randint(0, int(vocab) - 1, clean[:, 1:].shape, generator=generator)
    corrupted = clean.clone()
    corrupted[:, 1:] = fresh + (fresh >= bos).long()  # uniform over the vocabulary minus BOS
    # logits at t predict token t + 1; the second copy starts at 1 + PREFIX and its first
    # token is unpredictable, so read the predictions of tokens 2 + PREFIX ... 2 * PREFIX
    metric = loss(clean, positions=list(range(1 + PREFIX, 2 * PREFIX)))
    return Task(
        name="induction",
        clean=clean,
        corrupted=corrupted,
        metric=metric,
        direction="noise",
        criterion="faithfulness",
        sites="head.*.*",
        positions="all",
        description=TASKS["induction"],
    )


def _ioi(model: HookedModel, n: int, seed: int) -> Task:
    from hookscope.data import ioi, ioi_tokens

    tokenizer: Any = model.tokenizer
    if tokenizer is None:
        raise InputError("the ioi task needs a model with a tokenizer (e.g. hs.zoo.load(...))")
    tokens = ioi_tokens(ioi(tokenizer, n, seed=seed), tokenizer)
    metric = logit_diff(tokens.correct, tokens.incorrect, position=tokens.end_pos)
    return Task(
        name="ioi",
        clean=tokens.clean_tokens,
        corrupted=tokens.corrupted_tokens,
        metric=metric,
        direction="denoise",
        criterion="patch",
        sites="head.*.*",
        positions="all",
        description=TASKS["ioi"],
    )
