"""GPT-NeoX (the pythia family): parallel residual, fused per-head-interleaved QKV, rotary.

``query_key_value`` outputs [batch, pos, n_heads * 3 * d_head] laid out per head as
[q_h k_h v_h]; rotary is applied inside the attention module, after the q/k taps.
With ``use_parallel_residual=True`` (every pythia) there is no ``resid_mid``.
"""

from hookscope.adapters.base import Dims
from hookscope.adapters.transformer import FusedQKV, Readout, TransformerSpec


def _dims(root) -> Dims:
    c = root.config
    return Dims(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_attention_heads,
        d_head=c.hidden_size // c.num_attention_heads,
        d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size,
    )


SPEC = TransformerSpec(
    name="gpt_neox",
    layers=("gpt_neox.layers", "layers"),
    embed=("gpt_neox.embed_in", "embed_in"),
    unembed=("lm_head", "embed_out"),
    attn="attention",
    qkv=FusedQKV("attention.query_key_value", layout="head"),
    attn_out_proj="attention.dense",
    mlp="mlp",
    mlp_pre="mlp.dense_h_to_4h",
    mlp_post="mlp.dense_4h_to_h",
    dims=_dims,
    readout=Readout(final_norm=("gpt_neox.final_layer_norm", "final_layer_norm"), norm="layer"),
    sequential_residual=lambda root: not root.config.use_parallel_residual,
    missing_note="GPT-NeoX with use_parallel_residual=True: attention and MLP both read resid_pre",
)
