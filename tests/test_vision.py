"""Vision models: MLP, CNN and hookscope's ViT — every address readable and writable.

Values are checked against the computation written out by hand from the modules' weights.
"""

import pytest
import torch
import torch.nn.functional as F

import hookscope as hs

import builders

X_FLAT = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mlp():
    net = builders.tiny_mlp()
    return net, hs.HookedModel.wrap(net)


@pytest.fixture(scope="module")
def cnn():
    net = builders.tiny_cnn()
    return net, hs.HookedModel.wrap(net)


@pytest.fixture(scope="module")
def vit():
    net = builders.tiny_vit()
    return net, hs.HookedModel.wrap(net)


def test_detection(mlp, cnn, vit):
    assert mlp[1].adapter.name == "mlp" and mlp[1].n_layers == 2
    assert cnn[1].adapter.name == "cnn" and cnn[1].n_layers == 3
    assert vit[1].adapter.name == "vit" and vit[1].n_layers == 2


def test_mlp_values_by_hand(mlp):
    net, model = mlp
    x = X_FLAT.flatten(1)
    l1, l2, head = net[1], net[3], net[5]
    pre0 = x @ l1.weight.T + l1.bias
    post0 = pre0.relu()
    pre1 = post0 @ l2.weight.T + l2.bias
    post1 = pre1.tanh()
    logits, cache = model.run_with_cache(X_FLAT)
    torch.testing.assert_close(cache["resid_pre.0"], x)
    torch.testing.assert_close(cache["neuron.0.pre"], pre0)
    torch.testing.assert_close(cache["neuron.0"], post0)
    torch.testing.assert_close(cache["neuron.1.7"], post1[:, 7])
    torch.testing.assert_close(cache["resid_post.1"], post1)
    torch.testing.assert_close(cache["logits"], post1 @ head.weight.T + head.bias)
    assert torch.equal(logits, net(X_FLAT))
    # zero hidden unit 5 of layer 0: the rest follows by hand
    post0_k = post0.clone()
    post0_k[:, 5] = 0
    expected = (post0_k @ l2.weight.T + l2.bias).tanh() @ head.weight.T + head.bias
    out = model.run_with_hooks(X_FLAT, hooks=[("neuron.0.5", lambda act, a: torch.zeros_like(act))])
    torch.testing.assert_close(out, expected)


def test_cnn_values_by_hand(cnn):
    net, model = cnn
    conv1, conv2, fc, head = net[0], net[2], net[6], net[8]
    pre0 = F.conv2d(X_FLAT, conv1.weight, conv1.bias, padding=1)
    post0 = pre0.relu()
    pre1 = F.conv2d(post0, conv2.weight, conv2.bias, padding=1)
    pooled = F.max_pool2d(pre1.relu(), 2)
    logits, cache = model.run_with_cache(X_FLAT)
    # ReLU(inplace=True) overwrites the conv output; the cache kept the pre-activation
    torch.testing.assert_close(cache["neuron.0.pre"], pre0)
    assert (cache["neuron.0.pre"] < 0).any()
    torch.testing.assert_close(cache["neuron.0"], post0)
    assert cache["neuron.0.2"].shape == (3, 8, 8)  # channel 2: [batch, h, w]
    torch.testing.assert_close(cache["neuron.0.2"], post0[:, 2])
    torch.testing.assert_close(cache["resid_post.1"], pooled)  # block output feature map
    assert cache["resid_post.1"].shape == (3, 6, 4, 4)
    torch.testing.assert_close(cache["resid_pre.2"], pooled.flatten(1))
    torch.testing.assert_close(
        cache["neuron.2"], (pooled.flatten(1) @ fc.weight.T + fc.bias).relu()
    )
    assert torch.equal(logits, net(X_FLAT))
    # patch one channel: zero channel 3 of conv layer 1
    relu1 = pre1.relu()
    relu1[:, 3] = 0
    h = F.max_pool2d(relu1, 2).flatten(1)
    expected = (h @ fc.weight.T + fc.bias).relu() @ head.weight.T + head.bias
    out, after = model.run_with_cache(
        X_FLAT, names="resid_post.1", hooks=[("neuron.1.3", lambda act, a: torch.zeros_like(act))]
    )
    torch.testing.assert_close(out, expected)
    assert torch.all(after["resid_post.1"][:, 3] == 0)
    torch.testing.assert_close(
        after["resid_post.1"][:, [0, 1, 2, 4, 5]], pooled[:, [0, 1, 2, 4, 5]]
    )


@pytest.mark.parametrize("frozen", [False, True])
def test_cnn_gradient_before_an_inplace_relu(frozen):
    """Regression: with Conv2d -> ReLU(inplace=True) the gradient at neuron.0.pre was taken
    w.r.t. the value the ReLU overwrote it with (and raised with frozen weights). It must be
    exactly the gradient of the same network with a non-inplace ReLU, and of plain autograd."""
    net = builders.tiny_cnn().double().requires_grad_(not frozen)
    plain = builders.tiny_cnn().double().requires_grad_(not frozen)
    plain[1] = torch.nn.ReLU()  # same weights (same seed), not in-place
    x = X_FLAT.double()
    names = ["neuron.0.pre", "neuron.0.2.pre", "neuron.0", "resid_pre.1", "resid_post.0"]

    def metric(out):
        return out[:, 3].sum() - out[:, 1].sum()

    model, reference = hs.HookedModel.wrap(net), hs.HookedModel.wrap(plain)
    out, cache = model.run_with_cache(x, names=names, backward=metric)
    _, ref = reference.run_with_cache(x, names=names, backward=metric)
    assert torch.equal(out, net(x)) and torch.equal(out, plain(x))  # forward bitwise unchanged
    pre0 = F.conv2d(x, net[0].weight, net[0].bias, padding=1)
    assert torch.equal(cache["neuron.0.pre"], pre0) and (pre0 < 0).any()
    for name in names:
        assert torch.equal(cache[name], ref[name]), name
        assert torch.equal(cache.grad(name), ref.grad(name)), name
    # against torch.autograd on a plain copy, hooking nothing of hookscope's
    conv_out = []
    handle = plain[0].register_forward_hook(lambda m, a, o: conv_out.append(o.requires_grad_()))
    try:
        with torch.enable_grad():
            (expected,) = torch.autograd.grad(metric(plain(x)), conv_out)
    finally:
        handle.remove()
    assert torch.equal(cache.grad("neuron.0.pre"), expected)
    assert torch.equal(cache.grad("neuron.0.2.pre"), expected[:, 2])
    assert not torch.equal(cache.grad("neuron.0.pre"), cache.grad("neuron.0"))  # ReLU masks it
    # with a hook patching the pre-activation, the gradient still matches the plain network
    zero = [("neuron.0.1.pre", lambda act, a: torch.zeros_like(act))]
    out, cache = model.run_with_cache(x, names=names, hooks=zero, backward=metric)
    plain_out, ref = reference.run_with_cache(x, names=names, hooks=zero, backward=metric)
    assert torch.equal(out, plain_out)
    for name in names:
        assert torch.equal(cache[name], ref[name]), name
        assert torch.equal(cache.grad(name), ref.grad(name)), name
    assert all(p.grad is None for p in (*net.parameters(), *plain.parameters()))


def test_vit_values_by_hand(vit):
    net, model = vit
    # (logits and embed against the model itself: tests/test_contract.py)
    _, cache = model.run_with_cache(X_FLAT, names=None)
    tokens = net.patch_embed(X_FLAT)
    x0 = torch.cat([net.cls_token.expand(3, -1, -1), tokens], 1) + net.pos_embed
    torch.testing.assert_close(cache["resid_pre.0"], x0)
    blk = net.blocks[0]
    fused = blk.attn.qkv(blk.ln1(x0)).unflatten(-1, (3, 4, 8))
    torch.testing.assert_close(cache["head.0.q"], fused[:, :, 0])
    torch.testing.assert_close(cache["head.0.2.k"], fused[:, :, 1, 2])
    q, k, v = fused.permute(2, 0, 3, 1, 4)
    pattern = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1)
    torch.testing.assert_close(cache["head.0.pattern"], pattern)
    assert cache["head.0.1.pattern"].shape == (3, 17, 17)
    z = (pattern @ v).transpose(1, 2)  # [b, pos, h, d_head]
    torch.testing.assert_close(cache["head.0"], z)
    w = blk.attn.out_proj.weight
    per_head = (
        sum(z[:, :, h] @ w[:, h * 8 : (h + 1) * 8].T for h in range(4)) + blk.attn.out_proj.bias
    )
    torch.testing.assert_close(cache["attn_out.0"], per_head)
    assert torch.equal(cache["resid_mid.0"], cache["resid_pre.0"] + cache["attn_out.0"])
    assert torch.equal(cache["resid_post.0"], cache["resid_mid.0"] + cache["mlp_out.0"])
    torch.testing.assert_close(cache["neuron.1"], F.gelu(cache["neuron.1.pre"]))
    assert cache["logits"].shape == (3, 10)


SHAPES = {
    "mlp": {
        "resid_pre.0": (3, 64),
        "resid_post.0": (3, 32),
        "neuron.1.3": (3,),
        "neuron.0": (3, 32),
        "logits": (3, 10),
    },
    "cnn": {
        "resid_pre.0": (3, 1, 8, 8),
        "neuron.0": (3, 4, 8, 8),
        "neuron.1.5": (3, 8, 8),
        "resid_post.1": (3, 6, 4, 4),
        "neuron.2.1": (3,),
    },
    "vit": {
        "embed": (3, 16, 32),
        "resid_pre.0": (3, 17, 32),
        "resid_mid.1": (3, 17, 32),
        "head.1": (3, 17, 4, 8),
        "head.1.2": (3, 17, 8),
        "head.1.2.pattern": (3, 17, 17),
        "head.1.pattern": (3, 4, 17, 17),
        "head.1.2.result": (3, 17, 32),
        "neuron.0": (3, 17, 64),
        "neuron.0.9": (3, 17),
        "logits": (3, 10),
    },
}


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
def test_documented_shapes(name, request):
    _, model = request.getfixturevalue(name)
    _, cache = model.run_with_cache(X_FLAT, names=list(SHAPES[name]))
    for address, shape in SHAPES[name].items():
        assert tuple(cache[address].shape) == shape, address


def _noise(act, address):
    """Shift plus seeded noise: a constant alone is removed exactly by LayerNorm, and noise
    alone may leave a ReLU pre-activation negative."""
    return act + 3.0 + torch.randn(act.shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
def test_every_address_readable_and_writable(name, request):
    net, model = request.getfixturevalue(name)
    every = model.addresses()
    assert len(every) > 5
    _, cache = model.run_with_cache(
        X_FLAT, names=[a for a in every if getattr(a, "site", "") != "result"]
    )
    _, result = model.run_with_cache(
        X_FLAT, names=[a for a in every if getattr(a, "site", "") == "result"] or None
    )
    clean = net(X_FLAT)
    units = [a for a in model.addresses(units=True) if a.index is not None][::7]
    for address in every + units:
        source = result if getattr(address, "site", "") == "result" else cache
        value = source[address]
        same = model.run_with_hooks(X_FLAT, hooks=[(address, lambda act, a, v=value: v.clone())])
        torch.testing.assert_close(same, clean, atol=1e-5, rtol=1e-5, msg=str(address))
        if getattr(address, "site", "") != "result":
            assert torch.equal(same, clean), address
        changed = model.run_with_hooks(X_FLAT, hooks=[(address, _noise)])
        assert not torch.allclose(changed, clean), address


def test_module_escape_hatch(cnn):
    net, model = cnn
    _, cache = model.run_with_cache(X_FLAT, names="module:4")  # the MaxPool2d
    torch.testing.assert_close(cache["module:4"], cache["module:4"])
    _, both = model.run_with_cache(X_FLAT, names=["module:4", "resid_post.1"])
    assert torch.equal(both["module:4"], both["resid_post.1"])


def test_unavailable_sites_on_vision(mlp, cnn):
    for _, model in (mlp, cnn):
        with pytest.raises(
            hs.SiteUnavailableError,
            match="head.L.H does not exist on this (mlp|cnn) model; available here",
        ):
            model.run_with_cache(X_FLAT, names="head.0.1")
        with pytest.raises(hs.SiteUnavailableError, match="embed does not exist"):
            model.run_with_cache(X_FLAT, names="embed")
