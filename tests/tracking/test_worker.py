"""The tracker's worker process: reused across trackers, activations through shared memory,
results exact (against hookscope.analysis.dimensionality on activations captured with plain
torch hooks), and no process, thread or hook left behind after an idle timeout, a shutdown,
an interrupt or a killed worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hookscope as hs
from hookscope.analysis.dimensionality import dimensionality_report
from hookscope.data.digits import digits_tensors
from hookscope.errors import HookError
from hookscope.tracking import worker
from hookscope.zoo.shipped import build_module
from hookscope.zoo.train_digits import RECIPES

METRICS4 = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")


@pytest.fixture(scope="module")
def digits():
    return digits_tensors("train")


def _model(kind: str = "mlp", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_module(RECIPES[kind].build)


def _hooks_left(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


class _Captured:
    """Each training forward's ReLU outputs, by plain torch hooks (the independent record)."""

    def __init__(self, model: nn.Module):
        self.steps: dict[int, list[torch.Tensor]] = {}
        self.step = 0
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(relus)]

    def _hook(self, i: int):
        def hook(_module, _args, out):
            if torch.is_grad_enabled():
                self.steps.setdefault(self.step, [None, None])[i] = out.detach().float().clone()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _check(frame, captured: _Captured) -> None:
    steps = sorted(frame["step"].unique())
    assert steps == sorted(captured.steps)
    for step in steps:
        for i, site in enumerate(["neuron.0", "neuron.1"]):
            ref = dimensionality_report(captured.steps[step][i].flatten(1)).metrics()
            got = frame[(frame.step == step) & (frame.site == site)].set_index("metric")["value"]
            for metric in METRICS4:
                assert got[metric] == pytest.approx(ref[metric], rel=1e-9), (step, site, metric)


def _train(model, tracker, X, y, steps, sizes=(64,), dtype=None, after=None):
    captured = _Captured(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    try:
        with tracker:
            for step in range(steps):
                captured.step = step
                n = sizes[step % len(sizes)]
                x = X[step : step + n] if dtype is None else X[step : step + n].to(dtype)
                loss = F.cross_entropy(model(x).float(), y[step : step + n])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tracker.log(step, loss=loss)
                if after is not None:
                    after(step)
    finally:
        captured.remove()
    return captured


# ------------------------------------------------------------------------- reuse


def test_the_worker_process_is_reused_with_a_ring_of_each_trackers_size(digits):
    X, y = digits
    threads = threading.active_count()
    pids = []
    for kind in ("mlp", "cnn", "mlp"):
        model = _model(kind)
        tracker = hs.Tracker(model, every=2, metrics=METRICS4, jumps=False, background="process")
        inside = []
        captured = _train(
            model, tracker, X, y, 9, after=lambda s: inside.append(threading.active_count())
        )
        assert set(inside) == {threads}  # no reader thread: results are read at log()
        pids.append(tracker._worker.proc.pid)
        captured.steps = {s: a for s, a in captured.steps.items() if s % 2 == 0}
        _check(tracker.results(), captured)  # conv maps: one row per image (C*H*W features)
        assert tracker._worker.child.buffer is None  # each tracker's ring is dropped at close
    assert len(set(pids)) == 1 and pids[0] in worker.worker_processes()


@pytest.fixture(params=[True, False], ids=["mailbox", "frames"])
def handover(request, monkeypatch):
    """Steps handed over through the shared buffer's mailboxes (x86-64) or as socket frames
    (elsewhere); the frames the worker is sent are counted by kind."""
    if request.param and not worker.MAILBOX:
        pytest.skip("mailboxes are used on x86-64 only")
    monkeypatch.setattr(worker, "MAILBOX", request.param)
    kinds: list[bytes] = []
    send = worker._Child.send

    def counted(self, data):
        at = 0
        while at < len(data):  # the frames of a batch, one by one
            (n,) = worker._LEN.unpack_from(data, at)
            kinds.append(bytes(data[at + 4 : at + 5]))
            at += 4 + n
        send(self, data)

    monkeypatch.setattr(worker._Child, "send", counted)
    return request.param, kinds


def test_a_larger_step_gets_a_larger_ring_and_half_precision_travels_as_float32(digits, handover):
    mailbox, kinds = handover
    X, y = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=1, metrics=METRICS4, jumps=False, queue_size=2)
    captured = _train(model, tracker, X, y, 7, sizes=(8, 32, 128))
    _check(tracker.results(), captured)
    assert kinds.count(b"S") == (0 if mailbox else 7)  # mailboxes: no system call per step
    assert kinds.count(b"E") == 1
    assert tracker._worker.slot_bytes == 128 * (64 + 32) * 4  # grown twice, to the largest
    assert len(tracker._worker.views) <= tracker.queue_size  # one layout kept per slot
    model = _model("mlp").to(torch.bfloat16)
    tracker = hs.Tracker(model, every=1, metrics=METRICS4, jumps=False)
    captured = _train(model, tracker, X, y, 3, dtype=torch.bfloat16)
    _check(tracker.results(), captured)  # the bfloat16 values, exactly, as float32


def test_two_trackers_at_once_have_a_worker_each(digits):
    X, y = digits
    a, b = _model("mlp", 0), _model("mlp", 1)
    ta = hs.Tracker(a, every=1, metrics=METRICS4, jumps=False)
    tb = hs.Tracker(b, every=1, metrics=METRICS4, jumps=False)
    ca, cb = _Captured(a), _Captured(b)
    with ta, tb:
        for step in range(6):
            ca.step = cb.step = step
            for model, tracker in ((a, ta), (b, tb)):
                loss = F.cross_entropy(model(X[step : step + 64]), y[step : step + 64])
                loss.backward()
                tracker.log(step, loss=loss)
    ca.remove()
    cb.remove()
    assert ta._worker.proc.pid != tb._worker.proc.pid
    _check(ta.results(), ca)
    _check(tb.results(), cb)


# ------------------------------------------------------------------------- lifetime


def test_an_idle_worker_ends_after_the_timeout_and_is_replaced(digits, monkeypatch):
    X, y = digits
    worker.shutdown_workers()
    monkeypatch.setattr(worker, "IDLE_TIMEOUT", 0.5)  # read by the child forked next
    model = _model("mlp")
    first = hs.Tracker(model, every=1, jumps=False)
    _train(model, first, X, y, 2)
    pid = first._worker.proc.pid
    assert pid in worker.worker_processes()
    deadline = time.monotonic() + 20
    while pid in worker.worker_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid not in worker.worker_processes()
    second = hs.Tracker(model, every=1, metrics=METRICS4, jumps=False)
    captured = _train(model, second, X, y, 3)
    assert second._worker.proc.pid != pid
    _check(second.results(), captured)
    worker.shutdown_workers()  # the next tests' worker waits the default time again


def test_shutdown_ends_idle_workers_and_a_killed_idle_worker_is_replaced(digits):
    X, y = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=1, jumps=False)
    _train(model, tracker, X, y, 2)
    pid = tracker._worker.proc.pid
    os.kill(pid, signal.SIGKILL)  # dies while idle in the pool
    tracker._worker.proc.join()
    tracker = hs.Tracker(model, every=1, metrics=METRICS4, jumps=False)
    captured = _train(model, tracker, X, y, 2)
    _check(tracker.results(), captured)
    assert tracker._worker.proc.pid != pid
    assert hs.tracking.shutdown_workers() >= 1
    assert hs.tracking.worker_processes() == []


def test_an_interrupt_in_the_user_loop_keeps_the_worker(digits):
    X, y = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=1, jumps=False)
    with pytest.raises(KeyboardInterrupt):
        with tracker:
            for step in range(3):
                model(X[:64]).sum().backward()
                tracker.log(step)
            raise KeyboardInterrupt
    assert tracker._worker.proc.pid in worker.worker_processes()  # between steps: reusable
    assert _hooks_left(model) == 0
    assert sorted(tracker.results()["step"].unique()) == [0, 1, 2]


def test_an_interrupt_while_talking_to_the_worker_ends_it(digits, monkeypatch):
    X, y = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=1, jumps=False)
    receive = worker._ProcessWorker._receive

    def interrupted(self, wait):
        monkeypatch.setattr(worker._ProcessWorker, "_receive", receive)
        raise KeyboardInterrupt  # as if Ctrl-C came in the middle of reading a result

    with pytest.raises(KeyboardInterrupt):
        with tracker:
            for step in range(3):
                model(X[:64]).sum().backward()
                tracker.log(step)
            monkeypatch.setattr(worker._ProcessWorker, "_receive", interrupted)
            tracker.flush()
    assert tracker._worker.proc.pid not in worker.worker_processes()  # state unknown: ended
    assert _hooks_left(model) == 0
    again = hs.Tracker(model, every=1, metrics=METRICS4, jumps=False)  # a new worker serves
    captured = _train(model, again, X, y, 2)
    _check(again.results(), captured)


def test_an_interrupt_inside_the_handover_stays_an_interrupt(digits, monkeypatch):
    if not worker.MAILBOX:
        pytest.skip("mailboxes are used on x86-64 only")
    X, y = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=1, jumps=False)
    calls = []

    class Counter:  # the counter store of step 2 happens, then Ctrl-C arrives
        size = worker._COUNTER.size

        def pack_into(self, *args):
            worker._COUNTER_REAL.pack_into(*args)
            calls.append(args)
            if len(calls) == 3:
                raise KeyboardInterrupt

    monkeypatch.setattr(worker, "_COUNTER_REAL", worker._COUNTER, raising=False)
    monkeypatch.setattr(worker, "_COUNTER", Counter())
    with pytest.raises(KeyboardInterrupt) as raised:
        with tracker:
            for step in range(10):
                model(X[:64]).sum().backward()
                tracker.log(step)
    assert raised.type is KeyboardInterrupt  # not an error about the step handed over
    assert sorted(tracker.results()["step"].unique()) == [0, 1]  # the steps logged are kept
    assert _hooks_left(model) == 0 and tracker._worker.proc.pid not in worker.worker_processes()


def test_a_worker_killed_mid_run_is_an_error_at_the_next_log(digits, handover):
    X, y = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=1, jumps=False)
    with pytest.raises(HookError, match="ended unexpectedly"):
        with tracker:
            for step in range(40):
                model(X[:64]).sum().backward()
                tracker.log(step)
                if step == 5:
                    os.kill(tracker._worker.proc.pid, signal.SIGKILL)
    assert _hooks_left(model) == 0
    assert tracker._worker.proc.pid not in worker.worker_processes()


def test_sending_while_the_worker_waits_to_send_does_not_deadlock():
    """The worker blocks sending results while the training thread sends steps: both socket
    buffers full. The parent's send reads results into its buffer meanwhile (a plain
    sendall would wait forever)."""
    import socket

    parent, child = socket.socketpair()
    chunk = worker._frame(b"V", b"x" * (1 << 20))  # far more than a socket buffer holds
    got = []

    def other_side():  # like the worker: send everything first, then read
        child.sendall(chunk)
        got.append(len(child.recv(1 << 21, socket.MSG_WAITALL)))

    side = threading.Thread(target=other_side, daemon=True)
    side.start()
    end = worker._Child.__new__(worker._Child)  # the transport only, no process
    end.sock, end.frames = parent, worker._Frames(parent)
    end.send(b"y" * (1 << 21))
    side.join(timeout=30)
    assert not side.is_alive() and got == [1 << 21]
    assert end.frames.next(wait=True) == (b"V", b"x" * (1 << 20))
    parent.close()
    child.close()


@pytest.mark.parametrize("bad", ["nan", "empty"])
def test_the_workers_own_error_is_raised_not_a_lost_worker(digits, bad, handover):
    """The worker sends its error and exits; the steps handed over after it fail to send.
    The error raised must be the worker's (which step, which site, what), for a NaN batch
    and for an empty one."""
    X, y = digits
    model = _model("mlp")
    tracker = hs.Tracker(model, every=1, jumps=False, queue_size=8)
    with pytest.raises(hs.errors.HookscopeError) as raised:
        with tracker:
            for step in range(40):
                x = X[step : step + 64]
                if step == 5:
                    x = torch.full_like(x, float("nan")) if bad == "nan" else x[:0]
                model(x).sum().backward()
                tracker.log(step)
    assert "ended unexpectedly" not in str(raised.value)
    assert "step 5, neuron.0" in str(raised.value)
    assert sorted(tracker.results()["step"].unique()) == [0, 1, 2, 3, 4]
    assert _hooks_left(model) == 0
