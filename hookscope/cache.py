"""ActivationCache: the tensors one forward pass produced, looked up by address.

The cache stores one tensor per layer-level slot (``resid_post.3``, ``head.3.q``,
``neuron.2``); a per-head or per-neuron entry is a view of it, made on lookup, never a copy.
q, k and v of a fused QKV projection are views of the one projection output, so
:attr:`ActivationCache.nbytes` counts each storage once. The cache keeps no reference to
the model alive: tensors are detached, the layout it needs is copied in as plain numbers, and
the model itself (whose weights the residual-stream methods read: ``decompose_resid``,
``logit_attrs``, ... see :mod:`hookscope.residual`) is held by a weak reference.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookscope import residual
from hookscope._checks import as_device, as_dtype
from hookscope.addresses import (
    SLOT_KINDS,
    Address,
    Selection,
    Slot,
    parse,
    slot_address,
    unit_position,
)
from hookscope.errors import AddressError, CacheKeyError, InputError, format_choices, suggestion

__all__ = ["ActivationCache", "Layout"]

_STACK_ALIASES = {k.alias: k.name for k in SLOT_KINDS.values() if k.alias is not None}


@dataclass(frozen=True)
class Layout:
    """Plain-number description of the cached slots: unit axis, unit count, k/v grouping."""

    n_layers: int
    axes: dict[Slot, int]
    units: dict[Slot, int]
    kv_group: int = 1

    def n_heads(self, layer: int, site: str) -> int:
        return self.units.get(Slot(site, layer), 0)

    def n_neurons(self, layer: int, site: str) -> int:
        return self.units.get(Slot(f"neuron_{site}", layer), 0)

    def position(self, slot: Slot, index: int) -> int:
        return unit_position(slot.kind, index, self.kv_group)


class ActivationCache(Mapping):
    """Mapping from addresses (objects or strings) to cached activations.

    >>> logits, cache = model.run_with_cache(tokens, names=["resid_post.*", "head.*.*"])
    >>> cache["resid_post.3"].shape          # [batch, pos, d_model]
    >>> cache[hs.AttentionHead(3, 5)]         # [batch, pos, d_head], a view
    >>> cache.stack("resid_post").shape      # [n_layers, batch, pos, d_model]
    """

    def __init__(
        self,
        acts: dict[Slot, Tensor],
        layout: Layout,
        requested: list[Address | Selection] | None = None,
        grads: ActivationCache | None = None,
        backward_value: Tensor | None = None,
        model: Any = None,
    ):
        self._acts = acts  # filled by the hooks, so already in forward order
        self._layout = layout
        self._requested = requested
        self._keys: list[Address] | None = None
        self.grads = grads
        self.backward_value = backward_value
        self._model: weakref.ref | None = weakref.ref(model) if model is not None else None

    def bind(self, model: Any) -> ActivationCache:
        """Read weights (final norm, ``W_U``, ``W_O``) from ``model`` in the residual-stream
        methods; ``run_with_cache`` binds its own model (weakly). Returns the cache."""
        self._model = weakref.ref(model)
        return self

    # ------------------------------------------------------------------ mapping
    def _address(self, key: object) -> Address:
        try:
            item = parse(key)  # type: ignore[arg-type]
        except AddressError as err:
            raise CacheKeyError(str(err)) from None
        if isinstance(item, Selection):
            raise CacheKeyError(
                f"{key!r} is a selection, not one address; use cache.select({str(item)!r}) "
                "for a dict, or cache.stack(kind) for a stacked tensor"
            )
        return item

    def __getitem__(self, key: object) -> Tensor:
        address = self._address(key)
        slot = address.slot
        tensor = self._acts.get(slot)
        if tensor is None:
            cached = [str(slot_address(s)) for s in self._acts]
            if slot.kind == "result":
                raise CacheKeyError(
                    f"{address} was not cached: per-head results (z_h @ W_O[h], [batch, pos, "
                    f"n_heads, d_model]) are opt-in, because they are n_heads times larger than "
                    f"attn_out; ask for them with run_with_cache(names=['head.{slot.layer}.result'"
                    "]) (or 'head.*.result'), or let cache.stack_head_results() compute them "
                    "from the cached z"
                )
            raise CacheKeyError(
                f"{address} was not cached; cached: {format_choices(cached)}."
                + suggestion(str(address), cached)
                + " Pass it in run_with_cache(names=...)."
            )
        if address.index is None:
            return tensor
        n = self._layout.units.get(slot, 0)
        if address.index >= n:
            raise CacheKeyError(
                f"{address}: index {address.index} out of range, layer has {n} (0-{n - 1})"
            )
        return tensor.select(self._layout.axes[slot], self._layout.position(slot, address.index))

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except CacheKeyError:
            return False
        return True

    def keys(self):  # type: ignore[override]
        return list(self)

    def __iter__(self) -> Iterator[Address]:
        if self._keys is None:
            if self._requested is None:
                self._keys = [slot_address(s) for s in self._acts]
            else:
                found: list[Address] = []
                for item in self._requested:
                    found += item.expand(self._layout) if isinstance(item, Selection) else [item]
                self._keys = sorted(dict.fromkeys(found))
        return iter(self._keys)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    # ------------------------------------------------------------------ helpers
    @property
    def slots(self) -> list[Slot]:
        """The layer-level tensors held (each stored once)."""
        return list(self._acts)

    def select(self, selection: str | Selection) -> dict[Address, Tensor]:
        """All cached addresses matching a selection, e.g. ``cache.select("head.3.*")``."""
        item = parse(selection)
        found = item.expand(self._layout) if isinstance(item, Selection) else [item]
        return {a: self[a] for a in found}

    def stack(self, kind: str, layers: list[int] | range | None = None) -> Tensor:
        """Stack one kind over layers: ``stack("resid_post")`` -> [n_layers, batch, pos, d_model].

        ``kind``: resid_pre, resid_mid, resid_post, attn_out, mlp_out, q, k, v, z (or head),
        result, pattern, neuron_post (or neuron), neuron_pre.
        """
        slot_kind = _STACK_ALIASES.get(kind, kind)
        have = sorted({s.kind for s in self._acts if s.layer >= 0})
        if slot_kind not in have:
            raise CacheKeyError(
                f"cannot stack {kind!r}: cached kinds are {format_choices(have)}."
                + suggestion(slot_kind, have)
            )
        by_layer = {s.layer: t for s, t in self._acts.items() if s.kind == slot_kind}
        wanted = sorted(by_layer) if layers is None else list(layers)
        missing = [layer for layer in wanted if layer not in by_layer]
        if missing:
            raise CacheKeyError(
                f"{kind} is not cached at layers {missing}; cached layers: {sorted(by_layer)}"
            )
        shapes = {tuple(by_layer[layer].shape) for layer in wanted}
        if len(shapes) > 1:
            raise InputError(f"cannot stack {kind}: shapes differ across layers ({sorted(shapes)})")
        return torch.stack([by_layer[layer] for layer in wanted])

    def grad(self, key: object) -> Tensor:
        """Gradient of the ``backward`` value with respect to this address's activation."""
        if self.grads is None:
            raise CacheKeyError(
                "no gradients: pass backward=metric to run_with_cache to cache them"
            )
        return self.grads[key]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ) -> ActivationCache:
        """A copy of the cache on ``device`` / in ``dtype`` (floating tensors only change dtype).

        ``device``: one this machine has (``"cpu"``, ``"cuda"``, ...); ``dtype``: a torch
        floating dtype or one of float32, float16, bfloat16, float64. Anything else raises
        InputError naming the choices.
        """
        device, dtype = as_device(device), as_dtype(dtype)

        def move(t: Tensor) -> Tensor:
            return t.to(
                device=device,
                dtype=dtype if (dtype is not None and t.is_floating_point()) else None,
            )

        grads = self.grads.to(device, dtype) if self.grads is not None else None
        out = ActivationCache(
            {s: move(t) for s, t in self._acts.items()}, self._layout, self._requested, grads
        )
        out.backward_value = self.backward_value
        out._model = self._model
        return out

    # ------------------------------------------------------------------ the residual stream
    def accumulated_resid(self, layer: int | None = None, **kw: Any):
        """The stream layer by layer, [component, batch, pos, d_model] (the logit lens with
        ``apply_ln=True``); see :func:`hookscope.residual.accumulated_resid`."""
        return residual.accumulated_resid(self, layer, **kw)

    def decompose_resid(self, layer: int | None = None, **kw: Any):
        """The stream as embed (+ pos_embed), attn_out.l, mlp_out.l, ... summing to it;
        see :func:`hookscope.residual.decompose_resid`."""
        return residual.decompose_resid(self, layer, **kw)

    def stack_head_results(self, layer: int | None = None, **kw: Any):
        """Every head's result ``z_h @ W_O[h]``, [n_layers * n_heads, batch, pos, d_model];
        see :func:`hookscope.residual.stack_head_results`."""
        return residual.stack_head_results(self, layer, **kw)

    def apply_ln_to_stack(self, stack: Tensor, *, pos: int | slice | None = None) -> Tensor:
        """The final norm, frozen at the cached stream's scale, applied to a stack; see
        :func:`hookscope.residual.apply_ln_to_stack`."""
        return residual.apply_ln_to_stack(self, stack, pos)

    def logit_attrs(self, stack: Tensor, tokens: Any, incorrect: Any = None, **kw: Any) -> Tensor:
        """Direct logit attribution of each component of ``stack`` (to ``tokens`` minus
        ``incorrect``); see :func:`hookscope.residual.logit_attrs`."""
        return residual.logit_attrs(self, stack, tokens, incorrect, **kw)

    @property
    def nbytes(self) -> int:
        """Bytes of distinct storage held (views of one tensor count once)."""
        seen: dict[int, int] = {}
        for t in self._acts.values():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def to_pandas(self):
        """One row per cached layer-level tensor: address, shape, dtype, device, bytes."""
        import pandas as pd

        rows = [
            {
                "address": str(slot_address(s)),
                "shape": tuple(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "device": str(t.device),
                "bytes": t.numel() * t.element_size(),
            }
            for s, t in self._acts.items()
        ]
        return pd.DataFrame(rows, columns=["address", "shape", "dtype", "device", "bytes"])

    def __repr__(self) -> str:
        lines = [f"ActivationCache: {len(self._acts)} tensors, {self.nbytes / 2**20:.2f} MiB"]
        for s, t in list(self._acts.items())[:24]:
            lines.append(
                f"  {str(slot_address(s)):<22} {str(list(t.shape)):<24} {str(t.dtype).replace('torch.', '')}"
            )
        if len(self._acts) > 24:
            lines.append(f"  ... ({len(self._acts) - 24} more)")
        if self.grads is not None:
            lines.append(
                f"  with gradients of the backward value ({len(self.grads.slots)} tensors)"
            )
        return "\n".join(lines)
