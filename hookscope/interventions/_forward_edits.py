"""Edits to one forward of a Hugging Face model, as hooks and temporary ``forward``
replacements: what the intervention engine (:mod:`hookscope.interventions.engine`) uses to
join patched copies to the batch, replay recorded blocks and stop at the unembedding."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cache, partial
from typing import Any

import torch
from torch import Tensor, nn

from hookscope import dispatch
from hookscope.scope import Scope, protected


def repeat(t: Tensor, n: int) -> Tensor:
    return t.repeat(n, *([1] * (t.ndim - 1)))


def rows_of(value: Any, rows: slice) -> Any:
    """``value`` (a tensor, or a tuple holding tensors) restricted to batch ``rows``."""
    if isinstance(value, Tensor):
        return value[rows]
    if isinstance(value, tuple):
        return tuple(rows_of(v, rows) for v in value)
    return value


def positions(value: Any, cut: slice) -> Any:
    """A recorded block output (a tensor [batch, pos, ...] or a tuple starting with one)
    restricted to positions ``cut``."""
    if isinstance(value, Tensor):
        return value[:, cut]
    return (value[0][:, cut], *value[1:])


def first_tensor(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else value[0]


def batch_args(batch: int, module: nn.Module, args: tuple, kwargs: dict):
    """Block pre-hook: repeat batch-shaped arguments (such as padding masks) to as many
    copies of the base batch as the hidden states hold."""
    hidden = args[0] if args else kwargs["hidden_states"]
    n = hidden.shape[0] // batch

    def batched(value: Any) -> Any:
        if isinstance(value, Tensor):
            if value is not hidden and value.ndim >= 2 and value.shape[0] == batch:
                return repeat(value, n)
            return value
        if isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value):
            return tuple(batched(v) for v in value)
        return value

    if n == 1:
        return None
    return tuple(batched(a) for a in args), {k: batched(v) for k, v in kwargs.items()}


def join_input(parts: list[Tensor], module: nn.Module, args: tuple, kwargs: dict):
    """Block 0 pre-hook: its input becomes the copies that start there."""
    hidden = torch.cat(parts) if len(parts) > 1 else parts[0]
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def join_output(parts: list[Tensor], first: bool, module: nn.Module, args: tuple, out: Any):
    """Block forward hook: the copies starting at the next block join the batch (at the
    first start they replace the base rows, which no copy uses)."""
    hidden = first_tensor(out)
    joined = torch.cat(parts if first else [hidden, *parts])
    return joined if isinstance(out, Tensor) else (joined, *out[1:])


def replay(output: Any, *args: Any, **kwargs: Any) -> Any:
    """A block forward that returns a recorded output instead of computing it."""
    return output


def identity(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden


class Probe:
    """An unembedding forward that keeps its input and computes a few logit columns only:
    if the model returns exactly those, nothing follows the unembedding and sweeps may
    read the metric from its input."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.hidden: Tensor | None = None
        self.logits: Tensor | None = None

    def __call__(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # replacing the forward bypasses accelerate's hook on a dispatched model: read the
        # (possibly offloaded) weights through dispatch.weight, on its execution device
        weight = dispatch.weight(self.module, "weight")
        bias = dispatch.weight(self.module, "bias") if self.module.bias is not None else None
        cols = torch.linspace(0, weight.shape[0] - 1, min(16, weight.shape[0])).long()
        cols = cols.to(weight.device)
        hidden = hidden.to(weight.device)
        self.hidden = hidden
        self.logits = nn.functional.linear(
            hidden, weight[cols], bias[cols] if bias is not None else None
        )
        return self.logits

    def matches(self, out: Any) -> bool:
        ref = self.logits
        return (
            ref is not None
            and isinstance(out, Tensor)
            and out.shape == ref.shape
            and torch.equal(out.to(ref.device, ref.dtype), ref)
        )


def at_read_position(position: Tensor, module: nn.Module, args: tuple, kwargs: dict):
    """MLP pre-hook: keep only each row's read position (``position``: one per row of the
    base batch, counted in the tensor the MLP sees) of the input, as [rows, 1, d]."""
    x = args[0] if args else next(iter(kwargs.values()))
    reps = x.shape[0] // position.shape[0]
    x = x[torch.arange(x.shape[0], device=x.device), position.to(x.device).repeat(reps)][:, None]
    if args:
        return (x, *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: x}


class forward_replaced(Scope):
    """``with forward_replaced({module: fn}):`` each module gets the instance ``forward`` ``fn``
    for the block, in this thread (hooks still run); the previous forward is back however
    the block ends (a :class:`~hookscope.scope.Scope`)."""

    def __init__(self, replacements: dict[nn.Module, Callable]):
        super().__init__()
        self.replacements = replacements

    @protected(rollback=lambda self: self.close())
    def __enter__(self) -> forward_replaced:
        self.open()
        for module, fn in self.replacements.items():
            self.replace_forward(module, fn)
        return self


@cache
def _onednn_linear() -> Callable | None:
    """oneDNN's matrix product with bias (PyTorch's own operator
    ``torch.ops.mkldnn._linear_pointwise``), or None where this build or CPU lacks it or it
    disagrees with ``nn.functional.linear`` on a small check."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None  # only measured on x86 (MKL's sgemm is the reference it beats)
    if not _takes_linear_arguments():
        return None  # an operator of another signature in this torch version
    g = torch.Generator().manual_seed(0)
    shapes = ((3, 5, 16), (7, 16), (7,))
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float32) for s in shapes)
    # (whatever autocast or precision state the first caller is in)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        ok = torch.allclose(op(x, w, b, "none", [], ""), nn.functional.linear(x, w, b),
                            rtol=1e-5, atol=1e-5)  # fmt: skip
    return op if ok else None


def _takes_linear_arguments() -> bool:
    """Whether ``mkldnn::_linear_pointwise`` has the overload hookscope calls:
    (X, W, B, attr, scalars, algorithm)."""
    schemas = torch._C._jit_get_schemas_for_operator("mkldnn::_linear_pointwise")
    wanted = ["X", "W", "B", "attr", "scalars", "algorithm"]
    return any([a.name for a in s.arguments] == wanted for s in schemas)


def _onednn_allowed() -> bool:
    """Whether the user leaves oneDNN on (``torch.backends.mkldnn.enabled``) and computing
    fp32 products in full fp32 (not allowed to round them to bf16/tf32)."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    precision = getattr(matmul, "fp32_precision", "none")
    return bool(torch.backends.mkldnn.enabled) and precision in ("none", "ieee")


_PLAIN = (Tensor, nn.Parameter)  # not tensor subclasses (quantized, distributed, fake)


def _plain_fp32(t: Tensor | None) -> bool:
    """A plain, contiguous fp32 CPU tensor (what the oneDNN operator reads correctly)."""
    return (
        type(t) in _PLAIN
        and t.dtype == torch.float32  # type: ignore[union-attr]
        and t.device.type == "cpu"  # type: ignore[union-attr]
        and t.is_contiguous()  # type: ignore[union-attr]
    )


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def fast_linears(modules: Iterable[nn.Module]) -> dict[nn.Module, Callable]:
    """Forwards for the plain fp32 CPU ``nn.Linear`` layers among ``modules`` that compute
    them with oneDNN instead of MKL (see :func:`_onednn_linear`): 1.1-1.7x faster at the
    sweeps' shapes on the AMD EPYC measured (``benchmarks/bench_patching.py``), with fp32
    results equal to ``nn.functional.linear``'s up to summation order. Empty where oneDNN
    is not usable or turned off. Layers with their own forward (subclasses overriding it,
    wrappers such as accelerate's offloading) keep it, as do layers whose weight or bias is
    not a plain contiguous fp32 CPU tensor. Each call reads the layer's current weight and
    bias and falls back to ``nn.functional.linear`` when gradients or autocast are on, a
    torch function mode is active, or the input is not a plain fp32 CPU tensor with rows
    and the layer's input width."""
    op = _onednn_linear()
    if op is None or not _onednn_allowed():
        return {}
    out: dict[nn.Module, Callable] = {}
    for module in modules:
        if (
            isinstance(module, nn.Linear)
            and type(module).forward is nn.Linear.forward
            and "forward" not in module.__dict__
            and _plain_fp32(module.weight)
            and (module.bias is None or _plain_fp32(module.bias))
        ):
            out[module] = partial(_onednn_forward, op, module)
    return out


#: why the oneDNN matrix products are off on a model accelerate dispatched
DISPATCHED_ONEDNN = (
    "accelerate dispatched this model (device_map); a oneDNN forward would replace the "
    "forward its hooks wrap to load offloaded weights and move inputs"
)


def model_linears(model: nn.Module) -> tuple[dict[nn.Module, Callable], dict[str, str]]:
    """``(fast_linears of model's modules, shortcuts off: {name: why})``. On a model that
    accelerate dispatched (:func:`hookscope.dispatch.is_dispatched`) no layer gets a oneDNN
    forward and ``{"onednn": why}`` says so; elsewhere the second item is empty (where this
    torch or CPU has no usable kernel the products are simply MKL's, nothing is lost)."""
    off = shortcuts_off(model)
    return ({} if "onednn" in off else fast_linears(model.modules())), off


def shortcuts_off(model: nn.Module) -> dict[str, str]:
    """The sweep shortcuts that cannot run on ``model`` whatever the sweep, with why:
    ``{"onednn": why}`` on a model accelerate dispatched, else nothing."""
    return {"onednn": DISPATCHED_ONEDNN} if dispatch.is_dispatched(model) else {}


def _onednn_forward(op: Callable, module: nn.Linear, input: Tensor) -> Tensor:
    """``module(input)`` through oneDNN where it computes the same (``input``: the name
    ``nn.Linear.forward`` gives it, for keyword calls)."""
    weight, bias = module.weight, module.bias
    if (
        torch.is_grad_enabled()
        or type(input) is not Tensor
        or input.dtype != torch.float32
        or input.device.type != "cpu"
        or input.numel() == 0
        or input.shape[-1] != weight.shape[-1]
        or not _plain_fp32(weight)
        or not (bias is None or _plain_fp32(bias))
        or _autocast_cpu()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return nn.functional.linear(input, weight, bias)
    return op(input, weight, bias, "none", [], "")
