"""units.compare: every unit analysis on two checkpoints, against closed forms and the two
analyses run separately."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

import hookscope as hs
from hookscope import units
from hookscope.errors import InputError


@pytest.fixture(scope="module")
def digits():
    X, y = hs.data.digits("test", tensors=True)
    return X[:96], y[:96]


def _conv(kernel: torch.Tensor) -> nn.Module:
    """conv 3x3 (1 -> 1 channel, no bias, padding 1) - ReLU - conv - flatten - linear."""
    net = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 2),
    )
    with torch.no_grad():
        net[0].weight.copy_(kernel.view(1, 1, 3, 3))
    return net.eval()


def test_receptive_field_difference_is_the_kernels_difference():
    """One linear conv unit (the ReLU is open on positive inputs): the ERF is |kernel| placed
    around the unit's position, so the difference of two checkpoints is known exactly."""
    X = torch.rand(8, 1, 8, 8) + 0.1  # positive: every ReLU is open
    box = torch.ones(3, 3)
    centre = torch.zeros(3, 3)
    centre[1, 1] = 2.0
    cmp = units.compare(_conv(centre), _conv(box), X, method="receptive_field", site="neuron.0.0")
    expected_before = torch.zeros(8, 8)
    expected_before[4, 4] = 2.0
    expected_after = torch.zeros(8, 8)
    expected_after[3:6, 3:6] = 1.0  # kernel flipped is the same all-ones box
    torch.testing.assert_close(cmp.quantities["map"][0].double(), expected_before.double())
    torch.testing.assert_close(cmp.difference("map"), (expected_after - expected_before).double())
    fig = cmp.plot()
    np.testing.assert_allclose(
        fig.axes[2].images[-1].get_array(), (expected_after - expected_before).numpy()
    )


def test_same_model_compares_equal(digits):
    X, y = digits
    cnn = hs.zoo.load("digits-cnn")
    top = units.compare(cnn, cnn, X, method="top_activating", site="neuron.1.7", k=10)
    assert top.extra["top_k_overlap"] == 1.0
    assert float(top.difference("value").abs().max()) == 0.0
    stats = units.compare(cnn, cnn, X, y, method="neuron_stats", site="neuron.0")
    for name in ("mean", "std", "sparsity"):
        assert float(stats.difference(name).abs().max()) == 0.0


def test_checkpoint_differences_equal_the_two_runs(digits):
    X, y = digits
    early = hs.zoo.load("digits-cnn", checkpoint=16)
    final = hs.zoo.load("digits-cnn")
    cmp = units.compare(early, final, X, method="composition", early="neuron.0", late="neuron.1")
    a = units.composition(early, X, early="neuron.0", late="neuron.1")
    b = units.composition(final, X, early="neuron.0", late="neuron.1")
    torch.testing.assert_close(cmp.difference("r2"), (b.r2 - a.r2).double(), equal_nan=True)
    frame = cmp.to_pandas()
    assert set(frame.quantity) == {"r2"} and len(frame) == 32
    row = frame[frame["index"] == 5].iloc[0]
    assert row.before == pytest.approx(float(a.r2[5]), nan_ok=True)
    assert row.after == pytest.approx(float(b.r2[5]), nan_ok=True)

    top = units.compare(early, final, X, method="top_activating", site="neuron.1.7", k=10)
    ta = units.top_activating(early, X, site="neuron.1.7", k=10)
    tb = units.top_activating(final, X, site="neuron.1.7", k=10)
    overlap = len(set(ta.indices.tolist()) & set(tb.indices.tolist())) / 10
    assert top.extra["top_k_overlap"] == pytest.approx(overlap)
    torch.testing.assert_close(top.difference("value"), (tb.values - ta.values).double())
    assert "top_k_overlap" in repr(top)


def test_head_analyses_across_checkpoints(digits):
    X, y = digits
    steps = hs.zoo.shipped.checkpoints("digits-vit")
    early = hs.zoo.load("digits-vit", checkpoint=steps[2])
    final = hs.zoo.load("digits-vit")
    cmp = units.compare(early, final, X[:48], y[:48], method="head_importance")
    a = units.head_importance(early, X[:48], y[:48])
    b = units.head_importance(final, X[:48], y[:48])
    torch.testing.assert_close(
        cmp.difference("accuracy_drop"), (b.accuracy_drop - a.accuracy_drop).double()
    )
    assert cmp.difference("loss_increase").shape == (2, 4)
    fig = cmp.plot()
    np.testing.assert_allclose(
        fig.axes[2].images[-1].get_array(), (b.accuracy_drop - a.accuracy_drop).numpy()
    )
    clusters = units.compare(early, final, X[:48], method="cluster_heads", k=2)
    ca = units.cluster_heads(early, X[:48], k=2)
    cb = units.cluster_heads(final, X[:48], k=2)
    assert clusters.extra["adjusted_rand_index"] == pytest.approx(
        adjusted_rand_score(ca.labels.numpy(), cb.labels.numpy())
    )
    grid = clusters.plot().axes[0].images[0].get_array()
    np.testing.assert_array_equal(grid, np.stack([ca.labels.numpy(), cb.labels.numpy()]))
    stats = units.compare(early, final, X[:48], method="head_stats")
    sa, sb = units.head_stats(early, X[:48]), units.head_stats(final, X[:48])
    torch.testing.assert_close(stats.difference("entropy"), (sb.entropy - sa.entropy).double())


def test_bad_input(digits):
    X, _ = digits
    cnn = hs.zoo.load("digits-cnn")
    with pytest.raises(InputError, match="choose one of head_stats"):
        units.compare(cnn, cnn, X, method="grad_cam")
    with pytest.raises(InputError, match="compare needs method=, one of head_stats"):
        units.compare(cnn, cnn, X)
    with pytest.raises(InputError, match="names must be two different strings"):
        units.compare(cnn, cnn, X, method="neuron_stats", site="neuron.0", names=("a", "a"))
    vit = hs.zoo.load("digits-vit")
    with pytest.raises(InputError, match="head_importance: missing a required argument: 'labels'"):
        units.compare(vit, vit, X, method="head_importance")
    cmp = units.compare(cnn, cnn, X, method="receptive_field", site="neuron.0.1")
    with pytest.raises(InputError, match="choose one of map"):
        cmp.difference("r2")
    vit = hs.zoo.load("digits-vit")
    with pytest.raises(InputError, match="one architecture"):
        units.compare(cnn, vit, X, method="neuron_stats", site="neuron.0")


def test_names_label_the_models_and_labels_reach_the_analysis(digits):
    X, y = digits
    cnn = hs.zoo.load("digits-cnn")
    early = hs.zoo.load("digits-cnn", checkpoint=16)
    cmp = units.compare(
        early, cnn, X[:100], y[:100], method="neuron_stats", site="neuron.1", names=("old", "new")
    )
    a = units.neuron_stats(early, X[:100], y[:100], site="neuron.1")
    b = units.neuron_stats(cnn, X[:100], y[:100], site="neuron.1")
    np.testing.assert_allclose(cmp.difference("selectivity"), b.selectivity - a.selectivity)
    df = cmp.to_pandas()
    assert list(df.columns) == ["quantity", "index", "old", "new", "difference"]
    sel = df[df.quantity == "selectivity"]
    np.testing.assert_allclose(sel["new"].to_numpy(), b.selectivity.double().numpy())
    assert "old vs new" in repr(cmp)
    kw = units.compare(early, cnn, X[:100], method="neuron_stats", site="neuron.1", labels=y[:100])
    np.testing.assert_allclose(kw.difference("selectivity"), cmp.difference("selectivity"))


def test_cluster_heads_of_different_head_counts():
    from transformers import GPT2Config, GPT2LMHeadModel

    import builders

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64)
    two = hs.HookedModel.wrap(GPT2LMHeadModel(cfg).eval())
    four = hs.HookedModel.wrap(builders.tiny_gpt2())
    ids = torch.randint(0, 500, (6, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        InputError, match=r"different heads \(4 vs 8\): compare checkpoints of one architecture"
    ):
        units.compare(two, four, ids, method="cluster_heads", k=2)


def test_result_equality_is_identity(digits):
    X, y = digits
    cnn = hs.zoo.load("digits-cnn")
    results = [
        units.neuron_stats(cnn, X[:50], y[:50], site="neuron.0"),
        units.top_activating(cnn, X[:50], site="neuron.0.1", k=3),
        units.composition(cnn, X[:50], early="neuron.0", late="neuron.1"),
        units.receptive_field(cnn, X[:20], site="neuron.0.1"),
        units.compare(cnn, cnn, X[:50], method="receptive_field", site="neuron.0.1"),
    ]
    for r in results:
        assert r == r and r != units.receptive_field(cnn, X[:20], site="neuron.0.1")
