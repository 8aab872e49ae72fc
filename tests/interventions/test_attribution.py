"""Attribution patching against closed forms, plain-torch autograd and its Taylor error.

References never come from hookscope's own attribution: the estimate must equal
``sum(grad · (source - base))`` with the gradient taken by ``torch.autograd.grad`` through
plain torch hooks, be exact where the metric is linear in the patched activation (a
classifier logit behind the last Linear), and miss exact patching by O(eps²) when the
source activation is eps away from the base one.
"""

import copy

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope import interventions as iv

import builders

CLEAN = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
CORRUPTED = CLEAN.clone()
CORRUPTED[:, 2] = 40


def _logit_diff(logits):
    return (logits[:, -1, 5] - logits[:, -1, 9]).mean()


@pytest.fixture(scope="module")
def neox():
    hf = builders.tiny_neox().double()
    return hf, hs.HookedModel.wrap(hf)


# ---------------------------------------------------------------------- exact when linear


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("normalised", [True, False])
def test_exact_when_the_metric_is_linear_in_the_site(direction, normalised):
    """Logit c = W[c] · h + b for h the input of the last Linear: the estimate is exact."""
    net = builders.tiny_mlp().double()
    model = hs.HookedModel.wrap(net)
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    corrupted = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    metric = iv.logit(4, position=None) if normalised else (lambda out: out[:, 4].mean())
    with torch.no_grad():
        h_clean, h_corrupted = net[:5](clean), net[:5](corrupted)  # after the Tanh: [3, 16]
        m_clean, m_corrupted = float(net(clean)[:, 4].mean()), float(net(corrupted)[:, 4].mean())
    sign = 1.0 if direction == "denoise" else -1.0
    m_base = m_corrupted if direction == "denoise" else m_clean
    per_unit = m_base + sign * net[5].weight[4] * (h_clean - h_corrupted).mean(0)  # [16]
    whole = m_base + sign * (net[5].weight[4] @ (h_clean - h_corrupted).mean(0))
    if normalised:
        per_unit = (per_unit - m_corrupted) / (m_clean - m_corrupted)
        whole = (whole - m_corrupted) / (m_clean - m_corrupted)

    for sites, expected in [("neuron.1.*", per_unit), ("resid_post.1", whole)]:
        args = dict(metric=metric, sites=sites, direction=direction)
        res = iv.attribution_patching(model, clean, corrupted, **args)
        exact = iv.activation_patching(model, clean, corrupted, **args)
        torch.testing.assert_close(res.scores, expected.to(res.scores.dtype), atol=1e-9, rtol=0)
        torch.testing.assert_close(res.scores, exact.scores, atol=1e-6, rtol=0)
        assert res.dims == exact.dims and res.jobs == exact.jobs
        assert res.normalised is normalised and res.method == "attribution_patching"
        assert res.baselines == pytest.approx({"clean": m_clean, "corrupted": m_corrupted})


def test_logits_site_is_exact_on_a_language_model(neox):
    _, model = neox
    for direction in ("denoise", "noise"):
        args = dict(sites="logits", positions="each", direction=direction, progress=False)
        res = iv.attribution_patching(model, CLEAN, CORRUPTED, iv.logit_diff(5, 9), **args)
        exact = iv.activation_patching(model, CLEAN, CORRUPTED, iv.logit_diff(5, 9), **args)
        torch.testing.assert_close(res.scores, exact.scores, atol=1e-9, rtol=0)
        assert abs(float(res.scores[-1]) - (1.0 if direction == "denoise" else 0.0)) < 1e-9


# ---------------------------------------------------------------------- Taylor error


def test_error_is_second_order_in_the_activation_difference():
    """Source = base + O(eps): |estimate - exact| ~ eps² while |exact - base| ~ eps."""
    net = builders.tiny_mlp().double()
    model = hs.HookedModel.wrap(net)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    d = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)

    def metric(out):
        return out[:, 2].mean()

    errors, changes = [], []
    for eps in (1e-1, 1e-2, 1e-3):
        corrupted = x + eps * d
        res = iv.attribution_patching(model, x, corrupted, metric, sites="neuron.0.*")
        with torch.no_grad():  # exact patching of each neuron by hand
            h_base, h_source = net[:3](corrupted), net[:3](x)
            m_base = float(metric(net(corrupted)))
            exact = []
            for i in range(32):
                h = h_base.clone()
                h[:, i] = h_source[:, i]
                exact.append(float(metric(net[3:](h))))
        exact = torch.tensor(exact, dtype=torch.float64)
        errors.append(float((res.scores - exact).abs().max()))
        changes.append(float((exact - m_base).abs().max()))
    for i in range(2):
        assert 50 < errors[i] / errors[i + 1] < 200, errors  # eps / 10 -> error / 100
        assert 8 < changes[i] / changes[i + 1] < 12, changes  # eps / 10 -> effect / 10
    assert errors[-1] < 1e-3 * changes[-1]


# ---------------------------------------------------------------------- plain-torch reference


def _capture(hf, tokens, module_of, n, metric, kwarg=None, attentions=False):
    """Activations at ``module_of(layer)``'s input (plain pre-hooks), d metric / d them."""
    seen: dict[int, torch.Tensor] = {}

    def pre(module, args, kwargs, layer):
        seen[layer] = args[0] if args else kwargs[kwarg]

    handles = [
        module_of(layer).register_forward_pre_hook(
            lambda m, a, k, layer=layer: pre(m, a, k, layer), with_kwargs=True
        )
        for layer in range(n)
    ]
    try:
        out = hf(tokens, use_cache=False, output_attentions=attentions)
    finally:
        for h in handles:
            h.remove()
    acts = list(out.attentions) if attentions else [seen[layer] for layer in range(n)]
    assert all(a.requires_grad for a in acts)
    grads = torch.autograd.grad(metric(out.logits), acts)
    return [a.detach() for a in acts], list(grads), float(metric(out.logits.detach()))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("site", ["z", "resid_pre", "pattern"])
def test_equals_plain_torch_autograd_reference(neox, site, direction):
    hf, model = neox
    if site == "pattern":
        hf = builders.eager_copy(hf)
    layers = hf.gpt_neox.layers
    where = {
        "z": dict(module_of=lambda layer: layers[layer].attention.dense, kwarg="input"),
        "resid_pre": dict(module_of=lambda layer: layers[layer], kwarg="hidden_states"),
        "pattern": dict(module_of=lambda layer: layers[layer], attentions=True),
    }[site]
    base, source = (CORRUPTED, CLEAN) if direction == "denoise" else (CLEAN, CORRUPTED)
    base_acts, grads, m_base = _capture(hf, base, n=2, metric=_logit_diff, **where)
    source_acts, _, m_source = _capture(hf, source, n=2, metric=_logit_diff, **where)
    m_clean, m_corrupted = (m_source, m_base) if direction == "denoise" else (m_base, m_source)
    # product summed over batch and features, kept per position (and per head): [layer, ...]
    prods = [g * (s - b) for g, s, b in zip(grads, source_acts, base_acts)]
    if site == "z":  # [batch, pos, 4 * 16] -> [head, pos]
        expected = torch.stack([p.unflatten(-1, (4, 16)).sum((0, 3)).T for p in prods])
        sites = "head.*.*"
    elif site == "resid_pre":  # [batch, pos, d_model] -> [pos]
        expected = torch.stack([p.sum((0, 2)) for p in prods])
        sites = "resid_pre.*"
    else:  # [batch, head, dest, src] -> [head, dest]
        expected = torch.stack([p.sum((0, 3)) for p in prods])
        sites = "head.*.*.pattern"
    expected = (m_base + expected - m_corrupted) / (m_clean - m_corrupted)

    res = iv.attribution_patching(
        model, CLEAN, CORRUPTED, iv.logit_diff(5, 9), sites, positions="each", direction=direction
    )
    assert res.dims == (("layer", "pos") if site == "resid_pre" else ("layer", "head", "pos"))
    tol = 1e-6 if site == "pattern" else 1e-9  # HF takes the softmax in float32
    torch.testing.assert_close(res.scores, expected, atol=tol, rtol=0)
    assert res.baselines == pytest.approx({"clean": m_clean, "corrupted": m_corrupted})
    raw = iv.attribution_patching(
        model, CLEAN, CORRUPTED, _logit_diff, sites, positions=[2, -1], direction=direction
    )
    torch.testing.assert_close(
        raw.scores,
        expected[..., [2, -1]] * (m_clean - m_corrupted) + m_corrupted,
        atol=tol * abs(m_clean - m_corrupted),
        rtol=0,
    )


def test_soft_capped_logits_are_read_from_the_full_forward():
    """Gemma's final soft-capping follows the unembedding: the metric must not be read from
    the unembedding's input. Baselines and estimates equal plain autograd on HF's logits."""
    hf = builders.tiny_gemma3(softcap=0.5).double()
    model = hs.HookedModel.wrap(hf)
    layers = hf.model.layers
    base_acts, grads, m_corrupted = _capture(
        hf, CORRUPTED, lambda layer: layers[layer], n=3, metric=_logit_diff, kwarg="hidden_states"
    )
    source_acts, _, m_clean = _capture(
        hf, CLEAN, lambda layer: layers[layer], n=3, metric=_logit_diff, kwarg="hidden_states"
    )
    expected = torch.stack(
        [(g * (s - b)).sum((0, 2)) for g, s, b in zip(grads, source_acts, base_acts)]
    )  # [layer, pos]
    expected = (m_corrupted + expected - m_corrupted) / (m_clean - m_corrupted)
    res = iv.attribution_patching(
        model, CLEAN, CORRUPTED, iv.logit_diff(5, 9), "resid_pre.*", positions="each"
    )
    assert res.baselines == pytest.approx({"clean": m_clean, "corrupted": m_corrupted}, abs=1e-12)
    torch.testing.assert_close(res.scores, expected, atol=1e-9, rtol=0)


def test_grouped_query_k_heads_share_their_kv_head():
    """Llama GQA: query heads 2k and 2k+1 read k/v head k; both get that k head's estimate."""
    hf = builders.tiny_llama_gqa().double()
    model = hs.HookedModel.wrap(hf)
    metric = iv.logit_diff(5, 9)
    layers = hf.model.layers
    acts = {}  # k = the output of k_proj, [batch, pos, 2 kv heads * 16]
    for name, tokens in (("clean", CLEAN), ("corrupted", CORRUPTED)):
        seen = {}
        handles = [
            layers[layer].self_attn.k_proj.register_forward_hook(
                lambda m, a, out, layer=layer: seen.__setitem__(layer, out)
            )
            for layer in range(2)
        ]
        try:
            out = hf(tokens, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        ks = [seen[layer] for layer in range(2)]
        grads = torch.autograd.grad(_logit_diff(out), ks)
        acts[name] = ([k.detach() for k in ks], grads, float(_logit_diff(out.detach())))
    (k_clean, _, m_clean), (k_corrupted, g_corrupted, m_corrupted) = (
        acts["clean"],
        acts["corrupted"],
    )
    per_kv = torch.stack(  # [layer, kv_head]: d_head = 16
        [
            (g * (c - b)).unflatten(-1, (2, 16)).sum((0, 1, 3))
            for g, c, b in zip(g_corrupted, k_clean, k_corrupted)
        ]
    )
    expected = per_kv.repeat_interleave(2, dim=1) / (m_clean - m_corrupted)  # [layer, head]
    res = iv.attribution_patching(model, CLEAN, CORRUPTED, metric, sites="head.*.*.k")
    assert res.scores.shape == (2, 4)
    torch.testing.assert_close(res.scores, expected, atol=1e-9, rtol=0)


def test_cnn_channels_equal_plain_torch_reference():
    net = builders.tiny_cnn().double()
    model = hs.HookedModel.wrap(net)
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    corrupted = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    metric = iv.logit(3, position=None)
    h_base = net[:4](corrupted).detach().requires_grad_(True)  # conv 1 after its ReLU
    m_base = net[4:](h_base)[:, 3].mean()
    (grad,) = torch.autograd.grad(m_base, h_base)
    with torch.no_grad():
        h_clean = net[:4](clean)
        m_clean = float(net(clean)[:, 3].mean())
    expected = (grad * (h_clean - h_base.detach())).sum((0, 2, 3)) / (
        m_clean - float(m_base.detach())
    )
    res = iv.attribution_patching(model, clean, corrupted, metric, sites="neuron.1.*")
    assert res.dims == ("neuron",)
    torch.testing.assert_close(res.scores, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("frozen", [False, True])
def test_neuron_pre_before_an_inplace_relu(frozen):
    """The gradient at a conv output that nn.ReLU(inplace=True) overwrites is taken w.r.t. the
    pre-activation (as with a non-inplace ReLU), not the post-ReLU value; frozen weights too."""
    net = builders.tiny_cnn().double().requires_grad_(not frozen)  # Conv2d -> ReLU(inplace=True)
    plain = copy.deepcopy(net)
    plain[1] = nn.ReLU()
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    corrupted = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    args = dict(metric=iv.logit(3, position=None), sites="neuron.0.*.pre", progress=False)
    inplace = iv.attribution_patching(hs.HookedModel.wrap(net), clean, corrupted, **args)
    reference = iv.attribution_patching(hs.HookedModel.wrap(plain), clean, corrupted, **args)
    torch.testing.assert_close(inplace.scores, reference.scores, atol=1e-9, rtol=0)
    assert all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------------- identities of the estimate


def test_linear_identities_across_site_kinds():
    """Where one site is a linear function of another, their first-order estimates agree:
    attn_out = dense(z), head result h = z_h W_O[h], mlp_out = W_out neuron_post,
    resid_post.L is resid_pre.L+1; positions 'each' sum to 'all'."""
    hf = builders.tiny_neox(parallel=False).double()
    model = hs.HookedModel.wrap(hf)

    def est(sites, positions="all"):
        res = iv.attribution_patching(
            model, CLEAN, CORRUPTED, _logit_diff, sites, positions=positions, progress=False
        )
        return res.scores - res.baselines["corrupted"]  # the estimated change

    close = dict(atol=1e-9, rtol=0)
    torch.testing.assert_close(est("head.*.*.result"), est("head.*.*"), **close)
    torch.testing.assert_close(est("head.*.*").sum(1), est("attn_out.*"), **close)
    torch.testing.assert_close(est("neuron.*.*").sum(1), est("mlp_out.*"), **close)
    torch.testing.assert_close(est("resid_post.0"), est("resid_pre.1"), **close)
    for sites in ("resid_mid.*", "embed", "head.*.*.q", "head.*.*.v", "head.*.*.pattern"):
        torch.testing.assert_close(est(sites, "each").sum(-1), est(sites), **close)
    # a mixed list: the whole layer equals the sum of its heads
    mixed = est(["head.0", "head.0.0", "head.0.1", "head.0.2", "head.0.3"])
    torch.testing.assert_close(mixed[0], mixed[1:].sum(), **close)


# ---------------------------------------------------------------------- errors and hygiene


def _hooks_on(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(direction="denoising"), "direction must be one of denoise, noise"),
        (dict(corrupted=CORRUPTED[:, :4]), "must have the same shape"),
        (dict(positions=[9]), r"positions \[9\] out of range for inputs of 6 positions"),
        (dict(sites="head.0.7"), "head 7 out of range"),
        (dict(corrupted=CLEAN), "the metric is equal on clean and corrupted runs"),
        (dict(metric=lambda out: out[:, -1, 5]), "metric must return a scalar tensor"),
        (dict(metric=lambda out: out[:, -1, 5].mean().detach()), "needs the metric's gradient"),
    ],
)
def test_errors_leave_no_hook_and_no_parameter_grad(neox, kwargs, message):
    hf, model = neox
    args = dict(clean=CLEAN, corrupted=CORRUPTED, metric=iv.logit_diff(5, 9), sites="resid_pre.*")
    args.update(kwargs)
    with pytest.raises(hs.HookscopeError, match=message):
        iv.attribution_patching(model, **args)
    assert _hooks_on(hf) == 0
    iv.attribution_patching(model, CLEAN, CORRUPTED, iv.logit_diff(5, 9), "head.*.*")
    assert _hooks_on(hf) == 0
    assert all(p.grad is None for p in hf.parameters())


def test_vision_has_no_position_axis():
    model = hs.HookedModel.wrap(builders.tiny_cnn())
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(hs.InputError, match="no position axis; use positions='all'"):
        iv.attribution_patching(
            model, x, x + 1, iv.logit(0, position=None), sites="neuron.0.*", positions="each"
        )
