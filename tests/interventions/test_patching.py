"""Activation patching: batched sweeps against one-at-a-time plain-torch patching, endpoints, errors."""

import pytest
import torch

import hookscope as hs
from hookscope import interventions as iv

import builders

CLEAN = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
CORRUPTED = CLEAN.clone()
CORRUPTED[:, 2] = 40


@pytest.fixture(scope="module")
def neox():
    hf = builders.tiny_neox()
    return hf, hs.HookedModel.wrap(hf)


def _raw(hf, tokens):
    with torch.no_grad():
        out = hf(tokens, use_cache=False).logits
    return float((out[:, -1, 5] - out[:, -1, 9]).mean())


def _patch_z_by_hand(hf, layer, head, pos, clean_z):
    """Patch head ``head``'s z at ``pos`` with a plain torch pre-hook on attention.dense."""
    dense = hf.gpt_neox.layers[layer].attention.dense

    def pre(module, args):
        z = args[0].clone()
        z[:, pos, head * 16 : (head + 1) * 16] = clean_z[:, pos, head * 16 : (head + 1) * 16]
        return (z,)

    handle = dense.register_forward_pre_hook(pre)
    try:
        return _raw(hf, CORRUPTED)
    finally:
        handle.remove()


def test_batched_sweep_equals_one_at_a_time_plain_torch(neox):
    hf, model = neox
    seen = {}
    handles = [
        hf.gpt_neox.layers[layer].attention.dense.register_forward_pre_hook(
            lambda m, a, layer=layer: seen.__setitem__(layer, a[0].clone())
        )
        for layer in range(2)
    ]
    try:
        _raw(hf, CLEAN)
    finally:
        for h in handles:
            h.remove()
    m_clean, m_corrupted = _raw(hf, CLEAN), _raw(hf, CORRUPTED)
    res = iv.activation_patching(
        model,
        CLEAN,
        CORRUPTED,
        iv.logit_diff(5, 9),
        sites="head.*.*",
        positions="each",
        chunk_size=5,
    )
    assert res.scores.shape == (2, 4, 6) and res.dims == ("layer", "head", "pos")
    for layer in range(2):
        for head in range(4):
            for pos in (2, 3, 5):
                expected = (_patch_z_by_hand(hf, layer, head, pos, seen[layer]) - m_corrupted) / (
                    m_clean - m_corrupted
                )
                assert abs(float(res.scores[layer, head, pos]) - expected) < 1e-4, (
                    layer,
                    head,
                    pos,
                )


def test_endpoints(neox):
    _, model = neox
    metric = iv.logit_diff(5, 9)
    full = iv.activation_patching(model, CLEAN, CORRUPTED, metric, sites="resid_pre.0")
    assert abs(float(full.scores) - 1) < 1e-5 and full.scores.shape == ()
    each = iv.activation_patching(
        model, CLEAN, CORRUPTED, metric, sites="resid_pre.0", positions="each"
    )
    unchanged = [0, 1, 3, 4, 5]  # tokens equal there: patching them changes nothing
    assert torch.all(each.scores[unchanged].abs() < 1e-5)
    noised = iv.activation_patching(
        model, CLEAN, CORRUPTED, metric, sites="resid_pre.0", direction="noise"
    )
    assert abs(float(noised.scores)) < 1e-5  # the whole corrupted stream: nothing of clean is kept
    kept = iv.activation_patching(
        model, CLEAN, CORRUPTED, metric, sites="resid_pre.1", positions=[0], direction="noise"
    )
    assert abs(float(kept.scores) - 1) < 1e-5  # position 0 sees no corrupted token yet


def test_chunk_size_does_not_change_scores(neox):
    _, model = neox
    a = iv.activation_patching(
        model,
        CLEAN,
        CORRUPTED,
        iv.logit_diff(5, 9),
        sites="neuron.1.0-7",
        positions=[2, 5],
        chunk_size=1,
    )
    b = iv.activation_patching(
        model,
        CLEAN,
        CORRUPTED,
        iv.logit_diff(5, 9),
        sites="neuron.1.0-7",
        positions=[2, 5],
        chunk_size=16,
    )
    assert a.scores.shape == (8, 2) and a.dims == ("neuron", "pos")
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)


def test_plain_callable_is_raw(neox):
    hf, model = neox

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 9]).mean()

    res = iv.activation_patching(
        model, CLEAN, CORRUPTED, metric, sites=["resid_pre.0", "attn_out.1"]
    )
    assert not res.normalised and res.dims == ("site",)
    assert abs(float(res.scores[0]) - _raw(hf, CLEAN)) < 1e-5
    assert res.baselines == pytest.approx(
        {"clean": _raw(hf, CLEAN), "corrupted": _raw(hf, CORRUPTED)}, abs=1e-6
    )


def test_cnn_channel_patching_by_hand():
    net = builders.tiny_cnn()
    model = hs.HookedModel.wrap(net)
    g = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randn(1, 1, 8, 8, generator=g), torch.randn(1, 1, 8, 8, generator=g)
    with torch.no_grad():  # the class whose logit moves most (a well-conditioned normalisation)
        target = int((net(clean) - net(corrupted)).abs().argmax())
    res = iv.activation_patching(
        model, clean, corrupted, iv.logit(target, position=None), sites="neuron.1.*"
    )
    assert res.scores.shape == (6,) and res.dims == ("neuron",)
    with torch.no_grad():
        h_clean = net[:4](clean)
        h = net[:4](corrupted)
        h[:, 2] = h_clean[:, 2]
        patched = net[4:](h)[0, target]
        lo, hi = net(corrupted)[0, target], net(clean)[0, target]
    assert abs(float(res.scores[2]) - float((patched - lo) / (hi - lo))) < 1e-5


def test_result_table_frame_and_figure(neox):
    _, model = neox
    res = iv.activation_patching(model, CLEAN, CORRUPTED, iv.logit_diff(5, 9), sites="head.*.*")
    top = res.top(3)
    assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2]
    assert float(res.scores.max()) == top[0][2]
    df = res.to_pandas()
    assert list(df.columns) == ["address", "position", "score", "effect"] and len(df) == 8
    assert df["effect"].tolist() == df["score"].tolist()  # normalised denoising
    noised = iv.activation_patching(
        model, CLEAN, CORRUPTED, iv.logit_diff(5, 9), sites="head.*.*", direction="noise"
    )
    lowest = noised.top(1)[0]
    assert lowest[2] == float(noised.scores.min())  # noising ranks what destroys most first
    assert "rank" in repr(res) and "head." in repr(res)
    from matplotlib.figure import Figure

    assert isinstance(res.plot(), Figure)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(direction="denoising"), "direction must be one of denoise, noise"),
        (dict(corrupted=CORRUPTED[:, :4]), "must have the same shape"),
        (dict(positions=[9]), r"positions \[9\] out of range for inputs of 6 positions"),
        (dict(sites="head.0.7"), "head 7 out of range"),
        (dict(corrupted=CLEAN), "the metric is equal on clean and corrupted runs"),
    ],
)
def test_patching_errors(neox, kwargs, message):
    _, model = neox
    args = dict(clean=CLEAN, corrupted=CORRUPTED, metric=iv.logit_diff(5, 9), sites="resid_pre.*")
    args.update(kwargs)
    with pytest.raises(hs.HookscopeError, match=message):
        iv.activation_patching(model, **args)


def test_vision_has_no_position_axis():
    model = hs.HookedModel.wrap(builders.tiny_mlp())
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(hs.InputError, match="no position axis; use positions='all'"):
        iv.activation_patching(
            model, x, x + 1, iv.logit(0, position=None), sites="neuron.0.*", positions="each"
        )


def test_tokenizer_dicts_are_read_by_their_input_ids():
    model = hs.HookedModel.wrap(builders.tiny_neox())
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 500, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 7) % 500
    metric = iv.logit_diff(5, 9)
    ones = torch.ones_like(clean)
    as_dicts = iv.activation_patching(
        model, {"input_ids": clean, "attention_mask": ones},
        {"input_ids": corrupted, "attention_mask": ones}, metric, progress=False,
    )  # fmt: skip
    plain = iv.activation_patching(model, clean, corrupted, metric, progress=False)
    assert torch.equal(as_dicts.scores, plain.scores)
    padded = ones.clone()
    padded[0, -1] = 0
    with pytest.raises(hs.HookscopeError, match=r"rows \[0\] differ in token length"):
        iv.activation_patching(
            model, {"input_ids": clean, "attention_mask": padded}, corrupted, metric,
            progress=False,
        )  # fmt: skip


def test_prompts_of_different_token_lengths_read_each_row_at_its_own_end():
    """Texts of different token lengths are right-padded; on a causal model the padding
    after a row cannot reach it, and logit_diff's position -1 reads each row's last real
    token: every raw score equals the mean over rows of the same patch run on each row
    alone, unpadded. What would read the padding is refused with a message."""
    model = hs.HookedModel.wrap(builders.tiny_neox(), tokenizer=builders.make_tokenizer())
    clean, corrupted = ["a b c d", "a b"], ["a b c a", "a d"]
    assert [len(model.to_str_tokens(t)) for t in clean + corrupted] == [5, 2, 5, 2]
    metric = iv.logit_diff(5, 9)
    res = iv.activation_patching(model, clean, corrupted, metric, "head.*.*", progress=False)
    atp = iv.attribution_patching(model, clean, corrupted, metric, "head.*.*", progress=False)
    rows = [
        iv.activation_patching(model, [c], [k], metric, "head.*.*", progress=False)
        for c, k in zip(clean, corrupted, strict=True)
    ]

    def raw(r):
        b = r.baselines
        return r.flat * (b["clean"] - b["corrupted"]) + b["corrupted"]

    torch.testing.assert_close(raw(res), (raw(rows[0]) + raw(rows[1])) / 2, atol=1e-5, rtol=0)
    assert res.baselines["clean"] == pytest.approx(
        sum(r.baselines["clean"] for r in rows) / 2, abs=1e-5
    )
    singles = [
        iv.attribution_patching(model, [c], [k], metric, "head.*.*", progress=False)
        for c, k in zip(clean, corrupted, strict=True)
    ]
    torch.testing.assert_close(raw(atp), (raw(singles[0]) + raw(singles[1])) / 2, atol=1e-5, rtol=0)

    # knockout (localize_circuit's faithfulness) reads the same rows at the same tokens
    kept = iv.knockout(model, clean, "head.*.*", metric, keep=["head.1.2"], method="corrupted",
                       reference=corrupted)  # fmt: skip
    assert kept.clean == pytest.approx(res.baselines["clean"], abs=1e-5)

    with pytest.raises(hs.HookscopeError, match=r"logit_diff, logit and prob do"):
        iv.activation_patching(model, clean, corrupted, lambda out: out[:, -1, 5].mean())
    with pytest.raises(hs.HookscopeError, match=r"rows \[1\] differ in token length"):
        iv.activation_patching(model, clean, ["a b c a", "a b c"], metric)
    with pytest.raises(hs.HookscopeError, match=r"position 3 falls outside rows \[1\]"):
        iv.activation_patching(model, clean, corrupted, iv.logit_diff(5, 9, position=3))
    bert = hs.HookedModel.wrap(builders.tiny_bert(), tokenizer=builders.make_tokenizer())
    with pytest.raises(hs.HookscopeError, match="not a causal language model"):
        iv.activation_patching(bert, clean, corrupted, metric)
    with pytest.raises(hs.HookscopeError, match="resampling reference needs prompts of equal"):
        iv.ablate(model, clean, "head.0.*", "resample", reference=clean, metric=metric)


def test_padded_prompts_edge_cases_name_what_is_wrong():
    """Negative sweep positions (they would count from the padded width), rows of another
    length in a differently padded batch, a mean with no reference row at a position, a
    tokenizer without pad or eos token, and a tokenizer dict with 1-D ids."""
    tok = builders.make_tokenizer()
    model = hs.HookedModel.wrap(builders.tiny_neox(), tokenizer=tok)
    clean, corrupted = ["a b c d", "a b"], ["a b c a", "a d"]
    metric = iv.logit_diff(5, 9)
    with pytest.raises(hs.HookscopeError, match=r"positions \[-1\] count from the padded width"):
        iv.activation_patching(model, clean, corrupted, metric, "resid_pre.1", positions=[-1])
    with pytest.raises(hs.HookscopeError, match=r"positions \[-2\] count from the padded width"):
        iv.attribution_patching(model, clean, corrupted, metric, "resid_pre.1", positions=[-2])
    each = iv.activation_patching(model, clean, corrupted, metric, "resid_pre.1",
                                  positions="each", progress=False)  # fmt: skip
    assert each.scores.shape == (5,)
    with pytest.raises(hs.HookscopeError, match=r"rows \[1\] differ in token length between the "
                       r"clean and the corrupted inputs \(\[2\] vs \[4\]"):  # fmt: skip
        iv.activation_patching(model, clean, ["a b c a", "a b c"], metric)

    ids = model.to_tokens(["a b c d", "a b c a"])  # 5 tokens each, no padding
    reference = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
    }
    with pytest.raises(hs.HookscopeError, match=r"positions \[4\] are padding in every reference"):
        iv.ablate(model, ids, "head.0.1", "mean", reference=reference, metric=metric)

    one = iv.activation_patching(
        model, {"input_ids": ids[0], "attention_mask": torch.ones(1, 5)}, ids[1:], metric,
        progress=False,
    )  # fmt: skip
    assert torch.equal(one.scores, iv.activation_patching(model, ids[:1], ids[1:], metric,
                                                          progress=False).scores)  # fmt: skip

    bare = builders.make_tokenizer()
    bare.pad_token, bare.eos_token = None, None
    side = bare.padding_side
    padded = hs.HookedModel.wrap(builders.tiny_neox(), tokenizer=bare).to_tokens(clean)
    assert padded.shape == (2, 5) and padded[1, 2:].tolist() == [0, 0, 0]
    assert bare.padding_side == side and bare.pad_token is None  # the tokenizer is untouched
