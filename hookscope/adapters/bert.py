"""BERT encoders (all-MiniLM-L6-v2 and friends): post-LayerNorm blocks, bidirectional attention.

A BERT block is ``mid = LN1(resid_pre + attn_out)``, ``resid_post = LN2(mid + mlp_out)``,
so the residual stream is re-normalised twice per block: ``resid_mid.L`` is the output of
``attention.output.LayerNorm`` (a real module output), ``attn_out.L`` the attention output
projection (before the add and norm) and ``mlp_out.L`` the MLP output projection.
``resid_pre.0`` is the embedding output (word + position + token type, normalised);
``embed`` the word embedding alone. ``logits`` exists on masked-LM models only.
"""

from hookscope.adapters.base import Dims
from hookscope.adapters.transformer import Readout, SplitQKV, TransformerSpec


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
        extra={"max_positions": c.max_position_embeddings},
    )


SPEC = TransformerSpec(
    name="bert",
    layers=("bert.encoder.layer", "encoder.layer"),
    embed=("bert.embeddings.word_embeddings", "embeddings.word_embeddings"),
    unembed=("cls.predictions.decoder",),
    attn="attention.self",
    qkv=SplitQKV("attention.self.query", "attention.self.key", "attention.self.value"),
    attn_out_proj="attention.output.dense",
    mlp="output",
    mlp_pre="intermediate.dense",
    mlp_post="output.dense",
    dims=_dims,
    readout=Readout(
        final_norm=None,  # post-LN blocks: resid_post of the last layer is already normalised
        pos_embed=("bert.embeddings.position_embeddings", "embeddings.position_embeddings"),
        head_pre="cls.predictions.transform",
    ),
    attn_out_module="attention.output.dense",
    mlp_out_module="output.dense",
    resid_mid_module="attention.output.LayerNorm",
)
