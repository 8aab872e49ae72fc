"""Interrupt safety: a Ctrl-C at any line of a hookscope call leaves the model pristine.

A ``sys.settrace`` injector counts the lines executed in hookscope's own code and in torch's
hook and contextlib code during one public call, then reruns the call and delivers SIGINT at
line k, as Python does: the SIGINT handler in place at that moment is called with the
interrupted frame (the default handler raises KeyboardInterrupt there; hookscope's, while
one of its scopes is open, defers a signal that arrives while hooks are being installed or
removed and delivers it when that section ends). Afterwards the model must be pristine:

* no hook on any module but the user's own (which still fires), no replaced forward, no
  pattern handler attached, every training flag as before;
* the original attention implementation, no attention switch, no open scope, the original
  SIGINT handler;
* logits bitwise equal to those of an untouched copy.

Every injected run must also end in KeyboardInterrupt: the interrupt is never swallowed.
The default run samples points along each call; ``-m slow`` runs the exhaustive version.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
from collections.abc import Callable

import pytest
import torch

import hookscope as hs
import hookscope.interventions as iv
from hookscope import scope as scope_mod
from hookscope.adapters import hf_attention

import builders

_TRACED = (
    os.path.dirname(hs.__file__) + os.sep,
    os.path.join(os.path.dirname(torch.__file__), "nn", "modules", "module.py"),
    os.path.join(os.path.dirname(torch.__file__), "utils", "hooks.py"),
    os.path.dirname(os.__file__) + os.sep + "contextlib.py",
)


class Injector:
    """Delivers SIGINT at the ``at``-th traced line (``at=None``: only counts lines)."""

    def __init__(self, at: int | None = None):
        self.at = at
        self.lines = 0
        self.fired = False

    def trace(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(_TRACED):
            return self.local
        return None

    def local(self, frame, event, arg):
        if event == "line" and not self.fired:
            self.lines += 1
            if self.lines == self.at:
                self.fired = True
                handler = signal.getsignal(signal.SIGINT)
                if callable(handler):
                    handler(signal.SIGINT, frame)
                else:
                    raise KeyboardInterrupt
        return self.local

    def run(self, call: Callable[[], object]) -> bool:
        """Run ``call`` under the injector; True when it ended in KeyboardInterrupt."""
        sys.settrace(self.trace)
        try:
            call()
        except KeyboardInterrupt:
            return True
        finally:
            sys.settrace(None)
        return False


class Pristine:
    """A snapshot of a model's hookable state, and the check that it is back."""

    def __init__(self, hooked: hs.HookedModel, tokens: torch.Tensor):
        self.hooked, self.tokens = hooked, tokens
        self.model = hooked.model
        self.fired = [0]
        # the user's own hook, registered before anything of hookscope's
        self.model.register_forward_hook(
            lambda m, a, o: self.fired.__setitem__(0, self.fired[0] + 1)
        )
        self.hooks = {name: self._hooks(m) for name, m in self.model.named_modules()}
        self.training = {name: m.training for name, m in self.model.named_modules()}
        self.attn = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        self.sigint = signal.getsignal(signal.SIGINT)
        with torch.no_grad():
            self.logits = copy.deepcopy(self.model)(tokens).logits

    @staticmethod
    def _hooks(m: torch.nn.Module) -> dict[str, list]:
        names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        return {n: list(getattr(m, n, {}).values()) for n in names}

    def problems(self) -> list[str]:
        found = []
        for name, m in self.model.named_modules():
            if self._hooks(m) != self.hooks[name]:
                found.append(f"hooks left on {name or 'the model'}: {self._hooks(m)}")
            if "forward" in m.__dict__:
                found.append(f"forward of {name} replaced")
            if hf_attention.ATTR in m.__dict__:
                found.append(f"pattern handlers left on {name}")
            if m.training != self.training[name]:
                found.append(f"training flag of {name} changed")
        config = getattr(self.model, "config", None)
        if config is not None and config._attn_implementation != self.attn:
            found.append(f"attention implementation left at {config._attn_implementation}")
        if hf_attention.active_switches():
            found.append("an attention switch is still active")
        if scope_mod.open_scopes():
            found.append(f"{scope_mod.open_scopes()} scopes still open")
        if signal.getsignal(signal.SIGINT) is not self.sigint:
            found.append("the SIGINT handler was not restored")
        before = self.fired[0]
        with torch.no_grad():
            logits = self.model(self.tokens).logits
        if not torch.equal(logits, self.logits):
            found.append(f"logits differ by {float((logits - self.logits).abs().max()):.3g}")
        if self.fired[0] != before + 1:
            found.append("the user's own hook did not fire")
        return found


BUILDERS = {
    "neox": builders.tiny_neox,
    "gpt2": builders.tiny_gpt2,
    "llama_gqa": builders.tiny_llama_gqa,
}


def _calls(model: hs.HookedModel, tokens: torch.Tensor) -> dict[str, Callable[[], object]]:
    clean, corrupted = tokens[:1], tokens[1:]
    metric = iv.logit_diff(3, 7)

    def zero(act, address):
        return act * 0

    def in_context():
        with model.hooks([("resid_post.0", zero)]):
            model(clean)

    return {
        "run_with_hooks": lambda: model.run_with_hooks(clean, hooks=[("head.0.1", zero)]),
        "run_with_cache": lambda: model.run_with_cache(
            clean, names=["resid_post.*", "head.1.pattern"], hooks=[("head.0.1.pattern", zero)]
        ),
        "run_with_cache_backward": lambda: model.run_with_cache(
            clean, names="resid_pre.*", backward=lambda logits: logits[0, -1, 3]
        ),
        "hooks": in_context,
        "activation_patching": lambda: iv.activation_patching(
            model, clean, corrupted, metric, "head.*.*", progress=False
        ),
        "ablate": lambda: iv.ablate(
            model,
            tokens,
            "head.1.*",
            method="mean",
            reference=tokens,
            metric=metric,
            progress=False,
        ),
        "attribution_patching": lambda: iv.attribution_patching(
            model, clean, corrupted, metric, "head.*.*", progress=False
        ),
        "localize_circuit": lambda: iv.localize_circuit(
            model, clean, corrupted, metric, "head.*.*", candidates=2, progress=False
        ),
    }


CALLS = [
    "run_with_hooks",
    "run_with_cache",
    "run_with_cache_backward",
    "hooks",
    "activation_patching",
    "ablate",
    "attribution_patching",
    "localize_circuit",
]


@pytest.fixture(scope="module", params=list(BUILDERS))
def setup(request):
    hooked = hs.HookedModel.wrap(BUILDERS[request.param]())
    tokens = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(0))
    return hooked, tokens, Pristine(hooked, tokens)


def _inject(setup, name: str, points: int | None) -> tuple[int, int]:
    """Interrupt ``name`` at ``points`` lines spread over the call (None: every line);
    returns (runs, lines counted)."""
    hooked, tokens, pristine = setup
    call = _calls(hooked, tokens)[name]
    call()  # warm up (memoised plans, the cache-keyword probe) so the count is stable
    counter = Injector()
    assert not counter.run(call)
    assert not pristine.problems()
    n = counter.lines
    at = (
        range(1, n + 1)
        if points is None
        else sorted({1 + (n - 1) * i // (points - 1) for i in range(points)})
    )
    for k in at:
        injector = Injector(k)
        interrupted = injector.run(call)
        problems = pristine.problems()
        assert not problems, f"interrupt at line {k}/{n} of {name}: {problems}"
        assert interrupted, f"the interrupt at line {k}/{n} of {name} was swallowed"
    return len(at), n


@pytest.mark.parametrize("name", CALLS)
def test_interrupt_at_sampled_lines_leaves_model_pristine(setup, name):
    _inject(setup, name, points=12)


@pytest.mark.slow
@pytest.mark.parametrize("name", CALLS)
def test_interrupt_at_every_line_leaves_model_pristine(setup, name):
    runs, lines = _inject(setup, name, points=None)
    print(f"{name}: {runs} interrupted runs over {lines} lines, 0 leaks")


def test_user_hooks_survive_and_errors_inside_hooks_clean_up():
    """A hook that raises, a forward that raises: exactly hookscope's hooks are removed."""
    hooked = hs.HookedModel.wrap(builders.tiny_neox())
    tokens = torch.randint(0, 500, (1, 5), generator=torch.Generator().manual_seed(1))
    pristine = Pristine(hooked, tokens)

    def boom(act, address):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        hooked.run_with_cache(tokens, names="head.0.pattern", hooks=[("head.1.2.pattern", boom)])
    assert not pristine.problems()


def test_nested_contexts_exit_out_of_order():
    """A.__enter__, B.__enter__, A.__exit__: B's hook keeps working, and after B.__exit__ the
    model is pristine (the attention setting included)."""
    hooked = hs.HookedModel.wrap(builders.tiny_neox())
    tokens = torch.randint(0, 500, (1, 5), generator=torch.Generator().manual_seed(2))
    pristine = Pristine(hooked, tokens)
    seen: list[str] = []

    def record(tag):
        def fn(act, address):
            seen.append(tag)
            return act * 0.5

        return fn

    a = hooked.hooks([("head.0.1.pattern", record("A"))])
    b = hooked.hooks([("head.1.2.pattern", record("B"))])
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    seen.clear()
    _, cache = hooked.run_with_cache(tokens, names="head.1.pattern")
    assert seen == ["B"]
    # B's hook still halves head 1.2's pattern; other heads are softmax rows (sum 1)
    sums = cache["head.1.pattern"].sum(-1)
    torch.testing.assert_close(sums[0, 2], torch.full_like(sums[0, 2], 0.5))
    torch.testing.assert_close(sums[0, 0], torch.ones_like(sums[0, 0]))
    b.__exit__(None, None, None)
    assert not pristine.problems()


def test_threads_get_their_own_results():
    """Two threads caching on one model and a third running plain forwards during a
    patching sweep: each gets what it would get alone."""
    hooked = hs.HookedModel.wrap(builders.tiny_neox())
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randint(0, 500, (2, 6), generator=gen) for _ in range(4)]
    names = ["resid_post.*", "head.*.pattern", "neuron.1"]
    alone = [hooked.run_with_cache(x, names=names)[1] for x in inputs]
    with torch.no_grad():
        plain = [hooked.model(x).logits for x in inputs]
    metric = iv.logit_diff(3, 7)
    sweep_alone = iv.activation_patching(
        hooked, inputs[0][:1], inputs[1][:1], metric, "head.*.*", progress=False
    ).scores
    failures: list[str] = []
    barrier = threading.Barrier(3)

    def cacher(offset):
        barrier.wait()
        for rep in range(10):
            i = (offset + rep) % 4
            _, cache = hooked.run_with_cache(inputs[i], names=names)
            for name in ("resid_post.1", "head.1.pattern", "neuron.1"):
                if not torch.equal(cache[name], alone[i][name]):
                    failures.append(f"cache {name} of input {i} mixed")

    def plain_forwards():
        barrier.wait()
        for rep in range(20):
            i = rep % 4
            with torch.no_grad():
                if not torch.equal(hooked.model(inputs[i]).logits, plain[i]):
                    failures.append(f"plain forward of input {i} changed")

    def sweeper():
        for _ in range(2):
            scores = iv.activation_patching(
                hooked, inputs[0][:1], inputs[1][:1], metric, "head.*.*", progress=False
            ).scores
            if not torch.equal(scores, sweep_alone):
                failures.append("sweep scores changed")

    threads = [threading.Thread(target=cacher, args=(k,)) for k in (0, 1)]
    threads += [threading.Thread(target=plain_forwards), threading.Thread(target=sweeper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert scope_mod.open_scopes() == 0 and hf_attention.active_switches() == 0
