"""Generic transformer adapter driven by a declarative :class:`TransformerSpec`.

Each architecture file (gpt_neox.py, gpt2.py, llama.py, vit.py) is a spec: module paths
with ``{L}`` for the layer, the QKV layout, and how to read sizes. Conventions, identical on
every architecture:

* ``resid_pre.L`` is block L's input, ``resid_post.L`` its output; ``resid_mid.L`` (only on
  sequential-residual blocks) is ``resid_pre.L + attn_out.L``.
* ``head.L.H.q/k/v`` are the projections before rotary/positional transforms (as in
  TransformerLens' ``hook_q``/``hook_k``); ``z`` is the input of the attention output
  projection; ``pattern`` is the post-softmax attention [batch, n_heads, dest, src].
* ``neuron.L.I.pre`` is the first MLP projection's output (the gate projection on gated
  MLPs); ``neuron.L.I`` (post) is the input of the MLP output projection.
* ``logits`` is the unembedding's output. A model that soft-caps its logits after the
  unembedding (Gemma's ``final_logit_softcapping``) returns ``cap * tanh(logits / cap)``
  of it, as ``model.unembed`` computes; hooks on ``logits`` write before the cap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from hookscope.adapters.base import (
    Adapter,
    Dims,
    Tap,
    check_choice_part,
    check_token_input,
    submodule,
)
from hookscope.adapters.weights import Readout, TransformerWeights
from hookscope.addresses import Slot, unit_position
from hookscope.dispatch import weight as real_weight
from hookscope.errors import AdapterError, InputError

__all__ = [
    "TransformerSpec",
    "TransformerAdapter",
    "FusedQKV",
    "SplitQKV",
    "Readout",
    "fused_view",
    "heads_view",
]


@dataclass(frozen=True)
class FusedQKV:
    """One projection producing q, k and v.

    ``layout="head"``: per head [q k v] interleaved (GPT-NeoX), viewed (n_heads, 3, d_head).
    ``layout="qkv"``: all q, then all k, then all v (GPT-2, ViT), viewed (3, n_heads, d_head).
    """

    path: str
    layout: str


@dataclass(frozen=True)
class SplitQKV:
    """Separate q, k, v projections (Llama family); k/v may have fewer heads (GQA)."""

    q: str
    k: str
    v: str


@dataclass(frozen=True)
class TransformerSpec:
    """One architecture family as data. Paths are relative to the wrapped module; ``{L}``
    marks the layer index. A tuple of paths means 'the first that exists'."""

    name: str
    layers: str | tuple[str, ...]
    embed: str | tuple[str, ...]
    unembed: str | tuple[str, ...]
    attn: str  # relative to a layer
    qkv: FusedQKV | SplitQKV  # relative to a layer
    attn_out_proj: str  # relative to a layer; its input is z
    mlp: str
    mlp_pre: str  # output = neuron pre
    mlp_post: str  # input = neuron post
    dims: Callable[[nn.Module], Dims]
    sequential_residual: Callable[[nn.Module], bool] = lambda root: True
    pattern_module: str | None = None  # relative to a layer; None = HF attention function
    attn_out_module: str | None = None  # what adds into the residual, if not ``attn`` (post-norms)
    mlp_out_module: str | None = None  # likewise for the MLP
    resid_mid_module: str | None = None  # post-LN blocks (BERT): resid_mid is this module's output
    token_input: bool = True
    missing_note: str = ""  # appended to the error for resid_mid when absent
    mlp_up: str | None = None  # gated MLPs: the up projection (multiplied by act(gate))
    mlp_act: str | None = None  # gated MLPs: the activation module applied to the gate
    readout: Readout = Readout(final_norm=None)  # final norm, positions, soft-cap


def _first_existing(root: nn.Module, paths: str | tuple[str, ...]) -> str:
    options = (paths,) if isinstance(paths, str) else paths
    names = {n for n, _ in root.named_modules()}
    for p in options:
        if p in names:
            return p
    raise AdapterError(f"none of the modules {', '.join(options)} exist in {type(root).__name__}")


#: a gated MLP's parts (block_part names) and the spec fields holding their paths
_GATED_PARTS = {"gate": "mlp_pre", "up": "mlp_up", "down": "mlp_post", "act": "mlp_act"}


class TransformerAdapter(Adapter):
    """Adapter for a transformer described by a :class:`TransformerSpec`."""

    unit_axes = {
        "q": 2,
        "k": 2,
        "v": 2,
        "z": 2,
        "result": 2,
        "pattern": 1,
        "neuron_pre": -1,
        "neuron_post": -1,
    }

    def __init__(self, root: nn.Module, spec: TransformerSpec):
        self.spec = spec
        self.name = spec.name
        super().__init__(root)
        self.layers_path = _first_existing(root, spec.layers)
        self.embed_path = _first_existing(root, spec.embed)
        try:
            self.unembed_path: str | None = _first_existing(root, spec.unembed)
        except AdapterError:  # a base model without its head: no logits address
            self.unembed_path = None
        self.has_resid_mid = spec.resid_mid_module is not None or bool(
            spec.sequential_residual(root)
        )
        n = len(submodule(root, self.layers_path))  # type: ignore[arg-type]
        if n != self.dims.n_layers:
            raise AdapterError(
                f"{spec.name}: config says {self.dims.n_layers} layers, module has {n}"
            )
        kinds = ["embed", "resid_pre", "resid_post", "attn_out", "mlp_out"]
        kinds += ["q", "k", "v", "z", "result", "pattern", "neuron_pre", "neuron_post"]
        if self.has_resid_mid:
            kinds.append("resid_mid")
        if self.unembed_path is not None:
            kinds.append("logits")
        self.final_norm_path: str | None = None
        if spec.readout.final_norm is not None:
            self.final_norm_path = _first_existing(root, spec.readout.final_norm)
            kinds.append("final_norm")
        self._kinds = tuple(kinds)
        self.weights = TransformerWeights(self)

    def _read_dims(self) -> Dims:
        return self.spec.dims(self.root)

    # ------------------------------------------------------------------ structure
    @property
    def token_input(self) -> bool:  # type: ignore[override]
        return self.spec.token_input

    @property
    def causal(self) -> bool:
        return self.spec.token_input and bool(getattr(self.attention_module(0), "is_causal", False))

    def blocks(self) -> list[nn.Module]:
        return list(submodule(self.root, self.layers_path))  # type: ignore[arg-type]

    def unembed_module(self) -> nn.Module | None:
        return None if self.unembed_path is None else submodule(self.root, self.unembed_path)

    def position_axis(self, slot: Slot) -> int | None:
        if slot.kind == "logits" and not self.spec.token_input:
            return None  # a vision transformer's logits: [batch, classes]
        return 2 if slot.kind == "pattern" else 1

    def block_part(self, layer: int, part: str) -> nn.Module | None:
        check_choice_part(part)
        spec = self.spec
        if part == "post_attn_norm":
            post = spec.attn_out_module
            if post is None or post == spec.attn_out_proj:
                return None
            return submodule(self.root, self.layer_path(layer, post))
        if part in _GATED_PARTS:
            rel = getattr(spec, _GATED_PARTS[part]) if spec.mlp_up and spec.mlp_act else None
        else:
            rel = spec.mlp if part == "mlp" else spec.attn_out_proj
        return None if rel is None else submodule(self.root, self.layer_path(layer, rel))

    @property
    def linear_head_tail(self) -> bool:
        return not self.spec.sequential_residual(self.root) and self.spec.attn_out_module is None

    def slot_kinds(self) -> tuple[str, ...]:
        return self._kinds

    def _why_missing(self, kind: str) -> str:
        if kind == "resid_mid" and not self.has_resid_mid:
            return f" ({self.spec.missing_note or 'attention and MLP read the same residual in parallel'})"
        return ""

    # ------------------------------------------------------------------ paths
    def layer_path(self, layer: int, rel: str = "") -> str:
        base = f"{self.layers_path}.{layer}"
        return f"{base}.{rel}" if rel else base

    def attention_module(self, layer: int) -> nn.Module:
        return submodule(self.root, self.layer_path(layer, self.spec.attn))

    def out_proj(self, layer: int) -> nn.Module:
        return submodule(self.root, self.layer_path(layer, self.spec.attn_out_proj))

    # ------------------------------------------------------------------ sizes
    def n_heads(self, layer: int, site: str) -> int:
        return int(self.dims.n_heads)  # type: ignore[arg-type]

    def n_neurons(self, layer: int, site: str) -> int:
        return int(self.dims.d_mlp)  # type: ignore[arg-type]

    @property
    def kv_group(self) -> int:
        d = self.dims
        return int(d.n_heads) // int(d.n_kv_heads or d.n_heads)  # type: ignore[arg-type]

    def unit_index(self, slot: Slot, index: int) -> int:
        return unit_position(slot.kind, index, self.kv_group)

    # ------------------------------------------------------------------ the table
    def _tap(self, slot: Slot) -> Tap:
        kind, layer = slot.kind, slot.layer
        d = self.dims
        h, dh = int(d.n_heads or 0), int(d.d_head or 0)
        if kind == "embed":
            return Tap(self.embed_path)
        if kind == "logits":
            assert self.unembed_path is not None
            return Tap(self.unembed_path)
        if kind == "final_norm":
            assert self.final_norm_path is not None
            return Tap(self.final_norm_path)
        if kind == "resid_pre":
            return Tap(self.layer_path(layer), "input", 0, "hidden_states")
        if kind == "resid_post":
            return Tap(self.layer_path(layer))
        attn_out = self.spec.attn_out_module or self.spec.attn
        if kind == "attn_out":
            return Tap(self.layer_path(layer, attn_out))
        if kind == "resid_mid":
            if self.spec.resid_mid_module is not None:
                return Tap(self.layer_path(layer, self.spec.resid_mid_module))
            return Tap(
                self.layer_path(layer, attn_out),
                special="resid_mid",
                stash=Slot("resid_pre", layer),
            )
        if kind == "mlp_out":
            return Tap(self.layer_path(layer, self.spec.mlp_out_module or self.spec.mlp))
        if kind == "neuron_pre":
            return Tap(self.layer_path(layer, self.spec.mlp_pre))
        if kind == "neuron_post":
            return Tap(self.layer_path(layer, self.spec.mlp_post), "input", 0, "input")
        if kind == "z":
            return Tap(
                self.layer_path(layer, self.spec.attn_out_proj),
                "input",
                0,
                "input",
                view=heads_view(h, dh),
            )
        if kind == "result":
            return Tap(self.layer_path(layer, self.spec.attn_out_proj), special="result")
        if kind == "pattern":
            if self.spec.pattern_module is not None:
                return Tap(self.layer_path(layer, self.spec.pattern_module))
            return Tap(self.layer_path(layer, self.spec.attn), "attention_fn", special="pattern")
        # q / k / v
        qkv = self.spec.qkv
        which = "qkv".index(kind)
        if isinstance(qkv, FusedQKV):
            view = fused_view(qkv.layout, h, dh, which)
            return Tap(self.layer_path(layer, qkv.path), view=view)
        path = (qkv.q, qkv.k, qkv.v)[which]
        n = h if kind == "q" else int(d.n_kv_heads or h)
        return Tap(self.layer_path(layer, path), view=heads_view(n, dh))

    def w_o(self, layer: int) -> tuple[Tensor, Tensor | None]:
        """Output projection as ([n_heads, d_head, d_model], bias [d_model] or None).

        Read through :func:`hookscope.dispatch.weight`, so a projection that accelerate has
        offloaded (its parameters on ``meta``) gives its real values, on its execution device."""
        proj = self.out_proj(layer)
        h, dh = int(self.dims.n_heads), int(self.dims.d_head)  # type: ignore[arg-type]
        weight = real_weight(proj, "weight")
        if type(proj).__name__ == "Conv1D":  # transformers' GPT-2 projection: weight [in, out]
            w = weight.view(h, dh, weight.shape[1])
        else:  # nn.Linear: weight [out, in]
            w = weight.view(weight.shape[0], h, dh).permute(1, 2, 0)
        bias = real_weight(proj, "bias") if getattr(proj, "bias", None) is not None else None
        return w, bias

    def check_input(self, inputs: Tensor) -> None:
        if self.spec.token_input:
            check_token_input(inputs, self.dims.d_vocab)
            limit = self.dims.extra.get("max_positions")
            if limit is not None and inputs.shape[-1] > limit:
                raise InputError(
                    f"{inputs.shape[-1]} positions exceed this {self.name} model's {limit} learned "
                    f"position embeddings; pass at most {limit} tokens"
                )
        else:
            extra = self.dims.extra
            want = (
                extra.get("in_channels", "channels"),
                extra.get("image_size", "height"),
                extra.get("image_size", "width"),
            )
            shape_ok = (
                isinstance(inputs, Tensor)
                and inputs.ndim == 4
                and all(
                    isinstance(w, str) or got == w
                    for got, w in zip(inputs.shape[1:], want, strict=True)
                )
            )
            if not isinstance(inputs, Tensor) or not inputs.dtype.is_floating_point or not shape_ok:
                got = (
                    f"shape {tuple(inputs.shape)}, dtype {inputs.dtype}"
                    if isinstance(inputs, Tensor)
                    else type(inputs).__name__
                )
                if isinstance(inputs, Tensor) and inputs.dtype.is_floating_point:
                    got = f"shape {tuple(inputs.shape)}"
                raise InputError(
                    f"{self.name} expects a float image tensor [batch, {', '.join(map(str, want))}], got {got}"
                )

    def describe(self) -> str:
        d = self.dims
        gqa = f", {d.n_kv_heads} k/v heads" if d.n_kv_heads and d.n_kv_heads != d.n_heads else ""
        return (
            f"{self.name}: {d.n_layers} layers, d_model {d.d_model}, {d.n_heads} heads of {d.d_head}{gqa}, "
            f"d_mlp {d.d_mlp}" + (f", vocab {d.d_vocab}" if d.d_vocab else "")
        )


def heads_view(n: int, dh: int) -> Callable[[Tensor], Tensor]:
    def view(t: Tensor) -> Tensor:
        return t.unflatten(-1, (n, dh))

    return view


def fused_view(layout: str, h: int, dh: int, which: int) -> Callable[[Tensor], Tensor]:
    if layout == "head":

        def view(t: Tensor) -> Tensor:
            return t.unflatten(-1, (h, 3, dh)).select(-2, which)

    else:

        def view(t: Tensor) -> Tensor:
            return t.unflatten(-1, (3, h, dh)).select(-3, which)

    return view
