"""Extraction: the dataset in batches through the model, rows chosen by the position policy,
written in place while the model runs, resumable after any crash.

**Plan.** The plan is fixed before the first forward and recorded: the examples are cut into
batches of ``batch_size`` (counted from the dataset's first row, so every process and every
resume sees the same batches), each rank takes a contiguous block of batches, and a rank's
batches are grouped into shards of at most ``shard_bytes`` (a shard holds at least one
batch). Tokens are computed once and stored with the plan (``rank000.tokens.arrow``); a
resumed run reads them back (no tokenizer call) and starts at the first shard not recorded
in ``rank000.json``.

**Writing.** A shard's rows, and so its whole layout, are known from the plan. Before its
first forward the shard is laid out in a temporary file of the entry folder
(``.rank000-shard000003.arrow.<random>.tmp``): pyarrow's own IPC writer writes the schema,
the record batch header, the index columns (``__example``, ``__position``, ``__token``,
known from the tokens) and the end-of-stream marker, and leaves a hole where each site's
column goes (it hands every body buffer to the sink separately; the sites' buffers are
untouched placeholders, never read or written). Each batch's rows are then converted once
to the storage dtype and written at their place with ``os.pwrite``. So no shard is held in
memory: the process holds one batch, the page cache the rest, and peak memory does not grow
with the data or the shard size. The file is the one :func:`hookscope.store.files.
write_shard` would write from the whole shard in memory, byte for byte.

**Finishing a shard** runs in a background thread while the next shard computes (one shard
waits at most): fsync the file, sha256 it (read back from the page cache), rename it into
place, fsync the folder, write its statistics (atomically), and only then record it in
``rank000.json``. A crash at any moment therefore loses at most the shards in flight: a
temporary file is never read (a resumed run deletes it), a renamed but unrecorded shard is
computed again, and the final files are bitwise those of an uninterrupted run (the same
batches through the same code). An error in any write (a full disk: StoreError saying what
to do) removes the temporary files; shards finished before it stay recorded.

**Compute.** All sites come from one ``run_with_cache`` per batch (their names given once, so
the cache plan is built once). Without a ``logits`` (or ``module:``) site the unembedding is
not needed, and runs as the identity for the extraction (a pythia-70m's 50k-word
unembedding costs more than its six blocks); every stored activation is computed before it,
so nothing stored changes. Rows are gathered with one index per batch (a plain view when
every position of every example is stored) and converted to the storage dtype in one pass
into a host buffer per site that every batch reuses; on a GPU the conversion runs there and
the buffer is pinned. The statistics (float64 covariance of every site,
:mod:`hookscope.store.stats`) are the one sizeable cost beyond the forward: at pythia-70m's
width, about a tenth of the forwards' time on a CPU.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from hookscope.errors import StoreError
from hookscope.store import files
from hookscope.store.positions import Policy
from hookscope.store.stats import RunningMoments, for_dim, save

__all__ = ["Site", "Prepared", "plan_shards", "run_rank", "shard_name", "shard_index"]


@dataclass(frozen=True)
class Site:
    """One stored column: the address, the per-row shape, and the storage dtype."""

    name: str
    address: Any
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class Prepared:
    """A rank's examples, ready for batching: token ids (or images) and the rows they give."""

    start: int  # first example (global index) of this rank
    ids: list[np.ndarray] | None  # token ids per example (language models)
    images: Tensor | None  # [n, ...] (vision models)
    positions: list[np.ndarray]  # per example, the positions its rows read

    def __len__(self) -> int:
        return len(self.ids) if self.ids is not None else int(self.images.shape[0])  # type: ignore[union-attr]

    tokens_per_image: int = 0  # ViT with positions="all": rows per image

    def rows(self, policy: Policy, i: int) -> int:
        return int(self.row_counts(policy)[i])

    def row_counts(self, policy: Policy) -> np.ndarray:
        """Rows each example gives, [n] int64."""
        if policy.kind in ("mean", "image"):
            return np.ones(len(self), dtype=np.int64)
        if policy.kind == "all" and self.ids is None:
            return np.full(len(self), self.tokens_per_image, dtype=np.int64)
        return np.diff(self.position_offsets)

    # flat views, built once (a resumed run reads them straight from the tokens file)
    @cached_property
    def lengths(self) -> np.ndarray:
        assert self.ids is not None
        return np.diff(self.id_offsets)

    @cached_property
    def id_offsets(self) -> np.ndarray:
        assert self.ids is not None
        return _offsets(self.ids)

    @cached_property
    def flat_ids(self) -> np.ndarray:
        assert self.ids is not None
        return _concat(self.ids)

    @cached_property
    def position_offsets(self) -> np.ndarray:
        return _offsets(self.positions)

    @cached_property
    def flat_positions(self) -> np.ndarray:
        return _concat(self.positions)

    def save(self, path: Path) -> None:
        cols = {"positions": _list_array(self.position_offsets, self.flat_positions)}
        if self.ids is not None:
            cols["ids"] = _list_array(self.id_offsets, self.flat_ids)
        table = pa.table(cols, metadata={b"start": str(self.start).encode()})
        files.atomic_write(path, lambda f: _write_table(f, table))

    @classmethod
    def load(cls, path: Path, images: Tensor | None) -> Prepared:
        table = files.read_shard(path).table
        start = int(table.schema.metadata[b"start"])
        flat: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in ("ids", "positions"):
            if name in table.column_names:
                col = table.column(name).combine_chunks()
                offsets = np.array(col.offsets, dtype=np.int64)  # writable copies
                values = np.array(col.flatten(), dtype=np.int64)
                flat[name] = (offsets - offsets[0], values)
        split = {k: np.split(v, o[1:-1]) if len(o) > 1 else [] for k, (o, v) in flat.items()}
        prepared = cls(start, split.get("ids"), images, split["positions"])
        prepared.position_offsets, prepared.flat_positions = flat["positions"]
        if "ids" in flat:
            prepared.id_offsets, prepared.flat_ids = flat["ids"]
        return prepared


def _offsets(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=out[1:])
    return out


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, np.int64)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    small = offsets[-1] < 2**31
    kind = pa.ListArray if small else pa.LargeListArray
    return kind.from_arrays(
        pa.array(offsets, pa.int32() if small else pa.int64()), pa.array(values)
    )


def _write_table(f: Any, table: pa.Table) -> None:
    sink = pa.PythonFile(f, mode="w")
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def plan_shards(
    prepared: Prepared, policy: Policy, batch_size: int, row_bytes: int, shard_bytes: int
) -> list[dict]:
    """This rank's shards: [{"index", "start", "stop", "rows"}] over local example indices,
    every boundary a batch boundary (batches count from the dataset's first example)."""
    n = len(prepared)
    first = prepared.start
    cuts = [0]
    # batches are aligned globally: the first batch of a rank may be short only if the rank
    # does not start on a batch boundary, which the rank split avoids
    b = batch_size - (first % batch_size) if first % batch_size else batch_size
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + b))
        b = batch_size
    counts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(prepared.row_counts(policy), out=counts[1:])
    shards, current, size = [], [0, 0, 0], 0
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        rows = int(counts[hi] - counts[lo])
        batch_bytes = rows * row_bytes
        if current[1] > current[0] and size + batch_bytes > shard_bytes:
            shards.append({"start": current[0], "stop": current[1], "rows": current[2]})
            current, size = [lo, lo, 0], 0
        current[1], current[2] = hi, current[2] + rows
        size += batch_bytes
    if current[1] > current[0]:
        shards.append({"start": current[0], "stop": current[1], "rows": current[2]})
    for k, s in enumerate(shards):
        s["index"] = k
        s["global_start"], s["global_stop"] = first + s["start"], first + s["stop"]
    return shards


def _batch_inputs(prepared: Prepared, lo: int, hi: int, pad: int) -> tuple[Any, Tensor | None]:
    """The model inputs of local examples ``lo:hi``: right-padded ids and the attention mask
    (language models), or the images."""
    if prepared.ids is None:
        return prepared.images[lo:hi], None  # type: ignore[index]
    lengths = prepared.lengths[lo:hi]
    real = np.arange(int(lengths.max())) < lengths[:, None]
    ids = np.full(real.shape, pad, dtype=np.int64)
    ids[real] = prepared.flat_ids[prepared.id_offsets[lo] : prepared.id_offsets[hi]]
    mask = torch.from_numpy(real.astype(np.int64))
    return {"input_ids": torch.from_numpy(ids), "attention_mask": mask}, mask


def shard_index(prepared: Prepared, policy: Policy, lo: int, hi: int) -> dict[str, np.ndarray]:
    """The index columns of the rows of local examples ``lo:hi``: ``__example`` (global),
    ``__position`` and ``__token`` where the policy reads positions (int64 each)."""
    counts = prepared.row_counts(policy)[lo:hi]
    example = np.repeat(np.arange(lo, hi, dtype=np.int64), counts)
    index = {"__example": example + prepared.start}
    if policy.kind in ("mean", "image"):
        return index
    if prepared.ids is None:  # ViT, every token of every image
        p = prepared.tokens_per_image
        index["__position"] = np.tile(np.arange(p, dtype=np.int64), hi - lo)
        return index
    a, b = prepared.position_offsets[lo], prepared.position_offsets[hi]
    position = prepared.flat_positions[a:b]
    index["__position"] = position
    index["__token"] = prepared.flat_ids[prepared.id_offsets[example] + position]
    return index


def _gather(
    prepared: Prepared, policy: Policy, lo: int, hi: int, width: int
) -> tuple[Tensor, Tensor] | None:
    """(example in batch, position) of each row of batch ``lo:hi`` (padded to ``width``), or
    None where the rows are every position of every example in order (a plain view)."""
    if prepared.ids is None or policy.kind == "mean":
        return None
    counts = np.diff(prepared.position_offsets[lo : hi + 1])
    if policy.kind == "all" and int(counts.sum()) == (hi - lo) * width:
        return None
    example = np.repeat(np.arange(hi - lo, dtype=np.int64), counts)
    a, b = prepared.position_offsets[lo], prepared.position_offsets[hi]
    return torch.from_numpy(example), torch.from_numpy(prepared.flat_positions[a:b])


def _select(t: Tensor, policy: Policy, mask: Tensor | None, take: tuple | None) -> Tensor:
    """Rows of one site's batch tensor [b, pos, ...]: [rows, ...], or [b, pos, ...] whose
    leading axes flatten to the rows (a view: the conversion to the storage dtype copies)."""
    if policy.kind == "mean":
        assert mask is not None
        b = t.shape[0]
        m = mask.to(t.device, torch.float32).reshape(b, -1, *([1] * (t.ndim - 2)))
        return (t.float() * m).sum(1) / m.sum(1)
    if take is None:  # image; ViT "all"; "all" without padding
        return t
    example, position = take
    return t[example.to(t.device), position.to(t.device)]


class _Staging:
    """Per site, one host buffer for a batch's rows in the storage dtype, reused batch after
    batch (pinned where the model runs on a GPU): no allocation per batch."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buffers: dict[int, tuple[Tensor, bool]] = {}

    def rows(self, site: int, n: int, width: int, pinned: bool) -> Tensor:
        buffer, was_pinned = self.buffers.get(site, (None, False))
        if buffer is None or buffer.shape[0] < n or was_pinned != pinned:
            buffer = torch.empty((n, width), dtype=self.dtype, pin_memory=pinned)
            self.buffers[site] = (buffer, pinned)
        return buffer[:n]


def _stored(t: Tensor, n: int, width: int, staging: _Staging, site: int) -> tuple[Tensor, Tensor]:
    """``t`` ([n, ...] or [b, pos, ...] holding n rows) as [n, width] in the storage dtype:
    (on the CPU, contiguous, to write; where ``t`` was computed, for the statistics). One
    pass converts and copies into the site's staging buffer (none where ``t`` already is the
    stored rows); on a GPU the conversion runs there and the copy to pinned memory does not
    wait (synchronise before reading it)."""
    dtype = staging.dtype
    if t.device.type == "cpu":
        if t.dtype == dtype and t.is_contiguous():
            rows = t.view(n, width)
            return rows, rows
        rows = staging.rows(site, n, width, pinned=False)
        rows.view(t.shape).copy_(t)
        return rows, rows
    on_device = t.to(dtype).reshape(n, width)
    if t.device.type == "cuda":
        host = staging.rows(site, n, width, pinned=True)
        host.copy_(on_device, non_blocking=True)
        return host, on_device
    return on_device.cpu(), on_device


def _batches(prepared: Prepared, shard: dict, batch_size: int) -> Iterator[tuple[int, int]]:
    lo = shard["start"]
    while lo < shard["stop"]:
        hi = min(shard["stop"], lo + batch_size - ((prepared.start + lo) % batch_size))
        yield lo, hi
        lo = hi


def _skip_unembedding(model: Any, sites: list[Site], scope: Any) -> None:
    """Run the unembedding as the identity when no site needs it (see the module docstring)."""
    head = model.adapter.unembed_module()
    if head is None or any(s.address.slot.kind in ("logits", "module") for s in sites):
        return
    if isinstance(head, nn.Linear):
        scope.replace_forward(head, _identity)


def _identity(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden


# ---------------------------------------------------------------------- shard files


class _Layout:
    """An IPC sink that writes everything at its offset in ``fd`` except the placeholder
    buffers (``{address: site}``), whose offsets it records."""

    closed = False

    def __init__(self, fd: int, placeholders: dict[int, tuple[int, int]]):
        self.fd, self.placeholders = fd, placeholders
        self.pos = 0
        self.found: dict[int, int] = {}

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = view.nbytes
        site = None
        if isinstance(data, pa.Buffer):
            site, size = self.placeholders.get(data.address, (None, 0))
            if site is not None and (n != size or site in self.found):
                site = None
        if site is None:
            _pwrite(self.fd, view.cast("B"), self.pos)
        else:
            self.found[site] = self.pos
        self.pos += n
        return n

    def flush(self) -> None:
        pass


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class _ShardFile:
    """One shard, filled in place batch by batch (see the module docstring). Where the
    layout cannot be found (no ``os.pwrite``, or a pyarrow that writes bodies otherwise) the
    rows collect in memory and :func:`files.write_shard` writes them at the end."""

    def __init__(
        self, path: Path, sites: list[Site], dtype: str, rows: int, index: dict[str, np.ndarray]
    ):
        self.path, self.sites, self.dtype, self.rows = path, sites, dtype, rows
        storage = files.DTYPES[dtype][0]
        self.row_bytes = [s.width * storage.itemsize for s in sites]
        self.fd: int | None = None
        self.tmp: str | None = None
        self.offsets: list[int] = []
        self.buffers: list[Tensor] | None = None
        self.index: dict[str, np.ndarray] | None = None
        try:
            if hasattr(os, "pwrite") and rows and all(self.row_bytes):
                self._lay_out(index)
        except OSError as err:
            self.abort()
            raise files.write_error(path, err) from err
        except BaseException:
            self.abort()
            raise
        if self.fd is None:
            self.buffers = [torch.empty((rows, s.width), dtype=storage) for s in sites]
            self.index = index

    def _lay_out(self, index: dict[str, np.ndarray]) -> None:
        sizes = [self.rows * b for b in self.row_bytes]
        maps = [mmap.mmap(-1, size) for size in sizes]  # never touched: no memory used
        try:
            buffers = [pa.py_buffer(m) for m in maps]
            columns = {
                s.name: files.fixed_size_column(buf, self.dtype, s.shape, self.rows)
                for s, buf in zip(self.sites, buffers, strict=True)
            }
            batch = files.shard_batch(columns, index)
            fd, self.tmp = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
            )
            self.fd = fd
            sink = _Layout(fd, {b.address: (k, sizes[k]) for k, b in enumerate(buffers)})
            with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), batch.schema) as writer:
                writer.write_batch(batch)
            del batch, columns, buffers
        finally:
            for m in maps:
                try:
                    m.close()
                except BufferError:  # still exported by a buffer pyarrow keeps: freed with it
                    pass
        if len(sink.found) != len(self.sites):
            self.abort()
            return
        os.ftruncate(fd, sink.pos)
        self.offsets = [sink.found[k] for k in range(len(self.sites))]

    def write(self, site: int, row: int, values: Tensor) -> None:
        """Rows ``row:row + n`` of site number ``site``: ``values`` [n, width], contiguous,
        on the CPU, in the storage dtype."""
        if self.buffers is not None:
            self.buffers[site][row : row + values.shape[0]] = values
            return
        assert self.fd is not None
        data = values.view(torch.uint8).numpy().data.cast("B") if values.numel() else None
        if data is None:
            return
        try:
            _pwrite(self.fd, data, self.offsets[site] + row * self.row_bytes[site])
        except OSError as err:
            self.abort()
            raise files.write_error(self.path, err) from err

    def finish(self) -> tuple[int, str]:
        """Make the shard durable and put it in place: (bytes, sha256)."""
        if self.buffers is not None:
            columns = {
                s.name: files.to_arrow(b, self.dtype, s.shape)
                for s, b in zip(self.sites, self.buffers, strict=True)
            }
            assert self.index is not None
            return files.write_shard(self.path, columns, self.index)
        assert self.fd is not None and self.tmp is not None
        try:
            os.fsync(self.fd)
            digest = files.sha256_file(Path(self.tmp))
            size = os.fstat(self.fd).st_size
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp, self.path)
            self.tmp = None
            files._fsync_dir(self.path.parent)
        except OSError as err:
            self.abort()
            raise files.write_error(self.path, err) from err
        return size, digest

    def abort(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        self.buffers = None
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def shard_name(rank: int, index: int) -> str:
    return f"rank{rank:03d}-shard{index:06d}.arrow"


class _Finish:
    """A filled shard waiting for the writer thread: finish it, save its statistics, and
    return its record."""

    def __init__(self, file: _ShardFile, stats: dict[str, RunningMoments], rank: int, shard: dict):
        self.file, self.stats, self.rank, self.shard = file, stats, rank, shard

    def __call__(self) -> dict:
        nbytes, sha = self.file.finish()
        path = self.file.path.with_name(self.file.path.name + ".stats.safetensors")
        try:
            save(self.stats, path)
        except OSError as err:
            raise files.write_error(path, err) from err
        except Exception as err:  # safetensors reports a failed write as its own error type
            if type(err).__name__ != "SafetensorError":
                raise
            full = "os error 28" in str(err) or "No space left" in str(err)
            raise files.write_error(
                path, OSError(errno.ENOSPC if full else errno.EIO, str(err))
            ) from err
        return {
            "file": self.file.path.name,
            "rank": self.rank,
            "index": self.shard["index"],
            "examples": [self.shard["global_start"], self.shard["global_stop"]],
            "rows": self.file.rows,
            "bytes": nbytes,
            "sha256": sha,
        }

    def abort(self) -> None:
        self.file.abort()


class _Writer(threading.Thread):
    """Finishes shards in the background (one waiting at most), then records them. After an
    error it only removes the temporary files of the shards still queued."""

    def __init__(self, record: Callable[[dict], None]):
        super().__init__(daemon=True, name="hookscope-store-writer")
        self.jobs: queue.Queue = queue.Queue(maxsize=1)
        self.record = record
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                job.abort()
                continue
            try:
                self.record(job())
            except BaseException as err:  # handed to the extracting thread, re-raised there
                job.abort()
                self.error = err

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, job: _Finish) -> None:
        if self.error is not None:
            job.abort()
            raise self.error
        self.jobs.put(job)

    def close(self) -> None:
        """Wait for the queued shards (idempotent)."""
        if self.is_alive():
            self.jobs.put(None)
            self.join()


def run_rank(
    model: Any,
    folder: Path,
    rank: int,
    prepared: Prepared,
    policy: Policy,
    sites: list[Site],
    dtype: str,
    plan: list[dict],
    done: dict[int, dict],
    record: Callable[[dict], None],
    pad: int,
    batch_size: int,
    progress: bool,
) -> None:
    """Extract this rank's shards that are not in ``done`` (see the module docstring)."""
    from tqdm.auto import tqdm

    from hookscope.scope import Scope

    todo = [s for s in plan if s["index"] not in done]
    total = sum(s["stop"] - s["start"] for s in todo)
    bar = tqdm(total=total, desc=f"extracting (rank {rank})", unit="ex", disable=not progress)
    names = [s.address for s in sites]
    staging = _Staging(files.DTYPES[dtype][0])
    counts = np.zeros(len(prepared) + 1, dtype=np.int64)
    np.cumsum(prepared.row_counts(policy), out=counts[1:])
    writer = _Writer(record)
    writer.start()
    current: _ShardFile | None = None
    try:
        with Scope() as scope:
            _skip_unembedding(model, sites, scope)
            for shard in todo:
                index = shard_index(prepared, policy, shard["start"], shard["stop"])
                path = folder / shard_name(rank, shard["index"])
                current = _ShardFile(path, sites, dtype, shard["rows"], index)
                del index
                stats = {s.name: for_dim(s.width) for s in sites}
                filled = 0
                for lo, hi in _batches(prepared, shard, batch_size):
                    writer.check()
                    n = int(counts[hi] - counts[lo])
                    out = _extract_batch(
                        model, prepared, policy, sites, names, staging, lo, hi, n, pad
                    )
                    for k, (site, (host, rows)) in enumerate(zip(sites, out, strict=True)):
                        current.write(k, filled, host)
                        stats[site.name].add(rows)
                    del out
                    filled += n
                    bar.update(hi - lo)
                if filled != shard["rows"]:
                    raise StoreError(
                        f"shard {shard['index']} was planned with {shard['rows']} rows but "
                        f"got {filled}; store.delete the entry and extract again"
                    )
                job, current = _Finish(current, stats, rank, shard), None
                writer.submit(job)
        writer.close()
        writer.check()
    finally:
        bar.close()
        if current is not None:
            current.abort()
        writer.close()


def _extract_batch(
    model: Any,
    prepared: Prepared,
    policy: Policy,
    sites: list[Site],
    names: list,
    staging: _Staging,
    lo: int,
    hi: int,
    n: int,
    pad: int,
) -> list[tuple[Tensor, Tensor]]:
    """One forward of local examples ``lo:hi`` (``n`` rows): per site, (the rows on the CPU
    to write, the rows where they were computed for the statistics), storage dtype."""
    inputs, mask = _batch_inputs(prepared, lo, hi, pad)
    _, cache = model.run_with_cache(inputs, names=names)
    width = mask.shape[1] if mask is not None else 0
    take = _gather(prepared, policy, lo, hi, width)
    out = [
        _stored(_select(cache[s.address], policy, mask, take), n, s.width, staging, k)
        for k, s in enumerate(sites)
    ]
    for device in {rows.device for _, rows in out if rows.device.type == "cuda"}:
        torch.cuda.synchronize(device)  # the pinned copies are complete
    return out
