"""The contract every architecture keeps, checked on each entry of ``builders.ARCHITECTURES``.

One parametrised suite; every expected value comes from outside hookscope: the Hugging Face
model's own outputs (``output_hidden_states``, ``output_attentions`` on an eager copy,
logits) or activations read and written with plain torch hooks on the model's modules,
whose paths are written out below (``PATHS``), not taken from hookscope's adapters.

1. every site equals the tensor it names in the model;
2. ``head.L.pattern`` equals the eager attention probabilities;
3. writing one head's z or one neuron changes exactly that unit's slice, and the output is
   that of the model with the same slice written by a plain hook;
4. no hook, attention-implementation switch, replaced ``forward`` or module attribute
   outlives a call, also when a hook or a metric raises;
5. activation patching and ablation (every engine shortcut on) equal one plain patched
   forward per job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache

import pytest
import torch
from torch import Tensor, nn

import hookscope as hs
from hookscope import interventions as iv
from hookscope.interventions.engine import Engine, Writer
from hookscope.interventions.engine import Write as EngineWrite

import builders

ARCHS = [a.name for a in builders.ARCHITECTURES]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- the model's own map


@dataclass(frozen=True)
class Paths:
    """Where each site lives in one family's modules (relative to a layer, except
    ``layers``, ``embed`` and ``final_norm``). ``in`` reads a module's first argument,
    ``out`` its output (the first tensor of a tuple)."""

    layers: str
    embed: str
    final_norm: str | None
    qkv: tuple[str, ...]  # (fused path, "qkv" | "head") or (q, k, v) paths
    z: str  # attention output projection: z is its input
    attn_out: tuple[str, str]
    mlp_out: tuple[str, str]
    neuron: str  # MLP output projection: neuron (post) is its input
    neuron_pre: str  # first MLP projection (the gate of a gated MLP): its output
    resid_mid: tuple[str, str] | None
    pattern: str | None = None  # a module whose output is the pattern (else: HF attentions)


_LLAMA_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_NEOX = dict(
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    qkv=("attention.query_key_value", "head"),
    z="attention.dense",
    attn_out=("attention", "out"),
    mlp_out=("mlp", "out"),
    neuron="mlp.dense_4h_to_h",
    neuron_pre="mlp.dense_h_to_4h",
)
_GEMMA = Paths(
    layers="model.layers",
    embed="model.embed_tokens",  # Gemma's scaled embedding module
    final_norm="model.norm",
    qkv=_LLAMA_QKV,
    z="self_attn.o_proj",
    attn_out=("post_attention_layernorm", "out"),  # sandwich norms: what joins the stream
    mlp_out=("post_feedforward_layernorm", "out"),
    neuron="mlp.down_proj",
    neuron_pre="mlp.gate_proj",
    resid_mid=("pre_feedforward_layernorm", "in"),
)
PATHS = {
    "gpt2": Paths(
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        qkv=("attn.c_attn", "qkv"),
        z="attn.c_proj",
        attn_out=("attn", "out"),
        mlp_out=("mlp", "out"),
        neuron="mlp.c_proj",
        neuron_pre="mlp.c_fc",
        resid_mid=("ln_2", "in"),
    ),
    "llama_gqa": Paths(
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        qkv=_LLAMA_QKV,
        z="self_attn.o_proj",
        attn_out=("self_attn", "out"),
        mlp_out=("mlp", "out"),
        neuron="mlp.down_proj",
        neuron_pre="mlp.gate_proj",
        resid_mid=("post_attention_layernorm", "in"),
    ),
    "neox_parallel": Paths(**_NEOX, resid_mid=None),
    "neox_sequential": Paths(**_NEOX, resid_mid=("post_attention_layernorm", "in")),
    "bert": Paths(
        layers="bert.encoder.layer",
        embed="bert.embeddings.word_embeddings",
        final_norm=None,  # post-LN blocks: the last block output is already normalised
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
        z="attention.output.dense",
        attn_out=("attention.output.dense", "out"),  # before the add & norm
        mlp_out=("output.dense", "out"),
        neuron="output.dense",
        neuron_pre="intermediate.dense",
        resid_mid=("intermediate", "in"),  # = attention's add & LayerNorm output
    ),
    "gemma3": _GEMMA,
    "gemma3_softcap": _GEMMA,
    "vit": Paths(
        layers="blocks",
        embed="patch_embed",
        final_norm="ln_final",
        qkv=("attn.qkv", "qkv"),
        z="attn.out_proj",
        attn_out=("attn", "out"),
        mlp_out=("mlp", "out"),
        neuron="mlp.fc2",
        neuron_pre="mlp.fc1",
        resid_mid=("ln2", "in"),
        pattern="attn.softmax",
    ),
}


def _first(out: object) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]  # type: ignore[index]


def _arg(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))


@contextmanager
def recording(hf: nn.Module, taps: dict[str, tuple[str, str]]) -> Iterator[dict[str, Tensor]]:
    """Plain torch hooks: ``seen[key]`` is the input (``in``: what the module's forward
    was called with, after any pre-hook) or output (``out``) of module ``taps[key][0]``."""
    seen: dict[str, Tensor] = {}
    handles = []
    try:
        for key, (path, event) in taps.items():
            module = hf.get_submodule(path)
            if event == "in":
                handles.append(
                    module.register_forward_hook(
                        lambda m, a, kw, o, key=key: seen.__setitem__(key, _arg(a, kw).clone()),
                        with_kwargs=True,
                    )
                )
            else:
                handles.append(
                    module.register_forward_hook(
                        lambda m, a, o, key=key: seen.__setitem__(key, _first(o).clone())
                    )
                )
        yield seen
    finally:
        for h in handles:
            h.remove()


Write = tuple[str, str, Callable[[Tensor], Tensor]]


@contextmanager
def writing(hf: nn.Module, writes: list[Write]) -> Iterator[None]:
    """Plain torch hooks replacing a module's first argument (``in``) or first output
    (``out``) by ``fn(tensor)``."""
    handles = []

    def pre(m, args, kwargs, fn):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        key = next(k for k, v in kwargs.items() if isinstance(v, Tensor))
        return args, {**kwargs, key: fn(kwargs[key])}

    def post(m, args, out, fn):
        if isinstance(out, Tensor):
            return fn(out)
        return (fn(out[0]), *out[1:])

    try:
        for path, event, fn in writes:
            module = hf.get_submodule(path)
            if event == "in":
                hook = module.register_forward_pre_hook(
                    lambda m, a, kw, fn=fn: pre(m, a, kw, fn), with_kwargs=True
                )
            else:
                hook = module.register_forward_hook(lambda m, a, o, fn=fn: post(m, a, o, fn))
            handles.append(hook)
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- one model per arch


@dataclass
class Setup:
    arch: builders.Architecture
    hf: nn.Module
    model: hs.HookedModel
    paths: Paths
    clean: Tensor
    corrupted: Tensor
    reference: Tensor  # a third batch (mean ablation)
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    answers: tuple[Tensor, Tensor]
    memo: dict = field(default_factory=dict)

    def forward(self, inputs: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.hf(inputs, **self.kwargs())
        return out if isinstance(out, Tensor) else out.logits

    def kwargs(self) -> dict:
        return {"use_cache": False} if self.arch.causal else {}

    def layer(self, layer: int, rel: str = "") -> str:
        return f"{self.paths.layers}.{layer}" + (f".{rel}" if rel else "")

    @property
    def position(self) -> int | None:
        return -1 if self.arch.token_input else None


@cache
def setup_for(name: str) -> Setup:
    arch = builders.ARCHITECTURES_BY_NAME[name]
    # nonzero biases (a dropped or doubled one shows) and O(1) effects of a patch
    hf = builders.with_scaled_weights(builders.with_random_biases(arch.build()))
    g = torch.Generator().manual_seed(3)
    if arch.token_input:
        c = hf.config
        vocab = c.vocab_size
        clean = torch.randint(1, vocab, (2, 5), generator=g)
        corrupted = clean.clone()
        corrupted[:, 1] = (clean[:, 1] + 5) % vocab
        corrupted[:, 3] = (clean[:, 3] + 11) % vocab
        reference = torch.randint(1, vocab, (3, 5), generator=g)
        n_layers, n_heads = c.num_hidden_layers, c.num_attention_heads
        n_kv = getattr(c, "num_key_value_heads", None) or n_heads
        d_head = getattr(c, "head_dim", None) or c.hidden_size // n_heads
        answers = torch.tensor([5, 7]), torch.tensor([9, 2])
    else:
        clean, corrupted, reference = (torch.randn(n, 1, 8, 8, generator=g) for n in (2, 2, 3))
        c = hf.config
        n_layers, n_heads = c["n_layers"], c["n_heads"]
        n_kv, d_head = n_heads, c["d_model"] // n_heads
        answers = torch.tensor([1, 3]), torch.tensor([4, 0])
    return Setup(
        arch, hf, hs.HookedModel.wrap(hf), PATHS[name], clean, corrupted, reference,
        n_layers, n_heads, n_kv, d_head, answers,
    )  # fmt: skip


def test_every_architecture_has_reference_paths():
    assert set(PATHS) == set(ARCHS)
    assert len(set(ARCHS)) == len(ARCHS)


# --------------------------------------------------------------------------- 0. the table


@pytest.mark.parametrize("name", ARCHS)
def test_flags_match_the_model(name):
    """The flags in builders.ARCHITECTURES, read off each model's config and class, and
    causality checked by behaviour (a later input cannot change an earlier position)."""
    s = setup_for(name)
    arch, hf = s.arch, s.hf
    assert s.model.adapter.name == arch.adapter  # detected from the model, not passed
    if arch.vision:
        assert isinstance(hf, hs.ViT) and not arch.token_input
        assert not (arch.causal or arch.gqa or arch.parallel_residual or arch.softcap)
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        c = hf.config
        causal_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(c.model_type)
        assert arch.causal == (type(hf).__name__ == causal_class)
        assert arch.token_input and hasattr(c, "vocab_size")
        assert arch.gqa == (s.n_kv_heads < s.n_heads)
        assert arch.parallel_residual == bool(getattr(c, "use_parallel_residual", False))
        assert arch.softcap == (getattr(c, "final_logit_softcapping", None) is not None)
    assert arch.has_resid_mid == (not arch.parallel_residual)
    # behaviour: change the last token / the last patch; earlier positions of the last block
    # output stay exactly the same iff causal
    later = s.clean.clone()
    if arch.token_input:
        later[:, -1] = (later[:, -1] + 1) % hf.config.vocab_size
    else:
        later[..., -2:, -2:] += 1.0  # the last patch (row-major order)
    taps = {"out": (s.layer(s.n_layers - 1), "out")}
    with recording(hf, taps) as a:
        s.forward(s.clean)
    with recording(hf, taps) as b:
        s.forward(later)
    assert not torch.equal(a["out"][:, -1], b["out"][:, -1])
    assert torch.equal(a["out"][:, :-1], b["out"][:, :-1]) == arch.causal
    # and the address set agrees: resid_mid exists exactly where the table says
    if arch.has_resid_mid:
        assert s.model.addresses("resid_mid")
    else:
        assert not s.model.addresses("resid_mid")
        with pytest.raises(hs.SiteUnavailableError):
            s.model.run_with_cache(s.clean, names="resid_mid.0")


# --------------------------------------------------------------------------- 1. sites


def _site_taps(s: Setup, layer: int) -> dict[str, tuple[str, str]]:
    p = s.paths
    taps = {
        f"resid_pre.{layer}": (s.layer(layer), "in"),
        f"resid_post.{layer}": (s.layer(layer), "out"),
        f"z.{layer}": (s.layer(layer, p.z), "in"),
        f"attn_out.{layer}": (s.layer(layer, p.attn_out[0]), p.attn_out[1]),
        f"mlp_out.{layer}": (s.layer(layer, p.mlp_out[0]), p.mlp_out[1]),
        f"neuron.{layer}": (s.layer(layer, p.neuron), "in"),
        f"neuron_pre.{layer}": (s.layer(layer, p.neuron_pre), "out"),
    }
    for i, path in enumerate(p.qkv[:1] if len(p.qkv) == 2 else p.qkv):
        taps[f"qkv{i}.{layer}"] = (s.layer(layer, path), "out")
    if p.resid_mid is not None:
        taps[f"resid_mid.{layer}"] = (s.layer(layer, p.resid_mid[0]), p.resid_mid[1])
    if p.pattern is not None:
        taps[f"pattern.{layer}"] = (s.layer(layer, p.pattern), "out")
    return taps


def _qkv(s: Setup, seen: dict[str, Tensor], layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """q [b, p, heads, d_head], k and v [b, p, kv heads, d_head] from the projections."""
    h, kv, dh = s.n_heads, s.n_kv_heads, s.d_head
    if len(s.paths.qkv) == 2:  # fused
        fused = seen[f"qkv0.{layer}"]
        if s.paths.qkv[1] == "qkv":  # [all q | all k | all v]
            return tuple(fused.unflatten(-1, (3, h, dh)).unbind(-3))  # type: ignore[return-value]
        return tuple(fused.unflatten(-1, (h, 3, dh)).unbind(-2))  # type: ignore[return-value]
    q, k, v = (seen[f"qkv{i}.{layer}"] for i in range(3))
    return q.unflatten(-1, (h, dh)), k.unflatten(-1, (kv, dh)), v.unflatten(-1, (kv, dh))


@pytest.mark.parametrize("name", ARCHS)
def test_sites_equal_the_model(name):
    s = setup_for(name)
    hf, model, n = s.hf, s.model, s.n_layers
    taps = {"embed": (s.paths.embed, "out")}
    for layer in range(n):
        taps.update(_site_taps(s, layer))
    with recording(hf, taps) as seen, torch.no_grad():
        if s.arch.token_input:
            ref = hf(s.clean, output_hidden_states=True, **s.kwargs())
            ref_logits, hidden = ref.logits, ref.hidden_states
        else:
            ref_logits, hidden = hf(s.clean), None
    names = ["embed", "resid_pre.*", "resid_post.*", "attn_out.*", "mlp_out.*", "head.*"]
    names += ["head.*.q", "head.*.k", "head.*.v", "neuron.*", "neuron.*.pre", "logits"]
    names += ["resid_mid.*"] if s.arch.has_resid_mid else []
    names += ["final_norm"] if s.paths.final_norm is not None and s.arch.token_input else []
    logits, cache = model.run_with_cache(s.clean, names=names)

    assert torch.equal(logits, ref_logits)
    assert torch.equal(cache["embed"], seen["embed"])
    group = s.n_heads // s.n_kv_heads
    for layer in range(n):
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out", "neuron", "resid_mid"):
            key = f"{site}.{layer}"
            if key in seen:
                assert torch.equal(cache[key], seen[key]), key
        assert torch.equal(cache[f"neuron.{layer}.pre"], seen[f"neuron_pre.{layer}"])
        z = seen[f"z.{layer}"].unflatten(-1, (s.n_heads, s.d_head))
        assert torch.equal(cache[f"head.{layer}"], z)
        q, k, v = _qkv(s, seen, layer)
        assert torch.equal(cache[f"head.{layer}.q"], q)
        assert torch.equal(cache[f"head.{layer}.k"], k)  # k/v heads
        assert torch.equal(cache[f"head.{layer}.v"], v)
        for h in range(s.n_heads):  # query head h reads k/v head h // group
            assert torch.equal(cache[f"head.{layer}.{h}"], z[:, :, h])
            assert torch.equal(cache[f"head.{layer}.{h}.q"], q[:, :, h])
            assert torch.equal(cache[f"head.{layer}.{h}.k"], k[:, :, h // group])
            assert torch.equal(cache[f"head.{layer}.{h}.v"], v[:, :, h // group])
        for i in (0, 7):
            assert torch.equal(cache[f"neuron.{layer}.{i}"], seen[f"neuron.{layer}"][..., i])
    if hidden is None:
        return
    # Hugging Face's hidden states: block inputs, then the last block's output after the
    # final norm (BERT: no final norm, its post-LN blocks end normalised)
    assert len(hidden) == n + 1
    for layer in range(n):
        assert torch.equal(cache[f"resid_pre.{layer}"], hidden[layer])
    for layer in range(n - 1):
        assert torch.equal(cache[f"resid_post.{layer}"], hidden[layer + 1])
    last = cache[f"resid_post.{n - 1}"]
    if s.paths.final_norm is None:
        assert torch.equal(last, hidden[n])
    else:
        with torch.no_grad():
            assert torch.equal(hf.get_submodule(s.paths.final_norm)(last), hidden[n])
        assert torch.equal(cache["final_norm"], hidden[n])
        assert not torch.allclose(last, hidden[n])


@pytest.mark.parametrize("name", ARCHS)
def test_logits_site_is_the_unembedding_output(name):
    """``logits`` is the unembedding's output: the model's output, except on models that
    soft-cap after the unembedding (Gemma's final_logit_softcapping), which return
    ``cap * tanh(logits / cap)`` of it (documented in hookscope.adapters.transformer)."""
    s = setup_for(name)
    returned, cache = s.model.run_with_cache(s.clean, names="logits")
    assert torch.equal(returned, s.forward(s.clean))
    cap = getattr(s.hf.config, "final_logit_softcapping", None)
    if cap is None:
        assert torch.equal(cache["logits"], returned)
    else:
        capped = cap * torch.tanh(cache["logits"] / cap)
        torch.testing.assert_close(capped, returned, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(cache["logits"], returned)


# --------------------------------------------------------------------------- 2. pattern


@pytest.mark.parametrize("name", ARCHS)
def test_pattern_equals_eager_attention(name):
    s = setup_for(name)
    logits, cache = s.model.run_with_cache(s.clean, names="head.*.pattern")
    if s.paths.pattern is not None:  # hookscope's ViT: the softmax module's output
        taps = {f"p{i}": (s.layer(i, s.paths.pattern), "out") for i in range(s.n_layers)}
        with recording(s.hf, taps) as seen:
            ref_logits = s.forward(s.clean)
        attentions = [seen[f"p{layer}"] for layer in range(s.n_layers)]
    else:
        eager = builders.eager_copy(s.hf)
        with torch.no_grad():
            out = eager(s.clean, output_attentions=True, **s.kwargs())
        ref_logits, attentions = out.logits, out.attentions
    assert torch.equal(logits, ref_logits)
    assert len(attentions) == s.n_layers
    for layer in range(s.n_layers):
        pattern = cache[f"head.{layer}.pattern"]
        assert pattern.shape == (s.clean.shape[0], s.n_heads, *attentions[layer].shape[-2:])
        assert torch.equal(pattern, attentions[layer]), layer
        for h in range(s.n_heads):
            assert torch.equal(cache[f"head.{layer}.{h}.pattern"], attentions[layer][:, h])
    upper = cache["head.0.pattern"].triu(1)
    assert bool((upper == 0).all()) == s.arch.causal


# --------------------------------------------------------------------------- 3. one unit


UNITS = {  # kind -> (layer, reference module, unit slice of its input's last axis, address)
    "head": lambda s: (0, s.paths.z, slice(2 * s.d_head, 3 * s.d_head), "head.0.2"),
    "neuron": lambda s: (
        s.n_layers - 1, s.paths.neuron, slice(5, 6), f"neuron.{s.n_layers - 1}.5"
    ),
}  # fmt: skip


@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("name", ARCHS)
def test_writing_one_unit_changes_only_that_unit(name, unit):
    s = setup_for(name)
    layer, rel, cols, address = UNITS[unit](s)
    path = s.layer(layer, rel)
    whole = address.rsplit(".", 1)[0]  # head.L / neuron.L
    clean_out = s.forward(s.clean)
    with recording(s.hf, {"x": (path, "in")}) as before:
        s.forward(s.clean)
    g = torch.Generator().manual_seed(5)
    shape = (*before["x"].shape[:-1], cols.stop - cols.start)
    new = torch.randn(shape, generator=g) + 1.0
    value = new if unit == "head" else new[..., 0]  # head: [b, p, d_head]; neuron: [b, p]

    def hook(act, _address):
        assert act.shape == value.shape
        return value

    with recording(s.hf, {"x": (path, "in")}) as after:
        out = s.model.run_with_hooks(s.clean, hooks=[(address, hook)])
    changed = after["x"]
    assert torch.equal(changed[..., cols], new)
    keep = torch.ones(changed.shape[-1], dtype=torch.bool)
    keep[cols] = False
    assert torch.equal(changed[..., keep], before["x"][..., keep])

    # the output is that of the model with the same slice written by a plain torch hook
    def plain(x):
        x = x.clone()
        x[..., cols] = new
        return x

    with writing(s.hf, [(path, "in", plain)]):
        expected = s.forward(s.clean)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, clean_out)
    # and the cache of the same run holds the written value, the rest untouched
    _, cache = s.model.run_with_cache(s.clean, names=[whole], hooks=[(address, hook)])
    layer_tensor = cache[whole]
    if unit == "head":
        assert torch.equal(layer_tensor.flatten(-2), changed)
    else:
        assert torch.equal(layer_tensor, changed)


# --------------------------------------------------------------------------- 4. no residue


class Boom(RuntimeError):
    pass


def _state(hf: nn.Module) -> dict:
    state = {}
    for name, m in hf.named_modules():
        state[name] = (
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            dict(m._backward_hooks),
            dict(m._backward_pre_hooks),
            sorted(m.__dict__),
            {k: v.data_ptr() for k, v in m._parameters.items() if v is not None},
            m.training,
        )
    config = getattr(hf, "config", None)
    state["<attn>"] = getattr(config, "_attn_implementation", None)
    g = torch.nn.modules.module
    state["<global>"] = (
        dict(g._global_forward_hooks),
        dict(g._global_forward_pre_hooks),
        dict(g._global_backward_hooks),
    )
    return state


def _boom(act, address):
    raise Boom(str(address))


@pytest.mark.parametrize("name", ARCHS)
def test_no_hooks_or_patches_remain(name):
    s = setup_for(name)
    hf, model = s.hf, s.model
    clean_out = s.forward(s.clean)  # (a first forward may set up lazy buffers)
    start = _state(hf)  # (transformers keeps hooks of its own on some modules)
    assert not any("forward" in m.__dict__ for m in hf.modules())
    params = {k: v.clone() for k, v in hf.state_dict().items()}
    last = s.n_layers - 1
    metric = iv.logit_diff(*s.answers, position=s.position)
    calls = []

    def late_boom(out):  # raises in the sweep, after the baselines
        calls.append(1)
        if len(calls) > 3:
            raise Boom("metric")
        return metric.bind(model)(out)

    def sweep(m, sites="head.*.*"):
        return iv.activation_patching(
            model, s.clean, s.corrupted, m, sites, chunk_size=2, progress=False
        )

    def inside_block():
        with model.hooks([(f"head.{last}.pattern", lambda a, _: a)]):
            model(s.clean)
            raise Boom("in the block")

    runs = {  # label -> (call, whether it raises Boom)
        "cache everything (pattern too)": (lambda: model.run_with_cache(s.clean), False),
        "a head hook": (
            lambda: model.run_with_hooks(s.clean, hooks=[(f"head.{last}.1", lambda a, _: a * 2)]),
            False,
        ),
        "cache, a neuron hook raises": (
            lambda: model.run_with_cache(
                s.clean, names=["head.*.pattern", "resid_post.*"], hooks=[("neuron.0.3", _boom)]
            ),
            True,
        ),
        "a pattern hook raises": (
            lambda: model.run_with_hooks(s.clean, hooks=[(f"head.{last}.0.pattern", _boom)]),
            True,
        ),
        "a resid_pre hook raises": (
            lambda: model.run_with_hooks(s.clean, hooks=[("resid_pre.0", _boom)]),
            True,
        ),
        "with model.hooks(...) raises": (inside_block, True),
        "activation patching": (
            lambda: sweep(metric, ["resid_pre.*", "head.*.*", "neuron.0.1"]),
            False,
        ),
        "activation patching, the metric raises": (lambda: sweep(late_boom), True),
        "mean ablation, the metric raises": (
            lambda: iv.ablate(
                model,
                s.clean,
                "head.*.*",
                "mean",
                reference=s.reference,
                metric=late_boom,
                progress=False,
            ),
            True,
        ),  # fmt: skip
        "zero ablation": (
            lambda: iv.ablate(model, s.clean, ["head.0.1", "neuron.0.2"], progress=False),
            False,
        ),
    }
    for label, (run, raises) in runs.items():
        calls.clear()
        raised = False
        try:
            run()
        except Boom:
            raised = True
        assert raised == raises, label
        assert _state(hf) == start, label
        assert torch.equal(s.forward(s.clean), clean_out), label
    for m in hf.modules():
        assert "forward" not in m.__dict__
    for k, v in hf.state_dict().items():
        assert torch.equal(v, params[k]), k


# --------------------------------------------------------------------------- 5. engine


def _unit(s: Setup, address: str) -> tuple[str, str, tuple]:
    """(module path, in/out, index into its tensor's last axis) of a job's address."""
    kind, layer, *rest = address.split(".")
    layer = int(layer)
    p = s.paths
    if kind == "resid_pre":
        return s.layer(layer), "in", ()
    if kind == "attn_out":
        return s.layer(layer, p.attn_out[0]), p.attn_out[1], ()
    if kind == "mlp_out":
        return s.layer(layer, p.mlp_out[0]), p.mlp_out[1], ()
    if kind == "head" and len(rest) == 1:  # z
        h = int(rest[0])
        return s.layer(layer, p.z), "in", (slice(h * s.d_head, (h + 1) * s.d_head),)
    if kind == "neuron" and len(rest) == 1:  # post
        return s.layer(layer, p.neuron), "in", (int(rest[0]),)
    raise AssertionError(f"no reference for {address}")


def _source_acts(s: Setup, inputs: Tensor, addresses: list[str]) -> dict[str, Tensor]:
    """Each address's layer-level module tensor on ``inputs``, read with plain hooks."""
    taps = {}
    for a in addresses:
        path, event, _ = _unit(s, a)
        taps[f"{path}:{event}"] = (path, event)
    with recording(s.hf, taps) as seen:
        s.forward(inputs)
    return seen


def _write(value: Tensor, index: tuple, pos: int | None) -> Callable[[Tensor], Tensor]:
    """Overwrite ``[:, pos (all if None), ..., index]`` of the module tensor with ``value``'s
    entries there (``value`` broadcasts over the batch)."""

    def fn(act: Tensor) -> Tensor:
        out = act.clone()
        at = (slice(None), slice(None) if pos is None else pos)
        full = (*at, ..., *index) if index else at
        src = value.expand_as(act)
        out[full] = src[full]
        return out

    return fn


def _reference_logits(s: Setup, base: Tensor, source: Tensor, jobs: list) -> list[Tensor]:
    """One plain forward of ``base`` per job, the job's unit (at its position) holding
    its value on ``source``."""
    key = ("patch", id(base), id(source), tuple((str(a), p) for a, p in jobs))
    if key in s.memo:
        return s.memo[key]
    acts = _source_acts(s, source, sorted({str(a) for a, _ in jobs}))
    out = []
    for address, pos in jobs:
        path, event, index = _unit(s, str(address))
        with writing(s.hf, [(path, event, _write(acts[f"{path}:{event}"], index, pos))]):
            out.append(s.forward(base))
    s.memo[key] = out
    return out


def _raw_metric(s: Setup) -> Callable[[Tensor], Tensor]:
    """A plain callable reading two answers at the last position and every logit."""
    a, b = s.answers

    def metric(out: Tensor) -> Tensor:
        rows = torch.arange(out.shape[0])
        at = out[:, -1] if out.ndim == 3 else out
        return (at[rows, a] - at[rows, b]).mean() + 0.1 * out.logsumexp(-1).mean()

    return metric


def _logit_diff(s: Setup, out: Tensor) -> float:
    """Closed form of iv.logit_diff(a, b, position): the batch mean of the difference."""
    a, b = s.answers
    at = out[:, -1] if out.ndim == 3 else out
    rows = torch.arange(out.shape[0])
    return float((at[rows, a] - at[rows, b]).mean())


SITES = ["resid_pre.*", "head.*.*", "attn_out.*", "neuron.*.3"]
MODES = [("all", "denoise"), ("each", "denoise"), ("all", "noise")]


def _sweeps():
    for name in ARCHS:
        for positions, direction in MODES:
            if positions == "each" and name == "vit":  # 17 tokens: kept to "all"
                continue
            for metric in ("raw", "logit_diff"):
                yield pytest.param(name, positions, direction, metric,
                                   id=f"{name}-{positions}-{direction}-{metric}")  # fmt: skip


@pytest.mark.parametrize(("name", "positions", "direction", "kind"), list(_sweeps()))
def test_activation_patching_equals_one_plain_forward_per_job(name, positions, direction, kind):
    s = setup_for(name)
    base, source = (s.corrupted, s.clean) if direction == "denoise" else (s.clean, s.corrupted)
    raw = _raw_metric(s)
    if kind == "raw":
        metric, score = raw, lambda out: float(raw(out))
    else:
        metric = iv.logit_diff(*s.answers, position=s.position)
        score = lambda out: _logit_diff(s, out)  # noqa: E731
    res = iv.activation_patching(
        s.model, s.clean, s.corrupted, metric, SITES, positions=positions,
        direction=direction, chunk_size=3, progress=False,
    )  # fmt: skip
    n_pos = s.clean.shape[1]
    n_sites = s.n_layers * (3 + s.n_heads)
    assert len(res.jobs) == n_sites * (n_pos if positions == "each" else 1)
    if positions == "each":
        assert [p for _, p in res.jobs[:n_pos]] == list(range(n_pos))
    reference = torch.tensor(
        [score(out) for out in _reference_logits(s, base, source, res.jobs)], dtype=torch.float64
    )
    m_clean, m_corrupted = score(s.forward(s.clean)), score(s.forward(s.corrupted))
    found = res.flat.double()
    if kind == "logit_diff":  # normalised: corrupted 0, clean 1
        assert res.baselines["clean"] == pytest.approx(m_clean, abs=1e-5)
        assert res.baselines["corrupted"] == pytest.approx(m_corrupted, abs=1e-5)
        found = found * (m_clean - m_corrupted) + m_corrupted
    torch.testing.assert_close(found, reference, **TOL)
    assert reference.std() > 1e-3  # the jobs really differ (not a trivially constant sweep)


@pytest.mark.parametrize("method", ["zero", "mean"])
@pytest.mark.parametrize("name", ARCHS)
def test_ablation_equals_one_plain_forward_per_site(name, method):
    s = setup_for(name)
    sites = ["resid_pre.1", "head.*.*", "attn_out.0", "neuron.*.0-1"]
    kw = dict(reference=s.reference if method == "mean" else None, chunk_size=3, progress=False)
    raw = _raw_metric(s)
    res_raw = iv.ablate(s.model, s.clean, sites, method, metric=raw, **kw)
    metric = iv.logit_diff(*s.answers, position=s.position)
    res_ld = iv.ablate(s.model, s.clean, sites, method, metric=metric, **kw)
    addresses = [str(a) for a, _ in res_raw.jobs]
    assert addresses == [str(a) for a, _ in res_ld.jobs]
    assert len(addresses) == 2 + s.n_layers * (s.n_heads + 2)
    ref_acts = None
    if method == "mean":  # per position, over the reference rows
        acts = _source_acts(s, s.reference, addresses)
        ref_acts = {k: v.double().mean(0, keepdim=True).float() for k, v in acts.items()}

    def writer(address: str) -> Write:
        path, event, index = _unit(s, address)
        value = torch.zeros(()) if ref_acts is None else ref_acts[f"{path}:{event}"]
        return path, event, _write(value, index, None)

    outs = []
    for address, _ in res_raw.jobs:
        with writing(s.hf, [writer(str(address))]):
            outs.append(s.forward(s.clean))
    expected_raw = torch.tensor([float(raw(o)) for o in outs], dtype=torch.float64)
    expected_ld = torch.tensor([_logit_diff(s, o) for o in outs], dtype=torch.float64)
    torch.testing.assert_close(res_raw.flat.double(), expected_raw, **TOL)
    torch.testing.assert_close(res_ld.flat.double(), expected_ld, **TOL)
    assert res_ld.baselines["clean"] == pytest.approx(_logit_diff(s, s.forward(s.clean)), abs=1e-5)
    assert expected_raw.std() > 1e-3
    # metric=None: the output with every site ablated at once
    together = iv.ablate(s.model, s.clean, sites, method, **kw)
    with writing(s.hf, [writer(str(a)) for a, _ in res_raw.jobs]):
        expected = s.forward(s.clean)
    torch.testing.assert_close(together, expected, **TOL)


@pytest.mark.parametrize("name", ARCHS)
def test_every_planned_forward_equals_one_plain_forward_per_job(name):
    """The engine's own objects: the plan covers each job once, uses the shortcuts the
    architecture allows (joins above block 0, linear tails on parallel blocks, skipped
    prefixes on causal models), and each executed Forward gives, per copy, the metric of
    one plain forward with that job's write."""
    s = setup_for(name)
    metric = iv.logit_diff(*s.answers, position=s.position)
    engine = Engine(s.model, s.corrupted, metric)
    addresses = s.model.resolve(SITES)
    batch = s.clean.shape[0]
    both = torch.cat([s.clean, s.corrupted])
    _, acts = engine.baseline(both, slice(batch, None), [a.slot for a in addresses])
    positions = [None, 2] if s.arch.token_input else [None]
    jobs = [(EngineWrite(a, p, acts[a.slot][:batch]),) for a in addresses for p in positions]
    forwards = engine.plan(jobs, k=3)
    assert sorted(i for f in forwards for i in f.jobs) == list(range(len(jobs)))
    assert all(len(f.jobs) <= 3 for f in forwards)
    copies = [c for f in forwards for c in f.copies]
    assert any((c.block or 0) > 0 for c in copies)  # copies join above block 0
    assert any(c.tail is not None for c in copies) == s.arch.parallel_residual
    # skipped prefixes (first change: position 1) need a causal model and the readout (no
    # soft-cap after the unembedding)
    assert any(f.prefix > 0 for f in forwards) == (s.arch.causal and not s.arch.softcap)
    reference = _reference_logits(
        s, s.corrupted, s.clean, [(a, p) for a in addresses for p in positions]
    )
    writer = Writer(s.model.adapter, engine.base_acts)
    for forward in forwards:
        got = engine.execute(forward, jobs, writer)
        want = [_logit_diff(s, reference[i]) for i in forward.jobs]
        torch.testing.assert_close(got, want, **TOL)
