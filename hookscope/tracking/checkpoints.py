"""Model states around jumps: a ring buffer during training, a folder of safetensors after.

Disk format (``checkpoints="ckpt/"``), version 1:

* ``step_000123.safetensors``: the model's ``state_dict`` (parameters and buffers) as it was
  when ``tracker.log(123)`` was called, i.e. after that step's optimiser update;
* ``index.json``: ``{"format": "hookscope.tracking.checkpoints", "version": 1, "model":
  class name, "window": [before, after], "checkpoint_every", "buffer": {"states", "bytes",
  "where"}, "steps": [{"step", "file", "sha256", "bytes", "jumps": [jump ids]}], "jumps":
  [{"id", "step", "site", "metric", "magnitude", "z", "direction", "confirmed_at"}]}``.

Every file is written to a temporary name in the folder, fsynced and moved into place
(``os.replace``), the index last: after a crash (``kill -9``) a reader sees the previous
complete index and only complete files.

The ring buffer holds the last ``K`` states (CPU copies in preallocated tensors, or
safetensors files in a scratch folder with ``where="disk"``); ``K`` follows from the window
and the detector's confirmation delay, so its memory is ``K x`` the state's size, stated as
:attr:`RingBuffer.bytes` before training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from hookscope.errors import InputError
from hookscope.store.files import atomic_write

if TYPE_CHECKING:
    from hookscope.tracking.online import TrackedJump

__all__ = ["RingBuffer", "CheckpointFolder", "Checkpoints", "plan_checkpoints", "FORMAT"]

FORMAT = "hookscope.tracking.checkpoints"
VERSION = 1


def _state_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The module's parameters and buffers as ``state_dict`` names them (live tensors)."""
    return [(k, v) for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, Tensor)]


class RingBuffer:
    """The last ``size`` model states, keyed by training step.

    ``where="memory"``: CPU tensors allocated once and overwritten in turn (one copy per
    tensor per snapshot, no allocation). ``where="disk"``: one safetensors file per slot in
    a scratch folder (removed by :meth:`close`).
    """

    def __init__(self, module: nn.Module, size: int, where: str = "memory"):
        if where not in ("memory", "disk"):
            raise InputError(f"buffer must be 'memory' or 'disk'; got {where!r}")
        self.tensors = _state_tensors(module)
        self.signature = [(k, t.shape, t.dtype) for k, t in self.tensors]
        self.size, self.where = int(size), where
        self.state_bytes = sum(t.numel() * t.element_size() for _, t in self.tensors)
        self.steps: OrderedDict[int, int] = OrderedDict()  # step -> slot
        self._next = 0
        self._scratch: Path | None = None
        self._slots: list[list[Tensor]] = []
        if where == "memory":
            self._slots = [
                [torch.empty(t.shape, dtype=t.dtype, device="cpu") for _, t in self.tensors]
                for _ in range(self.size)
            ]
        else:
            self._scratch = Path(tempfile.mkdtemp(prefix="hookscope-ring-"))

    @property
    def bytes(self) -> int:
        """Memory (or scratch disk) the buffer holds when full."""
        return self.size * self.state_bytes

    def push(self, step: int, module: nn.Module) -> None:
        """Copy the module's current state in, replacing the oldest."""
        now = _state_tensors(module)  # .to()/.double() replace tensors: read them every time
        if [(k, t.shape, t.dtype) for k, t in now] != self.signature:
            raise InputError(
                "the model's state changed its names, shapes or dtypes after the Tracker was "
                "built (model.to(dtype) / .double() / a new layer?); build the Tracker after "
                "moving the model"
            )
        self.tensors = now
        if len(self.steps) == self.size:
            self.steps.popitem(last=False)
        slot = self._next
        self._next = (self._next + 1) % self.size
        if self.where == "memory":
            torch._foreach_copy_(self._slots[slot], [t.detach() for _, t in self.tensors])
        else:
            from safetensors.torch import save_file

            state = {k: t.detach().to("cpu").contiguous() for k, t in self.tensors}
            save_file(state, str(self._scratch / f"slot_{slot}.safetensors"))
        self.steps[step] = slot

    def state(self, step: int) -> dict[str, Tensor]:
        """The state saved at ``step`` (a KeyError when it has left the buffer)."""
        slot = self.steps[step]
        if self.where == "memory":
            return {k: t for (k, _), t in zip(self.tensors, self._slots[slot], strict=True)}
        from safetensors.torch import load_file

        return load_file(str(self._scratch / f"slot_{slot}.safetensors"))

    def close(self) -> None:
        self._slots = []
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


class CheckpointFolder:
    """Writes the states around confirmed jumps into a folder (format in the module doc)."""

    def __init__(self, folder: str | os.PathLike[str], module: nn.Module, settings: dict):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"checkpoints={str(folder)!r} is a file; give a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = type(module).__name__
        self.settings = settings
        self.saved: dict[int, dict[str, Any]] = {}
        self.jumps: list[dict[str, Any]] = []
        self.wanted: dict[int, set[int]] = {}  # future step -> jump ids waiting for it
        self._written: set[int] = set()  # steps this run wrote
        index = self.folder / "index.json"
        if index.exists():  # a resumed run keeps what an earlier run saved here
            try:
                old = json.loads(index.read_text())
            except json.JSONDecodeError as err:
                raise InputError(
                    f"{index} is not valid JSON ({err}); choose another folder"
                ) from None
            if not isinstance(old, dict) or old.get("format") != FORMAT:
                raise InputError(
                    f"{self.folder} holds an index.json that is not a hookscope checkpoint "
                    f"index; choose an empty folder"
                )
            if old.get("model") != self.model:
                raise InputError(
                    f"{self.folder} holds checkpoints of a {old.get('model')}, not of this "
                    f"{self.model}; choose another folder"
                )
            self.saved = {int(e["step"]): e for e in old["steps"]}
            self.jumps = list(old["jumps"])
        else:
            self._write_index()  # an empty folder is a valid (empty) checkpoint folder

    def add_jump(self, jump: TrackedJump, window: range, buffer: RingBuffer) -> None:
        """Save the buffered states in ``window`` now; remember the later ones."""
        jid = len(self.jumps)
        self.jumps.append({"id": jid, **{k: getattr(jump, k) for k in _JUMP_KEYS}})
        for step in window:
            if step in buffer.steps:
                self._save(step, buffer.state(step), jid)
            elif step > max(buffer.steps, default=-1):
                self.wanted.setdefault(step, set()).add(jid)
        self._write_index()

    def offer(self, step: int, buffer: RingBuffer) -> None:
        """A new state entered the buffer: save it if a jump's window wants it."""
        ids = self.wanted.pop(step, None)
        if ids:
            for jid in sorted(ids):
                self._save(step, buffer.state(step), jid)
            self._write_index()
        for old in [s for s in self.wanted if s < step]:  # never logged: nothing to save
            self.wanted.pop(old)

    def save_now(self, step: int, state: dict[str, Tensor]) -> None:
        """Save ``state`` as step ``step`` (planned checkpoints of a replayed run)."""
        self._save(step, state, None)
        self._write_index()

    def _save(self, step: int, state: dict[str, Tensor], jid: int | None) -> None:
        entry = self.saved.get(step)
        if entry is None or step not in self._written:  # a resumed run's state replaces the old
            from safetensors.torch import save

            name = f"step_{step:09d}.safetensors"
            tensors = {k: t.detach().to("cpu").contiguous() for k, t in state.items()}
            data = save(tensors, metadata={"step": str(step)})
            atomic_write(self.folder / name, lambda f: f.write(data))
            digest = hashlib.sha256(data).hexdigest()
            jumps = [] if entry is None else entry["jumps"]
            entry = {
                "step": step,
                "file": name,
                "sha256": digest,
                "bytes": len(data),
                "jumps": jumps,
            }
            self.saved[step] = entry
            self._written.add(step)
        if jid is not None and jid not in entry["jumps"]:
            entry["jumps"].append(jid)

    def _write_index(self) -> None:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            **self.settings,
            "steps": [self.saved[s] for s in sorted(self.saved)],
            "jumps": self.jumps,
        }
        data = json.dumps(doc, indent=1, default=float).encode()
        atomic_write(self.folder / "index.json", lambda f: f.write(data))


_JUMP_KEYS = ("step", "site", "metric", "magnitude", "z", "direction", "confirmed_at")


class Checkpoints:
    """A checkpoint folder written by a :class:`~hookscope.tracking.Tracker` (read-only).

    >>> ck = hs.tracking.Checkpoints("ckpt/")          # or tracker.checkpoints()
    >>> ck.steps; ck.to_pandas(); ck.state(120); ck.load(120, model)
    """

    def __init__(self, folder: str | os.PathLike[str]):
        path = Path(folder) / "index.json"
        if not path.is_file():
            raise InputError(f"{folder} has no index.json: not a hookscope checkpoint folder")
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise InputError(
                f"{path} is format {index.get('format')!r} version {index.get('version')!r}; "
                f"expected {FORMAT!r} version {VERSION}"
            )
        self.folder, self.index = Path(folder), index

    @property
    def steps(self) -> list[int]:
        return [int(e["step"]) for e in self.index["steps"]]

    def to_pandas(self) -> pd.DataFrame:
        """One row per saved state: step, file, bytes, and the jumps whose window it is in."""
        jumps = {j["id"]: j for j in self.index["jumps"]}
        rows = []
        for e in self.index["steps"]:
            near = [jumps[i] for i in e["jumps"]]
            rows.append(
                {
                    "step": e["step"],
                    "file": e["file"],
                    "bytes": e["bytes"],
                    "jumps": ", ".join(f"{j['metric']}@{j['site']}:{j['step']}" for j in near),
                }
            )
        return pd.DataFrame(rows, columns=["step", "file", "bytes", "jumps"])

    def jumps(self) -> pd.DataFrame:
        """The jumps whose windows were saved."""
        return pd.DataFrame(self.index["jumps"], columns=["id", *_JUMP_KEYS])

    def state(self, step: int) -> dict[str, Tensor]:
        """The saved state dict of ``step`` (checked against its sha256 first)."""
        entry = next((e for e in self.index["steps"] if int(e["step"]) == int(step)), None)
        if entry is None:
            raise InputError(f"no checkpoint at step {step}; saved steps: {self.steps}")
        path = self.folder / entry["file"]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise InputError(f"{path} does not match its sha256 in index.json (damaged file)")
        from safetensors.torch import load

        return load(data)

    def states(self) -> dict[int, dict[str, Tensor]]:
        """Every saved state, by step (for ``hs.tracking.analysis.gradient_flow``)."""
        return {step: self.state(step) for step in self.steps}

    def activations(
        self, model: Any, inputs: Any, site: Any, conv: str = "flatten"
    ) -> dict[int, np.ndarray]:
        """``site``'s ``[rows, features]`` activations on ``inputs`` at every saved step (a
        copy of ``model`` holds each state in turn; eval mode, no grad), for
        ``subspace_evolution`` and ``disentanglement``. Rows follow the tracker's
        conventions (:mod:`hookscope.tracking.sites`)."""
        from hookscope.model import HookedModel
        from hookscope.tracking.sites import CONV, as_rows, attention_mask, is_token_model

        if conv not in CONV:
            raise InputError(f"conv must be one of {', '.join(CONV)}; got {conv!r}")
        if not self.steps:
            raise InputError(f"{self.folder} holds no saved states")
        twin = self.load(self.steps[0], model)
        hooked = twin if isinstance(twin, HookedModel) else HookedModel.wrap(twin)
        found = hooked.resolve(site)
        if len(found) != 1:
            raise InputError(
                f"activations() takes one layer; {site!r} selects {len(found)}: "
                f"{', '.join(map(str, found))}"
            )
        address = found[0]
        tokens, mask = is_token_model(hooked), attention_mask(inputs)
        out: dict[int, np.ndarray] = {}
        hooked.model.eval()
        for step in self.steps:
            hooked.model.load_state_dict(self.state(step))
            _, cache = hooked.run_with_cache(inputs, names=[address])
            out[step] = as_rows(cache[address], conv, tokens, mask).float().cpu().numpy()
        return out

    def load(self, step: int, model: Any) -> Any:
        """A copy of ``model`` (nn.Module or HookedModel) holding the state of ``step``."""
        import copy

        module = getattr(model, "model", model)
        if not isinstance(module, nn.Module):
            raise InputError(
                f"load() needs the model the states belong to (an nn.Module or HookedModel); "
                f"got {type(model).__name__}"
            )
        from hookscope.scope import strip_copied_hooks

        twin = copy.deepcopy(model)
        strip_copied_hooks(getattr(twin, "model", twin))  # a tracker's hooks may be on model
        getattr(twin, "model", twin).load_state_dict(self.state(step))
        return twin

    def __repr__(self) -> str:
        head = f"Checkpoints({self.folder}, {len(self.steps)} states, {len(self.index['jumps'])} jumps)"
        return head if not self.steps else head + "\n" + self.to_pandas().to_string(index=False)


def plan_checkpoints(
    jumps: Any, n_steps: int, n: int = 3, window: tuple[int, int] = (10, 10), every: int = 1
) -> list[int]:
    """Steps to save in a second, replayed run: ``n`` representative jumps with a window.

    ``jumps``: a jumps frame (``tracker.jump_table()``, or any frame with ``step`` and
    ``magnitude``) or a list of jumps. The training is cut in three phases, early (< 10 %
    of ``n_steps``), mid and late (>= 50 %); the largest jump of each phase is taken in turn
    (early, mid, late, then the next largest of each) until ``n`` are chosen. Returns the
    sorted steps ``jump - before .. jump + after`` on the ``every`` grid, for
    ``Tracker(..., save_steps=...)`` in a run with the same seed.
    """
    frame = (
        jumps
        if isinstance(jumps, pd.DataFrame)
        else pd.DataFrame(
            [{"step": j.step, "magnitude": j.magnitude} for j in jumps],
            columns=["step", "magnitude"],
        )
    )
    missing = {"step", "magnitude"} - set(frame.columns)
    if missing:
        raise InputError(f"jumps needs columns step and magnitude; missing {sorted(missing)}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise InputError(f"n_steps must be a positive int (the run's length); got {n_steps!r}")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive int; got {n!r}")
    before, after = _window(window)
    frac = frame["step"].to_numpy(float) / n_steps
    phase = pd.cut(frac, [-float("inf"), 0.1, 0.5, float("inf")], right=False, labels=False)
    queues = [
        frame[phase == p].sort_values("magnitude", ascending=False)["step"].tolist()
        for p in range(3)
    ]
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(int(q.pop(0)))
    steps = set()
    for s in chosen:
        first = max(0, s - before)
        first += (-first) % every
        steps.update(range(first, s + after + 1, every))
    return sorted(steps)


def _window(window: Any) -> tuple[int, int]:
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, int) and w >= 0 for w in window)
    ):
        raise InputError(
            f"the window must be (before, after): two ints >= 0 in training steps; got {window!r}"
        )
    return int(window[0]), int(window[1])
