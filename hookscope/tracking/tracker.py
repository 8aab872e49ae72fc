"""The training-loop tracker: dimensionality metrics per layer, online jumps, checkpoints.

Two ways to get the activations it measures at a logged step ``s`` (``s % every == 0`` or
``log(s, force=True)``):

* ``inputs=None``: the training forward itself. While the tracker is entered, a recorder
  per tracked layer records the layer's tensor (detached: no autograd graph is kept) on the
  forwards before a due ``log``: on a module without parameters, buffers or forward hooks
  when the tracker starts (the activation modules that MLP and CNN ``neuron`` sites read) a
  wrapped ``forward``, which unlike a torch hook keeps the module on torch's fast call path
  and records the module's own output (a forward hook registered on it later, while the
  tracker runs, does not change what is measured; start the tracker after registering it);
  elsewhere a torch hook. For the other forwards the recorders are taken off the model and
  put back before the next due step, and forwards under ``torch.no_grad`` (an evaluation
  pass) are never recorded. The activations of step ``s`` come from the forward of step
  ``s``, i.e. from the weights before that step's update, while the checkpoint of step
  ``s`` is the state after it: the state that produced a jump's first new value is the
  checkpoint one step earlier.
* ``inputs=probe_batch``: a fixed batch, run at every due ``log`` under ``torch.no_grad`` in
  eval mode (the model's mode is restored after), so steps are comparable; no hook is on the
  model in between. The activations of step ``s`` come from the weights after its update.

The metrics (:func:`hookscope.analysis.dimensionality.layer_metrics`: one eigendecomposition
of the Gram matrix on the smaller side per layer, all metrics from it) and the online jump
detector (:mod:`hookscope.tracking.online`) run in a forked worker process by default, so that
the training step does not wait for them (:mod:`hookscope.tracking.worker`: the activations
go through shared memory, and the process is reused by the next tracker; ``background=
"thread"``, or ``False`` for the calling thread). At most ``queue_size`` logged steps are in
flight, which also bounds memory. Errors there (NaN activations, say) are raised by the next
``log`` or ``results`` call.

States for checkpoints are copied in the calling thread at logged steps on the
``checkpoint_every`` grid into a ring buffer (:mod:`hookscope.tracking.checkpoints`).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from hookscope.analysis.dimensionality import METRICS
from hookscope.errors import HookError, InputError
from hookscope.tracking.checkpoints import CheckpointFolder, Checkpoints, RingBuffer, _window
from hookscope.tracking.online import OnlineJumps, TrackedJump, jumps_frame
from hookscope.tracking.sites import CONV, as_rows, attention_mask, is_token_model, resolve_sites
from hookscope.tracking.worker import BACKENDS, make_worker

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Tracker", "DEFAULT_METRICS"]

DEFAULT_METRICS = ("stable_rank", "participation_ratio", "energy_rank", "nuclear_norm_ratio")


def _number(value: Any, name: str, later: bool = False) -> Any:
    """``value`` as a float (NaN for None); with ``later``, a one-element tensor is checked
    and kept (detached) for the caller to convert when the step's result is recorded."""
    if value is None:
        return math.nan
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise InputError(
                f"{name} must be a number or a one-element tensor; got shape {tuple(value.shape)}"
            )
        value = value.detach() if value.requires_grad else value
        return value if later else float(value)
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    raise InputError(
        f"{name} must be a number, a one-element tensor or None; got {type(value).__name__}"
    )


class Tracker:
    """Dimensionality of every tracked layer over training, with online jump detection.

    ``model``: an ``nn.Module`` (wrapped with :meth:`HookedModel.wrap`) or a HookedModel;
    ``sites``: ``"auto"`` (every hidden layer, :func:`hookscope.tracking.sites.auto_sites`),
    a selection (``"resid_post.*"``, ``"neuron.*"``) or addresses; ``every``: measure at
    training steps that are multiples of it; ``inputs``: a fixed probe batch, or None for
    the training forward (module docstring); ``metrics``: names from
    :data:`hookscope.analysis.dimensionality.METRICS`; ``center``/``energy``: as there;
    ``conv``: how a conv feature map becomes rows (:mod:`hookscope.tracking.sites`);
    ``jumps``: run the online detector (``jump_options`` override its settings,
    ``confirm`` = logged values after a jump before it is reported); ``checkpoints``: a
    folder for the states around each jump, ``keep_around_jumps=(before, after)`` in training
    steps, states taken every ``checkpoint_every`` steps (default ``every``) into a ring
    buffer in ``buffer`` ("memory" or "disk"); ``save_steps``: steps to save whatever
    happens (a plan from :func:`hookscope.tracking.plan_checkpoints` for a replayed run);
    ``grad_norms``: measure the gradient norm (total, and per top-level parameter group) at
    logged steps when ``log`` gets none; ``tensorboard``: a log folder for
    ``torch.utils.tensorboard``.
    """

    def __init__(
        self,
        model: Any,
        sites: Any = "auto",
        *,
        every: int = 1,
        inputs: Any = None,
        metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS,
        center: bool = True,
        energy: float = 0.9,
        conv: str = "flatten",
        jumps: bool = True,
        jump_options: dict | None = None,
        confirm: int = 10,
        checkpoints: Any = None,
        keep_around_jumps: tuple[int, int] = (10, 10),
        checkpoint_every: int | None = None,
        buffer: str = "memory",
        save_steps: Any = (),
        grad_norms: bool = False,
        tensorboard: Any = None,
        background: bool | str = True,
        queue_size: int = 8,
    ) -> None:
        from hookscope.model import HookedModel

        if isinstance(model, HookedModel):
            self.model = model
        elif isinstance(model, nn.Module):
            self.model = HookedModel.wrap(model)
        else:
            raise InputError(
                f"Tracker needs an nn.Module or a HookedModel; got {type(model).__name__}"
            )
        self.module: nn.Module = self.model.model
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise InputError(f"every must be a positive int (training steps); got {every!r}")
        if isinstance(metrics, str) or not metrics:
            raise InputError(
                f"metrics must be a non-empty tuple of names from {', '.join(METRICS)}"
            )
        for name in metrics:
            if name not in METRICS:
                from hookscope.errors import suggestion

                raise InputError(
                    f"unknown metric {name!r}; choose from {', '.join(METRICS)}."
                    + suggestion(str(name), METRICS)
                )
        if conv not in CONV:
            raise InputError(f"conv must be one of {', '.join(CONV)}; got {conv!r}")
        if isinstance(energy, bool) or not (isinstance(energy, (int, float)) and 0 < energy <= 1):
            raise InputError(f"energy must be in (0, 1]; got {energy!r}")
        if buffer not in ("memory", "disk"):
            raise InputError(f"buffer must be 'memory' or 'disk'; got {buffer!r}")
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 1:
            raise InputError(f"queue_size must be a positive int; got {queue_size!r}")
        self.sites = resolve_sites(self.model, sites)
        self._tokens = is_token_model(self.model)
        self._mask = attention_mask(inputs)  # padded positions of a probe batch are not samples
        self.names = [str(a) for a in self.sites]
        self.every, self.inputs = every, inputs
        self.metrics, self.center, self.energy, self.conv = (
            tuple(metrics),
            bool(center),
            float(energy),
            conv,
        )
        self.grad_norms = bool(grad_norms)
        self.before, self.after = _window(keep_around_jumps)
        self.checkpoint_every = every if checkpoint_every is None else checkpoint_every
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise InputError(f"checkpoint_every must be a positive int; got {checkpoint_every!r}")
        try:
            steps = list(save_steps)
        except TypeError:
            steps = [save_steps]
        if not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in steps
        ):
            raise InputError(f"save_steps must be training steps (ints >= 0); got {save_steps!r}")
        self.save_steps = {int(s) for s in steps}
        if len(set(metrics)) != len(metrics):
            raise InputError(f"metrics names a metric twice: {list(metrics)}")
        if jump_options is not None and not isinstance(jump_options, Mapping):
            raise InputError(
                f"jump_options must be a dict of detector settings; got {jump_options!r}"
            )
        series = [(site, m) for site in self.names for m in self.metrics]
        self.detector = (
            OnlineJumps(series, confirm=confirm, **(jump_options or {})) if jumps else None
        )
        self.queue_size = queue_size
        if background is True:
            background = "process"
        elif background is False:
            background = "inline"
        if background not in BACKENDS:
            raise InputError(
                f"background must be True, False or one of {', '.join(BACKENDS)}; got {background!r}"
            )
        self.backend = background
        self._spec = {
            "names": self.names,
            "metrics": list(self.metrics),
            "center": self.center,
            "energy": self.energy,
            "detector": None
            if self.detector is None
            else {"confirm": self.detector.confirm, "options": dict(self.detector.options)},
        }
        self._worker = None
        self._raised = False
        self._writer = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise InputError(
                    f"tensorboard= needs the tensorboard package ({err}); pip install tensorboard"
                ) from None
            self._writer = SummaryWriter(log_dir=str(tensorboard))
        # checkpoints: a ring buffer long enough to reach back `before` steps from the moment
        # a jump is confirmed (confirm logged values later, plus the queue's delay)
        self.folder: CheckpointFolder | None = None
        self.ring: RingBuffer | None = None
        if checkpoints is not None or self.save_steps:
            if checkpoints is None:
                raise InputError("save_steps= needs checkpoints= (the folder to save them in)")
            lag = (confirm + queue_size + 2) * every if jumps else 0
            size = (self.before + lag) // self.checkpoint_every + 1
            self.folder = CheckpointFolder(
                checkpoints,
                self.module,
                {
                    "window": [self.before, self.after],
                    "checkpoint_every": self.checkpoint_every,
                    "buffer": {
                        "states": size,
                        "bytes": size
                        * sum(
                            t.numel() * t.element_size() for t in self.module.state_dict().values()
                        ),
                        "where": buffer,
                    },
                },
            )
            self.ring = RingBuffer(self.module, size, buffer)  # after the folder is checked
        # no checkpoint work at any step: log() of a step that is not due has nothing to do
        self._plain = self.ring is None and not self.save_steps
        # results
        # per measured step: (step, its sites x metrics values, (loss, grad_norm))
        self._measured: list[tuple[int, Any, tuple]] = []
        self._group_norms: list[dict[str, float]] = []
        self._jumps: list[TrackedJump] = []
        self._handled = 0  # jumps handed to the checkpoint folder
        self._lock = threading.Lock()
        self._last_step: float | None = None
        self._stride: int | None = None  # the hooks stay armed until two logs show it
        self._installed = None
        self._armed = False
        self._run = None
        self._entered = False
        self._closed = False
        self.torch_seed = torch.initial_seed()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Tracker:
        self.start()
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> bool:
        self.close(raise_errors=exc_type is None)  # the block's own error comes first
        return False

    def start(self) -> Tracker:
        """Install the hooks (``inputs=None``) and start the worker; ``with tracker:`` calls it."""
        if self._closed:
            raise HookError("this tracker is closed; make a new Tracker for another run")
        if self._entered:
            raise HookError("this tracker is already started (a with-block or start() is active)")
        if self.inputs is None:
            from hookscope.hooks import Run, installed, wire

            self._slots = [a.slot for a in self.sites]
            self._run = Run(grad_only=True)
            plans = self.model.planner.plans((), record=self._slots)
            hooks = installed(self.module, wire(plans), self._run, wrap_recorders=True)
            hooks.__enter__()  # removes what it registered itself if interrupted
            self._installed = hooks
            self._armed = True  # the first forward may be step 0's
        try:
            # logged steps far apart go to the worker one by one (it would idle otherwise)
            batch = max(1, (self.queue_size // 2) // self.every)
            self._worker = make_worker(
                self.backend, self._spec, self._record, self.queue_size, batch
            )
        except BaseException:
            self.close(raise_errors=False)
            raise
        self._entered = True
        return self

    def close(self, raise_errors: bool = True) -> None:
        """Remove the hooks, finish the worker (every queued step is measured), close files;
        then raise an error the worker met (unless ``raise_errors=False``)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._installed is not None:
                self._installed.__exit__(None, None, None)
                self._installed = None
        finally:
            try:
                self._finish_worker()
            finally:
                if self.ring is not None:
                    self.ring.close()
                if self._writer is not None:
                    self._writer.close()
        if raise_errors:
            self._raise_pending()

    def _finish_worker(self) -> None:
        if self._worker is not None:
            self._accept(self._worker.close())
        self._handle_new_jumps()

    # ------------------------------------------------------------------ logging
    def arm(self) -> None:
        """Record the next training forward even if its step is not due (before a
        ``log(step, force=True)`` with ``inputs=None``)."""
        if self._run is not None and self._entered and not self._closed:
            self._set_armed(True)

    def _set_armed(self, armed: bool) -> None:
        """Put the recording hooks on for the next training forwards, or take them off."""
        if armed != self._armed:
            self._armed = armed
            (self._installed.resume if armed else self._installed.suspend)()

    def due(self, step: int) -> bool:
        """Whether ``log(step)`` measures (``step`` a multiple of ``every``)."""
        return step % self.every == 0

    def log(self, step: int, loss: Any = None, grad_norm: Any = None, force: bool = False) -> None:
        """Record training ``step`` (call it after the step's update). Measures when
        ``step % every == 0`` or ``force``; ``loss``/``grad_norm``: numbers or one-element
        tensors (read only at measured steps)."""
        if (  # the common case first: a step that is not measured, in a regular stride
            not force
            and type(step) is int
            and self._plain
            and self._entered
            and not self._closed
            and not self._raised
            and self._worker.error is None
            and self._last_step is not None
            and step - self._last_step == self._stride
            and step % self.every
        ):
            self._last_step = step
            if self._run is not None:
                self._run.acts.clear()
                self._set_armed((step + self._stride) // self.every > step // self.every)
            return
        self._raise_pending()
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
            raise InputError(f"step must be an int (the training step); got {step!r}")
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise InputError(f"steps must increase; got step {step} after step {self._last_step}")
        if self.inputs is None and not self._entered:
            raise HookError(
                "inputs=None measures the training forward, which needs the tracker's hooks: "
                "use `with tracker:` around the loop (or tracker.start() ... tracker.close())"
            )
        if self._closed:
            raise HookError("this tracker is closed; make a new Tracker for another run")
        if self._raised:
            raise HookError(
                "this tracker stopped measuring after the error it raised earlier; the steps "
                "measured before it are in results()"
            )
        loss_value = _number(loss, "loss", later=True) if force or self.due(step) else math.nan
        if self._last_step is not None:
            self._stride = step - int(self._last_step)
        self._last_step = step
        if self.ring is not None and step % self.checkpoint_every == 0:
            self.ring.push(step, self.module)
            self.folder.offer(step, self.ring)
        if step in self.save_steps:
            self.folder.save_now(step, self.module.state_dict())
        if force or self.due(step):
            acts = self._activations(step)
            if acts is not None:
                rows = [
                    as_rows(acts[name], self.conv, self._tokens, self._mask) for name in self.names
                ]
                self._worker.submit(step, rows, (loss_value, self._grad_norm(grad_norm, step)))
        if self._run is not None:  # the hooks record only the forwards before a due log
            self._run.acts.clear()
            stride = self._stride
            self._set_armed(stride is None or (step + stride) // self.every > step // self.every)
        self._handle_new_jumps()

    def _activations(self, step: int) -> dict[str, Tensor] | None:
        if self.inputs is not None:
            was = self.module.training
            self.module.eval()
            try:
                _, cache = self.model.run_with_cache(self.inputs, names=self.sites)
            finally:
                self.module.train(was)
            return {name: cache[a] for name, a in zip(self.names, self.sites, strict=True)}
        acts = {}
        for name, slot in zip(self.names, self._slots, strict=True):
            value = self._run.acts.get(slot)
            if value is not None:
                acts[name] = value
        if len(acts) == len(self.names):
            return acts
        # no armed forward since the last log: this step is skipped, said so, and the hooks
        # stay on for the forwards up to the next log
        self._stride = 10**9
        warnings.warn(
            f"step {step} was not measured: no training forward ran with the tracker's hooks "
            "armed since the previous log() (force=True without tracker.arm() before the "
            "forward, or log() skipping steps irregularly?); the hooks stay on until the next "
            "log()",
            stacklevel=3,
        )
        return None

    def _grad_norm(self, given: Any, step: int) -> float:
        if given is not None or not self.grad_norms:
            return _number(given, "grad_norm")
        named = [(n, p.grad) for n, p in self.module.named_parameters() if p.grad is not None]
        if not named:
            return math.nan
        norms = torch._foreach_norm([g.detach() for _, g in named])
        squares: dict[str, float] = {}
        for (name, _), norm in zip(named, norms, strict=True):
            group = name.split(".")[0] if "." in name else "(root)"
            squares[group] = squares.get(group, 0.0) + float(norm) ** 2
        with self._lock:
            self._group_norms.append(
                {"step": step, **{g: math.sqrt(v) for g, v in squares.items()}}
            )
        return math.sqrt(sum(squares.values()))

    # ------------------------------------------------------------------ the worker
    def _record(self, step: int, row: list[float], jumps: list[TrackedJump], extra: tuple) -> None:
        """A measured step from the worker (any thread): keep it, log it, take its jumps."""
        loss = float(extra[0])  # a loss tensor is not kept past its step's result
        with self._lock:
            self._measured.append((step, row, (loss, extra[1])))
        if self._writer is not None:
            values = np.asarray(row, dtype=float).reshape(len(self.names), len(self.metrics))
            for i, name in enumerate(self.names):
                for j, metric in enumerate(self.metrics):
                    self._writer.add_scalar(f"{metric}/{name}", values[i, j], step)
            if not math.isnan(loss):
                self._writer.add_scalar("loss", loss, step)
        if jumps:
            self._accept(jumps)

    def _accept(self, found: list[TrackedJump]) -> None:
        if not found:
            return
        with self._lock:
            self._jumps += found
        if self._writer is not None:
            for j in found:
                sign = 1.0 if j.direction == "up" else -1.0
                self._writer.add_scalar(f"jumps/{j.metric}/{j.site}", sign * j.magnitude, j.step)
                self._writer.add_text(
                    "jumps",
                    f"step {j.step}: {j.metric} of {j.site} {j.direction} by {j.magnitude:.4g}",
                    j.step,
                )

    def _handle_new_jumps(self) -> None:
        """Hand jumps confirmed since the last call to the checkpoint folder (caller's thread)."""
        if self.folder is None:
            return
        with self._lock:
            new = self._jumps[self._handled :]
            self._handled = len(self._jumps)
        for j in new:
            first = max(0, int(j.step) - self.before)
            first += (-first) % self.checkpoint_every
            window = range(first, int(j.step) + self.after + 1, self.checkpoint_every)
            self.folder.add_jump(j, window, self.ring)

    def _raise_pending(self) -> None:
        """Raise the worker's error once (later calls to log() say the tracker stopped)."""
        worker = self._worker
        if worker is not None and worker.error is not None and not self._raised:
            self._raised = True
            raise worker.error

    def flush(self) -> None:
        """Wait until every logged step is measured (results() and close() call it)."""
        if self._worker is not None and not self._closed:
            self._worker.flush()
        self._raise_pending()

    # ------------------------------------------------------------------ results
    def results(self) -> pd.DataFrame:
        """Long frame: step, site, metric, value, loss, grad_norm (one row per value)."""
        self.flush()
        with self._lock:
            measured = list(self._measured)
        n_s, n_m = len(self.names), len(self.metrics)
        steps = [m[0] for m in measured]
        values = np.asarray([m[1] for m in measured], dtype=float).reshape(len(steps), n_s, n_m)
        loss = [m[2][0] for m in measured]
        grad = [m[2][1] for m in measured]
        frame = pd.DataFrame(
            {
                "step": np.repeat(np.asarray(steps, dtype=np.int64), n_s * n_m),
                "site": np.tile(np.repeat(np.asarray(self.names, dtype=object), n_m), len(steps)),
                "metric": np.tile(np.asarray(self.metrics, dtype=object), len(steps) * n_s),
                "value": values.reshape(-1).astype(float),
                "loss": np.repeat(np.asarray(loss, dtype=float), n_s * n_m),
                "grad_norm": np.repeat(np.asarray(grad, dtype=float), n_s * n_m),
            }
        )
        return frame

    def to_pandas(self) -> pd.DataFrame:
        """The same as :meth:`results`."""
        return self.results()

    def jumps(self, metric: str | None = None, site: str | None = None) -> list[TrackedJump]:
        """Jumps found online, in training steps; optionally of one metric and/or site."""
        if metric is not None and metric not in self.metrics:
            raise InputError(
                f"metric {metric!r} is not tracked; tracked: {', '.join(self.metrics)}"
            )
        if site is not None and str(site) not in self.names:
            raise InputError(f"site {site!r} is not tracked; tracked: {', '.join(self.names)}")
        self.flush()
        with self._lock:
            found = list(self._jumps)
        return sorted(
            (
                j
                for j in found
                if (metric is None or j.metric == metric) and (site is None or j.site == str(site))
            ),
            key=lambda j: (j.step, j.site, j.metric),
        )

    def jump_table(self) -> pd.DataFrame:
        """The jumps as a frame: step, site, metric, magnitude, z, direction, confirmed_at."""
        return jumps_frame(self.jumps())

    def grad_norm_table(self) -> pd.DataFrame:
        """Measured gradient norms per top-level parameter group (``grad_norms=True``)."""
        with self._lock:
            rows = list(self._group_norms)
        return pd.DataFrame(rows)

    def checkpoints(self) -> Checkpoints:
        """The states saved around jumps (and ``save_steps``), loadable with ``.load(step, model)``."""
        if self.folder is None:
            raise InputError("this tracker saves no checkpoints; pass checkpoints='folder/'")
        self.flush()
        self._handle_new_jumps()
        return Checkpoints(self.folder.folder)

    @property
    def buffer_bytes(self) -> int:
        """Memory (or scratch disk) of the checkpoint ring buffer when full; 0 without one."""
        return 0 if self.ring is None else self.ring.bytes

    def meta(self) -> dict[str, Any]:
        """Settings, versions and the torch seed, for exported files."""
        import hookscope

        return {
            "hookscope": hookscope.__version__,
            "torch": torch.__version__,
            "torch_initial_seed": self.torch_seed,
            "model": type(self.module).__name__,
            "sites": self.names,
            "metrics": list(self.metrics),
            "every": self.every,
            "inputs": "training forward"
            if self.inputs is None
            else "probe batch (eval mode, no_grad)",
            "center": self.center,
            "energy": self.energy,
            "conv": self.conv,
            "jump_detector": None
            if self.detector is None
            else {
                **self.detector.options,
                "scales": list(self.detector.scales),
                "confirm": self.detector.confirm,
                "causal": True,
            },
        }

    def export(self, path: Any) -> Any:
        """Write results, jumps and :meth:`meta` to ``.parquet``, ``.csv``, ``.json`` or ``.h5``."""
        from hookscope.tracking.files import export

        return export(self.results(), path, meta=self.meta(), jumps=self.jump_table())

    def get_results(self, layer_name: str | None = None) -> Any:
        """The dimensionality-tracking project's view: ``{site: DataFrame}`` with columns
        step, stable_rank, participation_ratio, cumulative_90, nuclear_norm_ratio, loss,
        grad_norm (``cumulative_90`` is ``energy_rank`` at ``energy=0.9``); one frame with
        ``layer_name``."""
        from hookscope.tracking.ndt import ndt_view

        view = ndt_view(self.results())
        if layer_name is None:
            return view
        if str(layer_name) not in view:
            raise InputError(f"unknown layer {layer_name!r}; tracked: {', '.join(view)}")
        return view[str(layer_name)]

    def plot(self, kind: str = "lines", metric: str | None = None) -> Figure:
        """``"lines"``: each metric over steps, one line per layer, jumps marked;
        ``"heatmap"``: one metric (default the first) as layer x step."""
        from hookscope.tracking.plots import heatmap, lines

        if kind not in ("lines", "heatmap"):
            raise InputError(f"kind must be 'lines' or 'heatmap'; got {kind!r}")
        if metric is not None and metric not in self.metrics:
            raise InputError(
                f"metric {metric!r} is not tracked; tracked: {', '.join(self.metrics)}"
            )
        frame, jumps = self.results(), self.jump_table()
        if kind == "heatmap":
            return heatmap(frame, jumps, metric or self.metrics[0])
        return lines(frame, jumps, [metric] if metric else list(self.metrics))

    def __repr__(self) -> str:
        with self._lock:
            n, n_jumps = len(self._measured), len(self._jumps)
        mode = "training forward" if self.inputs is None else "probe batch"
        head = (
            f"Tracker({len(self.names)} sites: {', '.join(self.names)}; every {self.every} steps "
            f"on the {mode}; {n} measured steps, {n_jumps} jumps"
        )
        if self.ring is not None:
            head += f"; ring buffer {self.ring.size} states = {self.ring.bytes / 2**20:.1f} MiB"
        return head + ")"
