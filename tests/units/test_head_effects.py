"""hookscope.units.head_effects (head_importance, head_probe) against hand-written hooks and
scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hookscope.units import head_importance, head_probe

D_HEAD = 16


# -------------------------------------------------------------------------- importance


def _ablated_by_hand(vit, X, y, layer, head, value=None):
    """Accuracy and cross-entropy with head ``head`` of ``layer`` replaced at the input of
    out_proj (zero, or ``value`` [pos, d_head])."""
    cols = slice(head * D_HEAD, (head + 1) * D_HEAD)

    def pre(module, args):
        z = args[0].clone()
        z[..., cols] = 0 if value is None else value
        return (z,)

    handle = vit.model.blocks[layer].attn.out_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            logits = vit.model(X)
    finally:
        handle.remove()
    acc = (logits.argmax(-1) == y).double().mean().item()
    return acc, torch.nn.functional.cross_entropy(logits, y).item()


def test_head_importance_equals_hand_written_hooks(vit, digits):
    X, y = digits
    res = head_importance(vit, X, y, batch_size=60, progress=False)
    with torch.no_grad():
        logits = vit.model(X)
    assert res.clean["accuracy"] == pytest.approx((logits.argmax(-1) == y).double().mean().item())
    assert res.clean["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), abs=1e-6
    )
    for layer, head in ((0, 1), (1, 2), (0, 3)):
        acc, loss = _ablated_by_hand(vit, X, y, layer, head)
        assert res.ablated["accuracy"][layer, head].item() == pytest.approx(acc, abs=1e-9)
        assert res.ablated["loss"][layer, head].item() == pytest.approx(loss, abs=1e-5)
        assert res.accuracy_drop[layer, head].item() == pytest.approx(res.clean["accuracy"] - acc)
    fig = res.plot()
    assert np.allclose(np.asarray(fig.axes[0].images[0].get_array()), res.accuracy_drop.numpy())
    assert np.allclose(np.asarray(fig.axes[1].images[0].get_array()), res.loss_increase.numpy())
    assert len(res.to_pandas()) == 8 and "zero ablation" in repr(res)


def test_mean_ablation_equals_per_position_mean(vit, digits, hooked):
    X, y = digits[0][:60], digits[1][:60]
    res = head_importance(vit, X, y, method="mean", metric="loss", layers=[1], progress=False)
    captured = {"z": hooked(vit.model.blocks[1].attn.out_proj, lambda: vit.model(X), pre=True)}
    mean = captured["z"][..., 2 * D_HEAD : 3 * D_HEAD].mean(0)  # [pos, d_head]
    _, loss = _ablated_by_hand(vit, X, y, 1, 2, value=mean)
    assert res.ablated["loss"][0, 2].item() == pytest.approx(loss, abs=1e-5)
    assert res.accuracy_drop is None and set(res.ablated) == {"loss"}


# ----------------------------------------------------------------------------- probing


def test_position_only_head_is_decoded(vit, digits, edited):
    def no_content(m):  # layer 0 sees only CLS + position embeddings
        m.patch_embed.proj.weight.zero_()
        m.patch_embed.proj.bias.zero_()

    X, y = digits[0][:60], digits[1][:60]
    res = head_probe(edited(vit, no_content), X, y, layers=[0], progress=False)
    assert torch.all(res.position_accuracy >= 16 / 17)  # at most one position confused
    assert torch.all(res.class_accuracy <= res.class_chance + 1e-9)
    assert res.position_chance == pytest.approx(1 / 17, abs=0.02)
    fig = res.plot()
    assert np.allclose(np.asarray(fig.axes[1].images[0].get_array()), res.position_accuracy.numpy())


def test_class_probe_matches_sklearn(vit, digits, hooked):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = digits
    res = head_probe(vit, X, y, layers=[1], position=False, seed=3, progress=False)
    assert sorted(np.concatenate([res.train_rows, res.test_rows]).tolist()) == list(range(120))
    assert len(res.test_rows) == 36
    captured = {"z": hooked(vit.model.blocks[1].attn.out_proj, lambda: vit.model(X), pre=True)}
    feats = captured["z"][:, 0, 0:D_HEAD].double().numpy()  # head 1.0 at CLS
    sk = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=10000, tol=1e-10))
    sk.fit(feats[res.train_rows], y.numpy()[res.train_rows])
    acc = sk.score(feats[res.test_rows], y.numpy()[res.test_rows])
    assert res.class_accuracy[0, 0].item() == pytest.approx(acc, abs=1 / 36 + 1e-9)
    assert res.class_accuracy[0, 0].item() > res.class_chance + 0.3
    assert torch.isnan(res.position_accuracy).all()
    assert list(res.to_pandas().columns[:4]) == ["layer", "head", "class_accuracy", "class_chance"]


def test_head_importance_one_prompt_language_model(lm):
    """One prompt, one answer token (a single class) works and equals a hand-written ablation
    of the head's slice of z at the input of GPT-2's c_proj."""
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        clean = lm.model(ids).logits[:, -1]
    y = clean.argmax(-1)
    res = head_importance(lm, ids, y, progress=False)
    assert res.clean["accuracy"] == 1.0
    ce = torch.nn.functional.cross_entropy
    assert res.clean["loss"] == pytest.approx(ce(clean, y).item(), abs=1e-6)
    d_head = lm.model.config.n_embd // lm.model.config.n_head
    for layer, head in ((0, 0), (1, 3), (0, 2)):
        cols = slice(head * d_head, (head + 1) * d_head)

        def pre(module, args, cols=cols):
            z = args[0].clone()
            z[..., cols] = 0
            return (z,)

        handle = lm.model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                logits = lm.model(ids).logits[:, -1]
        finally:
            handle.remove()
        acc = float((logits.argmax(-1) == y).double().mean())
        assert res.ablated["accuracy"][layer, head].item() == acc
        assert res.ablated["loss"][layer, head].item() == pytest.approx(
            ce(logits, y).item(), abs=1e-5
        )


def test_head_importance_reference_only_for_mean(vit, digits):
    from hookscope.errors import InputError

    X, y = digits
    with pytest.raises(InputError, match="reference is for method='mean'"):
        head_importance(vit, X[:10], y[:10], reference=X[:5])


@pytest.mark.parametrize("C", [float("inf"), float("nan"), 0.0, -1.0])
def test_head_probe_rejects_bad_C(vit, digits, C):
    from hookscope.errors import InputError

    X, y = digits
    with pytest.raises(InputError, match="C must be a finite number > 0"):
        head_probe(vit, X, y, C=C)
