"""Exports of a store entry, read back by the other tools' own readers (datasets, pyarrow,
pandas, SAELens' layout) and compared value for value with ``acts[site]``."""

from __future__ import annotations

import gc
import json
import os

import datasets
import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
import torch

import hookscope as hs
from hookscope.addresses import parse
from hookscope.store import ActivationStore, StoredActivations, StoreError, files
from hookscope.store.export import bfloat16_from_bits, transformer_lens_name

import builders

CONTEXT = 8  # max_length: every corpus text has at least 11 tokens, so all contexts are 8
D_MODEL, N_HEADS = 32, 4
SITES = ["resid_post.*", "head.1"]
N_TEXTS = 20


@pytest.fixture(scope="module")
def model():
    hf = builders.pythia_like(
        0,
        hidden_size=D_MODEL,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        intermediate_size=64,
        vocab_size=400,
    )
    return hs.HookedModel.wrap(hf, builders.make_tokenizer())


@pytest.fixture(scope="module")
def data():
    texts = (builders.CORPUS * 4)[:N_TEXTS]
    return datasets.Dataset.from_dict(
        {
            "text": texts,
            "label": [i % 3 for i in range(N_TEXTS)],
            "source": [f"doc{i}" for i in range(N_TEXTS)],
        }
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ActivationStore(tmp_path_factory.mktemp("export_store"))


def _extract(store, model, data, dtype, **kw):
    kw = {"sites": SITES, "positions": "all", "max_length": CONTEXT, **kw}
    return store.extract(model, data, dtype=dtype, batch_size=8, progress=False, **kw)


@pytest.fixture(scope="module")
def f32(store, model, data):
    acts = _extract(store, model, data, "float32", shard_bytes=1)  # one shard per batch
    assert len(acts.shards) == 3
    return acts


@pytest.fixture(scope="module")
def f16(store, model, data):
    return _extract(store, model, data, "float16")


@pytest.fixture(scope="module")
def bf16(store, model, data):
    return _extract(store, model, data, "bfloat16", shard_bytes=1)


@pytest.fixture(scope="module")
def entries(f32, f16, bf16):
    return {"float32": f32, "float16": f16, "bfloat16": bf16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so NaN / -0.0 compare exactly too."""
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(_bits(actual.contiguous()), _bits(expected.contiguous()))


def _array2d(ds: datasets.Dataset, column: str) -> torch.Tensor:
    """An Array2D column exactly as stored (datasets' torch format widens float16)."""
    storage = ds.data.column(column).combine_chunks().storage
    values = storage.flatten().flatten().to_numpy()
    return torch.from_numpy(np.array(values)).reshape(len(ds), *ds.features[column].shape)


def _from_storage(values: np.ndarray, dtype: str, shape) -> torch.Tensor:
    """uint16 bits -> bfloat16; everything else as is."""
    t = torch.from_numpy(np.array(values))  # a writable copy
    if dtype == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.reshape(len(values), *shape)


# ---------------------------------------------------------------------- to_dataset


def test_to_dataset_maps_the_shard_files(f32):
    from datasets.table import MemoryMappedTable

    ds = f32.to_dataset()
    assert [c["filename"] for c in ds.cache_files] == [
        str(f32.folder / s["file"]) for s in f32.shards
    ]
    # every block holding activations is a memory map of a shard; only the dataset's own
    # columns (one small value per row) live in memory
    for row in ds.data.blocks:
        for block in row:
            if any(name in f32.sites for name in block.column_names):
                assert isinstance(block, MemoryMappedTable)
    assert ds.column_names[: len(f32.sites)] == f32.sites
    table = ds.with_format("numpy")[:]
    for site in f32.sites:
        _same(_from_storage(table[site], "float32", f32.manifest["site_shapes"][site]), f32[site])
    for name in ("example", "position", "token"):
        np.testing.assert_array_equal(table[f"__{name}"], f32.index[name].to_numpy())
    np.testing.assert_array_equal(table["label"], f32.column("label"))
    np.testing.assert_array_equal(table["source"], f32.column("source"))
    assert len(ds) == len(f32) == N_TEXTS * CONTEXT


def test_to_dataset_does_not_read_the_activations(tmp_path):
    """A 96 MiB shard opens in a few MiB of memory: the dataset maps the file."""
    rows, width = 3 * 2**13, 1024  # 96 MiB of float32
    values = torch.randn(rows, width)
    column = files.to_arrow(values, "float32", (width,))
    files.write_shard(tmp_path / "s.arrow", {"x": column}, {"__example": np.arange(rows)})
    expected = values[[0, rows // 2, rows - 1]].clone()
    del values, column
    gc.collect()
    manifest = {
        "key": "0" * 64,
        "sites": ["x"],
        "site_shapes": {"x": [width]},
        "dtype": "float32",
        "shards": [{"file": "s.arrow", "rows": rows}],
    }
    acts = StoredActivations(tmp_path, manifest)
    before = psutil.Process().memory_info().rss
    ds = acts.to_dataset()
    grown = psutil.Process().memory_info().rss - before
    assert grown < 16 * 2**20, f"to_dataset grew the RSS by {grown / 2**20:.1f} MiB"
    picked = ds.with_format("numpy")[[0, rows // 2, rows - 1]]["x"]
    _same(torch.from_numpy(picked), expected)


def test_to_dataset_bfloat16_is_uint16_bits(bf16):
    ds = bf16.to_dataset()
    assert ds.features["resid_post.0"] == datasets.Sequence(
        datasets.Value("uint16"), length=D_MODEL
    )
    arrow = ds.with_format("arrow")[:]
    for site in bf16.sites:
        shape = bf16.manifest["site_shapes"][site]
        values = arrow.column(site).combine_chunks().flatten().to_numpy()
        assert values.dtype == np.uint16
        _same(_from_storage(values.reshape(len(bf16), -1), "bfloat16", shape), bf16[site])
    # datasets' torch format widens uint16 to int64; bfloat16_from_bits reads either
    widened = ds.with_format("torch")[:]["resid_post.1"]
    assert widened.dtype == torch.int64
    _same(bfloat16_from_bits(widened), bf16["resid_post.1"])
    _same(bfloat16_from_bits(values).reshape(bf16["head.1"].shape), bf16["head.1"])
    with pytest.raises(StoreError, match="integer bit patterns"):
        bfloat16_from_bits(torch.zeros(3))


def test_to_dataset_of_a_row_subset(f32):
    sub = f32.rows([150, 7, 0, 63, 64, 7])  # out of order, repeated, across shards
    ds = sub.to_dataset()
    assert len(ds) == 6
    table = ds.with_format("numpy")[:]
    _same(torch.from_numpy(table["resid_post.1"]), sub["resid_post.1"])
    np.testing.assert_array_equal(table["source"], sub.column("source"))
    np.testing.assert_array_equal(table["__position"], sub.index["position"].to_numpy())
    contiguous = f32.rows(slice(60, 70)).to_dataset()  # a slice stays a view of the files
    _same(
        torch.from_numpy(contiguous.with_format("numpy")[:]["resid_post.0"]),
        f32["resid_post.0"][60:70],
    )


# ---------------------------------------------------------------------- to_parquet


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_to_parquet_values_bitwise_in_bounded_row_groups(entries, dtype, tmp_path):
    acts = entries[dtype]
    path = tmp_path / "acts.parquet"
    row_bytes = sum(int(np.prod(acts.manifest["site_shapes"][s])) for s in acts.sites) * (
        4 if dtype == "float32" else 2
    )
    out = acts.to_parquet(path, row_group_bytes=row_bytes * 24)  # 24 rows per group
    assert out == path and sorted(os.listdir(tmp_path)) == ["acts.parquet"]
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == -(-len(acts) // 24)
    assert all(meta.row_group(i).num_rows <= 24 for i in range(meta.num_row_groups))
    table = pq.read_table(path)
    for site in acts.sites:
        field = table.schema.field(site)
        assert field.metadata[b"hookscope.dtype"] == dtype.encode()
        shape = json.loads(field.metadata[b"hookscope.shape"])
        assert shape == acts.manifest["site_shapes"][site]
        values = table.column(site).combine_chunks().flatten().to_numpy()
        _same(_from_storage(values.reshape(len(acts), -1), dtype, shape), acts[site])
    for name in ("example", "position", "token"):
        np.testing.assert_array_equal(table.column(f"__{name}").to_numpy(), acts.index[name])
    frame = pd.read_parquet(path)
    np.testing.assert_array_equal(frame["label"].to_numpy(), acts.column("label"))
    assert list(frame["source"]) == list(acts.column("source"))
    assert len(frame) == len(acts)


def test_to_parquet_of_some_sites_and_rows(f32, tmp_path):
    sub = f32.rows(slice(50, 90))  # crosses a shard boundary
    sub.to_parquet(tmp_path / "sub.parquet", "resid_post.1")
    table = pq.read_table(tmp_path / "sub.parquet")
    assert table.column_names == [
        "resid_post.1", "__example", "__position", "__token", "label", "source",
    ]  # fmt: skip
    values = table.column("resid_post.1").combine_chunks().flatten().to_numpy()
    _same(torch.from_numpy(values.reshape(40, D_MODEL)), f32["resid_post.1"][50:90])
    np.testing.assert_array_equal(table.column("label").to_numpy(), sub.column("label"))
    with pytest.raises(StoreError, match="not stored"):
        f32.to_parquet(tmp_path / "x.parquet", ["resid_post.7"])


def test_to_parquet_failure_leaves_the_old_file(f32, tmp_path, monkeypatch):
    path = tmp_path / "acts.parquet"
    path.write_bytes(b"old")
    calls = []

    def fail_on_second(self, table, row_group_size=None):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, table, row_group_size=row_group_size)

    original = pq.ParquetWriter.write_table
    monkeypatch.setattr(pq.ParquetWriter, "write_table", fail_on_second)
    with pytest.raises(StoreError, match="no space left"):
        f32.to_parquet(path, row_group_bytes=1024)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["acts.parquet"]  # no temporary left behind


# ---------------------------------------------------------------------- SAELens layout


def _saelens_features(hooks: dict[str, int], dtype: str) -> datasets.Features:
    """The features SAELens' CacheActivationsRunner builds (sae_lens/cache_activations_runner.py)."""
    feats = {h: datasets.Array2D(shape=(CONTEXT, d), dtype=dtype) for h, d in hooks.items()}
    feats["token_ids"] = datasets.Sequence(datasets.Value(dtype="int32"), length=CONTEXT)
    return datasets.Features(feats)


HOOKS = {
    "resid_post.0": "blocks.0.hook_resid_post",
    "resid_post.1": "blocks.1.hook_resid_post",
    "head.1": "blocks.1.attn.hook_z",
}


def test_to_saelens_layout_and_values(f32, tmp_path):
    out = f32.to_saelens(tmp_path / "cached", file_bytes=6 * CONTEXT * 3 * D_MODEL * 4)
    state = json.loads((out / "state.json").read_text())
    assert [f["filename"] for f in state["_data_files"]] == [
        f"data-{i:05d}-of-00004.arrow" for i in range(4)
    ]  # 6 contexts a file, 20 contexts
    assert sorted(os.listdir(tmp_path)) == ["cached"]
    ds = datasets.load_from_disk(str(out))  # what SAELens' ActivationsStore calls
    assert ds.features == _saelens_features(dict.fromkeys(HOOKS.values(), D_MODEL), "float32")
    assert len(ds) == N_TEXTS
    # SAELens' reader: torch format, one hook and token_ids, a slice of contexts
    ds.set_format(type="torch", columns=[HOOKS["resid_post.1"], "token_ids"], dtype=torch.float32)
    batch = ds[4:12]
    assert batch[HOOKS["resid_post.1"]].shape == (8, CONTEXT, D_MODEL)
    ds.reset_format()
    whole = ds.with_format("torch")[:]
    for site, hook in HOOKS.items():
        _same(whole[hook].reshape(len(f32), -1), f32[site].reshape(len(f32), -1))
    tokens = f32.index["token"].to_numpy().reshape(N_TEXTS, CONTEXT)
    np.testing.assert_array_equal(whole["token_ids"].numpy(), tokens)


def test_to_saelens_dtypes(f16, bf16, tmp_path):
    half = datasets.load_from_disk(str(f16.to_saelens(tmp_path / "f16", sites=["resid_post.0"])))
    assert half.features == _saelens_features({"blocks.0.hook_resid_post": D_MODEL}, "float16")
    _same(_array2d(half, "blocks.0.hook_resid_post").reshape(-1, D_MODEL), f16["resid_post.0"])
    brain = datasets.load_from_disk(str(bf16.to_saelens(tmp_path / "bf16", sites="resid_post.1")))
    assert brain.features == _saelens_features({"blocks.1.hook_resid_post": D_MODEL}, "float32")
    got = _array2d(brain, "blocks.1.hook_resid_post").reshape(-1, D_MODEL)
    _same(got, bf16["resid_post.1"].float())  # widening is exact


def test_to_saelens_hook_names_and_whole_context_subsets(f32, tmp_path):
    sub = f32.rows(slice(2 * CONTEXT, 5 * CONTEXT))  # contexts 2, 3, 4
    out = sub.to_saelens(tmp_path / "named", {"resid_post.1": "mine"}, sites=["resid_post.1"])
    ds = datasets.load_from_disk(str(out)).with_format("torch")
    assert ds.column_names == ["mine", "token_ids"]
    _same(ds[:]["mine"].reshape(-1, D_MODEL), f32["resid_post.1"][2 * CONTEXT : 5 * CONTEXT])


def test_to_saelens_refuses_what_saelens_cannot_read(store, model, data, f32, tmp_path):
    last = store.extract(model, data, sites=["resid_post.0"], positions="last", progress=False)
    with pytest.raises(StoreError, match="positions='all'"):
        last.to_saelens(tmp_path / "a")
    ragged = store.extract(model, data, sites=["resid_post.0"], positions="all", progress=False)
    with pytest.raises(StoreError, match="same number of tokens.*11 to 20.*max_length"):
        ragged.to_saelens(tmp_path / "b")
    with pytest.raises(StoreError, match="whole contexts"):
        f32.rows(slice(3, 3 + 2 * CONTEXT)).to_saelens(tmp_path / "c")
    with pytest.raises(StoreError, match="not stored"):
        f32.to_saelens(tmp_path / "d", {"resid_post.9": "x"})
    with pytest.raises(StoreError, match="distinct"):
        f32.to_saelens(tmp_path / "e", {"resid_post.0": "x", "resid_post.1": "x"})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an empty folder"):
        f32.to_saelens(tmp_path / "full")
    assert sorted(os.listdir(tmp_path)) == ["full"]  # nothing half-written anywhere
    assert os.listdir(tmp_path / "full") == ["keep.txt"]


def test_transformer_lens_names():
    # TransformerLens' own hook names (HookedTransformer.hook_dict), written out
    expected = {
        "resid_pre.0": "blocks.0.hook_resid_pre",
        "resid_mid.2": "blocks.2.hook_resid_mid",
        "resid_post.3": "blocks.3.hook_resid_post",
        "attn_out.1": "blocks.1.hook_attn_out",
        "mlp_out.1": "blocks.1.hook_mlp_out",
        "head.3": "blocks.3.attn.hook_z",
        "head.3.q": "blocks.3.attn.hook_q",
        "head.3.k": "blocks.3.attn.hook_k",
        "head.3.v": "blocks.3.attn.hook_v",
        "head.3.result": "blocks.3.attn.hook_result",
        "neuron.2": "blocks.2.mlp.hook_post",
        "neuron.2.pre": "blocks.2.mlp.hook_pre",
        "embed": "hook_embed",
        "final_norm": "ln_final.hook_normalized",
    }
    for site, name in expected.items():
        assert transformer_lens_name(site) == name
        assert parse(name) == parse(site)  # the grammar reads it back
    with pytest.raises(StoreError, match="hook_names="):
        transformer_lens_name("head.3.1")  # one head: TransformerLens hooks all heads at once


# ---------------------------------------------------------------------- SAELens itself


def test_saelens_trains_on_the_export(f32, tmp_path):
    """SAELens' own ActivationsStore reads the export, and its own trainer fits an SAE on it.

    Skipped where SAELens is absent: it is not a dev dependency, since every release either
    caps transformer-lens below 4 (6.51.2 on) or imports transformer_lens.HookedTransformer,
    which transformer-lens 4 removed (6.51.1 and older). Checked by hand in a scratch venv
    with sae-lens 6.54.12 and transformer-lens 3.9.0."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer

    out = f32.to_saelens(tmp_path / "cached", sites=["resid_post.1"])
    hook = "blocks.1.hook_resid_post"
    store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None,
        context_size=CONTEXT, d_in=D_MODEL, n_batches_in_buffer=4, total_training_tokens=320,
        store_batch_size_prompts=4, train_batch_size_tokens=16, prepend_bos=False,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32",
        cached_activations_path=str(out),
    )  # fmt: skip
    acts, tokens = store.get_raw_llm_batch()
    _same(acts, f32["resid_post.1"][: 4 * CONTEXT])
    np.testing.assert_array_equal(tokens.long().numpy(), f32.index["token"][: 4 * CONTEXT])

    torch.manual_seed(0)
    sae = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=64))
    start = sae.W_enc.detach().clone()
    config = SAETrainerConfig(
        total_training_samples=160,
        train_batch_size_samples=16,
        lr_end=3e-5,
        n_batches_for_norm_estimate=2,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trained = SAETrainer(cfg=config, sae=sae, data_provider=store).fit()
    assert trained.W_enc.shape == (D_MODEL, 64)
    assert torch.isfinite(trained.W_enc).all() and not torch.equal(trained.W_enc, start)
