"""Run many patched copies of one base batch in a single forward, doing no repeated work.

Patching sweeps run ``n`` copies of the base input, each with its own patch. Much of such a
forward is the same for every copy, or not needed by the metric, and :class:`StackedRunner`
skips it:

* **Blocks below the patched block.** A patch at block ``L`` leaves blocks ``< L`` equal
  to the unpatched base run. The baseline forward (clean and corrupted in one batch,
  :meth:`StackedRunner.baseline`) records every block's input and output on the base rows;
  a sweep forward replays the outputs for blocks below its first patch instead of
  computing them. Copies patching different blocks share one forward: each joins the
  batch at its own block, as copies of the base rows' recorded input there (every block's
  batch-shaped arguments, such as padding masks, are repeated to match).
* **A linear tail** (a group's ``delta``). When a patch reaches the residual stream through
  linear maps only (a head's ``z`` or ``result`` in a parallel-residual block, as in
  GPT-NeoX), block ``L``'s patched output is its recorded output plus a per-copy
  difference the caller computes, so the copy joins at block ``L + 1``.
* **The unembedding.** A structured metric needs a few logits (two for ``logit_diff``)
  at one position, not ``[batch, pos, vocab]``: the unembedding is replaced by the identity
  for the forward, and the metric reads only its own columns from the hidden states
  (:meth:`Metric.per_example_hidden`). Before relying on this, the baseline forward
  (:meth:`StackedRunner.baseline`) computes a few logit columns only and checks that the
  model returns exactly those; if not (a model that rescales or soft-caps its logits after
  the unembedding), it is run again with full logits and the sweep reads full logits.
* **Positions before the patch** (causal language models). Position ``t`` depends on
  tokens ``<= t`` only, so a copy whose patch first changes position ``s`` equals the base
  run before ``s``. The baseline keeps the base rows' attention keys and values, and a
  forward with ``prefix=s`` runs positions ``s..`` only, attending to the recorded keys
  and values of the others (the model's own key-value cache); the metric reads the base
  run's hidden states at positions ``< s``.
* **The last block at unread positions.** A metric that reads one position per row needs
  the last block's output there only. Attention still sees every position, but the last
  MLP (two thirds of a block) and attention output projection are computed on the read
  position alone, and their outputs are broadcast by the block's residual addition (other
  positions' outputs are then wrong and never read). Only where no patched or cached slot
  needs those modules at other positions.

* **Matrix products.** Every plain fp32 ``nn.Linear`` of the model runs through oneDNN's
  kernel (:func:`~._forward_edits.fast_linears`) in the baseline and sweep forwards: at
  pythia-70m's shapes it ran 1.15-1.7x faster than the MKL ``sgemm`` behind
  ``nn.functional.linear`` on the AMD EPYC measured (``benchmarks/bench_patching.py``
  prints the table), with results equal up to summation order.

Vision models without these modules, ``module:`` sites and the embedding fall back to plain
repetition of the input.

On a model accelerate dispatched (``from_pretrained(..., device_map=...)``) every shortcut
but the oneDNN products runs: replayed blocks and the identity unembedding need no weights,
the readout reads the (possibly offloaded) unembedding through
:func:`hookscope.dispatch.weight`, and the rest are torch hooks around accelerate's wrapped
forwards. The oneDNN products would replace those forwards, so they are off and
:attr:`StackedRunner.shortcuts_off` says so (results carry it as ``shortcuts_off``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from hookscope.adapters.base import submodule
from hookscope.adapters.transformer import TransformerAdapter
from hookscope.addresses import Slot, parse
from hookscope.errors import InputError
from hookscope.hf_compat import (
    cache_kv,
    kv_cache_candidates,
    kv_cache_filled,
    kv_cache_found,
    new_cache,
)
from hookscope.interventions._forward_edits import (
    Probe,
    at_read_position,
    batch_args,
    first_tensor,
    forward_replaced,
    identity,
    join_input,
    join_output,
    model_linears,
    positions,
    repeat,
    replay,
    rows_of,
)
from hookscope.interventions._inputs import is_causal_lm
from hookscope.interventions.metrics import Metric, Unembed
from hookscope.model import HookedModel
from hookscope.scope import Scope

__all__ = ["StackedRunner"]

# Slots read inside block ``slot.layer`` (all but the embedding, the final norm and the logits).
_OUTSIDE_BLOCKS = ("embed", "final_norm", "logits", "module")
# Head slots whose patch reaches the block output through the output projection only.
_LINEAR_TAIL = ("z", "result")
# Slots computed by (or after) a block's MLP: a patch there needs it at every position.
_MLP_AND_AFTER = ("neuron_pre", "neuron_post", "mlp_out", "resid_post")
# Slots computed before a block's attention output projection.
_BEFORE_OUT_PROJ = ("resid_pre", "q", "k", "v", "pattern")


class StackedRunner:
    """Runs ``n`` copies of ``base`` with per-copy hooks; returns each copy's metric."""

    def __init__(self, model: HookedModel, base: Tensor, metric: Metric | Callable):
        self.model, self.base, self.metric = model, base, metric
        self.batch = int(base.shape[0])
        adapter = model.adapter
        self.blocks: Sequence[nn.Module] | None = None
        self.unembed: Unembed | None = None
        self.records: list[Any] | None = None  # each block's output on the base batch
        self.inputs: list[Tensor] | None = None  # and its input (hidden states)
        self.last_mlp: nn.Module | None = None
        self.last_out_proj: nn.Module | None = None
        self.linear_tail = False
        self.causal = False
        # keywords to pass the key/value cache under (hf_compat.kv_cache_candidates)
        self.kv_keywords: tuple[str, ...] = ()
        self.prefix_kv: list[tuple[Tensor, Tensor]] | None = None  # base rows' keys, values
        self.base_hidden: Tensor | None = None  # base rows' unembedding input
        # linear layers computed by oneDNN in this runner's forwards (see fast_linears), and
        # the shortcuts that cannot run on this model, with why (a dispatched model: oneDNN)
        self.linears, self.shortcuts_off = model_linears(model.model)
        if isinstance(adapter, TransformerAdapter):
            self.blocks = list(submodule(model.model, adapter.layers_path))  # type: ignore[arg-type]
            head = submodule(model.model, adapter.unembed_path) if adapter.unembed_path else None
            if isinstance(metric, Metric) and isinstance(head, nn.Linear):
                self.unembed = Unembed(head)
            self.last_mlp = submodule(
                model.model, adapter.layer_path(len(self.blocks) - 1, adapter.spec.mlp)
            )
            self.last_out_proj = adapter.out_proj(len(self.blocks) - 1)
            self.linear_tail = (
                not adapter.spec.sequential_residual(model.model)
                and adapter.spec.attn_out_module is None
            )
            # the keyword under which the model takes a key/value cache (None: it takes none)
            if is_causal_lm(model):
                self.kv_keywords = kv_cache_candidates(model.model)
            self.causal = bool(self.kv_keywords)
        # the position each base row's metric reads (absolute), if one per row
        position = getattr(metric, "single_position", None)
        self.read_position: Tensor | None = None
        if self.blocks is not None and base.ndim == 2:
            n_pos = base.shape[1]
            if isinstance(position, int) and -n_pos <= position < n_pos:
                self.read_position = torch.full((self.batch,), position % n_pos)
            elif isinstance(position, Tensor) and position.shape == (self.batch,):
                if bool(((position >= -n_pos) & (position < n_pos)).all()):
                    self.read_position = position % n_pos
        if self.read_position is not None:
            self.read_position = self.read_position.to(base.device)

    def start(self, slot: Slot) -> int | None:
        """The block whose input first differs between copies when ``slot`` is patched."""
        if self.blocks is None or slot.kind in _OUTSIDE_BLOCKS:
            return None
        return slot.layer

    def tail_layer(self, slots: Sequence[Slot]) -> int | None:
        """The layer whose output a patch of ``slots`` changes linearly (a group ``delta``
        of :meth:`run`), or None when the patch must be run through its block."""
        layers = {s.layer for s in slots}
        if (
            not self.linear_tail
            or self.records is None
            or len(layers) != 1
            or any(s.kind not in _LINEAR_TAIL for s in slots)
        ):
            return None
        return layers.pop()

    def baseline(self, inputs: Tensor, rows: slice, names: list[str], uses_logits: bool):
        """One forward of ``inputs`` (clean and corrupted) caching ``names``. Records each
        block's output on the base ``rows`` (and, on causal models, their keys and values);
        checks that nothing follows the unembedding (else the readout is turned off).
        Returns ``(output, cache)``: the output is the unembedding's input when
        :meth:`readout` is on, full logits otherwise."""
        records: list[Any] = [None] * len(self.blocks or [])
        block_inputs: list[Any] = [None] * len(self.blocks or [])

        def record_input(i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            block_inputs[i] = rows_of(args[0] if args else kwargs["hidden_states"], rows)

        probe = Probe(self.unembed.module) if self.readout(uses_logits) else None
        seen: dict[str, Tensor] = {}  # with full logits: the unembedding's input and output
        kwargs: dict[str, Any] = {}

        def forward() -> tuple[Any, Any]:
            # a fresh key/value cache each time (it keeps the base rows' keys and values),
            # under the first keyword this model's forward fills (hf_compat)
            tried = self.kv_keywords
            for keyword in tried or (None,):
                kwargs.clear()
                if keyword is not None:
                    kwargs.update({keyword: new_cache(), "use_cache": True})
                with torch.no_grad():
                    result = self.model.run_with_cache(inputs, names=names, **kwargs)
                n_blocks, n_pos = len(self.blocks or []), inputs.shape[-1]
                if keyword is None or kv_cache_filled(kwargs[keyword], n_blocks, n_pos):
                    break
            else:
                keyword = None  # no keyword filled a cache: no prefix skipping
            if tried:
                kv_cache_found(self.model.model, keyword)
            self.kv_keywords = () if keyword is None else (keyword,)
            self.causal = keyword is not None
            return result

        with Scope() as scope:
            for i, block in enumerate(self.blocks or []):
                scope.forward_hook(
                    block, lambda module, args, out, i=i: records.__setitem__(i, rows_of(out, rows))
                )
                scope.pre_hook(block, partial(record_input, i), with_kwargs=True)
            if self.unembed is not None and probe is None:
                scope.forward_hook(
                    self.unembed.module,
                    lambda module, args, out: seen.update(hidden=args[0], logits=out),
                )
            if probe is not None:
                for module, fn in self._read_position_only([parse(name).slot for name in names]):
                    scope.pre_hook(module, fn, with_kwargs=True, prepend=True)
            with forward_replaced({**self.linears, **({probe.module: probe} if probe else {})}):
                out, cache = forward()
            if probe is not None and not probe.matches(out):
                self.unembed = None  # the logits are post-processed: read full logits
                with forward_replaced(self.linears):
                    out, cache = forward()
        if self.blocks is not None and all(r is not None for r in records + block_inputs):
            self.records, self.inputs = records, block_inputs
        if self.unembed is not None and probe is not None:
            out = probe.hidden
            self.base_hidden = out[rows]  # type: ignore[index]
        elif self.unembed is not None:  # full logits were needed: are they the unembedding's?
            logits = seen.get("logits")
            if (
                isinstance(logits, Tensor)
                and isinstance(out, Tensor)
                and out.shape == logits.shape
                and torch.equal(out.to(logits.device, logits.dtype), logits)
            ):
                self.base_hidden = seen["hidden"][rows]
            else:
                self.unembed = None
        kv = cache_kv(kwargs[self.kv_keywords[0]]) if self.causal else None
        if kv is not None and len(kv) == len(self.blocks or []):
            self.prefix_kv = [(keys[rows], values[rows]) for keys, values in kv]
        return out, cache

    def can_skip_prefix(self, uses_logits: bool = False) -> bool:
        """Whether forwards may start at a later position (:meth:`run`'s ``prefix``)."""
        return (
            self.prefix_kv is not None
            and self.records is not None
            and self.inputs is not None
            and self.base_hidden is not None
            and self.readout(uses_logits)
        )

    def readout(self, uses_logits: bool = False) -> bool:
        """Whether forwards read the metric from the unembedding's input."""
        return self.unembed is not None and not uses_logits

    def run(
        self,
        hooks: list,
        groups: Sequence[tuple[int | None, int, Tensor | None]],
        uses_logits: bool = False,
        slots: Sequence[Slot] = (),
        prefix: int = 0,
    ) -> list[float]:
        """Forward copies of the base batch with ``hooks``; one metric value per copy.

        ``groups``: ``(start, n, delta)`` each: ``n`` copies that first differ from the base
        at block ``start``'s input, where ``delta`` (``[n * batch, pos, d_model]`` or None)
        is added to them. ``start`` None means the model input itself: then every copy is a
        plain copy of the whole input, without ``delta``. All groups run in one forward: a group's copies join the batch at its start block, so every block
        is computed once for all copies that reach it, in ascending ``start`` order (copy
        ``i`` of the forward occupies rows ``i * batch .. (i + 1) * batch`` from its start
        on, which is how ``hooks`` address it). Groups must come sorted by start.
        ``uses_logits``: a hook reads or writes the logits, so the forward must not stop early.
        ``slots``: the patched slots (a patch in the last block at or after its attention
        output projection keeps the modules it needs at every position).
        ``prefix``: the first position any copy differs at (needs :meth:`can_skip_prefix`):
        the forward runs positions ``prefix..`` only, and hooks see those positions only.
        """
        n = sum(g[1] for g in groups)
        starts = [g[0] for g in groups]
        if self.records is None or self.inputs is None or None in starts:
            if prefix or any(g[2] is not None for g in groups):
                raise ValueError("without block records a forward takes plain copies only")
            return self._plain(hooks, n, uses_logits)
        if starts != sorted(starts):  # type: ignore[type-var]
            raise ValueError("groups must be sorted by start block")
        n_blocks = len(self.records)
        cut = slice(prefix, None)
        first = int(starts[0])  # type: ignore[arg-type]
        replace: dict[nn.Module, Callable] = dict(self.linears)
        pre_hooks: list[tuple[nn.Module, Callable]] = []
        out_hooks: list[tuple[nn.Module, Callable]] = []
        for i in range(first):  # below every copy: the base run, recorded
            replace[self.blocks[i]] = partial(replay, positions(self.records[i], cut))  # type: ignore[index]
        joins: dict[int, list[Tensor]] = {}
        for start, k, delta in groups:
            base_in = self.inputs[start] if start < n_blocks else first_tensor(self.records[-1])  # type: ignore[index]
            rows = repeat(base_in[:, cut], k)
            if delta is not None:  # (on the block's device: a dispatched model has several)
                rows = rows + delta[:, cut].to(rows.device)
            joins.setdefault(start, []).append(rows)
        for start, parts in joins.items():
            if start == 0:
                pre_hooks.append((self.blocks[0], partial(join_input, parts)))  # type: ignore[index]
            else:
                out_hooks.append(
                    (self.blocks[start - 1], partial(join_output, parts, start == first))  # type: ignore[index]
                )
        if self.batch > 1:
            pre_hooks += [(block, partial(batch_args, self.batch)) for block in self.blocks[first:]]  # type: ignore[index]
        kwargs: dict[str, Any] = {}
        if prefix:
            rows_at = [self.batch * sum(k for s, k, _ in groups if s <= i) for i in range(n_blocks)]  # type: ignore[operator]
            kwargs = {self.kv_keywords[0]: self._prefix_cache(rows_at, prefix), "use_cache": True}
        readout = self.readout(uses_logits)
        if readout:
            replace[self.unembed.module] = identity  # type: ignore[union-attr]
            if first < n_blocks:
                pre_hooks += self._read_position_only(slots, prefix)
        with Scope() as scope:
            for module, fn in reversed(pre_hooks):  # prepended: the first listed runs first
                scope.pre_hook(module, fn, with_kwargs=True, prepend=True)
            for module, fn in out_hooks:
                scope.forward_hook(module, fn, prepend=True)
            with forward_replaced(replace), torch.no_grad():
                out = self.model.run_with_hooks(self.base[:, cut], hooks=hooks, **kwargs)
        if prefix:  # positions before the prefix are the base run's
            before = repeat(self.base_hidden[:, :prefix], n).to(out.device)  # type: ignore[index]
            out = torch.cat([before, out], dim=1)
        return self.values(out, n, hidden=readout)

    def _read_position_only(self, slots: Sequence[Slot], prefix: int = 0) -> list:
        """Pre-hooks computing the last block's MLP (and attention output projection) at
        the metric's read position only, as far as no patch in ``slots`` needs them
        elsewhere; positions are counted from ``prefix``."""
        if self.read_position is None or int(self.read_position.min()) < prefix:
            return []
        last = len(self.blocks or []) - 1
        in_last = [s.kind for s in slots if s.layer == last and s.kind not in _OUTSIDE_BLOCKS]
        at = partial(at_read_position, self.read_position - prefix)
        hooks = []
        if self.last_out_proj is not None and all(k in _BEFORE_OUT_PROJ for k in in_last):
            hooks.append((self.last_out_proj, at))
        if self.last_mlp is not None and not any(k in _MLP_AND_AFTER for k in in_last):
            hooks.append((self.last_mlp, at))
        return hooks

    def _plain(self, hooks: list, n: int, uses_logits: bool) -> list[float]:
        """``n`` copies of the whole input, patched by ``hooks`` (no shortcut but the readout)."""
        readout = self.readout(uses_logits)
        replace = dict(self.linears)
        if readout:
            replace[self.unembed.module] = identity  # type: ignore[union-attr]
        with forward_replaced(replace), torch.no_grad():
            out = self.model.run_with_hooks(repeat(self.base, n), hooks=hooks)
        return self.values(out, n, hidden=readout)

    def _prefix_cache(self, rows_at: list[int], prefix: int) -> Any:
        """A key-value cache holding the base rows' first ``prefix`` positions, repeated to
        ``rows_at[i]`` rows at layer ``i``."""
        cache = new_cache()
        for i, (keys, values) in enumerate(self.prefix_kv):  # type: ignore[arg-type]
            k = max(1, rows_at[i] // self.batch)
            cache.update(repeat(keys[:, :, :prefix], k), repeat(values[:, :, :prefix], k), i)
        return cache

    @torch.no_grad()
    def values(self, out: Tensor, n: int, hidden: bool) -> list[float]:
        """The metric of each of the ``n`` row blocks of ``out`` (``hidden``: the
        unembedding's input, read through :meth:`Metric.per_example_hidden`)."""
        b = out.shape[0] // n
        if hidden and n > 1 and (stacked := self.metric.repeated(n, b)) is not None:  # type: ignore[union-attr]
            per_row = stacked.per_example_hidden(out, self.unembed)  # type: ignore[arg-type]
            return per_row.view(n, b).mean(1).tolist()
        values = []
        for i in range(n):
            rows = out[i * b : (i + 1) * b]
            if hidden:
                value = self.metric.per_example_hidden(rows, self.unembed).mean()  # type: ignore[union-attr]
            else:
                value = self.metric(rows)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise InputError(
                    f"metric must return a scalar tensor, got "
                    f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
                )
            values.append(float(value))
        return values
