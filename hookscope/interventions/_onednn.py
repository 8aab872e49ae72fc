"""oneDNN forwards for the intervention engine's sweeps: plain fp32 linear layers
(:func:`fast_linears`) and gated MLPs (:func:`fast_gated_mlps`, ``down(act(gate(x)) *
up(x))`` with the activation and the product computed inside the matrix products as oneDNN
post-ops), both computed by PyTorch's own ``mkldnn::_linear_pointwise`` operator. Each
falls back to the module's own computation wherever it could compute something else."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import cache, partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hookscope import dispatch
from hookscope.scope import replacement

if TYPE_CHECKING:
    from hookscope.model import HookedModel

__all__ = [
    "DISPATCHED_ONEDNN",
    "fast_forwards",
    "fast_gated_mlps",
    "fast_linears",
    "onednn_linear",
    "shortcuts_off",
]


@cache
def onednn_linear() -> Callable | None:
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
    them with oneDNN instead of MKL (see :func:`onednn_linear`): 1.1-1.7x faster at the
    sweeps' shapes on the AMD EPYC measured (``benchmarks/bench_patching.py``), with fp32
    results equal to ``nn.functional.linear``'s up to summation order. Empty where oneDNN
    is not usable or turned off. Layers with their own forward (subclasses overriding it,
    wrappers such as accelerate's offloading) keep it, as do layers whose weight or bias is
    not a plain contiguous fp32 CPU tensor. Each call reads the layer's current weight and
    bias and falls back to ``nn.functional.linear`` when gradients or autocast are on, a
    torch function mode is active, or the input is not a plain fp32 CPU tensor with rows
    and the layer's input width."""
    op = onednn_linear()
    if op is None or not _onednn_allowed():
        return {}
    out: dict[nn.Module, Callable] = {}
    for module in modules:
        if _plain_linear(module) and "forward" not in module.__dict__:
            out[module] = partial(_onednn_forward, op, module)  # type: ignore[arg-type]
    return out


#: why the oneDNN matrix products are off on a model accelerate dispatched
DISPATCHED_ONEDNN = (
    "accelerate dispatched this model (device_map); a oneDNN forward would replace the "
    "forward its hooks wrap to load offloaded weights and move inputs"
)


def fast_forwards(model: HookedModel) -> tuple[dict[nn.Module, Callable], dict[str, str]]:
    """``(fast forwards of model's modules, shortcuts off: {name: why})``: the oneDNN
    forwards of its linear layers (:func:`fast_linears`) and of its blocks' gated MLPs
    (:func:`fast_gated_mlps`, from the adapter's ``block_part``). On a model that accelerate
    dispatched (:func:`hookscope.dispatch.is_dispatched`) nothing gets a oneDNN forward and
    ``{"onednn": why}`` says so; elsewhere the second item is empty (where this torch or CPU
    has no usable kernel the products are simply MKL's, nothing is lost)."""
    off = shortcuts_off(model.model)
    if "onednn" in off:
        return {}, off
    adapter, parts = model.adapter, ("mlp", "gate", "up", "down", "act")
    n_blocks = len(adapter.blocks() or [])
    blocks = [[adapter.block_part(i, p) for p in parts] for i in range(n_blocks)]
    mlps = fast_gated_mlps(b for b in blocks if None not in b)  # type: ignore[misc]
    return {**fast_linears(model.model.modules()), **mlps}, off


def shortcuts_off(model: nn.Module) -> dict[str, str]:
    """The sweep shortcuts that cannot run on ``model`` whatever the sweep, with why:
    ``{"onednn": why}`` on a model accelerate dispatched, else nothing."""
    return {"onednn": DISPATCHED_ONEDNN} if dispatch.is_dispatched(model) else {}


def _onednn_forward(op: Callable, module: nn.Linear, input: Tensor) -> Tensor:
    """``module(input)`` through oneDNN where it computes the same (``input``: the name
    ``nn.Linear.forward`` gives it, for keyword calls)."""
    weight, bias = module.weight, module.bias
    if not _fast_call(input, weight, bias):
        return nn.functional.linear(input, weight, bias)
    return op(input, weight, bias, "none", [], "")


def _fast_call(input: Any, weight: Tensor, *others: Tensor | None) -> bool:
    """Whether oneDNN computes a product of ``input`` with ``weight`` as torch would now:
    no gradients, autocast or torch function mode; a plain fp32 CPU input with rows and
    the weight's width; plain fp32 weights (``others``: biases, None for none)."""
    return not (
        torch.is_grad_enabled()
        or type(input) is not Tensor
        or input.dtype != torch.float32
        or input.device.type != "cpu"
        or input.numel() == 0
        or input.shape[-1] != weight.shape[-1]
        or not _plain_fp32(weight)
        or not all(t is None or _plain_fp32(t) for t in others)
        or _autocast_cpu()
        or torch._C._is_torch_function_mode_enabled()
    )


# ---------------------------------------------------------------- gated MLPs

#: the oneDNN post-op ``(attr, algorithm)`` computing each activation torch names
_POST_OPS = {"silu": ("swish", ""), "gelu_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}


def fast_gated_mlps(mlps: Iterable[Sequence[nn.Module]]) -> dict[nn.Module, Callable]:
    """Forwards for gated MLPs ``(mlp, gate, up, down, act)`` (``mlp(x) = down(act(gate(x))
    * up(x))``, as in Llama or Gemma) that compute ``act(gate(x)) * up(x)`` inside the up
    projection's matrix product (oneDNN post-ops: the activation on the gate's product, the
    multiplication on the up projection's): no elementwise passes over ``[rows, d_mlp]``
    tensors (1.2x the MLP's speed at SmolLM2's sweep shapes on the Xeon measured), results
    equal up to fp32 rounding. An MLP is left alone unless its activation is one of ``_POST_OPS`` (checked
    on values, not by class), its linear layers are plain fp32 ``nn.Linear`` and its own
    forward agrees with this one on a probe input. Each call falls back to the MLP's own
    forward when a hook or a replaced forward is on one of its parts (a neuron site), or
    on any input :func:`fast_linears` would not take."""
    op = onednn_linear()
    if op is None or not _onednn_allowed() or not _takes_binary_arguments():
        return {}
    out: dict[nn.Module, Callable] = {}
    for mlp, gate, up, down, act in mlps:
        linears = (gate, up, down)
        if (
            "forward" in mlp.__dict__
            or _hooked((gate, up, down, act))
            or not all(_plain_linear(m) for m in linears)
        ):
            continue
        name = _activation(act)
        if name is None:
            continue
        fn = partial(_gated_forward, op, _POST_OPS[name], mlp, gate, up, down, act)
        if _agrees(fn, mlp, gate.weight.shape[1]):
            out[mlp] = fn
    return out


def _takes_binary_arguments() -> bool:
    """Whether ``mkldnn::_linear_pointwise.binary`` is (X, other, W, B, attr)."""
    schemas = torch._C._jit_get_schemas_for_operator("mkldnn::_linear_pointwise")
    wanted = ["X", "other", "W", "B", "attr"]
    return any([a.name for a in s.arguments] == wanted for s in schemas)


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` with torch's own forward and plain fp32 CPU weight and bias."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and _plain_fp32(module.weight)
        and (module.bias is None or _plain_fp32(module.bias))
    )


def _hooked(modules: Sequence[nn.Module]) -> bool:
    """Whether a hook (the module's own or a global one) or an instance forward other than
    a oneDNN linear one may change what ``modules`` compute."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks:
            return True
        fn = replacement(m)
        if fn is not None and not (isinstance(fn, partial) and fn.func is _onednn_forward):
            return True
    return False


def _activation(act: nn.Module) -> str | None:
    """Which activation of :data:`_POST_OPS` ``act`` computes (compared on values from -12
    to 12 against torch's functions), or None."""
    x = torch.linspace(-12.0, 12.0, 4001)
    with torch.no_grad():
        y = act(x)
    functional = nn.functional
    refs = {
        "silu": functional.silu(x),
        "gelu_tanh": functional.gelu(x, approximate="tanh"),
        "gelu": functional.gelu(x),
    }
    for name, ref in refs.items():
        if isinstance(y, Tensor) and y.shape == ref.shape and torch.allclose(y, ref, 1e-6, 1e-7):
            return name
    return None


def _agrees(fn: Callable, mlp: nn.Module, width: int) -> bool:
    """Whether ``fn`` computes what ``mlp``'s own forward does on a probe input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=g)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        mine, theirs = fn(x), type(mlp).forward(mlp, x)
    scale = float(theirs.abs().max()) + 1e-30
    return mine.shape == theirs.shape and float((mine - theirs).abs().max()) <= 1e-5 * scale


def _gated_forward(
    op: Callable, post: tuple[str, str], mlp: nn.Module, gate: nn.Linear, up: nn.Linear,
    down: nn.Linear, act: nn.Module, *args: Any, **kwargs: Any,
) -> Tensor:  # fmt: skip
    """``mlp``'s forward with oneDNN post-ops (see :func:`fast_gated_mlps`)."""
    x = args[0] if len(args) == 1 and not kwargs else None
    params = (gate.weight, up.weight, down.weight, gate.bias, up.bias, down.bias)
    if x is None or not _fast_call(x, *params) or _hooked((gate, up, down, act)):
        return type(mlp).forward(mlp, *args, **kwargs)
    attr, algorithm = post
    rows = x.reshape(-1, x.shape[-1])
    h = op(rows, gate.weight, gate.bias, attr, [], algorithm)
    h = op.binary(rows, h, up.weight, up.bias, "mul")
    return op(h, down.weight, down.bias, "none", [], "").view(*x.shape[:-1], -1)
