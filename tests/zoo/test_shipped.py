"""Every shipped model loads offline and its card's numbers reproduce from the shipped weights.

References are independent of hookscope where possible: test images from scikit-learn's own
``load_digits`` and ``train_test_split``; attention patterns from Hugging Face's eager
attention (``output_attentions=True``); induction targets found by brute force; heads
zeroed with a plain torch pre-hook on the attention output projection.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import hookscope as hs
from hookscope.addresses import AttentionHead
from hookscope.data.induction import induction_tensors
from hookscope.errors import InputError, ModelLoadError
from hookscope.zoo import induction as zi
from hookscope.zoo.shipped import (
    SHIPPED,
    WEIGHTS_DIR,
    build_module,
    card,
    checkpoint_path,
    checkpoints,
    load_shipped,
)

DIGITS = ("digits-mlp", "digits-cnn", "digits-vit")


def test_offline_mode_is_on():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


# ---------------------------------------------------------------- registry and cards


def test_registry_matches_the_weights_folder():
    assert sorted(SHIPPED) == sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.is_dir())


def test_artifacts_are_small_safetensors_and_json_only():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".safetensors", ".json"}
    assert sum(p.stat().st_size for p in files) < 10 * 2**20


@pytest.mark.parametrize("name", SHIPPED)
def test_card_fields(name):
    c = card(name)
    assert c["name"] == name
    assert f"hookscope/zoo/weights/{name}" in c["source"] and c["command"] in c["source"]
    assert c["command"].startswith("python -m hookscope.zoo.train_")
    assert isinstance(c["seed"], int) and isinstance(c["metrics"], dict) and c["known"]
    module = build_module(c["build"])
    n = sum(p.numel() for p in module.parameters())
    assert f"{n / 1000:.0f}k params" in c["size"] or f"{n / 1000:.1f}k params" in c["size"]
    steps = checkpoints(name)
    assert steps == sorted(steps)


@pytest.mark.parametrize("name", SHIPPED)
def test_loads_offline_as_hooked_model(name):
    model = load_shipped(name)
    assert isinstance(model, hs.HookedModel)
    expected = {"tiny-induction": "gpt_neox", "digits-mlp": "mlp", "digits-cnn": "cnn"}
    assert model.adapter.name == expected.get(name, "vit")
    assert card(name)["architecture"].split(" ")[0] == model.adapter.name
    assert not model.model.training


def test_unknown_name_and_step_name_the_choices():
    with pytest.raises(ModelLoadError, match=r"tiny-induction.*Did you mean 'digits-cnn'"):
        load_shipped("digits-cn")
    with pytest.raises(ModelLoadError, match="shipped models"):
        card("nope")
    with pytest.raises(InputError, match=r"saved steps: 0, 1, 2, 4"):
        load_shipped("digits-mlp", checkpoint=3)
    with pytest.raises(InputError, match="final weights only"):
        load_shipped("tiny-induction", checkpoint=10)


def test_architecture_records_are_checked():
    with pytest.raises(ModelLoadError, match="unknown layer 'Conv9d'"):
        build_module({"kind": "sequential", "layers": [["Conv9d", {}]]})
    with pytest.raises(ModelLoadError, match="unknown build kind"):
        build_module({"kind": "rnn"})


# ---------------------------------------------------------------- digits models


@pytest.fixture(scope="module")
def digits_test():
    """The held-out split rebuilt from scikit-learn directly (not through hookscope.data)."""
    sk = load_digits()
    _, test = train_test_split(
        np.arange(len(sk.target)), test_size=0.25, random_state=0, stratify=sk.target
    )
    test = np.sort(test)
    X = torch.from_numpy(sk.images[test].astype(np.float32) / 16).unsqueeze(1)
    return X, torch.from_numpy(sk.target[test]).long()


def _correct(model: hs.HookedModel, X, y) -> int:
    with torch.no_grad():
        return int((model(X).argmax(-1) == y).sum())


@pytest.mark.parametrize("name", DIGITS)
def test_digits_accuracy_reproduces_exactly(name, digits_test):
    X, y = digits_test
    c = card(name)
    correct = _correct(load_shipped(name), X, y)
    assert c["metrics"]["n_test"] == len(y) == 450
    assert c["metrics"]["test_accuracy"] == correct / len(y)
    assert correct / len(y) >= 0.95
    assert f"{correct / len(y):.4f}" in c["known"]


@pytest.mark.parametrize("name", DIGITS)
def test_digits_trajectory(name, digits_test):
    X, y = digits_test
    steps = checkpoints(name)
    assert steps[0] == 0 and len(steps) >= 8
    assert steps[1:-1] == [2**i for i in range(len(steps) - 2)]  # log-spaced
    trajectory = {e["step"]: e["test_accuracy"] for e in card(name)["metrics"]["trajectory"]}
    assert sorted(trajectory) == steps
    first, last = (_correct(load_shipped(name, s), X, y) / len(y) for s in (steps[0], steps[-1]))
    assert first == trajectory[steps[0]] and last == trajectory[steps[-1]]
    assert first < 0.5 < 0.95 <= last
    # the last step is the final weights; every checkpoint file exists and loads
    assert checkpoint_path(name, steps[-1]) == checkpoint_path(name)
    mid = load_shipped(name, steps[len(steps) // 2])
    assert _correct(mid, X, y) / len(y) == trajectory[steps[len(steps) // 2]]
    for s in steps:
        assert checkpoint_path(name, s).is_file()


@pytest.mark.parametrize("name", DIGITS)
def test_digits_step0_is_the_seeded_initialisation(name):
    """The fixed seed is real: step 0 equals a fresh build under the card's seed."""
    c = card(name)
    torch.manual_seed(c["seed"])
    fresh = build_module(c["build"]).state_dict()
    shipped = load_shipped(name, checkpoint=0).model.state_dict()
    assert fresh.keys() == shipped.keys()
    assert all(torch.equal(fresh[k], shipped[k]) for k in fresh)


# ---------------------------------------------------------------- tiny-induction


@pytest.fixture(scope="module")
def ind_card():
    return card("tiny-induction")


@pytest.fixture(scope="module")
def ind_batch(ind_card):
    d = ind_card["data"]
    return induction_tensors(
        d["eval"]["n"],
        d["vocab_size"],
        tuple(d["prefix_len"]),
        d["n_repeats"],
        seed=d["eval"]["seed"],
        bos=d["bos"],
        seq_len=d["seq_len"],
    )


@pytest.fixture(scope="module")
def hf_eager():
    """The shipped folder loaded by Hugging Face itself, eager attention."""
    from transformers import GPTNeoXForCausalLM

    folder = WEIGHTS_DIR / "tiny-induction"
    model = GPTNeoXForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    stored = set(load_file(str(folder / "model.safetensors")))
    if not stored <= set(model.state_dict()):
        pytest.skip(
            "this transformers' own loader names GPT-NeoX's output embedding differently from "
            f"the shipped file ({sorted(stored - set(model.state_dict()))}) and leaves it "
            "random; hookscope's loader maps the name (hf_compat.renamed_state)"
        )
    return model


@pytest.fixture(scope="module")
def ind_model():
    return load_shipped("tiny-induction")


def _brute_force_scores(hf, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Induction / previous-token scores from HF attentions, targets found by scanning."""
    with torch.no_grad():
        att = torch.stack(hf(batch.tokens, output_attentions=True).attentions)  # [l, b, h, d, s]
    ind, n_ind = torch.zeros(att.shape[0], att.shape[2], dtype=torch.float64), 0
    for b, row in enumerate(batch.tokens.tolist()):
        for t in range(int(batch.repeat_start[b]), int(batch.repeat_end[b])):
            j = max(i for i in range(t) if row[i] == row[t])  # most recent earlier occurrence
            ind += att[:, b, :, t, j + 1].double()
            n_ind += 1
    pos = torch.arange(1, att.shape[-1])
    prev = att[..., pos, pos - 1].double().mean(dim=(1, 3))
    return ind / n_ind, prev


def test_hf_folder_equals_shipped_loader(hf_eager, ind_model, ind_batch):
    tokens = ind_batch.tokens[:8]
    with torch.no_grad():
        torch.testing.assert_close(ind_model(tokens), hf_eager(tokens).logits, atol=1e-4, rtol=0)


def test_induction_scores_reproduce(hf_eager, ind_model, ind_batch, ind_card):
    m = ind_card["metrics"]
    ind_ref, prev_ref = _brute_force_scores(hf_eager, ind_batch)
    card_ind = torch.tensor(m["induction_scores"], dtype=torch.float64)
    card_prev = torch.tensor(m["previous_token_scores"], dtype=torch.float64)
    torch.testing.assert_close(card_ind, ind_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(card_prev, prev_ref, atol=1e-5, rtol=0)
    ind, prev = zi.head_scores(ind_model, ind_batch)
    torch.testing.assert_close(ind, card_ind, atol=1e-5, rtol=0)
    torch.testing.assert_close(prev, card_prev, atol=1e-5, rtol=0)
    small = ind_batch[:50]
    both = zi.head_scores(ind_model, small)
    assert torch.equal(zi.induction_scores(ind_model, small), both[0])
    chunked = zi.previous_token_scores(ind_model, small, batch_size=7)  # pooled over chunks
    torch.testing.assert_close(chunked, both[1], atol=1e-9, rtol=0)
    assert both[0].shape == both[1].shape == (2, 4)


def test_chance_levels_by_hand(ind_batch, ind_card):
    dest = [
        t
        for b in range(len(ind_batch))
        for t in range(int(ind_batch.repeat_start[b]), int(ind_batch.repeat_end[b]))
    ]
    ind_chance = sum(1 / (t + 1) for t in dest) / len(dest)
    seq = ind_batch.tokens.shape[1]
    prev_chance = sum(1 / (t + 1) for t in range(1, seq)) / (seq - 1)
    m = ind_card["metrics"]
    assert m["induction_chance"] == pytest.approx(ind_chance, abs=1e-12)
    assert m["previous_token_chance"] == pytest.approx(prev_chance, abs=1e-12)


def test_circuit_heads_are_real_induction_and_previous_token_heads(ind_card):
    m = ind_card["metrics"]
    ind = torch.tensor(m["induction_scores"])
    prev = torch.tensor(m["previous_token_scores"])
    th = m["thresholds"]
    ind_heads = [
        f"head.{la}.{h}" for la in range(1, 2) for h in range(4) if ind[la, h] >= th["induction"]
    ]
    prev_heads = [f"head.0.{h}" for h in range(4) if prev[0, h] >= th["previous_token"]]
    assert m["induction_heads"] == ind_heads and m["previous_token_heads"] == prev_heads
    assert ind_heads and prev_heads
    # far above the uniform-attention chance levels
    for h in ind_heads:
        la, he = map(int, h.split(".")[1:])
        assert ind[la, he] > 0.8 > 10 * m["induction_chance"]
        assert f"{la}.{he}" in ind_card["known"]
    for h in prev_heads:
        he = int(h.split(".")[2])
        assert prev[0, he] > 0.8 > 5 * m["previous_token_chance"]
        assert f"0.{he}" in ind_card["known"]


def _repeat_loss_by_hand(hf, batch, heads) -> float:
    """Cross-entropy on the repeated part with ``heads`` zeroed by plain torch pre-hooks."""
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    handles = []
    for layer, head in heads:

        def zero(module, args, head=head):
            x = args[0].clone()
            x[..., head * d_head : (head + 1) * d_head] = 0
            return (x,)

        dense = hf.gpt_neox.layers[layer].attention.dense
        handles.append(dense.register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            logits = hf(batch.tokens).logits
    finally:
        for h in handles:
            h.remove()
    # predicting repeated token t+1 from repeated token t, positions listed row by row
    rows, pos = [], []
    for b, L in enumerate(batch.prefix_len.tolist()):
        rows += [b] * (L - 1)
        pos += list(range(1 + L, 2 * L))
    rows, pos = torch.tensor(rows), torch.tensor(pos)
    loss = F.cross_entropy(logits[rows, pos].double(), batch.tokens[rows, pos + 1])
    return loss.item()


def _heads(names):
    return [tuple(map(int, n.split(".")[1:])) for n in names]


def test_ablation_claims_reproduce(hf_eager, ind_model, ind_batch, ind_card):
    m = ind_card["metrics"]
    circuit = _heads(m["previous_token_heads"] + m["induction_heads"])
    control = _heads([m["control_head"]])
    clean = _repeat_loss_by_hand(hf_eager, ind_batch, [])
    zeroed = _repeat_loss_by_hand(hf_eager, ind_batch, circuit)
    ctrl = _repeat_loss_by_hand(hf_eager, ind_batch, control)
    assert clean == pytest.approx(m["repeat_loss_clean"], abs=1e-4)
    assert zeroed == pytest.approx(m["repeat_loss_circuit_zeroed"], abs=1e-4)
    assert ctrl == pytest.approx(m["repeat_loss_control_zeroed"], abs=1e-4)
    # hookscope's own ablation path agrees with the hand-made hooks
    assert zi.repeat_loss(ind_model, ind_batch, zi.zero_heads(circuit)) == pytest.approx(
        zeroed, abs=1e-4
    )
    # the claims: in-context copying works, zeroing the circuit destroys it (back to about a
    # uniform guess over the vocabulary), zeroing an unrelated head barely matters
    uniform = math.log(ind_card["data"]["vocab_size"])
    assert m["uniform_loss"] == pytest.approx(uniform)
    assert clean < 0.1 * uniform
    assert zeroed > 0.9 * uniform
    assert ctrl - clean < 0.15 * (zeroed - clean)
    assert control[0] not in circuit


def test_per_head_ablation_table(ind_model, ind_batch, ind_card):
    m = ind_card["metrics"]
    table = torch.tensor(m["repeat_loss_head_zeroed"], dtype=torch.float64)
    layer, head = _heads(m["previous_token_heads"])[0]
    one = zi.repeat_loss(ind_model, ind_batch, zi.zero_heads([(layer, head)]))
    assert one == pytest.approx(float(table[layer, head]), abs=1e-6)
    assert table.shape == (2, 4) and float(table.max()) == float(table[layer, head])


def test_measurements_equal_plain_torch(hf_eager, ind_model, ind_batch, ind_card):
    """zoo.induction measures through the library (patterns from run_with_cache, zero
    ablation from interventions.ablate, also as a sweep over head.*.*): equal to the plain
    torch references above to 1e-6, pooled over uneven chunks."""
    m = ind_card["metrics"]
    circuit = _heads(m["previous_token_heads"] + m["induction_heads"])
    batch = ind_batch[:300]
    ind_ref, prev_ref = _brute_force_scores(hf_eager, batch)
    ind, prev = zi.head_scores(ind_model, batch, batch_size=128)
    torch.testing.assert_close(ind, ind_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(prev, prev_ref, atol=1e-6, rtol=0)
    for heads in ([], circuit):
        expected = _repeat_loss_by_hand(hf_eager, batch, heads)
        got = zi.repeat_loss(ind_model, batch, heads, batch_size=128)
        assert got == pytest.approx(expected, abs=1e-6), heads
    table = zi.head_zeroed_losses(ind_model, batch, batch_size=128)
    by_hand = [
        [_repeat_loss_by_hand(hf_eager, batch, [(la, he)]) for he in range(4)] for la in range(2)
    ]
    torch.testing.assert_close(table, torch.tensor(by_hand, dtype=torch.float64), atol=1e-6, rtol=0)


def test_repeat_loss_sites(ind_model, ind_batch):
    """Heads to zero as (layer, head) pairs, zero_heads' addresses or a selection agree."""
    batch = ind_batch[:64]
    layer_1 = [(1, h) for h in range(4)]
    pairs = zi.repeat_loss(ind_model, batch, layer_1)
    assert zi.zero_heads(layer_1) == [AttentionHead(1, h) for h in range(4)]
    assert zi.repeat_loss(ind_model, batch, zi.zero_heads(layer_1)) == pairs
    assert zi.repeat_loss(ind_model, batch, "head.1.*") == pairs
    assert zi.repeat_loss(ind_model, batch) < pairs
    short = induction_tensors(4, 10, (1, 1), seq_len=6)
    with pytest.raises(InputError, match="no repeated tokens to predict"):
        zi.repeat_loss(ind_model, short)
    with pytest.raises(InputError, match="no repeated tokens to predict"):
        zi.head_zeroed_losses(ind_model, short)


def test_induction_circuit_report(ind_model, ind_batch, ind_card):
    report = zi.induction_circuit(ind_model, ind_batch[:200])
    d = report.to_dict()
    assert d["induction_heads"] == ind_card["metrics"]["induction_heads"]
    assert json.loads(json.dumps(d)) == d
    frame = report.to_pandas()
    assert len(frame) == 8 and set(frame["role"]) >= {"induction", "previous-token", "control"}
    assert "repeat loss: clean" in str(report)


def test_scoring_rejects_bad_input(ind_model):
    with pytest.raises(InputError, match="InductionBatch"):
        zi.induction_scores(ind_model, torch.zeros(2, 5, dtype=torch.long))
    digits = load_shipped("digits-mlp")
    with pytest.raises(InputError, match="no attention heads"):
        zi.previous_token_scores(digits, induction_tensors(2, 10, (2, 3)))


def test_card_json_is_what_card_returns():
    for name in SHIPPED:
        with Path(WEIGHTS_DIR / name / "card.json").open() as f:
            assert json.load(f) == card(name)
