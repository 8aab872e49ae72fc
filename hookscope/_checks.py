"""Checks of arguments several layers take the same way: dtype and device names, and whether a
user's function can be called the way hookscope will call it.

One rule each, so ``HookedModel.from_pretrained(dtype=)``, ``run_with_cache(device=,
dtype=)`` and ``ActivationCache.to`` accept and refuse exactly the same values.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from hookscope.errors import InputError, suggestion

__all__ = [
    "DTYPES",
    "as_dtype",
    "as_device",
    "valid_devices",
    "takes_positional",
    "describe_signature",
]

#: dtype names accepted wherever hookscope takes a dtype (a torch floating dtype also works)
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
#: common spellings, named in the error message only (not accepted silently)
_DTYPE_HINTS = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
}
_DEVICE_HINTS = {"gpu": "cuda", "cuda0": "cuda:0", "nvidia": "cuda", "metal": "mps"}


def as_dtype(dtype: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """``dtype`` as a torch floating dtype (None stays None); InputError naming the choices."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return dtype
        raise InputError(
            f"{what} {dtype} is not a floating dtype; choose one of {', '.join(DTYPES)} "
            "(or a torch floating dtype)"
        )
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    hint = _DTYPE_HINTS.get(str(dtype).lower()) if isinstance(dtype, str) else None
    raise InputError(
        f"unknown {what} {dtype!r}; choose one of {', '.join(DTYPES)} (or a torch floating "
        "dtype)." + (f" Did you mean {hint!r}?" if hint else suggestion(str(dtype), DTYPES))
    )


def valid_devices() -> list[str]:
    """The devices this machine can put tensors on: cpu, and each visible accelerator."""
    found = ["cpu"]
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            found += [kind] + [f"{kind}:{i}" for i in range(backend.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found += ["mps", "mps:0"]
    return found


def as_device(device: str | int | torch.device | None) -> torch.device | None:
    """``device`` as a torch device this machine has (None stays None); InputError naming
    the valid devices otherwise (``"gpu"`` gets a hint to ``"cuda"``)."""
    if device is None:
        return None
    valid = valid_devices()
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise InputError(
            f"device must be a string or torch.device, got {type(device).__name__}; "
            f"devices here: {', '.join(valid)}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        hint = _DEVICE_HINTS.get(str(device).lower())
        what = " (an accelerator index)" if isinstance(device, int) else ""
        raise InputError(
            f"unknown device {device!r}{what}; devices here: {', '.join(valid)}."
            + (f" Did you mean {hint!r}?" if hint else suggestion(str(device), valid))
        ) from None
    if dev.type == "cpu" or (dev.type in valid and (dev.index is None or str(dev) in valid)):
        return dev
    cpu_only = dev.type == "cuda" and torch.version.cuda is None and not torch.version.hip
    why = (
        f"this torch ({torch.__version__}) is a CPU-only build"
        if cpu_only
        else f"torch {torch.__version__} sees no {dev} device"
    )
    raise InputError(
        f"device {str(dev)!r} is not available here: {why}; devices here: {', '.join(valid)}"
    )


def takes_positional(fn: Callable[..., Any], n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (True when its
    signature cannot be read, e.g. some builtins)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*([None] * n))
    except TypeError:
        return False
    return True


def describe_signature(fn: Callable[..., Any]) -> str:
    """``name(a, b)`` for messages."""
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        return f"{name}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return name
