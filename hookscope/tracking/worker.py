"""Where a tracker's metrics and jump detection run: a forked process, a thread, or inline.

:class:`Measurer` holds the work: for one logged step, the metrics of each layer's
``[rows, features]`` matrix (:func:`hookscope.analysis.dimensionality.layer_metrics`, numpy
path) and one push to the online jump detector. Three places to run it:

* ``"process"`` (default where ``fork`` exists, i.e. Linux and macOS): a worker process,
  forked by the first tracker of a Python session and reused by the later ones (it ends
  after :data:`IDLE_TIMEOUT` seconds without a tracker, with the interpreter, or at
  :func:`shutdown_workers`). At a logged step the training thread copies each layer's matrix
  once, into a shared-memory ring, and hands the steps over a few at a time (a few bytes
  each, saying where); the worker measures with one BLAS thread and sends the values back,
  which the training thread reads when it hands over the next few (no thread of its own: a
  Python thread takes the interpreter lock that the training loop's many small torch calls
  wait on). Nothing is pickled.
* ``"thread"``: a background thread (where there is no fork).
* ``"inline"`` (``background=False``): in the training thread, at ``log``.

Each keeps at most ``queue_size`` steps in flight (``log`` waits when the worker is that
far behind), so memory is bounded; results come back in step order. An error in the worker
(NaN activations, a dead process) is kept and raised in the training thread.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import json
import math
import mmap
import multiprocessing as mp
import os
import queue
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope import errors
from hookscope.analysis.dimensionality import layer_metrics
from hookscope.tracking.online import OnlineJumps, TrackedJump

__all__ = ["Measurer", "make_worker", "BACKENDS", "shutdown_workers", "worker_processes"]

BACKENDS = ("process", "thread", "inline")
_HEADER = struct.Struct("<I")
# dtypes that travel as they are (their codes in a step frame); others travel as float32
_CODE = {torch.float32: 0, torch.float64: 1}
_CODES = [np.dtype(np.float32), np.dtype(np.float64)]
_FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)  # room for a few passed fds


class Measurer:
    """Metrics of every layer at one logged step, and the online jump detector."""

    def __init__(self, spec: dict[str, Any]):
        self.names = spec["names"]
        self.metrics = tuple(spec["metrics"])
        self.center, self.energy = spec["center"], spec["energy"]
        det = spec["detector"]
        series = [(s, m) for s in self.names for m in self.metrics]
        self.detector = (
            None if det is None else OnlineJumps(series, confirm=det["confirm"], **det["options"])
        )

    def measure(self, step: int, mats: list[np.ndarray]) -> tuple[list[float], list[TrackedJump]]:
        row: list[float] = []
        for name, mat in zip(self.names, mats, strict=True):
            try:
                values, _ = layer_metrics(mat, self.metrics, self.center, self.energy)
            except errors.HookscopeError as err:
                raise type(err)(f"step {step}, {name}: {err}") from None
            row += [float(values[m]) for m in self.metrics]
        jumps = [] if self.detector is None else self.detector.push(step, np.asarray(row))
        return row, jumps

    def finish(self) -> list[TrackedJump]:
        return [] if self.detector is None else self.detector.finish()


def make_worker(backend: str, spec: dict, on_result: Callable, queue_size: int) -> Any:
    """The worker for ``backend``; ``on_result(step, row, jumps, extra)`` gets each result."""
    if backend == "process" and "fork" in mp.get_all_start_methods():
        return _ProcessWorker(spec, on_result, queue_size)
    if backend in ("process", "thread"):
        return _ThreadWorker(spec, on_result, queue_size)
    return _InlineWorker(spec, on_result)


def _matrix(t: Tensor) -> np.ndarray:
    """A layer's [rows, features] tensor as a CPU numpy array (float16 and bfloat16, which
    numpy lacks or computes poorly, become float32)."""
    t = t.detach()
    if t.dtype not in _CODE:
        t = t.float()
    return t.cpu().numpy()


class _InlineWorker:
    def __init__(self, spec: dict, on_result: Callable):
        self.measurer, self.on_result = Measurer(spec), on_result
        self.error: BaseException | None = None

    def submit(self, step: int, rows: list[Tensor], extra: tuple) -> None:
        self._measure(step, [_matrix(r) for r in rows], extra)

    def _measure(self, step: int, mats: list[np.ndarray], extra: tuple) -> None:
        row, jumps = self.measurer.measure(step, mats)
        self.on_result(step, row, jumps, extra)

    def flush(self) -> None:
        pass

    def close(self) -> list[TrackedJump]:
        return self.measurer.finish()


class _ThreadWorker(_InlineWorker):
    def __init__(self, spec: dict, on_result: Callable, queue_size: int):
        super().__init__(spec, on_result)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self._work, name="hookscope-tracker", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            try:
                if job is None:
                    return
                if self.error is None:  # after an error the queue drains unmeasured
                    self._measure(*job)
            except BaseException as err:  # raised in the training thread by the tracker
                self.error = err
            finally:
                self.queue.task_done()

    def submit(self, step: int, rows: list[Tensor], extra: tuple) -> None:
        self.queue.put((step, [_matrix(r) for r in rows], extra))

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> list[TrackedJump]:
        self.queue.put(None)
        self.thread.join()
        return [] if self.error is not None else self.measurer.finish()


# --------------------------------------------------------------------------- the process
#
# One socket pair per worker process carries frames: a 4-byte length, a 1-byte kind, a body
# (structs for the per-step messages, JSON for the rare ones; nothing is pickled).
#   parent -> child  B {spec}               a tracker begins (a new Measurer)
#                    M <size> + an fd       the shared memory the activations are written to
#                    S <step, offset, arrays: dtype, shape>   one logged step
#                    E                      the tracker ends (the buffer is dropped)
#   child -> parent  V <step, json length, values, jumps json>   one step's metrics
#                    X {error, type}        a measuring error (then the child exits)
#                    F [jumps]              the detector's last jumps, after E
# The activations travel through a shared-memory ring of ``queue_size`` slots that the parent
# writes with one copy; a slot is written again only after its step's result came back.

_LEN = struct.Struct("<I")
_STEP = struct.Struct("<qQI")  # step, byte offset, number of arrays
_ARRAY = struct.Struct("<BB")  # dtype code, ndim (then ndim int64 dims)
_RESULT = struct.Struct("<qI")  # step, length of the jumps' JSON


def _frame(kind: bytes, body: bytes = b"") -> bytes:
    return _LEN.pack(len(body) + 1) + kind + body


class _Frames:
    """Frames read from a socket (with any file descriptors sent along)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.data, self.fds = sock, bytearray(), []

    def _take(self) -> tuple[bytes, bytes] | None:
        if len(self.data) < 4:
            return None
        (n,) = _LEN.unpack_from(self.data)
        if len(self.data) < 4 + n:
            return None
        frame = bytes(self.data[4 : 4 + n])
        del self.data[: 4 + n]
        return frame[:1], frame[1:]

    def next(self, wait: bool = True) -> tuple[bytes, bytes] | None:
        """The next frame; None if ``wait`` is False and none has fully arrived. EOFError when
        the other side is gone."""
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            if not self.fill(wait):
                return None

    def fill(self, wait: bool) -> bool:
        """Read what has arrived into the buffer (waiting for something if ``wait``);
        False if nothing had."""
        try:  # (socket.recv_fds ignores its flags before Python 3.12: recvmsg directly)
            data, ancillary, _, _ = self.sock.recvmsg(
                1 << 16, _FD_SPACE, 0 if wait else socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return False
        except ConnectionError as err:
            raise EOFError(str(err)) from None
        if not data:
            raise EOFError("the other side closed the socket")
        self.data += data
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds += fds
        return True


def _shared_file(size: int) -> int:
    """An anonymous file of ``size`` bytes for shared memory (memfd where Linux has it)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("hookscope-tracker", os.MFD_CLOEXEC)
    else:  # macOS: an unlinked temporary file (page cache backed)
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


_AFTER_INTERRUPT = 10.0  # seconds close() waits for a worker after an interrupted exchange

#: seconds an idle worker process waits for its next tracker before it exits
IDLE_TIMEOUT = 300.0


def _child(sock: socket.socket, inherited: list[Any]) -> None:
    """The forked worker: measure the steps of one tracker after another; numpy only."""
    for obj in inherited:  # the parent's end of this socket, other workers' sockets/buffers
        with contextlib.suppress(BufferError):  # a buffer with views in the parent stays mapped
            obj.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training loop's to handle
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # this process only: one BLAS thread beside the training
    except ImportError:  # threadpoolctl comes with scikit-learn; without it BLAS keeps its own
        pass
    frames = _Frames(sock)
    measurer: Measurer | None = None
    buffer: mmap.mmap | None = None
    timeout: float | None = None
    while True:
        if timeout != (IDLE_TIMEOUT if measurer is None else None):
            timeout = IDLE_TIMEOUT if measurer is None else None
            sock.settimeout(timeout)
        try:
            kind, body = frames.next()
        except (EOFError, TimeoutError):
            return  # the parent is gone, or idle too long (the next tracker forks a new one)
        if kind == b"S":
            step, offset, n = _STEP.unpack_from(body)
            at, mats = _STEP.size, []
            for _ in range(n):
                code, ndim = _ARRAY.unpack_from(body, at)
                shape = struct.unpack_from(f"<{ndim}q", body, at + _ARRAY.size)
                at += _ARRAY.size + 8 * ndim
                dtype = _CODES[code]
                count = int(np.prod(shape))
                mats.append(np.frombuffer(buffer, dtype, count, offset).reshape(shape))
                offset += count * dtype.itemsize
            try:
                row, jumps = measurer.measure(step, mats)
            except Exception as err:  # sent to the training thread, which raises it
                error = (
                    {"error": str(err), "type": type(err).__name__}
                    if isinstance(err, errors.HookscopeError)
                    else {"error": f"step {step}: {type(err).__name__}: {err}", "type": "HookError"}
                )
                sock.sendall(_frame(b"X", json.dumps(error).encode()))
                return
            finally:
                del mats  # views of the buffer, which a later M frame may replace
            found = json.dumps([asdict(j) for j in jumps]).encode() if jumps else b""
            values = np.asarray(row, dtype=np.float64).tobytes()
            sock.sendall(_frame(b"V", _RESULT.pack(step, len(found)) + values + found))
        elif kind == b"B":
            measurer = Measurer(json.loads(body)["spec"])
        elif kind == b"M":
            (size,) = struct.unpack("<Q", body)
            fd = frames.fds.pop(0)
            if buffer is not None:
                buffer.close()
            buffer = mmap.mmap(fd, size)
            os.close(fd)
        elif kind == b"E":
            final = [asdict(j) for j in measurer.finish()] if measurer is not None else []
            sock.sendall(_frame(b"F", json.dumps(final).encode()))
            measurer = None
            if buffer is not None:  # each tracker gets a ring of its own size
                buffer.close()
                buffer = None


class _Child:
    """One forked worker process, the parent's end of its socket, and its shared buffer."""

    def __init__(self) -> None:
        ctx = mp.get_context("fork")
        self.sock, child_sock = socket.socketpair()
        self.frames = _Frames(self.sock)
        self.buffer: mmap.mmap | None = None
        inherited: list[Any] = [self.sock]
        for other in _LIVE:  # a fork copies every open socket and mapping: the child drops them
            inherited.append(other.sock)
            if other.buffer is not None:
                inherited.append(other.buffer)
        sys.stdout.flush()  # a fork copies unflushed buffers: they would print twice
        sys.stderr.flush()
        self.proc = ctx.Process(
            target=_child, args=(child_sock, inherited), name="hookscope-tracker", daemon=True
        )
        self.proc.start()
        child_sock.close()
        _LIVE.add(self)

    def send(self, data: bytes) -> None:
        """Send ``data``; while the socket is full, read the worker's results into the frame
        buffer (the worker may be waiting to send them: a blocking send would deadlock)."""
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view, socket.MSG_DONTWAIT) :]
            except BlockingIOError:
                readable, _, _ = select.select([self.sock], [self.sock], [])
                if readable:
                    self.frames.fill(wait=False)

    def ensure_buffer(self, size: int) -> None:
        """A shared buffer of at least ``size`` bytes (call with no step in flight)."""
        if self.buffer is not None and len(self.buffer) >= size:
            return
        fd = _shared_file(size)
        try:
            buffer = mmap.mmap(fd, size)
            socket.send_fds(self.sock, [_frame(b"M", struct.pack("<Q", size))], [fd])
        finally:
            os.close(fd)
        self.drop_buffer()
        self.buffer = buffer

    def drop_buffer(self) -> None:
        """Unmap the parent's side of the shared buffer (the child drops its side at E)."""
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            with contextlib.suppress(BufferError):  # a view still alive: unmapped when freed
                buffer.close()

    def discard(self) -> None:
        """End the process (a worker in an unknown state is not reused)."""
        _LIVE.discard(self)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.sock.close()
        self.drop_buffer()


_POOL_LOCK = threading.Lock()
_IDLE: list[tuple[_Child, float]] = []  # workers between trackers (and since when), reused
_LIVE: set[_Child] = set()


def _acquire(spec: dict) -> _Child:
    """An idle worker process (or a newly forked one) that has begun measuring for ``spec``.

    A worker idle for less than half :data:`IDLE_TIMEOUT` cannot have ended on its own (its
    clock started before the parent's), so it is reused without a round trip; an older one
    is replaced."""
    begin = _frame(b"B", json.dumps({"spec": spec}).encode())
    with _POOL_LOCK:
        while _IDLE:
            child, since = _IDLE.pop()
            if time.monotonic() - since < IDLE_TIMEOUT / 2 and child.proc.is_alive():
                try:
                    child.send(begin)
                    return child
                except (OSError, EOFError):  # it died just now (killed from outside): replaced
                    pass
            child.discard()
        child = _Child()
    child.send(begin)
    return child


def _release(child: _Child, reusable: bool) -> None:
    with _POOL_LOCK:
        if reusable and child.proc.is_alive() and len(_IDLE) < 2:
            _IDLE.append((child, time.monotonic()))
        else:
            child.discard()


def shutdown_workers() -> int:
    """End the idle worker processes now (they also end after :data:`IDLE_TIMEOUT` seconds
    idle, and with the interpreter); returns how many ended. Running trackers keep theirs."""
    with _POOL_LOCK:
        idle, _IDLE[:] = [child for child, _ in _IDLE], []
        for child in idle:
            child.discard()
    return len(idle)


atexit.register(shutdown_workers)  # idle workers end with the interpreter, sockets closed


def worker_processes() -> list[int]:
    """Process ids of the tracker worker processes alive now (idle or in use)."""
    with _POOL_LOCK:
        return [c.proc.pid for c in _LIVE if c.proc.is_alive()]


class _ProcessWorker:
    """The training thread's side: write each step into the shared ring at once, hand the
    steps over and read back the results that have arrived in batches of ``queue_size // 2``
    (two system calls per batch; no thread); ``submit`` waits for the worker only when
    ``queue_size`` steps are in flight."""

    def __init__(self, spec: dict, on_result: Callable, queue_size: int):
        self.on_result, self.queue_size = on_result, queue_size
        self.n_values = len(spec["names"]) * len(spec["metrics"])
        self.error: BaseException | None = None
        self.final: list[TrackedJump] | None = None
        self.pending: deque[tuple[int, tuple]] = deque()  # (step, extra) in flight, in order
        self.unsent: list[bytes] = []  # step frames written to the ring, not yet handed over
        self.batch = max(1, queue_size // 2)
        self.interrupted = False
        self.slot_bytes = 0
        self.next_slot = 0
        self.views: dict[int, tuple[tuple, list[Tensor]]] = {}  # slot -> (layout, tensors)
        self.child = _acquire(spec)
        self.proc = self.child.proc

    def _lost(self) -> None:
        if self.error is None:  # an error the worker sent first explains its end better
            self.error = errors.HookError(
                "the tracker's worker process ended unexpectedly (killed?); the steps measured "
                "so far are kept"
            )
        self.pending.clear()
        self.unsent.clear()

    def _send_failed(self) -> None:
        """The worker is gone: read what it sent before it went (an error frame explains
        it), then count it lost."""
        while self.error is None and self.pending:
            self._receive(wait=True)  # until its error, or the end of the stream
        self._lost()

    # -------------------------------------------------------------- results
    def _receive(self, wait: bool) -> bool:
        """Handle one frame from the worker; False if none was waiting (``wait=False``)."""
        try:
            frame = self.child.frames.next(wait)
        except EOFError:
            self._lost()
            return False
        if frame is None:
            return False
        kind, body = frame
        if kind == b"V":
            step, n_json = _RESULT.unpack_from(body)
            values = np.frombuffer(body, np.float64, self.n_values, _RESULT.size)
            found = json.loads(body[len(body) - n_json :]) if n_json else []
            expected, extra = self.pending.popleft()
            assert step == expected, (step, expected)
            self.on_result(step, values, [TrackedJump(**j) for j in found], extra)
        elif kind == b"F":
            self.final = [TrackedJump(**j) for j in json.loads(body)]
        elif kind == b"X":
            head = json.loads(body)
            self.error = getattr(errors, head["type"], errors.HookscopeError)(head["error"])
            self.pending.clear()
            self.unsent.clear()
        return True

    def _exchange(self, limit: int) -> None:
        """Hand over the unsent steps, then take results until fewer than ``limit`` steps
        are in flight, and those already waiting. Interrupted (Ctrl-C), the worker is not
        reused: close() still collects what it can, then ends it."""
        try:
            self._exchange_now(limit)
        except BaseException:
            self.interrupted = True
            raise

    def _exchange_now(self, limit: int) -> None:
        self._send_unsent()
        self._receive_until(limit)

    def _send_unsent(self) -> None:
        if self.unsent and self.error is None:
            frames, self.unsent = b"".join(self.unsent), []
            try:
                self.child.send(frames)
            except (OSError, EOFError):  # BrokenPipeError included
                self._send_failed()

    def _receive_until(self, limit: int) -> None:
        """Results until fewer than ``limit`` steps are in flight, then those waiting."""
        self._send_unsent()  # a step waited for must have been handed over
        while self.error is None and len(self.pending) >= limit:
            self._receive(wait=True)
        while self.error is None and self.pending and self._receive(wait=False):
            pass

    # -------------------------------------------------------------- steps
    def _slot_views(self, slot: int, layout: tuple) -> list[Tensor]:
        cached = self.views.get(slot)
        if cached is not None and cached[0] == layout:
            return cached[1]
        views, offset = [], slot * self.slot_bytes
        for dtype, shape in layout:
            n = math.prod(shape)
            if n == 0:  # nothing to copy (frombuffer refuses a count of 0); the worker says why
                views.append(torch.empty(shape, dtype=dtype))
                continue
            flat = torch.frombuffer(self.child.buffer, dtype=dtype, count=n, offset=offset)
            views.append(flat.view(shape))
            offset += n * dtype.itemsize
        self.views[slot] = (layout, views)  # the last layout only (lengths may vary per step)
        return views

    def submit(self, step: int, rows: list[Tensor], extra: tuple) -> None:
        """Copy one step into the next free slot of the ring; hand over a full batch."""
        if self.error is None and len(self.pending) >= self.queue_size:  # no free slot yet
            self._exchange(self.queue_size)
        if self.error is not None:
            return
        layout = tuple(
            (r.dtype if r.dtype in _CODE else torch.float32, tuple(r.shape)) for r in rows
        )
        need = sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout)
        if need > self.slot_bytes or self.child.buffer is None:  # first or larger: a new ring
            self._exchange(1)
            if self.error is not None:
                return
            self.views.clear()
            self.slot_bytes = max(64, need + (-need) % 64)
            self.child.ensure_buffer(self.slot_bytes * self.queue_size)
            self.next_slot = 0
        # the slot's last step was queue_size steps ago; fewer are in flight: it is done
        slot = self.next_slot
        self.next_slot = (slot + 1) % self.queue_size
        body = [_STEP.pack(step, slot * self.slot_bytes, len(rows))]
        for view, r, (dtype, shape) in zip(
            self._slot_views(slot, layout), rows, layout, strict=True
        ):
            view.copy_(r.detach())
            body.append(_ARRAY.pack(_CODE[dtype], len(shape)))
            body.append(struct.pack(f"<{len(shape)}q", *shape))
        self.unsent.append(_frame(b"S", b"".join(body)))
        self.pending.append((step, extra))
        if len(self.unsent) >= self.batch:
            self._exchange(self.queue_size)

    def flush(self) -> None:
        self._exchange(1)

    def close(self) -> list[TrackedJump]:
        reusable = False
        try:
            if self.interrupted:  # a frame may be half sent: wait a bounded time, then end it
                self.child.sock.settimeout(_AFTER_INTERRUPT)
            self._exchange(1)
            if self.error is None:
                self.child.send(_frame(b"E"))
                while self.final is None and self.error is None:
                    self._receive(wait=True)
                reusable = self.final is not None and not self.interrupted
        except (OSError, EOFError):
            self._lost()
        finally:  # after an error or an interrupt the worker's state is unknown: it ends
            self.views.clear()
            self.child.drop_buffer()
            _release(self.child, reusable)
        return self.final or []
