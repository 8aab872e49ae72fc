"""Where a tracker's metrics and jump detection run: a forked process, a thread, or inline.

:class:`Measurer` holds the work: for one logged step, the metrics of each layer's
``[rows, features]`` matrix (:func:`hookscope.analysis.dimensionality.layer_metrics`, numpy
path) and one push to the online jump detector. Three places to run it:

* ``"process"`` (default where ``fork`` exists, i.e. Linux and macOS): a worker process,
  forked by the first tracker of a Python session and reused by the later ones (it ends
  after :data:`IDLE_TIMEOUT` seconds without a tracker, with the interpreter, or at
  :func:`shutdown_workers`). At a logged step the training thread copies each layer's matrix
  once, into a shared-memory ring, and hands the step over (a few bytes saying where: in
  the ring's mailbox on x86-64, which the polling worker reads without any system call;
  elsewhere a few steps at a time over a socket); the worker measures with one BLAS thread
  and sends the values back, which the training thread reads when the ring is full and
  at flush/close (no thread of its own: a Python thread takes the interpreter lock that the
  training loop's many small torch calls wait on). Nothing is pickled.
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
import platform
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


def make_worker(
    backend: str, spec: dict, on_result: Callable, queue_size: int, batch: int | None = None
) -> Any:
    """The worker for ``backend``; ``on_result(step, row, jumps, extra)`` gets each result.
    ``batch``: logged steps the process worker hands over at once (default
    ``queue_size // 2``; 1 when logged steps are far apart)."""
    if backend == "process" and "fork" in mp.get_all_start_methods():
        return _ProcessWorker(spec, on_result, queue_size, batch)
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
#                    M <size, mailboxes, mailbox bytes> + an fd   the shared memory the
#                                           activations (and, on x86-64, the S bodies) go to
#                    S <step, offset, arrays: dtype, shape>   one logged step (not on x86-64:
#                                           there the body goes to the slot's mailbox, then
#                                           the step counter at offset 0 is bumped)
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
    """Frames read from a socket (with any file descriptors sent along, where ``fds``)."""

    def __init__(self, sock: socket.socket, fds: bool = True):
        self.sock, self.data, self.fds = sock, bytearray(), []
        # a side that gets no file descriptors reads into one reused buffer: a fresh 64 KiB
        # bytes object per read costs ~90 us of page faults on a virtual machine (measured)
        self.scratch = None if fds else bytearray(1 << 16)

    def _take(self) -> tuple[bytes, bytes] | None:
        if len(self.data) < 4:
            return None
        (n,) = _LEN.unpack_from(self.data)
        if len(self.data) < 4 + n:
            return None
        frame = bytes(self.data[4 : 4 + n])
        del self.data[: 4 + n]
        return frame[:1], frame[1:]

    def next(self, wait: bool = True, read: bool = True) -> tuple[bytes, bytes] | None:
        """The next frame; None if ``wait`` is False and none has fully arrived (or, with
        ``read=False``, none is in the buffer already). EOFError when the other side is gone."""
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            if not (wait or read) or not self.fill(wait):
                return None

    def fill(self, wait: bool) -> bool:
        """Read what has arrived into the buffer (waiting for something if ``wait``);
        False if nothing had."""
        flags = 0 if wait else socket.MSG_DONTWAIT
        ancillary: list = []
        try:
            if self.scratch is not None:
                n = self.sock.recv_into(self.scratch, len(self.scratch), flags)
                data = memoryview(self.scratch)[:n]
            else:  # (socket.recv_fds ignores its flags before Python 3.12: recvmsg directly)
                data, ancillary, _, _ = self.sock.recvmsg(1 << 16, _FD_SPACE, flags)
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


#: seconds a worker with a tracker polls every 0.1 ms, then every 0.5 ms until
#: POLL_WINDOW; later (mailboxes) every 5 ms, and every 50 ms after a second without a
#: step (the first step after a long pause waits that long), or blocked on the socket (frames)
POLL_WINDOW = 0.05
_NAPS = ((0.01, 1e-4), (POLL_WINDOW, 5e-4), (1.0, 5e-3), (math.inf, 5e-2))

# Where stores become visible to another core in program order (x86-64's total store order),
# the training thread hands a step over through the shared buffer itself: it writes the
# step's frame into the slot's mailbox, then bumps a counter that the polling worker reads;
# no system call. Elsewhere (ARM, whose stores may be seen out of order) steps go as frames
# over the socket.
MAILBOX = platform.machine().lower() in ("x86_64", "amd64")
_COUNTER = struct.Struct("<q")  # steps handed over through the mailboxes (buffer offset 0)
_MAIL = 64  # the first mailbox's offset
_M = struct.Struct("<QQQ")  # buffer size, number of mailboxes, bytes per mailbox (0: none)


class _Ring:
    """The worker's view of one shared buffer: the mailboxes' layout and the steps read."""

    def __init__(self, buffer: mmap.mmap, slots: int, mail: int):
        self.buffer, self.slots, self.mail, self.seen = buffer, slots, mail, 0

    def next_step(self) -> bytes | None:
        """The next step's frame body from the mailboxes, or None."""
        if not self.mail or _COUNTER.unpack_from(self.buffer, 0)[0] <= self.seen:
            return None
        at = _MAIL + (self.seen % self.slots) * self.mail
        (n,) = _LEN.unpack_from(self.buffer, at)
        self.seen += 1
        return bytes(self.buffer[at + 4 : at + 4 + n])


def _next_frame(frames: _Frames, ring: _Ring | None, polling: bool) -> tuple[bytes, bytes]:
    """The next step from the mailboxes, else the next frame from the parent.

    With ``polling`` (a tracker is running) the worker looks for either every 0.1 ms, then
    less often (:data:`_NAPS`), instead of blocking on the socket: handing a step to a process
    blocked in ``recv`` must wake it, which costs the training thread ~40 us per step on a
    virtual machine (measured), against ~7 us for a send to a worker that is not waiting
    there and nothing for a mailbox. Polling costs the worker's core a few per cent. Without
    mailboxes the worker blocks on the socket after :data:`POLL_WINDOW`.
    """
    start = None
    while True:
        body = ring.next_step() if ring is not None else None
        if body is not None:
            return b"S", body
        frame = frames.next(wait=False)
        if frame is not None:
            return frame
        now = time.monotonic()
        start = now if start is None else start
        idle = now - start
        if not polling or (idle > POLL_WINDOW and (ring is None or not ring.mail)):
            return frames.next()
        time.sleep(next(nap for until, nap in _NAPS if idle < until))


def _measure_step(body: bytes, buffer: mmap.mmap, measurer: Measurer, sock: socket.socket) -> bool:
    """Measure one step frame; send its values (True) or the error (False: the worker ends)."""
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
        return False
    finally:
        del mats  # views of the buffer, which a later M frame may replace
    found = json.dumps([asdict(j) for j in jumps]).encode() if jumps else b""
    values = np.asarray(row, dtype=np.float64).tobytes()
    sock.sendall(_frame(b"V", _RESULT.pack(step, len(found)) + values + found))
    return True


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
    ring: _Ring | None = None
    timeout: float | None = None
    while True:
        if timeout != (IDLE_TIMEOUT if measurer is None else None):
            timeout = IDLE_TIMEOUT if measurer is None else None
            sock.settimeout(timeout)
        try:
            kind, body = _next_frame(frames, ring, polling=measurer is not None)
        except (EOFError, TimeoutError):
            return  # the parent is gone, or idle too long (the next tracker forks a new one)
        if kind == b"S":
            if not _measure_step(body, ring.buffer, measurer, sock):
                return
        elif kind == b"B":
            measurer = Measurer(json.loads(body)["spec"])
        elif kind == b"M":
            size, slots, mail = _M.unpack(body)
            fd = frames.fds.pop(0)
            if ring is not None:
                ring.buffer.close()
            ring = _Ring(mmap.mmap(fd, size), slots, mail)
            os.close(fd)
        elif kind == b"E":  # sent after the last step was handed over: the mailboxes first
            while ring is not None and (body := ring.next_step()) is not None:
                if not _measure_step(body, ring.buffer, measurer, sock):
                    return
            final = [asdict(j) for j in measurer.finish()] if measurer is not None else []
            sock.sendall(_frame(b"F", json.dumps(final).encode()))
            measurer = None
            if ring is not None:  # each tracker gets a ring of its own size
                ring.buffer.close()
                ring = None


class _Child:
    """One forked worker process, the parent's end of its socket, and its shared buffer."""

    def __init__(self) -> None:
        ctx = mp.get_context("fork")
        self.sock, child_sock = socket.socketpair()
        self.frames = _Frames(self.sock, fds=False)
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

    def new_buffer(self, size: int, slots: int, mail: int) -> None:
        """A new shared buffer of ``size`` bytes with ``slots`` mailboxes of ``mail`` bytes
        (0: steps go as frames), zeroed; call with no step in flight."""
        fd = _shared_file(size)
        try:
            buffer = mmap.mmap(fd, size)
            socket.send_fds(self.sock, [_frame(b"M", _M.pack(size, slots, mail))], [fd])
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
    """The training thread's side: write each step into the shared ring at once and hand
    it over (mailbox, or socket frames in batches of ``batch``), read back the results when
    the ring is full (no thread); ``submit`` waits for the worker only when
    ``queue_size`` steps are in flight."""

    def __init__(self, spec: dict, on_result: Callable, queue_size: int, batch: int | None = None):
        self.on_result, self.queue_size = on_result, queue_size
        self.n_values = len(spec["names"]) * len(spec["metrics"])
        self.error: BaseException | None = None
        self.final: list[TrackedJump] | None = None
        self.pending: deque[tuple[int, tuple]] = deque()  # (step, extra) in flight, in order
        self.unsent: list[bytes] = []  # step frames written to the ring, not yet handed over
        self.batch = max(1, min(queue_size, batch or queue_size // 2))
        # the last step's (dtype, shape) per array -> (layout, its arrays' frame bytes)
        self.described: tuple[tuple, tuple, bytes] | None = None
        self.interrupted = False
        self.slot_bytes = 0
        self.next_slot = 0
        self.mail = 0  # bytes per mailbox (0: steps go as socket frames)
        self.data_base = 0  # offset of the first slot's arrays
        self.handed = 0  # steps handed over through the mailboxes of this buffer
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
    def _receive(self, wait: bool, read: bool = True) -> bool:
        """Handle one frame from the worker; False if none was waiting (``wait=False``; with
        ``read=False`` only a frame already read from the socket counts)."""
        try:
            frame = self.child.frames.next(wait, read)
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
            if not self.pending or self.pending[0][0] != step:
                # a step handed over by a submit that an interrupt stopped before it was
                # counted as pending: its result is not the caller's
                return True
            _, extra = self.pending.popleft()
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
        """Results until fewer than ``limit`` steps are in flight, then those already read.

        ``submit`` calls it only when the ring is full (each read costs the training thread
        a system call; jumps wait that long, which the checkpoint buffer's length allows
        for), so one read usually brings ``queue_size`` results."""
        self._send_unsent()  # a step waited for must have been handed over
        while self.error is None and len(self.pending) >= limit:
            self._receive(wait=True)
        while self.error is None and self.pending and self._receive(wait=False, read=False):
            pass

    # -------------------------------------------------------------- steps
    def _slot_views(self, slot: int, layout: tuple) -> list[Tensor]:
        cached = self.views.get(slot)
        if cached is not None and (cached[0] is layout or cached[0] == layout):
            return cached[1]
        views, offset = [], self.data_base + slot * self.slot_bytes
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
        key = tuple((r.dtype, r.shape) for r in rows)
        described = self.described
        if described is None or described[0] != key:  # a new layout (usually only the first)
            described = self._describe(key)
            if described is None:
                return
        layout, arrays = described[1], described[2]
        try:  # interrupted inside the handover, the worker is not reused (close() ends it)
            self._hand_over(step, rows, extra, layout, arrays)
        except BaseException:
            self.interrupted = True
            raise

    def _hand_over(
        self, step: int, rows: list[Tensor], extra: tuple, layout: tuple, arrays: bytes
    ) -> None:
        # the slot's last step was queue_size steps ago; fewer are in flight: it is done
        slot = self.next_slot
        self.next_slot = (slot + 1) % self.queue_size
        for view, r in zip(self._slot_views(slot, layout), rows, strict=True):
            view.copy_(r.detach())
        body = _STEP.pack(step, self.data_base + slot * self.slot_bytes, len(rows)) + arrays
        if self.mail:  # the frame into the slot's mailbox, then the counter (module comment)
            buffer, at = self.child.buffer, _MAIL + slot * self.mail
            buffer[at + 4 : at + 4 + len(body)] = body
            _LEN.pack_into(buffer, at, len(body))
            self.handed += 1
            _COUNTER.pack_into(buffer, 0, self.handed)
        else:
            self.unsent.append(_frame(b"S", body))
        self.pending.append((step, extra))
        if len(self.unsent) >= self.batch:
            self._send_unsent()

    def _describe(self, key: tuple) -> tuple[tuple, tuple, bytes] | None:
        """Layout and frame bytes of the arrays ``key`` describes; a larger ring first if
        they need it (None after a worker error)."""
        layout = tuple(
            (dtype if dtype in _CODE else torch.float32, tuple(shape)) for dtype, shape in key
        )
        need = sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout)
        arrays = b"".join(
            _ARRAY.pack(_CODE[dtype], len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
            for dtype, shape in layout
        )
        mail = 4 + _STEP.size + len(arrays) if MAILBOX else 0
        if need > self.slot_bytes or mail > self.mail or self.child.buffer is None:
            self._exchange(1)  # first or larger: a new ring, once every step is measured
            if self.error is not None:
                return None
            self.views.clear()
            self.slot_bytes = max(64, need + (-need) % 64)
            self.mail = mail + (-mail) % 64
            self.data_base = _MAIL + self.queue_size * self.mail
            self.child.new_buffer(
                self.data_base + self.slot_bytes * self.queue_size, self.queue_size, self.mail
            )
            self.next_slot = self.handed = 0
        self.described = (key, layout, arrays)
        return self.described

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
