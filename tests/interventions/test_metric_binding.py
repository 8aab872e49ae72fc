"""Metrics given token strings, and metric checks against the model before a sweep.

A metric's answer tokens may be text (``iv.logit_diff(" Mary", " John")``): a sweep binds
the metric to its model, resolving each string to its one token with the model's
tokenizer. The results must equal the same sweep with the ids the tokenizer gives, and the
ids read must be the tokenizer's (checked against the logits by hand).
"""

import pytest
import torch

import hookscope as hs
from hookscope import interventions as iv

import builders


@pytest.fixture(scope="module")
def model():
    return hs.HookedModel.wrap(builders.tiny_neox(), tokenizer=builders.make_tokenizer())


def _id(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is not one token of the test tokenizer"
    return ids[0]


PROMPTS = ["When Mary and John went to the store, John gave a drink to", "When Mary and John"]


def test_bound_text_metric_reads_the_tokenizers_ids(model):
    mary, john = _id(model.tokenizer, " Mary"), _id(model.tokenizer, " John")
    assert mary != john
    tokens = model.to_tokens(PROMPTS[:1])
    logits = model(tokens)
    bound = iv.logit_diff(" Mary", " John").bind(model)
    expected = logits[0, -1, mary] - logits[0, -1, john]  # by hand
    torch.testing.assert_close(bound(logits), expected, atol=0, rtol=0)
    per_row = iv.logit([" Mary", " John"], position=-1).bind(model)
    two = model.to_tokens(PROMPTS[:1] * 2)
    out = model(two)
    torch.testing.assert_close(
        per_row.per_example(out), torch.stack([out[0, -1, mary], out[1, -1, john]])
    )
    assert iv.prob(" Mary").bind(model)(logits) == logits[0, -1].softmax(-1)[mary]


@pytest.mark.parametrize("sweep", ["activation_patching", "attribution_patching"])
def test_sweep_with_text_metric_equals_sweep_with_ids(model, sweep):
    mary, john = _id(model.tokenizer, " Mary"), _id(model.tokenizer, " John")
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = model.to_tokens("When Mary and John went to the park, Mary gave a drink to")
    assert clean.shape == corrupted.shape
    run = getattr(iv, sweep)
    by_text = run(model, clean, corrupted, iv.logit_diff(" Mary", " John"), "head.*.*",
                  progress=False)  # fmt: skip
    by_ids = run(model, clean, corrupted, iv.logit_diff(mary, john), "head.*.*", progress=False)
    torch.testing.assert_close(by_text.scores, by_ids.scores, atol=0, rtol=0)
    assert by_text.baselines == by_ids.baselines


def test_ablate_and_knockout_with_text_metric_equal_ids(model):
    mary, john = _id(model.tokenizer, " Mary"), _id(model.tokenizer, " John")
    tokens = model.to_tokens(PROMPTS[:1] * 2)
    text, ids = iv.logit_diff(" Mary", " John"), iv.logit_diff(mary, john)
    a = iv.ablate(model, tokens, "head.*.*", metric=text, progress=False)
    b = iv.ablate(model, tokens, "head.*.*", metric=ids, progress=False)
    torch.testing.assert_close(a.scores, b.scores, atol=0, rtol=0)
    k1 = iv.knockout(model, tokens, "head.*.*", text, keep=["head.0.1"], method="zero")
    k2 = iv.knockout(model, tokens, "head.*.*", ids, keep=["head.0.1"], method="zero")
    assert k1.faithfulness == k2.faithfulness


def test_padded_texts_with_text_metric(model):
    """Prompts of different token lengths: the bound metric reads each row's last token."""
    mary = _id(model.tokenizer, " Mary")
    tokens = model.to_tokens(PROMPTS)
    lengths = torch.tensor([len(model.to_tokens(p)[0]) for p in PROMPTS])
    res = iv.ablate(model, PROMPTS, "head.0.1", metric=iv.logit(" Mary"), progress=False)
    with torch.no_grad():
        logits = model(tokens)
    expected = logits[torch.arange(2), lengths - 1, mary].mean()
    assert abs(res.baselines["clean"] - float(expected)) < 1e-5


def test_metric_checks_accept_what_they_should(model):
    """Edge values the checks must let through: the last position, the last id, negative
    positions, per-row tensors, numpy integers."""
    import numpy as np

    logits = model(torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(0)))
    assert iv.logit(499, position=9)(logits) == logits[:, 9, 499].mean()
    assert iv.logit(0, position=-10)(logits) == logits[:, 0, 0].mean()
    assert iv.logit(3, position=np.int64(4))(logits) == logits[:, 4, 3].mean()
    rows = iv.logit_diff(torch.tensor([1, 2]), 3, position=torch.tensor([0, -1]))
    torch.testing.assert_close(
        rows.per_example(logits),
        torch.stack([logits[0, 0, 1] - logits[0, 0, 3], logits[1, -1, 2] - logits[1, -1, 3]]),
    )
    classes = torch.randn(3, 10)
    assert iv.logit(9, position=None)(classes) == classes[:, 9].mean()
