"""Pick an adapter for a wrapped module: by name, by Hugging Face ``model_type``, by class."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hookscope.adapters import bert, gemma3, gpt2, gpt_neox, llama, vit
from hookscope.adapters.base import Adapter, ModuleAdapter
from hookscope.adapters.sequential import SequentialAdapter, is_sequential
from hookscope.adapters.transformer import TransformerAdapter, TransformerSpec
from hookscope.errors import AdapterError, format_choices, suggestion

__all__ = ["ADAPTERS", "HF_MODEL_TYPES", "make_adapter", "detect"]


def _spec(spec: TransformerSpec) -> Callable[[nn.Module], Adapter]:
    return lambda root: TransformerAdapter(root, spec)


#: adapter name -> factory
ADAPTERS: dict[str, Callable[[nn.Module], Adapter]] = {
    "gpt_neox": _spec(gpt_neox.SPEC),
    "gpt2": _spec(gpt2.SPEC),
    "llama": _spec(llama.SPEC),
    "gemma3": _spec(gemma3.SPEC),
    "bert": _spec(bert.SPEC),
    "vit": _spec(vit.SPEC),
    "mlp": SequentialAdapter,
    "cnn": SequentialAdapter,
    "module": ModuleAdapter,
}

#: Hugging Face config.model_type -> adapter name
HF_MODEL_TYPES = {
    "gpt_neox": "gpt_neox",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3_text": "gemma3",
    "bert": "bert",
}


def detect(root: nn.Module) -> str:
    """The adapter name for ``root``; ``"module"`` when no typed adapter fits."""
    from hookscope.models.vit import ViT

    config = getattr(root, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    if isinstance(root, ViT):
        return "vit"
    if is_sequential(root):
        return (
            "cnn"
            if any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in root.modules())
            else "mlp"
        )
    return "module"


def make_adapter(root: nn.Module, name: str = "auto") -> Adapter:
    """Build the adapter called ``name`` (or the detected one) for ``root``."""
    if not isinstance(root, nn.Module):
        raise AdapterError(f"can only wrap a torch.nn.Module, got {type(root).__name__}")
    if name == "auto":
        name = detect(root)
    if name not in ADAPTERS:
        raise AdapterError(
            f"unknown adapter {name!r}; choose one of: auto, {format_choices(ADAPTERS)}."
            + suggestion(name, ADAPTERS)
        )
    try:
        return ADAPTERS[name](root)
    except (AttributeError, KeyError, TypeError, IndexError) as err:
        if isinstance(err, AdapterError):
            raise
        raise AdapterError(
            f"{type(root).__name__} does not look like a {name} model ({type(err).__name__}: {err}); "
            f"the detected adapter would be {detect(root)!r}"
        ) from None
