"""``hookscope store extract / ls / verify / merge`` in process, each result checked against
the Python API's own extraction (torch.equal), and every mistake a one-line error, exit 2."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch

import hookscope as hs
from hookscope import cli
from hookscope.errors import StoreError
from hookscope.store import ActivationStore
from hookscope.store import store as store_module

import builders

SITES = ["resid_post.*", "head.1.*"]
TEXTS = [c[: 7 + 5 * i] for i, c in enumerate(builders.CORPUS * 3)][:13]  # 13 lengths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_neox")
    builders.tiny_neox(0).save_pretrained(folder)
    builders.make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return hs.HookedModel.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def dataset():
    return datasets.Dataset.from_dict({"text": TEXTS, "label": list(range(len(TEXTS)))})


@pytest.fixture(scope="module")
def data_dir(dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "ds"
    dataset.save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def reference(model, dataset, tmp_path_factory):
    """The Python API's single-process extraction, by positions policy."""
    store = ActivationStore(tmp_path_factory.mktemp("reference"))
    return {
        p: store.extract(model, dataset, SITES, p, batch_size=4, progress=False)
        for p in ("last", "all")
    }


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_same(acts, ref):
    assert acts.key == ref.key and acts.sites == ref.sites
    for site in ref.sites:
        assert torch.equal(acts[site], ref[site]), site
    assert acts.index.equals(ref.index)
    assert acts.columns.equals(ref.columns)


def _extract_argv(model_dir, data, out, positions="last", *extra):
    return [
        "store", "extract", "--model", str(model_dir), "--data", str(data), "--sites", *SITES,
        "--positions", positions, "--batch-size", "4", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("positions", ["last", "all"])
def test_extract_from_saved_dataset_equals_the_api(
    positions, model_dir, data_dir, reference, tmp_path, capsys
):
    out = tmp_path / "acts"
    argv = _extract_argv(model_dir, data_dir, out, positions, "--shard-size", "2K")
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    ref = reference[positions]
    assert f"StoredActivations {ref.key[:12]}" in stdout
    assert stdout.strip().splitlines()[-1] == f"wrote {out / 'entries' / ref.key[:20]}"
    acts = ActivationStore(out)._complete(ref.key)  # the CLI's entry has the API's key
    _assert_same(acts, ref)
    assert len(acts.shards) > 1  # --shard-size 2K split it; the reference is one shard
    for site in ref.sites:
        a, b = acts.stats(site), ref.stats(site)
        assert torch.allclose(a.mean, b.mean, rtol=0, atol=1e-12)
        assert torch.allclose(a.covariance(), b.covariance(), rtol=0, atol=1e-12)
    # the same command again finds the complete entry
    assert _run(argv, capsys)[0] == 0


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_extract_from_data_files(suffix, model_dir, dataset, reference, tmp_path, capsys):
    path = tmp_path / f"data{suffix}"
    {".jsonl": dataset.to_json, ".csv": dataset.to_csv, ".parquet": dataset.to_parquet}[suffix](
        str(path)
    )
    code, _, err = _run(_extract_argv(model_dir, path, tmp_path / "acts"), capsys)
    assert code == 0, err
    ref = reference["last"]
    (entry,) = ActivationStore(tmp_path / "acts").list()
    acts = ActivationStore(tmp_path / "acts")._complete(entry["key"])
    for site in ref.sites:
        assert torch.equal(acts[site], ref[site]), site
    assert acts.column("label").tolist() == list(range(len(TEXTS)))


def test_extract_task_data_options(model_dir, model, tmp_path, capsys):
    """ioi:N with its own text column, --positions as a list, --dtype, --max-length."""
    argv = [
        "store", "extract", "--model", str(model_dir), "--data", "ioi:6", "--sites", "embed,attn_out.0",
        "--positions", "0,-1", "--dtype", "bfloat16", "--max-length", "12", "--batch-size", "4",
        "--split", "test", "--out", str(tmp_path / "acts"), "--no-progress",
    ]  # fmt: skip
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    ds = hs.data.ioi(model.tokenizer, 6)
    ref = ActivationStore(tmp_path / "ref").extract(
        model, ds, ["embed", "attn_out.0"], [0, -1], text_column="clean", dtype="bfloat16",
        max_length=12, split="test", batch_size=4, progress=False,
    )  # fmt: skip
    acts = ActivationStore(tmp_path / "acts")._complete(ref.key)
    assert acts is not None and acts.manifest["key_fields"]["dataset"]["split"] == "test"
    assert acts["embed"].dtype == torch.bfloat16 and len(acts) == 12
    for site in ref.sites:
        assert torch.equal(acts[site], ref[site]), site


def test_extract_vision_zoo_model(tmp_path, capsys):
    argv = [
        "store", "extract", "--model", "digits-mlp", "--data", "digits:test",
        "--sites", "resid_post.0", "--out", str(tmp_path / "acts"), "--no-progress",
    ]  # fmt: skip
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    model = hs.zoo.load("digits-mlp")
    images = hs.data.digits("test")
    ref = ActivationStore(tmp_path / "ref").extract(
        model, images, "resid_post.0", "image", progress=False
    )
    acts = ActivationStore(tmp_path / "acts")._complete(ref.key)
    assert acts is not None and len(acts) == len(images)
    assert torch.equal(acts["resid_post.0"], ref["resid_post.0"])
    # and an independent reference: the model's own forward over the first batch of 32
    _, cache = model.run_with_cache(torch.tensor(images["image"][:32]), names=["resid_post.0"])
    assert torch.equal(acts["resid_post.0"][:32], cache["resid_post.0"])


def test_ls_and_verify(reference, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(reference["all"].folder.parent.parent, folder)
    code, out, _ = _run(["store", "ls", str(folder)], capsys)
    assert code == 0
    assert repr(ActivationStore(folder).list()) == out.strip()
    for ref in reference.values():
        assert ref.key[:12] in out
    assert out.count("complete") == 2
    code, out, _ = _run(["store", "verify", str(folder)], capsys)
    assert code == 0 and out.startswith("store verified: 2 files")
    shard = folder / "entries" / reference["all"].key[:20] / reference["all"].shards[0]["file"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, _ = _run(["store", "verify", str(folder)], capsys)
    assert code == 1
    assert f"{shard}: sha256 differs" in out


def _node_folders(model, dataset, tmp_path, monkeypatch):
    """What two nodes without a shared filesystem leave: extraction as rank 0 and as rank 1
    of a 2-process group, each into its own folder."""
    folders = []
    for rank in (0, 1):
        monkeypatch.setattr(store_module, "_dist", lambda r=rank: (r, 2, lambda: None))
        folder = tmp_path / f"node{rank}"
        with pytest.raises(StoreError, match="wrote their files elsewhere") as err:
            ActivationStore(folder).extract(model, dataset, SITES, "all", batch_size=4, progress=False)  # fmt: skip
        assert err.value.ranks_here == [rank]
        folders.append(folder)
    monkeypatch.undo()
    return folders


def test_merge_per_node_folders(model, dataset, reference, tmp_path, monkeypatch, capsys):
    node0, node1 = _node_folders(model, dataset, tmp_path, monkeypatch)
    ref = reference["all"]
    entry = f"entries/{ref.key[:20]}"
    assert not (node0 / entry / "manifest.json").exists()
    assert (node0 / entry / "columns.arrow").exists()  # rank 0's node writes the columns
    assert not list((node1 / entry).glob("rank000*"))
    code, out, err = _run(["store", "merge", str(tmp_path / "merged"), str(node0), str(node1)], capsys)  # fmt: skip
    assert code == 0, err
    assert f"{ref.key[:12]}  merged ranks 0-1 from 2 folder(s)" in out
    acts = ActivationStore(tmp_path / "merged").get(model, dataset, SITES, "all")
    _assert_same(acts, ref)
    assert [s["rank"] for s in acts.shards] == [0, 1] and acts.manifest["world_size"] == 2
    assert acts.manifest["merged_from"] == sorted([str(node0.resolve()), str(node1.resolve())])
    for site in ref.sites:
        assert torch.allclose(acts.stats(site).covariance(), ref.stats(site).covariance(), rtol=0, atol=1e-12)  # fmt: skip
    # hard links: no bytes copied
    shard = acts.folder / acts.shards[1]["file"]
    assert shard.samefile(node1 / entry / acts.shards[1]["file"])
    assert ActivationStore(tmp_path / "merged").verify().ok
    # an input holding the whole entry is taken alone
    both = tmp_path / "both"
    code, _, err = _run(["store", "merge", str(both), str(node0), str(ref.folder.parent.parent), str(node1)], capsys)  # fmt: skip
    assert code == 0, err
    again = ActivationStore(both).get(model, dataset, SITES, "all")
    _assert_same(again, ref)
    assert again.manifest["merged_from"] == [str(ref.folder.parent.parent.resolve())]
    assert again.manifest["world_size"] == 1
    # again: nothing to do; into node0's own folder (an input too) with copies
    assert "already complete" in _run(["store", "merge", str(tmp_path / "merged"), str(node1)], capsys)[1]  # fmt: skip
    code, out, err = _run(["store", "merge", "--copy", str(node0), str(node0), str(node1)], capsys)
    assert code == 0, err
    _assert_same(ActivationStore(node0).get(model, dataset, SITES, "all"), ref)
    assert not (node0 / entry / acts.shards[1]["file"]).samefile(shard)  # --copy


def test_merge_refuses_incomplete_overlapping_or_mismatched_nodes(
    model, dataset, tmp_path, monkeypatch, capsys
):
    node0, node1 = _node_folders(model, dataset, tmp_path, monkeypatch)
    out = tmp_path / "merged"

    def error(*inputs):
        code, stdout, err = _run(["store", "merge", str(out), *map(str, inputs)], capsys)
        assert code == 2 and stdout == "" and err.count("\n") == 1, err
        assert not (out / "entries").exists() or not any((out / "entries").iterdir())
        return err

    assert "rank(s) [1] are in none of the inputs" in error(node0)
    assert "rank(s) [0] are in none of the inputs" in error(node1)
    twin = tmp_path / "twin"
    shutil.copytree(node1, twin)
    assert "rank 1 is in both" in error(node0, node1, twin)
    (entry,) = (twin / "entries").iterdir()
    state = json.loads((entry / "rank001.json").read_text())
    state["settings"]["batch_size"] = 8
    (entry / "rank001.json").write_text(json.dumps(state))
    assert "ran with batch_size=8, rank 0 with 4" in error(node0, twin)
    shard = next(entry.glob("rank001-shard*.arrow"))
    shard.write_bytes(shard.read_bytes()[:-10])
    state["settings"]["batch_size"] = 4
    (entry / "rank001.json").write_text(json.dumps(state))
    assert f"{shard}: {shard.stat().st_size} bytes" in error(node0, twin)
    assert "is not an activation store" in error(node0, tmp_path / "nowhere")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tiny-indction"], "neither a zoo model nor a folder"),
        (["--data", "agreemnt:5"], "Did you mean 'agreement'?"),
        (["--data", "ioi:x"], "needs a positive number of rows"),
        (["--data", "agreement:5"], "agreement needs single-token verbs"),  # InputError
        (["--data", "nowhere/data.txt"], "neither a path nor task data"),
        (["--sites", "resid_post.9"], "sites:"),  # StoreError
        (["--text-column", "txt"], "text column 'txt' is not in the dataset"),
        (["--positions", "5"], "position 5 is beyond example"),
        (["--positions", "first"], "positions='first' is neither a policy"),
        (["--dtype", "float8"], "invalid choice 'float8'"),
        (["--shard-size", "0"], "must be at least 1 byte"),
        (["--batch-size", "0"], "must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, model_dir, data_dir, tmp_path, capsys):
    base = {"--model": str(model_dir), "--data": str(data_dir), "--sites": "resid_post.0"}
    base.update({"--positions": "last", "--out": str(tmp_path / "acts")})
    args = dict(base, **dict(zip(argv[::2], argv[1::2], strict=True)))
    code, out, err = _run(["store", "extract", *sum(args.items(), ()), "--no-progress"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("hookscope: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def test_bad_store_folders(model_dir, data_dir, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    for argv in (
        ["store", "ls", str(tmp_path / "missing")],
        ["store", "verify", str(tmp_path / "plain")],
    ):
        code, _, err = _run(argv, capsys)
        assert code == 2 and "is not an activation store" in err
    assert not (tmp_path / "missing").exists()  # ls never creates a store
    code, _, err = _run(
        [
            "store",
            "extract",
            "--model",
            str(model_dir),
            "--data",
            str(data_dir),
            "--sites",
            "embed",
            "--out",
            str(tmp_path / "plain"),
        ],  # fmt: skip
        capsys,
    )
    assert code == 2 and "not an activation store" in err
    assert _run(["store"], capsys)[0] == 2
    code, out, _ = _run(["store", "extract", "--help"], capsys)
    assert code == 0 and "agreement:N" in out and ".parquet" in out
