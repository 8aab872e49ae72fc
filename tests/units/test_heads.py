"""hookscope.units.heads (pattern statistics, head_stats, compare_heads) against closed
forms and hand-written hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hookscope as hs
from hookscope.errors import InputError
from hookscope.units import (
    HeadStats,
    cluster_heads,
    cluster_patterns,
    compare_heads,
    head_importance,
    head_probe,
    head_stats,
    patch_distances,
    pattern_stats,
    token_distances,
)

D_HEAD = 16


def _gini_pairwise(p: np.ndarray) -> float:
    """Gini as the mean absolute difference over twice the mean (Gini 1912)."""
    n = p.shape[0]
    return float(np.abs(p[:, None] - p[None]).sum() / (2 * n * p.sum()))


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return x.softmax(-1)


# ------------------------------------------------------------------------ pattern math


def test_uniform_one_hot_and_random_patterns():
    n = 5
    g = torch.Generator().manual_seed(0)
    uniform = torch.full((n, n), 1 / n)
    one_hot = torch.zeros(n, n)
    one_hot[torch.arange(n), (torch.arange(n) + 2) % n] = 1.0
    random = _softmax(torch.randn(2, n, n, generator=g) * 2)
    p = torch.stack([uniform.expand(2, n, n), one_hot.expand(2, n, n), random], 1)  # [2, 3, n, n]
    out = pattern_stats(p)
    assert torch.allclose(out["entropy"][:2], torch.tensor([math.log(n), 0.0], dtype=torch.float64))
    assert torch.allclose(out["entropy_norm"][:2], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(out["gini"][:2], torch.tensor([0.0, 1 - 1 / n], dtype=torch.float64))
    assert torch.allclose(out["max_weight"][:2], torch.tensor([1 / n, 1.0], dtype=torch.float64))
    r = random.double().numpy()
    ent = -(r * np.log(r)).sum(-1).mean()
    gini = np.mean([_gini_pairwise(row) for row in r.reshape(-1, n)])
    assert out["entropy"][2].item() == pytest.approx(ent, abs=1e-6)
    assert out["gini"][2].item() == pytest.approx(gini, abs=1e-6)
    assert torch.allclose(out["mean_pattern"][2], random.double().mean(0))
    assert torch.isnan(out["cls_share"]).all() and torch.isnan(out["distance"]).all()


def test_causal_rows_and_padding_use_only_valid_keys():
    n = 6
    causal_uniform = torch.tril(torch.ones(n, n))
    causal_uniform = causal_uniform / causal_uniform.sum(-1, keepdim=True)
    p = causal_uniform.expand(2, 1, n, n).clone()
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, 4:] = 0  # example 1: rows 4, 5 are padding
    out = pattern_stats(p, mask, causal=True, distance=token_distances(n))
    rows = [math.log(d + 1) for d in range(n)] + [math.log(d + 1) for d in range(4)]
    assert out["entropy"].item() == pytest.approx(np.mean(rows), abs=1e-12)
    assert out["entropy_norm"].item() == pytest.approx(1.0, abs=1e-12)  # first rows excluded
    assert out["gini"].item() == pytest.approx(0.0, abs=1e-12)
    dist = [np.mean(np.arange(d + 1)) for d in range(n)] + [
        np.mean(np.arange(d + 1)) for d in range(4)
    ]
    assert out["distance"].item() == pytest.approx(np.mean(dist), abs=1e-12)
    # mean pattern: padded query rows of example 1 are not averaged in
    assert torch.allclose(out["mean_pattern"][0], causal_uniform.double())


def test_distance_hand_made_tokens_and_patches():
    n = 7
    p = torch.zeros(1, 1, n, n)
    p[0, 0, torch.arange(n), 0] = 0.5
    p[0, 0, torch.arange(n), torch.arange(n)] += 0.5  # row 0: all on position 0
    out = pattern_stats(p, distance=token_distances(n))
    assert out["distance"].item() == pytest.approx(np.mean(0.5 * np.arange(n)))
    # CLS + 2x2 patches: CLS row all on CLS; each patch half on CLS, half on the opposite patch
    q = torch.zeros(1, 1, 5, 5)
    q[0, 0, 0, 0] = 1.0
    for patch, opposite in ((1, 4), (2, 3), (3, 2), (4, 1)):
        q[0, 0, patch, 0] = 0.5
        q[0, 0, patch, opposite] = 0.5
    out = pattern_stats(q, distance=patch_distances(2, 2), cls_position=0)
    assert out["distance"].item() == pytest.approx(math.sqrt(2))
    assert out["cls_share"].item() == pytest.approx((1 + 4 * 0.5) / 5)
    d = patch_distances(2, 3, cls=False)
    assert d[0, 5].item() == pytest.approx(math.hypot(1, 2)) and d[1, 4].item() == 1.0


# -------------------------------------------------------------------------- head_stats


def test_uniform_attention_model_has_entropy_log_17(vit, digits, edited):
    def zero_qk(m):
        for block in m.blocks:
            block.attn.qkv.weight[:128] = 0
            block.attn.qkv.bias[:128] = 0

    h = head_stats(edited(vit, zero_qk), digits[0][:40], progress=False)
    assert torch.allclose(h.entropy, torch.full((2, 4), math.log(17), dtype=torch.float64))
    assert torch.allclose(h.gini, torch.zeros(2, 4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(h.cls_share, torch.full((2, 4), 1 / 17, dtype=torch.float64))
    r, c = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    xy = np.stack([r.ravel(), c.ravel()], 1)
    mean_patch_distance = np.linalg.norm(xy[:, None] - xy[None], axis=-1).mean()
    assert torch.allclose(h.distance, torch.full((2, 4), mean_patch_distance, dtype=torch.float64))
    assert torch.allclose(h.mean_patterns, torch.full((2, 4, 17, 17), 1 / 17, dtype=torch.float64))
    assert h.vision and not h.causal


def test_head_stats_chunks_equal_one_batch(vit, digits, stats):
    one = head_stats(vit, digits[0], digits[1], batch_size=120, progress=False)
    for name in ("entropy", "gini", "distance", "cls_share", "selectivity", "mean_patterns"):
        assert torch.allclose(getattr(one, name), getattr(stats, name), atol=1e-9), name
    df = stats.to_pandas()
    assert len(df) == 8 and list(df.columns[:2]) == ["layer", "head"]
    assert df["entropy"].to_numpy() == pytest.approx(stats.entropy.reshape(-1).numpy())
    assert "HeadStats(2 layers x 4 heads, 120 examples" in repr(stats)


def test_class_selectivity_matches_hand_hook(vit, digits, stats, hooked):
    X, y = digits
    captured = {"z": hooked(vit.model.blocks[1].attn.out_proj, lambda: vit.model(X), pre=True)}
    W = vit.model.blocks[1].attn.out_proj.weight.detach()
    expected = []
    for h in range(4):
        cols = slice(h * D_HEAD, (h + 1) * D_HEAD)
        norms = (captured["z"][:, 0, cols] @ W[:, cols].T).norm(dim=-1).double().numpy()
        means = np.array([norms[y.numpy() == c].mean() for c in np.unique(y.numpy())])
        top, rest = means.max(), (means.sum() - means.max()) / (len(means) - 1)
        expected.append((top - rest) / (top + rest))
    assert stats.selectivity[1].numpy() == pytest.approx(np.array(expected), abs=1e-6)


def test_planted_class_selective_head_is_found(vit, digits, edited):
    planted = (1, 2)

    def keep_one_value(m):
        for layer, block in enumerate(m.blocks):
            for h in range(4):
                if (layer, h) != planted:
                    rows = slice(128 + h * D_HEAD, 128 + (h + 1) * D_HEAD)
                    block.attn.qkv.weight[rows] = 0  # constant value: output ignores the image
                    block.attn.qkv.bias[rows] = 0.3

    X, y = digits
    h = head_stats(edited(vit, keep_one_value), X, y, progress=False)
    sel = h.selectivity
    assert sel[planted].item() > 0.05
    others = torch.ones_like(sel, dtype=torch.bool)
    others[planted] = False
    assert sel[others].abs().max().item() < 1e-5


def test_language_model_padding_and_causality():
    lm = hs.zoo.load("tiny-induction")
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    h = head_stats(lm, {"input_ids": ids, "attention_mask": mask}, progress=False)
    assert h.causal and not h.vision
    # reference: each row run alone at its real length, stats by hand over real rows
    rows_ent, rows_dist = [], []
    for i, length in ((0, 10), (1, 6)):
        _, cache = lm.run_with_cache(ids[i : i + 1, :length], "head.0.pattern")
        p = cache["head.0.pattern"][0, 1].double().numpy()  # head 1 [dest, src]
        for d in range(length):
            row = p[d, : d + 1]
            rows_ent.append(-(row[row > 0] * np.log(row[row > 0])).sum())
            rows_dist.append((row * (d - np.arange(d + 1))).sum())
    assert h.entropy[0, 1].item() == pytest.approx(np.mean(rows_ent), abs=1e-5)
    assert h.distance[0, 1].item() == pytest.approx(np.mean(rows_dist), abs=1e-5)
    assert torch.isnan(h.cls_share).all()


def test_plot_shows_the_mean_patterns(stats):
    fig = stats.plot()
    for i in range(2):
        for j in range(4):
            shown = np.asarray(fig.axes[i * 4 + j].images[0].get_array())
            assert np.allclose(shown, stats.mean_patterns[i, j].numpy())


def test_compare_checkpoints(vit, digits):
    X, y = digits[0][:60], digits[1][:60]
    first = hs.zoo.shipped.checkpoints("digits-vit")[0]
    before = head_stats(hs.zoo.load("digits-vit", checkpoint=first), X, y, progress=False)
    after = head_stats(vit, X, y, progress=False)
    cmp = compare_heads(before, after)
    assert torch.allclose(cmp.diff["entropy"], after.entropy - before.entropy)
    assert torch.allclose(before.compare(after).diff["gini"], after.gini - before.gini)
    expected = (after.mean_patterns - before.mean_patterns).abs().mean((-1, -2))
    assert torch.allclose(cmp.pattern_change, expected)
    df = cmp.to_pandas()
    assert df["selectivity_diff"].to_numpy() == pytest.approx(
        (after.selectivity - before.selectivity).reshape(-1).numpy()
    )
    fig = cmp.plot()
    assert np.allclose(np.asarray(fig.axes[0].images[0].get_array()), cmp.diff["entropy"].numpy())
    assert "after - before" in repr(cmp)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_choices(vit, digits, stats):
    X, y = digits
    with pytest.raises(InputError, match="kmeans.*hierarchical"):
        cluster_heads(stats, None, method="spectral")
    with pytest.raises(InputError, match=r"2\.\.7"):
        cluster_heads(stats, None, k=8)
    with pytest.raises(InputError, match="linkage"):
        cluster_patterns(stats.mean_patterns.reshape(8, -1), 2, "hierarchical", linkage="median")
    with pytest.raises(InputError, match="119 entries but inputs hold 120"):
        head_stats(vit, X, y[:-1])
    with pytest.raises(InputError, match="attention heads"):
        head_stats(hs.zoo.load("digits-cnn"), X)
    with pytest.raises(InputError, match="choose from \\[0, 1\\]"):
        head_stats(vit, X, layers=[5])
    with pytest.raises(InputError, match="accuracy.*loss"):
        head_importance(vit, X, y, metric="f1")
    with pytest.raises(InputError, match="zero.*mean"):
        head_importance(vit, X, y, method="resample")
    with pytest.raises(InputError, match="labels must lie in 0..9"):
        head_importance(vit, X, y + 5)
    with pytest.raises(InputError, match="site"):
        head_probe(vit, X, y, site="pattern")
    with pytest.raises(InputError, match="test_fraction"):
        head_probe(vit, X, y, test_fraction=1.5)
    with pytest.raises(InputError, match=r"1 class\(es\); class statistics need at least 2"):
        head_stats(vit, X, torch.zeros(120, dtype=torch.long))
    with pytest.raises(InputError, match="HeadStats"):
        compare_heads(stats, "not stats")
    with pytest.raises(InputError, match="grid"):
        head_stats(vit, X[:4], grid=(3, 3))
    assert isinstance(stats, HeadStats)


# ---------------------------------------------------------------------- causal detection


def _padded(rows: list[torch.Tensor], left: bool) -> dict[str, torch.Tensor]:
    """Token rows padded to one length; left padding also passes GPT-2's position ids so
    each real token keeps the position it has when right-padded."""
    S = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        cut = slice(S - len(r), S) if left else slice(0, len(r))
        ids[i, cut], mask[i, cut] = r, 1
    out = {"input_ids": ids, "attention_mask": mask}
    if left:
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    return out


def test_causal_detection_ignores_left_padding():
    import builders

    lm = hs.HookedModel.wrap(builders.tiny_gpt2(), tokenizer=builders.make_tokenizer())
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 500, (n,), generator=g) for n in (3, 7, 5, 8)]
    # batch_size=1: the first chunk is a short left-padded row whose padded queries see
    # no real key and spread their weight over every position
    left = head_stats(lm, _padded(rows, left=True), batch_size=1, progress=False)
    right = head_stats(lm, _padded(rows, left=False), progress=False)
    assert left.causal and right.causal
    for name in ("entropy", "entropy_norm", "gini", "max_weight", "distance"):
        np.testing.assert_allclose(
            getattr(left, name).numpy(), getattr(right, name).numpy(), atol=1e-6
        )
    # reference for one head: every row run alone, unpadded, entropy by hand
    per_row = []
    for r in rows:
        _, c = lm.run_with_cache(r[None], "head.1.pattern")
        q = c["head.1.pattern"][0, 2].double().numpy()
        assert (q[np.triu_indices(len(r), 1)] == 0).all()
        per_row += [-(q[d, : d + 1] * np.log(q[d, : d + 1])).sum() for d in range(len(r))]
    assert left.entropy[1, 2].item() == pytest.approx(np.mean(per_row), abs=1e-6)


def test_causal_detection_waits_for_rows_with_two_real_keys():
    import builders

    bert = hs.HookedModel.wrap(builders.tiny_bert())
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(5, 300, (n,), generator=g) for n in (1, 6, 4, 6)]
    data = _padded(rows, left=False)
    one = head_stats(bert, data, batch_size=1, progress=False)
    four = head_stats(bert, data, batch_size=4, progress=False)
    assert not one.causal and not four.causal
    for name in ("entropy", "entropy_norm", "gini", "max_weight", "distance"):
        np.testing.assert_allclose(
            getattr(one, name).numpy(), getattr(four, name).numpy(), atol=1e-9, equal_nan=True
        )
    # no row with a real key after its query: nothing to detect from, so not causal
    single = head_stats(bert, _padded(rows[:1], left=False), progress=False)
    assert not single.causal
    with pytest.raises(InputError, match="causal must be None, True or False"):
        head_stats(bert, data, causal=1)
    with pytest.raises(InputError, match="grid is the patch grid"):
        head_stats(bert, data, grid=(2, 3))


def test_grid_must_cut_square_patches(vit, digits):
    X = digits[0][:4]
    with pytest.raises(InputError, match=r"does not cut 8x8 images.*\(4, 4\)"):
        head_stats(vit, X, grid=(2, 8))
    a = head_stats(vit, X, grid=(np.int64(4), np.int64(4)), layers=np.int64(1), progress=False)
    b = head_stats(vit, X, layers=[1], batch_size=np.int32(2), progress=False)
    np.testing.assert_allclose(a.distance.numpy(), b.distance.numpy(), atol=1e-9)


def test_sliding_window_keys_count_as_valid_with_zero_weight():
    """The documented convention: keys outside a local layer's window are valid keys holding
    weight 0 (entropy unchanged, entropy_norm divided by log of all causal keys)."""
    import builders

    gemma = hs.HookedModel.wrap(builders.tiny_gemma3())
    n = 10
    ids = torch.randint(0, 300, (2, n), generator=torch.Generator().manual_seed(0))
    h = head_stats(gemma, ids, layers=[0], progress=False)
    assert h.causal
    _, cache = gemma.run_with_cache(ids, "head.0.pattern")
    p = cache["head.0.pattern"].double().numpy()  # [2, heads, n, n]
    window = np.tril(np.ones((n, n)), 0) - np.tril(np.ones((n, n)), -4)  # 4 keys at most
    assert (p[..., window == 0] < 1e-12).all()  # the layer masks outside its window
    ent, ent_norm = [], []
    for b in range(2):
        for d in range(n):
            row = p[b, 1, d, : d + 1]
            e = -(row[row > 0] * np.log(row[row > 0])).sum()
            ent.append(e)
            if d >= 1:
                ent_norm.append(e / np.log(d + 1))  # all d + 1 causal keys, not the window
    assert h.entropy[0, 1].item() == pytest.approx(np.mean(ent), abs=1e-6)
    assert h.entropy_norm[0, 1].item() == pytest.approx(np.mean(ent_norm), abs=1e-6)
