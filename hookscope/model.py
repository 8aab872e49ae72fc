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

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hookscope._checks import (
    DTYPES,
    as_device,
    as_dtype,
    describe_signature,
    takes_positional,
)
from hookscope.adapters import make_adapter
from hookscope.adapters.base import Adapter
from hookscope.adapters.transformer import TransformerAdapter
from hookscope.addresses import (
    KINDS,
    Address,
    AttentionHead,
    MLPNeuron,
    Selection,
    Slot,
    iter_addresses,
    parse,
    slot_address,
)
from hookscope.cache import ActivationCache, Layout
from hookscope.errors import (
    AddressError,
    AddressParseError,
    InputError,
    format_choices,
    suggestion,
)
from hookscope.hooks import HookFn, Run, SlotPlan, Wiring, installed, wire
from hookscope.model_inputs import (
    aligned,
    check_hooks,
    check_keywords,
    checked_input,
    is_int_nest,
    is_texts,
    short,
    token_ids,
)
from hookscope.model_weights import WeightAccess

__all__ = ["HookedModel"]

HookSpec = tuple[Any, HookFn]
#: slot kinds cached when run_with_cache gets names=None (per-head 'result' is opt-in)
_DEFAULT_EXCLUDED = ("result", "module")
_DTYPES = DTYPES  # the dtype names every dtype= argument accepts


class _Dims:
    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self.n_layers = adapter.n_layers

    def n_heads(self, layer: int, site: str) -> int:
        self.adapter.check_slot(Slot(site, layer))
        return self.adapter.n_heads(layer, site)

    def n_neurons(self, layer: int, site: str) -> int:
        self.adapter.check_slot(Slot(f"neuron_{site}", layer))
        return self.adapter.n_neurons(layer, site)


class HookedModel(WeightAccess):
    """A wrapped model with address-based caching and hooks (see the module docstring);
    weights and readout (``W_U``, ``final_norm``, ``unembed``, ...) from :class:`WeightAccess`."""

    def __init__(self, model: nn.Module, adapter: Adapter, tokenizer: Any = None):
        self.model = model
        self.adapter = adapter
        self.tokenizer = tokenizer
        self._dims = _Dims(adapter)
        self._plan_memo: dict[tuple, tuple] = {}

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
        """Load a Hugging Face model (hub name or local folder) through transformers.

        The model is put in eval mode. ``dtype`` is a torch dtype or one of float32, float16,
        bfloat16, float64; ``device`` a device this torch can use (``"cpu"``, ``"cuda:0"``, ...).
        ``head`` picks the model class: ``causal_lm``, ``masked_lm``, ``none`` (the bare
        encoder/decoder, no logits) or ``auto`` (from the config's ``architectures``; causal LM
        if unnamed).

        Tokenizer: a folder without tokenizer files gives ``tokenizer=None`` (transformers
        would build an empty one from the config alone; a tokenizer holding only special
        tokens counts as none for hub names too); ``tokenizer=False`` skips it. Tokenizer
        files in a folder that do not load raise ModelLoadError naming them; a hub repo whose
        tokenizer files cannot be found or read (OSError, ValueError) gives ``tokenizer=None``
        with a UserWarning saying why, and any other tokenizer failure is a ModelLoadError.

        ``hf_kwargs`` go to transformers' ``from_pretrained`` (config, model and tokenizer),
        with these rules: hookscope never unpickles arbitrary objects, so ``weights_only=False``
        raises InputError (convert the checkpoint to safetensors; ``.bin`` files are read only
        through torch's restricted ``weights_only`` loader); ``torch_dtype=`` raises InputError
        (use ``dtype=``); ``trust_remote_code=True`` is allowed, because some architectures
        need it, but it runs the repository's own Python code with your privileges, so it
        warns (``UserWarning``) on every call.

        Errors are ModelLoadError saying what to do: a zoo name (``"digits-cnn"``) points to
        ``hookscope.zoo.load``; a path that does not exist says so; a missing, truncated or
        corrupt config, weights or tokenizer file is named.

        Models bigger than one device: ``device_map`` spreads the model over devices
        through transformers and accelerate: ``"auto"`` (or ``"balanced"``,
        ``"balanced_low_0"``, ``"sequential"``) lets accelerate place the modules within
        ``max_memory`` (``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``; GPU indices, ``"cpu"``,
        ``"mps"``, ``"disk"``); a dict ``{module name: device}`` places them yourself, with
        ``"cpu"`` (CPU offload next to GPUs) and ``"disk"`` allowed; a single device loads
        straight onto it. Weights mapped to ``"disk"`` need ``offload_folder``. Everything
        is checked before any weight is read (InputError naming the wrong argument and the
        choices): ``device`` together with ``device_map``; a device this machine lacks; a
        key naming no module (with the closest name); parameters the map leaves without a
        device; disk offload (also when ``"auto"`` computes it from ``max_memory``) without
        ``offload_folder``; ``max_memory`` without a strategy, ``offload_folder`` without
        ``device_map``. ``model.model.hf_device_map`` holds the resolved map.

        >>> model = HookedModel.from_pretrained(folder, device_map="auto",
        ...                                     max_memory={0: "10GiB", "cpu": "30GiB"},
        ...                                     offload_folder="offload")

        On such a model caching (every address kind), hooks, gradients, patching, ablation
        and attribution patching give the values of the model loaded whole; cached tensors
        stay on the device their module ran on (``cache.to("cpu")`` gathers them);
        accelerate's own hooks are never changed. Sweeps run without their oneDNN matrix
        products (reported in the result's ``shortcuts_off``); see :mod:`hookscope.loading`
        for the details and limits.
        """
        from hookscope.loading import load_pretrained

        model, tok = load_pretrained(
            name_or_path, device, dtype, tokenizer, head, hf_kwargs,
            device_map, max_memory, offload_folder,
        )  # fmt: skip
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
        if kind is not None and kind not in KINDS:
            raise AddressError(
                f"unknown kind {kind!r}; choose one of {format_choices(KINDS)}."
                + suggestion(kind, KINDS)
            )
        found: list[Address] = []
        for slot in self._all_slots():
            base = slot_address(slot)
            name = str(base).split(".")[0]
            if kind is not None and name != kind:
                continue
            found.append(base)
            if units and isinstance(base, AttentionHead):
                n = self.adapter.n_heads(slot.layer, slot.kind)
                found += [AttentionHead(slot.layer, h, base.site) for h in range(n)]
            elif units and isinstance(base, MLPNeuron):
                n = self.adapter.n_neurons(slot.layer, base.site)
                found += [MLPNeuron(slot.layer, i, base.site) for i in range(n)]
        return sorted(found)

    def resolve(self, spec: Any) -> list[Address]:
        """Expand addresses / strings / selections (or a list of them) and check each exists."""
        return list(iter_addresses(spec, self._dims, allow=self.adapter.check))

    # ------------------------------------------------------------------ tokens
    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InputError(
                "this model has no tokenizer; pass token ids (a LongTensor [batch, pos])"
            )
        return self.tokenizer

    def _tokenize(self, text: str | Sequence[str]) -> dict[str, Tensor]:
        if not is_texts(text):
            what = type(text).__name__ if not isinstance(text, (list, tuple)) else "a list"
            raise InputError(
                f"text input must be a string or a non-empty list of strings, got {what} "
                f"{short(text)}; token ids go to the model directly (a LongTensor [batch, pos])"
            )
        tok = self._need_tokenizer()
        text = [text] if isinstance(text, str) else list(text)
        rows = tok(list(text))["input_ids"]  # padded here, on the right, whatever the
        # tokenizer's own padding side, so positions mean the same in every row; with its
        # pad token, else its eos token, else 0 (the mask marks padding either way)
        empty = [i for i, r in enumerate(rows) if not r]
        if empty:
            raise InputError(
                f"text {text[empty[0]]!r} (row {empty[0]}) gives no tokens; every row needs at "
                "least one token"
            )
        width = max(len(r) for r in rows)
        pad = next((p for p in (tok.pad_token_id, tok.eos_token_id) if p is not None), 0)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}

    def to_tokens(self, text: str | Sequence[str]) -> Tensor:
        """Token ids [batch, pos]; strings of different lengths are right-padded (whatever the
        tokenizer's own padding side), so position p is the p-th token of every row."""
        return self._tokenize(text)["input_ids"].to(self.device)

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """Decode ids: [pos] -> str, [batch, pos] -> list of str."""
        t = token_ids(tokens, "to_string")
        tok = self._need_tokenizer()
        if t.ndim == 2:
            return [tok.decode(row) for row in t.tolist()]
        return tok.decode(t.tolist())

    def to_str_tokens(self, text: str | Tensor | Sequence[int]) -> list[str]:
        """Each token of one sequence as a string (a text, or ids [pos] / [1, pos])."""
        tok = self._need_tokenizer()
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
        from hookscope.interventions._metric_args import TokenText

        if not isinstance(text, str):
            raise InputError(f"to_single_token takes a string, got {type(text).__name__}")
        return int(TokenText((text,), True).ids(self.tokenizer, "text", "to_single_token"))

    # ------------------------------------------------------------------ forward
    def _prepare(self, inputs: Any, kwargs: dict) -> tuple[tuple, dict]:
        """The module's ``(args, kwargs)`` for ``inputs``; every check runs here, before the
        module is called. Floating inputs (images) are cast to the model's parameter dtype
        (float64 images into a float32 CNN just work); token ids are never changed. A
        keyword the module's forward does not take raises InputError (a Hugging Face model
        would ignore it); an attention mask must have the input ids' shape."""
        is_hf = hasattr(self.model, "config") and hasattr(self.model.config, "model_type")
        kwargs = dict(kwargs)
        if is_texts(inputs):
            enc = self._tokenize(inputs)
            kwargs = {**{k: v.to(self.device) for k, v in enc.items()}, **kwargs}
            inputs = kwargs.pop("input_ids")
        elif isinstance(inputs, Mapping):
            kwargs = {**{k: v for k, v in inputs.items() if k != "input_ids"}, **kwargs}
            if "input_ids" not in inputs:
                raise InputError(
                    f"a dict input needs 'input_ids' (and may hold attention_mask); got keys "
                    f"{sorted(inputs)}"
                )
            inputs = inputs["input_ids"]
        if isinstance(inputs, (list, tuple)) and is_int_nest(inputs):
            inputs = torch.tensor(inputs, dtype=torch.long)
        if not isinstance(inputs, Tensor):
            raise InputError(
                "model input must be a tensor, a string or a list of strings, got "
                f"{type(inputs).__name__} {short(inputs)} (token ids may also be a list of "
                "equal-length lists of ints)"
            )
        inputs = checked_input(self, inputs)
        check_keywords(self.model, kwargs, is_hf)
        for key in ("attention_mask", "token_type_ids"):
            if key in kwargs:
                kwargs[key] = aligned(key, kwargs[key], inputs).to(self.device)
        cast = self.dtype if inputs.is_floating_point() and self.dtype.is_floating_point else None
        inputs = inputs.to(device=self.device, dtype=cast)
        if is_hf:
            kwargs.setdefault("use_cache", False)
        return (inputs,), kwargs

    def _forward(self, inputs: Any, kwargs: dict) -> Any:
        args, kw = self._prepare(inputs, kwargs)
        out = self.model(*args, **kw)
        logits = getattr(out, "logits", None)
        return logits if isinstance(logits, Tensor) else out

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Run the model. Language models return logits [batch, pos, vocab]."""
        return self._forward(inputs, kwargs)

    forward = __call__

    # ------------------------------------------------------------------ planning
    def _all_slots(self) -> list[Slot]:
        slots = []
        for kind in self.adapter.slot_kinds():
            if kind in ("embed", "final_norm", "logits"):
                slots.append(Slot(kind))
            elif kind != "module":
                slots += [Slot(kind, layer) for layer in range(self.n_layers)]
        return slots

    def _slots_of(self, item: Address | Selection) -> list[Slot]:
        if isinstance(item, Address):
            self.adapter.check(item)
            return [item.slot]
        layers = item.layers.values(self.n_layers, "layer")
        out = []
        for layer in layers:
            if item.kind in ("head", "neuron"):
                kind = item.site if item.kind == "head" else f"neuron_{item.site}"
                slot = Slot(kind, layer)
                self.adapter.check_slot(slot)
                if item.units is not None and not item.units.is_all:
                    n = (
                        self._dims.n_heads(layer, item.site)
                        if item.kind == "head"
                        else self._dims.n_neurons(layer, item.site)
                    )
                    item.units.values(n, item.kind)  # range check
            else:
                slot = Slot(item.kind, layer)
                self.adapter.check_slot(slot)
            out.append(slot)
        return out

    def _cache_request(self, names: Any) -> tuple[list[Slot], list[Address | Selection] | None]:
        if names is None:
            return [s for s in self._all_slots() if s.kind not in _DEFAULT_EXCLUDED], None
        if isinstance(names, (str, Address, Selection)):
            specs = [names]
        elif isinstance(names, Iterable):
            specs = list(names)
        else:
            raise AddressParseError(
                f"expected an address, a selection string or a list of them, got {type(names).__name__}"
            )
        requested: list[Address | Selection] = []
        slots: list[Slot] = []
        for spec in specs:
            item = parse(spec)
            requested.append(item)
            slots += self._slots_of(item)
        return list(dict.fromkeys(slots)), requested

    def _plans(
        self, hooks: Sequence[HookSpec], record: Sequence[Slot] = (), grad: Sequence[Slot] = ()
    ) -> list[SlotPlan]:
        plans: dict[Slot, SlotPlan] = {}

        def plan_for(slot: Slot) -> SlotPlan:
            plan = plans.get(slot)
            if plan is None:
                tap = self.adapter.tap(slot)
                plan = SlotPlan(slot, tap)
                if slot.kind in self.adapter.unit_axes or slot.kind.startswith("neuron_"):
                    plan.axis = self.adapter.unit_axis(slot)
                if tap.special == "result":
                    plan.w_o = lambda layer=slot.layer: self.adapter.w_o(layer)  # type: ignore[attr-defined]
                    plan.n_heads = int(self.adapter.dims.n_heads)  # type: ignore[arg-type]
                plans[slot] = plan
            return plan

        for entry in check_hooks(hooks):
            spec, fn = entry
            for address in iter_addresses(spec, self._dims, allow=self.adapter.check):
                pos = (
                    None
                    if address.index is None
                    else self.adapter.unit_index(address.slot, address.index)
                )
                plan_for(address.slot).hooks.append((address, pos, fn))
        for slot in record:
            plan_for(slot).record = True
        for slot in grad:
            plan_for(slot).grad = True
        for plan in list(plans.values()):
            if plan.tap.stash is not None:
                plan_for(plan.tap.stash).stash = True
        return list(plans.values())

    def _layout(self, slots: Sequence[Slot]) -> Layout:
        axes, units = {}, {}
        for s in slots:
            if s.kind in ("q", "k", "v", "z", "result", "pattern"):
                axes[s], units[s] = self.adapter.unit_axis(s), self.adapter.n_heads(s.layer, s.kind)
            elif s.kind.startswith("neuron_"):
                axes[s], units[s] = (
                    self.adapter.unit_axis(s),
                    self.adapter.n_neurons(s.layer, s.kind[7:]),
                )
        group = self.adapter.kv_group if isinstance(self.adapter, TransformerAdapter) else 1
        return Layout(self.n_layers, axes, units, group)

    def _prepare_cache(
        self, names: Any, hooks: Sequence[HookSpec], backward: bool
    ) -> tuple[list[Slot], list[Address | Selection] | None, Wiring, Layout]:
        """Plan a cached run; without user hooks the plan is memoised per (names, backward)."""
        key = None
        if not hooks:
            try:
                key = (_names_key(names), backward)
            except TypeError:
                key = None
            if key is not None and key in self._plan_memo:
                return self._plan_memo[key]
        slots, requested = self._cache_request(names)
        plans = self._plans(hooks, record=slots, grad=slots if backward else ())
        prepared = (slots, requested, wire(plans), self._layout(slots))
        if key is not None:
            if len(self._plan_memo) >= 64:
                self._plan_memo.clear()
            self._plan_memo[key] = prepared
        return prepared

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
        if backward is not None and not (callable(backward) and takes_positional(backward, 1)):
            raise InputError(
                "backward must be a callable output -> scalar tensor (e.g. a Metric from "
                f"hookscope.interventions, or lambda logits: logits[0, -1, 5]), got "
                f"{describe_signature(backward) if callable(backward) else repr(backward)}"
            )
        slots, requested, wiring, layout = self._prepare_cache(names, hooks, backward is not None)
        run = Run()
        value = None
        grads = None
        grad_mode = torch.enable_grad() if backward is not None else torch.no_grad()
        with grad_mode:
            with installed(self.model, wiring, run):
                out = self._forward(inputs, kwargs)
            if backward is not None:
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
                grads = run.gradients(value.reshape(()))
        grad_cache = ActivationCache(grads, layout, requested) if grads is not None else None
        cache = ActivationCache(
            run.acts,
            layout,
            requested,
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
        with installed(self.model, wire(self._plans(hooks)), Run()):
            return self._forward(inputs, kwargs)

    def hooks(self, hooks: Sequence[HookSpec]) -> installed:
        """Keep ``hooks`` on the model for the ``with`` block (every call inside, in this
        thread, uses them): ``with model.hooks([...]) as m: m(tokens)``."""
        return installed(self.model, wire(self._plans(hooks)), Run(), value=self)

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


def _names_key(names: Any) -> tuple:
    """A hashable key for a ``names`` argument (raises TypeError for unhashable input)."""
    if names is None:
        return (None,)
    if isinstance(names, (str, Address, Selection)):
        return (str(names),)
    if isinstance(names, (list, tuple)):
        return tuple(str(n) if isinstance(n, (str, Address, Selection)) else hash(n) for n in names)
    raise TypeError("not memoisable")
