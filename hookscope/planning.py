"""Hook planning: which slots a call touches and what happens at each.

A :class:`HookPlanner` turns what a caller asks for (user hooks, addresses to cache, the
gradients wanted) into :class:`~hookscope.hooks.SlotPlan` objects, one per
:class:`~hookscope.addresses.Slot`, checked against the model's adapter before any forward;
:func:`hookscope.hooks.wire` groups them into torch hooks. It also resolves addresses and
selections against the model (it answers :class:`~hookscope.addresses.Dimensions`: layers,
heads, neurons) and lists the addresses a model exposes.

>>> planner = HookPlanner(adapter)
>>> planner.resolve("head.1.*")                         # [head.1.0, head.1.1, ...]
>>> plans = planner.plans([("resid_post.0", fn)], record=[Slot("resid_post", 1)])
>>> request = planner.cache_plan("resid_post.*", hooks=(), backward=False)
>>> request.wiring, request.layout                       # memoised per (names, backward)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from hookscope.adapters.base import Adapter
from hookscope.addresses import (
    KINDS,
    SLOT_KINDS,
    Address,
    AttentionHead,
    MLPNeuron,
    Selection,
    Slot,
    iter_addresses,
    parse,
    slot_address,
)
from hookscope.cache import Layout
from hookscope.errors import AddressError, AddressParseError, format_choices, suggestion
from hookscope.hooks import SlotPlan, Wiring, wire
from hookscope.model_inputs import HookSpec, check_hooks

__all__ = ["CachePlan", "HookPlanner", "HookSpec", "DEFAULT_EXCLUDED"]

#: slot kinds cached when run_with_cache gets names=None (per-head 'result' is opt-in)
DEFAULT_EXCLUDED = ("result", "module")
#: how many cache plans a planner keeps before it starts over
_MEMO_SIZE = 64


class CachePlan(NamedTuple):
    """A planned cached run: the slots recorded, the parsed request (None: everything), the
    torch hooks to install and the layout the cache reads its tensors with."""

    slots: list[Slot]
    requested: list[Address | Selection] | None
    wiring: Wiring
    layout: Layout


class HookPlanner:
    """Plans hooks and caches for one adapter (see the module docstring); holds the memo of
    cache plans, so keep one per model."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.n_layers = adapter.n_layers
        self._memo: dict[tuple, CachePlan] = {}

    # ------------------------------------------------------------------ dimensions
    def n_heads(self, layer: int, site: str) -> int:
        """Heads at ``site`` (q, k, v, z, result, pattern) of ``layer``; AddressError if the
        model has no such slot."""
        self.adapter.check_slot(Slot(site, layer))
        return self.adapter.n_heads(layer, site)

    def n_neurons(self, layer: int, site: str) -> int:
        """Neurons at ``site`` (post, pre) of ``layer``; AddressError if there is none."""
        self.adapter.check_slot(Slot(f"neuron_{site}", layer))
        return self.adapter.n_neurons(layer, site)

    # ------------------------------------------------------------------ addresses
    def resolve(self, spec: Any) -> list[Address]:
        """Expand addresses / strings / selections (or a list of them) and check each exists."""
        return list(iter_addresses(spec, self, allow=self.adapter.check))

    def all_slots(self) -> list[Slot]:
        """Every layer-level slot of the model, ``module`` paths aside."""
        slots = []
        for kind in self.adapter.slot_kinds():
            if kind == "module":
                continue
            if SLOT_KINDS[kind].in_block:
                slots += [Slot(kind, layer) for layer in range(self.n_layers)]
            else:
                slots.append(Slot(kind))
        return slots

    def addresses(self, kind: str | None = None, *, units: bool = False) -> list[Address]:
        """Addresses the model exposes, in forward order (see ``HookedModel.addresses``)."""
        if kind is not None and kind not in KINDS:
            raise AddressError(
                f"unknown kind {kind!r}; choose one of {format_choices(KINDS)}."
                + suggestion(kind, KINDS)
            )
        found: list[Address] = []
        for slot in self.all_slots():
            base = slot_address(slot)
            name = str(base).split(".")[0]
            if kind is not None and name != kind:
                continue
            found.append(base)
            if units and isinstance(base, AttentionHead):
                n = self.adapter.n_heads(slot.layer, slot.kind)
                found += [AttentionHead(slot.layer, h, base.site) for h in range(n)]
            elif units and isinstance(base, MLPNeuron):
                n = self.adapter.n_neurons(slot.layer, base.site)
                found += [MLPNeuron(slot.layer, i, base.site) for i in range(n)]
        return sorted(found)

    def slots_of(self, item: Address | Selection) -> list[Slot]:
        """The slots an address or selection reads, each checked to exist (unit indices of a
        selection range-checked too)."""
        if isinstance(item, Address):
            self.adapter.check(item)
            return [item.slot]
        out = []
        for layer in item.layers.values(self.n_layers, "layer"):
            if item.kind in ("head", "neuron"):
                kind = item.site if item.kind == "head" else f"neuron_{item.site}"
                slot = Slot(kind, layer)
                self.adapter.check_slot(slot)
                if item.units is not None and not item.units.is_all:
                    n = (
                        self.n_heads(layer, item.site)
                        if item.kind == "head"
                        else self.n_neurons(layer, item.site)
                    )
                    item.units.values(n, item.kind)  # range check
            else:
                slot = Slot(item.kind, layer)
                self.adapter.check_slot(slot)
            out.append(slot)
        return out

    def cache_request(self, names: Any) -> tuple[list[Slot], list[Address | Selection] | None]:
        """``(slots to record, parsed request)`` for ``run_with_cache``'s ``names``; ``None``
        asks for every slot but :data:`DEFAULT_EXCLUDED` (and gives request None)."""
        if names is None:
            return [s for s in self.all_slots() if s.kind not in DEFAULT_EXCLUDED], None
        if isinstance(names, (str, Address, Selection)):
            specs = [names]
        elif isinstance(names, Iterable):
            specs = list(names)
        else:
            raise AddressParseError(
                f"expected an address, a selection string or a list of them, got {type(names).__name__}"
            )
        requested: list[Address | Selection] = []
        slots: list[Slot] = []
        for spec in specs:
            item = parse(spec)
            requested.append(item)
            slots += self.slots_of(item)
        return list(dict.fromkeys(slots)), requested

    # ------------------------------------------------------------------ plans
    def plans(
        self, hooks: Sequence[HookSpec], record: Sequence[Slot] = (), grad: Sequence[Slot] = ()
    ) -> list[SlotPlan]:
        """One :class:`SlotPlan` per slot touched: ``hooks`` (checked, see
        :func:`~hookscope.model_inputs.check_hooks`) at their addresses, the ``record`` slots
        cached, the ``grad`` slots' gradients wanted, and the stash a derived site needs."""
        plans: dict[Slot, SlotPlan] = {}
        for entry in check_hooks(hooks):
            spec, fn = entry
            for address in iter_addresses(spec, self, allow=self.adapter.check):
                pos = (
                    None
                    if address.index is None
                    else self.adapter.unit_index(address.slot, address.index)
                )
                self._plan_for(plans, address.slot).hooks.append((address, pos, fn))
        for slot in record:
            self._plan_for(plans, slot).record = True
        for slot in grad:
            self._plan_for(plans, slot).grad = True
        for plan in list(plans.values()):
            if plan.tap.stash is not None:
                self._plan_for(plans, plan.tap.stash).stash = True
        return list(plans.values())

    def _plan_for(self, plans: dict[Slot, SlotPlan], slot: Slot) -> SlotPlan:
        plan = plans.get(slot)
        if plan is None:
            adapter = self.adapter
            tap = adapter.tap(slot)
            plan = SlotPlan(slot, tap)
            if SLOT_KINDS[slot.kind].unit is not None:
                plan.axis = adapter.unit_axis(slot)
            if tap.special == "result":
                plan.w_o = lambda layer=slot.layer: adapter.w_o(layer)  # type: ignore[attr-defined]
                plan.n_heads = int(adapter.dims.n_heads)  # type: ignore[arg-type]
            plans[slot] = plan
        return plan

    def layout(self, slots: Sequence[Slot]) -> Layout:
        """How the cache reads ``slots``: each head/neuron slot's unit axis and unit count."""
        axes, units = {}, {}
        for s in slots:
            unit = SLOT_KINDS[s.kind].unit
            if unit == "head":
                axes[s], units[s] = self.adapter.unit_axis(s), self.adapter.n_heads(s.layer, s.kind)
            elif unit == "neuron":
                axes[s], units[s] = (
                    self.adapter.unit_axis(s),
                    self.adapter.n_neurons(s.layer, s.kind[7:]),
                )
        return Layout(self.n_layers, axes, units, self.adapter.kv_group)

    def cache_plan(self, names: Any, hooks: Sequence[HookSpec], backward: bool) -> CachePlan:
        """Plan a cached run; without user hooks the plan is memoised per (names, backward)."""
        key = None
        if not hooks:
            try:
                key = (_names_key(names), backward)
            except TypeError:
                key = None
            if key is not None and key in self._memo:
                return self._memo[key]
        slots, requested = self.cache_request(names)
        plans = self.plans(hooks, record=slots, grad=slots if backward else ())
        prepared = CachePlan(slots, requested, wire(plans), self.layout(slots))
        if key is not None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = prepared
        return prepared


def _names_key(names: Any) -> tuple:
    """A hashable key for a ``names`` argument (raises TypeError for unhashable input)."""
    if names is None:
        return (None,)
    if isinstance(names, (str, Address, Selection)):
        return (str(names),)
    if isinstance(names, (list, tuple)):
        return tuple(str(n) if isinstance(n, (str, Address, Selection)) else hash(n) for n in names)
    raise TypeError("not memoisable")
