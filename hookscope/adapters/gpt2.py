"""GPT-2: sequential residual, fused QKV laid out [all q | all k | all v], Conv1D projections.

``resid_pre.0`` is token plus position embedding; ``embed`` is the token embedding alone.
"""

from hookscope.adapters.base import Dims
from hookscope.adapters.transformer import FusedQKV, Readout, TransformerSpec


def _dims(root) -> Dims:
    c = root.config
    return Dims(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        n_kv_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner if c.n_inner is not None else 4 * c.n_embd,
        d_vocab=c.vocab_size,
        extra={"max_positions": c.n_positions},  # learned absolute positions
    )


SPEC = TransformerSpec(
    name="gpt2",
    layers=("transformer.h", "h"),
    embed=("transformer.wte", "wte"),
    unembed=("lm_head",),
    attn="attn",
    qkv=FusedQKV("attn.c_attn", layout="qkv"),
    attn_out_proj="attn.c_proj",
    mlp="mlp",
    mlp_pre="mlp.c_fc",
    mlp_post="mlp.c_proj",
    dims=_dims,
    readout=Readout(
        final_norm=("transformer.ln_f", "ln_f"), norm="layer", pos_embed=("transformer.wpe", "wpe")
    ),
)
