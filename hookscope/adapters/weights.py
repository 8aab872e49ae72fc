"""Weights of a transformer in TransformerLens' orientation, read off the adapter's table.

Every matrix multiplies activations from the right (``x @ W``), as in TransformerLens:

============  ======================================  =========================================
name          shape                                   meaning
============  ======================================  =========================================
``W_E``       [d_vocab, d_model]                      token embedding (``embed`` = ``W_E[ids]``,
                                                      times Gemma's sqrt(d_model) scale)
``W_pos``     [n_ctx, d_model] or None                learned positions (GPT-2, BERT, ViT); None
                                                      with rotary positions
``W_U``       [d_model, d_vocab]                      unembedding (a classifier head on a ViT:
                                                      [d_model, n_classes])
``b_U``       [d_vocab]                               its bias; zeros where the model has none
``W_Q[l]``    [n_heads, d_model, d_head]              ``head.l.h.q = x @ W_Q[l][h] + b_Q[l][h]``
``W_K[l]``    [n_heads, d_model, d_head]              under GQA head h reads k/v head
``W_V[l]``                                            ``h // (n_heads // n_kv_heads)``, as the
                                                      address grammar maps ``head.l.h.k``
``W_O[l]``    [n_heads, d_head, d_model]              ``head.l.h.result = z_h @ W_O[l][h]``
``W_in[l]``   [d_model, d_mlp]                        first MLP matrix (the *up* projection of a
                                                      gated MLP, as in TransformerLens)
``W_gate[l]`` [d_model, d_mlp] or None                gated MLPs: ``neuron.l.pre = x @ W_gate[l]``
``W_out[l]``  [d_mlp, d_model]                        ``mlp_out`` = ``neuron.l @ W_out[l] + b_out``
============  ======================================  =========================================

``x`` is the input of the projection (after the block's norm). Weights are views of the
parameters (writing to them changes the model) except where a layout forbids it: k/v of a
grouped-query model expanded to ``n_heads`` are gathered copies, and weights accelerate
offloaded are copies read from the offload map (:func:`hookscope.dispatch.weight`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hookscope.adapters.base import submodule
from hookscope.dispatch import weight as real_weight
from hookscope.errors import AddressRangeError, SiteUnavailableError

__all__ = ["Readout", "TransformerWeights", "LayerWeights", "norm_scale"]


@dataclass(frozen=True)
class Readout:
    """How a transformer turns its last residual stream into logits (part of its spec).

    ``final_norm``: module path(s) of the final LayerNorm/RMSNorm (None: none, e.g. BERT's
    post-LN blocks end normalised). ``norm``: ``"layer"`` (centre, divide by the standard
    deviation) or ``"rms"`` (divide by the root mean square). ``norm_offset``: added to the
    norm's weight (Gemma's RMSNorm multiplies by ``1 + weight``). ``pos_embed``: module with a
    ``.weight`` or a parameter holding learned positions. ``softcap(root)``: the final
    logit soft-cap (``cap * tanh(logits / cap)``), None where there is none. ``head_pre``:
    a module applied between the final norm and the unembedding (BERT's MLM transform).
    ``classifier``: the unembedding is a classifier over classes, not a vocabulary.
    """

    final_norm: str | tuple[str, ...] | None
    norm: str = "layer"
    norm_offset: float = 0.0
    pos_embed: str | tuple[str, ...] | None = None
    softcap: Callable[[nn.Module], float | None] = field(default=lambda root: None)
    head_pre: str | None = None
    classifier: bool = False


def norm_scale(x: Tensor, kind: str, eps: float) -> Tensor:
    """The denominator a norm divides ``x`` by, [..., 1]: sqrt(var + eps) for LayerNorm,
    sqrt(mean(x^2) + eps) for RMSNorm (computed in float32 at least, as Hugging Face does)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if kind == "layer":
        xf = xf - xf.mean(-1, keepdim=True)
    return (xf.pow(2).mean(-1, keepdim=True) + eps).sqrt().to(x.dtype)


class LayerWeights:
    """One weight of every layer: ``W[l]`` is layer l's tensor (a view), ``W[l, h]`` one
    head's; ``W.stack()`` (or ``torch.stack(list(W))``) the [n_layers, ...] tensor."""

    def __init__(self, name: str, n_layers: int, get: Callable[[int], Tensor]):
        self.name, self.n_layers, self._get = name, n_layers, get

    def __len__(self) -> int:
        return self.n_layers

    def __getitem__(self, key: int | tuple[int, ...]) -> Tensor:
        layer, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise AddressRangeError(
                f"{self.name}[layer] takes an int layer (and optionally a head), got {key!r}"
            )
        if not -self.n_layers <= layer < self.n_layers:
            raise AddressRangeError(
                f"{self.name}: layer {layer} out of range, the model has {self.n_layers} layers "
                f"(0-{self.n_layers - 1})"
            )
        w = self._get(layer % self.n_layers)
        if rest:
            if len(rest) > 1 or isinstance(rest[0], bool) or not isinstance(rest[0], int):
                raise AddressRangeError(f"{self.name}[layer, head] takes one int head, got {key!r}")
            if not -w.shape[0] <= rest[0] < w.shape[0]:
                raise AddressRangeError(
                    f"{self.name}: head {rest[0]} out of range, layer {layer} has {w.shape[0]} "
                    f"heads (0-{w.shape[0] - 1})"
                )
            return w[rest[0]]
        return w

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(self.n_layers))

    def stack(self) -> Tensor:
        """[n_layers, ...]: every layer's tensor stacked (a copy)."""
        return torch.stack(list(self))

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_layers, *self[0].shape)

    def __repr__(self) -> str:
        return f"<{self.name}: {self.n_layers} layers of {list(self[0].shape)}>"


def _in_out(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight as [in, out], bias [out] or None) of a Linear or transformers' Conv1D."""
    w = real_weight(module, "weight")
    if type(module).__name__ != "Conv1D":  # nn.Linear stores [out, in]
        w = w.t()
    b = real_weight(module, "bias") if getattr(module, "bias", None) is not None else None
    return w, b


class TransformerWeights:
    """The weights and readout of one wrapped transformer (see the module docstring)."""

    def __init__(self, adapter):  # a TransformerAdapter
        spec = adapter.spec
        self.adapter, self.root, self.readout = adapter, adapter.root, spec.readout
        self.name = spec.name

    # ------------------------------------------------------------------ readout
    def _missing(self, what: str, why: str) -> SiteUnavailableError:
        return SiteUnavailableError(f"this {self.name} model has no {what}: {why}")

    @property
    def final_norm_module(self) -> nn.Module:
        paths = self.readout.final_norm
        if paths is None:
            raise self._missing(
                "final norm",
                "its blocks are post-LayerNorm, so resid_post of the last layer is already "
                "normalised; model.unembed(resid) applies the output head",
            )
        return submodule(self.root, _first(self.root, paths))

    @property
    def norm_eps(self) -> float:
        m = self.final_norm_module
        eps = getattr(m, "eps", None)
        return float(eps if eps is not None else m.variance_epsilon)

    def norm_weight(self) -> Tensor:
        """The final norm's effective per-feature multiplier [d_model] (Gemma: 1 + weight)."""
        m = self.final_norm_module
        if getattr(m, "weight", None) is None:
            return torch.ones(int(self.adapter.dims.d_model))
        w = real_weight(m, "weight")
        return w + self.readout.norm_offset if self.readout.norm_offset else w

    def norm_bias(self) -> Tensor | None:
        m = self.final_norm_module
        return real_weight(m, "bias") if getattr(m, "bias", None) is not None else None

    def scale(self, resid: Tensor) -> Tensor:
        """[..., 1]: what the final norm divides ``resid`` (its input) by."""
        return norm_scale(resid, self.readout.norm, self.norm_eps)

    def frozen_norm(self, stack: Tensor, scale: Tensor) -> Tensor:
        """The final norm as the linear map it is once its scale is fixed: centre (LayerNorm),
        divide by ``scale``, multiply by the weight; no bias. Sums of inputs map to sums."""
        if self.readout.norm == "layer":
            stack = stack - stack.mean(-1, keepdim=True)
        w = self.norm_weight()
        return stack / scale * w.to(stack.device, stack.dtype)

    def final_norm(self, resid: Tensor) -> Tensor:
        """The model's own final norm applied to ``resid`` [..., d_model]."""
        return self.final_norm_module(resid)

    @property
    def unembed_module(self) -> nn.Module:
        path = self.adapter.unembed_path
        if path is None:
            raise self._missing(
                "unembedding", "it was loaded without its output head (head='none')"
            )
        return submodule(self.root, path)

    @property
    def softcap(self) -> float | None:
        return self.readout.softcap(self.root)

    def unembed(self, resid: Tensor) -> Tensor:
        """Logits from the residual stream: the final norm, the head's own pre-transform
        (BERT), the unembedding with its bias, then the soft-cap where the model has one."""
        x = self.final_norm(resid) if self.readout.final_norm is not None else resid
        if self.readout.head_pre is not None:
            x = submodule(self.root, self.readout.head_pre)(x)
        logits = self.unembed_module(x)
        cap = self.softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    @property
    def W_U(self) -> Tensor:
        return _in_out(self.unembed_module)[0]

    @property
    def b_U(self) -> Tensor:
        w, b = _in_out(self.unembed_module)
        return b if b is not None else torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)

    @property
    def W_E(self) -> Tensor:
        embed = submodule(self.root, self.adapter.embed_path)
        if isinstance(embed, nn.Embedding):
            return real_weight(embed, "weight")
        raise self._missing(
            "token embedding matrix",
            f"its embed module is a {type(embed).__name__} (patches, not a lookup table); "
            "read its parameters from model.model",
        )

    @property
    def W_pos(self) -> Tensor | None:
        paths = self.readout.pos_embed
        if paths is None:
            return None
        path = _first(self.root, paths, params=True)
        owner, _, leaf = path.rpartition(".")
        mod = submodule(self.root, owner) if owner else self.root
        if isinstance(getattr(mod, leaf, None), nn.Module):
            return real_weight(getattr(mod, leaf), "weight")
        w = real_weight(mod, leaf)
        return w.reshape(-1, w.shape[-1])  # a [1, n_ctx, d_model] parameter

    # ------------------------------------------------------------------ per layer
    def _layer(self, layer: int, rel: str) -> nn.Module:
        return submodule(self.root, self.adapter.layer_path(layer, rel))

    def _qkv(self, layer: int, which: int, bias: bool) -> Tensor:
        from hookscope.adapters.transformer import FusedQKV, SplitQKV, fused_view, heads_view

        qkv, d = self.adapter.spec.qkv, self.adapter.dims
        h, kv, dh = int(d.n_heads), int(d.n_kv_heads or d.n_heads), int(d.d_head)
        if isinstance(qkv, FusedQKV):
            w, b = _in_out(self._layer(layer, qkv.path))
            view = fused_view(qkv.layout, h, dh, which)
        else:
            assert isinstance(qkv, SplitQKV)
            w, b = _in_out(self._layer(layer, (qkv.q, qkv.k, qkv.v)[which]))
            view = heads_view(h if which == 0 else kv, dh)
        if bias:
            out = view(b) if b is not None else w.new_zeros(view(w[0]).shape)
        else:
            out = view(w).permute(1, 0, 2)  # [in, heads, d_head] -> [heads, in, d_head]
        if which and kv != h:  # query head h reads k/v head h // group
            out = out.index_select(0, torch.arange(h, device=out.device) // (h // kv))
        return out

    def _mlp(self, rel: str | None, bias: bool) -> Callable[[int], Tensor]:
        def get(layer: int) -> Tensor:
            assert rel is not None
            w, b = _in_out(self._layer(layer, rel))
            if not bias:
                return w
            return b if b is not None else w.new_zeros(w.shape[1])

        return get

    def layer_weights(self, name: str) -> LayerWeights | None:
        """``W_Q``, ``b_Q``, ..., ``W_O``, ``b_O``, ``W_in``, ``b_in``, ``W_gate``, ``W_out``,
        ``b_out`` for every layer; None for ``W_gate``/``b_gate`` on a non-gated MLP."""
        spec, n = self.adapter.spec, self.adapter.n_layers
        if name[2:] in ("Q", "K", "V"):
            which, bias = "QKV".index(name[2]), name[0] == "b"
            return LayerWeights(name, n, lambda layer: self._qkv(layer, which, bias))
        if name == "W_O":
            return LayerWeights(name, n, lambda layer: self.adapter.w_o(layer)[0])
        if name == "b_O":
            return LayerWeights(name, n, self._b_o)
        gated = spec.mlp_up is not None
        rel = {
            "in": spec.mlp_up if gated else spec.mlp_pre,
            "gate": spec.mlp_pre if gated else None,
            "out": spec.mlp_post,
        }[name[2:]]
        if rel is None:
            return None
        return LayerWeights(name, n, self._mlp(rel, name[0] == "b"))

    def _b_o(self, layer: int) -> Tensor:
        w, b = self.adapter.w_o(layer)
        return b if b is not None else torch.zeros(w.shape[-1], dtype=w.dtype, device=w.device)


def _first(root: nn.Module, paths: str | tuple[str, ...], params: bool = False) -> str:
    options = (paths,) if isinstance(paths, str) else paths
    names = {n for n, _ in root.named_modules()}
    if params:
        names |= {n for n, _ in root.named_parameters()}
    for p in options:
        if p in names:
            return p
    raise SiteUnavailableError(f"none of {', '.join(options)} exist in {type(root).__name__}")
