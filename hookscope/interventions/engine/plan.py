"""The plan of a sweep: which jobs share a forward, where each copy joins the batch, and
which positions a forward skips. Pure data, built by :func:`plan` from the jobs and the
:class:`Facts` of the model and its baseline run; :mod:`.execute` runs it.

A :class:`Forward` holds :class:`Copy` groups in ascending join block; each job of a
group is one copy of the base batch. A copy that writes inside block ``L`` joins the batch
at block ``L``'s input (blocks below replay the baseline); one whose writes reach block
``L``'s output linearly (a head's ``z``/``result`` in a parallel block) joins at ``L + 1``
with that change added (``tail``). Copies of slots outside the blocks (embedding, logits,
``module:`` sites, models without blocks) are plain copies of the whole input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hookscope.addresses import Slot, slot_kind
from hookscope.interventions.engine.jobs import Job, disjoint, slots_of

__all__ = ["Facts", "Copy", "Forward", "plan", "BLOCK_COST"]

# Head slots whose write reaches the block output through the output projection only.
LINEAR_TAIL = ("z", "result")

# The fixed cost of running one block in a forward, in units of one position of one copy
# through one block: on CPUs, reading a block's weights costs about as much as ~50 rows.
BLOCK_COST = 48


@dataclass(frozen=True)
class Facts:
    """What planning needs to know about the model and its recorded baseline run.

    ``n_blocks``: blocks whose baseline inputs and outputs are recorded (None: copies are
    plain copies of the whole input). ``n_pos``: positions of the base batch (1 without a
    position axis). ``linear_head_tail``: head writes change a block's output linearly.
    ``skip_prefix``: forwards may start at the first changed position (causal model, key/
    value cache and readout available)."""

    n_blocks: int | None
    n_pos: int
    linear_head_tail: bool = False
    skip_prefix: bool = False

    def start(self, slot: Slot) -> int | None:
        """The block whose input first differs when ``slot`` is written (None: the input)."""
        if self.n_blocks is None or not slot_kind(slot.kind).in_block:
            return None
        return slot.layer

    def join(self, job: Job) -> tuple[int | None, int | None]:
        """``(start block, tail layer)`` of a job; the tail is set when the job's writes
        change one block's output linearly (then the copy joins after that block)."""
        slots = slots_of(job)
        layers = {s.layer for s in slots}
        tail = None
        if (
            self.linear_head_tail
            and self.n_blocks is not None
            and len(layers) == 1
            and all(s.kind in LINEAR_TAIL for s in slots)
            and disjoint(job, self.n_pos)  # overlapping writes: through hooks (harmless twice)
        ):
            tail = layers.pop()
        starts = [self.start(s) for s in slots]
        return (None if None in starts else min(starts)), tail  # type: ignore[type-var]


@dataclass(frozen=True)
class Copy:
    """Copies of the base batch, one per job, that join a forward at the same block."""

    jobs: tuple[int, ...]  #: indices into the job list
    start: int | None  #: block whose input first differs; None: the model input
    tail: int | None = None  #: block whose output changes linearly (the copies join after it)

    @property
    def block(self) -> int | None:
        """The block at whose input these copies join the batch (None: plain copies)."""
        return self.tail + 1 if self.tail is not None else self.start


@dataclass(frozen=True)
class Forward:
    """One forward: ``copies`` in ascending join block, computing positions ``prefix..``."""

    prefix: int
    copies: tuple[Copy, ...]

    @property
    def jobs(self) -> tuple[int, ...]:
        """The job of each copy, in the batch's order."""
        return tuple(i for c in self.copies for i in c.jobs)


def plan(
    jobs: Sequence[Job], facts: Facts, k: int, firsts: Sequence[int] | None = None
) -> list[Forward]:
    """Forwards of at most ``k`` copies scoring every job.

    A forward mixes jobs writing different blocks, ordered by join block. With
    ``facts.skip_prefix`` and each job's first changed position (``firsts``), jobs are
    sorted by that position and cut where the positions saved outweigh another forward's
    fixed cost (:data:`BLOCK_COST` per block), and each forward skips the positions
    before its earliest change. Jobs outside the blocks run in plain forwards of their own.
    """
    keys = [facts.join(job) for job in jobs]
    plain = [i for i, key in enumerate(keys) if key == (None, None)]
    stacked = [i for i, key in enumerate(keys) if key != (None, None)]
    out = [_forward(0, plain[j : j + k], keys) for j in range(0, len(plain), k)]
    if facts.n_blocks is None or not stacked:
        return out + [_forward(0, stacked[j : j + k], keys) for j in range(0, len(stacked), k)]
    first = dict.fromkeys(stacked, 0)
    if facts.skip_prefix and firsts is not None:
        first = {i: int(firsts[i]) for i in stacked}
    stacked.sort(key=lambda i: first[i])
    depth = [facts.n_blocks - _effective(keys[i]) for i in stacked]  # blocks each copy runs
    for a, b in split([first[i] for i in stacked], depth, facts.n_pos, k):
        out.append(_forward(first[stacked[a]], stacked[a:b], keys))
    return out


def _effective(key: tuple[int | None, int | None]) -> int:
    start, tail = key
    return tail + 1 if tail is not None else -1 if start is None else start


def _forward(prefix: int, idx: list[int], keys: list) -> Forward:
    """A forward of jobs ``idx``, grouped into copies by ``(start, tail)`` in join order."""
    copies: list[Copy] = []
    for i in sorted(idx, key=lambda i: _effective(keys[i])):
        start, tail = keys[i]
        if copies and (copies[-1].start, copies[-1].tail) == (start, tail):
            copies[-1] = Copy((*copies[-1].jobs, i), start, tail)
        else:
            copies.append(Copy((i,), start, tail))
    return Forward(prefix, tuple(copies))


def split(firsts: list[int], depth: list[int], n_pos: int, k: int) -> list[tuple[int, int]]:
    """Cut jobs sorted by first changed position into forwards ``[a, b)`` of at most ``k``
    copies, minimising the work: per forward, :data:`BLOCK_COST` for each block it runs,
    plus the positions ``firsts[a]..`` of each copy through its ``depth`` blocks. Cuts are
    only considered between different first positions (and every ``k`` jobs)."""
    n = len(firsts)
    bounds = [0] + [i for i in range(1, n) if firsts[i] != firsts[i - 1]] + [n]
    m = len(bounds)
    seg_max = [max(depth[bounds[i] : bounds[i + 1]]) for i in range(m - 1)]
    seg_sum = [sum(depth[bounds[i] : bounds[i + 1]]) for i in range(m - 1)]
    best = [0.0] + [float("inf")] * (m - 1)
    cut = [0] * m
    for j in range(1, m):
        deepest, blocks_run = 0, 0  # over segments i..j-1, as i goes down
        for i in range(j - 1, max(-1, j - 65), -1):
            deepest, blocks_run = max(deepest, seg_max[i]), blocks_run + seg_sum[i]
            forwards = -(-(bounds[j] - bounds[i]) // k)
            c = best[i] + forwards * BLOCK_COST * deepest + blocks_run * (n_pos - firsts[bounds[i]])
            if c < best[j]:
                best[j], cut[j] = c, i
    runs = []
    j = m - 1
    while j > 0:
        a, b = bounds[cut[j]], bounds[j]
        runs += [(x, min(x + k, b)) for x in range(a, b, k)][::-1]
        j = cut[j]
    return runs[::-1]
