"""``benchmarks/flops.py``, which the patching benchmark's compute limits rest on: the census
of the matrix products a call runs, against products whose shapes are known, and the FLOP
count of an exact sweep, against a count written out by hand for a two-layer model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import flops  # noqa: E402


def test_matrix_products_counts_torch_and_onednn_linears():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    x = torch.randn(5, 3, 8)
    op = flops.onednn_linear()

    def run():
        mlp(x)  # addmm for the biased layer, mm for the other (3-d input: 15 rows)
        mlp(x[0])
        if op is not None:  # oneDNN without and with a binary post-op
            w = torch.randn(6, 8)
            h = op(x, w, None, "none", [], "")
            op.binary(x, h, w, None, "mul")

    found = flops.matrix_products(run)
    expected = {(15, 8, 16): 1, (15, 16, 4): 1, (3, 8, 16): 1, (3, 16, 4): 1}
    if op is not None:
        expected[(15, 8, 6)] = 2
    assert dict(found) == expected
    seconds, flop = flops.alone_seconds(found, samples=1)
    assert flop == sum(2 * r * i * o * n for (r, i, o), n in expected.items())
    assert seconds > 0


def test_exact_flops_of_a_two_layer_sweep_by_hand():
    s = flops.Shape(
        n_layers=2, d_model=4, n_heads=2, n_kv_heads=1, d_head=2, d_mlp=8,
        gated_mlp=True, parallel_residual=False,
    )  # fmt: skip
    q, kv, o, mlp = 2 * 4 * 4, 2 * 2 * 4 * 2, 2 * 4 * 4, 3 * 2 * 4 * 8
    assert (s.q, s.kv, s.o, s.mlp) == (q, kv, o, mlp)

    def att(t):  # one query at position t: scores and weighted values over t + 1 keys
        return 2 * 2 * 2 * 2 * (t + 1)

    logits = 2 * 4 * 2
    # one row reading position 2; a head of layer 0 changed from position 1 on: block 0's
    # output projection and MLP at positions 1-2; block 1 (the last): keys/values at 1-2,
    # then query, attention, output projection and MLP at position 2; two logit columns
    job = (o + mlp) * 2 + kv * 2 + q + att(2) + o + mlp + logits
    # the baseline: clean and corrupted rows, positions 0-2, block 0 whole, block 1 as above
    base_row = (q + kv + o + mlp) * 3 + sum(att(t) for t in range(3))
    base_row += kv * 3 + q + att(2) + o + mlp + logits
    got = flops.exact_flops(s, [flops.Job("head", 0, 1), flops.Job("head", 1, None)], [2])
    assert got == pytest.approx(2 * base_row + job)
