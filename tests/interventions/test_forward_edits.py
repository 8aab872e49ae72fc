"""Pieces of the stacked sweep checked on their own: oneDNN linear layers against a
float64 reference, the first-change planning against positions set by hand, and a metric
read for many stacked copies at once against explicit indexing of full logits."""

import warnings

import pytest
import torch
from torch import nn

import hookscope as hs
from hookscope import interventions as iv
from hookscope.addresses import AttentionHead
from hookscope.interventions import _onednn as onednn
from hookscope.interventions.engine import Write, Writer
from hookscope.interventions.metrics import Unembed

import builders

needs_onednn = pytest.mark.skipif(
    onednn.onednn_linear() is None, reason="no oneDNN linear in this torch build or CPU"
)


@needs_onednn
def test_onednn_linears_equal_a_float64_reference_and_skip_what_they_cannot_take():
    torch.manual_seed(0)
    plain, no_bias = nn.Linear(64, 96), nn.Linear(64, 8, bias=False)
    half = nn.Linear(4, 4).to(torch.bfloat16)

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(4, 4)
    wrapped = nn.Linear(4, 4)
    wrapped.forward = lambda x: x  # an instance-level forward (e.g. an offloading wrapper)
    strided = nn.Linear(4, 6)
    strided.bias = nn.Parameter(torch.randn(6, 2)[:, 0])  # a non-contiguous bias
    found = onednn.fast_linears([plain, no_bias, half, doubled, wrapped, strided, nn.ReLU()])
    assert set(found) == {plain, no_bias}
    with warnings.catch_warnings():  # torch warns about Intel GPUs when the flags change
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False):  # the user turned oneDNN off
            assert onednn.fast_linears([plain]) == {}

    x = torch.randn(3, 7, 64)
    for module in (plain, no_bias):
        with torch.no_grad():
            bias = None if module.bias is None else module.bias.double()
            exact = nn.functional.linear(x.double(), module.weight.double(), bias)
            got = found[module](x)
            torch_linear = module(x)
        # both fp32 products sit within fp32 rounding of the float64 product
        scale = float(exact.abs().max())
        assert float((got.double() - exact).abs().max()) < 1e-6 * scale * 64
        assert float((torch_linear.double() - exact).abs().max()) < 1e-6 * scale * 64
    # gradients on: the plain op, which autograd knows
    x.requires_grad_(True)
    found[plain](x).sum().backward()
    torch.testing.assert_close(x.grad, plain.weight.sum(0).expand(3, 7, 64))
    with torch.no_grad():  # no rows: the plain op too
        assert found[plain](torch.zeros(0, 64)).shape == (0, 96)


@needs_onednn
def test_onednn_linears_fall_back_where_they_would_compute_something_else():
    """Every call reads the layer's current parameters and defers to torch's linear under
    autocast, a torch function mode, or a parameter replaced by a strided view; keyword
    calls work as on nn.Linear."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    forward = onednn.fast_linears([layer])[layer]
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            forward(input=x), nn.functional.linear(x, layer.weight, layer.bias)
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = layer(x)
            got = forward(x)
        assert expected.dtype == got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, atol=0, rtol=0)

        seen = []

        class Record(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                seen.append(getattr(func, "__name__", str(func)))
                return func(*args, **(kwargs or {}))

        with Record():
            forward(x)
        assert "linear" in seen

        values = torch.randn(6, 3)
        layer.bias = nn.Parameter(values[:, 1])  # strided: oneDNN would misread it
        torch.testing.assert_close(
            forward(x), x @ layer.weight.T + values[:, 1], atol=1e-6, rtol=1e-6
        )


@needs_onednn
def test_sweeps_compute_block_linears_with_onednn_and_restore_them(monkeypatch):
    """The sweep's forwards go through oneDNN (counted), give the scores of the plain
    torch path within fp32 rounding, and leave every module's own forward in place,
    also when a forward fails half-way."""
    hf = builders.tiny_neox()
    with torch.no_grad():  # Hugging Face initialises biases to zero: give them values
        for module in hf.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    model = hs.HookedModel.wrap(hf)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(1, 500, (2, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 5) % 500
    metric = iv.logit_diff(3, 8)
    calls = {"n": 0}
    real = onednn.onednn_linear()

    def counting(*args):
        calls["n"] += 1
        return real(*args)

    def sweep():
        return iv.activation_patching(
            model, clean, corrupted, metric, sites=["head.*.*", "resid_pre.*"], progress=False
        )

    monkeypatch.setattr(onednn, "onednn_linear", lambda: counting)
    fast = sweep()
    assert calls["n"] > 0
    monkeypatch.setattr(onednn, "onednn_linear", lambda: None)
    plain_torch = sweep()
    torch.testing.assert_close(fast.scores, plain_torch.scores, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(onednn, "onednn_linear", lambda: counting)
    block = hf.gpt_neox.layers[1]

    def fail_in_sweeps(module, args, kwargs):
        if (args[0] if args else kwargs["hidden_states"]).shape[0] > 4:
            raise RuntimeError("block failed")

    handle = block.register_forward_pre_hook(fail_in_sweeps, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="block failed"):
            sweep()
    finally:
        handle.remove()
    for module in hf.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_first_change_per_unit_and_for_the_whole_slot():
    """Heads whose values first differ at positions set by hand: each head's job starts
    there, a whole-layer job at the earliest, a job at a position at that position."""
    model = hs.HookedModel.wrap(builders.tiny_neox())
    slot = AttentionHead(1, None, "z").slot
    base = torch.zeros(2, 9, 4, 8)  # [batch, pos, heads, d_head]
    source = base.clone()
    first = {0: 6, 1: 2, 2: 9, 3: 4}  # head 2 never differs
    for head, at in first.items():
        if at < 9:
            source[1, at, head, 5] = 1.0  # one row, one feature: enough to differ
    source[0, 8, 1, 0] = 1.0  # a later difference in another row changes nothing
    writer = Writer(model.adapter, {slot: base})
    for head, at in first.items():
        assert writer.first_change((Write(AttentionHead(1, head, "z"), None, source),)) == at
    assert writer.first_change((Write(AttentionHead(1, None, "z"), None, source),)) == 2
    assert writer.first_change((Write(AttentionHead(1, 0, "z"), 5, source),)) == 5
    together = (
        Write(AttentionHead(1, 0, "z"), None, source),
        Write(AttentionHead(1, 3, "z"), None, source),
    )
    assert writer.first_change(together) == 4
    # zeros (an ablation) differ where the base is non-zero: from position 3 here
    base[0, 3, 2, 1] = 1.0
    zeros = Writer(model.adapter, {slot: base})
    assert zeros.first_change((Write(AttentionHead(1, 2, "z")),)) == 3


@pytest.mark.parametrize("kind", ["logit_diff", "logit"])
def test_a_metric_read_for_stacked_copies_equals_explicit_indexing(kind):
    """Per-row answer ids and positions, repeated for 3 stacked copies of a batch of 2."""
    torch.manual_seed(1)
    head = nn.Linear(16, 40)
    hidden = torch.randn(6, 5, 16)  # 3 copies x 2 rows
    correct, incorrect, position = [4, 9], [7, 1], [3, 1]
    if kind == "logit":
        metric = iv.logit(correct, position=position)
    else:
        metric = iv.logit_diff(correct, incorrect, position=position)
    with torch.no_grad():
        got = metric.repeated(3, 2).per_example_hidden(hidden, Unembed(head))
        logits = head(hidden)
    expected = []
    for row in range(6):
        r = row % 2
        at = logits[row, position[r]]
        expected.append(float(at[correct[r]] - (at[incorrect[r]] if kind == "logit_diff" else 0)))
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert metric.repeated(3, 4) is None  # per-row values for another batch size
    # a softmax over the vocabulary is read one copy at a time (bounded memory)
    assert iv.prob(correct, position=position).repeated(3, 2) is None


@pytest.mark.parametrize("position", [torch.tensor(2), [1, 2, 3]])
def test_a_position_that_fits_no_row_is_reported_for_the_batch(position):
    """A 0-d tensor or a list of the wrong length: the message counts the batch's rows."""
    model = hs.HookedModel.wrap(builders.tiny_neox())
    clean = torch.randint(1, 500, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupted = clean.flip(1)
    metric = iv.logit_diff(3, 8, position=position)
    with pytest.raises(hs.HookscopeError, match=r"one per row \(2\)"):
        iv.activation_patching(model, clean, corrupted, metric, "resid_pre.*", progress=False)
