"""HookedModel: any torch module, its internals named by typed addresses.

>>> model = HookedModel.from_pretrained("EleutherAI/pythia-70m")   # or a local folder
>>> logits, cache = model.run_with_cache("When Mary and John went to the store")
>>> cache["resid_post.3"].shape                                   # [batch, pos, d_model]
>>> model.run_with_hooks(tokens, hooks=[("neuron.2.187", lambda act, address: act * 0)])
>>> with model.hooks([(Residual(1, "post"), fn)]):
...     model(tokens)
>>> vision = HookedModel.wrap(my_cnn)                              # adapter auto-detected
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hookscope._checks import as_device, as_dtype, describe_signature, takes_positional
from hookscope.adapters import make_adapter
from hookscope.adapters.base import Adapter
from hookscope.addresses import Address
from hookscope.cache import ActivationCache
from hookscope.errors import InputError
from hookscope.hooks import Run, installed, wire
from hookscope.inputs import call_arguments, need_tokenizer, tokenize
from hookscope.model_inputs import token_ids
from hookscope.model_weights import WeightAccess
from hookscope.planning import HookPlanner, HookSpec
from hookscope.tokens import TokenText

__all__ = ["HookedModel"]


class HookedModel(WeightAccess):
    """A wrapped model with address-based caching and hooks (see the module docstring);
    weights and readout (``W_U``, ``final_norm``, ``unembed``, ...) from :class:`WeightAccess`."""

    def __init__(self, model: nn.Module, adapter: Adapter, tokenizer: Any = None):
        self.model = model
        self.adapter = adapter
        self.tokenizer = tokenizer
        #: plans hooks and caches against the adapter (and memoises cache plans)
        self.planner = HookPlanner(adapter)

    # ------------------------------------------------------------------ construction
    @classmethod
    def wrap(cls, module: nn.Module, tokenizer: Any = None, adapter: str = "auto") -> HookedModel:
        """Wrap any torch module; the adapter is detected from its class or config.

        Unknown architectures get the ``module`` adapter: only ``module:<path>`` addresses.
        """
        return cls(module, make_adapter(module, adapter), tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        tokenizer: bool = True,
        adapter: str = "auto",
        head: str = "auto",
        device_map: str | int | torch.device | dict[str, Any] | None = None,
        max_memory: dict[int | str, int | str] | None = None,
        offload_folder: str | None = None,  # or a pathlib.Path
        **hf_kwargs: Any,
    ) -> HookedModel:
        """Load a Hugging Face model (hub name or local folder) through transformers, in eval mode.

        ``dtype``: a torch dtype or float32, float16, bfloat16, float64; ``device``: one this torch
        can use (``"cpu"``, ``"cuda:0"``, ...). ``head`` picks the model class: ``causal_lm``,
        ``masked_lm``, ``none`` (bare encoder/decoder, no logits) or ``auto`` (from the config's
        ``architectures``; causal LM if unnamed).

        Tokenizer (``tokenizer=False`` skips it): None for a folder without tokenizer files (where
        transformers would build an empty one from the config) and for one holding only special
        tokens (hub names too); a ModelLoadError naming a folder's tokenizer files that do not load;
        None and a UserWarning saying why for a hub repo whose tokenizer files cannot be found or
        read (OSError, ValueError); a ModelLoadError for any other tokenizer failure.

        ``hf_kwargs`` go to transformers' ``from_pretrained`` (config, model, tokenizer), except:
        ``weights_only=False`` is an InputError (hookscope never unpickles arbitrary objects:
        convert the checkpoint to safetensors; ``.bin`` files are read only through torch's
        restricted ``weights_only`` loader), as is ``torch_dtype=`` (use ``dtype=``);
        ``trust_remote_code=True`` (some architectures need it) runs the repository's own Python
        code with your privileges, so it warns (UserWarning) on every call. Errors are
        ModelLoadError saying what to do: a zoo name (``"digits-cnn"``) points to
        ``hookscope.zoo.load``; a path that does not exist, or a missing, truncated or corrupt
        config, weights or tokenizer file, is named.

        Bigger than one device: ``device_map`` is ``"auto"``, ``"balanced"``, ``"balanced_low_0"``
        or ``"sequential"`` (accelerate places the modules within ``max_memory``, e.g.
        ``{0: "20GiB", "cpu": "60GiB"}``: GPU indices, ``"cpu"``, ``"mps"``, ``"disk"``), a dict
        ``{module name: device}`` (``"cpu"`` offload next to GPUs and ``"disk"`` allowed), or one
        device to load straight onto; ``"disk"`` needs ``offload_folder``. All is checked before any
        weight is read (InputError naming the argument and the choices): ``device`` with
        ``device_map``; a device this machine lacks; a key naming no module (with the closest
        name); parameters the map leaves without a device; disk offload (also when ``"auto"``
        computes it from ``max_memory``) without ``offload_folder``; ``max_memory`` without a
        strategy; ``offload_folder`` without ``device_map``. ``model.model.hf_device_map`` holds
        the resolved map. Caching, hooks, gradients and the interventions give the values of the
        model loaded whole; :mod:`hookscope.loading` says what works and its limits.

        >>> model = HookedModel.from_pretrained(folder, device_map="auto", offload_folder="offload")
        """
        from hookscope.loading import load_pretrained

        model, tok = load_pretrained(name_or_path, device, dtype, tokenizer, head, hf_kwargs,
                                     device_map, max_memory, offload_folder)  # fmt: skip
        return cls(model, make_adapter(model, adapter), tok)

    # ------------------------------------------------------------------ facts
    @property
    def cfg(self):
        """Sizes: n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, d_vocab."""
        return self.adapter.dims

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device; on a model accelerate dispatched
        (``from_pretrained(..., device_map=...)``), the device accelerate computes its first
        modules on (the first parameter may be offloaded, on ``meta``)."""
        from hookscope.dispatch import input_device

        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def __repr__(self) -> str:
        return f"HookedModel({self.adapter.describe()})"

    def addresses(self, kind: str | None = None, *, units: bool = False) -> list[Address]:
        """Addresses this model exposes, in forward order.

        Layer-level addresses by default (``head.3``, ``neuron.2``, ``resid_post.3``); with
        ``units=True`` every head and neuron as well. ``kind`` filters by the grammar's first
        word: embed, resid_pre, resid_mid, resid_post, attn_out, mlp_out, head, neuron, logits.
        """
        return self.planner.addresses(kind, units=units)

    def resolve(self, spec: Any) -> list[Address]:
        """Expand addresses / strings / selections (or a list of them) and check each exists."""
        return self.planner.resolve(spec)

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, text: str | Sequence[str]) -> Tensor:
        """Token ids [batch, pos]; strings of different lengths are right-padded (whatever the
        tokenizer's own padding side), so position p is the p-th token of every row."""
        return tokenize(self.tokenizer, text)["input_ids"].to(self.device)

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """Decode ids: [pos] -> str, [batch, pos] -> list of str."""
        t = token_ids(tokens, "to_string")
        tok = need_tokenizer(self.tokenizer)
        if t.ndim == 2:
            return [tok.decode(row) for row in t.tolist()]
        return tok.decode(t.tolist())

    def to_str_tokens(self, text: str | Tensor | Sequence[int]) -> list[str]:
        """Each token of one sequence as a string (a text, or ids [pos] / [1, pos])."""
        tok = need_tokenizer(self.tokenizer)
        if isinstance(text, str):
            ids = self.to_tokens(text)[0]
        else:
            ids = token_ids(text, "to_str_tokens")
            if ids.ndim == 2 and ids.shape[0] != 1:
                raise InputError(
                    f"to_str_tokens takes one sequence (a text, ids [pos] or [1, pos]), got ids "
                    f"of shape {tuple(ids.shape)}; use to_string for a batch"
                )
            ids = ids.reshape(-1)
        return [tok.decode([i]) for i in ids.tolist()]

    def to_single_token(self, text: str) -> int:
        """The id of ``text``, which must be exactly one token (mind the leading space:
        ``" Mary"``); an InputError shows the pieces otherwise."""
        if not isinstance(text, str):
            raise InputError(f"to_single_token takes a string, got {type(text).__name__}")
        return int(TokenText((text,), True).ids(self.tokenizer, "text", "to_single_token"))

    # ------------------------------------------------------------------ forward
    def _forward(self, inputs: Any, kwargs: dict) -> Any:
        args, kw = call_arguments(self, inputs, kwargs)
        out = self.model(*args, **kw)
        logits = getattr(out, "logits", None)
        return logits if isinstance(logits, Tensor) else out

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Run the model. Language models return logits [batch, pos, vocab]."""
        return self._forward(inputs, kwargs)

    forward = __call__

    # ------------------------------------------------------------------ public runs
    def run_with_cache(
        self,
        inputs: Any,
        names: Any = None,
        *,
        hooks: Sequence[HookSpec] = (),
        backward: Callable[[Any], Tensor] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run once and return ``(output, ActivationCache)`` holding only what ``names`` selects.

        ``names``: an address, a selection string (``"resid_post.*"``, ``"head.*.*"``) or a
        list; ``None`` caches every layer-level tensor except per-head ``result``. ``hooks``
        run too (the cache holds values after them). Runs under ``torch.no_grad()`` unless
        ``backward`` is given: then ``backward(output)`` must be a scalar and the cache's
        ``.grads`` (and ``cache.grad(address)``) hold its gradient at every cached address.
        ``device``/``dtype`` move the cache once at the end (a device this machine has; a
        dtype as for ``from_pretrained``: float32, float16, bfloat16, float64).
        """
        device, dtype = as_device(device), as_dtype(dtype)
        _check_backward(backward)
        plan = self.planner.cache_plan(names, hooks, backward is not None)
        run = Run()
        value = grads = None
        with torch.enable_grad() if backward is not None else torch.no_grad():
            with installed(self.model, plan.wiring, run):
                out = self._forward(inputs, kwargs)
            if backward is not None:
                value = _scalar_of(backward, out, run)
                grads = run.gradients(value.reshape(()))
        grad_cache = (
            ActivationCache(grads, plan.layout, plan.requested) if grads is not None else None
        )
        cache = ActivationCache(
            run.acts,
            plan.layout,
            plan.requested,
            grad_cache,
            value.detach() if value is not None else None,
            model=self,
        )
        if device is not None or dtype is not None:
            cache = cache.to(device, dtype)
        if isinstance(out, Tensor):
            out = out.detach()
        return out, cache

    def run_with_hooks(self, inputs: Any, hooks: Sequence[HookSpec], **kwargs: Any) -> Any:
        """Run with ``hooks = [(address_or_selection, fn), ...]``; ``fn(activation, address)``
        may return a replacement of the same shape (or None to leave it). Hooks are removed
        when the call returns or raises."""
        with installed(self.model, wire(self.planner.plans(hooks)), Run()):
            return self._forward(inputs, kwargs)

    def hooks(self, hooks: Sequence[HookSpec]) -> installed:
        """Keep ``hooks`` on the model for the ``with`` block (every call inside, in this
        thread, uses them): ``with model.hooks([...]) as m: m(tokens)``."""
        return installed(self.model, wire(self.planner.plans(hooks)), Run(), value=self)

    def generate(
        self,
        inputs: Any,
        max_new_tokens: int | None = None,
        *,
        hooks: Sequence[HookSpec] = (),
        output: str = "ids",
        progress: bool | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """Generate with ``hooks`` on every forward, through transformers' ``generate`` (key/
        value cache on; greedy unless ``do_sample=True``). Returns token ids [batch, prompt +
        new] (``output="text"``: decoded; ``output="inputs"``: what ``run_with_cache`` takes).
        A hook may take a third parameter ``context`` (absolute positions, step); see
        :mod:`hookscope.generation` for what a hook sees per step and how padding works.

        >>> out = model.generate("The cat", max_new_tokens=10, hooks=[("resid_post.1", steer)])
        """
        from hookscope.generation import generate

        return generate(
            self,
            inputs,
            max_new_tokens,
            hooks=hooks,
            output=output,
            progress=progress,
            **generate_kwargs,
        )


def _check_backward(backward: Any) -> None:
    """InputError unless ``backward`` is None or a callable of one argument."""
    if backward is not None and not (callable(backward) and takes_positional(backward, 1)):
        raise InputError(
            "backward must be a callable output -> scalar tensor (e.g. a Metric from "
            f"hookscope.interventions, or lambda logits: logits[0, -1, 5]), got "
            f"{describe_signature(backward) if callable(backward) else repr(backward)}"
        )


def _scalar_of(backward: Callable[[Any], Tensor], out: Any, run: Run) -> Tensor:
    """``backward(out)``, checked to be a scalar tensor the gradients can flow from."""
    value = backward(out)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise InputError(
            f"backward must return a scalar tensor, got "
            f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
        )
    if run.grad_targets and not value.requires_grad:
        raise InputError(
            "backward's value does not depend differentiably on the model output "
            "(computed under no_grad, detached, or through .item()/argmax?); return "
            "a scalar computed from the output, e.g. lambda logits: logits[0, -1, 42]"
        )
    return value
