"""hookscope's own ViT (:class:`hookscope.models.ViT`): pre-LN blocks over CLS + patch tokens.

``embed`` is the patch embedding [batch, n_patches, d_model] (no CLS, no positions);
``resid_pre.0`` adds the CLS token and positions. ``logits`` is [batch, n_classes].
"""

from hookscope.adapters.base import Dims
from hookscope.adapters.transformer import FusedQKV, Readout, TransformerSpec


def _dims(root) -> Dims:
    c = root.config
    return Dims(
        n_layers=c["n_layers"],
        d_model=c["d_model"],
        n_heads=c["n_heads"],
        n_kv_heads=c["n_heads"],
        d_head=c["d_model"] // c["n_heads"],
        d_mlp=c["d_mlp"],
        extra={"image_size": c["image_size"], "in_channels": c["in_channels"]},
    )


SPEC = TransformerSpec(
    name="vit",
    layers="blocks",
    embed="patch_embed",
    unembed="head",
    attn="attn",
    qkv=FusedQKV("attn.qkv", layout="qkv"),
    attn_out_proj="attn.out_proj",
    mlp="mlp",
    mlp_pre="mlp.fc1",
    mlp_post="mlp.fc2",
    dims=_dims,
    readout=Readout(final_norm="ln_final", norm="layer", pos_embed="pos_embed", classifier=True),
    pattern_module="attn.softmax",
    token_input=False,
)
