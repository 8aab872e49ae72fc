"""The stacked sweep's shortcuts (shared lower blocks, logits read only where the metric
looks) give the same scores as one plain patched forward per job, on every transformer
adapter; and the shortcuts really are taken (block 0 sees the base batch only)."""

import pytest
import torch

import hookscope as hs
from hookscope import hf_compat
from hookscope import interventions as iv
from hookscope.addresses import Slot, slot_address
from hookscope.interventions.engine import Engine

import builders


def _biased(make):
    """A builder whose linear layers get nonzero biases (Hugging Face initialises them to
    zero, which would hide a shortcut that drops or doubles a bias)."""

    def build():
        hf = make()
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for module in hf.modules():
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.nn.Parameter) and bias.ndim == 1:
                    bias.copy_(0.1 * torch.randn(bias.shape, generator=g))
        return hf

    return build


MODELS = {
    "neox_parallel": _biased(lambda: builders.tiny_neox(parallel=True)),
    "neox_sequential": _biased(lambda: builders.tiny_neox(parallel=False)),
    "gpt2": _biased(builders.tiny_gpt2),
    "llama_gqa": builders.tiny_llama_gqa,  # (no biases)
    "gemma3": builders.tiny_gemma3,  # (no biases)
    "bert": _biased(builders.tiny_bert),
}
SITES = [
    "embed",
    "resid_pre.0",
    "resid_pre.1",
    "attn_out.0",
    "head.1.2",
    "head.0.1.k",
    "head.1.0.pattern",
    "neuron.1.3",
    "resid_post.1",
    "logits",
]


def _inputs(vocab: int, batch: int = 2, pos: int = 7):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(1, vocab, (batch, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 5) % vocab
    corrupted[:, 4] = (clean[:, 4] + 11) % vocab
    return clean, corrupted


def _one_at_a_time(model, clean, corrupted, metric, jobs, direction):
    """Each job as its own full forward of the base batch, writing the source value."""
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    slots = list(dict.fromkeys(slot_address(a.slot) for a, _ in jobs))
    _, cache = model.run_with_cache(source, names=slots)
    out = []
    for address, pos in jobs:
        value = cache[address]

        def write(act, _address, value=value, pos=pos, address=address):
            act = act.clone()
            if address.index is None:
                target = act
            else:  # the unit's view, [batch, pos (pattern: destination), ...]
                axis = model.adapter.unit_axis(address.slot)
                unit = model.adapter.unit_index(address.slot, address.index)
                target = act.select(axis, unit)
            if pos is None:
                target.copy_(value)
            else:
                target.select(1, pos).copy_(value.select(1, pos))
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(base, hooks=[(slot_address(address.slot), write)])
        out.append(float(metric(logits)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_stacked_sweep_equals_one_forward_per_job(name, direction):
    model = hs.HookedModel.wrap(MODELS[name]())
    clean, corrupted = _inputs(int(model.cfg.d_vocab))
    position = 3 if name == "bert" else -1
    metric = iv.logit_diff(torch.tensor([5, 7]), torch.tensor([9, 2]), position=position)
    res = iv.activation_patching(
        model,
        clean,
        corrupted,
        metric,
        sites=SITES,
        positions=[0, 1, 4, 6],
        direction=direction,
        chunk_size=5,
        progress=False,
    )
    reference = _one_at_a_time(model, clean, corrupted, metric, res.jobs, direction)
    m_clean, m_corrupted = res.baselines["clean"], res.baselines["corrupted"]
    patched = res.flat * (m_clean - m_corrupted) + m_corrupted  # back to the raw metric
    torch.testing.assert_close(patched, reference, atol=2e-6, rtol=1e-5)
    assert reference.std() > 10 * abs(m_clean - m_corrupted) * 1e-3  # not trivially constant


def test_loss_metric_reads_full_logits_from_the_stopped_forward():
    """loss needs every logit: the readout applies the whole unembedding to the stopped
    forward's hidden states (and the unembedding's hooks do not fire twice)."""
    model = hs.HookedModel.wrap(builders.tiny_llama_gqa())
    clean, corrupted = _inputs(500)
    metric = iv.loss(clean, positions=[3, 4, 5])
    res = iv.activation_patching(
        model,
        clean,
        corrupted,
        metric,
        sites=["resid_pre.1", "head.0.2", "logits"],
        positions="each",
        progress=False,
    )
    reference = _one_at_a_time(model, clean, corrupted, metric, res.jobs, "denoise")
    b = res.baselines
    torch.testing.assert_close(
        res.flat * (b["clean"] - b["corrupted"]) + b["corrupted"], reference, atol=2e-6, rtol=1e-5
    )


def test_vit_stacked_sweep_equals_one_forward_per_job():
    model = hs.HookedModel.wrap(_biased(builders.tiny_vit)())
    g = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    metric = iv.logit_diff(1, 4, position=None)
    sites = ["resid_pre.0", "resid_pre.1", "head.1.1", "head.0.2.pattern", "neuron.0.5"]
    res = iv.activation_patching(
        model, clean, corrupted, metric, sites=sites, positions="each", chunk_size=4, progress=False
    )
    reference = _one_at_a_time(model, clean, corrupted, metric, res.jobs, "denoise")
    expected = (reference - res.baselines["corrupted"]) / (
        res.baselines["clean"] - res.baselines["corrupted"]
    )
    torch.testing.assert_close(res.flat, expected, atol=2e-5, rtol=1e-5)


def _record_calls(hf, n_layers=2):
    """Shapes of the inputs each block's attention and MLP really compute on, and of the
    unembedding's outputs."""
    seen = {"lm_head": []}
    handles = []
    for i in range(n_layers):
        layer = hf.gpt_neox.layers[i]
        for part in ("attention", "mlp"):
            seen[f"{part}.{i}"] = []
            handles.append(
                getattr(layer, part).register_forward_pre_hook(
                    lambda m, a, kw, key=f"{part}.{i}": seen[key].append(
                        tuple((a[0] if a else kw["hidden_states"]).shape)
                    ),
                    with_kwargs=True,
                )
            )
    handles.append(
        hf.get_output_embeddings().register_forward_hook(
            lambda m, a, o: seen["lm_head"].append(o.shape)
        )
    )
    return seen, handles


def test_lower_blocks_run_once_and_logits_are_not_built():
    hf = builders.tiny_neox()
    model = hs.HookedModel.wrap(hf)
    clean, corrupted = _inputs(500)
    seen, handles = _record_calls(hf)
    try:
        res = iv.activation_patching(
            model,
            clean,
            corrupted,
            iv.logit_diff(5, 9),
            sites="resid_pre.1",
            positions="each",
            progress=False,
        )
    finally:
        for h in handles:
            h.remove()
    # the baselines (clean and corrupted: 4 rows) only; block 0 is then replayed from them
    assert seen["attention.0"] == [(4, 7, 64)]
    # block 1: a patched copy (2 rows) per position where clean and corrupted resid_pre.1
    # differ, in one forward; position 0 precedes the first corrupted token (1), so
    # patching it is a no-op, not run, and positions before 1 are the base run's (the
    # recorded keys and values), not computed
    assert seen["attention.1"] == [(4, 7, 64), (12, 6, 64)]
    # the last MLP, in the baselines and the sweep, computes only the position the metric reads
    assert seen["mlp.1"] == [(4, 1, 64), (12, 1, 64)]
    assert float(res.scores[0]) == 0.0
    # no full logits at all: the baseline computes 16 probe columns, the sweep none
    assert seen["lm_head"] == [(4, 7, 16), (12, 6, 64)]
    assert res.scores.shape == (7,)


def test_head_outputs_of_a_parallel_block_are_added_not_recomputed():
    """GPT-NeoX's parallel block adds attention and MLP outputs to its input, so a head's
    z patch changes block L's output by (z_source - z_base) W_O: block L is not run again,
    and the scores equal one plain patched forward per job."""
    hf = _biased(builders.tiny_neox)()
    model = hs.HookedModel.wrap(hf)
    clean, corrupted = _inputs(500)
    metric = iv.logit_diff(torch.tensor([5, 7]), torch.tensor([9, 2]))
    seen, handles = _record_calls(hf)
    try:
        res = iv.activation_patching(
            model, clean, corrupted, metric, sites=["head.0.*", "head.1.2", "head.0.1.result"],
            progress=False,
        )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    assert seen["attention.0"] == [(4, 7, 64)]  # no patched run of block 0
    # head.0.* and head.0.1.result (10 rows) from the first corrupted position (1) on
    assert seen["attention.1"][:2] == [(4, 7, 64), (2 * 5, 6, 64)]
    reference = _one_at_a_time(model, clean, corrupted, metric, res.jobs, "denoise")
    b = res.baselines
    torch.testing.assert_close(
        res.flat * (b["clean"] - b["corrupted"]) + b["corrupted"], reference, atol=2e-6, rtol=1e-5
    )
    by_pos = iv.activation_patching(
        model, clean, corrupted, metric, sites="head.0.3", positions="each", progress=False
    )
    reference = _one_at_a_time(model, clean, corrupted, metric, by_pos.jobs, "denoise")
    torch.testing.assert_close(
        by_pos.flat * (b["clean"] - b["corrupted"]) + b["corrupted"], reference, atol=2e-6,
        rtol=1e-5,
    )  # fmt: skip


def test_readout_falls_back_when_logits_are_post_processed():
    """Gemma-style soft-capping happens after the unembedding: the shortcut would be wrong,
    the runner notices on the base run and reads full logits instead."""
    model = hs.HookedModel.wrap(builders.tiny_gemma3(softcap=0.5))
    clean, corrupted = _inputs(300)
    metric = iv.logit_diff(5, 9)
    for softcap, kept in ((0.5, False), (None, True)):
        m = hs.HookedModel.wrap(builders.tiny_gemma3(softcap=softcap))
        engine = Engine(m, corrupted, metric)
        assert engine.readout()
        both = torch.cat([clean, corrupted])
        values, _ = engine.baseline(both, slice(2, None), [Slot("resid_pre", 0)])
        assert engine.readout() is kept  # hidden states or full logits
        with torch.no_grad():
            expected = [float(metric(m(clean))), float(metric(m(corrupted)))]
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
    res = iv.activation_patching(
        model, clean, corrupted, metric, sites="resid_pre.*", positions="each", progress=False
    )
    reference = _one_at_a_time(model, clean, corrupted, metric, res.jobs, "denoise")
    expected = (reference - res.baselines["corrupted"]) / (
        res.baselines["clean"] - res.baselines["corrupted"]
    )
    torch.testing.assert_close(res.flat, expected, atol=2e-5, rtol=1e-5)


def test_no_hooks_left_after_a_failing_metric():
    hf = builders.tiny_neox()
    model = hs.HookedModel.wrap(hf)
    clean, corrupted = _inputs(500)
    calls = {"n": 0}

    def metric(logits):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("metric failed")
        return logits[:, -1, 5].mean() - logits[:, -1, 9].mean()

    with pytest.raises(RuntimeError, match="metric failed"):
        iv.activation_patching(
            model, clean, corrupted, metric, sites="resid_pre.1", positions="each", progress=False
        )
    for module in hf.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_vit_position_sweeps_count_patch_tokens_not_channels():
    """A ViT's positions are its CLS + patch tokens (17 here), not the image's channels."""
    model = hs.HookedModel.wrap(builders.tiny_vit())
    g = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    metric = iv.logit_diff(1, 4, position=None)
    for fn in (iv.activation_patching, iv.attribution_patching):
        res = fn(model, clean, corrupted, metric, sites="resid_pre.1", positions="each",
                 progress=False)  # fmt: skip
        assert res.scores.shape == (17,) and res.positions == list(range(17))
    exact = iv.activation_patching(model, clean, corrupted, metric, sites="resid_pre.1",
                                   positions=[16], progress=False)  # fmt: skip
    reference = _one_at_a_time(model, clean, corrupted, metric, exact.jobs, "denoise")
    b = exact.baselines
    assert float(exact.flat[0]) * (b["clean"] - b["corrupted"]) + b["corrupted"] == pytest.approx(
        float(reference[0]), abs=1e-5
    )


@pytest.mark.parametrize("positions", ["last", [1, "x"]])
def test_bad_positions_name_the_choices(positions):
    model = hs.HookedModel.wrap(builders.tiny_neox())
    clean, corrupted = _inputs(500)
    for fn in (iv.activation_patching, iv.attribution_patching):
        with pytest.raises(hs.HookscopeError, match="positions must be 'all', 'each' or a list"):
            fn(model, clean, corrupted, iv.logit_diff(5, 9), positions=positions, progress=False)


@pytest.mark.parametrize("name", ["llama_gqa", "neox_parallel", "gemma3"])
def test_per_row_read_positions_before_and_after_the_skipped_prefix(name):
    """Rows read at different positions (as IOI prompts of different lengths do): a row read
    before a copy's first changed position takes the base run's value, one read after it the
    patched one; the last MLP's read-position shortcut must not mix them up."""
    model = hs.HookedModel.wrap(MODELS[name]())
    clean, corrupted = _inputs(int(model.cfg.d_vocab), batch=3)
    metric = iv.logit_diff(torch.tensor([5, 7, 8]), torch.tensor([9, 2, 3]),
                           position=torch.tensor([6, 3, -2]))  # fmt: skip
    res = iv.activation_patching(
        model, clean, corrupted, metric, sites=["resid_pre.1", "head.0.*", "mlp_out.0"],
        positions="each", chunk_size=7, progress=False,
    )  # fmt: skip
    reference = _one_at_a_time(model, clean, corrupted, metric, res.jobs, "denoise")
    b = res.baselines
    torch.testing.assert_close(
        res.flat * (b["clean"] - b["corrupted"]) + b["corrupted"], reference, atol=2e-6, rtol=1e-5
    )


def test_softcapped_logits_with_a_logits_site_in_the_sweep():
    """When the logits are themselves a site the baseline computes full logits; the runner
    must still notice the soft-cap after the unembedding before reading other jobs from
    hidden states."""
    model = hs.HookedModel.wrap(builders.tiny_gemma3(softcap=0.5))
    clean, corrupted = _inputs(300)
    metric = iv.logit_diff(5, 9)
    for sites in (["resid_pre.1", "embed", "logits"], ["head.0.*", "module:model.norm"]):
        res = iv.activation_patching(
            model, clean, corrupted, metric, sites=sites, positions="each", progress=False
        )
        reference = _one_at_a_time(model, clean, corrupted, metric, res.jobs, "denoise")
        b = res.baselines
        raw = res.flat * (b["clean"] - b["corrupted"]) + b["corrupted"]
        torch.testing.assert_close(raw, reference, atol=2e-6, rtol=1e-5)


def test_overlapping_head_patches_in_one_job_are_not_added_twice():
    """A job patching head 1.2 twice (or within all of layer 1, or as z and result) writes
    each value once; the parallel block's additive shortcut must not count it twice."""
    from hookscope.interventions.patching import Patcher

    model = hs.HookedModel.wrap(_biased(lambda: builders.tiny_neox(parallel=True))())
    clean, corrupted = _inputs(500)
    metric = iv.logit_diff(5, 9)
    h12, h1, r12, h13 = (
        model.resolve(s)[0] for s in ("head.1.2", "head.1", "head.1.2.result", "head.1.3")
    )
    jobs = [
        [(h12, None), (h12, None)],
        [(h12, None), (h1, None)],
        [(h12, None), (r12, None)],
        [(h12, None), (h12, 4)],
        [(h12, None), (h13, None)],  # disjoint: may use the shortcut
        [(h12, 4), (h12, -1)],
    ]
    patcher = Patcher(
        model, clean, corrupted, metric, ["head.1.*", "head.1.2.result"], progress=False
    )
    got = torch.tensor(patcher.run(jobs), dtype=torch.float64)
    reference = []
    for job in jobs:
        hooks = []
        for address, pos in job:
            name = slot_address(address.slot)
            value = patcher.source[address.slot]

            def write(act, _a, value=value, pos=pos, address=address):
                act = act.clone()
                axis = model.adapter.unit_axis(address.slot)
                target = act if address.index is None else act.select(axis, address.index)
                src = value if address.index is None else value.select(axis, address.index)
                if pos is None:
                    target.copy_(src)
                else:
                    target.select(1, pos).copy_(src.select(1, pos))
                return act

            hooks.append((name, write))
        with torch.no_grad():
            reference.append(float(metric(model.run_with_hooks(corrupted, hooks=hooks))))
    torch.testing.assert_close(
        got, torch.tensor(reference, dtype=torch.float64), atol=2e-6, rtol=1e-5
    )


def test_a_model_that_ignores_the_cache_object_keeps_every_position():
    """A forward that takes the cache keyword but does not fill the cache (as a model of an
    unforeseen transformers version might): the runner sees the empty cache and turns the
    position shortcut off, and the scores stay exact."""
    import functools

    hf = builders.tiny_gpt2()
    forward = hf.forward

    @functools.wraps(forward)
    def ignores_cache(*args, **kwargs):
        for keyword in hf_compat.KV_KEYWORDS:
            kwargs.pop(keyword, None)
        return forward(*args, **kwargs)

    hf.forward = ignores_cache
    model = hs.HookedModel.wrap(hf)
    clean, corrupted = _inputs(int(model.cfg.d_vocab))
    metric = iv.logit_diff(5, 9)
    res = iv.activation_patching(
        model, clean, corrupted, metric, sites=["resid_pre.*", "head.1.*"], positions="each",
        progress=False,
    )  # fmt: skip
    reference = _one_at_a_time(model, clean, corrupted, metric, res.jobs, "denoise")
    b = res.baselines
    torch.testing.assert_close(
        res.flat * (b["clean"] - b["corrupted"]) + b["corrupted"], reference, atol=2e-6, rtol=1e-5
    )
    engine = Engine(model, clean, metric)
    engine.baseline(torch.cat([clean, corrupted]), slice(0, 1), [Slot("resid_pre", 0)])
    facts = engine.facts()
    assert not facts.skip_prefix and facts.n_blocks is not None  # blocks still replayed
    # the patched instance forward is not remembered for the class
    assert hf_compat.kv_cache_candidates(builders.tiny_gpt2())


@pytest.mark.parametrize("name", ["neox_parallel", "gpt2", "llama_gqa", "gemma3"])
def test_ablation_sweeps_take_the_shortcuts_and_equal_one_forward_per_site(name):
    """ablate() runs through the same runner (blocks below replayed, the metric's logits
    only): each site's score equals one plain forward zeroing it with run_with_hooks."""
    model = hs.HookedModel.wrap(MODELS[name]())
    clean, _ = _inputs(300)
    metric = iv.logit_diff(torch.tensor([5, 7]), torch.tensor([9, 2]))
    sites = ["resid_pre.1", "head.1.2", "head.0.1.v", "neuron.0.3", "mlp_out.1", "attn_out.0"]
    res = iv.ablate(model, clean, sites, "zero", metric=metric, progress=False)
    expected = []
    for address in res.jobs:
        address = address[0]
        unit = (
            None if address.index is None else model.adapter.unit_index(address.slot, address.index)
        )
        axis = None if unit is None else model.adapter.unit_axis(address.slot)

        def zero(act, _address, unit=unit, axis=axis):
            act = act.clone()
            (act if unit is None else act.select(axis, unit)).zero_()
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(clean, hooks=[(slot_address(address.slot), zero)])
        expected.append(float(metric(logits)))
    torch.testing.assert_close(res.flat, torch.tensor(expected, dtype=torch.float64),
                               atol=2e-5, rtol=1e-5)  # fmt: skip
    with torch.no_grad():
        assert res.baselines["clean"] == pytest.approx(float(metric(model(clean))), abs=2e-5)
    if name == "neox_parallel":  # sites in block 1 only: block 0 computes for the inputs alone
        seen = []
        attention0 = model.model.gpt_neox.layers[0].attention  # (a replayed block skips it)
        handle = attention0.register_forward_pre_hook(
            lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[0]),
            with_kwargs=True,
        )
        try:
            iv.ablate(model, clean, ["head.1.*", "resid_pre.1"], "zero", metric=metric,
                      progress=False)  # fmt: skip
        finally:
            handle.remove()
        assert seen == [clean.shape[0]]
