"""The gated MLPs' oneDNN forward (``down(act(gate(x)) * up(x))`` with the activation and
the product as post-ops of the matrix products): equal to a float64 computation of the
formula, taken only where the MLP computes that formula, and falling back to the MLP's
own forward wherever a hook, gradients or another activation could change the result."""

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.interventions import _onednn as onednn
from hookscope.interventions.engine.structure import Structure

import builders

pytestmark = pytest.mark.skipif(
    onednn.onednn_linear() is None, reason="no oneDNN linear in this torch build or CPU"
)

BUILDS = {"llama": builders.tiny_llama_gqa, "gemma3": builders.tiny_gemma3}


def _mlp(hf, layer=0):
    return hf.model.layers[layer].mlp


@torch.no_grad()
def _reference(mlp, x, act):
    """The gated MLP formula in float64 (``act``: torch's function of that name)."""
    d = x.double()
    gate = nn.functional.linear(d, mlp.gate_proj.weight.double())
    up = nn.functional.linear(d, mlp.up_proj.weight.double())
    return nn.functional.linear(act(gate) * up, mlp.down_proj.weight.double())


ACTS = {
    "llama": nn.functional.silu,
    "gemma3": lambda t: nn.functional.gelu(t, approximate="tanh"),
}


@pytest.mark.parametrize("arch", list(BUILDS))
def test_fused_forward_equals_the_formula_in_float64(arch):
    hf = BUILDS[arch]()
    model = hs.HookedModel.wrap(hf)
    fast, off = onednn.fast_forwards(model)
    assert off == {}
    mlps = [layer.mlp for layer in hf.model.layers]
    assert all(m in fast for m in mlps)
    x = torch.randn(3, 5, hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for mlp in mlps:
        with torch.no_grad():
            got = fast[mlp](x)
        want = _reference(mlp, x, ACTS[arch])
        scale = float(want.abs().max())
        assert float((got.double() - want).abs().max()) <= 2e-6 * scale
        with torch.no_grad():  # and the module's own forward, to fp32 rounding
            torch.testing.assert_close(got, mlp(x), atol=1e-5, rtol=1e-5)


def test_structure_and_engine_take_the_fused_forwards():
    hf = builders.tiny_llama_gqa()
    structure = Structure.of(hs.HookedModel.wrap(hf))
    assert {layer.mlp for layer in hf.model.layers} <= set(structure.fast)


def test_a_hooked_part_or_gradients_fall_back_to_the_mlps_own_forward():
    hf = builders.tiny_llama_gqa()
    mlp = _mlp(hf)
    fast, _ = onednn.fast_forwards(hs.HookedModel.wrap(hf))
    x = torch.randn(2, 4, hf.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for part in (mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn):
        handle = part.register_forward_hook(lambda m, a, out: out + 1.0)
        try:
            with torch.no_grad():
                torch.testing.assert_close(fast[mlp](x), mlp(x), atol=0, rtol=0)
        finally:
            handle.remove()
    handle = mlp.gate_proj.register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    try:
        with torch.no_grad():
            torch.testing.assert_close(fast[mlp](x), mlp(x), atol=0, rtol=0)
    finally:
        handle.remove()
    from hookscope.scope import Scope

    with Scope() as scope:  # a forward a scope replaced on a part
        scope.replace_forward(
            mlp.up_proj, lambda t: nn.functional.linear(t, mlp.up_proj.weight) * 3
        )
        with torch.no_grad():
            torch.testing.assert_close(fast[mlp](x), mlp(x), atol=0, rtol=0)
    with torch.enable_grad():  # gradients: the module's own autograd graph
        out = fast[mlp](x.requires_grad_())
    assert out.grad_fn is not None
    torch.testing.assert_close(out.detach(), mlp(x).detach(), atol=0, rtol=0)


def test_mlps_computing_something_else_are_left_alone():
    hf = builders.tiny_llama_gqa()
    model = hs.HookedModel.wrap(hf)
    hf.model.layers[0].mlp.act_fn = nn.ReLU()  # an activation without a post-op here
    fast, _ = onednn.fast_forwards(model)
    assert hf.model.layers[0].mlp not in fast and hf.model.layers[1].mlp in fast

    class Scaled(type(hf.model.layers[1].mlp)):
        def forward(self, x):
            return 2 * super().forward(x)

    hf.model.layers[1].mlp.__class__ = Scaled  # the formula no longer holds: the probe sees it
    fast, _ = onednn.fast_forwards(model)
    assert hf.model.layers[1].mlp not in fast
    hooked = builders.tiny_llama_gqa()
    handle = hooked.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, o: None)
    try:  # a hook present when the engine starts: not probed, not fused
        fast, _ = onednn.fast_forwards(hs.HookedModel.wrap(hooked))
        assert hooked.model.layers[0].mlp not in fast and hooked.model.layers[1].mlp in fast
    finally:
        handle.remove()


def test_models_without_gated_mlps_get_linears_only():
    hf = builders.tiny_gpt2()
    fast, _ = onednn.fast_forwards(hs.HookedModel.wrap(hf))
    assert all(isinstance(m, nn.Linear) for m in fast)
