"""Eval mode for the duration of an intervention, with every module's own flag restored.

``HookedModel.wrap`` leaves a module in whatever mode it was in, and a module in train mode
makes dropout (and batch-norm statistics) random from run to run: two identical patching
calls would disagree, and patched and baseline runs would see different dropout masks. The
interventions therefore run under :class:`EvalMode`.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from hookscope.scope import Scope, protected

__all__ = ["EvalMode"]


def _set_flags(flags: dict[nn.Module, bool]) -> None:
    for module, flag in flags.items():
        module.training = flag


class EvalMode(Scope):
    """``with EvalMode(module):`` every submodule of ``module`` (itself included) is in eval
    mode inside the block; afterwards each one's ``training`` flag is what it was before,
    module by module (a submodule the caller had put in eval stays in eval, its train-mode
    parent goes back to train), also when the block raises or is interrupted.

    The flags are recorded, and their restoration put on the scope's undo log, before any is
    changed; they are set directly (``module.training = flag``), never through
    ``module.train()``, which would overwrite the children's own flags. Nesting is safe: the
    inner block restores the flags the outer one set. Training flags belong to the model,
    not to a thread (see the README on threads).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    @protected(rollback=lambda self: self.close())
    def __enter__(self) -> nn.Module:  # type: ignore[override]
        self.open()
        saved = {m: m.training for m in self.module.modules()}
        self.defer(partial(_set_flags, saved))
        _set_flags(dict.fromkeys(saved, False))
        return self.module
