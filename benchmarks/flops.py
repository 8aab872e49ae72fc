"""The arithmetic an exact activation-patching sweep cannot avoid, counted from a model's
config, and the compute limit it sets at a measured matrix-product rate (what
``benchmarks/bench_patching.py`` compares its sweep times with).

A sweep is a list of :class:`Job` (one patched copy of the base batch each): where the patch
enters the model and the first position at which it writes a value the base run lacks.
:func:`first_changes` finds those positions from one cached clean and corrupted run;
:func:`exact_flops` counts the floating-point operations (a multiply-add is 2) of the
matrix products and attention the exact results need, on causal decoder-only transformers
(GPT-NeoX, Llama-style with grouped-query attention and a gated MLP); :func:`gemm_rate`
measures the fp32 matrix-product rate at a model's layer shapes and :class:`Limit` puts
the two together. :func:`matrix_products` lists the products a sweep actually runs and
:func:`alone_seconds` times them one by one outside it (the part of the sweep's time its
matrix products alone need at their own shapes).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: the site kinds a job may patch (hookscope addresses): the residual stream before a
#: block, one head's attention output before the output projection (``head`` = ``z``), the
#: attention output after it, the MLP output
KINDS = ("resid_pre", "head", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that set its arithmetic."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    gated_mlp: bool  # Llama-style gate and up projections (3 matrices) or up/down (2)
    parallel_residual: bool  # GPT-NeoX: attention and MLP both read the block input

    @classmethod
    def of(cls, config: Any) -> Shape:
        """From a Hugging Face config (GPT-NeoX or Llama-style)."""
        heads = int(config.num_attention_heads)
        d_model = int(config.hidden_size)
        d_head = int(getattr(config, "head_dim", None) or d_model // heads)
        return cls(
            n_layers=int(config.num_hidden_layers),
            d_model=d_model,
            n_heads=heads,
            n_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            d_head=d_head,
            d_mlp=int(config.intermediate_size),
            gated_mlp=getattr(config, "model_type", "") != "gpt_neox",
            parallel_residual=bool(getattr(config, "use_parallel_residual", False)),
        )

    # FLOPs per position of the parts of one block
    @property
    def q(self) -> int:
        return 2 * self.d_model * self.n_heads * self.d_head

    @property
    def kv(self) -> int:
        return 2 * 2 * self.d_model * self.n_kv_heads * self.d_head

    @property
    def o(self) -> int:
        return 2 * self.n_heads * self.d_head * self.d_model

    @property
    def mlp(self) -> int:
        return (3 if self.gated_mlp else 2) * 2 * self.d_model * self.d_mlp

    def attention(self, query: int) -> int:
        """Scores and weighted values of one query at position ``query`` (keys ``0..query``)."""
        return 2 * 2 * self.n_heads * self.d_head * (query + 1)

    @property
    def block(self) -> int:
        """A block's matrix products per position (without attention)."""
        return self.q + self.kv + self.o + self.mlp


@dataclass(frozen=True)
class Job:
    """One patched copy: ``kind`` (of :data:`KINDS`) at ``layer``; ``first``: the first
    position the patch changes, or None when it writes the base run's own values (then the
    copy's result is the base run's and needs no work)."""

    kind: str
    layer: int
    first: int | None


def exact_flops(
    shape: Shape,
    jobs: Sequence[Job],
    read: Sequence[int],
    n_logits: int = 2,
    baseline_rows: int | None = None,
) -> float:
    """FLOPs of the matrix products and attention an exact sweep of ``jobs`` needs.

    ``read``: per row of the base batch, the one position the metric reads (e.g. each IOI
    prompt's last token); ``n_logits``: the logit columns the metric reads there (2 for a
    logit difference). ``baseline_rows``: rows of the unpatched forward (clean and
    corrupted: twice the batch, the default) that every sweep needs once.

    A job patching layer ``L`` first at position ``s`` needs, for every row ``r``, the
    positions ``s..read[r]`` (a causal model: earlier positions equal the base run's, whose
    keys and values are reused; later ones are never read) of:

    * block ``L`` from the patch on: the whole block for ``resid_pre``; for ``head`` (its
      ``z``) the output projection and, with a sequential residual, the MLP (in a
      parallel-residual block, the head's own slice of the output projection only: its
      change reaches the block output linearly); for ``attn_out`` the MLP (sequential) or
      nothing (parallel); for ``mlp_out`` nothing;
    * every later block, each query attending to all keys up to its position;
    * in the last block, only the keys and values at every such position: the query,
      attention, output projection and MLP at ``read[r]`` alone (other positions' outputs
      are never read); then ``n_logits`` logit columns at ``read[r]`` (the final norm is
      not counted).

    The baseline: ``baseline_rows`` rows, positions ``0..read[r]``, every block (the last
    one as above), ``n_logits`` columns. Jobs with ``first`` None cost nothing. Norms,
    rotary embeddings, activations and residual additions are left out (a few percent of
    the matrix products at these widths).
    """
    s = shape
    n = s.n_layers
    rows = 2 * len(read) if baseline_rows is None else baseline_rows
    # the baseline: read[] repeated for clean and corrupted halves
    total = float(_run(s, 0, [read[i % len(read)] for i in range(rows)], n_logits, "resid_pre", 0))
    for job in jobs:
        if job.first is None:
            continue
        if job.kind not in KINDS:
            raise ValueError(f"unknown site kind {job.kind!r}; one of {KINDS}")
        if not 0 <= job.layer < n:
            raise ValueError(f"layer {job.layer} outside 0..{n - 1}")
        total += _run(s, job.first, list(read), n_logits, job.kind, job.layer)
    return total


def _run(s: Shape, first: int, read: list[int], n_logits: int, kind: str, layer: int) -> int:
    """FLOPs of one copy (all rows) from ``kind`` at ``layer``, positions ``first..``."""
    n = s.n_layers
    total = 0
    for end in read:
        positions = range(first, end + 1)
        if not positions:
            continue
        attention = sum(s.attention(t) for t in positions)
        n_pos = len(positions)
        # the patched block
        if kind == "resid_pre":
            own = s.block * n_pos + attention
        elif kind == "head":
            own = s.o // s.n_heads * n_pos if s.parallel_residual else (s.o + s.mlp) * n_pos
        elif kind == "attn_out":
            own = 0 if s.parallel_residual else s.mlp * n_pos
        else:
            own = 0
        if layer == n - 1:  # the last block itself: its outputs matter at ``end`` only
            if kind == "resid_pre":
                own = s.kv * n_pos + s.q + s.attention(end) + s.o + s.mlp
            elif own:
                own = own // n_pos
        later = n - 1 - layer  # full blocks after the patched one, the last one included
        if later:
            total += (later - 1) * (s.block * n_pos + attention)
            total += s.kv * n_pos + s.q + s.attention(end) + s.o + s.mlp  # the last block
        total += own + 2 * s.d_model * n_logits
    return total


def first_changes(
    model: Any, clean: torch.Tensor, corrupted: torch.Tensor, jobs: Sequence[tuple[str, int | None]]
) -> list[Job]:
    """:class:`Job` objects for patches of the clean run into the corrupted one (denoising):
    ``jobs`` holds ``(address, position)`` pairs (``"head.3.1"``, ``"resid_pre.2"``;
    position None: every position at once). A job's ``first`` is the first position where
    the clean activation differs from the corrupted one (among the patched positions),
    found from one cached run of each (``model``: a hookscope ``HookedModel``)."""
    names = sorted({address for address, _ in jobs})
    with torch.no_grad():
        _, a = model.run_with_cache(clean, names=names)
        _, b = model.run_with_cache(corrupted, names=names)
    out = []
    for address, position in jobs:
        kind, layer = address.split(".")[0], int(address.split(".")[1])
        differs = (a[address] != b[address]).reshape(a[address].shape[0], a[address].shape[1], -1)
        at = differs.any(-1).any(0).nonzero().flatten().tolist()  # positions where any row differs
        if position is not None:
            at = [p for p in at if p == position % differs.shape[1]]
        out.append(Job(kind, layer, at[0] if at else None))
    return out


def onednn_linear():
    """oneDNN's fp32 linear (``torch.ops.mkldnn._linear_pointwise``, what hookscope's sweep
    forwards use), or None where this torch build or CPU lacks it."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        x, w = torch.ones(2, 4), torch.ones(3, 4)
        if not torch.equal(op(x, w, None, "none", [], ""), torch.full((2, 3), 4.0)):
            return None
    except RuntimeError:
        return None
    return op


def gemm_rate(shape: Shape, rows: int = 4096, samples: int = 7) -> tuple[float, str]:
    """GFLOP/s of fp32 matrix products at ``shape``'s layers: one block's linear layers
    (q, k, v, output, MLP) on ``rows`` rows, timed as one sequence; the fastest of
    ``samples`` interleaved samples (the machine's capability, not its noise), for the
    better of torch's ``nn.functional.linear`` and oneDNN's linear. Returns ``(rate,
    which)``."""
    d, qd, kvd = shape.d_model, shape.n_heads * shape.d_head, shape.n_kv_heads * shape.d_head
    mlp = [(d, shape.d_mlp)] * (2 if shape.gated_mlp else 1) + [(shape.d_mlp, d)]
    layers = [(d, qd), (d, kvd), (d, kvd), (qd, d), *mlp]
    g = torch.Generator().manual_seed(0)
    args = [(torch.randn(rows, i, generator=g), torch.randn(o, i, generator=g)) for i, o in layers]
    flop = sum(2 * rows * w.shape[0] * w.shape[1] for _, w in args)
    fns = {"torch": lambda x, w: torch.nn.functional.linear(x, w)}
    if (onednn := onednn_linear()) is not None:
        fns["oneDNN"] = lambda x, w: onednn(x, w, None, "none", [], "")

    def block(fn) -> None:
        for x, w in args:
            fn(x, w)

    number = max(1, int(2e9 / flop))  # ~2 GFLOP a sample
    best_s = dict.fromkeys(fns, float("inf"))
    with torch.no_grad():
        for fn in fns.values():
            block(fn)  # warm-up
        for _ in range(samples):  # interleaved
            for k, fn in fns.items():
                start = time.perf_counter()
                for _ in range(number):
                    block(fn)
                best_s[k] = min(best_s[k], (time.perf_counter() - start) / number)
    rates = {k: flop / t / 1e9 for k, t in best_s.items()}
    best = max(rates, key=rates.__getitem__)
    return rates[best], best


def matrix_products(fn: Callable[[], object]) -> Counter:
    """The fp32 matrix products one call of ``fn`` runs, ``{(rows, in, out): count}``, read
    from a profile of the call (torch's ``aten::addmm``/``aten::mm`` and oneDNN's
    ``mkldnn::_linear_pointwise``, with or without post-ops; the products inside the
    attention kernel are not among them)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    out: Counter = Counter()
    for event in prof.events():
        shapes = event.input_shapes
        if event.name == "mkldnn::_linear_pointwise":  # (X, W, ...) or (X, other, W, ...)
            x, w = shapes[0], shapes[1] if len(shapes) == 6 else shapes[2]
            out[(_rows(x), w[1], w[0])] += 1
        elif event.name in ("aten::addmm", "aten::mm"):  # ([bias,] X [rows, in], W^T [in, out]...)
            x, wt = shapes[1:3] if event.name == "aten::addmm" else shapes[:2]
            if len(x) == 2 and len(wt) == 2:
                out[(x[0], wt[0], wt[1])] += 1
    return out


def _rows(shape: Sequence[int]) -> int:
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows


def alone_seconds(products: Counter, samples: int = 3) -> tuple[float, float]:
    """``(seconds, FLOPs)``: each product of ``products`` (see :func:`matrix_products`) timed
    alone, the fastest of ``samples`` runs of the faster of torch's and oneDNN's linear
    (without post-ops), times its count: what the sweep's matrix products need at their
    own shapes with nothing else running."""
    g = torch.Generator().manual_seed(0)
    fns = [lambda x, w: torch.nn.functional.linear(x, w)]
    if (onednn := onednn_linear()) is not None:
        fns.append(lambda x, w: onednn(x, w, None, "none", [], ""))
    seconds = flop = 0.0
    with torch.no_grad():
        for (rows, n_in, n_out), count in products.items():
            x, w = torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
            best = float("inf")
            for fn in fns:
                fn(x, w)  # warm-up
                for _ in range(samples):
                    start = time.perf_counter()
                    fn(x, w)
                    best = min(best, time.perf_counter() - start)
            seconds += count * best
            flop += count * 2.0 * rows * n_in * n_out
    return seconds, flop


class Limit:
    """A sweep's compute limit: the exact FLOPs of its jobs (:func:`exact_flops`)
    over the best matrix-product rate measured around its timings (:func:`gemm_rate`,
    before and after, so that a burst of load on a shared machine does not lower it)."""

    def __init__(self, model, clean, corrupted, jobs: list, read: list[int]):
        """``jobs``: the sweep's ``(address, position)`` pairs; ``read``: each row's read
        position."""
        self.shape = Shape.of(model.model.config)
        counted = first_changes(model, clean, corrupted, jobs)
        self.jobs, self.changing = len(jobs), sum(j.first is not None for j in counted)
        self.flop = exact_flops(self.shape, counted, read)
        self.rates: list[tuple[float, str]] = []

    def measure(self) -> None:
        self.rates.append(gemm_rate(self.shape))

    @property
    def seconds(self) -> float:
        return self.flop / (max(self.rates)[0] * 1e9)

    def __str__(self) -> str:
        rate, which = max(self.rates)
        return (
            f"{self.jobs} jobs ({self.changing} change the run), exact computation "
            f"{self.flop / 1e9:.4g} GFLOP; fp32 matrix products {rate:.0f} GFLOP/s ({which}, "
            f"best of {len(self.rates)} measurements): limit {self.seconds:.2f} s"
        )
