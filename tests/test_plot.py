"""hookscope.plot: figures go through pyplot; heatmaps, tables, bars and the HTML view show
exactly the numbers they were given (attention patterns checked against Hugging Face's own
``output_attentions``)."""

import json
import re

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba

import hookscope as hs
from hookscope import interventions as iv

import builders

TEXTS = ["the cat sat on the mat", "a dog ran to $5 <b>"]


@pytest.fixture(autouse=True)
def _close_figures():
    plt.close("all")
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def lm():
    hf = builders.tiny_gpt2()
    model = hs.HookedModel.wrap(hf, builders.make_tokenizer())
    ids = model.to_tokens(TEXTS)  # [2, pos], the shorter row right-padded
    _, cache = model.run_with_cache(ids, names="head.1.*.pattern")
    tokens = [model.to_str_tokens(ids[b]) for b in range(ids.shape[0])]
    return hf, model, ids, cache, tokens


def _assert_not_blank(path):
    img = mpimg.imread(path)[..., :3]
    drawn = (img < 0.97).any(axis=-1).mean()
    assert drawn > 0.01, f"{path.name}: only {drawn:.2%} of the pixels are not white"
    assert img.std() > 0.02


def _png_after_plot(make, tmp_path, name):
    """Call ``make()`` (a .plot()), then save the pyplot way; the figure must be current."""
    fig = make()
    assert plt.gcf() is fig
    path = tmp_path / f"{name}.png"
    plt.savefig(path)
    _assert_not_blank(path)
    return fig


# ------------------------------------------------------------------------- pyplot way


def _results(lm):
    _, model, ids, cache, tokens = lm
    clean = ids[:1, :6]
    corrupted = clean.clone()
    corrupted[:, 2] = 40
    metric = iv.logit_diff(5, 9)
    rng = np.random.default_rng(0)
    acts = [rng.standard_normal((40, 8)) @ rng.standard_normal((8, 8)) for _ in range(4)]
    steps = np.arange(200)
    series = np.where(steps < 120, 0.0, 3.0) + 0.05 * rng.standard_normal(200)
    return {
        "patching": lambda: iv.activation_patching(
            model, clean, corrupted, metric, sites="head.*.*", progress=False
        ).plot(),
        "patching_1d": lambda: iv.activation_patching(
            model, clean, corrupted, metric, sites="resid_post.*", progress=False
        ).plot(),
        "cka": lambda: hs.analysis.cka_report(acts, progress=False).plot(),
        "dimensionality": lambda: hs.analysis.dimensionality_report(acts[0]).plot(),
        "jumps": lambda: hs.analysis.jump_report(series, steps).plot(),
        "attention": lambda: hs.plot.attention(cache, "head.1.*", tokens[0]),
        "logit_lens": lambda: hs.plot.logit_lens([["a", "b"], ["c", "d"]], [[0.1, 0.9], [1, 0]]),
        "dla": lambda: hs.plot.dla([1.0, -2.0, 0.5], ["L0H0", "L0H1", "L1H0"]),
    }


@pytest.mark.parametrize(
    "name",
    ["patching", "patching_1d", "cka", "dimensionality", "jumps", "attention", "logit_lens", "dla"],
)
def test_plot_makes_the_current_pyplot_figure_and_plt_savefig_draws_it(lm, tmp_path, name):
    fig = _png_after_plot(_results(lm)[name], tmp_path, name)
    fig.savefig(tmp_path / "direct.png")  # the returned Figure saves too
    _assert_not_blank(tmp_path / "direct.png")
    assert plt.fignum_exists(fig.number)


def test_figure_helper_and_patching_ax_argument(lm):
    fig = hs.plot.figure(figsize=(3, 2), dpi=50)
    assert plt.gcf() is fig and tuple(fig.get_size_inches()) == (3, 2) and fig.dpi == 50
    _, model, ids, _, _ = lm
    clean = ids[:1, :6]
    corrupted = clean.clone()
    corrupted[:, 2] = 40
    res = iv.activation_patching(
        model, clean, corrupted, iv.logit_diff(5, 9), sites="head.*.*", progress=False
    )
    outer = hs.plot.figure()
    ax = outer.add_subplot(1, 2, 2)
    assert res.plot(ax=ax) is outer and len(plt.get_fignums()) == 2  # no new figure
    np.testing.assert_array_equal(ax.images[0].get_array(), res.scores.double().numpy())


# ------------------------------------------------------------------------- attention heatmaps


def _labels(ticks):
    return [t.get_text() for t in ticks]


def test_attention_one_head_equals_the_cache_and_hugging_face(lm):
    hf, _, ids, cache, tokens = lm
    with torch.no_grad():
        ref = builders.eager_copy(hf)(ids, output_attentions=True, use_cache=False).attentions
    for batch in (0, 1):
        theirs = ref[1][batch, 2]
        mine = cache["head.1.2.pattern"][batch]
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)  # the independent check
        for address in ("head.1.2", "head.1.2.pattern", hs.AttentionHead(1, 2)):
            fig = hs.plot.attention(cache, address, tokens[batch], batch=batch)
            ax = fig.axes[0]
            assert len(ax.images) == 1 and ax.get_title() == "L1H2"
            np.testing.assert_array_equal(ax.images[0].get_array(), mine.numpy())
            np.testing.assert_allclose(ax.images[0].get_array(), theirs.numpy(), atol=1e-5)
            assert _labels(ax.get_xticklabels()) == tokens[batch]  # source on x
            assert _labels(ax.get_yticklabels()) == tokens[batch]  # destination on y
    assert any("$" in t for t in tokens[1])  # mathtext stays literal in tick labels


def test_attention_grid_has_one_subplot_per_head_in_order(lm):
    _, _, _, cache, tokens = lm
    for address in ("head.1.*", "head.1", "head.1.*.pattern"):
        fig = hs.plot.attention(cache, address, tokens[1], batch=1)
        heads = [ax for ax in fig.axes if ax.images]
        assert [ax.get_title() for ax in heads] == ["L1H0", "L1H1", "L1H2", "L1H3"]
        for h, ax in enumerate(heads):
            want = cache[f"head.1.{h}.pattern"][1].numpy()
            np.testing.assert_array_equal(ax.images[0].get_array(), want)
            assert _labels(ax.get_xticklabels()) == tokens[1]
        plt.close(fig)
    fig = hs.plot.attention(cache, "head.1.1-2", tokens[0])
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["L1H1", "L1H2"]


def test_attention_from_pattern_tensors(lm):
    _, _, _, cache, tokens = lm
    layer = cache["head.1.pattern"]  # [batch, n_heads, dest, src]
    one = hs.plot.attention(layer[0, 3], "head.1.3", tokens[0])
    np.testing.assert_array_equal(one.axes[0].images[0].get_array(), layer[0, 3].numpy())
    grid = hs.plot.attention(layer[1], None, tokens[1])
    got = [ax.images[0].get_array() for ax in grid.axes if ax.images]
    np.testing.assert_array_equal(np.stack(got), layer[1].numpy())
    assert [ax.get_title() for ax in grid.axes if ax.images] == ["H0", "H1", "H2", "H3"]
    picked = hs.plot.attention(layer, "head.1.2", None, batch=1)  # 4-D: batch picks the row
    np.testing.assert_array_equal(picked.axes[0].images[0].get_array(), layer[1, 2].numpy())
    fig = hs.plot.figure()
    ax = fig.add_subplot(1, 1, 1)
    assert hs.plot.attention(layer[0].numpy(), "head.1.0", tokens[0], ax=ax) is fig


def test_attention_errors_say_what_to_do(lm):
    _, model, ids, cache, tokens = lm
    with pytest.raises(hs.CacheKeyError, match=r"names='head\.0\.\*\.pattern'") as err:
        hs.plot.attention(cache, "head.0.1", tokens[0])
    hint = re.search(r"names='([^']+)'", str(err.value)).group(1)
    _, cache0 = model.run_with_cache(ids, names=hint)  # the suggested call works
    assert hs.plot.attention(cache0, "head.0.1", tokens[0]).axes[0].get_title() == "L0H1"
    _, z_only = model.run_with_cache(ids, names="head.1.*")
    with pytest.raises(hs.CacheKeyError, match="not cached"):
        hs.plot.attention(z_only, "head.*.*", tokens[0])
    with pytest.raises(hs.InputError, match=f"{len(tokens[0]) - 1} tokens"):
        hs.plot.attention(cache, "head.1.2", tokens[0][:-1])
    with pytest.raises(hs.InputError, match="list of token strings"):
        hs.plot.attention(cache, "head.1.2", "the cat")
    for address in ("resid_post.1", hs.MLPNeuron(1, 3), "logits"):
        with pytest.raises(hs.AddressError, match="not a head address"):
            hs.plot.attention(cache, address, tokens[0])
    with pytest.raises(hs.AddressError, match="not their pattern"):
        hs.plot.attention(cache, "head.1.2.q", tokens[0])
    with pytest.raises(hs.AddressRangeError, match="layer 1 has 4 heads"):
        hs.plot.attention(cache, "head.1.7", tokens[0])
    with pytest.raises(hs.InputError, match="out of range"):
        hs.plot.attention(cache, "head.1.2", tokens[0], batch=2)
    with pytest.raises(hs.InputError, match="ax= takes one head"):
        hs.plot.attention(cache, "head.1.*", tokens[0], ax=hs.plot.figure().add_subplot())
    with pytest.raises(hs.InputError, match="one layer"):
        hs.plot.attention(cache["head.1.pattern"][0], "head.*.*", tokens[0])


# ------------------------------------------------------------------------- logit lens, DLA


def test_logit_lens_cells_show_the_tokens_coloured_by_value():
    top = [["the", " cat", "$x$"], ["a", "<b>", " mat"]]
    values = np.array([[0.05, 0.5, 0.95], [0.2, 0.99, 0.0]])
    fig = hs.plot.logit_lens(
        top, values, layer_labels=["L0", "L1"], position_labels=["a", "b", "c"]
    )
    ax = fig.axes[0]
    cells = {(t.get_position()[1], t.get_position()[0]): t for t in ax.texts}
    assert {k: t.get_text() for k, t in cells.items()} == {
        (i, j): top[i][j] for i in range(2) for j in range(3)
    }
    image = ax.images[0]
    np.testing.assert_array_equal(image.get_array(), values)
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)  # probabilities keep 0-1
    lum = {k: np.mean(image.to_rgba(values[k])[:3]) for k in cells}  # darker = larger
    order = sorted(cells, key=lambda k: values[k])
    assert [lum[k] for k in order] == sorted(lum.values(), reverse=True)
    assert to_rgba(cells[(1, 1)].get_color()) == to_rgba("white")  # readable on dark
    assert to_rgba(cells[(0, 0)].get_color()) == to_rgba("black")
    assert _labels(ax.get_yticklabels()) == ["L0", "L1"]
    assert _labels(ax.get_xticklabels()) == ["a", "b", "c"]
    logits = hs.plot.logit_lens(top, torch.tensor([[1.0, 5, 3], [-2, 0, 4]]), title="logits")
    norm = logits.axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == (-2.0, 5.0) and logits.axes[0].get_title() == "logits"
    with pytest.raises(hs.InputError, match="shape"):
        hs.plot.logit_lens(top, values[:, :2])
    with pytest.raises(hs.InputError, match="rectangular"):
        hs.plot.logit_lens([["a", "b"], ["c"]])
    with pytest.raises(hs.InputError, match="table"):
        hs.plot.logit_lens(["a", "b"])


def test_dla_bars_are_the_largest_values_sorted_by_magnitude():
    values = torch.tensor([0.1, -3.0, 2.0, 0.5, -0.2, 2.5])
    labels = [f"L{i // 2}H{i % 2}" for i in range(6)]
    fig = hs.plot.dla(values, labels, top=4)
    ax = fig.axes[0]
    bars = sorted(ax.patches, key=lambda p: p.get_y())  # y grows downwards: top bar first
    assert [round(b.get_width(), 6) for b in bars] == [-3.0, 2.5, 2.0, 0.5]
    assert _labels(ax.get_yticklabels()) == ["L0H1", "L2H1", "L1H0", "L1H1"]
    assert ax.yaxis_inverted()
    colours = [to_rgba(b.get_facecolor()) for b in bars]
    assert colours[0] == to_rgba(hs.plot.NEGATIVE)
    assert colours[1:] == [to_rgba(hs.plot.POSITIVE)] * 3
    everything = hs.plot.dla(values.numpy(), labels, top=None, title="DLA")
    assert len(everything.axes[0].patches) == 6 and everything.axes[0].get_title() == "DLA"
    with pytest.raises(hs.InputError, match="labels has 5 entries"):
        hs.plot.dla(values, labels[:5])
    with pytest.raises(hs.InputError, match="1-D"):
        hs.plot.dla(values.reshape(2, 3), labels)
    with pytest.raises(hs.InputError, match="NaN"):
        hs.plot.dla([1.0, float("nan")], ["a", "b"])
    with pytest.raises(hs.InputError, match="top"):
        hs.plot.dla(values, labels, top=0)


# ------------------------------------------------------------------------- HTML view


def _embedded(page):
    found = re.search(r'<script type="application/json" class="hs-data">(.*?)</script>', page, re.S)
    return json.loads(found.group(1))


def test_attention_html_embeds_the_pattern_and_escapes_tokens(lm, tmp_path):
    _, _, _, cache, tokens = lm
    evil = "<script>alert(1)</script>"
    given = list(tokens[0])
    given[1], given[2] = evil, 'say "hi" & </div>'
    view = hs.plot.attention_html(cache, "head.1.*", given)
    page = view.html
    data = _embedded(page)
    assert data["tokens"] == given
    assert [h["title"] for h in data["heads"]] == ["L1H0", "L1H1", "L1H2", "L1H3"]
    for h, head in enumerate(data["heads"]):
        np.testing.assert_allclose(
            np.array(head["pattern"]), cache[f"head.1.{h}.pattern"][0].double(), atol=1e-6
        )
    assert evil not in page and "</div>" not in page.split('class="hs-data">')[1].split("</")[0]
    assert page.count("<script") == 2 and page.count("</script>") == 2  # ours only
    for banned in ("http://", "https://", "<script src", "<link", "@import", "url("):
        assert banned not in page
    assert view._repr_html_() in page and view._repr_html_().startswith('<div class="hs-attn"')
    saved = view.save(tmp_path / "view.html")
    assert saved.read_text(encoding="utf-8") == page
    assert [p.name for p in tmp_path.iterdir()] == ["view.html"]  # no temporary file left
    one = hs.plot.attention_html(cache["head.1.pattern"][1, 2], "head.1.2", tokens[1])
    got = _embedded(one.html)["heads"]
    assert [h["title"] for h in got] == ["L1H2"]
    np.testing.assert_allclose(got[0]["pattern"], cache["head.1.2.pattern"][1], atol=1e-6)
    assert "L1H2" in repr(one)
    with pytest.raises(hs.InputError, match="tokens"):
        hs.plot.attention_html(cache, "head.1.2", given[:3])
