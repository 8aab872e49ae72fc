"""Where a tracker's metrics and jump detection run: a forked process, a thread, or inline.

:class:`Measurer` holds the work: for one logged step, the metrics of each layer's
``[rows, features]`` matrix (:func:`hookscope.analysis.dimensionality.layer_metrics`, numpy
path) and one push to the online jump detector. Three places to run it:

* ``"process"`` (default where ``fork`` exists, i.e. Linux and macOS): a child process forked
  when the tracker starts. The training thread only copies each layer's matrix into a pipe
  (raw bytes with a JSON header; nothing is pickled); the child measures with one BLAS thread
  and sends back one JSON line per step. Python threads would share the interpreter lock
  with the training loop, whose many small torch calls then wait on it: measuring every step
  of the digits MLP's training made it 2.2x slower with a thread worker, 1.44x with the
  process (``benchmarks/bench_tracking.py --steps 1000``).
* ``"thread"``: a background thread (where there is no fork).
* ``"inline"`` (``background=False``): in the training thread, at ``log``.

Each keeps at most ``queue_size`` steps in flight (``log`` waits when the worker is that
far behind), so memory is bounded; results come back in step order. An error in the worker
(NaN activations, a dead process) is kept and raised in the training thread.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import signal
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from hookscope import errors
from hookscope.analysis.dimensionality import layer_metrics
from hookscope.tracking.online import OnlineJumps, TrackedJump

__all__ = ["Measurer", "make_worker", "BACKENDS"]

BACKENDS = ("process", "thread", "inline")
_HEADER = struct.Struct("<I")


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


class _InlineWorker:
    def __init__(self, spec: dict, on_result: Callable):
        self.measurer, self.on_result = Measurer(spec), on_result
        self.error: BaseException | None = None

    def submit(self, step: int, mats: list[np.ndarray], extra: tuple) -> None:
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
                    super().submit(*job)
            except BaseException as err:  # raised in the training thread by the tracker
                self.error = err
            finally:
                self.queue.task_done()

    def submit(self, step: int, mats: list[np.ndarray], extra: tuple) -> None:
        self.queue.put((step, mats, extra))

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> list[TrackedJump]:
        self.queue.put(None)
        self.thread.join()
        return [] if self.error is not None else self.measurer.finish()


# --------------------------------------------------------------------------- the process


def _send(conn: Any, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    conn.send_bytes(_HEADER.pack(len(head)) + head + payload)


def _recv(conn: Any) -> tuple[dict, memoryview]:
    data = memoryview(conn.recv_bytes())
    (n,) = _HEADER.unpack_from(data)
    return json.loads(bytes(data[4 : 4 + n])), data[4 + n :]


def _child(conn: Any, parent: Any, spec: dict) -> None:
    """The forked worker: receive steps, send results; numpy only (no torch calls)."""
    parent.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training loop's to handle
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # this process only: one BLAS thread beside the training
    except ImportError:  # threadpoolctl comes with scikit-learn; without it BLAS keeps its own
        pass
    measurer = Measurer(spec)
    while True:
        try:
            head, payload = _recv(conn)
        except EOFError:
            return
        if head.get("stop"):
            _send(conn, {"final": [asdict(j) for j in measurer.finish()]})
            return
        try:
            mats, offset = [], 0
            for shape, dtype in zip(head["shapes"], head["dtypes"], strict=True):
                n = int(np.prod(shape)) * np.dtype(dtype).itemsize
                mats.append(np.frombuffer(payload[offset : offset + n], dtype=dtype).reshape(shape))
                offset += n
            row, jumps = measurer.measure(head["step"], mats)
            _send(conn, {"step": head["step"], "row": row, "jumps": [asdict(j) for j in jumps]})
        except errors.HookscopeError as err:
            _send(conn, {"error": str(err), "type": type(err).__name__})
            return


class _ProcessWorker:
    def __init__(self, spec: dict, on_result: Callable, queue_size: int):
        ctx = mp.get_context("fork")
        self.conn, child_conn = ctx.Pipe()
        self.on_result, self.queue_size = on_result, queue_size
        self.error: BaseException | None = None
        self.final: list[TrackedJump] | None = None
        self.extras: dict[int, tuple] = {}
        self.inflight = 0
        self.cond = threading.Condition()
        sys.stdout.flush()  # a fork copies unflushed buffers: they would print twice
        sys.stderr.flush()
        self.proc = ctx.Process(
            target=_child, args=(child_conn, self.conn, spec), name="hookscope-tracker", daemon=True
        )
        self.proc.start()
        child_conn.close()
        self.reader = threading.Thread(
            target=self._read, name="hookscope-tracker-reader", daemon=True
        )
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                head, _ = _recv(self.conn)
            except (EOFError, OSError):
                with self.cond:
                    if self.final is None and self.error is None:
                        self.error = errors.HookError(
                            "the tracker's worker process ended unexpectedly (killed?); the steps "
                            "measured so far are kept"
                        )
                    self.inflight = 0
                    self.cond.notify_all()
                return
            if "final" in head:
                with self.cond:
                    self.final = [TrackedJump(**j) for j in head["final"]]
                    self.cond.notify_all()
                return
            if "error" in head:
                cls = getattr(errors, head["type"], errors.HookscopeError)
                with self.cond:
                    self.error = cls(head["error"])
                    self.inflight = 0
                    self.cond.notify_all()
                return
            step = head["step"]
            extra = self.extras.pop(step)
            self.on_result(step, head["row"], [TrackedJump(**j) for j in head["jumps"]], extra)
            with self.cond:
                self.inflight -= 1
                self.cond.notify_all()

    def submit(self, step: int, mats: list[np.ndarray], extra: tuple) -> None:
        with self.cond:
            while self.inflight >= self.queue_size and self.error is None:
                self.cond.wait()
            if self.error is not None:
                return
            self.inflight += 1
        self.extras[step] = extra
        arrays = [np.ascontiguousarray(m) for m in mats]
        head = {
            "step": step,
            "shapes": [list(a.shape) for a in arrays],
            "dtypes": [a.dtype.str for a in arrays],
        }
        try:
            _send(self.conn, head, b"".join(a.tobytes() for a in arrays))
        except (BrokenPipeError, OSError):
            with self.cond:
                self.inflight -= 1
                if self.error is None:
                    self.error = errors.HookError("the tracker's worker process is gone")

    def flush(self) -> None:
        with self.cond:
            while self.inflight > 0 and self.error is None:
                self.cond.wait()

    def close(self) -> list[TrackedJump]:
        self.flush()
        try:
            if self.error is None:
                _send(self.conn, {"stop": True})
                with self.cond:
                    while self.final is None and self.error is None:
                        if not self.cond.wait(timeout=60):
                            break
        except (BrokenPipeError, OSError):
            pass
        finally:
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.conn.close()
            self.reader.join(timeout=10)
        return self.final or []
