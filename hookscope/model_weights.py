"""The weights and the readout of a wrapped model, under TransformerLens' names.

``HookedModel`` inherits these; each adapter declares where its weights live
(:mod:`hookscope.adapters.weights` documents shapes and orientation), so they read the same
on every architecture. Vision models: a ViT answers with its classifier head (``W_U`` is
[d_model, n_classes], ``unembed`` applies ``ln_final`` and ``head`` at every position given,
while the model itself reads the CLS position 0); an MLP or CNN has no residual stream to
read out and raises SiteUnavailableError naming its output head module.
"""

from __future__ import annotations

from torch import Tensor

from hookscope.adapters.weights import LayerWeights, TransformerWeights
from hookscope.errors import SiteUnavailableError

__all__ = ["WeightAccess"]


class WeightAccess:
    """Mixin: ``W_U``, ``W_E``, ``W_pos``, ``b_U``, per-layer ``W_Q`` ... ``W_out``,
    ``final_norm`` and ``unembed`` (see :mod:`hookscope.adapters.weights`)."""

    adapter: object

    @property
    def weights(self) -> TransformerWeights:
        """The adapter's weight table (transformers only)."""
        found = getattr(self.adapter, "weights", None)
        if not isinstance(found, TransformerWeights):
            name = getattr(self.adapter, "name", "?")
            head = getattr(getattr(self.adapter, "head", None), "compute", None)
            where = (
                f" Its output head is module:{head} (read its weights from model.model)."
                if head
                else ""
            )
            raise SiteUnavailableError(
                f"this {name} model is not a transformer: it has no residual stream, "
                f"unembedding or final norm to read out (W_U, W_E, final_norm, unembed, the "
                f"logit lens and DLA need one).{where}"
            )
        return found

    # ------------------------------------------------------------------ readout
    @property
    def W_U(self) -> Tensor:
        """Unembedding [d_model, d_vocab] (a view of the output head's weight)."""
        return self.weights.W_U

    @property
    def b_U(self) -> Tensor:
        """Unembedding bias [d_vocab]; zeros where the head has none."""
        return self.weights.b_U

    @property
    def W_E(self) -> Tensor:
        """Token embedding [d_vocab, d_model] (Gemma multiplies its output by sqrt(d_model);
        the ``embed`` address holds the scaled value)."""
        return self.weights.W_E

    @property
    def W_pos(self) -> Tensor | None:
        """Learned position embedding [n_ctx, d_model]; None for rotary models."""
        return self.weights.W_pos

    def final_norm(self, resid: Tensor) -> Tensor:
        """The model's own final LayerNorm/RMSNorm applied to ``resid`` [..., d_model]
        (its statistics from ``resid`` itself). Its output on the real stream is the
        ``final_norm`` address (alias ``ln_final``)."""
        return self.weights.final_norm(resid)

    def unembed(self, resid: Tensor) -> Tensor:
        """Logits [..., d_vocab] from a residual stream [..., d_model]: the final norm, the
        unembedding and its bias, and Gemma's final logit soft-cap (``cap * tanh(x / cap)``)
        where the config sets one. ``model.unembed(cache["resid_post.{L-1}"])`` equals the
        model's logits."""
        return self.weights.unembed(resid)

    # ------------------------------------------------------------------ per layer
    def _layers(self, name: str) -> LayerWeights | None:
        return self.weights.layer_weights(name)

    @property
    def W_Q(self) -> LayerWeights:
        """``W_Q[l]``: [n_heads, d_model, d_head]; ``W_Q[l, h]`` one head."""
        return self._layers("W_Q")  # type: ignore[return-value]

    @property
    def W_K(self) -> LayerWeights:
        """``W_K[l]``: [n_heads, d_model, d_head]; under GQA head h is k/v head h // group."""
        return self._layers("W_K")  # type: ignore[return-value]

    @property
    def W_V(self) -> LayerWeights:
        """``W_V[l]``: [n_heads, d_model, d_head]; under GQA head h is k/v head h // group."""
        return self._layers("W_V")  # type: ignore[return-value]

    @property
    def W_O(self) -> LayerWeights:
        """``W_O[l]``: [n_heads, d_head, d_model]; ``head.l.h.result = z_h @ W_O[l, h]``."""
        return self._layers("W_O")  # type: ignore[return-value]

    @property
    def b_Q(self) -> LayerWeights:
        return self._layers("b_Q")  # type: ignore[return-value]

    @property
    def b_K(self) -> LayerWeights:
        return self._layers("b_K")  # type: ignore[return-value]

    @property
    def b_V(self) -> LayerWeights:
        return self._layers("b_V")  # type: ignore[return-value]

    @property
    def b_O(self) -> LayerWeights:
        """``b_O[l]``: [d_model]; ``attn_out.l`` = sum of head results + ``b_O[l]``."""
        return self._layers("b_O")  # type: ignore[return-value]

    @property
    def W_in(self) -> LayerWeights:
        """``W_in[l]``: [d_model, d_mlp], the up projection of a gated MLP."""
        return self._layers("W_in")  # type: ignore[return-value]

    @property
    def b_in(self) -> LayerWeights:
        return self._layers("b_in")  # type: ignore[return-value]

    @property
    def W_gate(self) -> LayerWeights | None:
        """``W_gate[l]``: [d_model, d_mlp] on gated MLPs (``neuron.l.pre = x @ W_gate[l]``);
        None otherwise."""
        return self._layers("W_gate")

    @property
    def W_out(self) -> LayerWeights:
        """``W_out[l]``: [d_mlp, d_model]; ``mlp_out.l = neuron.l @ W_out[l] + b_out[l]``."""
        return self._layers("W_out")  # type: ignore[return-value]

    @property
    def b_out(self) -> LayerWeights:
        return self._layers("b_out")  # type: ignore[return-value]
