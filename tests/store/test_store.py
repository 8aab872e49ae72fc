"""ActivationStore: values against independent forwards, keys, positions, statistics, errors.

References: Hugging Face's own ``output_hidden_states`` on each example alone (no padding),
the model's forward on the same padded batch for bitwise dtype checks, numpy on the
materialised rows, and counted forwards / tokenizer calls.
"""

from __future__ import annotations

import hashlib
import json

import datasets
import numpy as np
import pytest
import torch

import hookscope as hs
from hookscope.inputs import tokenize
from hookscope.store import ActivationStore, StoreError
from hookscope.store import files as store_files

import builders

TEXTS = builders.CORPUS * 5  # 25 texts of different lengths


@pytest.fixture(scope="module")
def model():
    return hs.HookedModel.wrap(builders.tiny_gpt2(), builders.make_tokenizer())


@pytest.fixture(scope="module")
def data():
    n = len(TEXTS)
    return datasets.Dataset.from_dict(
        {"text": TEXTS, "label": [i % 3 for i in range(n)], "pos": [[1, 2]] * n}
    )


@pytest.fixture()
def store(tmp_path):
    return ActivationStore(tmp_path / "acts")


def _hidden(model, text):
    """[n_layers + 1, pos, d] hidden states of one example alone, from Hugging Face."""
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0], ids[0]


def _extract(store, model, data, **kw):
    kw.setdefault("sites", ["resid_post.*", "head.1.*", "neuron.0"])
    kw.setdefault("batch_size", 4)
    kw.setdefault("shard_bytes", 30_000)  # several shards
    kw.setdefault("progress", False)
    return store.extract(model, data, **kw)


def count_forwards(model):
    calls = []
    handle = model.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("positions", ["last", "all", "mean", 2, [0, -1], "pos"])
def test_rows_equal_hugging_face_per_example(store, model, data, positions):
    acts = _extract(store, model, data, positions=positions)
    assert len(acts.shards) > 1
    x = acts["resid_post.0"]
    ref, examples, pos, toks = [], [], [], []
    for e, text in enumerate(TEXTS):
        h, ids = _hidden(model, text)
        r = h[1]  # Hugging Face's hidden_states[1]: block 0's output, this example alone
        n = len(ids)
        if positions == "last":
            want = [n - 1]
        elif positions == "all":
            want = list(range(n))
        elif positions == 2:
            want = [2]
        elif positions == [0, -1]:
            want = [0, n - 1]
        elif positions == "pos":
            want = [1, 2]
        if positions == "mean":
            ref.append(r.mean(0, keepdim=True))
            examples.append(e)
            continue
        ref.append(r[want])
        examples += [e] * len(want)
        pos += want
        toks += ids[want].tolist()
    ref = torch.cat(ref)
    torch.testing.assert_close(x, ref, atol=2e-5, rtol=1e-5)
    index = acts.index
    assert index["example"].tolist() == examples
    if positions != "mean":
        assert index["position"].tolist() == pos and index["token"].tolist() == toks
    labels = acts.columns["label"].tolist()
    assert labels == [e % 3 for e in examples]


def test_resid_post_matches_hf_hidden_states(store, model, data):
    """GPT-2's hidden_states[l + 1] is resid_post.l for every layer but the last (where
    Hugging Face applies ln_f first)."""
    acts = _extract(store, model, data, positions="all", sites="resid_post.0")
    got = acts["resid_post.0"]
    ref = torch.cat([_hidden(model, t)[0][1] for t in TEXTS])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert got.shape[0] == sum(len(model.tokenizer(t)["input_ids"]) for t in TEXTS)  # no padding


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_storage_dtypes_round_trip_exactly(store, model, data, dtype):
    acts = _extract(store, model, data, positions="last", dtype=dtype, batch_size=len(TEXTS))
    x = acts["head.1.2"]
    assert x.dtype == getattr(torch, dtype) and x.shape == (len(TEXTS), 16)
    enc = tokenize(model.tokenizer, TEXTS)  # the same padded batch the extraction ran
    _, cache = model.run_with_cache(enc, names="head.1.2")
    last = enc["attention_mask"].sum(1) - 1
    ref = cache["head.1.2"][torch.arange(len(TEXTS)), last].to(getattr(torch, dtype))
    assert torch.equal(x, ref)


def test_per_head_and_neuron_shapes(store, model, data):
    acts = _extract(store, model, data, sites=["head.1", "neuron.0.5"], positions="last")
    assert acts["head.1"].shape == (len(TEXTS), 4, 16)
    assert acts["neuron.0.5"].shape == (len(TEXTS),)
    torch.testing.assert_close(acts["head.1"][:, 2], acts.rows(slice(None))["head.1"][:, 2])


def test_statistics_equal_numpy_on_the_stored_rows(store, model, data):
    acts = _extract(store, model, data, positions="all", dtype="float16")
    for site in ("resid_post.1", "neuron.0"):
        x = acts[site].double().numpy()
        st = acts.stats(site)
        assert st.n == x.shape[0]
        np.testing.assert_allclose(st.mean.numpy(), x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            st.covariance().numpy(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-10
        )
        norms = np.linalg.norm(x, axis=1)
        assert st.norms()["mean"] == pytest.approx(norms.mean(), rel=1e-10)


def test_loader_visits_every_row_once(store, model, data):
    acts = _extract(store, model, data, positions="all")
    x, labels = acts["resid_post.0"], torch.tensor(acts.columns["label"].to_numpy())
    seen, order = [], []
    for batch in acts.loader(["resid_post.0", "label"], batch_size=37, shuffle=True, seed=3):
        seen.append(batch["resid_post.0"])
        order.append(batch["label"])
    got = torch.cat(seen)
    perm = torch.from_numpy(np.random.default_rng(3).permutation(len(acts)))
    assert torch.equal(got, x[perm]) and torch.equal(torch.cat(order), labels[perm])
    again = torch.cat(
        [b["resid_post.0"] for b in acts.loader("resid_post.0", 37, shuffle=True, seed=3)]
    )
    assert torch.equal(again, got)
    plain = torch.cat([b["resid_post.0"] for b in acts.loader("resid_post.0", 50)])
    assert torch.equal(plain, x)


def test_rows_subset_is_lazy_and_aligned(store, model, data):
    acts = _extract(store, model, data, positions="all")
    sub = acts.rows(slice(10, 40, 3))
    assert torch.equal(sub["neuron.0"], acts["neuron.0"][10:40:3])
    assert sub.index["example"].tolist() == acts.index["example"].tolist()[10:40:3]
    picked = acts.rows([5, 1, 7])
    assert torch.equal(picked["resid_post.1"], acts["resid_post.1"][[5, 1, 7]])


def test_one_shard_reads_are_zero_copy_and_copy_on_write(store, model, data):
    acts = _extract(store, model, data, positions="last", shard_bytes=10**9)
    assert len(acts.shards) == 1
    a, b = acts["resid_post.0"], acts["resid_post.0"]
    before = a.clone()
    a.mul_(0)  # changes this process's mapping only
    fresh = store.get(model, data, sites=["resid_post.*", "head.1.*", "neuron.0"], positions="last")
    assert torch.equal(fresh["resid_post.0"], before) and store.verify().ok
    assert b.untyped_storage().data_ptr() != before.untyped_storage().data_ptr()


def test_vision_models_store_per_image_and_per_token(store):
    cnn = hs.zoo.load("digits-cnn")
    ds = hs.data.digits("test").select(range(40))
    acts = store.extract(
        cnn,
        ds,
        sites=["neuron.0", "resid_post.1"],
        positions="image",
        batch_size=16,
        progress=False,
    )
    x = torch.from_numpy(np.stack(ds["image"])).float().unsqueeze(1)
    _, cache = cnn.run_with_cache(x, names=["neuron.0", "resid_post.1"])
    torch.testing.assert_close(acts["neuron.0"], cache["neuron.0"], atol=1e-6, rtol=0)
    assert acts.columns["label"].tolist() == ds["label"]
    vit = hs.zoo.load("digits-vit")
    acts = store.extract(
        vit, ds, sites="resid_post.0", positions="all", batch_size=16, progress=False
    )
    _, cache = vit.run_with_cache(x, names="resid_post.0")
    ref = cache["resid_post.0"].reshape(-1, cache["resid_post.0"].shape[-1])
    torch.testing.assert_close(acts["resid_post.0"], ref, atol=1e-5, rtol=0)
    assert acts.index["example"].tolist() == np.repeat(np.arange(40), 17).tolist()


# ------------------------------------------------------------------ keys


def test_get_runs_no_forward_and_extract_again_is_free(store, model, data):
    _extract(store, model, data, positions="last")
    calls, handle = count_forwards(model)
    try:
        acts = store.get(
            model, data, sites=["resid_post.*", "head.1.*", "neuron.0"], positions="last"
        )
        again = _extract(store, model, data, positions="last")
    finally:
        handle.remove()
    assert calls == [] and acts.key == again.key


def test_every_input_of_the_key_makes_a_new_entry(store, model, data):
    base = _extract(store, model, data, positions="last")
    variants = [
        dict(positions="mean"),
        dict(positions="last", dtype="float16"),
        dict(positions="last", sites=["resid_post.*"]),
        dict(positions="last", template="Q: {text}"),
        dict(positions="last", max_length=8),
        dict(positions="last", split="test"),
    ]
    keys = {base.key}
    for kw in variants:
        keys.add(_extract(store, model, data, **kw).key)
    changed = data.map(
        lambda r, i: {"text": r["text"] + ("!" if i == 3 else "")}, with_indices=True
    )
    keys.add(_extract(store, model, changed, positions="last").key)
    assert len(keys) == len(variants) + 2
    assert len(store.list()) == len(keys)


def test_a_different_model_cannot_read_another_models_entry(store, model, data):
    """By construction: the key hashes every weight, so one changed weight is a new key."""
    _extract(store, model, data, positions="last")
    other = hs.HookedModel.wrap(builders.tiny_gpt2(), model.tokenizer)
    with torch.no_grad():
        other.model.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-3
    with pytest.raises(StoreError, match="no complete entry"):
        store.get(other, data, sites=["resid_post.*", "head.1.*", "neuron.0"], positions="last")


def test_manifest_records_everything(store, model, data):
    acts = _extract(store, model, data, positions="all", dtype="bfloat16")
    m = json.loads((acts.folder / "manifest.json").read_text())
    f = m["key_fields"]
    assert f["format_version"] == 1 and f["dtype"] == "bfloat16" and f["positions"] == "all"
    assert f["preprocessing"]["tokenizer"]["vocab_sha256"]
    assert set(m["versions"]) >= {"hookscope", "torch", "transformers", "pyarrow"}
    state = model.model.state_dict()
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert f["model"] == h.hexdigest()  # the weights themselves, never a revision name
    for shard in m["shards"]:
        path = acts.folder / shard["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        assert path.stat().st_size == shard["bytes"]
    kinds = {p.suffix for p in acts.folder.iterdir()}
    assert kinds <= {".json", ".arrow", ".safetensors"}  # nothing pickled
    opened = datasets.Dataset.from_file(str(acts.folder / m["shards"][0]["file"]))
    assert opened.num_rows == m["shards"][0]["rows"]


def test_shards_respect_the_size_bound(store, model, data):
    acts = _extract(store, model, data, positions="all", shard_bytes=60_000, batch_size=2)
    row_bytes = (64 + 64 + 4 * 16 + 256) * 4
    for shard in acts.shards:
        assert (
            shard["rows"] * row_bytes <= 60_000 or shard["examples"][1] - shard["examples"][0] <= 2
        )


# ------------------------------------------------------------------ errors


def test_bad_inputs_name_the_problem(store, model, data, tmp_path):
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path / "notastore")
    cases = [
        (dict(sites="resid_post.9"), "layer 9 out of range"),
        (dict(sites="head.1.2.pattern"), "attention pattern"),
        (dict(text_column="sentence"), "text column 'sentence' is not in the dataset"),
        (dict(positions=40), "position 40 is beyond example"),
        (dict(positions="first"), "neither a policy nor a dataset column"),
        (dict(dtype="fp16"), "dtype must be one of float32, float16, bfloat16"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(template="no placeholder"), "template must be a string containing"),
    ]
    for kw, message in cases:
        calls, handle = count_forwards(model)
        try:
            with pytest.raises(StoreError, match=message):
                _extract(store, model, data, **kw)
        finally:
            handle.remove()
        assert calls == [], kw  # refused before any forward
    with pytest.raises(StoreError, match="data must be a datasets.Dataset"):
        _extract(store, model, {"text": TEXTS})


def test_newer_format_is_refused(store, model, data):
    acts = _extract(store, model, data, positions="last")
    path = acts.folder / "manifest.json"
    m = json.loads(path.read_text())
    m["format_version"] = 99
    store_files.write_json(path, m)
    with pytest.raises(StoreError, match="store format 99, newer than this hookscope reads"):
        store.get(model, data, sites=["resid_post.*", "head.1.*", "neuron.0"], positions="last")
    marker = store.folder / "hookscope-store.json"
    store_files.write_json(marker, {"format": "hookscope-store", "version": 7})
    with pytest.raises(StoreError, match="newer than this hookscope reads"):
        ActivationStore(store.folder)


def test_lookups_name_the_choices(store, model, data):
    acts = _extract(store, model, data, positions="last")
    with pytest.raises(StoreError, match="not stored in this entry.*Did you mean 'resid_post.1'"):
        acts["resid_post.11"]
    with pytest.raises(StoreError, match="neither a stored site nor a dataset column"):
        next(iter(acts.loader(["labels"])))
    with pytest.raises(StoreError, match="matches 0 entries"):
        store.delete("ffffffff")
    store.delete(acts.key[:8])
    assert store.list() == []


def test_a_column_of_token_ids_needs_no_tokenizer(store):
    """Pre-tokenised rows (hs.data.induction's ``tokens``) on a model without a tokenizer:
    each row's last and every real position equal a forward of that row alone."""
    model = hs.zoo.load("tiny-induction")
    assert model.tokenizer is None
    ds = hs.data.induction(12, vocab_size=model.model.config.vocab_size, seed=3)
    ds = ds.map(lambda r, i: {"tokens": r["tokens"][: 20 + i]}, with_indices=True)  # ragged
    last = store.extract(
        model,
        ds,
        sites="resid_post.1",
        positions="last",
        text_column="tokens",
        batch_size=5,
        progress=False,
    )
    every = store.extract(
        model,
        ds,
        sites="resid_post.1",
        positions="all",
        text_column="tokens",
        batch_size=5,
        progress=False,
    )
    rows = []
    for i, ids in enumerate(ds["tokens"]):
        _, cache = model.run_with_cache(torch.tensor([ids]), names="resid_post.1")
        torch.testing.assert_close(last["resid_post.1"][i], cache["resid_post.1"][0, -1])
        rows.append(cache["resid_post.1"][0])
    torch.testing.assert_close(every["resid_post.1"], torch.cat(rows))
    assert every.index["token"].tolist() == [t for ids in ds["tokens"] for t in ids]
    assert last.manifest["key_fields"]["preprocessing"]["tokenizer"] == "token ids"
    with pytest.raises(StoreError, match="holds token ids; a template applies to text only"):
        store.extract(model, ds, sites="resid_post.1", text_column="tokens", template="x {text}")
    with pytest.raises(StoreError, match="has no tokenizer.*token ids"):
        store.extract(model, datasets.Dataset.from_dict({"text": ["a b"]}), sites="resid_post.1")
