"""Attention rollout and flow against a direct numpy implementation of Abnar & Zuidema (2020),
closed forms worked out by hand, and networkx's max-flow on graphs built here."""

from __future__ import annotations

import matplotlib
import networkx as nx
import numpy as np
import pytest
import torch

import hookscope as hs
from hookscope.attribution.attention import (
    HEAD_FUSIONS,
    attention_flow,
    attention_rollout,
    flow_from_patterns,
    rollout_from_patterns,
)
from hookscope.errors import HookscopeError, InputError

import builders

matplotlib.use("Agg")


# ---------------------------------------------------------------------------- references


def np_transitions(patterns, fusion, ratio=0.0, residual=True):
    """Per example and layer: fuse heads, zero the int(ratio * n * n) smallest entries (stable
    order), add the identity, renormalise rows. patterns: list of [batch, heads, n, n]."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    out = []
    for b in range(patterns[0].shape[0]):
        per_layer = []
        for p in patterns:
            a = fuse(np.asarray(p[b], dtype=np.float64), axis=0).copy()
            n = a.shape[0]
            k = int(ratio * n * n)
            if k:
                flat = a.reshape(-1)
                flat[np.argsort(flat, kind="stable")[:k]] = 0.0
                a = flat.reshape(n, n)
            if residual:
                a = a + np.eye(n)
            per_layer.append(a / a.sum(1, keepdims=True))
        out.append(per_layer)
    return out


def np_rollout(patterns, fusion="mean", ratio=0.0, residual=True):
    result = []
    for per_layer in np_transitions(patterns, fusion, ratio, residual):
        r = np.eye(per_layer[0].shape[0])
        for a in per_layer:
            r = a @ r
        result.append(r)
    return np.stack(result)


def nx_flows(per_layer, query):
    """Max flow from each (0, j) to (L, query) with networkx on a graph built from scratch."""
    graph = nx.DiGraph()
    n = per_layer[0].shape[0]
    for layer, a in enumerate(per_layer, start=1):
        for i in range(n):
            for j in range(n):
                graph.add_edge(f"{layer - 1}:{j}", f"{layer}:{i}", capacity=float(a[i, j]))
    sink = f"{len(per_layer)}:{query}"
    return np.array([nx.maximum_flow_value(graph, f"0:{j}", sink) for j in range(n)])


def random_patterns(seed, batch=2, heads=3, n=5, layers=3):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, n, n, generator=g, dtype=torch.float64).mul(2).softmax(-1)
        for _ in range(layers)
    ]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vit():
    return hs.zoo.load("digits-vit")


@pytest.fixture(scope="module")
def digits():
    X, _ = hs.data.digits("test", tensors=True)
    return X[:6]


@pytest.fixture(scope="module")
def lm():
    return hs.HookedModel.wrap(builders.tiny_gpt2(), tokenizer=builders.make_tokenizer())


# ---------------------------------------------------------------------------- rollout math


@pytest.mark.parametrize("fusion", HEAD_FUSIONS)
@pytest.mark.parametrize("residual", [True, False])
def test_rollout_equals_numpy_reference(fusion, residual):
    patterns = random_patterns(0)
    got = rollout_from_patterns(patterns, head_fusion=fusion, residual=residual)
    want = np_rollout([p.numpy() for p in patterns], fusion, residual=residual)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-12)


def test_head_fusions_differ_on_the_same_patterns():
    patterns = random_patterns(1)
    results = [rollout_from_patterns(patterns, head_fusion=f) for f in HEAD_FUSIONS]
    assert not torch.allclose(results[0], results[1])
    assert not torch.allclose(results[1], results[2])


def test_rollout_closed_form_two_layers():
    # layer 1: every token attends to token 0 only; layer 2: uniform over 3 tokens
    first = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    first[..., 0] = 1.0
    second = torch.full((1, 1, 3, 3), 1 / 3, dtype=torch.float64)
    # with the residual: A1' = [[1,0,0],[.5,.5,0],[.5,0,.5]], A2' row 0 = [2/3, 1/6, 1/6];
    # (A2' A1')[0] = [2/3 + 1/12 + 1/12, 1/12, 1/12]
    got = rollout_from_patterns([first, second])
    np.testing.assert_allclose(got[0, 0].numpy(), [5 / 6, 1 / 12, 1 / 12], atol=1e-12)
    # (A2' A1')[1]: A2' row 1 = [1/6, 2/3, 1/6] -> [1/6 + 1/3 + 1/12, 1/3, 1/12]
    np.testing.assert_allclose(got[0, 1].numpy(), [7 / 12, 1 / 3, 1 / 12], atol=1e-12)
    # without it every path ends on token 0
    plain = rollout_from_patterns([first, second], residual=False)
    np.testing.assert_allclose(plain[0].numpy(), np.tile([1.0, 0.0, 0.0], (3, 1)), atol=1e-12)


@pytest.mark.parametrize("ratio", [0.3, 0.75])
@pytest.mark.parametrize("fusion", HEAD_FUSIONS)
def test_discard_equals_numpy_reference(ratio, fusion):
    patterns = random_patterns(2, batch=3, n=6)
    got = rollout_from_patterns(patterns, head_fusion=fusion, discard_ratio=ratio)
    want = np_rollout([p.numpy() for p in patterns], fusion, ratio)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    assert not np.allclose(want, np_rollout([p.numpy() for p in patterns], fusion))


def test_discard_is_per_example():
    one = random_patterns(3, batch=1)
    g = torch.Generator().manual_seed(4)  # a second example with sharp, different attention
    two = [torch.randn(p.shape, generator=g, dtype=p.dtype).mul(6).softmax(-1) for p in one]
    both = [torch.cat([a, b]) for a, b in zip(one, two, strict=True)]
    joint = rollout_from_patterns(both, head_fusion="max", discard_ratio=0.6)
    alone = [rollout_from_patterns(x, head_fusion="max", discard_ratio=0.6) for x in (one, two)]
    torch.testing.assert_close(joint, torch.cat(alone), atol=1e-12, rtol=0)


def test_discard_counts_only_real_tokens_under_a_mask():
    full = random_patterns(5, batch=1, n=4)
    padded = []
    for p in full:  # two padded positions after the 4 real ones, masked out as a model does
        q = torch.zeros(1, 3, 6, 6, dtype=torch.float64)
        q[..., :4, :4] = p
        q[..., 4:, :] = 1 / 6
        padded.append(q)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    got = rollout_from_patterns(padded, discard_ratio=0.5, mask=mask)
    want = rollout_from_patterns(full, discard_ratio=0.5)
    torch.testing.assert_close(got[:, :4, :4], want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got[0, 4:, 4:], torch.eye(2, dtype=torch.float64))


# ---------------------------------------------------------------------------- flow math


def test_flow_closed_form():
    # residual=False keeps A' = A (rows already sum to 1). Query: token 0 at layer 2.
    a1 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    a2 = torch.tensor([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]])
    patterns = [a1[None, None], a2.double()[None, None]]
    # token 0: 0 -> (1,0) [0.5] -> (2,0) [0.2]                     = 0.2
    # token 1: 1 -> (1,0) [0.5] -> [0.2], 1 -> (1,1) [1] -> [0.3]    = 0.5
    # token 2: 2 -> (1,2) [1] -> (2,0) [0.5]                         = 0.5
    got = flow_from_patterns(patterns, 0, residual=False)
    np.testing.assert_allclose(got[0].numpy(), [0.2, 0.5, 0.5], atol=1e-12)
    # rollout of the same graph: A2 A1 row 0 = [0.1, 0.4, 0.5] (flow is not rollout)
    roll = rollout_from_patterns(patterns, residual=False)
    np.testing.assert_allclose(roll[0, 0].numpy(), [0.1, 0.4, 0.5], atol=1e-12)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_flow_equals_networkx_on_an_independent_graph(fusion):
    patterns = random_patterns(6, batch=2, heads=2, n=4, layers=2)
    got = flow_from_patterns(patterns, [0, 3], head_fusion=fusion)
    trans = np_transitions([p.numpy() for p in patterns], fusion)
    for b, q in enumerate([0, 3]):
        np.testing.assert_allclose(got[b].numpy(), nx_flows(trans[b], q), atol=1e-10)


# ---------------------------------------------------------------------------- models


def test_vit_rollout_equals_reference_on_cached_patterns(vit, digits):
    _, cache = vit.run_with_cache(digits, ["head.0.pattern", "head.1.pattern"])
    patterns = [cache["head.0.pattern"].numpy(), cache["head.1.pattern"].numpy()]
    assert patterns[0].shape == (6, 4, 17, 17)
    roll = attention_rollout(vit, digits, head_fusion="max", discard_ratio=0.5)
    want = np_rollout(patterns, "max", 0.5)
    np.testing.assert_allclose(roll.matrix.numpy(), want, atol=1e-5)
    np.testing.assert_allclose(roll.cls.numpy(), want[:, 0, 1:], atol=1e-5)
    np.testing.assert_allclose(roll.grid.numpy(), want[:, 0, 1:].reshape(6, 4, 4), atol=1e-5)
    assert roll.values.shape == (6, 16) and roll.query.tolist() == [0] * 6
    # one layer only
    last = attention_rollout(vit, digits, start_layer=1)
    np.testing.assert_allclose(last.matrix.numpy(), np_rollout(patterns[1:]), atol=1e-5)
    same = attention_rollout(vit, digits, layers=[1])
    torch.testing.assert_close(same.matrix, last.matrix)


def test_vit_flow_equals_networkx(vit, digits):
    _, cache = vit.run_with_cache(digits[:1], "head.*.pattern")
    patterns = [cache["head.0.pattern"].numpy(), cache["head.1.pattern"].numpy()]
    flow = attention_flow(vit, digits[:1], progress=False)
    want = nx_flows(np_transitions(patterns, "mean")[0], 0)
    np.testing.assert_allclose(flow.row[0].numpy(), want, atol=1e-5)
    np.testing.assert_allclose(flow.grid[0].numpy(), want[1:].reshape(4, 4), atol=1e-5)
    assert flow.matrix is None and flow.method == "flow"


def test_lm_rollout_padded_row_equals_the_row_alone(lm):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 500, (2, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ids[1, 4:] = 0
    batch = attention_rollout(
        lm, {"input_ids": ids, "attention_mask": mask}, head_fusion="min", discard_ratio=0.4
    )
    alone = attention_rollout(lm, ids[1:, :4], head_fusion="min", discard_ratio=0.4)
    np.testing.assert_allclose(batch.last[1, :4].numpy(), alone.last[0].numpy(), atol=1e-6)
    assert batch.last[1, 4:].abs().max() == 0 and batch.query.tolist() == [6, 3]
    np.testing.assert_allclose(batch.matrix[1, :4, :4].numpy(), alone.matrix[0].numpy(), atol=1e-6)
    # and against the numpy reference on the unpadded row's own patterns
    _, cache = lm.run_with_cache(ids[1:, :4], "head.*.pattern")
    ref = np_rollout([cache[f"head.{i}.pattern"].numpy() for i in (0, 1)], "min", 0.4)
    np.testing.assert_allclose(alone.last[0].numpy(), ref[0, 3], atol=1e-6)
    flow = attention_flow(lm, {"input_ids": ids, "attention_mask": mask})
    flow_alone = attention_flow(lm, ids[1:, :4])
    np.testing.assert_allclose(flow.last[1, :4].numpy(), flow_alone.last[0].numpy(), atol=1e-6)
    assert flow.last[1, 4:].abs().max() == 0


def test_lm_texts_with_tokens_and_frame(lm):
    texts = ["When Mary and John went", "The quick"]
    roll = attention_rollout(lm, texts)
    n = [len(lm.to_str_tokens(t)) for t in texts]
    assert roll.tokens == [lm.to_str_tokens(t) for t in texts]
    alone = attention_rollout(lm, texts[1])
    np.testing.assert_allclose(roll.last[1, : n[1]].numpy(), alone.last[0].numpy(), atol=1e-6)
    frame = roll.to_pandas()
    assert len(frame) == sum(n)
    second = frame[frame.example == 1]
    assert second.token.tolist() == roll.tokens[1]
    np.testing.assert_allclose(second.value.to_numpy(), roll.last[1, : n[1]].numpy())
    assert "rollout" in repr(roll) and f"query token at {[n[0] - 1, n[1] - 1]}" in repr(roll)


# ---------------------------------------------------------------------------- outputs


def test_vit_plot_and_frame_hold_the_values(vit, digits):
    roll = attention_rollout(vit, digits[:3])
    fig = roll.plot(digits[:3])
    for b in range(3):
        images = fig.axes[b].images
        np.testing.assert_allclose(np.asarray(images[-1].get_array()), roll.grid[b].numpy())
        pic = digits[b, 0].numpy()
        want = (pic - pic.min()) / (pic.max() - pic.min())
        np.testing.assert_allclose(np.asarray(images[0].get_array()), want, atol=1e-6)
    bare = roll.plot(examples=[2])
    np.testing.assert_allclose(np.asarray(bare.axes[0].images[0].get_array()), roll.grid[2].numpy())
    frame = roll.to_pandas()
    assert len(frame) == 3 * 16
    cell = frame[(frame.example == 1) & (frame.row == 2) & (frame.col == 3)]
    assert cell.value.item() == pytest.approx(float(roll.grid[1, 2, 3]))
    assert "CLS" in repr(roll)


def test_text_plot_holds_the_values(lm):
    roll = attention_rollout(lm, ["When Mary and John went", "The quick"])
    fig = roll.plot()
    for b in range(2):
        keep = roll.mask[b].bool()
        drawn = np.asarray(fig.axes[b].images[0].get_array())
        np.testing.assert_allclose(drawn, roll.last[b][keep].numpy()[None, :])
        labels = [t.get_text() for t in fig.axes[b].get_xticklabels()]
        assert labels == roll.tokens[b]


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"head_fusion": "avg"}, ["mean", "max", "min"]),
        ({"discard_ratio": 1.0}, ["[0, 1)"]),
        ({"discard_ratio": -0.1}, ["[0, 1)"]),
        ({"discard_ratio": "0.5"}, ["[0, 1)"]),
        ({"layers": [0, 5]}, ["0..1"]),
        ({"start_layer": 2}, ["0..1"]),
        ({"layers": [1], "start_layer": 1}, ["layers or start_layer"]),
        ({"layers": []}, ["0..1"]),
        ({"query": "first"}, ["cls", "last"]),
        ({"query": 40}, ["0..16"]),
        ({"residual": "yes"}, ["True or False"]),
    ],
)
def test_bad_arguments_name_the_choices(vit, digits, kwargs, words):
    with pytest.raises(InputError) as err:
        attention_rollout(vit, digits[:2], **kwargs)
    for word in words:
        assert word in str(err.value)


def test_bad_flow_arguments(vit, digits):
    with pytest.raises(InputError, match="mean, max, min"):
        attention_flow(vit, digits[:1], head_fusion="sum")
    with pytest.raises(InputError, match="one position or one per example"):
        flow_from_patterns(random_patterns(0, batch=2), [0, 1, 2])


def test_model_without_attention():
    cnn = hs.zoo.load("digits-cnn")
    X, _ = hs.data.digits("test", tensors=True)
    for fn in (attention_rollout, attention_flow):
        with pytest.raises(HookscopeError) as err:
            fn(cnn, X[:2])
        message = str(err.value)
        assert "no attention pattern sites" in message and "neuron" in message
        assert "digits-vit" in message


def test_bad_patterns_and_result_views(vit, digits):
    with pytest.raises(InputError, match=r"\[batch, heads, n, n\]"):
        rollout_from_patterns([torch.ones(2, 3, 3)])
    with pytest.raises(InputError, match="patterns\\[1\\]"):
        rollout_from_patterns([torch.ones(1, 1, 3, 3), torch.ones(2, 1, 3, 3)])
    roll = attention_rollout(vit, digits[:2])
    with pytest.raises(InputError, match=".cls"):
        _ = roll.last
    with pytest.raises(InputError, match="at least 2 rows"):
        roll.plot(torch.ones(1, 8, 8))
    roll.plot(torch.ones(5, 8, 8))  # more images than examples drawn: the first ones
    with pytest.raises(InputError, match="0..1"):
        roll.plot(examples=[3])
