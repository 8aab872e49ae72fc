"""Eval mode for the duration of a hookscope call, with every module's own flag restored.

``HookedModel.wrap`` leaves a module in whatever mode it was in, and a module in train mode
makes dropout (and batch-norm statistics) random from run to run: two identical patching
calls would disagree, and patched and baseline runs would see different dropout masks. The
interventions, the attribution methods and the unit analyses therefore run under
:class:`EvalMode` (batch-norm statistics are not updated, dropout is off).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn

from hookscope.scope import Scope, protected

__all__ = ["EvalMode", "in_eval_mode"]


@dataclass
class _Saved:
    """The flags a module tree had before the first EvalMode on it, and who is inside."""

    root: weakref.ref
    flags: dict[nn.Module, bool]
    users: set[object] = field(default_factory=set)


#: id(root module) -> its saved flags, while any EvalMode is inside
_ACTIVE: dict[int, _Saved] = {}
_LOCK = threading.Lock()


def _set_flags(flags: dict[nn.Module, bool]) -> None:
    for module, flag in flags.items():
        module.training = flag


def _eval_on(root: nn.Module, token: object) -> None:
    with _LOCK:
        rec = _ACTIVE.get(id(root))
        if rec is None or rec.root() is not root:
            rec = _Saved(weakref.ref(root), {m: m.training for m in root.modules()})
            _ACTIVE[id(root)] = rec
        rec.users.add(token)
        _set_flags(dict.fromkeys(rec.flags, False))


def _eval_off(root: nn.Module, token: object) -> None:
    with _LOCK:
        rec = _ACTIVE.get(id(root))
        if rec is None or rec.root() is not root:
            return
        rec.users.discard(token)
        if not rec.users:  # the last one out restores what the first one found
            _set_flags(rec.flags)
            del _ACTIVE[id(root)]


class EvalMode(Scope):
    """``with EvalMode(module):`` every submodule of ``module`` (itself included) is in eval
    mode inside the block; afterwards each one's ``training`` flag is what it was before,
    module by module (a submodule the caller had put in eval stays in eval, its train-mode
    parent goes back to train), also when the block raises or is interrupted.

    The flags are recorded, and their restoration put on the scope's undo log, before any is
    changed; they are set directly (``module.training = flag``), never through
    ``module.train()``, which would overwrite the children's own flags. EvalModes on one
    module, nested or in several threads, may end in any order: the first records the
    flags, the last restores them. Training flags belong to the model, not to a thread.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    @protected(rollback=lambda self: self.close())
    def __enter__(self) -> nn.Module:  # type: ignore[override]
        self.open()
        token = object()
        self.defer(partial(_eval_off, self.module, token))
        _eval_on(self.module, token)
        return self.module


def in_eval_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``fn(model, ...)`` so it runs with ``model`` (a HookedModel or a torch module,
    its first argument) under :class:`EvalMode`; anything else goes to ``fn`` unchanged
    (which then raises its own error)."""

    @functools.wraps(fn)
    def run(model: Any, *args: Any, **kwargs: Any) -> Any:
        from hookscope.model import HookedModel

        module = model.model if isinstance(model, HookedModel) else model
        if not isinstance(module, nn.Module):
            return fn(model, *args, **kwargs)
        with EvalMode(module):
            return fn(model, *args, **kwargs)

    return run
