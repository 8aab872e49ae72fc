"""No hookscope hook, handler or attention switch is left on a model after any call, however it ends."""

import copy

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.adapters import hf_attention

import builders


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def neox():
    hf = builders.tiny_neox()
    own = hf.gpt_neox.layers[0].mlp.register_forward_hook(
        lambda m, a, o: None
    )  # the user's own hook
    yield hf, hs.HookedModel.wrap(hf)
    own.remove()


TOKS = torch.randint(0, 500, (1, 6), generator=torch.Generator().manual_seed(0))


def _clean(hf, before):
    assert _hook_count(hf) == before
    assert hf.config._attn_implementation == "sdpa"
    assert hf_attention.active_switches() == 0
    assert not any(hf_attention.ATTR in m.__dict__ for m in hf.modules())


def _boom(act, address):
    raise ValueError("user bug")


def _interrupt(act, address):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "site", ["resid_post.0", "head.1.2", "head.1.2.pattern", "head.0.1.result", "neuron.1.3"]
)
@pytest.mark.parametrize("fn, exc", [(_boom, ValueError), (_interrupt, KeyboardInterrupt)])
def test_raising_hook_leaves_nothing(neox, site, fn, exc):
    hf, model = neox
    before = _hook_count(hf)
    assert before == 1
    with pytest.raises(exc):
        model.run_with_hooks(TOKS, hooks=[("resid_pre.0", lambda a, _: None), (site, fn)])
    _clean(hf, before)
    with pytest.raises(exc):
        model.run_with_cache(TOKS, hooks=[(site, fn)])
    _clean(hf, before)
    # the user's own hook is still there and still works
    assert len(hf.gpt_neox.layers[0].mlp._forward_hooks) == 1


def test_forward_that_raises_leaves_nothing(neox):
    hf, model = neox
    before = _hook_count(hf)
    broken = hf.gpt_neox.layers[1].mlp.register_forward_pre_hook(
        lambda m, a: (_ for _ in ()).throw(RuntimeError("forward broke"))
    )
    try:
        with pytest.raises(RuntimeError, match="forward broke"):
            model.run_with_cache(TOKS)  # pattern included: attention switched to hookscope's
        assert hf.config._attn_implementation == "sdpa" and not hf_attention.active_switches()
        assert _hook_count(hf) == before + 1
    finally:
        broken.remove()
    _clean(hf, before)


def test_context_manager_removes_on_exit_and_on_error(neox):
    hf, model = neox
    before = _hook_count(hf)
    seen = []
    with model.hooks(
        [("resid_post.1", lambda act, a: seen.append(a)), ("head.0.pattern", lambda act, a: None)]
    ):
        assert _hook_count(hf) > before
        assert hf.config._attn_implementation == hf_attention.NAME
        model(TOKS)
        model(TOKS)
    assert len(seen) == 2
    _clean(hf, before)
    with pytest.raises(ZeroDivisionError):
        with model.hooks([("resid_post.1", lambda act, a: None)]):
            1 / 0
    _clean(hf, before)


def test_bad_replacement_raises_hook_error_and_cleans_up(neox):
    hf, model = neox
    before = _hook_count(hf)
    with pytest.raises(
        hs.HookError, match=r"returned shape \(3,\) but the activation has shape \(1, 6, 16\)"
    ):
        model.run_with_hooks(TOKS, hooks=[("head.0.1", lambda act, a: torch.zeros(3))])
    _clean(hf, before)
    with pytest.raises(hs.HookError, match="returned int"):
        model.run_with_hooks(TOKS, hooks=[("resid_post.0", lambda act, a: 3)])
    _clean(hf, before)


def test_nested_pattern_contexts_restore_in_order(neox):
    hf, model = neox
    with model.hooks([("head.0.pattern", lambda act, a: None)]):
        _, cache = model.run_with_cache(TOKS, names="head.1.pattern")
        assert hf.config._attn_implementation == hf_attention.NAME
        assert hf_attention.active_switches() == 1
        # only the outer context's handler remains on layer 0's attention module
        assert len(hf.gpt_neox.layers[0].attention.__dict__[hf_attention.ATTR]) == 1
        assert hf_attention.ATTR not in hf.gpt_neox.layers[1].attention.__dict__
    _clean(hf, 1)
    assert cache["head.1.pattern"].shape == (1, 4, 6, 6)


def test_vision_hooks_removed(neox):
    net = builders.tiny_cnn()
    model = hs.HookedModel.wrap(net)
    with pytest.raises(ValueError):
        model.run_with_hooks(torch.zeros(1, 1, 8, 8), hooks=[("neuron.*.*", _boom)])
    assert _hook_count(net) == 0


def test_memoised_plan_follows_a_replaced_submodule():
    hf = builders.tiny_neox()
    model = hs.HookedModel.wrap(hf)
    _, first = model.run_with_cache(TOKS, names="mlp_out.0")
    replacement = builders.tiny_neox(seed=5).gpt_neox.layers[0].mlp
    hf.gpt_neox.layers[0].mlp = replacement
    _, second = model.run_with_cache(TOKS, names="mlp_out.0")  # same names: the memoised plan
    with torch.no_grad():
        expected = replacement(hf.gpt_neox.layers[0].post_attention_layernorm(second_resid(model)))
    assert not torch.equal(first["mlp_out.0"], second["mlp_out.0"])
    torch.testing.assert_close(second["mlp_out.0"], expected)
    assert _hook_count(hf) == 0


def second_resid(model):
    return model.run_with_cache(TOKS, names="resid_pre.0")[1]["resid_pre.0"]


def test_eval_modes_ending_out_of_order_restore_train_mode_last():
    from hookscope.modes import EvalMode

    hf = builders.tiny_neox().train()
    a, b = EvalMode(hf), EvalMode(hf)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert not hf.training and not any(m.training for m in hf.modules())  # b is still inside
    b.__exit__(None, None, None)
    assert all(m.training for m in hf.modules())


def test_a_sigint_handler_set_inside_a_block_is_kept():
    import signal

    model = hs.HookedModel.wrap(builders.tiny_neox())
    before = signal.getsignal(signal.SIGINT)

    def mine(signum, frame):
        raise KeyboardInterrupt

    try:
        with model.hooks([("resid_post.0", lambda a, _: None)]):
            signal.signal(signal.SIGINT, mine)
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, before)


def test_hooks_made_in_one_thread_act_in_the_thread_that_enters_them():
    import threading

    model = hs.HookedModel.wrap(builders.tiny_neox())
    zero = [("resid_post.0", lambda act, _: act * 0)]
    expected = model.run_with_hooks(TOKS, zero)
    block, out = model.hooks(zero), {}

    def worker():
        with block, torch.no_grad():
            out["logits"] = model(TOKS)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert torch.equal(out["logits"], expected)


def test_entering_an_active_hooks_block_again_is_an_error(neox):
    hf, model = neox
    zero = [("resid_post.0", lambda act, _: act * 0)]
    expected = model.run_with_hooks(TOKS, zero)
    block = model.hooks(zero)
    with block:
        with pytest.raises(hs.HookError, match="already active"):
            with block:
                pass
        with torch.no_grad():
            assert torch.equal(model(TOKS), expected)  # the outer block's hook is still on
    _clean(hf, 1)


def test_every_signal_deferred_in_a_section_is_delivered():
    """In a fresh interpreter with SIGINT/SIGTERM unblocked and default: signal state is
    process-wide and inherited, and in the full xdist suite some earlier test leaves SIGINT
    ignored or blocked in the worker (found at the issue-15 stop, not yet traced; the
    in-process version passes alone)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, signal
        from hookscope.scope import Scope

        # start clean: a child inherits ignored and blocked signals from the worker
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.signal(signal.SIGINT, signal.default_int_handler)
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
        scope = Scope()
        scope.__enter__()
        scope.defer(lambda: (os.kill(os.getpid(), signal.SIGINT), os.kill(os.getpid(), signal.SIGTERM)))
        try:
            scope.__exit__(None, None, None)
            sum(range(10000))  # the re-posted SIGTERM is handled here at the latest
            print("no KeyboardInterrupt")
        except KeyboardInterrupt:
            sum(range(10000))
            print("raised", got)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "raised ['TERM']"


def test_suspended_hooks_are_off_the_module_and_resume_in_their_place():
    from hookscope.scope import Scope

    lin = nn.Linear(3, 3)
    calls: list[str] = []
    user = lin.register_forward_hook(lambda *a: calls.append("user"))
    x = torch.randn(2, 3)
    with Scope() as scope:
        scope.forward_hook(lin, lambda *a: calls.append("late"))
        scope.forward_hook(lin, lambda *a: calls.append("early"), prepend=True)
        scope.pre_hook(lin, lambda m, a, k: calls.append("pre"), with_kwargs=True)
        lin(x)
        assert calls == ["pre", "early", "user", "late"]
        scope.suspend_hooks()
        assert len(lin._forward_hooks) == 1 and not lin._forward_pre_hooks  # the user's stays
        calls.clear()
        lin(x)
        assert calls == ["user"]
        scope.resume_hooks()
        scope.resume_hooks()  # idempotent: each hook once
        calls.clear()
        lin(x)
        assert calls == ["pre", "early", "user", "late"]
        scope.suspend_hooks()
        scope.resume_hooks()
    assert list(lin._forward_hooks.values()) == [lin._forward_hooks[user.id]]
    assert not lin._forward_pre_hooks and not lin._forward_pre_hooks_with_kwargs
    with Scope() as scope:  # closed while suspended: nothing comes back
        scope.forward_hook(lin, lambda *a: calls.append("late"))
        scope.suspend_hooks()
    assert len(lin._forward_hooks) == 1
    user.remove()


def test_wrapped_forwards_suspend_resume_nest_and_act_in_their_thread_only():
    import threading

    from hookscope.errors import HookError
    from hookscope.scope import Scope

    with Scope() as scope, pytest.raises(HookError, match="Linear has them"):
        scope.wrap_forward(nn.Linear(3, 3), lambda below, x: below(x))  # state: refused
    lin = nn.Softplus()
    x = torch.randn(2, 3)
    plain = lin(x).detach()
    seen: list[str] = []

    def outer(below, inp):
        seen.append("outer")
        return below(inp) * 2

    with Scope() as scope:
        scope.wrap_forward(lin, outer)
        assert torch.allclose(lin(x), 2 * plain)
        other: list[torch.Tensor] = []
        thread = threading.Thread(target=lambda: other.append(lin(x).detach()))
        thread.start()
        thread.join()
        assert torch.equal(other[0], plain) and seen == ["outer"]  # not in another thread
        scope.suspend_hooks()
        assert "forward" not in lin.__dict__ and torch.equal(lin(x), plain)
        scope.resume_hooks()
        scope.resume_hooks()  # idempotent: wrapped once
        assert torch.allclose(lin(x), 2 * plain)
        with Scope() as inner:  # a later replacement on top: suspend lets it through
            inner.replace_forward(lin, lambda inp: type(lin).forward(lin, inp) + 1)
            scope.suspend_hooks()
            assert torch.allclose(lin(x), plain + 1)
            scope.resume_hooks()  # still under the later one: switched back on in place
            assert torch.allclose(lin(x), plain + 1)  # the top one calls the class forward
        assert torch.allclose(lin(x), 2 * plain)
        scope.suspend_hooks()
        user = lambda inp: type(lin).forward(lin, inp) - 1  # noqa: E731
        lin.forward = user  # the user's own instance forward, set meanwhile
        scope.resume_hooks()
        assert torch.allclose(lin(x), 2 * (plain - 1))
        twin = copy.deepcopy(nn.Sequential(lin))  # a copy made meanwhile: inert, its own
        assert torch.equal(twin(x), lin.forward.original(x)) and len(seen) == 4
    assert lin.__dict__["forward"] is user  # closing restores what was there
    del lin.forward
    with Scope() as scope:  # closed while suspended: nothing comes back
        scope.wrap_forward(lin, outer)
        scope.suspend_hooks()
    assert "forward" not in lin.__dict__


def test_wrapped_recorders_record_what_torch_hooks_record():
    from hookscope.hooks import Run, installed, wire

    model = nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)
    )
    hm = hs.HookedModel.wrap(model)
    slots = [a.slot for a in hm.resolve(["neuron.0", "neuron.1"])]
    x = torch.randn(5, 4, requires_grad=True)
    plans = hm.planner.plans((), record=slots)
    runs = {}
    for wrapped in (False, True):
        run = Run(grad_only=True)
        with installed(model, wire(plans), run, wrap_recorders=wrapped):
            assert ("forward" in model[1].__dict__) == wrapped
            model(x).sum().backward()  # the in-place ReLU still gets a gradient
            with torch.no_grad():
                model(x + 1)  # not recorded: an evaluation forward
        runs[wrapped] = run.acts
        assert "forward" not in model[1].__dict__ and not model[1]._forward_hooks
    assert set(runs[True]) == set(runs[False]) == set(slots)
    for slot in slots:
        assert torch.equal(runs[True][slot], runs[False][slot])
        assert not runs[True][slot].requires_grad
    assert torch.equal(runs[True][slots[0]], torch.relu(model[0](x)).detach())


def test_replacement_says_what_runs_as_a_modules_forward_in_this_thread():
    import threading

    from hookscope.scope import Scope, replacement

    layer = nn.Linear(3, 3)
    act = nn.ReLU()
    assert replacement(layer) is None

    def doubled(x):
        return 2 * x

    seen = {}
    with Scope() as scope:
        scope.replace_forward(layer, doubled)
        scope.wrap_forward(act, lambda below, x: below(x) + 1)
        assert replacement(layer) is doubled
        assert replacement(act) is not None  # the wrapper, holding the forward it wraps
        other = threading.Thread(target=lambda: seen.update(other=replacement(layer)))
        other.start()
        other.join()
        inner = Scope()
        with inner:  # a replacement on top of another: the top one runs
            inner.replace_forward(layer, abs)
            assert replacement(layer) is abs
        assert replacement(layer) is doubled
    assert seen["other"] is None  # another thread runs the class's forward
    assert replacement(layer) is None and replacement(act) is None
    layer.forward = doubled  # a user's own instance forward
    assert replacement(layer) is doubled
