"""Loading Hugging Face models for :meth:`hookscope.HookedModel.from_pretrained`: the
checks on the name or folder, the keyword rules, the tokenizer rule, and the errors that say
what to do (a zoo name, a missing folder, a truncated or corrupt file).

Big models (``device_map=``, ``max_memory=``, ``offload_folder=``) load through
transformers' own device-map support, which hands the model to accelerate: each module
computes on the device the map gives it, and modules mapped to ``"cpu"`` (next to GPUs) or
``"disk"`` keep their weights there, on the ``meta`` device between calls (see
:mod:`hookscope.dispatch`). Every placement argument is checked, and a strategy such as
``"auto"`` resolved to a module -> device dict, before any weight is read.

What works on such a model, with the values of the same model loaded whole (tested on CPU
with layers in memory and on disk, ``tests/test_dispatch.py``): the forward and logits,
``run_with_cache`` of every address kind (``head.L.H.result`` reads the offloaded output
projection through :func:`hookscope.dispatch.weight`), hooks, gradients
(``run_with_cache(..., backward=...)``), activation patching, ablation and attribution
patching. Cached tensors stay on the device their module computed on
(``cache.to_pandas()`` has a device column; ``cache.to("cpu")`` gathers them). hookscope's
hooks are torch hooks around accelerate's wrapped ``forward``, so accelerate's hooks are
never changed, and hookscope's are all gone after each call.

Limits: the patching sweeps' oneDNN matrix products are off on a dispatched model (they
would replace the ``forward`` that accelerate wraps); the result's ``shortcuts_off`` says
so. Every other sweep shortcut stays on. Offloaded weights are read from CPU memory or disk
at every forward that needs them, so sweeps are slower than on a model that fits. Code of
your own that reads a parameter of an offloaded module gets a ``meta`` placeholder: read it
with :func:`hookscope.dispatch.weight`. A hand-written map should keep each transformer
block on one device (the strategies do: transformers never splits a block), since per-head
results combine a block's attention output with its output projection's weights. Tested on
CPU only (layers in memory, on disk, and accelerate's CPU offload); on several GPUs the code
path is the same, but tensors then sit on several devices, which no test here exercises.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hookscope._checks import DTYPES, as_device, as_dtype
from hookscope.errors import InputError, ModelLoadError, format_choices, suggestion

__all__ = ["load_pretrained"]


def load_pretrained(
    name_or_path: str,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    tokenizer: bool,
    head: str,
    hf_kwargs: dict[str, Any],
    device_map: Any = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[nn.Module, Any]:
    """The model (eval mode, on ``device``, or placed by ``device_map``) and its tokenizer
    (or None), with the rules and errors of :meth:`hookscope.HookedModel.from_pretrained`."""
    import transformers
    from safetensors import SafetensorError

    from hookscope import dispatch

    _check_hf_kwargs(name_or_path, hf_kwargs)
    dispatch.check_arguments(device, device_map, max_memory, offload_folder)
    torch_dtype, torch_device = as_dtype(dtype), as_device(device)
    source, folder = _pretrained_source(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **hf_kwargs)
    except (OSError, ValueError) as err:
        if folder is not None and not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"folder {str(folder)!r} has no config.json, so it is not a save_pretrained "
                f"folder (it holds: {format_choices(sorted(p.name for p in folder.iterdir()))}"
                "). Pass the folder that model.save_pretrained(...) wrote."
            ) from None
        fix = (
            f"{folder / 'config.json'} is unreadable: save the model again with save_pretrained."
            if folder is not None
            else "Pass a local folder made by save_pretrained, or make the Hugging Face hub "
            "(or its cache) reachable." + _partial_path_hint(source)
        )
        raise ModelLoadError(
            f"could not load a model config from {name_or_path!r}: {str(err).rstrip('.')}. " + fix
        ) from None
    auto = _auto_class(transformers, config, head)
    placement: dict[str, Any] = {}
    if device_map is not None:  # checked and resolved on a skeleton: no weight read yet
        placement = dispatch.resolve_device_map(
            auto, config, device_map, max_memory, offload_folder, torch_dtype, hf_kwargs
        )
    try:
        model = auto.from_pretrained(source, dtype=torch_dtype, **placement, **hf_kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelLoadError(
            f"could not load weights from {name_or_path!r}: {str(err).rstrip('.')}."
            + _broken_weights_hint(folder)
        ) from None
    model.eval()
    if torch_device is not None:
        model.to(torch_device)
    tok = _load_tokenizer(transformers, source, folder, hf_kwargs) if tokenizer else None
    return model, tok


_HEADS = ("auto", "causal_lm", "masked_lm", "none")


def _auto_class(transformers: Any, config: Any, head: str) -> Any:
    if head not in _HEADS:
        raise InputError(
            f"unknown head {head!r}; choose one of {', '.join(_HEADS)}." + suggestion(head, _HEADS)
        )
    if head == "auto":
        archs = " ".join(getattr(config, "architectures", None) or [])
        if "MaskedLM" in archs:
            head = "masked_lm"
        elif archs and "CausalLM" not in archs and "LMHead" not in archs:
            head = "none"
        else:
            head = "causal_lm"
    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "masked_lm": transformers.AutoModelForMaskedLM,
        "none": transformers.AutoModel,
    }[head]


# ---------------------------------------------------------------- from_pretrained's checks
#: files whose presence means a folder holds a tokenizer (vocabularies, merges, models, configs)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "tekken.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _check_hf_kwargs(name_or_path: Any, hf_kwargs: dict[str, Any]) -> None:
    """Refuse keywords that would unpickle or silently clash; warn on remote code."""
    if "weights_only" in hf_kwargs and hf_kwargs["weights_only"] is not True:
        raise InputError(
            f"weights_only={hf_kwargs['weights_only']!r} would let torch unpickle arbitrary "
            f"objects from {name_or_path!r}, which can execute code; hookscope never does that. "
            "Convert the checkpoint to safetensors once, in an environment you trust "
            "(model.save_pretrained(folder, safe_serialization=True)), and load that folder."
        )
    if "torch_dtype" in hf_kwargs:
        raise InputError(
            "torch_dtype= is not forwarded; pass hookscope's dtype= (a torch dtype or one of "
            f"{', '.join(DTYPES)})"
        )
    if hf_kwargs.get("trust_remote_code"):
        import warnings

        warnings.warn(
            f"trust_remote_code=True: loading {name_or_path!r} imports and runs Python code "
            "from that repository or folder with your privileges. Use it only for code you "
            "have read (pin revision= to the commit you read).",
            UserWarning,
            stacklevel=3,
        )


def _pretrained_source(name_or_path: Any) -> tuple[str, Path | None]:
    """(the string for transformers, the local folder or None for a hub id), or a clear error."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputError(
            "name_or_path must be a hub repo id ('EleutherAI/pythia-70m') or a folder path, "
            f"got {type(name_or_path).__name__}"
        )
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), path
    if path.exists():
        raise ModelLoadError(
            f"{text!r} is a file, not a folder; pass the folder that save_pretrained wrote (the "
            "one holding config.json and the weights)"
        )
    seps = [s for s in (os.sep, os.altsep) if s]
    n_seps = sum(text.count(s) for s in seps)
    if text.startswith(("/", ".", "~")) or n_seps > 1 or (os.sep != "/" and os.sep in text):
        parent = next((p for p in path.absolute().parents if p.is_dir()), None)
        raise ModelLoadError(
            f"could not load a model config from {text!r}: the folder {str(path.absolute())!r} "
            f"does not exist (the nearest existing folder is {str(parent)!r}). Pass the folder "
            "that model.save_pretrained(...) wrote, or a hub repo id like 'EleutherAI/pythia-70m'."
        )
    from hookscope import zoo

    if text in zoo.names():
        hub = text.startswith("pythia-")  # the zoo's hub models are EleutherAI's pythia
        raise ModelLoadError(
            f"{text!r} is a hookscope zoo name, not a Hugging Face repo or a folder: load it with "
            f'hs.zoo.load("{text}")'
            + (f" (or HookedModel.from_pretrained('EleutherAI/{text}'))" if hub else "")
        )
    return text, None


def _partial_path_hint(text: str) -> str:
    """For 'a/b' where folder 'a' exists here: say that 'a/b' was taken as a hub repo id."""
    head = Path(text).parts[0] if Path(text).parts else ""
    if head and Path(head).is_dir():
        return (
            f" (no folder {str(Path(text).absolute())!r} exists, though {head!r} does, so "
            f"{text!r} was taken as a hub repo id; if you meant a folder, check its name)"
        )
    return ""


def _broken_weights_hint(folder: Path | None) -> str:
    """Name the unreadable safetensors files of a local folder (their headers only are read)."""
    if folder is None:
        return (
            " If the files come from the Hugging Face cache, delete that model's folder there "
            "so they are downloaded again."
        )
    from safetensors import SafetensorError, safe_open

    broken = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            broken.append(f"{path} ({err})")
    if not broken:
        return ""
    return (
        f" Truncated or corrupt: {'; '.join(broken)}. Save the model there again with "
        "save_pretrained, or copy the folder again from where it came from."
    )


def _unparsable_json(folder: Path | None, names: list[str]) -> list[str]:
    """'path (error)' for each of ``names`` in ``folder`` that is a .json file JSON cannot read."""
    import json

    found = []
    for name in names:
        if folder is not None and name.endswith(".json"):
            try:
                json.loads((folder / name).read_bytes())
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                found.append(f"{folder / name} ({err})")
    return found


def _load_tokenizer(
    transformers: Any, source: str, folder: Path | None, hf_kwargs: dict[str, Any]
) -> Any:
    """The tokenizer, or None where there are no tokenizer files (see ``from_pretrained``)."""
    present: list[str] | None = None
    if folder is not None and "gguf_file" not in hf_kwargs:  # a GGUF holds its own tokenizer
        present = sorted(p.name for p in folder.iterdir() if p.name in _TOKENIZER_FILES)
        if not present:
            return None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(source, **hf_kwargs)
    except (OSError, ValueError) as err:
        if present is not None:
            raise _tokenizer_error(err, source, folder, present) from err
        # a hub repo without (reachable) tokenizer files: the model comes without one
        import warnings

        warnings.warn(
            f"no tokenizer for {source!r} ({type(err).__name__}: {err}); the model has "
            "tokenizer=None. Pass tokenizer=False to skip the attempt.",
            UserWarning,
            stacklevel=3,
        )
        return None
    # the tokenizers library raises a bare Exception for malformed files: every other
    # failure is a ModelLoadError naming the files, never a fallback
    except Exception as err:
        raise _tokenizer_error(err, source, folder, present) from err
    specials = set(tok.all_special_tokens) | set(getattr(tok, "added_tokens_encoder", {}))
    if len(tok) <= len(specials):  # built from the config alone: nothing but special tokens
        if present:
            raise ModelLoadError(
                f"the tokenizer files {', '.join(present)} in {folder} hold no vocabulary beyond "
                f"the special tokens {sorted(specials)}; save the real tokenizer there "
                "(tokenizer.save_pretrained(folder)) or pass tokenizer=False"
            )
        return None
    return tok


def _tokenizer_error(
    err: BaseException, source: str, folder: Path | None, present: list[str] | None
) -> ModelLoadError:
    where = f"{', '.join(present)} in {folder}" if present else f"{source!r}"
    broken = _unparsable_json(folder, present or [])
    return ModelLoadError(
        f"the tokenizer files ({where}) could not be loaded: {type(err).__name__}: "
        f"{str(err).rstrip('.')}."
        + (f" Not valid JSON: {'; '.join(broken)}." if broken else "")
        + " Save the tokenizer there again (tokenizer.save_pretrained(folder)), or pass "
        "tokenizer=False to load the model without one."
    )
