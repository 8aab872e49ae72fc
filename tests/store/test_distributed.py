"""Data-parallel extraction under ``torchrun`` (2 CPU processes, gloo) against a
single-process extraction through the Python API: every site tensor bitwise equal
(torch.equal), the index and columns equal, the statistics equal to 1e-12; a rank killed by
SIGKILL resumes; a resume with another number of processes and per-node folders without a
shared filesystem are handled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

import hookscope as hs
from hookscope.store import ActivationStore

import builders

REPO = Path(__file__).resolve().parents[2]
SITES = ["resid_post.*", "attn_out.0", "head.1.*"]
TEXTS = [c[: 6 + 4 * i] for i, c in enumerate(builders.CORPUS * 5)][:23]  # 23 lengths
BATCH = 4  # 6 batches: rank 0 takes examples 0-11, rank 1 examples 12-22

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    builders.tiny_neox(0).save_pretrained(root / "model")
    builders.make_tokenizer().save_pretrained(root / "model")
    ds = datasets.Dataset.from_dict({"text": TEXTS, "label": [i % 3 for i in range(len(TEXTS))]})
    ds.save_to_disk(str(root / "data"))
    return root


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """Single-process extractions through the Python API (default shard size: one shard)."""
    model = hs.HookedModel.from_pretrained(str(files / "model"))
    data = datasets.load_from_disk(str(files / "data"))
    store = ActivationStore(tmp_path_factory.mktemp("reference"))
    return {
        p: store.extract(model, data, SITES, p, batch_size=BATCH, progress=False)
        for p in ("last", "all")
    }


def _env() -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # gloo on CPU, whatever the machine has
    )


def _args(files: Path, out: Path, positions: str) -> list[str]:
    return [
        "store", "extract", "--model", str(files / "model"), "--data", str(files / "data"),
        "--sites", *SITES, "--positions", positions, "--batch-size", str(BATCH),
        "--shard-size", "3K", "--out", str(out), "--no-progress",
    ]  # fmt: skip


def _torchrun(entry: list[str], args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), *entry, *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _entry(out: Path, key: str):
    acts = ActivationStore(out)._complete(key)
    assert acts is not None, f"no complete entry {key[:12]} in {out}"
    return acts


def _assert_equal(acts, ref) -> None:
    assert acts.key == ref.key and acts.sites == ref.sites and len(acts) == len(ref)
    for site in ref.sites:
        assert torch.equal(acts[site], ref[site]), site
    assert acts.index.equals(ref.index)
    assert acts.columns.equals(ref.columns)
    for site in ref.sites:
        a, b = acts.stats(site), ref.stats(site)
        assert a.n == b.n
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.covariance(), b.covariance(), rtol=0, atol=1e-12)
        for name, value in b.norms().items():
            assert abs(a.norms()[name] - value) <= 1e-12, (site, name)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_torchrun_two_processes_is_bitwise_equal_to_one(positions, files, reference, tmp_path):
    out = tmp_path / "acts"
    proc = _torchrun(["-m", "hookscope"], _args(files, out, positions))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = reference[positions]
    acts = _entry(out, ref.key)
    _assert_equal(acts, ref)
    assert acts.manifest["world_size"] == 2
    ranks = [s["rank"] for s in acts.shards]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1}  # each rank wrote its own shards
    if positions == "all":
        assert ranks.count(0) > 1 and ranks.count(1) > 1  # several shards per rank
    assert all(s["examples"][0] >= 12 for s in acts.shards if s["rank"] == 1)
    assert proc.stdout.count("StoredActivations") == 1  # rank 0 prints the result


KILLER = """
import os, signal, sys
from hookscope import cli
from hookscope.store import files

write_json = files.write_json

def killing(path, value):
    write_json(path, value)
    if path.name == "rank001.json" and len(value.get("done", {})) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # right after rank 1 recorded its first shard

files.write_json = killing
sys.exit(cli.main())
"""


def test_rank_killed_then_resumed(files, reference, tmp_path):
    out = tmp_path / "acts"
    args = _args(files, out, "all")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = _torchrun([str(killer)], args)
    assert proc.returncode != 0
    ref = reference["all"]
    entry = out / "entries" / ref.key[:20]
    assert not (entry / "manifest.json").exists()
    state = json.loads((entry / "rank001.json").read_text())
    assert list(state["done"]) == ["0"] and len(state["plan"]) > 1  # killed mid-rank
    first = entry / state["done"]["0"]["file"]
    stamp = first.stat().st_mtime_ns, first.stat().st_ino

    # another number of processes: a clear StoreError, exit 2, no traceback
    single = subprocess.run(
        [sys.executable, "-m", "hookscope", *args], env=_env(), capture_output=True, text=True
    )
    assert single.returncode == 2, single.stderr
    assert "ran with 2 process(es)" in single.stderr and "this call has 1" in single.stderr
    assert "Traceback" not in single.stderr
    assert not (entry / "manifest.json").exists()

    proc = _torchrun(["-m", "hookscope"], args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_equal(_entry(out, ref.key), ref)
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp  # not recomputed


def test_nodes_without_a_shared_filesystem_then_merge(files, reference, tmp_path):
    """Two "nodes" (one process each) whose --out folders differ, as on machines without a
    shared filesystem: each finishes its rank and says so (exit 0); merge completes it."""
    nodes = tmp_path / "nodes"
    args = _args(files, nodes / "NODE", "last")
    script = " ".join(f"'{a}'" for a in args).replace("NODE", "node'$RANK'")
    proc = _torchrun(["--no-python", "sh", "-c", f"exec '{sys.executable}' -m hookscope {script}"], [])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranks 1 of this 2-process extraction wrote their files elsewhere" in proc.stderr
    assert "ranks 0 of this 2-process extraction wrote their files elsewhere" in proc.stderr
    assert "hookscope store merge" in proc.stderr and "Traceback" not in proc.stderr
    ref = reference["last"]
    merged = tmp_path / "merged"
    from hookscope import cli

    assert (
        cli.main(["store", "merge", str(merged), str(nodes / "node1"), str(nodes / "node0")]) == 0
    )
    acts = _entry(merged, ref.key)
    _assert_equal(acts, ref)
    assert acts.manifest["world_size"] == 2 and ActivationStore(merged).verify().ok
