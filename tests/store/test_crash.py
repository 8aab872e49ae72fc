"""Crash safety of the activation store: kill -9 at chosen points, resume, full disks, verify.

A child process (the script below) extracts from a tiny GPT-NeoX saved with save_pretrained,
into many small shards, and stops itself at a chosen point (``HOOKSCOPE_TEST_PAUSE``, read only
by this script: it wraps the store's own calls, nothing in the library knows about it); the
test then kills it with SIGKILL and runs the same extraction again in a fresh child, which
counts its forwards and tokenizer calls. References: an uninterrupted child run (every file of
the entry compared byte for byte), the rank's own record of finished shards (which batches a
resume may compute), and sha256 of the files themselves.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import hookscope as hs
from hookscope.inputs import tokenize
from hookscope.store import ActivationStore, StoredActivations, StoreError
from hookscope.store import extract as store_extract
from hookscope.store import files as store_files
from hookscope.store.stats import load as load_stats

import builders

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [t[: 20 + 7 * i] for i, t in enumerate(builders.CORPUS * 5)][:23]  # different lengths
KW = dict(
    sites=["resid_post.*", "neuron.0"],
    positions="all",
    batch_size=3,
    shard_bytes=1,  # one batch per shard: 8 shards
    dtype="float16",
    progress=False,
)
GET = {k: KW[k] for k in ("sites", "positions", "dtype")}

CHILD = r"""
import json, os, sys, time
from pathlib import Path

import datasets, torch

torch.set_num_threads(min(2, torch.get_num_threads()))  # as the test process (conftest)
import hookscope as hs
from hookscope.store import ActivationStore, files
from hookscope.store import extract as store_extract

model_dir, store_dir, data_path, kw = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
what, _, arg = os.environ.get("HOOKSCOPE_TEST_PAUSE", "").partition(":")


def pause():
    print("PAUSED", flush=True)
    time.sleep(600)
    os._exit(3)


model = hs.HookedModel.from_pretrained(model_dir)
counts = {"forwards": 0, "tokenizer_calls": 0}


def pre_forward(module, args):
    counts["forwards"] += 1
    if what == "forward" and counts["forwards"] == int(arg):
        pause()


model.model.register_forward_pre_hook(pre_forward)
tokenizer_call = type(model.tokenizer).__call__


def counted_call(self, *args, **kwargs):
    counts["tokenizer_calls"] += 1
    return tokenizer_call(self, *args, **kwargs)


type(model.tokenizer).__call__ = counted_call
write_json, atomic_write, replace = files.write_json, files.atomic_write, os.replace
save_stats = store_extract.save


def paused_write_json(path, value):
    if what == "manifest" and Path(path).name == "manifest.json":
        pause()
    write_json(path, value)
    if what == "recorded" and Path(path).name == "rank000.json" and len(value["done"]) == int(arg):
        pause()


def paused_atomic_write(path, write):
    if what == "tokens" and Path(path).name.endswith(".tokens.arrow"):
        pause()
    atomic_write(path, write)


shard_write = store_extract._ShardFile.write


def paused_rows(self, site, row, values):
    if what == "rows" and self.path.name == f"rank000-shard{int(arg):06d}.arrow" and site == 1:
        pause()  # the shard's first site is written, the others not
    return shard_write(self, site, row, values)


def paused_replace(src, dst):
    if what == "rename" and Path(dst).name == f"rank000-shard{int(arg):06d}.arrow":
        pause()
    return replace(src, dst)


def paused_save(stats, path):
    if what == "stats" and Path(path).name.startswith(f"rank000-shard{int(arg):06d}."):
        pause()
    return save_stats(stats, path)


files.write_json, files.atomic_write = paused_write_json, paused_atomic_write
os.replace, store_extract.save = paused_replace, paused_save
store_extract._ShardFile.write = paused_rows
texts = json.loads(Path(data_path).read_text())
ds = datasets.Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(len(texts))]})
acts = ActivationStore(store_dir).extract(model, ds, **kw)
print("RESULT " + json.dumps({**counts, "rows": acts.n_rows}), flush=True)
"""


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("crash")
    builders.tiny_neox(0).save_pretrained(work / "model")
    builders.make_tokenizer().save_pretrained(work / "model")
    (work / "child.py").write_text(CHILD)
    (work / "texts.json").write_text(json.dumps(TEXTS))
    return work


def _data() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": TEXTS, "label": [i % 3 for i in range(len(TEXTS))]})


@pytest.fixture(scope="module")
def model(work):
    return hs.HookedModel.from_pretrained(str(work / "model"))


def _start(work: Path, store: Path, pause: str = "") -> subprocess.Popen:
    env = {**os.environ, "HOOKSCOPE_TEST_PAUSE": pause, "PYTHONPATH": str(ROOT)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(work / "child.py"), str(work / "model"), str(store)]
    cmd += [str(work / "texts.json"), json.dumps(KW)]
    with open(work / f"stderr-{store.name}-{pause.replace(':', '_') or 'run'}.txt", "w") as err:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env
        )


def _line(proc: subprocess.Popen, prefix: str, timeout: float = 300) -> str:
    """The child's first stdout line starting with ``prefix`` (its stderr file on failure)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return line
            if not line and proc.poll() is not None:
                break
    proc.kill()
    logs = "\n".join(p.read_text()[-3000:] for p in Path(proc.args[1]).parent.glob("stderr-*"))
    raise AssertionError(f"the child printed no {prefix!r} line; stderr:\n{logs}")


def _run(work: Path, store: Path) -> dict:
    proc = _start(work, store)
    result = json.loads(_line(proc, "RESULT ")[len("RESULT ") :])
    assert proc.wait(60) == 0
    return result


def _entry(store: Path) -> Path:
    (entry,) = (store / "entries").iterdir()
    return entry


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """An uninterrupted extraction in a child process."""
    store = work / "reference"
    result = _run(work, store)
    assert result["forwards"] == 1 + 8 and result["tokenizer_calls"] == 1  # probe + 8 batches
    return store


def _batches_to_compute(entry: Path) -> tuple[int, int]:
    """(forwards, tokenizer calls) that resuming the entry may run: from its own record."""
    state_path = entry / "rank000.json"
    if not state_path.exists():  # nothing planned yet: everything, tokens included
        n_batches = -(-len(TEXTS) // KW["batch_size"])
        return 1 + n_batches, 1
    state = json.loads(state_path.read_text())
    missing = [s for s in state["plan"] if str(s["index"]) not in state["done"]]
    size = KW["batch_size"]
    return sum(-(-(s["stop"] - s["start"]) // size) for s in missing), 0


def _same_entry(got: Path, want: Path) -> None:
    """Every file byte for byte (the manifest but its creation time), and every tensor."""
    names = sorted(p.name for p in got.iterdir())
    assert names == sorted(p.name for p in want.iterdir())  # no temporary file left
    assert any(n.endswith(".arrow") and "shard" in n for n in names)
    for name in names:
        if name == "manifest.json":
            a, b = (json.loads((d / name).read_text()) for d in (got, want))
            a.pop("created"), b.pop("created")
            assert a == b
        else:
            assert (got / name).read_bytes() == (want / name).read_bytes(), name
    manifest = json.loads((want / "manifest.json").read_text())
    a, b = StoredActivations(got, manifest), StoredActivations(want, manifest)
    for site in a.sites:
        assert torch.equal(a[site], b[site]), site
        sa, sb = a.stats(site).state_dict(), b.stats(site).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), site
    assert a.index.equals(b.index)


# ---------------------------------------------------------------------- kill -9


SLOW = pytest.mark.slow  # each point costs two child processes (~20 s on 2 busy cores)
POINTS = [
    pytest.param("tokens", marks=SLOW),  # while writing the tokens file: nothing planned yet
    "forward:2",  # plan and tokens written, before the first batch (the probe is forward 1)
    "rows:1",  # in the middle of shard 1's rows (its temporary file partly written)
    pytest.param("rename:2", marks=SLOW),  # shard 2 complete and fsynced, not yet renamed
    pytest.param("stats:3", marks=SLOW),  # shard 3 renamed, its statistics not yet written
    "recorded:1",  # right after the first shard was recorded
    "recorded:5",  # after several
    pytest.param("manifest", marks=SLOW),  # every shard recorded, no manifest yet
]


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_then_the_same_call_resumes_bitwise(work, model, reference, point):
    store = work / f"killed-{point.replace(':', '_')}"
    shutil.rmtree(store, ignore_errors=True)
    proc = _start(work, store, point)
    _line(proc, "PAUSED")
    # a reader meanwhile: no complete entry, never a partial shard
    with pytest.raises(StoreError, match="no complete entry"):
        ActivationStore(store).get(model, _data(), **GET)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    entry = _entry(store)
    if point.startswith("rows"):
        assert list(entry.glob(".rank000-shard000001.arrow.*.tmp"))  # killed mid-shard
    forwards, tokenizer_calls = _batches_to_compute(entry)
    assert forwards < 1 + 8 or point in ("tokens", "forward:2")
    with pytest.raises(StoreError, match="no complete entry"):
        ActivationStore(store).get(model, _data(), **GET)
    result = _run(work, store)
    assert result["forwards"] == forwards, point  # exactly the unrecorded shards' batches
    assert result["tokenizer_calls"] == tokenizer_calls, point  # tokens read back
    _same_entry(entry, _entry(reference))
    assert ActivationStore(store).verify().ok


def test_a_concurrent_reader_sees_no_entry_or_all_of_it(work, model, reference):
    store = work / "concurrent"
    shutil.rmtree(store, ignore_errors=True)
    want = StoredActivations(
        _entry(reference), json.loads((_entry(reference) / "manifest.json").read_text())
    )
    proc = _start(work, store)
    seen = {"missing": 0, "complete": 0}
    while True:
        running = proc.poll() is None
        try:
            acts = ActivationStore(store).get(model, _data(), **GET) if store.exists() else None
        except StoreError as err:
            assert "no complete entry" in str(err)
            acts = None
        if acts is None:
            seen["missing"] += 1
        else:
            seen["complete"] += 1
            for site in want.sites:
                assert torch.equal(acts[site], want[site])
        if not running:
            break
        time.sleep(0.01)
    assert proc.wait(60) == 0
    assert seen["missing"] > 0 and seen["complete"] > 0


# ---------------------------------------------------------------------- verify


def test_verify_names_a_corrupted_and_a_truncated_shard(tmp_path, reference, model):
    store = tmp_path / "copy"
    shutil.copytree(reference, store)
    entry = _entry(store)
    shards = sorted(entry.glob("rank000-shard*.arrow"))
    assert ActivationStore(store).verify().ok
    flipped, truncated = shards[2], shards[5]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of a stored activation
    flipped.write_bytes(bytes(data))
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 100)
    report = ActivationStore(store).verify()
    assert not report.ok and len(report) == 2
    assert any(str(flipped) in p and "corrupted" in p for p in report)
    assert any(str(truncated) in p and "truncated" in p for p in report)
    acts = ActivationStore(store).get(model, _data(), **GET)
    with pytest.raises(StoreError, match=f"shard {truncated} cannot be read"):
        acts["resid_post.0"]


# ---------------------------------------------------------------------- full disk


def _temporaries(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.name.endswith(".tmp")]


def _full_on(marker: str, real):
    """``real`` (os.pwrite or os.fsync), failing with ENOSPC on a file whose name holds
    ``marker`` (Linux: the name behind the descriptor)."""

    def call(fd, *args):
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *args)

    return call


def _counted(model):
    calls: list[int] = []
    handle = model.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("where", ["rows", "fsync", "record"])
def test_a_full_disk_is_a_store_error_leaving_the_store_readable(
    tmp_path, model, where, monkeypatch
):
    data = _data()
    store = ActivationStore(tmp_path / "acts")
    other = store.extract(model, data, **{**KW, "dtype": "float32"})  # an existing entry
    before = {s: other[s].clone() for s in other.sites}
    reference = ActivationStore(tmp_path / "reference").extract(model, data, **KW)
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")
    if where == "rows":  # the lowest write of shard 3's rows, in the extracting thread
        monkeypatch.setattr(os, "pwrite", _full_on("shard000003", os.pwrite))
    elif where == "fsync":  # finishing shard 3, in the writer thread
        monkeypatch.setattr(os, "fsync", _full_on("shard000003", os.fsync))
    else:  # recording a finished shard (rank000.json) after the first two
        real = store_files.write_json
        calls = [0]

        def write_json(path, value):
            if Path(path).name == "rank000.json" and len(value["done"]) > 2:
                calls[0] += 1
                raise store_files.write_error(Path(path), OSError(errno.ENOSPC, "full"))
            real(path, value)

        monkeypatch.setattr(store_files, "write_json", write_json)
    with pytest.raises(StoreError, match="no space left on the device.*run the same call again"):
        store.extract(model, data, **KW)
    monkeypatch.undo()
    assert _temporaries(store.folder) == []
    again = ActivationStore(store.folder)  # still a store, the other entry intact
    kept = again.get(model, data, **{**GET, "dtype": "float32"})
    assert all(torch.equal(kept[s], before[s]) for s in before)
    with pytest.raises(StoreError, match="no complete entry"):
        again.get(model, data, **GET)
    assert again.verify().ok  # the shards recorded before the error are whole
    entry = next(p for p in (store.folder / "entries").iterdir() if p.name != other.folder.name)
    forwards, tokenizer_calls = _batches_to_compute(entry)
    assert 0 < forwards < 8
    calls, handle = _counted(model)
    try:
        resumed = again.extract(model, data, **KW)
    finally:
        handle.remove()
    assert len(calls) == forwards
    _same_entry(resumed.folder, reference.folder)


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk_then_more_space_resumes(tmp_path, model, small_tmpfs):
    data = _data()
    reference = ActivationStore(tmp_path / "reference").extract(model, data, **KW)
    store = ActivationStore(small_tmpfs / "acts")
    with pytest.raises(StoreError, match="[Nn]o space left"):
        store.extract(model, data, **KW)
    assert _temporaries(small_tmpfs) == []
    assert ActivationStore(small_tmpfs / "acts").verify().ok
    entry = _entry(small_tmpfs / "acts")
    forwards, _ = _batches_to_compute(entry)
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    calls, handle = _counted(model)
    try:
        resumed = ActivationStore(small_tmpfs / "acts").extract(model, data, **KW)
    finally:
        handle.remove()
    assert len(calls) == forwards
    _same_entry(resumed.folder, reference.folder)


# ---------------------------------------------------------------------- the in-place writer


@pytest.mark.parametrize(
    ("dtype", "positions"), [("float16", "all"), ("bfloat16", "last"), ("float32", "mean")]
)
def test_shards_written_in_place_equal_write_shard_bytes(tmp_path, model, dtype, positions):
    """The shard laid out before its rows exist, then filled by pwrite, is the file that
    files.write_shard writes from the whole shard in memory, byte for byte."""
    acts = ActivationStore(tmp_path / "acts").extract(
        model, _data(), **{**KW, "dtype": dtype, "positions": positions}
    )
    shapes = acts.manifest["site_shapes"]
    for rec, shard in zip(acts.shards, acts._opened, strict=True):
        columns = {
            s: store_files.to_arrow(shard.tensor(s), dtype, tuple(shapes[s])) for s in acts.sites
        }
        index = {n: shard.index(n) for n in shard.table.column_names if n.startswith("__")}
        path = tmp_path / "again.arrow"
        nbytes, sha = store_files.write_shard(path, columns, index)
        assert (nbytes, sha) == (rec["bytes"], rec["sha256"])
        assert path.read_bytes() == (acts.folder / rec["file"]).read_bytes()
    want = {"all": 3, "last": 3, "mean": 1}[positions]
    assert len([n for n in acts._opened[0].table.column_names if n.startswith("__")]) == want


def test_the_fallback_without_pwrite_writes_the_same_files(tmp_path, model, monkeypatch):
    data = _data()
    fast = ActivationStore(tmp_path / "fast").extract(model, data, **KW)
    monkeypatch.delattr(os, "pwrite")
    slow = ActivationStore(tmp_path / "slow").extract(model, data, **KW)
    _same_entry(slow.folder, fast.folder)


def test_no_unembedding_unless_a_site_needs_it(tmp_path, model):
    """Without a logits site the unembedding is skipped (counted), and nothing stored changes."""
    calls: list[int] = []
    head = model.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: calls.append(out.shape[-1]))
    try:
        acts = ActivationStore(tmp_path / "a").extract(model, _data(), **KW)
        logits = ActivationStore(tmp_path / "b").extract(
            model, _data(), **{**KW, "sites": ["resid_post.1", "logits"]}
        )
    finally:
        handle.remove()
    vocab, width = head.out_features, head.in_features
    assert calls == [vocab] + [width] * 8 + [vocab] + [vocab] * 8  # the probes run it in full
    enc = tokenize(model.tokenizer, TEXTS[:3])
    _, cache = model.run_with_cache(enc, names=["resid_post.1", "logits"])
    mask = enc["attention_mask"].bool()
    for got in (acts, logits):
        rows = got["resid_post.1"][: int(mask.sum())]
        assert torch.equal(rows, cache["resid_post.1"][mask].to(torch.float16))
    assert torch.equal(logits["logits"][: int(mask.sum())], cache["logits"][mask].to(torch.float16))
    assert np.array_equal(
        acts.index["example"].to_numpy()[: int(mask.sum())],
        np.repeat([0, 1, 2], mask.sum(1).numpy()),
    )
    stats = load_stats(acts.folder / (acts.shards[0]["file"] + ".stats.safetensors"))
    assert stats["resid_post.1"].n == acts.shards[0]["rows"]
    assert store_extract.shard_name(0, 3) == "rank000-shard000003.arrow"
