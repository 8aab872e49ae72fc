"""Ablation and knockout against plain-torch hooks written by hand, closed forms, and errors.

GPT-NeoX's per-head z is the input of ``attention.dense``: head h of layer L is columns
``h * 16 : (h + 1) * 16`` of that input (tiny_neox: d_model 64, 4 heads). Every reference value
below is computed with forward (pre-)hooks on the Hugging Face modules, never with hookscope.
"""

import pytest
import torch

import hookscope as hs
from hookscope import interventions as iv
from hookscope.addresses import Slot
from hookscope.errors import InputError

import builders

D = 16  # d_head of tiny_neox
INPUTS = torch.randint(0, 500, (3, 6), generator=torch.Generator().manual_seed(0))
REF = torch.randint(0, 500, (5, 6), generator=torch.Generator().manual_seed(1))
SHORT = torch.randint(0, 500, (4, 4), generator=torch.Generator().manual_seed(2))
CORRUPTED = torch.randint(0, 500, (3, 6), generator=torch.Generator().manual_seed(3))
ALL_HEADS = [(layer, head) for layer in range(2) for head in range(4)]


@pytest.fixture(scope="module")
def neox():
    hf = builders.tiny_neox()
    return hf, hs.HookedModel.wrap(hf)


def ld(out):
    """A plain metric: mean logit difference of tokens 5 and 9 at the last position."""
    return (out[:, -1, 5] - out[:, -1, 9]).mean()


def _dense(hf, layer):
    return hf.gpt_neox.layers[layer].attention.dense


def run(hf, tokens, heads=(), value=None):
    """Logits with each (layer, head) of ``heads`` set to ``value(layer)`` (broadcast to z)."""
    handles = []
    for layer in {layer for layer, _ in heads}:
        mine = [h for lay, h in heads if lay == layer]

        def pre(module, args, layer=layer, mine=mine):
            z = args[0].clone()
            for h in mine:
                z[..., h * D : (h + 1) * D] = value(layer)[..., h * D : (h + 1) * D]
            return (z,)

        handles.append(_dense(hf, layer).register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return hf(tokens, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def z_of(hf, tokens):
    """Each layer's z [batch, pos, d_model] on ``tokens``."""
    seen = {}
    handles = [
        _dense(hf, layer).register_forward_pre_hook(
            lambda m, a, layer=layer: seen.__setitem__(layer, a[0].clone())
        )
        for layer in range(2)
    ]
    try:
        run(hf, tokens)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def zeros(layer):
    return torch.zeros(64)


def test_zero_head_equals_plain_torch(neox):
    hf, model = neox
    res = iv.ablate(model, INPUTS, "head.*.*", metric=iv.logit_diff(5, 9), progress=False)
    assert res.scores.shape == (2, 4) and res.dims == ("layer", "head")
    assert (res.method, res.direction, res.normalised) == ("zero ablation", "noise", False)
    clean = float(ld(run(hf, INPUTS)))
    assert res.baselines["clean"] == pytest.approx(clean, abs=1e-6)
    for layer, head in ALL_HEADS:
        expected = float(ld(run(hf, INPUTS, [(layer, head)], zeros)))
        assert abs(float(res.scores[layer, head]) - expected) < 1e-5, (layer, head)
    torch.testing.assert_close(res.effects, clean - res.flat, atol=1e-6, rtol=0)
    assert len(res.to_pandas()) == 8 and "zero ablation" in repr(res)

    out = iv.ablate(model, INPUTS, ["head.0.1", "head.1.3"])  # metric=None: all at once
    torch.testing.assert_close(out, run(hf, INPUTS, [(0, 1), (1, 3)], zeros), atol=1e-5, rtol=0)


def test_zero_neuron_and_mean_whole_attn_out(neox):
    hf, model = neox
    mlp_down = hf.gpt_neox.layers[1].mlp.dense_4h_to_h

    def zero_neuron(module, args):
        h = args[0].clone()
        h[..., 7] = 0
        return (h,)

    handle = mlp_down.register_forward_pre_hook(zero_neuron)
    try:
        expected = run(hf, INPUTS)
    finally:
        handle.remove()
    torch.testing.assert_close(iv.ablate(model, INPUTS, "neuron.1.7"), expected, atol=1e-5, rtol=0)

    attention = hf.gpt_neox.layers[0].attention
    seen = []
    handle = attention.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
    try:
        run(hf, REF)
    finally:
        handle.remove()
    mean = seen[0].mean(0)  # [pos, d_model]
    handle = attention.register_forward_hook(lambda m, a, out: (mean.expand_as(out[0]), *out[1:]))
    try:
        expected = run(hf, INPUTS)
    finally:
        handle.remove()
    got = iv.ablate(model, INPUTS, "attn_out.0", "mean", reference=REF)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mean_per_position_and_over_positions(neox):
    hf, model = neox
    zr, zs = z_of(hf, REF), z_of(hf, SHORT)
    sites = ["head.0.2", "head.1.0"]
    per_pos = iv.ablate(model, INPUTS, sites, "mean", reference=REF, metric=ld)
    pooled = iv.ablate(model, INPUTS, sites, "mean", reference=REF, metric=ld, per_position=False)
    short = iv.ablate(model, INPUTS, sites, "mean", reference=SHORT, metric=ld)
    assert per_pos.dims == ("site",) and per_pos.scores.shape == (2,)
    for i, (layer, head) in enumerate([(0, 2), (1, 0)]):
        by_pos = float(ld(run(hf, INPUTS, [(layer, head)], lambda lay: zr[lay].mean(0))))
        over_all = float(ld(run(hf, INPUTS, [(layer, head)], lambda lay: zr[lay].mean((0, 1)))))
        over_short = float(ld(run(hf, INPUTS, [(layer, head)], lambda lay: zs[lay].mean((0, 1)))))
        assert abs(float(per_pos.scores[i]) - by_pos) < 1e-5
        assert abs(float(pooled.scores[i]) - over_all) < 1e-5
        assert abs(float(short.scores[i]) - over_short) < 1e-5
    assert abs(by_pos - over_all) > 1e-4  # the two conventions differ here

    layer1 = [(1, h) for h in range(4)]
    out = iv.ablate(model, INPUTS, "head.1.*", "mean", reference=REF)
    expected = run(hf, INPUTS, layer1, lambda lay: zr[lay].mean(0))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_resample_equals_hand_loop(neox):
    hf, model = neox
    zr, n_draws, seed = z_of(hf, REF), 3, 7
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(5, (3,), generator=g) for _ in range(n_draws)]
    res = iv.ablate(
        model,
        INPUTS,
        "head.*.*",
        "resample",
        reference=REF,
        metric=ld,
        n_draws=n_draws,
        seed=seed,
        chunk_size=5,
        progress=False,
    )
    for layer, head in ALL_HEADS:
        draws = [
            float(ld(run(hf, INPUTS, [(layer, head)], lambda lay, r=r: zr[lay][r]))) for r in rows
        ]
        assert max(draws) - min(draws) > 1e-6  # the draws differ, so averaging is tested
        assert abs(float(res.scores[layer, head]) - sum(draws) / n_draws) < 1e-5, (layer, head)

    out = iv.ablate(
        model, INPUTS, "head.0.*", "resample", reference=REF, n_draws=n_draws, seed=seed
    )
    layer0 = [(0, h) for h in range(4)]
    expected = torch.stack([run(hf, INPUTS, layer0, lambda lay, r=r: zr[lay][r]) for r in rows])
    torch.testing.assert_close(out, expected.mean(0), atol=1e-5, rtol=0)


def _reference_batches(hf):
    """Rows of each forward the model runs (a pre-hook on the embedding)."""
    seen: list[int] = []
    handle = hf.gpt_neox.embed_in.register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))
    return seen, handle


def test_a_large_reference_is_averaged_in_chunks_and_resampling_runs_drawn_rows(neox):
    """A reference of 1500 rows x 6 positions (9000 tokens) is averaged over forwards of at
    most ~4096 tokens, equal to the mean of the whole reference taken by hand; resampling
    runs only the rows it draws."""
    hf, model = neox
    big = torch.randint(0, 500, (1500, 6), generator=torch.Generator().manual_seed(5))
    zb = z_of(hf, big)
    seen, handle = _reference_batches(hf)
    try:
        res = iv.ablate(model, INPUTS, ["head.0.1", "head.1.3"], "mean", reference=big, metric=ld,
                        progress=False)  # fmt: skip
    finally:
        handle.remove()
    # the reference forwards come first (the means are needed before any ablated run)
    reference_runs = [n for i, n in enumerate(seen) if sum(seen[:i]) < 1500]
    assert sum(reference_runs) == 1500
    assert len(reference_runs) >= 3 and max(reference_runs) * 6 <= 4096
    for i, (layer, head) in enumerate([(0, 1), (1, 3)]):
        mean = zb[layer].double().mean(0).float()
        expected = float(ld(run(hf, INPUTS, [(layer, head)], lambda lay, m=mean: m)))
        assert abs(float(res.scores[i]) - expected) < 1e-5

    seen, handle = _reference_batches(hf)
    try:
        iv.ablate(model, INPUTS, "head.0.1", "resample", reference=big, n_draws=2, seed=3)
    finally:
        handle.remove()
    assert seen[0] <= 2 * INPUTS.shape[0]  # the reference forward: the drawn rows only


def test_resample_special_cases(neox):
    _, model = neox
    one = REF[:1]
    res = iv.ablate(model, INPUTS, "head.*.*", "resample", reference=one, metric=ld, n_draws=3)
    patched = iv.activation_patching(
        model, INPUTS, one.expand(3, -1), ld, sites="head.*.*", direction="noise"
    )
    torch.testing.assert_close(res.scores, patched.scores, atol=1e-6, rtol=0)
    same = REF[:1].repeat(4, 1)
    resampled = iv.ablate(model, INPUTS, "head.*.*", "resample", reference=same, metric=ld)
    mean = iv.ablate(model, INPUTS, "head.*.*", "mean", reference=same, metric=ld)
    torch.testing.assert_close(resampled.scores, mean.scores, atol=1e-5, rtol=0)


def test_cnn_channels_by_hand():
    net = builders.tiny_cnn()
    model = hs.HookedModel.wrap(net)
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(3, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    with torch.no_grad():
        target = int(net(x)[0].argmax())
        res = iv.ablate(model, x, "neuron.1.*", metric=iv.logit(target, position=None))
        assert res.scores.shape == (6,) and res.dims == ("neuron",)
        for c in range(6):
            h = net[:4](x)
            h[:, c] = 0
            assert abs(float(res.scores[c]) - float(net[4:](h)[:, target].mean())) < 1e-5
        h0 = net[:2](x).clone()  # neuron.0 sits before an in-place ReLU's consumer
        h0[:, 1] = 0
        torch.testing.assert_close(
            iv.ablate(model, x, "neuron.0.1"), net[2:](h0), atol=1e-5, rtol=0
        )
        h = net[:4](x)
        h[:, 2] = net[:4](ref)[:, 2].mean(0)
        got = iv.ablate(model, x, "neuron.1.2", "mean", reference=ref)
        torch.testing.assert_close(got, net[4:](h), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["zero", "mean", "resample", "corrupted"])
def test_knockout_endpoints_are_exact(neox, method):
    _, model = neox
    ref = CORRUPTED if method == "corrupted" else REF
    args = dict(method=method, reference=ref, n_draws=3)
    full = iv.knockout(model, INPUTS, "head.*.*", ld, keep="head.*.*", **args)
    none = iv.knockout(model, INPUTS, "head.*.*", ld, keep=(), **args)
    assert full.faithfulness == 1.0 and full.value == full.clean and full.removed == 0
    assert none.faithfulness == 0.0 and none.value == none.ablated and none.removed == 8


def test_knockout_mean_and_corrupted_by_hand(neox):
    hf, model = neox
    keep = ["head.0.1", "head.1.3"]
    removed = [s for s in ALL_HEADS if s not in [(0, 1), (1, 3)]]
    zr, zc = z_of(hf, REF), z_of(hf, CORRUPTED)
    for method, ref, value in [
        ("mean", REF, lambda lay: zr[lay].mean(0)),
        ("corrupted", CORRUPTED, lambda lay: zc[lay]),
    ]:
        k = iv.knockout(
            model, INPUTS, "head.*.*", iv.logit_diff(5, 9), keep=keep, method=method, reference=ref
        )
        assert k.value == pytest.approx(float(ld(run(hf, INPUTS, removed, value))), abs=1e-5)
        assert k.ablated == pytest.approx(float(ld(run(hf, INPUTS, ALL_HEADS, value))), abs=1e-5)
        assert k.clean == pytest.approx(float(ld(run(hf, INPUTS))), abs=1e-6)
        assert k.faithfulness == (k.value - k.ablated) / (k.clean - k.ablated)
        assert [str(a) for a in k.kept] == keep and k.removed == 6
    assert "faithfulness" in repr(k) and "kept 2 of 8 sites" in repr(k)
    frame = k.to_pandas()
    assert len(frame) == 1 and frame["faithfulness"][0] == k.faithfulness
    assert frame["kept"][0] == "head.0.1, head.1.3"


def test_knockout_faithfulness_closed_form_on_linear_readout():
    """neuron.1.i of tiny_mlp feeds the logits linearly: zero-ablating a set S of them removes
    sum_{i in S} W[t, i] * mean(h_i) from the mean logit t, so faithfulness has a closed form."""
    net = builders.tiny_mlp()
    model = hs.HookedModel.wrap(net)
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        contrib = net[5].weight[3] * net[:5](x).mean(0)  # [16]
    kept = [0, 2, 5, 11]
    k = iv.knockout(
        model,
        x,
        "neuron.1.*",
        iv.logit(3, position=None),
        keep=[f"neuron.1.{i}" for i in kept],
        method="zero",
    )
    expected = float(contrib[kept].sum() / contrib.sum())
    assert k.faithfulness == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():
        net[5].weight[3, 8:] = 0  # units 8..15 no longer reach logit 3: units 0..7 carry it all
    k = iv.knockout(
        model, x, "neuron.1.*", iv.logit(3, position=None), keep="neuron.1.0-7", method="zero"
    )
    assert k.faithfulness == pytest.approx(1.0, abs=1e-6)


def _no_hooks(hf):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in hf.modules())


@pytest.mark.parametrize(
    "call, kwargs, error, message",
    [
        (
            "ablate",
            dict(method="zeros"),
            hs.InputError,
            "method must be one of zero, mean, resample, got 'zeros'",
        ),
        ("ablate", dict(method="mean"), hs.InputError, "method='mean' needs reference inputs"),
        (
            "ablate",
            dict(method="resample", reference=SHORT),
            hs.InputError,
            r"needs reference inputs with the inputs' positions .*\(3, 6\).*\(4, 4\)",
        ),
        (
            "ablate",
            dict(method="mean", reference=SHORT, per_position=True),
            hs.InputError,
            "per_position=True needs a reference with the inputs' positions",
        ),
        (
            "ablate",
            dict(method="resample", reference=REF, n_draws=0),
            hs.InputError,
            "n_draws must be an int >= 1",
        ),
        ("ablate", dict(chunk_size=0), hs.InputError, "chunk_size must be an int >= 1"),
        ("ablate", dict(sites="head.0.9"), hs.AddressRangeError, "head 9 out of range"),
        (
            "ablate",
            dict(metric=lambda out: out[:, -1, 5]),
            hs.InputError,
            "metric must return a scalar tensor",
        ),
        ("ablate", dict(inputs=INPUTS + 1000), hs.InputError, "vocab"),  # raised inside run
        ("ablate", dict(inputs=INPUTS + 1000, sites="head.0.1.pattern"), hs.InputError, "vocab"),
        (
            "ablate",
            dict(sites="head.0.1.pattern", method="mean", reference=SHORT),
            hs.InputError,
            "mean ablation of an attention pattern needs per-position means",
        ),
        (
            "knockout",
            dict(method="mean_ablation"),
            hs.InputError,
            "one of zero, mean, resample, corrupted",
        ),
        (
            "knockout",
            dict(sites="head.1.*", keep=["head.0.1"], reference=REF),
            hs.InputError,
            r"keep must be among the sites; head.0.1 is not among the 4 sites \(head.1.0, ",
        ),
        ("knockout", dict(method="corrupted", reference=REF), hs.InputError, "aligned row by row"),
        (
            "knockout",
            dict(method="zero", metric=lambda out: out.sum() * 0),
            hs.InputError,
            "faithfulness is undefined",
        ),
    ],
)
def test_errors_leave_no_hooks(neox, call, kwargs, error, message):
    hf, model = neox
    before = run(hf, INPUTS)
    attn = hf.config._attn_implementation
    args = dict(inputs=INPUTS, sites="head.*.*")
    if call == "knockout":
        args["metric"] = ld
    args.update(kwargs)
    with pytest.raises(error, match=message):
        getattr(iv, call)(model, **args)
    assert _no_hooks(hf) and hf.config._attn_implementation == attn
    torch.testing.assert_close(run(hf, INPUTS), before, atol=0, rtol=0)


def test_mean_over_a_padded_reference_counts_real_tokens_only(neox):
    """Texts of different token lengths (right-padded): a position's mean is over the
    reference rows that reach it, the pooled mean over real tokens; the metric reads each
    input row at its last real token."""
    hf, _ = neox
    model = hs.HookedModel.wrap(hf, tokenizer=builders.make_tokenizer())
    inputs, reference = ["a b c d", "a b"], ["a b c a", "a d", "a b c d"]
    tokens, ref = model.to_tokens(inputs), model.to_tokens(reference)
    lengths, ref_lengths = torch.tensor([5, 2]), torch.tensor([5, 2, 5])
    real = (torch.arange(5) < ref_lengths[:, None]).float()[..., None]  # [3, 5, 1]
    z = z_of(hf, ref)

    def at_ends(logits):
        rows = torch.arange(2)
        return float((logits[rows, lengths - 1, 5] - logits[rows, lengths - 1, 9]).mean())

    metric = iv.logit_diff(5, 9)
    per_pos = iv.ablate(model, inputs, "head.1.2", "mean", reference=reference, metric=metric)
    pooled = iv.ablate(
        model, inputs, "head.1.2", "mean", reference=reference, metric=metric, per_position=False
    )
    by_position = (z[1] * real).sum(0) / real.sum(0)  # [5, 64]
    over_tokens = (z[1] * real).sum((0, 1)) / real.sum()  # [64]
    expected_pos = at_ends(run(hf, tokens, [(1, 2)], lambda lay: by_position))
    expected_pooled = at_ends(run(hf, tokens, [(1, 2)], lambda lay: over_tokens))
    assert abs(float(per_pos.scores) - expected_pos) < 1e-5
    assert abs(float(pooled.scores) - expected_pooled) < 1e-5
    assert abs(expected_pos - expected_pooled) > 1e-4  # the padding-aware means differ
    with pytest.raises(hs.HookscopeError, match="resampling reference needs prompts of equal"):
        iv.ablate(model, inputs, "head.1.2", "resample", reference=reference, metric=metric)


def test_knockout_refuses_a_kept_kv_head_shared_with_an_ablated_one():
    """GQA: query heads 0 and 1 share key/value head 0, so keeping head.1.0.k while
    ablating head.1.1.k would ablate the kept one too."""
    model = hs.HookedModel.wrap(builders.tiny_llama_gqa())
    tokens = torch.randint(1, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    metric = iv.logit_diff(5, 9)
    assert model.adapter.unit_index(Slot("k", 1), 0) == model.adapter.unit_index(Slot("k", 1), 1)
    with pytest.raises(
        InputError, match=r"head\.1\.0\.k is kept but shares its values with head\.1\.1\.k"
    ):
        iv.knockout(model, tokens, ["head.1.0.k", "head.1.1.k"], metric, keep=["head.1.0.k"],
                    method="zero")  # fmt: skip
    # heads of different groups are separate: keeping one of them is fine
    res = iv.knockout(model, tokens, ["head.1.0.k", "head.1.2.k"], metric, keep=["head.1.0.k"],
                      method="zero")  # fmt: skip
    assert res.removed == 1
