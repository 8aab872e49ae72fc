"""Ablation values (what :mod:`.ablation` writes into an ablated unit), per slot: zero,
the mean of a reference set (streamed over chunks; real tokens only when rows are
padded), resampled reference rows, or the aligned corrupted run."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hookscope.addresses import Slot, slot_address
from hookscope.errors import InputError
from hookscope.inputs import as_tokens, causal_only, paired_lengths, tokens_of
from hookscope.interventions._inputs import copies_per_forward
from hookscope.model import HookedModel


class Values:
    """Ablation values per slot; ``get(slot, draw)`` broadcasts against one batch copy."""

    def __init__(
        self, model, addresses, method, inputs_t, reference, per_position, n_draws, seed,
        progress=False, lengths=None,
    ):  # fmt: skip
        self.method, self.n_draws = method, 1
        self.source: dict[Slot, Tensor] = {}
        self._drawn: dict[tuple[Slot, int], Tensor] = {}
        if method == "zero":
            return
        if reference is None:
            raise InputError(
                f"method={method!r} needs reference inputs (reference=...); "
                "method='zero' needs none"
            )
        ref_t, ref_lengths = _reference_tokens(model, method, reference, inputs_t, lengths)
        slots = list(dict.fromkeys(a.slot for a in addresses))
        positional = model.adapter.position_axis(slots[0]) is not None
        by_position = _check_shapes(
            model, method, inputs_t, ref_t, slots, positional, per_position, n_draws
        )
        if method == "mean":
            dims = [0, 1] if positional and not by_position else [0]
            self.source = _reference_means(model, ref_t, slots, dims, progress, ref_lengths)
            return
        if method == "resample":  # only the drawn reference rows are run
            self.n_draws = n_draws
            g = torch.Generator().manual_seed(seed)
            n_ref, batch = ref_t.shape[0], inputs_t.shape[0]
            drawn = [torch.randint(n_ref, (batch,), generator=g) for _ in range(n_draws)]
            used, where = torch.cat(drawn).unique(return_inverse=True)
            self.rows = list(where.split(batch))
            ref_t = ref_t[used.to(ref_t.device)]
        with torch.no_grad():
            _, cache = model.run_with_cache(ref_t, names=[slot_address(s) for s in slots])
        self.source = {slot: cache[slot_address(slot)] for slot in slots}

    def get(self, slot: Slot, draw: int) -> Tensor | None:
        """Replacement for the whole slot tensor of one batch copy (None: zeros)."""
        if self.method == "zero":
            return None
        value = self.source[slot]
        if self.method != "resample":
            return value
        key = (slot, draw)  # one tensor per slot and draw, however many jobs use it
        if key not in self._drawn:
            self._drawn[key] = value[self.rows[draw].to(value.device)]
        return self._drawn[key]


def _reference_tokens(model, method, reference, inputs_t, lengths):
    """``(reference token ids, row lengths)`` after the checks ``method`` asks of them."""
    ref_lengths = None
    if method == "corrupted":  # aligned with the inputs: padded alike, if at all
        ref_t, ref_lengths = tokens_of(model, reference)
        if ref_t.shape == inputs_t.shape:
            paired_lengths(model, inputs_t, lengths, ref_lengths, "the reference")
    elif method == "mean":  # padded rows: only real tokens are averaged
        ref_t, ref_lengths = tokens_of(model, reference)
        causal_only(model, ref_lengths)
    else:
        ref_t = as_tokens(
            model, reference, "a resampling reference",
            "a drawn row shorter than an input row would lend it padding; use reference "
            "prompts of one token length, or method='mean', which averages real tokens only",
        )  # fmt: skip
    return ref_t, ref_lengths


def _check_shapes(model, method, inputs_t, ref_t, slots, positional, per_position, n_draws):
    """Whether means are taken per position; InputError for a reference whose shape
    ``method`` (and ``per_position``) cannot use."""
    same = tuple(ref_t.shape[1:]) == tuple(inputs_t.shape[1:])
    what = "positions" if positional and not inputs_t.is_floating_point() else "shape"
    mismatch = f"inputs {tuple(inputs_t.shape)} and reference {tuple(ref_t.shape)}"
    if method == "corrupted" and ref_t.shape != inputs_t.shape:
        raise InputError(
            f"method='corrupted' needs a reference aligned row by row with the inputs "
            f"(the same shape); got {mismatch}"
        )
    if method == "resample" and not same:
        raise InputError(
            f"method='resample' needs reference inputs with the inputs' {what} "
            f"(any number of rows); got {mismatch}. Use method='mean' for other lengths"
        )
    if method == "resample" and (not isinstance(n_draws, int) or n_draws < 1):
        raise InputError(f"n_draws must be an int >= 1, got {n_draws!r}")
    if per_position not in (None, True, False):
        raise InputError(f"per_position must be None, True or False, got {per_position!r}")
    if method == "mean" and not positional and (per_position or not same):
        raise InputError(
            f"{model.adapter.name} activations have no position axis: mean ablation needs "
            f"per_position None or False and images of the inputs' shape; got {mismatch}"
        )
    if method == "mean" and per_position and not same:
        raise InputError(
            f"per_position=True needs a reference with the inputs' {what}; got {mismatch}. "
            "Use per_position=None or False to average over positions too"
        )
    by_position = positional and (same if per_position is None else per_position)
    if (
        method == "mean"
        and positional
        and not by_position
        and any(s.kind == "pattern" for s in slots)
    ):
        raise InputError(
            "mean ablation of an attention pattern needs per-position means (a reference with "
            f"the inputs' {what}): a pattern averaged over positions is no longer causal"
        )
    return by_position


def _reference_means(
    model: HookedModel,
    ref_t: Tensor,
    slots: list[Slot],
    dims: list[int],
    progress: bool,
    lengths: Tensor | None = None,
) -> dict[Slot, Tensor]:
    """Each slot's mean over the reference's rows (and positions, ``dims=[0, 1]``), kept
    as a broadcastable tensor: summed in float64 over forwards of ~4096 tokens, so memory
    stays that of one chunk however large the reference. With ``lengths`` (right-padded
    rows) only real tokens count: a position's mean is over the rows that reach it."""
    per = copies_per_forward(ref_t[:1], None)  # rows of ~4096 tokens per forward
    names = [slot_address(s) for s in slots]
    sums: dict[Slot, Tensor] = {}
    counts: dict[Slot, Tensor] = {}
    dtypes: dict[Slot, torch.dtype] = {}
    starts = range(0, ref_t.shape[0], per)
    for start in tqdm(starts, desc="reference means", disable=not progress or len(starts) < 2):
        with torch.no_grad():
            _, cache = model.run_with_cache(ref_t[start : start + per], names=names)
        for slot, name in zip(slots, names, strict=True):
            act = cache[name]
            weight = _real_tokens(model, slot, act, lengths, start)
            total = (act.double() * weight).sum(dims, keepdim=True)
            n = weight.expand(*[act.shape[d] if d in dims else -1 for d in range(act.ndim)])
            n = n.sum(dims, keepdim=True)
            sums[slot] = total if slot not in sums else sums[slot] + total
            counts[slot] = n if slot not in counts else counts[slot] + n
            dtypes[slot] = act.dtype
    for n in counts.values():
        if not bool((n > 0).all()):
            empty = (n.flatten() == 0).nonzero().flatten().tolist()
            raise InputError(
                f"positions {empty} are padding in every reference row, so their mean is "
                "undefined; use a reference whose rows reach them, or per_position=False"
            )
    return {slot: (total / counts[slot]).to(dtypes[slot]) for slot, total in sums.items()}


def _real_tokens(
    model: HookedModel, slot: Slot, act: Tensor, lengths: Tensor | None, start: int
) -> Tensor:
    """1.0 where ``act``'s rows (reference rows ``start..``) hold a real token, 0.0 on
    padding; shaped to broadcast against ``act`` (batch and position axes only)."""
    shape = [act.shape[0]] + [1] * (act.ndim - 1)
    axis = model.adapter.position_axis(slot)
    if lengths is None or axis is None:
        return torch.ones(shape, dtype=torch.float64, device=act.device)
    shape[axis] = act.shape[axis]
    rows = lengths[start : start + act.shape[0]].to(act.device)
    real = torch.arange(act.shape[axis], device=act.device) < rows[:, None]
    return real.reshape(shape).to(torch.float64)
