"""Big models: ``from_pretrained(device_map=..., offload_folder=...)`` through accelerate.

Each model is saved once with save_pretrained and loaded twice: whole (the reference) and
dispatched by accelerate with some layers in memory ("cpu") and some offloaded to disk (their
weights on ``meta`` between calls, read from the checkpoint at each forward). On a CPU-only
machine "cpu" and "disk" are the two placements there are; with GPUs the same code path
runs (accelerate's hooks then also move tensors between devices).

Everything the dispatched model computes is compared with the whole model at 1e-5, and
the patching sweeps also with plain patched forwards (hooks only, no shortcut) of the
dispatched model itself.
"""

from __future__ import annotations

import math

import pytest
import torch

import hookscope as hs
import hookscope.interventions as iv
from hookscope import dispatch
from hookscope.adapters.base import submodule
from hookscope.addresses import Slot
from hookscope.cache import ActivationCache, Layout
from hookscope.errors import InputError
from hookscope.interventions._onednn import DISPATCHED_ONEDNN
from hookscope.interventions.patching import Patcher
from hookscope.scope import open_scopes

import builders

ATOL = 1e-5

# architecture -> (builder, device map: every module "cpu" or "disk")
MAPS = {
    "neox": (
        builders.tiny_neox,
        {
            "gpt_neox.embed_in": "disk",
            "gpt_neox.emb_dropout": "cpu",
            "gpt_neox.layers.0": "cpu",
            "gpt_neox.layers.1": "disk",
            "gpt_neox.final_layer_norm": "disk",
            "gpt_neox.rotary_emb": "cpu",
            "lm_head": "disk",
        },
    ),
    "gpt2": (  # Conv1D projections; lm_head tied to the token embedding (kept together)
        builders.tiny_gpt2,
        {
            "transformer.wte": "cpu",
            "transformer.wpe": "disk",
            "transformer.drop": "cpu",
            "transformer.h.0": "disk",
            "transformer.h.1": "cpu",
            "transformer.ln_f": "disk",
            "lm_head": "cpu",
        },
    ),
    "llama": (  # grouped-query attention, split q/k/v projections
        builders.tiny_llama_gqa,
        {
            "model.embed_tokens": "disk",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.norm": "disk",
            "model.rotary_emb": "cpu",
            "lm_head": "disk",
        },
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for arch, (build, _) in MAPS.items():
        folder = tmp_path_factory.mktemp(f"dispatch_{arch}")
        build().save_pretrained(folder)
        out[arch] = folder
    return out


@pytest.fixture(scope="module")
def pairs(folders, tmp_path_factory):
    """arch -> (the model loaded whole, the same checkpoint dispatched over cpu and disk)."""
    out = {}
    for arch, (_, device_map) in MAPS.items():
        whole = hs.HookedModel.from_pretrained(str(folders[arch]), tokenizer=False)
        offload = tmp_path_factory.mktemp(f"offload_{arch}")
        split = hs.HookedModel.from_pretrained(
            str(folders[arch]), tokenizer=False, device_map=device_map, offload_folder=offload
        )
        out[arch] = (whole, split)
    return out


def _tokens(seed: int, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(5, 400, shape, generator=torch.Generator().manual_seed(seed))


def _clean_corrupted(seed: int = 0):
    clean = _tokens(seed)
    corrupted = clean.clone()
    corrupted[:, 3:] = _tokens(seed + 100, (2, 4))
    return clean, corrupted


def _hook_state(model: torch.nn.Module) -> dict:
    """Every module's torch hooks, instance forward and accelerate hook (by identity), and
    where each parameter lives."""
    modules = {
        name: (
            tuple(map(id, m._forward_hooks.values())),
            tuple(map(id, m._forward_pre_hooks.values())),
            id(m.__dict__.get("forward")),
            id(getattr(m, "_hf_hook", None)),
            id(getattr(m, "_old_forward", None)),
            sorted(k for k in m.__dict__ if not k.startswith("_")),
        )
        for name, m in model.named_modules()
    }
    params = {n: str(p.device) for n, p in model.named_parameters()}
    return {"modules": modules, "params": params}


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("arch", list(MAPS))
def test_loads_dispatched_with_offloaded_layers(pairs, arch):
    whole, split = pairs[arch]
    assert split.model.hf_device_map == MAPS[arch][1]
    assert dispatch.is_dispatched(split.model) and not dispatch.is_dispatched(whole.model)
    disk = [k for k, v in MAPS[arch][1].items() if v == "disk"]
    offloaded = dispatch.offloaded(split.model)
    assert offloaded and all(any(o.startswith(d) for d in disk) for o in offloaded)
    for name in offloaded:  # their weights are placeholders between calls
        module = submodule(split.model, name)
        assert all(p.device.type == "meta" for p in module.parameters(recurse=False))
    assert split.device == torch.device("cpu")  # where inputs go, not the meta placeholders


@pytest.mark.parametrize("arch", list(MAPS))
def test_weight_reads_offloaded_parameters(pairs, arch):
    whole, split = pairs[arch]
    for name in dispatch.offloaded(split.model):
        here, there = submodule(split.model, name), submodule(whole.model, name)
        for pname, ref in there.named_parameters(recurse=False):
            got = dispatch.weight(here, pname)
            assert got.device.type == "cpu" and torch.equal(got, ref)
    # ordinary modules: the parameter itself (gradients reach it); dotted names reach down
    out_proj = whole.adapter.out_proj(0)
    assert dispatch.weight(out_proj, "weight") is out_proj.weight
    layer = submodule(whole.model, whole.adapter.layer_path(0))
    path = whole.adapter.spec.attn_out_proj + ".weight"
    assert dispatch.weight(layer, path) is out_proj.weight
    with pytest.raises(InputError, match="has no parameter or buffer 'wieght'"):
        dispatch.weight(out_proj, "wieght")


def test_offloaded_weights_come_in_the_loaded_dtype(folders, tmp_path):
    """A float32 checkpoint loaded as float64: offloaded weights read through
    dispatch.weight are float64 too, and head results match the whole float64 model."""
    kw = dict(tokenizer=False, dtype="float64")
    whole = hs.HookedModel.from_pretrained(str(folders["neox"]), **kw)
    split = hs.HookedModel.from_pretrained(
        str(folders["neox"]), device_map=MAPS["neox"][1], offload_folder=tmp_path, **kw
    )
    got = dispatch.weight(split.adapter.out_proj(1), "weight")
    assert got.dtype == torch.float64
    assert torch.equal(got, whole.adapter.out_proj(1).weight)
    x = _tokens(8)
    _, ref = whole.run_with_cache(x, names="head.1.*.result")
    _, out = split.run_with_cache(x, names="head.1.*.result")
    for h in range(whole.cfg.n_heads):
        assert out[f"head.1.{h}.result"].dtype == torch.float64
        torch.testing.assert_close(out[f"head.1.{h}.result"], ref[f"head.1.{h}.result"])


@pytest.mark.parametrize("arch", list(MAPS))
def test_logits_equal_the_whole_model(pairs, arch):
    whole, split = pairs[arch]
    x = _tokens(1)
    with torch.no_grad():
        ref = whole(x)
        got = split(x)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # a HF forward of the whole model, independent of hookscope
    with torch.no_grad():
        hf = whole.model(x).logits
    torch.testing.assert_close(got, hf, atol=ATOL, rtol=0)


def _every_address(model: hs.HookedModel) -> list[str]:
    names = [str(a) for a in model.addresses()]  # every layer-level tensor and the logits
    names += ["head.*.*.result", "head.1.2.pattern", "head.0.3.q", "head.1.1.k", "head.0.2.v"]
    names += ["head.1.0.z", "neuron.0.7", "neuron.1.5.pre"]
    return names


@pytest.mark.parametrize("arch", list(MAPS))
def test_cache_of_every_address_kind(pairs, arch):
    whole, split = pairs[arch]
    names = _every_address(whole)
    x = _tokens(2)
    _, ref = whole.run_with_cache(x, names=names)
    _, got = split.run_with_cache(x, names=names)
    kinds = set()
    for name in names:
        for address in whole.resolve(name):
            kinds.add(address.slot.kind)
            torch.testing.assert_close(got[address], ref[address], atol=ATOL, rtol=0)
    assert {"embed", "resid_pre", "resid_post", "attn_out", "mlp_out", "logits"} <= kinds
    assert {"z", "q", "k", "v", "pattern", "result", "neuron_post", "neuron_pre"} <= kinds
    # head results are z @ W_O: recompute them from the whole model's weights
    for layer in range(whole.n_layers):
        w_o, _ = whole.adapter.w_o(layer)
        z = ref[f"head.{layer}"]  # [batch, pos, heads, d_head]
        want = torch.einsum("bphd,hdm->bphm", z, w_o)
        for h in range(whole.cfg.n_heads):
            torch.testing.assert_close(
                got[f"head.{layer}.{h}.result"], want[:, :, h], atol=ATOL, rtol=0
            )


@pytest.mark.parametrize("arch", ["neox"])
def test_cache_says_where_each_tensor_is(pairs, arch):
    _, split = pairs[arch]
    _, cache = split.run_with_cache(_tokens(3), names=["resid_post.*", "head.*", "logits"])
    table = cache.to_pandas()
    assert len(table) == 2 * split.n_layers + 1
    for row in table.itertuples():
        slot = split.resolve(row.address)[0].slot
        module = submodule(split.model, split.adapter.tap(slot).module)
        assert row.device == str(cache[row.address].device)
        # a tensor sits where its module computed (the logits: where the outputs go back to)
        where = split.device if row.address == "logits" else dispatch.execution_device(module)
        assert row.device == str(where)
    moved = cache.to("cpu")
    assert set(moved.to_pandas()["device"]) == {"cpu"}
    for row in table.itertuples():
        torch.testing.assert_close(moved[row.address], cache[row.address], atol=0, rtol=0)


def test_cache_to_gathers_tensors_of_several_dtypes():
    """``ActivationCache.to`` on tensors built here (on the CPU; on a multi-GPU machine they
    would sit on several devices): one device, each dtype kept unless one is asked for."""
    acts = {
        Slot("resid_post", 0): torch.randn(2, 3, 4, dtype=torch.float16),
        Slot("resid_post", 1): torch.randn(2, 3, 4, dtype=torch.float64),
        Slot("resid_pre", 0): torch.randn(2, 3, 4, dtype=torch.bfloat16),
    }
    cache = ActivationCache(dict(acts), Layout(2, {}, {}))
    table = cache.to_pandas().set_index("address")
    assert table.loc["resid_post.0", "dtype"] == "float16"
    assert table.loc["resid_post.1", "dtype"] == "float64"
    assert set(table["device"]) == {"cpu"}
    same = cache.to("cpu")
    for slot, t in acts.items():
        got = same[f"{slot.kind}.{slot.layer}"]
        assert got.dtype == t.dtype and got.device.type == "cpu" and torch.equal(got, t)
    as32 = cache.to("cpu", "float32")
    for slot, t in acts.items():
        got = as32[f"{slot.kind}.{slot.layer}"]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, t.float(), atol=0, rtol=0)


# ------------------------------------------------------------------ hooks and gradients
@pytest.mark.parametrize("arch", list(MAPS))
def test_hooks_with_an_ablation(pairs, arch):
    whole, split = pairs[arch]
    x = _tokens(4)

    def zero(act, address):
        return torch.zeros_like(act)

    def scale(act, address):
        return act * 0.5

    hooks = [("head.1.2", zero), ("neuron.0.*", scale), ("head.0.1.result", zero)]
    with torch.no_grad():
        ref = whole.run_with_hooks(x, hooks=hooks)
        got = split.run_with_hooks(x, hooks=hooks)
        plain = whole(x)
    assert (ref - plain).abs().max() > 1e-3  # the hooks change the output
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", list(MAPS))
def test_gradients_equal_the_whole_model(pairs, arch):
    whole, split = pairs[arch]
    x = _tokens(5)
    names = ["resid_pre.*", "head.*.*.result", "head.1", "neuron.0", "attn_out.1"]

    def metric(logits):
        return logits[:, -1, 7].sum() - logits[:, -2, 3].mean()

    _, ref = whole.run_with_cache(x, names=names, backward=metric)
    _, got = split.run_with_cache(x, names=names, backward=metric)
    assert math.isclose(float(got.backward_value), float(ref.backward_value), abs_tol=ATOL)
    for name in names:
        for address in whole.resolve(name):
            g_ref, g_got = ref.grad(address), got.grad(address)
            assert g_ref.abs().max() > 0
            torch.testing.assert_close(g_got, g_ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ sweeps
def _plain_head_patching(model, clean, corrupted, metric, layer):
    """Denoising scores of each head of ``layer`` from one plain patched forward each."""
    _, clean_cache = model.run_with_cache(clean, names=f"head.{layer}")
    with torch.no_grad():
        m_clean, m_corr = float(metric(model(clean))), float(metric(model(corrupted)))
    scores = []
    for h in range(model.cfg.n_heads):
        hook = (f"head.{layer}.{h}", lambda act, address, h=h: clean_cache[f"head.{layer}.{h}"])
        with torch.no_grad():
            patched = float(metric(model.run_with_hooks(corrupted, hooks=[hook])))
        scores.append((patched - m_corr) / (m_clean - m_corr))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("arch", list(MAPS))
def test_activation_patching_equals_the_whole_model(pairs, arch):
    whole, split = pairs[arch]
    clean, corrupted = _clean_corrupted(0)
    metric = iv.logit_diff(5, 9)
    sweeps = [
        dict(sites="head.*.*"),
        dict(sites="head.*.*.result"),
        dict(sites="resid_pre.*", positions="each"),
        dict(sites="neuron.1.*"),
        dict(sites=["attn_out.0", "mlp_out.1", "logits"], positions="each"),
        dict(sites="head.*.*", direction="noise"),
    ]
    for sweep in sweeps:
        ref = iv.activation_patching(whole, clean, corrupted, metric, progress=False, **sweep)
        got = iv.activation_patching(split, clean, corrupted, metric, progress=False, **sweep)
        torch.testing.assert_close(got.scores, ref.scores, atol=ATOL, rtol=0, equal_nan=True)
        assert got.shortcuts_off == {"onednn": DISPATCHED_ONEDNN}
        assert ref.shortcuts_off == {}
    # and with plain patched forwards of the dispatched model itself (no shortcut)
    res = iv.activation_patching(split, clean, corrupted, metric, "head.1.*", progress=False)
    plain = _plain_head_patching(split, clean, corrupted, metric, 1)
    torch.testing.assert_close(res.scores, plain, atol=1e-4, rtol=0)


def test_result_text_names_the_shortcut_that_was_off(pairs):
    whole, split = pairs["neox"]
    clean, corrupted = _clean_corrupted(1)
    metric = iv.logit_diff(5, 9)
    got = iv.activation_patching(split, clean, corrupted, metric, "head.0.*", progress=False)
    assert "shortcut off: onednn (accelerate dispatched this model" in repr(got)
    ref = iv.activation_patching(whole, clean, corrupted, metric, "head.0.*", progress=False)
    assert "shortcut off" not in repr(ref)


@pytest.mark.parametrize("arch", list(MAPS))
def test_ablation_and_attribution_equal_the_whole_model(pairs, arch):
    whole, split = pairs[arch]
    clean, corrupted = _clean_corrupted(2)
    metric = iv.logit_diff(5, 9)
    reference = _tokens(9, (4, 7))
    for kw in (dict(method="zero"), dict(method="mean", reference=reference)):
        ref = iv.ablate(whole, clean, "head.*.*", metric=metric, progress=False, **kw)
        got = iv.ablate(split, clean, "head.*.*", metric=metric, progress=False, **kw)
        torch.testing.assert_close(got.scores, ref.scores, atol=ATOL, rtol=0)
        assert got.shortcuts_off == {"onednn": DISPATCHED_ONEDNN}
    # the output with every site ablated at once (no metric: a tensor)
    ref_out = iv.ablate(whole, clean, ["head.0.1", "neuron.1.*"], progress=False)
    got_out = iv.ablate(split, clean, ["head.0.1", "neuron.1.*"], progress=False)
    torch.testing.assert_close(got_out, ref_out, atol=ATOL, rtol=0)
    for sites in ("head.*.*", "resid_pre.*", "neuron.0.*"):
        ref = iv.attribution_patching(whole, clean, corrupted, metric, sites, progress=False)
        got = iv.attribution_patching(split, clean, corrupted, metric, sites, progress=False)
        torch.testing.assert_close(got.scores, ref.scores, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", list(MAPS))
def test_only_onednn_is_off_on_a_dispatched_model(pairs, arch):
    """Every shortcut that goes through module calls (where accelerate's hooks run) stays
    on; the oneDNN products, which replace a layer's forward, are off and reported."""
    whole, split = pairs[arch]
    clean, corrupted = _clean_corrupted(3)
    args = (clean, corrupted, iv.logit_diff(5, 9), "head.*.*", "denoise", None, False)
    ref = Patcher(whole, *args).engine
    got = Patcher(split, *args).engine
    assert got.shortcuts() == ref.shortcuts() - {"onednn"}
    assert {"replay", "readout", "prefix", "read_position"} <= got.shortcuts()
    assert got.shortcuts_off == {"onednn": DISPATCHED_ONEDNN} and ref.shortcuts_off == {}
    assert got.structure.fast == {}


def test_no_hook_left_and_accelerate_hooks_untouched(pairs):
    _, split = pairs["neox"]
    before = _hook_state(split.model)
    clean, corrupted = _clean_corrupted(4)
    metric = iv.logit_diff(5, 9)
    split.run_with_cache(clean, names=_every_address(split))
    split.run_with_cache(clean, names=["head.*.*.result", "neuron.0"], backward=metric)
    split.run_with_hooks(clean, hooks=[("head.1.2", lambda act, a: act * 0)])
    with split.hooks([("resid_post.0", lambda act, a: act + 1)]):
        split(clean)
    iv.activation_patching(split, clean, corrupted, metric, "head.*.*", progress=False)
    iv.activation_patching(split, clean, corrupted, metric, "resid_pre.*", "each", progress=False)
    iv.attribution_patching(split, clean, corrupted, metric, "head.*.*", progress=False)
    iv.ablate(split, clean, "head.*.*", metric=metric, progress=False)
    with pytest.raises(ZeroDivisionError):  # a hook that raises mid-forward
        split.run_with_hooks(clean, hooks=[("head.1.0", lambda act, a: 1 / 0)])
    assert _hook_state(split.model) == before
    assert open_scopes() == 0


def test_cpu_offload_weights_in_memory():
    """accelerate's CPU offload (what "cpu" entries of a device map become next to GPUs):
    every weight on meta between calls, its value in a CPU weights map. Wrapped as is."""
    from accelerate import cpu_offload

    whole = hs.HookedModel.wrap(builders.tiny_neox(seed=3))
    split = hs.HookedModel.wrap(cpu_offload(builders.tiny_neox(seed=3), torch.device("cpu")))
    assert all(p.device.type == "meta" for p in split.model.parameters())
    assert split.device == torch.device("cpu")
    x = _tokens(10)
    names = ["head.*.*.result", "resid_post.*", "neuron.1", "logits"]
    _, ref = whole.run_with_cache(x, names=names)
    _, got = split.run_with_cache(x, names=names)
    for name in names:
        for address in whole.resolve(name):
            torch.testing.assert_close(got[address], ref[address], atol=ATOL, rtol=0)
    clean, corrupted = _clean_corrupted(5)
    metric = iv.logit_diff(5, 9)
    for sites in ("head.*.*", "resid_pre.*"):
        r = iv.activation_patching(whole, clean, corrupted, metric, sites, progress=False)
        g = iv.activation_patching(split, clean, corrupted, metric, sites, progress=False)
        torch.testing.assert_close(g.scores, r.scores, atol=ATOL, rtol=0)
        assert g.shortcuts_off == {"onednn": DISPATCHED_ONEDNN}
    r = iv.attribution_patching(whole, clean, corrupted, metric, "head.*.*", progress=False)
    g = iv.attribution_patching(split, clean, corrupted, metric, "head.*.*", progress=False)
    torch.testing.assert_close(g.scores, r.scores, atol=ATOL, rtol=0)
    assert all(p.device.type == "meta" for p in split.model.parameters())


# ------------------------------------------------------------------ device_map="auto"
def test_auto_device_map_offloads_what_does_not_fit(folders, tmp_path):
    memory = {"cpu": "300KB"}
    model = hs.HookedModel.from_pretrained(
        str(folders["neox"]), tokenizer=False, device_map="auto", max_memory=memory,
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    placed = set(model.model.hf_device_map.values())
    assert placed == {"cpu", "disk"} and dispatch.offloaded(model.model)
    assert memory == {"cpu": "300KB"}  # the caller's dict is not converted in place
    whole = hs.HookedModel.from_pretrained(str(folders["neox"]), tokenizer=False)
    x = _tokens(6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), whole(x), atol=ATOL, rtol=0)


def test_single_device_map_loads_without_accelerate_hooks(folders):
    model = hs.HookedModel.from_pretrained(str(folders["neox"]), tokenizer=False, device_map="cpu")
    assert not dispatch.is_dispatched(model.model)
    whole = hs.HookedModel.from_pretrained(str(folders["neox"]), tokenizer=False)
    x = _tokens(7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), whole(x), atol=0, rtol=0)


# ------------------------------------------------------------------ argument errors
NEOX_MAP = MAPS["neox"][1]
BAD = [
    (dict(device="cpu", device_map="auto"), "pass device= or device_map=, not both"),
    (dict(device_map="autoo"), "neither a strategy (auto, balanced, balanced_low_0, "),
    (dict(device_map="autoo"), "Did you mean 'auto'?"),
    (dict(device_map=3), "is a GPU index"),
    (dict(device_map="disk"), "a whole model on disk cannot run"),
    (dict(device_map={"": "meta"}), "cannot hold a model's weights"),
    (dict(device_map={}), "device_map is an empty dict"),
    (dict(device_map=["cpu"]), "device_map must be one of auto, balanced"),
    (dict(device_map={"gpt_neox": 1.5}), "device_map['gpt_neox'] must be a device"),
    (dict(device_map={"gpt_neox.layer.0": "cpu"}), "Did you mean 'gpt_neox.layers.0'?"),
    (
        dict(device_map={"gpt_neox": "cpu"}),
        "no device to 1 parameter(s) of GPTNeoXForCausalLM: lm_head.weight",
    ),
    (
        dict(device_map=NEOX_MAP),
        "puts gpt_neox.embed_in, gpt_neox.layers.1, gpt_neox.final_layer_norm, lm_head on 'disk'",
    ),
    (dict(device_map="auto", max_memory={"cpu": "300KB"}), "pass offload_folder="),
    (dict(device_map="auto", max_memory={"cuda:0": "1GB"}), "a GPU is named by its index"),
    (dict(device_map="auto", max_memory={"cpu": "lots"}), "is not a size"),
    (dict(device_map="auto", max_memory=["1GB"]), "max_memory must be a dict"),
    (dict(device_map=NEOX_MAP, max_memory={"cpu": "1GB"}), "max_memory= only applies when"),
    (dict(max_memory={"cpu": "1GB"}), "max_memory= is only used with device_map="),
    (dict(offload_folder="off"), "offload_folder= is only used with device_map="),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_placement_errors_come_before_any_weight_is_read(folders, tmp_path, kwargs, message):
    """The folder's weights file is corrupt: an InputError (not a ModelLoadError) shows
    that each check ran before transformers read a weight."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(folders["neox"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError) as err:
        hs.HookedModel.from_pretrained(str(folder), tokenizer=False, **kwargs)
    assert message in str(err.value)


def test_offload_folder_that_is_a_file(folders, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(InputError, match="is a file; pass a folder path"):
        hs.HookedModel.from_pretrained(
            str(folders["neox"]), tokenizer=False, device_map=NEOX_MAP, offload_folder=path
        )


def test_device_map_without_accelerate_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "accelerate" else real(name, *a),
    )
    with pytest.raises(hs.InputError, match=r"pip install 'hookscope\[big\]'"):
        hs.HookedModel.from_pretrained(str(tmp_path), device_map="auto")


@pytest.mark.parametrize("arch", list(MAPS))
def test_readout_lens_and_dla_equal_the_whole_model(pairs, arch):
    """W_U / final_norm / unembed read offloaded weights; the decomposition, DLA and the
    logit lens give the whole model's values."""
    whole, split = pairs[arch]
    x = _tokens(4)
    for name in ("W_U", "W_E", "b_U"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), atol=0, rtol=0)
    torch.testing.assert_close(split.W_O.stack(), whole.W_O.stack(), atol=0, rtol=0)
    _, a = whole.run_with_cache(x)
    _, b = split.run_with_cache(x)
    last = f"resid_post.{whole.n_layers - 1}"
    torch.testing.assert_close(split.unembed(b[last]), whole.unembed(a[last]), atol=ATOL, rtol=0)
    for method in ("accumulated_resid", "decompose_resid", "stack_head_results"):
        ours = getattr(b, method)(apply_ln=True)
        torch.testing.assert_close(ours, getattr(a, method)(apply_ln=True), atol=ATOL, rtol=0)
    dla_a = a.logit_attrs(a.stack_head_results(apply_ln=True), 7, 9)
    dla_b = b.logit_attrs(b.stack_head_results(apply_ln=True), 7, 9)
    torch.testing.assert_close(dla_b, dla_a, atol=ATOL, rtol=0)
    lens_a, lens_b = hs.logit_lens(whole, x, k=3), hs.logit_lens(split, x, k=3)
    torch.testing.assert_close(lens_b.top_probs, lens_a.top_probs, atol=ATOL, rtol=0)


def test_maps_that_accelerate_cannot_honour_are_refused(tmp_path):
    """A tied weight split over two places, and '' beside other keys: refused by name
    before loading (accelerate would fail at the first forward, or inside transformers)."""
    folder = tmp_path / "gemma"
    builders.tiny_gemma3().save_pretrained(folder)
    split_tie = {
        "model.embed_tokens": "cpu",
        "model.layers": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    with pytest.raises(
        InputError, match="one tied weight but the device map puts them on cpu and disk"
    ):
        hs.HookedModel.from_pretrained(
            str(folder), tokenizer=False, device_map=split_tie, offload_folder=tmp_path / "o"
        )
    with pytest.raises(InputError, match="an entry for '' \\(the whole model\\) and others"):
        hs.HookedModel.from_pretrained(
            str(folder),
            tokenizer=False,
            device_map={"": "cpu", "model.layers.0": "disk"},
            offload_folder=tmp_path / "o",
        )
