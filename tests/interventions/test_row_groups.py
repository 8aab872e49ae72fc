"""Rows of different read positions run in groups, each to its own last read position
(``Engine.run``, :mod:`hookscope.interventions.engine.rows`): the sweeps' values equal
plain Hugging Face forwards with hand-written torch hooks, and the grouping itself is
checked against its cost on cases worked out by hand."""

import pytest
import torch

import hookscope as hs
from hookscope import interventions as iv
from hookscope.interventions.engine import rows
from hookscope.interventions.engine.plan import BLOCK_COST
from hookscope.interventions.patching import Patcher

import builders

READ = torch.tensor([3, 6, 6, 4])  # each row's read position (rows right-padded to 8)
CORRECT, INCORRECT = torch.tensor([5, 9, 11, 40]), torch.tensor([7, 2, 30, 41])


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(10, 290, (4, 8), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1:] = torch.randint(10, 290, (4, 7), generator=g)
    return clean, corrupted


def _layers(hf):
    return (
        hf.model.layers
        if hasattr(hf, "model") and hasattr(hf.model, "layers")
        else hf.transformer.h
    )


def _out_proj(layer):
    return layer.self_attn.o_proj if hasattr(layer, "self_attn") else layer.attn.c_proj


def _metric_of(logits):
    at = logits[torch.arange(4), READ]
    return (at[torch.arange(4), CORRECT] - at[torch.arange(4), INCORRECT]).mean()


def _hooked_value(hf, base, module, pre, replace):
    """The metric of ``hf(base)`` with ``replace(tensor)`` applied to ``module``'s input
    (``pre``) or first argument."""

    def hook(mod, args, kwargs):
        if args:
            return (replace(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return float(_metric_of(hf(base).logits))
    finally:
        handle.remove()


def _captured_inputs(hf, tokens, modules):
    seen = {}

    def keep(i):
        def hook(mod, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).clone()

        return hook

    handles = [
        m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for h in handles:
            h.remove()
    return seen


def _raw(res):
    b = res.baselines
    return res.flat * (b["clean"] - b["corrupted"]) + b["corrupted"]


@pytest.fixture
def groups_used(monkeypatch):
    """The number of row groups of each ``Engine.run`` (spied)."""
    from hookscope.interventions.engine import engine

    used = []

    def spy(read, n_jobs, k):
        found = rows.row_groups(read, n_jobs, k)
        used.append(len(found))
        return found

    monkeypatch.setattr(engine, "row_groups", spy)
    return used


@pytest.mark.parametrize("build", [builders.tiny_llama_gqa, builders.tiny_gpt2])
def test_head_and_position_sweeps_equal_hooked_hf_forwards(build, groups_used):
    hf = build()
    model = hs.HookedModel.wrap(hf)
    clean, corrupted = _inputs()
    metric = iv.logit_diff(CORRECT, INCORRECT, position=READ)
    layers = _layers(hf)
    n_heads = hf.config.num_attention_heads
    d_head = hf.config.hidden_size // n_heads

    patcher = Patcher(model, clean, corrupted, metric, "head.*.*", "denoise", None, False)
    assert "row_groups" in patcher.engine.shortcuts()

    # heads, all positions: write the clean z of one head into the corrupted run
    res = iv.activation_patching(
        model, clean, corrupted, metric, sites="head.*.*", chunk_size=1, progress=False
    )
    assert groups_used[-1] > 1
    z_clean = _captured_inputs(hf, clean, [_out_proj(layer) for layer in layers])
    expected = []
    for i, layer in enumerate(layers):
        for h in range(n_heads):
            cols = slice(h * d_head, (h + 1) * d_head)

            def put(z, i=i, cols=cols):
                z = z.clone()
                z[..., cols] = z_clean[i][..., cols]
                return z

            expected.append(_hooked_value(hf, corrupted, _out_proj(layer), True, put))
    torch.testing.assert_close(_raw(res).double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)  # fmt: skip

    # the residual stream by position: positions past a row's read position change nothing
    res = iv.activation_patching(
        model, clean, corrupted, metric, sites="resid_pre.*", positions="each", progress=False
    )
    assert groups_used[-1] > 1
    x_clean = _captured_inputs(hf, clean, list(layers))
    expected = []
    for i, layer in enumerate(layers):
        for p in range(clean.shape[1]):

            def put(x, i=i, p=p):
                x = x.clone()
                x[:, p] = x_clean[i][:, p]
                return x

            expected.append(_hooked_value(hf, corrupted, layer, True, put))
    torch.testing.assert_close(_raw(res).double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_mean_ablation_over_groups_uses_the_whole_batch_mean(groups_used):
    """A mean ablation writes the mean over all rows (not over a group's), per neuron:
    equal to hooked forwards writing the whole batch's mean into the MLP's down projection
    input (where the gated MLP's oneDNN forward falls back to its own)."""
    hf = builders.tiny_llama_gqa()
    model = hs.HookedModel.wrap(hf)
    clean, _ = _inputs(1)
    metric = iv.logit_diff(CORRECT, INCORRECT, position=READ)
    res = iv.ablate(model, clean, "neuron.1.*", method="mean", reference=clean, metric=metric,
                    per_position=True, progress=False)  # fmt: skip
    assert groups_used and max(groups_used) > 1
    down = _layers(hf)[1].mlp.down_proj
    mean = _captured_inputs(hf, clean, [down])[0].mean(0, keepdim=True)
    expected = []
    for n in range(hf.config.intermediate_size):

        def put(t, n=n):
            t = t.clone()
            t[..., n] = mean[..., n]
            return t

        expected.append(_hooked_value(hf, clean, down, True, put))
    got = _raw(res) if res.normalised else res.flat
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_groups_minimise_the_work():
    # one read position: one group, whatever the jobs
    assert [length for _, length in rows.row_groups(torch.tensor([5, 5, 5]), 100, 8)] == [6]
    # many jobs: every read position its own group (work 100 * (1*4 + 1*21) + forwards)
    groups = rows.row_groups(torch.tensor([3, 20]), 100, 8)
    assert [(i.tolist(), n) for i, n in groups] == [([0], 4), ([1], 21)]
    # one job: another forward costs BLOCK_COST > the 17 positions one row saves
    assert len(rows.row_groups(torch.tensor([3, 20]), 1, 8)) == 1
    # the saving equals the extra forward's cost at the break-even job count
    assert BLOCK_COST > 17


def test_copies_per_group_keep_the_rows_per_forward_and_spread_evenly():
    assert rows.copies_for(32, 8, 4) == 64  # twice the copies of half the rows
    assert rows.copies_for(32, 8, 4, n_jobs=270) == 54  # 5 forwards of 54, not 4x64 + 14
    assert rows.copies_for(32, 8, 8, n_jobs=10) == 10
