"""Attribution on a real pretrained language model (after `make models`; skipped otherwise)."""

import pytest
import torch
from captum.attr import LayerIntegratedGradients

import hookscope as hs
from hookscope import attribution as at


@pytest.mark.optional_model
def test_smollm2_integrated_gradients_and_rollout():
    try:
        model = hs.zoo.load("smollm2-135m")
    except hs.ModelLoadError:
        pytest.skip("smollm2-135m is not installed (make models)")
    hf = model.model
    ids = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    mary = model.to_single_token(" Mary")
    embed = hf.get_input_embeddings()
    base = embed.weight[0].detach().expand(ids.shape[1], -1)
    ours = at.integrated_gradients(model, ids, target=mary, n_steps=16, baseline=base)
    lig = LayerIntegratedGradients(lambda i: hf(i).logits[:, -1, mary], embed)
    ref, delta = lig.attribute(ids, n_steps=16, return_convergence_delta=True)
    torch.testing.assert_close(ours.values, ref.sum(-1), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(ours.delta, delta, atol=1e-4, rtol=1e-3)
    assert "Mary" in ours.html()
    roll = at.attention_rollout(model, ids)
    torch.testing.assert_close(roll.matrix.sum(-1), torch.ones_like(roll.matrix.sum(-1)))
    assert int(roll.query[0]) == ids.shape[1] - 1
