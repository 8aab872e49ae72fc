"""Effective receptive fields against their closed forms and a hand gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope.errors import InputError
from hookscope.units import receptive_field


def ones_conv(c_in: int = 1, c_out: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return conv


def images(n: int = 5, channels: int = 1, size: int = 9) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def test_single_ones_kernel_is_a_box():
    net = nn.Sequential(ones_conv(), nn.Flatten(), nn.Linear(81, 2)).eval()
    erf = receptive_field(net, images(), site="neuron.0")
    expected = np.zeros((9, 9))
    expected[3:6, 3:6] = 1.0  # the 3x3 box around the centre (4, 4)
    np.testing.assert_allclose(erf.to_numpy(), expected, atol=1e-12)
    assert erf.position == (4, 4) and erf.support() == (range(3, 6), range(3, 6))
    corner = receptive_field(net, images(), site="neuron.0.0", position=(0, 0))
    expected = np.zeros((9, 9))
    expected[:2, :2] = 1.0  # the box clipped by the zero padding
    np.testing.assert_allclose(corner.to_numpy(), expected, atol=1e-12)
    fig = erf.plot()
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()), erf.to_numpy())


def test_two_stacked_ones_kernels_give_the_triangle():
    net = nn.Sequential(ones_conv(), ones_conv(), nn.Flatten(), nn.Linear(81, 2)).eval()
    erf = receptive_field(net, images(), site="neuron.1", unit=0, batch_size=2)
    tri = np.array([1.0, 2.0, 3.0, 2.0, 1.0])
    expected = np.zeros((9, 9))
    expected[2:7, 2:7] = np.outer(tri, tri)
    np.testing.assert_allclose(erf.to_numpy(), expected, atol=1e-12)
    assert erf.site == "neuron.1.0" and "5x5" in repr(erf)


def test_input_channels_summed_and_all_output_channels():
    net = nn.Sequential(ones_conv(2, 2), nn.Flatten(), nn.Linear(162, 2)).eval()
    with torch.no_grad():
        net[0].weight[1] = 2.0
    box = np.zeros((9, 9))
    box[3:6, 3:6] = 1.0
    one = receptive_field(net, images(channels=2), site="neuron.0.1")
    np.testing.assert_allclose(one.to_numpy(), 2 * 2 * box, atol=1e-12)  # weight 2, 2 channels
    every = receptive_field(net, images(channels=2), site="neuron.0")
    np.testing.assert_allclose(every.to_numpy(), 2 * 3 * box, atol=1e-12)  # channels 1 + 2


def test_receptive_field_of_the_digits_cnn_is_local(cnn, X):
    erf = receptive_field(cnn, X[:40], site="neuron.0.3", position=(2, 5))
    rows, cols = erf.support()
    assert rows == range(1, 4) and cols == range(4, 7)  # a 3x3 conv: the 3x3 around (2, 5)
    # against a hand gradient of one example
    x = X[:1].clone().requires_grad_(True)
    out = cnn.model[1](cnn.model[0](x))[0, 3, 2, 5]
    (g,) = torch.autograd.grad(out, x)
    single = receptive_field(cnn, X[:1], site="neuron.0.3", position=(2, 5))
    np.testing.assert_allclose(single.to_numpy(), g[0, 0].abs().double().numpy(), atol=1e-7)


def test_receptive_field_bad_input(cnn, X):
    mixed = nn.Sequential(
        ones_conv(), nn.ReLU(), nn.Flatten(), nn.Linear(81, 5), nn.ReLU(), nn.Linear(5, 2)
    ).eval()
    with pytest.raises(InputError, match=r"not one.*Conv sites: .*neuron\.0"):
        receptive_field(mixed, images(), site="neuron.1")
    mlp = hs.zoo.load("digits-mlp")
    with pytest.raises(InputError, match="no conv layer"):
        receptive_field(mlp, X, site="neuron.0")
    with pytest.raises(InputError, match=r"0\.\.15"):
        receptive_field(cnn, X, site="neuron.0", unit=16)
    with pytest.raises(InputError, match=r"rows 0\.\.7"):
        receptive_field(cnn, X, site="neuron.0.1", position=(8, 0))
    with pytest.raises(InputError, match="image inputs"):
        receptive_field(cnn, X[:, 0, 0], site="neuron.0.1")


def test_absolute_value_before_the_channel_sum():
    """Two input channels with opposite kernels: |grad| summed over channels is 2 per tap;
    summing first would cancel to 0."""
    import torch
    from torch import nn

    import hookscope as hs
    from hookscope import units

    net = nn.Sequential(nn.Conv2d(2, 1, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[0, 0] = 1.0
        net[0].weight[0, 1] = -1.0
    rf = units.receptive_field(
        hs.HookedModel.wrap(net.eval()), torch.rand(4, 2, 8, 8), site="neuron.0.0.pre"
    )
    expected = torch.zeros(8, 8, dtype=rf.map.dtype)
    expected[3:6, 3:6] = 2.0
    torch.testing.assert_close(rf.map, expected)
