"""hookscope against its peers on the same weights: TransformerLens' TransformerBridge and nnsight.

Every comparison loads one ``save_pretrained`` folder into each library, runs the same tokens
and compares values (atol 1e-5, rtol 1e-5), site by site and layer by layer. Models:
``gpt_neox`` (pythia-70m-shaped, parallel residual), ``gpt_neox_seq`` (tiny GPT-NeoX with a
sequential residual, so resid_mid exists), ``gpt2`` (tiny) and ``llama_gqa`` (tiny Llama with
4 query heads sharing 2 k/v heads).

Conventions of the peers, as found in transformer-lens 4.3 and nnsight 0.8.1:

* The bridge is booted with ``TransformerBridge.boot_transformers(folder)``: fully offline
  from a local folder holding the model and a tokenizer (the bridge reloads the tokenizer
  from its ``name_or_path`` to add a BOS token, so an in-memory tokenizer without one fails
  with ``KeyError: 'name_or_path'``). The default boot runs the raw Hugging Face weights and
  already answers to the legacy hook names (``blocks.L.attn.hook_z``...).
  ``enable_compatibility_mode()`` is NOT called: with its defaults it folds layer norms and
  centres the writing weights and the unembedding, which changes resid/attn_out/mlp_out/
  logits by construction (with ``no_processing=True`` it changes nothing measurable).
  The bridge switches the HF model it wraps to eager attention; it loads its own copy here.
* ``hook_q``/``hook_k``/``hook_v`` of the bridge are the projections before rotary,
  [batch, pos, heads, d_head], k/v with n_kv_heads under GQA: hookscope's convention.
  On Llama the bridge also has ``hook_rot_q``/``hook_rot_k`` (after rotary), which hookscope
  does not expose; :func:`test_bridge_rotary_q_k_are_rotary_of_hookscope_q_k` checks them
  against HF's own ``apply_rotary_pos_emb`` of hookscope's q/k. The GPT-NeoX bridge has no
  post-rotary hook. ``hook_attn_scores`` (pre-softmax, masked with finfo.min) has no
  hookscope counterpart and is not compared.
* ``mlp.hook_pre`` of the bridge is the first projection's output (the gate projection,
  before its activation, on Llama) = hookscope ``neuron.L.pre``. The bridge's Llama
  ``mlp.hook_pre_linear`` (the up projection) has no hookscope address; it is compared with
  ``module:model.layers.L.mlp.up_proj``.
* The bridge's GPT-2 runs c_attn as three separate q/k/v products, so its q/k/v (and what
  follows) differ from Hugging Face's fused product by float rounding (~1e-7).
* ``hook_embed`` is the token embedding alone on both sides; GPT-2's ``hook_pos_embed`` has no
  hookscope address (resid_pre.0 = hook_embed + hook_pos_embed is checked).
* nnsight saves module inputs/outputs of the plain HF model (loaded with eager attention so
  the attention module returns its pattern); q/k/v are split here from the projection
  outputs the way Hugging Face's attention code splits them. Those sites are compared with a
  hookscope cache taken without the pattern (the model's sdpa path), the pattern with the
  full cache (hookscope's eager path). The intervention writes zeros into the output
  projection's input (z) inside the trace. nnsight is imported only by its fixture: on import
  it mounts ``.save`` on ``object`` and patches ``Tensor.backward`` process-wide.
* Per-head entries: hookscope's ``head.L.H.k`` under GQA is k/v head ``H // group``; checked
  against the bridge's [batch, pos, n_kv_heads, d_head] tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import pytest
import torch
from torch import Tensor

import hookscope as hs

import builders

ATOL = RTOL = 1e-5
BATCH, POS = 2, 8


def close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Arch:
    """One architecture as the peers see it: HF module paths and the q/k/v split."""

    layers: str
    out_proj: str  # relative to a layer; its input is z
    attn: str
    mlp: str
    mlp_in: str  # first MLP projection (gate on Llama): neuron pre
    mlp_out_proj: str  # its input is neuron post
    qkv: tuple[str, ...]  # projection module(s) producing q, k, v
    split: Callable[[list[Tensor], int, int, int], tuple[Tensor, Tensor, Tensor]]
    resid_mid: bool


def _split_neox(outs: list[Tensor], h: int, kv: int, dh: int):
    # modeling_gpt_neox: qkv.view(*shape, -1, 3 * head_size).chunk(3, dim=-1), per head [q k v]
    return outs[0].unflatten(-1, (h, 3 * dh)).chunk(3, dim=-1)


def _split_gpt2(outs: list[Tensor], h: int, kv: int, dh: int):
    # modeling_gpt2: c_attn(x).split(n_embd, dim=2), then .view(*shape, -1, head_dim)
    return tuple(t.unflatten(-1, (h, dh)) for t in outs[0].split(h * dh, dim=-1))


def _split_llama(outs: list[Tensor], h: int, kv: int, dh: int):
    q, k, v = outs
    return q.unflatten(-1, (h, dh)), k.unflatten(-1, (kv, dh)), v.unflatten(-1, (kv, dh))


_NEOX = dict(
    layers="gpt_neox.layers",
    out_proj="attention.dense",
    attn="attention",
    mlp="mlp",
    mlp_in="mlp.dense_h_to_4h",
    mlp_out_proj="mlp.dense_4h_to_h",
    qkv=("attention.query_key_value",),
    split=_split_neox,
)
ARCHS = {
    "gpt_neox": Arch(**_NEOX, resid_mid=False),
    "gpt_neox_seq": Arch(**_NEOX, resid_mid=True),
    "gpt2": Arch(
        layers="transformer.h",
        out_proj="attn.c_proj",
        attn="attn",
        mlp="mlp",
        mlp_in="mlp.c_fc",
        mlp_out_proj="mlp.c_proj",
        qkv=("attn.c_attn",),
        split=_split_gpt2,
        resid_mid=True,
    ),
    "llama_gqa": Arch(
        layers="model.layers",
        out_proj="self_attn.o_proj",
        attn="self_attn",
        mlp="mlp",
        mlp_in="mlp.gate_proj",
        mlp_out_proj="mlp.down_proj",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        split=_split_llama,
        resid_mid=True,
    ),
}
_TINY = {
    "gpt_neox_seq": lambda: builders.tiny_neox(parallel=False),
    "gpt2": builders.tiny_gpt2,
    "llama_gqa": builders.tiny_llama_gqa,
}


@pytest.fixture(scope="module", params=list(ARCHS))
def folder(request, tmp_path_factory) -> tuple[str, Path]:
    """(architecture name, a save_pretrained folder with model and tokenizer)."""
    name = request.param
    if name == "gpt_neox":
        return name, request.getfixturevalue("pythia_dir")
    path = tmp_path_factory.mktemp(name)
    _TINY[name]().save_pretrained(path)
    builders.make_tokenizer().save_pretrained(path)
    return name, path


def _tokens(vocab: int) -> Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (BATCH, POS), generator=g)


#: every site but the pattern: hookscope leaves the model's own (sdpa) attention in place
NO_PATTERN = [
    "embed",
    "resid_pre.*",
    "resid_post.*",
    "attn_out.*",
    "mlp_out.*",
    "head.*",
    "head.*.q",
]
NO_PATTERN += ["head.*.k", "head.*.v", "neuron.*", "neuron.*.pre", "logits"]


@pytest.fixture(scope="module")
def hooked(folder):
    """(name, arch, HookedModel, tokens, logits, full cache) for one architecture.

    The full cache (names=None) includes the pattern, so attention ran through hookscope's
    eager attention function."""
    name, path = folder
    model = hs.HookedModel.from_pretrained(str(path))
    tokens = _tokens(model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    return name, ARCHS[name], model, tokens, logits, cache


@pytest.fixture(scope="module")
def hooked_sdpa(hooked):
    """(logits, cache) of every site but the pattern: the model's sdpa attention ran."""
    model, tokens = hooked[2], hooked[3]
    return model.run_with_cache(tokens, names=NO_PATTERN)


def _hf(path: Path, eager: bool = False):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "eager"} if eager else {}
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


# ---------------------------------------------------------------------------- TransformerLens bridge


@pytest.fixture(scope="module")
def bridge(folder):
    """The TransformerBridge booted offline from the same folder (raw weights, no processing)."""
    pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    _, path = folder
    tl = TransformerBridge.boot_transformers(str(path), device="cpu")
    return tl


@pytest.fixture(scope="module")
def bridge_run(bridge, hooked):
    tokens = hooked[3]
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens)
    return logits, cache


def test_bridge_logits_and_embedding(hooked, bridge_run):
    name, _, model, _, logits, cache = hooked
    tl_logits, tl = bridge_run
    close(logits, tl_logits, "logits")
    close(cache["embed"], tl["hook_embed"], "embed vs hook_embed")
    if name == "gpt2":
        close(
            cache["resid_pre.0"],
            tl["hook_embed"] + tl["hook_pos_embed"],
            "resid_pre.0 vs embed + pos_embed",
        )


# hookscope address (with {L}) -> bridge hook name (legacy TransformerLens names)
BRIDGE_SITES = {
    "resid_pre.{L}": "blocks.{L}.hook_resid_pre",
    "resid_post.{L}": "blocks.{L}.hook_resid_post",
    "attn_out.{L}": "blocks.{L}.hook_attn_out",
    "mlp_out.{L}": "blocks.{L}.hook_mlp_out",
    "head.{L}": "blocks.{L}.attn.hook_z",
    "head.{L}.q": "blocks.{L}.attn.hook_q",
    "head.{L}.k": "blocks.{L}.attn.hook_k",
    "head.{L}.v": "blocks.{L}.attn.hook_v",
    "head.{L}.pattern": "blocks.{L}.attn.hook_pattern",
    "neuron.{L}": "blocks.{L}.mlp.hook_post",
    "neuron.{L}.pre": "blocks.{L}.mlp.hook_pre",
}


def test_bridge_every_layer_site(hooked, bridge_run):
    """resid_pre/post, attn_out, mlp_out, z, q, k, v, pattern, MLP pre/post at every layer."""
    _, _, model, _, _, cache = hooked
    _, tl = bridge_run
    for layer in range(model.n_layers):
        for ours, theirs in BRIDGE_SITES.items():
            a, b = ours.format(L=layer), theirs.format(L=layer)
            close(cache[a], tl[b], f"{a} vs {b}")


def test_bridge_resid_mid_where_sequential(hooked, bridge_run):
    _, arch, model, _, _, cache = hooked
    _, tl = bridge_run
    for layer in range(model.n_layers):
        name = f"blocks.{layer}.hook_resid_mid"
        assert (name in tl) == arch.resid_mid
        assert (f"resid_mid.{layer}" in cache) == arch.resid_mid
        if arch.resid_mid:
            close(cache[f"resid_mid.{layer}"], tl[name], f"resid_mid.{layer} vs {name}")


def test_bridge_same_names_same_tensors(hooked, bridge_run):
    """hookscope's TransformerLens aliases name exactly the bridge's tensors."""
    _, _, model, _, _, cache = hooked
    _, tl = bridge_run
    names = ["hook_embed", "unembed.hook_out"]
    names += [t.format(L=layer) for layer in range(model.n_layers) for t in BRIDGE_SITES.values()]
    for name in names:
        close(cache[name], tl[name], name)


def test_bridge_gqa_heads_share_kv(hooked, bridge_run):
    """Per-head k/v: query head h reads k/v head h // group, as the bridge's repeat does."""
    _, _, model, _, _, cache = hooked
    _, tl = bridge_run
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    for layer in range(model.n_layers):
        k, v = tl[f"blocks.{layer}.attn.hook_k"], tl[f"blocks.{layer}.attn.hook_v"]
        assert k.shape[2] == model.cfg.n_kv_heads
        for h in range(model.cfg.n_heads):
            close(cache[f"head.{layer}.{h}.k"], k[:, :, h // group], f"head.{layer}.{h}.k")
            close(cache[f"head.{layer}.{h}.v"], v[:, :, h // group], f"head.{layer}.{h}.v")
            close(
                cache[f"head.{layer}.{h}"],
                tl[f"blocks.{layer}.attn.hook_z"][:, :, h],
                f"head.{layer}.{h}",
            )
            close(
                cache[f"head.{layer}.{h}.pattern"],
                tl[f"blocks.{layer}.attn.hook_pattern"][:, h],
                f"head.{layer}.{h}.pattern",
            )


def test_bridge_rotary_q_k_are_rotary_of_hookscope_q_k(hooked, bridge_run):
    """Convention difference on Llama: the bridge's hook_rot_q/k = rotary(hookscope q/k)."""
    name, _, model, tokens, _, cache = hooked
    _, tl = bridge_run
    if name != "llama_gqa":
        assert not any(
            "hook_rot_q" in k for k in tl.keys()
        )  # GPT-NeoX/GPT-2 bridges: pre-rotary only
        return
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad():
        cos, sin = model.model.model.rotary_emb(cache["resid_pre.0"], positions)
    for layer in range(model.n_layers):
        q = cache[f"head.{layer}.q"].transpose(1, 2)  # HF layout [batch, heads, pos, d_head]
        k = cache[f"head.{layer}.k"].transpose(1, 2)
        rot_q, rot_k = apply_rotary_pos_emb(q, k, cos, sin)
        close(
            rot_q.transpose(1, 2), tl[f"blocks.{layer}.attn.hook_rot_q"], f"rotary(head.{layer}.q)"
        )
        close(
            rot_k.transpose(1, 2), tl[f"blocks.{layer}.attn.hook_rot_k"], f"rotary(head.{layer}.k)"
        )
        assert not torch.allclose(rot_q, q, atol=1e-3)  # rotary moved it: the conventions do differ


def test_bridge_llama_up_projection_via_module_address(hooked, bridge_run):
    """The bridge's Llama ``mlp.hook_pre_linear`` (up projection) has no hookscope address;
    the ``module:`` escape hatch should reach it."""
    name, _, model, tokens, _, _ = hooked
    _, tl = bridge_run
    if name != "llama_gqa":
        assert not any(k.endswith("hook_pre_linear") for k in tl.keys())  # no gated MLP
        return
    ups = [f"module:model.layers.{layer}.mlp.up_proj" for layer in range(model.n_layers)]
    _, up = model.run_with_cache(tokens, names=ups)
    for layer, address in enumerate(ups):
        close(
            up[address], tl[f"blocks.{layer}.mlp.hook_pre_linear"], f"{address} vs hook_pre_linear"
        )


def test_bridge_zero_head_intervention(hooked, bridge):
    _, _, model, tokens, logits, _ = hooked

    def zero_head_1(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    with torch.no_grad():
        theirs = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_1)])
        ours = model.run_with_hooks(tokens, hooks=[("head.0.1", lambda act, address: act * 0)])
    assert (ours - logits).abs().max() > 1e-3  # the intervention does something
    close(ours, theirs, "logits with head 0.1 zeroed")


# ---------------------------------------------------------------------------- nnsight


def _envoy(root, path: str):
    return reduce(
        lambda node, part: node[int(part)] if part.isdigit() else getattr(node, part),
        path.split("."),
        root,
    )


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@pytest.fixture(scope="module")
def nnsight_model(folder):
    pytest.importorskip("nnsight")
    from nnsight import NNsight

    _, path = folder
    return NNsight(_hf(path, eager=True))  # eager: the attention module returns its pattern


def test_nnsight_module_outputs(hooked, hooked_sdpa, nnsight_model):
    """Layer inputs/outputs, attention and MLP outputs, q/k/v from the QKV projection(s),
    z and the MLP activations saved by nnsight equal hookscope's cache taken on the sdpa
    path; the pattern (HF's eager attention weights) equals the one of the full cache."""
    _, arch, model, tokens, _, full = hooked
    logits, cache = hooked_sdpa
    c = model.cfg
    saved = []
    with torch.no_grad(), nnsight_model.trace(tokens):
        for layer in range(model.n_layers):
            block = _envoy(nnsight_model, f"{arch.layers}.{layer}")
            s = {"resid_pre": block.input.save()}
            s["qkv"] = [_envoy(block, p).output.save() for p in arch.qkv]
            s["z"] = _envoy(block, arch.out_proj).input.save()
            s["attn"] = _envoy(block, arch.attn).output.save()
            s["pre"] = _envoy(block, arch.mlp_in).output.save()
            s["post"] = _envoy(block, arch.mlp_out_proj).input.save()
            s["mlp"] = _envoy(block, arch.mlp).output.save()
            s["resid_post"] = block.output.save()
            saved.append(s)
        nn_logits = nnsight_model.output.logits.save()
    close(logits, nn_logits, "logits")
    for layer, s in enumerate(saved):
        L = f".{layer}"
        close(cache["resid_pre" + L], s["resid_pre"], f"resid_pre{L}")
        close(cache["resid_post" + L], _first(s["resid_post"]), f"resid_post{L}")
        attn_out, pattern = s["attn"][0], s["attn"][1]
        close(cache["attn_out" + L], attn_out, f"attn_out{L}")
        close(full["head" + L + ".pattern"], pattern, f"head{L}.pattern")
        close(cache["mlp_out" + L], _first(s["mlp"]), f"mlp_out{L}")
        close(cache["head" + L], s["z"].unflatten(-1, (c.n_heads, c.d_head)), f"head{L} (z)")
        q, k, v = arch.split(s["qkv"], c.n_heads, c.n_kv_heads, c.d_head)
        for site, t in zip("qkv", (q, k, v)):
            close(cache[f"head{L}.{site}"], t, f"head{L}.{site}")
        close(cache[f"neuron{L}.pre"], s["pre"], f"neuron{L}.pre")
        close(cache[f"neuron{L}"], s["post"], f"neuron{L}")


def test_nnsight_zero_head_intervention(hooked, folder, nnsight_model):
    """Zero head 1 of layer 0's z: nnsight writes the slice of the output projection's
    input, hookscope replaces head.0.1; the logits agree and differ from the clean ones."""
    _, arch, model, tokens, clean, _ = hooked
    dh = model.cfg.d_head
    with torch.no_grad(), nnsight_model.trace(tokens):
        _envoy(nnsight_model, f"{arch.layers}.0.{arch.out_proj}").input[:, :, dh : 2 * dh] = 0
        theirs = nnsight_model.output.logits.save()
    with torch.no_grad():
        ours = model.run_with_hooks(tokens, hooks=[("head.0.1", lambda act, address: act * 0)])
    assert (ours - clean).abs().max() > 1e-3
    close(ours, theirs, "logits with head 0.1 zeroed")
