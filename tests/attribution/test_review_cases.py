"""Cases an adversarial review of hookscope.attribution found: left padding, per-head sites,
token sites, tokenizer dicts, module addresses, memory-bounded chunks, train mode, inference
mode, and argument checks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Saliency
from torch import nn

import hookscope as hs
from hookscope import attribution as at
from hookscope.errors import InputError

import builders


@pytest.fixture(scope="module")
def lm():
    return hs.HookedModel.wrap(builders.tiny_gpt2(), tokenizer=builders.make_tokenizer())


@pytest.fixture(scope="module")
def digits():
    X, y = hs.data.digits("test", tensors=True)
    return X[:12], y[:12]


def test_left_padding_gives_what_the_row_gives_alone():
    """GPT-NeoX (rotary: scores depend on relative positions) left-padded, against the row
    alone."""
    lm = hs.HookedModel.wrap(builders.tiny_neox(), tokenizer=builders.make_tokenizer())
    ids = torch.tensor([[0, 0, 0, 7, 22, 41]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    alone = torch.tensor([[7, 22, 41]])
    for run in (
        lambda x: at.saliency(lm, x, target=5),
        lambda x: at.integrated_gradients(lm, x, target=5, n_steps=8),
    ):
        padded = run({"input_ids": ids, "attention_mask": mask})
        single = run(alone)
        torch.testing.assert_close(padded.values[0, 3:], single.values[0], atol=1e-5, rtol=1e-4)
        assert (padded.values[0, :3] == 0).all()
        assert padded.tokens[0][3:] == single.tokens[0]
    roll = at.attention_rollout(lm, {"input_ids": ids, "attention_mask": mask})
    assert int(roll.query[0]) == 5  # the last real token, not a pad
    torch.testing.assert_close(roll.row[0, 3:], at.attention_rollout(lm, alone).row[0])


def test_grad_cam_refuses_per_head_sites(digits):
    X, y = digits
    vit = hs.zoo.load("digits-vit")
    for site in ("head.0", "head.0.pattern", "head.0.q", "head.1.result"):
        with pytest.raises(InputError, match="spatial") as err:
            at.grad_cam(vit, X, y, site=site)
        assert "head." not in str(err.value).split("Choose one of")[1]


def test_token_attributions_at_a_site_are_per_token(lm):
    texts = ["When Mary and John went", "The fox"]
    hf = lm.model
    for run in (
        lambda t: at.saliency(lm, t, target=5, site="resid_post.0"),
        lambda t: at.integrated_gradients(lm, t, target=5, site="resid_post.0", n_steps=6),
    ):
        r = run(texts)
        assert r.values.shape == (2, lm.to_tokens(texts).shape[1])
        assert r.raw.shape[-1] == 64
        repr(r)
        r.text()
        r.html()
        r.plot()
        frame = r.to_pandas()
        assert len(frame) == sum(len(t) for t in r.tokens)
    # saliency at resid_post.0 equals the gradient at the first block's output
    ids = lm.to_tokens(texts[:1])
    seen = {}

    def keep(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h.retain_grad()
        seen["h"] = h

    handle = hf.transformer.h[0].register_forward_hook(keep)
    try:
        hf(ids).logits[0, -1, 5].backward()
    finally:
        handle.remove()
    ours = at.saliency(lm, ids, target=5, site="resid_post.0")
    torch.testing.assert_close(ours.values[0], seen["h"].grad[0].norm(dim=-1), atol=1e-5, rtol=1e-4)


def test_tokenizer_dict_keywords_reach_the_forward():
    bert = hs.HookedModel.wrap(builders.tiny_bert())
    enc = {
        "input_ids": torch.tensor([[2, 17, 99, 3, 8, 9]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
        "token_type_ids": torch.tensor([[0, 0, 0, 1, 1, 1]]),
    }
    seen = {}

    def target(out):
        seen["out"] = out.detach()
        return out[:, 3, 7]

    at.saliency(bert, enc, target)
    torch.testing.assert_close(seen["out"], bert(enc))


def test_module_addresses_work():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).relu().mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    X = torch.randn(3, 1, 5, 5)
    cam = at.grad_cam(net, X, 1, site="module:conv", upsample=False)
    A = net.conv(X)
    (g,) = torch.autograd.grad(net.fc(A.relu().mean((2, 3)))[:, 1].sum(), A)
    expected = (g.mean((2, 3))[:, :, None, None] * A).sum(1).relu()
    torch.testing.assert_close(cam.values, expected.detach())


def test_chunks_are_bounded_for_functional_models():
    """A model whose work is functional (no leaf modules) still gets memory-sized chunks."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 1, 3, 3) * 0.1)
            self.v = nn.Parameter(torch.randn(10, 64) * 0.1)

        def forward(self, x):
            return F.conv2d(x, self.w, padding=1).relu().mean((2, 3)) @ self.v.T

    torch.manual_seed(0)
    model = Functional()
    X = torch.randn(8, 1, 16, 16)
    ig = at.integrated_gradients(model, X, 0, n_steps=50)
    # kept for the backward per row: the conv's input, the ReLU's output, the matmul's input
    per_row = 16 * 16 + 64 * 16 * 16 + 64
    assert ig.conventions["internal_batch_size"] == at.gradients.CHUNK_ELEMENTS // per_row
    small = at.integrated_gradients(model, X, 0, n_steps=50, internal_batch_size=7)
    torch.testing.assert_close(ig.values, small.values, atol=1e-6, rtol=1e-5)


def test_train_mode_models_run_in_eval_and_are_restored():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4, 3),
    ).train()
    net[1].eval()  # a submodule the user put in eval stays in eval
    X, y = torch.randn(8, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    stats = net[1].running_mean.clone(), int(net[1].num_batches_tracked)
    a = at.saliency(net, X, y)
    b = at.saliency(net, X, y, batch_size=3)
    torch.testing.assert_close(a.values, b.values)  # no dropout, no batch statistics
    net.eval()
    ref = Saliency(net).attribute(X.clone().requires_grad_(), target=y)
    torch.testing.assert_close(a.values, ref)
    net.train()
    net[1].eval()
    at.integrated_gradients(net, X, y, n_steps=4)
    assert net.training and net[5].training and not net[1].training
    torch.testing.assert_close(net[1].running_mean, stats[0])
    assert int(net[1].num_batches_tracked) == stats[1]


def test_inference_mode_is_named(digits):
    X, y = digits
    cnn = hs.zoo.load("digits-cnn")
    with torch.inference_mode():
        for run in (
            lambda: at.saliency(cnn, X, y),
            lambda: at.integrated_gradients(cnn, X, y),
            lambda: at.grad_cam(cnn, X, y, site="neuron.1"),
        ):
            with pytest.raises(InputError, match="inference_mode"):
                run()


def test_argument_checks(digits, lm):
    X, y = digits
    cnn = hs.zoo.load("digits-cnn")
    with pytest.raises(InputError, match="not a finite number"):
        at.integrated_gradients(cnn, X, y, baseline=float("nan"))
    # numpy targets and images
    np_target = at.saliency(cnn, X, y.numpy())
    torch.testing.assert_close(np_target.values, at.saliency(cnn, X, y).values)
    at.saliency(cnn, X, np.int64(3))
    fig = at.plot(at.grad_cam(cnn, X[:2], y[:2], site="neuron.1"), X[:2].numpy())
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), X[0, 0].numpy())
    with pytest.raises(InputError, match="float tensor"):
        at.saliency(cnn, (X * 255).to(torch.uint8), y)
    with pytest.raises(InputError, match="no real token"):
        at.saliency(
            lm, {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.zeros(1, 2)}, 3
        )
    r = at.saliency(lm, ["When Mary"], 3)
    with pytest.raises(InputError, match="example must be an index in 0..0"):
        r.text(example=5)
    with pytest.raises(InputError, match="example must be"):
        r.html(example=-1)
    # compare: both models checked first, unknown keywords named, labels distinct
    with pytest.raises(InputError, match="after must be"):
        at.compare(cnn, "digits-cnn", X, method="integrated_gradients", target=y)
    with pytest.raises(InputError, match="no keyword 'stesp'.*n_steps"):
        at.compare(cnn, cnn, X, method="integrated_gradients", target=y, stesp=4)
    with pytest.raises(InputError, match="two different strings"):
        at.compare(cnn, cnn, X, method="saliency", target=y, names=("c", "c"))
    every = at.compare(cnn, cnn, X[:2], method="grad_cam", target="all", site="neuron.1")
    with pytest.raises(InputError, match="class axis"):
        every.plot()
    # 1-D ids with a 1-D mask in a dict
    one = at.saliency(
        lm, {"input_ids": torch.tensor([7, 22, 41]), "attention_mask": torch.ones(3)}, 5
    )
    torch.testing.assert_close(one.values, at.saliency(lm, torch.tensor([[7, 22, 41]]), 5).values)


def test_second_review_cases(digits, lm):
    X, y = digits
    cnn = hs.zoo.load("digits-cnn")
    # integrated gradients under an outer no_grad
    with torch.no_grad():
        inside = at.integrated_gradients(cnn, X[:6], target=y[:6], n_steps=4)
    torch.testing.assert_close(
        inside.values, at.integrated_gradients(cnn, X[:6], target=y[:6], n_steps=4).values
    )
    # compare's figure for input attributions sums the input channels
    early = hs.zoo.load("digits-cnn", checkpoint=16)
    cmp = at.compare(early, cnn, X[:3], method="saliency", target=y[:3])
    fig = cmp.plot(X[:3])
    np.testing.assert_allclose(fig.axes[6].images[-1].get_array(), cmp.difference[0].sum(0))
    # a model without spatial layers: the error says so
    with pytest.raises(InputError, match="(?i)the mlp model has no spatial layer"):
        at.grad_cam(hs.zoo.load("digits-mlp"), X, target=y, site="neuron.0")


def test_trapezoid_rule():
    """Trapezoid on a^2 over [0, 1] with n nodes: 1/3 + h^2/6 (h = 1/(n-1)), and on a model
    captum's weights scaled by n/(n-1) (its weights sum to 1 - 1/n)."""
    alphas, weights = at.quadrature("riemann_trapezoid", 9)
    assert (weights * alphas**2).sum() == pytest.approx(1 / 3 + (1 / 8) ** 2 / 6, abs=1e-12)
    X, y = hs.data.digits("test", tensors=True)
    cnn = hs.zoo.load("digits-cnn")
    from captum.attr import IntegratedGradients

    ours = at.integrated_gradients(cnn, X[:8], y[:8], n_steps=9, method="riemann_trapezoid")
    ref = IntegratedGradients(cnn.model).attribute(
        X[:8], target=y[:8], n_steps=9, method="riemann_trapezoid"
    )
    torch.testing.assert_close(ours.values, ref * 9 / 8, atol=1e-5, rtol=1e-5)


def test_token_figure_holds_the_values(lm):
    r = at.integrated_gradients(lm, ["When Mary and John went", "The fox"], target=5, n_steps=4)
    drawn = r.plot().axes[0].images[0].get_array()
    for i, toks in enumerate(r.tokens):
        np.testing.assert_allclose(drawn[i, : len(toks)], r.values[i, : len(toks)].numpy())
        assert drawn.mask[i, len(toks) :].all()  # padding is not drawn
