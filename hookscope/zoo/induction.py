"""Induction-circuit measurements on a HookedModel language model, over induction sequences.

All functions take an :class:`~hookscope.data.induction.InductionBatch` (tokens
[batch, pos] with the repeat period ``L = prefix_len`` of each row) and pool over every
qualifying (sequence, position) pair, so each repeated token counts once.

Definitions (``A[b, h, t, s]`` is head h's attention pattern, dest t, src s):

* **induction score** of a head: the mean of ``A[b, h, t, t - L_b + 1]`` over the repeated
  tokens, ``repeat_start_b <= t < repeat_end_b``: the attention from each repeated token to
  the token after its (most recent) earlier occurrence.
* **previous-token score**: the mean of ``A[b, h, t, t - 1]`` over every position ``t >= 1``
  of every sequence (filler and BOS-adjacent positions included).
* **chance** levels (:func:`chance_scores`): the same means for a head attending uniformly
  over its causal window, ``1 / (t + 1)``.
* **repeat loss**: mean next-token cross-entropy (nats) at the positions
  ``repeat_start_b <= t < repeat_end_b - 1``, i.e. predicting each repeated token after the
  first from the repeated token before it. A model that cannot copy from context scores
  about ``ln(vocab_size)``, the loss of a uniform guess (zero-ablation, being off the
  training distribution, can push it somewhat above).

Heads are ablated by zeroing their z (``head.L.H``, the input of the output projection)
with :func:`hookscope.interventions.ablate` (``method="zero"``): the head then writes only
the output projection's shared bias. Scores read the attention patterns from
:meth:`~hookscope.model.HookedModel.run_with_cache`; this module adds no hooks of its own.

>>> batch = induction_tensors(500, vocab_size=64, prefix_len=(4, 20), seed=1234)
>>> scores = induction_scores(model, batch)          # [n_layers, n_heads]
>>> report = induction_circuit(model, batch)         # scores, circuit heads, ablation losses
>>> print(report)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hookscope import interventions as iv
from hookscope.addresses import Address, AttentionHead
from hookscope.data.induction import InductionBatch
from hookscope.errors import InputError
from hookscope.modes import EvalMode

__all__ = [
    "InductionCircuit",
    "chance_scores",
    "head_scores",
    "head_zeroed_losses",
    "induction_circuit",
    "induction_scores",
    "previous_token_scores",
    "repeat_loss",
    "zero_heads",
]

Head = tuple[int, int]


def _check(model: Any, batch: InductionBatch) -> None:
    if not isinstance(batch, InductionBatch):
        raise InputError(
            f"expected an InductionBatch (hookscope.data.induction.induction_tensors), "
            f"got {type(batch).__name__}"
        )
    if len(batch) == 0:
        raise InputError("the induction batch is empty")
    n_heads = getattr(model.cfg, "n_heads", None)
    if not n_heads:
        raise InputError(f"{model!r} has no attention heads to score")


def _induction_pairs(batch: InductionBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(row, dest, src) index vectors of every repeated token and its induction target."""
    rows, dest = batch.repeated_mask().nonzero(as_tuple=True)
    src = dest - batch.prefix_len[rows] + 1
    return rows, dest, src


def _chunks(batch: InductionBatch, batch_size: int) -> Iterator[InductionBatch]:
    for start in range(0, len(batch), batch_size):
        yield batch[start : start + batch_size]


def head_scores(model: Any, batch: InductionBatch, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(induction, previous_token)`` scores, each float64 [n_layers, n_heads], in one pass.

    See the module docstring for the definitions. ``batch_size`` sequences run per forward.
    """
    _check(model, batch)
    n_layers, n_heads = model.n_layers, int(model.cfg.n_heads)
    ind_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    prev_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    n_ind = n_prev = 0
    names = [str(AttentionHead(layer, None, "pattern")) for layer in range(n_layers)]
    for part in _chunks(batch, batch_size):
        _, cache = model.run_with_cache(part.tokens, names=names)
        # [layer, batch, head, dest, src]
        pattern = torch.stack([cache[name] for name in names]).double()
        rows, dest, src = _induction_pairs(part)
        ind_sum += pattern.permute(1, 3, 4, 0, 2)[rows, dest, src].sum(0)
        n_ind += len(rows)
        diag = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [layer, batch, head, pos - 1]
        prev_sum += diag.sum((1, 3))
        n_prev += diag.shape[1] * diag.shape[3]
    if n_ind == 0:
        raise InputError("the batch has no repeated tokens to score")
    return ind_sum / n_ind, prev_sum / n_prev


def induction_scores(model: Any, batch: InductionBatch, batch_size: int = 256) -> Tensor:
    """Per-head induction score, float64 [n_layers, n_heads] (module docstring)."""
    return head_scores(model, batch, batch_size)[0]


def previous_token_scores(model: Any, batch: InductionBatch, batch_size: int = 256) -> Tensor:
    """Per-head previous-token score, float64 [n_layers, n_heads] (module docstring)."""
    return head_scores(model, batch, batch_size)[1]


def chance_scores(batch: InductionBatch) -> tuple[float, float]:
    """``(induction, previous_token)`` scores of a head attending uniformly over ``0..t``."""
    _, dest, _ = _induction_pairs(batch)
    induction = (1.0 / (dest.double() + 1)).mean().item()
    pos = torch.arange(1, batch.tokens.shape[1], dtype=torch.float64)
    return induction, (1.0 / (pos + 1)).mean().item()


def zero_heads(heads: Sequence[Head]) -> list[AttentionHead]:
    """The z address (``head.L.H``) of each ``(layer, head)``: sites for :func:`repeat_loss`."""
    return [AttentionHead(int(layer), int(head)) for layer, head in heads]


def _sites(zeroed: Sequence) -> list:
    """``zeroed`` as ablation sites: ``(layer, head)`` pairs become their z addresses."""
    if isinstance(zeroed, (str, Address)):
        return [zeroed]
    return [
        AttentionHead(*map(int, s))
        if isinstance(s, tuple) and len(s) == 2 and all(isinstance(i, int) for i in s)
        else s
        for s in zeroed
    ]


def _predicted(batch: InductionBatch) -> tuple[Tensor, Tensor]:
    """(row, pos) of every position predicting a repeated token from the one before."""
    pos = torch.arange(batch.tokens.shape[1] - 1)
    mask = (pos >= batch.repeat_start[:, None]) & (pos < batch.repeat_end[:, None] - 1)
    return mask.nonzero(as_tuple=True)


def _repeat_nll(logits: Tensor, part: InductionBatch) -> Tensor:
    """Summed next-token cross-entropy (float64, nats) on ``part``'s repeated positions."""
    rows, t = (i.to(logits.device) for i in _predicted(part))
    logp = F.log_softmax(logits[rows, t].double(), dim=-1)
    return -logp.gather(1, part.tokens.to(logits.device)[rows, t + 1][:, None]).sum()


def _n_predicted(batch: InductionBatch) -> int:
    """How many positions the repeat loss averages over (an InputError if none)."""
    n = len(_predicted(batch)[0])
    if n == 0:
        raise InputError("the batch has no repeated tokens to predict (prefix_len must be >= 2)")
    return n


def repeat_loss(
    model: Any, batch: InductionBatch, zeroed: Sequence = (), batch_size: int = 256
) -> float:
    """Mean cross-entropy (nats) on the repeated part (module docstring), in eval mode.

    ``zeroed``: heads zero-ablated together, through :func:`hookscope.interventions.ablate`
    (``method="zero"``): ``(layer, head)`` pairs (:func:`zero_heads`) or any of its sites.
    """
    _check(model, batch)
    count, sites, total = _n_predicted(batch), _sites(zeroed), 0.0
    for part in _chunks(batch, batch_size):
        if sites:
            logits = iv.ablate(model, part.tokens, sites, method="zero", progress=False)
        else:
            with torch.no_grad(), EvalMode(model.model):
                logits = model(part.tokens)
        total += _repeat_nll(logits, part).item()
    return total / count


def head_zeroed_losses(model: Any, batch: InductionBatch, batch_size: int = 256) -> Tensor:
    """Repeat loss with each head zeroed alone, float64 [n_layers, n_heads]: one
    :func:`hookscope.interventions.ablate` sweep of ``head.*.*`` (``method="zero"``) per
    ``batch_size`` sequences, its metric the summed cross-entropy, pooled over the sweeps."""
    _check(model, batch)
    count, total = _n_predicted(batch), None
    for part in _chunks(batch, batch_size):
        result = iv.ablate(
            model,
            part.tokens,
            "head.*.*",
            method="zero",
            metric=partial(_repeat_nll, part=part),
            progress=False,
        )
        sums = result.scores.double()
        total = sums if total is None else total + sums
    return total / count


@dataclass
class InductionCircuit:
    """What :func:`induction_circuit` found: scores, the circuit heads and ablation losses.

    ``induction``, ``previous_token``: float64 [n_layers, n_heads] scores;
    ``per_head_loss``: [n_layers, n_heads] repeat loss with that one head zeroed;
    heads are ``(layer, head)`` pairs; losses in nats.
    """

    induction: Tensor
    previous_token: Tensor
    induction_chance: float
    previous_token_chance: float
    previous_token_heads: list[Head]
    induction_heads: list[Head]
    control_head: Head | None
    clean_loss: float
    circuit_loss: float
    control_loss: float | None
    per_head_loss: Tensor
    uniform_loss: float
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def circuit(self) -> list[Head]:
        return self.previous_token_heads + self.induction_heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tensors as nested lists, heads as ``"head.L.H"`` strings."""

        def name(h: Head | None) -> str | None:
            return None if h is None else str(AttentionHead(*h))

        return {
            "induction_scores": self.induction.tolist(),
            "previous_token_scores": self.previous_token.tolist(),
            "induction_chance": self.induction_chance,
            "previous_token_chance": self.previous_token_chance,
            "previous_token_heads": [name(h) for h in self.previous_token_heads],
            "induction_heads": [name(h) for h in self.induction_heads],
            "control_head": name(self.control_head),
            "repeat_loss_clean": self.clean_loss,
            "repeat_loss_circuit_zeroed": self.circuit_loss,
            "repeat_loss_control_zeroed": self.control_loss,
            "repeat_loss_head_zeroed": self.per_head_loss.tolist(),
            "uniform_loss": self.uniform_loss,
            "thresholds": dict(self.thresholds),
        }

    def to_pandas(self):
        """One row per head: layer, head, induction, previous_token, loss_head_zeroed, role."""
        import pandas as pd

        roles = {h: "previous-token" for h in self.previous_token_heads}
        roles.update({h: "induction" for h in self.induction_heads})
        if self.control_head is not None:
            roles[self.control_head] = "control"
        n_layers, n_heads = self.induction.shape
        return pd.DataFrame(
            [
                {
                    "layer": layer,
                    "head": head,
                    "induction": float(self.induction[layer, head]),
                    "previous_token": float(self.previous_token[layer, head]),
                    "loss_head_zeroed": float(self.per_head_loss[layer, head]),
                    "role": roles.get((layer, head), ""),
                }
                for layer in range(n_layers)
                for head in range(n_heads)
            ]
        )

    def __str__(self) -> str:
        lines = [
            f"{'head':>10} {'induction':>10} {'prev-token':>10} {'loss zeroed':>12}  role",
        ]
        for row in self.to_pandas().itertuples():
            lines.append(
                f"{f'head.{row.layer}.{row.head}':>10} {row.induction:10.3f} "
                f"{row.previous_token:10.3f} {row.loss_head_zeroed:12.3f}  {row.role}"
            )
        lines.append(
            f"chance: induction {self.induction_chance:.3f}, previous-token "
            f"{self.previous_token_chance:.3f}"
        )
        lines.append(
            f"repeat loss: clean {self.clean_loss:.3f}, circuit zeroed {self.circuit_loss:.3f}, "
            + (f"control zeroed {self.control_loss:.3f}, " if self.control_loss is not None else "")
            + f"uniform ln(vocab) {self.uniform_loss:.3f}"
        )
        return "\n".join(lines)

    __repr__ = __str__


def induction_circuit(
    model: Any,
    batch: InductionBatch,
    previous_token_threshold: float = 0.4,
    induction_threshold: float = 0.4,
    batch_size: int = 256,
) -> InductionCircuit:
    """Score every head, pick the circuit and verify it by zero-ablation.

    Previous-token heads: heads outside the last layer with previous-token score
    ``>= previous_token_threshold``. Induction heads: heads outside the first layer with
    induction score ``>= induction_threshold``. The control head is the head outside the
    circuit whose larger score is smallest. Repeat losses are computed clean, with the whole
    circuit zeroed, with the control head zeroed, and with each head zeroed alone.
    """
    induction, prev = head_scores(model, batch, batch_size)
    n_layers, n_heads = induction.shape
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    prev_heads = [h for h in heads if h[0] < n_layers - 1 and prev[h] >= previous_token_threshold]
    ind_heads = [h for h in heads if h[0] > 0 and induction[h] >= induction_threshold]
    circuit = set(prev_heads + ind_heads)
    others = [h for h in heads if h not in circuit]
    control = min(others, key=lambda h: max(prev[h], induction[h]).item()) if others else None
    per_head = head_zeroed_losses(model, batch, batch_size)
    ind_chance, prev_chance = chance_scores(batch)
    return InductionCircuit(
        induction=induction,
        previous_token=prev,
        induction_chance=ind_chance,
        previous_token_chance=prev_chance,
        previous_token_heads=prev_heads,
        induction_heads=ind_heads,
        control_head=control,
        clean_loss=repeat_loss(model, batch, (), batch_size),
        circuit_loss=repeat_loss(model, batch, sorted(circuit), batch_size),
        control_loss=None if control is None else float(per_head[control]),
        per_head_loss=per_head,
        uniform_loss=math.log(batch.vocab_size),
        thresholds={"previous_token": previous_token_threshold, "induction": induction_threshold},
    )
