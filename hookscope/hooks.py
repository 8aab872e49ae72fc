"""Hook registration with guaranteed removal.

A call plans, per :class:`~hookscope.addresses.Slot`, which user hooks run there, whether
the value is cached, stashed (for a derived site) or needs its gradient (the plans come from
:class:`hookscope.planning.HookPlanner`). Slots are grouped
by the module event they live on (one module's output, or its input), and each group gets
exactly one torch hook, so a full cache of a 6-layer model costs a few dozen Python calls.
:class:`installed` registers those hooks through a :class:`~hookscope.scope.Scope` and
removes exactly them (and nothing of the user's) when its block ends, however it ends: a
hook that raises, a forward that raises, a KeyboardInterrupt, also one arriving while the
hooks are being registered or removed. The hooks act only in the thread that installed them.

At an event the module tensor ``T`` is viewed as each slot's tensor; a user hook receives
that view (or the view of one head/neuron) and may return a replacement. The first
replacement clones ``T`` so values cached earlier keep what the forward actually saw, then
writes through the view, so only the addressed head or neuron changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from hookscope.adapters.base import Tap, output_tensor, submodule
from hookscope.addresses import SLOT_ORDER, Address, Slot
from hookscope.errors import HookError
from hookscope.scope import Scope, protected, stateless

__all__ = ["HookFn", "SlotPlan", "Run", "Wiring", "wire", "installed"]

HookFn = Callable[[Tensor, Address], "Tensor | None"]


@dataclass
class SlotPlan:
    """What happens at one slot during a forward pass."""

    slot: Slot
    tap: Tap
    axis: int = -1
    hooks: list[tuple[Address, int | None, HookFn]] = field(default_factory=list)
    record: bool = False
    stash: bool = False
    grad: bool = False
    w_o: Callable[[], tuple[Tensor, Tensor | None]] | None = None  # for 'result'
    n_heads: int = 0


@dataclass
class Run:
    """Per-call state: cached values, stashed values for derived sites, gradients."""

    acts: dict[Slot, Tensor] = field(default_factory=dict)
    stash: dict[Slot, Tensor] = field(default_factory=dict)
    detach: bool = True
    #: record only forwards run with gradients enabled (a training forward, not an eval pass)
    grad_only: bool = False
    #: (plan, tensor the forward used) pairs whose gradients :meth:`gradients` computes
    grad_targets: list[tuple[SlotPlan, Tensor]] = field(default_factory=list)

    def gradients(self, value: Tensor) -> dict[Slot, Tensor]:
        """d value / d slot for every slot planned with ``grad``; no parameter .grad is touched."""
        tensors: list[Tensor] = []
        where: dict[int, int] = {}
        for _, t in self.grad_targets:
            if id(t) not in where:
                where[id(t)] = len(tensors)
                tensors.append(t)
        found = torch.autograd.grad(value, tensors, allow_unused=True) if tensors else ()
        grads: dict[Slot, Tensor] = {}
        for plan, t in self.grad_targets:
            g = found[where[id(t)]]
            g = torch.zeros_like(t) if g is None else g
            view = (
                plan.tap.view if plan.tap.special == "" and plan.tap.view is not None else _identity
            )
            grads[plan.slot] = view(g).detach()
        return grads


class _Event:
    """The tensor at one module event; cloned on the first write."""

    __slots__ = ("tensor", "changed")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self.changed = False

    def writable(self) -> Tensor:
        if not self.changed:
            self.tensor = self.tensor.clone()
            self.changed = True
        return self.tensor


def _identity(t: Tensor) -> Tensor:
    return t


def _check_replacement(ret: object, act: Tensor, address: Address) -> Tensor:
    """``ret`` if it can replace ``act``, else HookError.

    It must be a tensor of ``act``'s shape holding real data. A floating replacement of
    another floating dtype is cast to the activation's dtype, and one on another device is
    copied to the activation's device (both as ``Tensor.copy_`` does); a complex, boolean
    or integer replacement of a floating activation is refused, since the copy would drop
    the imaginary part or reinterpret a mask or an index as values.
    """
    if not isinstance(ret, Tensor):
        raise HookError(
            f"hook on {address} returned {type(ret).__name__}; return a tensor of shape "
            f"{tuple(act.shape)} to replace the activation, or None to leave it"
        )
    if ret.shape != act.shape:
        raise HookError(
            f"hook on {address} returned shape {tuple(ret.shape)} but the activation has shape {tuple(act.shape)}"
        )
    if ret.is_meta and not act.is_meta:
        raise HookError(
            f"hook on {address} returned a meta tensor (a shape without data); return a tensor "
            f"with values on {act.device}, e.g. torch.zeros_like(act)"
        )
    if ret.is_complex() and not act.is_complex():
        raise HookError(
            f"hook on {address} returned a complex tensor ({ret.dtype}) for a {act.dtype} "
            "activation; copying it would drop the imaginary part: return a real tensor "
            "(e.g. ret.real or ret.abs())"
        )
    if act.is_floating_point() and not (ret.is_floating_point() or ret.is_complex()):
        raise HookError(
            f"hook on {address} returned a {ret.dtype} tensor for a {act.dtype} activation; "
            f"return floating values (a floating tensor is cast to {act.dtype}; a mask or an "
            "index tensor is not an activation)"
        )
    return ret


def _run_hooks(plan: SlotPlan, ev: _Event, view: Callable[[Tensor], Tensor]) -> None:
    for address, pos, fn in plan.hooks:
        whole = view(ev.tensor)
        act = whole if pos is None else whole.select(plan.axis, pos)
        ret = fn(act, address)
        if ret is None or ret is act:
            continue
        ret = _check_replacement(ret, act, address)
        whole = view(ev.writable())
        target = whole if pos is None else whole.select(plan.axis, pos)
        target.copy_(ret)


def _record(plan: SlotPlan, ev: _Event, run: Run, view: Callable[[Tensor], Tensor]) -> None:
    if not (plan.record or plan.stash):
        return
    value = view(ev.tensor)
    if plan.stash:
        run.stash[plan.slot] = value
    if plan.record:
        if plan.tap.clone_on_record:
            value = value.clone()
        run.acts[plan.slot] = value.detach() if (run.detach and value.requires_grad) else value


def _process_plain(plan: SlotPlan, ev: _Event, run: Run, args: tuple) -> None:
    view = plan.tap.view or _identity
    _run_hooks(plan, ev, view)
    _record(plan, ev, run, view)


def _process_resid_mid(plan: SlotPlan, ev: _Event, run: Run, args: tuple) -> None:
    """resid_mid = attn_out + resid_pre (the block's own addition, hence exact)."""
    assert plan.tap.stash is not None
    resid_pre = run.stash[plan.tap.stash]
    mid = _Event(ev.tensor + resid_pre)
    original = mid.tensor
    _run_hooks(plan, mid, _identity)
    _record(plan, mid, run, _identity)
    if mid.changed and not torch.equal(mid.tensor, original):
        ev.tensor = mid.tensor - resid_pre
        ev.changed = True


def _process_result(plan: SlotPlan, ev: _Event, run: Run, args: tuple) -> None:
    """Per-head results z_h @ W_O[h] from the output projection's input."""
    assert plan.w_o is not None
    w, b = plan.w_o()
    z = args[0].unflatten(-1, (plan.n_heads, -1))
    res = _Event(torch.einsum("...hd,hdm->...hm", z, w))
    _run_hooks(plan, res, _identity)
    _record(plan, res, run, _identity)
    if res.changed or plan.grad:
        if plan.grad:
            _want_grad(res, [plan], run)
        out = res.tensor.sum(-2)
        ev.tensor = out + b if b is not None else out
        ev.changed = True


_PROCESS = {
    "": _process_plain,
    "pattern": _process_plain,
    "resid_mid": _process_resid_mid,
    "result": _process_result,
}


def _want_grad(ev: _Event, plans: list[SlotPlan], run: Run, overwritten: bool = False) -> None:
    """Make ``ev.tensor`` a gradient target of ``plans``; ``overwritten``: a later in-place op
    (``nn.ReLU(inplace=True)``) modifies the tensor this event passes on."""
    if not torch.is_grad_enabled():
        return
    target = ev.tensor
    if not target.requires_grad:  # frozen weights: make this tensor the graph's leaf
        target = target.detach().requires_grad_(True)
        ev.tensor = target
        ev.changed = True
    if overwritten:
        # The in-place op would make the target its own overwritten value (d/d post-ReLU) and,
        # for a leaf, raise. The target keeps the value at this slot; the forward goes on with
        # a copy (bitwise equal; its backward is the identity) that the op may modify.
        ev.tensor = target.clone()
        ev.changed = True
    run.grad_targets += [(plan, target) for plan in plans]


def _process_group(plans: list[SlotPlan], ev: _Event, run: Run, args: tuple) -> None:
    for plan in plans:
        _PROCESS[plan.tap.special](plan, ev, run, args)
    grads = [p for p in plans if p.grad and p.tap.special != "result"]
    if grads:
        _want_grad(ev, grads, run, any(p.tap.clone_on_record for p in plans))


def _replace_output(output: object, new: Tensor) -> object:
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    for key, value in output.items():  # type: ignore[attr-defined]  # ModelOutput
        if isinstance(value, Tensor):
            output[key] = new  # type: ignore[index]
            return output
    raise HookError(f"cannot replace the tensor inside a {type(output).__name__}")


def _forward_hook(plans: list[SlotPlan], run: Run, module: nn.Module, args: tuple, output: object):
    if run.grad_only and not torch.is_grad_enabled():
        return None
    ev = _Event(output_tensor(output))
    _process_group(plans, ev, run, args)
    return _replace_output(output, ev.tensor) if ev.changed else None


def _input_event(plans: list[SlotPlan], module: nn.Module, args: tuple, kwargs: dict) -> _Event:
    tap = plans[0].tap
    if len(args) > tap.arg:
        return _Event(args[tap.arg])
    if tap.kwarg is not None and tap.kwarg in kwargs:
        return _Event(kwargs[tap.kwarg])
    raise HookError(
        f"{type(module).__name__} was called without its input {tap.kwarg or tap.arg!r}; "
        f"cannot read {', '.join(str(p.slot.kind) for p in plans)}"
    )


def _pre_hook(plans: list[SlotPlan], run: Run, module: nn.Module, args: tuple, kwargs: dict):
    if run.grad_only and not torch.is_grad_enabled():
        return None
    tap = plans[0].tap
    ev = _input_event(plans, module, args, kwargs)
    _process_group(plans, ev, run, args)
    if not ev.changed:
        return None
    if len(args) > tap.arg:
        return (*args[: tap.arg], ev.tensor, *args[tap.arg + 1 :]), kwargs
    return args, {**kwargs, tap.kwarg: ev.tensor}


def _records_only(event: str, plans: list[SlotPlan]) -> bool:
    """A group that only records plain module tensors (what a training-loop tracker wants)."""
    return event in ("output", "input") and all(
        p.record and not (p.hooks or p.stash or p.grad) and p.tap.special == "" for p in plans
    )


def _wrappable(module: nn.Module) -> bool:
    """No parameters or buffers (see :meth:`Scope.wrap_forward`: activations, dropout...) and
    no forward hooks of its own, whose changes a wrapped forward would not see."""
    return stateless(module) and not module._forward_hooks and not module._forward_pre_hooks


def _recorder(plans: list[SlotPlan], run: Run, module: nn.Module, event: str) -> Callable:
    """A wrapped forward (:meth:`Scope.wrap_forward`) recording ``plans`` at ``event``: the
    same values as the torch hooks, without torch's hook dispatch on every call."""
    # what _record does for these plans, unrolled (this runs on every training step)
    specs = [(plan.slot, plan.tap.view, plan.tap.clone_on_record) for plan in plans]
    grad_enabled = torch.is_grad_enabled

    def keep(t: Tensor) -> None:
        acts = run.acts
        for slot, view, clone in specs:
            value = t if view is None else view(t)
            if clone:
                value = value.clone()
            acts[slot] = value.detach() if (run.detach and value.requires_grad) else value

    def forward(below: Callable, *args: object, **kwargs: object) -> object:
        if event == "input" and (grad_enabled() or not run.grad_only):
            keep(_input_event(plans, module, args, kwargs).tensor)
        output = below(*args, **kwargs)
        if event == "output" and (grad_enabled() or not run.grad_only):
            keep(output if type(output) is Tensor else output_tensor(output))
        return output

    return forward


def _pattern_handler(plans: list[SlotPlan], run: Run, pattern: Tensor) -> Tensor:
    ev = _Event(pattern)
    _process_group(plans, ev, run, ())
    return ev.tensor


Wiring = list[tuple[str, str, list[SlotPlan]]]


def wire(plans: list[SlotPlan]) -> Wiring:
    """Group plans by module event (one torch hook each), in forward order within a module.

    A wiring holds no per-call state, so a caller may build it once and reuse it."""
    groups: dict[tuple[str, str, int], list[SlotPlan]] = {}
    for plan in sorted(plans, key=lambda p: (p.slot.layer, SLOT_ORDER.get(p.slot.kind, 0))):
        groups.setdefault((plan.tap.module, plan.tap.event, plan.tap.arg), []).append(plan)
    return [(path, event, group) for (path, event, _), group in groups.items()]


class installed:
    """``with installed(root, wiring, run):`` one torch hook per module event of ``wiring``
    (and, for pattern sites, hookscope's attention routing) for the block, acting in this
    thread only; exactly those are removed on exit, however the block ends (see
    :mod:`hookscope.scope`). The block gets ``value`` if given, else ``run``.

    ``wrap_recorders``: a module event that only records (no user hook, no gradient) on a
    module without parameters, buffers or torch hooks (an activation function: what the
    neuron sites of MLPs and CNNs read) is read by a wrapped ``forward`` instead of a torch
    hook, which keeps the module on torch's fast call path (the training-loop tracker's
    choice: its recording runs on every training step). Other events keep torch hooks."""

    def __init__(
        self,
        root: nn.Module,
        wiring: Wiring,
        run: Run,
        value: object = None,
        wrap_recorders: bool = False,
    ):
        self.root, self.wiring, self.run = root, wiring, run
        self.wrap_recorders = wrap_recorders
        self.value = run if value is None else value
        self.scope = Scope()

    def __enter__(self) -> object:
        if self.scope.is_open:
            raise HookError(
                "this hooks block is already active (a hooks object is entered once at a "
                "time); make another one with model.hooks(...) to nest"
            )
        return self._enter()

    @protected(rollback=lambda self: self.scope.close())
    def _enter(self) -> object:
        scope = self.scope
        scope.open()
        pattern: dict[nn.Module, Callable[[Tensor], Tensor]] = {}
        for path, event, group in self.wiring:
            module = submodule(self.root, path)
            if self.wrap_recorders and _records_only(event, group) and _wrappable(module):
                scope.wrap_forward(module, _recorder(group, self.run, module, event))
            elif event == "output":
                scope.forward_hook(module, partial(_forward_hook, group, self.run))
            elif event == "input":
                scope.pre_hook(module, partial(_pre_hook, group, self.run), with_kwargs=True)
            else:
                pattern[module] = partial(_pattern_handler, group, self.run)
        if pattern:
            from hookscope.adapters.hf_attention import route_patterns

            route_patterns(scope, self.root, pattern)
        return self.value

    @protected()
    def __exit__(self, *exc: object) -> bool:
        self.scope.close()
        return False

    def suspend(self) -> None:
        """Take the block's torch hooks and wrapped recorders off the modules until
        :meth:`resume` (hookscope's attention routing, where wired, stays); the block's end
        removes them either way."""
        self.scope.suspend_hooks()

    def resume(self) -> None:
        """Put the hooks that :meth:`suspend` took off back on."""
        self.scope.resume_hooks()
