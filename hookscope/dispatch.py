"""Models that accelerate has dispatched over several devices or offloaded to CPU / disk.

``HookedModel.from_pretrained(path, device_map=..., offload_folder=...)`` hands loading to
transformers and accelerate. accelerate then wraps each module's ``forward`` with an
``AlignDevicesHook`` (the module's ``_hf_hook``) that moves the inputs to the module's
*execution device* and, for an offloaded module, fills its parameters from a weights map
(CPU memory or a folder of memory-mapped files) just for that call, leaving them on the
``meta`` device between calls.

Anything that reads a parameter outside such a call therefore reads a ``meta`` tensor. Read
parameters through :func:`weight` instead, which returns the real values on the module's
execution device; on an ordinary module it is ``getattr(module, name)``.

Before loading, :func:`check_arguments` and :func:`resolve_device_map` check
``from_pretrained``'s ``device_map`` / ``max_memory`` / ``offload_folder`` and turn a
strategy (``"auto"``, ...) into the module -> device dict transformers would compute, on a
skeleton of the model on the ``meta`` device (no weights are read), so that a map that
needs disk offload without an ``offload_folder``, names no module, or leaves parameters
without a device is an :class:`~hookscope.errors.InputError` before anything loads.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hookscope.errors import InputError, format_choices, suggestion

__all__ = [
    "weight",
    "execution_device",
    "input_device",
    "align_hooks",
    "is_dispatched",
    "offloaded",
    "STRATEGIES",
    "check_arguments",
    "resolve_device_map",
]


def align_hooks(module: nn.Module) -> list[Any]:
    """The accelerate ``AlignDevicesHook`` objects attached to ``module`` itself (not its
    submodules); empty for a module accelerate has not touched. A ``SequentialHook`` is
    looked into."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    found, todo = [], [hook]
    while todo:
        h = todo.pop(0)
        inner = getattr(h, "hooks", None)
        if isinstance(inner, (tuple, list)):  # SequentialHook
            todo = list(inner) + todo
        elif hasattr(h, "execution_device") and hasattr(h, "weights_map"):
            found.append(h)
    return found


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate has attached device hooks anywhere in ``model``."""
    return any(getattr(m, "_hf_hook", None) is not None for m in model.modules())


def offloaded(model: nn.Module) -> list[str]:
    """Qualified names of ``model``'s modules whose weights accelerate keeps off-device
    (CPU or disk offload), in module order."""
    return [
        name
        for name, m in model.named_modules()
        if any(getattr(h, "offload", False) for h in align_hooks(m))
    ]


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module``'s forward computes on: the execution device of its accelerate
    hook where it has one, else the device of its first parameter or buffer that is not on
    ``meta``, else the CPU."""
    for h in align_hooks(module):
        if h.execution_device is not None:
            return _as_device(h.execution_device)
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """The device ``model``'s inputs go to: for a model accelerate dispatched, the execution
    device of its root hook (where accelerate sends them anyway); else the device of its
    first parameter not on ``meta`` (the CPU for a model without parameters)."""
    for h in align_hooks(model):
        if h.execution_device is not None:
            return _as_device(h.execution_device)
    first = next(model.parameters(), None)
    if first is None or first.device.type != "meta":
        return first.device if first is not None else torch.device("cpu")
    return execution_device(model)


def weight(module: nn.Module, name: str) -> Tensor:
    """``module``'s parameter or buffer ``name`` (dotted names reach into submodules, e.g.
    ``"dense.weight"``) as a real tensor.

    On an ordinary module this is ``getattr(module, name)`` (the parameter itself, gradients
    flow to it). Where accelerate has offloaded the module, the attribute is a ``meta``
    placeholder: the value is read from the hook's weights map (CPU memory or the offload
    folder) and returned on the module's execution device, detached (a copy made for this
    call; writing to it does not change the model).
    """
    owner, leaf = _owner(module, name)
    value = getattr(owner, leaf, None)
    if not isinstance(value, Tensor):
        have = [n for n, _ in owner.named_parameters(recurse=False)] + [
            n for n, _ in owner.named_buffers(recurse=False)
        ]
        raise InputError(
            f"{type(owner).__name__} has no parameter or buffer {leaf!r}"
            + (" (it is None)" if leaf in owner.__dict__.get("_parameters", {}) else "")
            + f"; it has: {format_choices(have) or 'none'}"
        )
    if value.device.type != "meta":
        return value
    for h in align_hooks(owner):
        wmap = getattr(h, "weights_map", None)
        if wmap is not None and leaf in wmap:
            # in the model's dtype, as accelerate casts it when it fills the module
            dtype = value.dtype if value.is_floating_point() else None
            return wmap[leaf].detach().to(execution_device(owner), dtype)
    raise InputError(
        f"{type(owner).__name__}.{leaf} is on the meta device and no accelerate hook on that "
        "module holds its value (it was never loaded). Load the model with weights, e.g. "
        "HookedModel.from_pretrained(folder, device_map=..., offload_folder=...)."
    )


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    owner = module
    for part in path:
        sub = getattr(owner, part, None)
        if not isinstance(sub, nn.Module):
            raise InputError(f"{type(owner).__name__} has no submodule {part!r} (in {name!r})")
        owner = sub
    return owner, leaf


def _as_device(device: Any) -> torch.device:
    if isinstance(device, int):  # accelerate names accelerators by index
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
        if accelerator is not None and accelerator.is_available():
            return torch.device(accelerator.current_accelerator().type, device)
        return torch.device("cuda", device)
    return torch.device(device)


# ---------------------------------------------------------------- device maps, before loading
#: device_map strings that let accelerate place the modules (transformers' names)
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: max_memory keys accelerate knows, besides GPU indices
_MEMORY_KEYS = ("cpu", "mps", "disk")
_MAP_FORMS = (
    f"one of {', '.join(STRATEGIES)}, a device ('cpu', 'cuda:0', 0), or a dict "
    "{module name: device or 'cpu' or 'disk'}"
)


def check_arguments(device: Any, device_map: Any, max_memory: Any, offload_folder: Any) -> None:
    """The checks on ``from_pretrained``'s placement arguments that need no model:
    InputError naming what was wrong and the choices."""
    if device_map is None:
        for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)):
            if value is not None:
                raise InputError(
                    f"{name}= is only used with device_map= (it says how much each device may "
                    "hold, or where offloaded weights go); pass device_map='auto' too, or drop "
                    f"{name}="
                )
        return
    if importlib.util.find_spec("accelerate") is None:
        raise InputError(
            "device_map= hands the model to the accelerate package, which is not installed: "
            "pip install 'hookscope[big]' (or pip install accelerate)"
        )
    if device is not None:
        raise InputError(
            f"pass device= or device_map=, not both (got device={device!r} and device_map="
            f"{_short(device_map)}): device= puts the whole model on one device, device_map= "
            "spreads it over several (and may offload to CPU or disk)"
        )
    if isinstance(device_map, Mapping):
        if not device_map:
            raise InputError(f"device_map is an empty dict; pass {_MAP_FORMS}")
        for key, value in device_map.items():
            if not isinstance(key, str):
                raise InputError(
                    f"device_map keys are module names (strings, '' for the whole model), got "
                    f"{key!r} ({type(key).__name__})"
                )
            _map_device(value, f"device_map[{key!r}]")
    elif not (isinstance(device_map, str) and device_map in STRATEGIES):
        _map_device(device_map, "device_map", single=True)
    if max_memory is not None:
        if not (isinstance(device_map, str) and device_map in STRATEGIES):
            raise InputError(
                f"max_memory= only applies when accelerate computes the map (device_map one of "
                f"{', '.join(STRATEGIES)}); with device_map={_short(device_map)} it would be "
                "ignored. Drop max_memory= or pass device_map='auto'"
            )
        _check_max_memory(max_memory)
    if offload_folder is not None:
        if not isinstance(offload_folder, (str, os.PathLike)):
            raise InputError(
                f"offload_folder must be a folder path, got {type(offload_folder).__name__}"
            )
        path = Path(offload_folder).expanduser()
        if path.exists() and not path.is_dir():
            raise InputError(f"offload_folder {str(path)!r} is a file; pass a folder path")


def resolve_device_map(
    auto_class: Any,
    config: Any,
    device_map: Any,
    max_memory: dict | None,
    offload_folder: Any,
    dtype: torch.dtype | None,
    hf_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The keywords for transformers' ``from_pretrained`` placing the model as ``device_map``
    says (checked by :func:`check_arguments` first): a strategy is resolved to the dict
    transformers would compute (:func:`hookscope.hf_compat.auto_device_map`); a dict must
    name modules or parameters of the model and give every parameter a device; a map with
    ``"disk"`` needs ``offload_folder``. Works on a skeleton of ``auto_class`` on the meta
    device: no weights are read."""
    from hookscope.hf_compat import auto_device_map

    if not isinstance(device_map, Mapping) and device_map not in STRATEGIES:
        return {"device_map": {"": _map_device(device_map, "device_map", single=True)}}
    kwargs: dict[str, Any] = {}
    if offload_folder is not None:
        kwargs["offload_folder"] = str(Path(offload_folder).expanduser())
    if getattr(config, "quantization_config", None) is not None and not isinstance(
        device_map, Mapping
    ):
        # a quantizer adjusts the memory estimate: transformers computes the map itself
        return {**kwargs, "device_map": device_map, "max_memory": max_memory}
    skeleton = _skeleton(auto_class, config, dtype, hf_kwargs)
    if isinstance(device_map, Mapping):
        resolved = {k: _map_device(v, f"device_map[{k!r}]") for k, v in device_map.items()}
        _check_map_names(skeleton, resolved)
    else:
        # (a copy: accelerate converts the sizes in place)
        resolved = auto_device_map(skeleton, device_map, dict(max_memory) if max_memory else None)
    on_disk = [k or "(the whole model)" for k, v in resolved.items() if v == "disk"]
    if on_disk and offload_folder is None:
        how = (
            ""
            if isinstance(device_map, Mapping)
            else (
                f" (device_map={device_map!r} with max_memory={max_memory!r} leaves no room for "
                "them elsewhere; allow more memory to avoid disk offload)"
            )
        )
        raise InputError(
            f"the device map puts {format_choices(on_disk)} on 'disk'{how}: pass "
            "offload_folder= (a folder for offloaded weights; safetensors checkpoints are "
            "read from their own files, others are written there once)"
        )
    return {**kwargs, "device_map": resolved}


def _skeleton(
    auto_class: Any, config: Any, dtype: torch.dtype | None, hf_kwargs: dict
) -> nn.Module:
    """The model of ``config`` on the meta device (module names and parameter sizes only)."""
    extra: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if hf_kwargs.get("trust_remote_code"):
        extra["trust_remote_code"] = True
    with torch.device("meta"):
        return auto_class.from_config(config, **extra)


def _check_map_names(model: nn.Module, device_map: dict[str, Any]) -> None:
    """Every key names a module, parameter or buffer of ``model``, and every entry of its
    state dict gets a device (as accelerate requires)."""
    modules = [name for name, _ in model.named_modules()]
    names = set(modules) | set(model.state_dict())
    for key in device_map:
        if key not in names:
            top = [n for n in modules if n and n.count(".") <= key.count(".")]
            raise InputError(
                f"device_map key {key!r} names no module or parameter of "
                f"{type(model).__name__}."
                + suggestion(key, modules)
                + f" Modules at that depth: {format_choices(top, 16)}"
            )
    if "" in device_map:
        if len(device_map) > 1:
            raise InputError(
                "device_map has an entry for '' (the whole model) and others "
                f"({format_choices([k for k in device_map if k])}); accelerate takes either one "
                "device for the whole model or a device per module: drop '' or the others"
            )
        return
    _check_tied(model, device_map)
    missing = [
        p
        for p in model.state_dict()
        if not any(p == k or p.startswith(k + ".") for k in device_map)
    ]
    if missing:
        owners = list(dict.fromkeys(p.rsplit(".", 1)[0] if "." in p else p for p in missing))
        raise InputError(
            f"device_map gives no device to {len(missing)} parameter(s) of "
            f"{type(model).__name__}: {format_choices(missing, 8)}. Add a key for "
            f"{format_choices(owners, 8)} (or for a module containing them)"
        )


def _check_tied(model: nn.Module, device_map: dict[str, Any]) -> None:
    """Parameters tied together (Gemma's lm_head and embed_tokens) must share a placement:
    accelerate keeps one copy, so a tied weight mapped to disk next to its twin in memory
    is never found at the first forward."""

    def place(name: str) -> Any:
        best = max(
            (k for k in device_map if name == k or name.startswith(k + ".")), key=len, default=None
        )
        return device_map.get(best) if best is not None else None

    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        places = {str(place(n)) for n in names}
        if len(names) > 1 and len(places) > 1:
            raise InputError(
                f"{' and '.join(names)} are one tied weight but the device map puts them on "
                f"{' and '.join(sorted(places))}; map both to the same device"
            )


def _map_device(value: Any, where: str, single: bool = False) -> Any:
    """A device_map value as accelerate takes it: 'cpu', 'disk', a GPU index or a device
    string this machine has; InputError otherwise."""
    from hookscope._checks import valid_devices

    if isinstance(value, str) and value in ("cpu", "disk") and not (single and value == "disk"):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise InputError(
            f"{where} must be {_MAP_FORMS if single else 'a device (cpu, cuda:0, 0) or disk'}, "
            f"got {_short(value)}"
        )
    if isinstance(value, int):
        n = _n_accelerators()
        if not 0 <= value < n:
            raise InputError(
                f"{where} = {value} is a GPU index, but this machine has "
                f"{n or 'no'} GPU(s){f' (0..{n - 1})' if n else ''}; devices here: "
                f"{', '.join(valid_devices())}"
            )
        return value
    if str(value) in ("meta", "disk") or (isinstance(value, torch.device) and value.type == "meta"):
        raise InputError(
            f"{where} = {str(value)!r} cannot hold a model's weights; "
            + (
                "a whole model on disk cannot run (pass device_map='auto' with offload_folder= "
                "to offload what does not fit); "
                if str(value) == "disk"
                else ""
            )
            + f"use {_MAP_FORMS if single else 'a device (cpu, cuda:0, 0) or disk'}"
        )
    from hookscope._checks import as_device

    if isinstance(value, str) and single:
        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            choices = [*STRATEGIES, *valid_devices()]
            raise InputError(
                f"device_map {value!r} is neither a strategy ({', '.join(STRATEGIES)}) nor a "
                f"device (devices here: {', '.join(valid_devices())}); a dict "
                "{module name: device or 'disk'} places modules yourself."
                + suggestion(value, choices)
            ) from None
    try:
        dev = as_device(value)
    except InputError as err:
        choices = f"{', '.join(STRATEGIES)} or a device" if single else "a device or disk"
        raise InputError(f"{where}: {err} ({where} takes {choices})") from None
    assert dev is not None
    if dev.type == "cpu":
        return "cpu"
    return f"{dev.type}:{dev.index or 0}"


def _check_max_memory(max_memory: Any) -> None:
    from accelerate.utils import convert_file_size_to_int

    if not isinstance(max_memory, Mapping) or not max_memory:
        raise InputError(
            "max_memory must be a dict {device: size}, e.g. {0: '20GiB', 'cpu': '60GiB'} (GPU "
            f"indices, {', '.join(_MEMORY_KEYS)}); got {_short(max_memory)}"
        )
    n = _n_accelerators()
    for key, size in max_memory.items():
        gpu = isinstance(key, int) and not isinstance(key, bool)
        if not (gpu and 0 <= key < n) and key not in _MEMORY_KEYS:
            raise InputError(
                f"max_memory key {key!r} is not a device accelerate knows: use GPU indices"
                f"{f' (0..{n - 1})' if n else ' (none on this machine)'} or "
                f"{', '.join(map(repr, _MEMORY_KEYS))}"
                + (" (a GPU is named by its index: 0, not 'cuda:0')" if "cuda" in str(key) else "")
            )
        ok = isinstance(size, int) and not isinstance(size, bool) and size >= 0
        if isinstance(size, str):
            try:
                convert_file_size_to_int(size)
                ok = True
            except ValueError:
                ok = False
        if not ok:
            raise InputError(
                f"max_memory[{key!r}] = {size!r} is not a size: pass bytes (an int) or a string "
                "with a unit ('20GiB', '500MB')"
            )


def _n_accelerators() -> int:
    """How many accelerators (GPUs) accelerate can number here."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return int(accelerator.device_count())
    return torch.cuda.device_count()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
