"""Temporary changes to a model, always undone: the one place hookscope changes a module.

A :class:`Scope` makes the changes one hookscope call needs (torch hooks, replaced
``forward`` methods, objects attached to a module, settings) and undoes exactly those when
it closes. The user's own hooks and settings are never touched. Three guarantees:

* **Recorded before effective.** Each change's undo is on the scope's log before the change
  can take effect, so an interrupt at any point of an install leaves nothing that
  :meth:`Scope.close` does not remove. Every undo is idempotent.
* **Removal completes.** While a scope is open in the main thread, hookscope's SIGINT /
  SIGTERM handler defers a signal that arrives inside a protected section (installing a
  group of changes, closing a scope) and delivers it when the section ends; elsewhere it
  raises at once, as usual. A close that is interrupted anyway (an exception raised inside
  it) runs the rest of its log in a second pass before the exception goes on.
* **Per thread.** Hooks and replaced forwards act only in the thread that installed them:
  another thread's forward through the same module runs as if the scope did not exist.
  Nested scopes may close in any order.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any

from torch import nn

__all__ = ["Scope", "protected", "open_scopes", "replacement", "stateless"]

_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s
)


class _SignalGuard:
    """hookscope's handler for SIGINT/SIGTERM while scopes are open in the main thread: a
    signal arriving inside a protected section waits for the section's end."""

    def __init__(self) -> None:
        self.holders: set[int] = set()  # ids of the main thread's open scopes
        self.previous: dict[int, Any] = {}  # signal -> the handler hookscope's replaced
        self.pending: list[int] = []

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if _in_section(frame):
            self.pending.append(signum)
            return
        _call_handler(self.previous.get(signum, signal.SIG_DFL), signum, frame)

    def enter(self, holder: int) -> None:
        """Install the handler for the first holder (idempotent per holder)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if not self.holders:
            for sig in _SIGNALS:
                previous = signal.getsignal(sig)
                if previous is None or previous == signal.SIG_IGN or previous == self.handler:
                    continue  # not installed from Python, ignored, or already ours
                self.previous[sig] = previous
                signal.signal(sig, self.handler)
        self.holders.add(holder)

    def leave(self, holder: int) -> None:
        """Restore the previous handlers once no holder is left (idempotent)."""
        self.holders.discard(holder)
        if self.holders or threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in list(self.previous.items()):
            if signal.getsignal(sig) == self.handler:  # else the user set their own since
                signal.signal(sig, previous)
            del self.previous[sig]

    def deliver(self, frame: FrameType | None) -> None:
        """Hand the deferred signals to their handlers now (as if they arrived in ``frame``),
        in order; if one raises, the later ones are posted again and the exception goes on."""
        pending = list(dict.fromkeys(self.pending))
        self.pending.clear()
        for i, signum in enumerate(pending):
            handler = self.previous[signum] if signum in self.previous else signal.getsignal(signum)
            try:
                _call_handler(handler, signum, frame)
            except BaseException:
                for later in pending[i + 1 :]:
                    signal.raise_signal(later)
                raise


def _call_handler(handler: Any, signum: int, frame: FrameType | None) -> None:
    """What Python does when ``signum`` arrives with ``handler`` installed."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        if signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)  # the default action (terminate)
        signal.raise_signal(signum)


def _in_section(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code is _SECTION_CODE:
            return True
        frame = frame.f_back
    return False


def protected(rollback: Callable[[Any], None] | None = None) -> Callable[[Callable], Any]:
    """Make a method a protected section: a SIGINT/SIGTERM arriving while it (or anything
    it calls) runs is handed to its handler when the outermost section returns. With
    ``rollback`` (an enter-path), ``rollback(self)`` runs first when the method raised or a
    signal is pending, so that nothing it installed outlives the exception."""

    def decorate(fn: Callable) -> Any:
        return _Protected(fn, rollback)

    return decorate


class _Protected:
    """A method run inside :func:`_section` (every protected method shares its code object,
    which is how the signal handler recognises a protected frame)."""

    def __init__(self, fn: Callable, rollback: Callable | None):
        self.fn, self.rollback = fn, rollback
        functools.update_wrapper(self, fn)

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return partial(_section, self.fn, self.rollback, obj)


def _section(fn: Callable, rollback: Callable | None, *args: Any, **kwargs: Any) -> Any:
    outermost = not _in_section(sys._getframe(1))
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        if rollback is not None:
            rollback(args[0])
        raise
    finally:
        if outermost and _GUARD.pending:
            if rollback is not None:
                rollback(args[0])
            _GUARD.deliver(sys._getframe(0))
    return result


_SECTION_CODE = _section.__code__
_GUARD = _SignalGuard()
_OPEN: set[int] = set()  # ids of the scopes open now, in all threads


def _drain(undo: list[Callable[[], None]]) -> None:
    """Run a scope's undo log, newest first (each entry is idempotent)."""
    while undo:
        undo[-1]()
        undo.pop()


def open_scopes() -> int:
    """How many scopes are open now, in all threads (for tests: none may stay open)."""
    return len(_OPEN)


def _release(scope_id: int) -> None:
    """A scope's last undo: it no longer counts as open or holds the signal guard."""
    _OPEN.discard(scope_id)
    _GUARD.leave(scope_id)


class _ThreadHook:
    """A torch hook that acts only in its owner thread."""

    __slots__ = ("owner", "fn")

    def __init__(self, owner: int, fn: Callable):
        self.owner, self.fn = owner, fn

    def __call__(self, *args: Any) -> Any:
        if threading.get_ident() != self.owner:
            return None
        return self.fn(*args)


class _Forward:
    """A replaced ``forward``: ``fn`` in the owner thread while active, else what was there."""

    __slots__ = ("owner", "fn", "module", "original", "active")

    def __init__(self, owner: int, fn: Callable, module: nn.Module):
        self.owner, self.fn, self.module = owner, fn, module
        self.original: Callable | None = module.__dict__.get("forward")
        self.active = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.active and threading.get_ident() == self.owner:
            return self.fn(*args, **kwargs)
        return self.below(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> _Forward:
        """A copied model (``copy.deepcopy`` while the scope is open) gets an inert
        pass-through to its own forward: the copy is not the module this scope changed."""
        import copy

        module = memo.get(id(self.module), self.module)
        return _inert_forward(self.owner, module, copy.deepcopy(self.original, memo))

    def __reduce__(self) -> tuple:
        """Pickled (``torch.save(model)`` while the scope is open): the same inert
        pass-through a deep copy gets."""
        return (_inert_forward, (self.owner, self.module, self.original))

    def below(self, *args: Any, **kwargs: Any) -> Any:
        """The forward this one replaced (read at call time: a replacement below may go)."""
        if self.original is not None:
            return self.original(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


def replacement(module: nn.Module) -> Callable | None:
    """What runs as ``module``'s forward in this thread instead of its class's: the function
    a :class:`Scope` gave it (:meth:`Scope.replace_forward`, :meth:`Scope.wrap_forward`), any
    other instance ``forward``, or None."""
    forward = module.__dict__.get("forward")
    while isinstance(forward, _Forward):
        if forward.active and threading.get_ident() == forward.owner:
            return forward.fn
        forward = forward.original
    return forward


def stateless(module: nn.Module) -> bool:
    """``module`` has no parameters or buffers (what :meth:`Scope.wrap_forward` needs)."""
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def _inert_forward(owner: int, module: nn.Module, original: Callable | None) -> _Forward:
    """A pass-through to ``module``'s own forward (what an unpickled copy gets)."""
    inert = _Forward(owner, None, module)  # type: ignore[arg-type]
    inert.original, inert.active = original, False
    return inert


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_FLAG_DICTS = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


def _remove_hook(module: nn.Module, hook: _ThreadHook) -> None:
    """Remove ``hook`` (this exact object) from ``module``, wherever a registration got to."""
    for name in _HOOK_DICTS:
        hooks = getattr(module, name, None)
        if not hooks:
            continue
        for key in [k for k, v in tuple(hooks.items()) if v is hook]:
            del hooks[key]
            for flag in _FLAG_DICTS:
                getattr(module, flag, {}).pop(key, None)


def _is_registered(module: nn.Module, hook: _ThreadHook) -> bool:
    return any(v is hook for name in _HOOK_DICTS for v in getattr(module, name, {}).values())


def _restore_forward(module: nn.Module, wrapper: _Forward) -> None:
    wrapper.active = False
    current = module.__dict__.get("forward")
    if current is wrapper:
        if wrapper.original is None:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = wrapper.original
        return
    node = current  # a later replacement is still on top: unlink this one below it
    while isinstance(node, _Forward):
        if node.original is wrapper:
            node.original = wrapper.original
            return
        node = node.original


_ATTACH_LOCK = threading.Lock()  # attach/detach from several threads on one module


def _detach(module: nn.Module, attr: str, entry: Any) -> None:
    with _ATTACH_LOCK:
        entries = module.__dict__.get(attr)
        if entries is None:
            return
        for i, e in enumerate(entries):
            if e is entry:
                del entries[i]
                break
        if not entries:
            module.__dict__.pop(attr, None)


class Scope:
    """Changes to modules for one call; undone on :meth:`close` (see the module docstring).

    >>> with Scope() as scope:
    ...     scope.forward_hook(block, fn)
    ...     scope.replace_forward(head, identity)
    ...     model(x)
    """

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self._undo: list[Callable[[], None]] = []
        self._hooks: list[tuple[nn.Module, _ThreadHook, Callable, dict]] = []  # to resume
        self._wrapped: list[tuple[nn.Module, _Forward]] = []  # wrapped forwards, to suspend
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> Scope:
        self.open()
        return self

    @protected()
    def __exit__(self, *exc: Any) -> bool:
        self.close()
        return False

    @protected(rollback=lambda self: self.close())
    def open(self) -> None:
        """Start recording (``with Scope()`` does this); installs the signal guard."""
        if id(self) in _OPEN:
            return
        self.owner = threading.get_ident()  # the thread that enters it
        self._undo.append(partial(_release, id(self)))  # runs last
        # A scope dropped while open: the one window no Python code can close is an
        # interrupt between a ``with`` block's end and the call of its ``__exit__`` (the
        # statement's line is traced again there, bpo-29988); the frame's unwinding then
        # drops the context manager, and this completes its cleanup.
        self._finalizer = weakref.finalize(self, _drain, self._undo)
        _OPEN.add(id(self))
        _GUARD.enter(id(self))

    @property
    def is_open(self) -> bool:
        return id(self) in _OPEN

    @protected()
    def close(self) -> None:
        """Undo every change, newest first; idempotent. A signal that arrived meanwhile is
        delivered after."""
        try:
            _drain(self._undo)
        finally:
            _drain(self._undo)
        if self._finalizer is not None:
            self._finalizer.detach()

    def defer(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` when the scope closes (it must be idempotent)."""
        self._undo.append(undo)

    # ------------------------------------------------------------------ changes
    def forward_hook(self, module: nn.Module, fn: Callable, *, prepend: bool = False) -> None:
        """``module.register_forward_hook(fn)``, acting in this thread only."""
        hook = _ThreadHook(self.owner, fn)
        self._undo.append(partial(_remove_hook, module, hook))
        self._hooks.append((module, hook, module.register_forward_hook, {"prepend": prepend}))
        module.register_forward_hook(hook, prepend=prepend)

    def pre_hook(
        self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False, prepend: bool = False
    ) -> None:
        """``module.register_forward_pre_hook(fn)``, acting in this thread only."""
        hook = _ThreadHook(self.owner, fn)
        self._undo.append(partial(_remove_hook, module, hook))
        options = {"with_kwargs": with_kwargs, "prepend": prepend}
        self._hooks.append((module, hook, module.register_forward_pre_hook, options))
        module.register_forward_pre_hook(hook, **options)

    def suspend_hooks(self) -> None:
        """Take this scope's torch hooks and wrapped forwards (:meth:`wrap_forward`) off their
        modules for now (a module without hooks runs on torch's fast path: for a scope kept
        open across many forwards of which few need the hooks). Nothing else of the scope
        changes; closing removes them whether suspended or not."""
        for module, hook, _, _ in self._hooks:
            _remove_hook(module, hook)
        for module, wrapper in self._wrapped:
            if module.__dict__.get("forward") is wrapper:  # on top: off the module
                _restore_forward(module, wrapper)
            wrapper.active = False  # under a later replacement: passes through

    def resume_hooks(self) -> None:
        """Put the suspended hooks back (after the module's other hooks, or before them for
        ``prepend=True``, as when they were first registered), and the wrapped forwards
        (on top of what the module has then)."""
        for module, hook, register, options in self._hooks:
            if not _is_registered(module, hook):
                register(hook, **options)
        for module, wrapper in self._wrapped:
            if wrapper.active:
                continue
            node = module.__dict__.get("forward")
            while isinstance(node, _Forward) and node is not wrapper:
                node = node.original
            if node is not wrapper:  # taken off by suspend_hooks: back on top
                wrapper.original = module.__dict__.get("forward")
                module.__dict__["forward"] = wrapper
            wrapper.active = True

    def replace_forward(self, module: nn.Module, fn: Callable) -> None:
        """Give ``module`` the instance ``forward`` ``fn`` in this thread (hooks still run)."""
        wrapper = _Forward(self.owner, fn, module)
        self._undo.append(partial(_restore_forward, module, wrapper))
        module.__dict__["forward"] = wrapper

    def wrap_forward(self, module: nn.Module, fn: Callable) -> None:
        """Give ``module`` the instance ``forward`` ``fn(below, *args, **kwargs)`` in this
        thread, ``below`` being the forward it replaced. Unlike a torch hook it keeps the
        module on torch's fast call path (no hook dispatch: what a recorder called on
        every training step wants); hooks still run. :meth:`suspend_hooks` takes it off.

        For modules without parameters or buffers only: ``nn.DataParallel`` replicas copy
        the instance dict, and a replica's call in another thread runs ``below`` on the
        original module, which only a stateless module makes the same computation."""
        if not stateless(module):
            from hookscope.errors import HookError

            raise HookError(
                f"wrap_forward needs a module without parameters or buffers; "
                f"{type(module).__name__} has them (use a forward hook)"
            )
        wrapper = _Forward(self.owner, fn, module)
        wrapper.fn = partial(fn, wrapper.below)
        self._undo.append(partial(_restore_forward, module, wrapper))
        self._wrapped.append((module, wrapper))
        module.__dict__["forward"] = wrapper

    def attach(self, module: nn.Module, attr: str, entry: Any) -> None:
        """Append ``entry`` to the list ``module.__dict__[attr]`` (created, and removed once
        empty); readers filter entries by thread themselves."""
        self._undo.append(partial(_detach, module, attr, entry))
        with _ATTACH_LOCK:
            module.__dict__.setdefault(attr, []).append(entry)


def strip_copied_hooks(root: nn.Module) -> None:
    """Remove hookscope's hooks from ``root``, a ``copy.deepcopy`` of a hooked model (the copy
    carries copies of them that no scope will ever remove). A user's own hooks stay."""
    for module in root.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _ThreadHook)]:
                del hooks[key]
        if isinstance(module.__dict__.get("forward"), _Forward):
            original = module.__dict__["forward"].original
            if original is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = original
