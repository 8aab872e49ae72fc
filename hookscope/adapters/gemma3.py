"""Gemma 3 (text): sandwich norms, gated MLP, q/k norms, rotary, GQA, sliding-window layers.

The attention and MLP outputs pass through their own RMSNorm before joining the residual,
so ``attn_out.L`` is the output of ``post_attention_layernorm`` and ``mlp_out.L`` that of
``post_feedforward_layernorm`` — what is added to the stream. ``head.L.H.q``/``.k`` are the
projection outputs, before the q/k norms and rotary. ``embed`` includes Gemma's
sqrt(d_model) embedding scale. k/v heads are grouped as in the Llama adapter.
"""

from hookscope.adapters.base import Dims
from hookscope.adapters.transformer import Readout, SplitQKV, TransformerSpec


def _dims(root) -> Dims:
    c = root.config
    c = getattr(c, "text_config", None) or c
    return Dims(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads,
        d_head=c.head_dim,
        d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size,
    )


def _softcap(root) -> float | None:
    c = root.config
    return getattr(getattr(c, "text_config", None) or c, "final_logit_softcapping", None)


SPEC = TransformerSpec(
    name="gemma3",
    layers=("model.layers", "layers", "model.language_model.layers"),
    embed=("model.embed_tokens", "embed_tokens", "model.language_model.embed_tokens"),
    unembed=("lm_head",),
    attn="self_attn",
    qkv=SplitQKV("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_pre="mlp.gate_proj",
    mlp_post="mlp.down_proj",
    dims=_dims,
    mlp_up="mlp.up_proj",
    mlp_act="mlp.act_fn",
    readout=Readout(
        final_norm=("model.norm", "norm", "model.language_model.norm"),
        norm="rms",
        norm_offset=1.0,  # Gemma's RMSNorm multiplies by (1 + weight)
        softcap=_softcap,
    ),
    attn_out_module="post_attention_layernorm",
    mlp_out_module="post_feedforward_layernorm",
)
