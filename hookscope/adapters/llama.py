"""Llama family (Llama, SmolLM2, Qwen2, Mistral): RMSNorm, gated MLP, rotary, grouped-query attention.

k/v projections have ``num_key_value_heads`` heads; query head ``h`` reads k/v head
``h // (n_heads // n_kv_heads)``, the grouping of Hugging Face's ``repeat_kv``. So
``head.L.H.k`` is a view of k/v head ``H // group`` and writing it changes that k/v head for
every query head of its group. ``neuron.L.I.pre`` is the gate projection's output;
``neuron.L.I`` (post) is ``act(gate) * up``, the input of ``down_proj``.
"""

from hookscope.adapters.base import Dims
from hookscope.adapters.transformer import Readout, SplitQKV, TransformerSpec


def _dims(root) -> Dims:
    c = root.config
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Dims(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        d_head=d_head,
        d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size,
    )


SPEC = TransformerSpec(
    name="llama",
    layers=("model.layers", "layers"),
    embed=("model.embed_tokens", "embed_tokens"),
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
    readout=Readout(final_norm=("model.norm", "norm"), norm="rms"),
)
