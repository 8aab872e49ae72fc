"""The advice an N-D activation gets: flatten per example (``X.flatten(1)``), never a reshape
that mixes examples and positions into rows."""

import numpy as np
import pytest
import torch

from hookscope import analysis as an
from hookscope.errors import AnalysisError


def test_conv_map_is_told_to_flatten_per_example():
    conv = torch.randn(8, 3, 4, 4)  # [batch, channels, h, w]
    with pytest.raises(AnalysisError) as err:
        an.linear_cka(conv, torch.randn(8, 5))
    text = str(err.value)
    assert "got shape (8, 3, 4, 4)" in text
    assert "X.flatten(1) -> (8, 48)" in text
    assert "not X.reshape(-1, X.shape[-1])" in text  # named only as what not to do
    assert an.linear_cka(conv.flatten(1), torch.randn(8, 5)) >= 0.0  # the advice works


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda a: an.linear_cka(torch.randn(8, 5), a), "Y"),
        (lambda a: an.debiased_cka(a, torch.randn(8, 5)), "X"),
        (lambda a: an.participation_ratio(a), "A"),
        (lambda a: an.pca(a), "A"),
        (lambda a: an.pc1_diagnostic(a, torch.randn(8, 5)), "X"),
    ],
)
def test_every_function_sharing_the_validator_gives_the_same_advice(call, name):
    with pytest.raises(AnalysisError, match=rf"{name}\.flatten\(1\) -> \(8, 48\)"):
        call(torch.randn(8, 3, 4, 4))


def test_numpy_and_token_activations_get_advice_that_runs_on_them():
    with pytest.raises(AnalysisError, match=r"X\.reshape\(X\.shape\[0\], -1\) -> \(8, 48\)"):
        an.linear_cka(np.zeros((8, 3, 4, 4)), np.zeros((8, 5)))
    with pytest.raises(AnalysisError) as err:  # [batch, pos, d]: two sensible choices
        an.linear_cka(torch.randn(8, 6, 5), torch.randn(8, 5))
    text = str(err.value)
    assert "X.flatten(1) -> (8, 30)" in text and "every token is a sample" in text
    with pytest.raises(AnalysisError, match=r"X\[:, None\] for one feature"):
        an.linear_cka(torch.randn(8), torch.randn(8, 5))
