"""Extraction: the dataset in batches through the model, rows chosen by the position policy,
written shard by shard while the next batches compute, resumable after any crash.

The plan is fixed before the first forward and recorded: the examples are cut into batches
of ``batch_size`` (counted from the dataset's first row, so every process and every resume
sees the same batches), each rank takes a contiguous block of batches, and a rank's
batches are grouped into shards of at most ``shard_bytes`` (a shard holds at least one
batch). Tokens are computed once and stored with the plan (``rank000.tokens.arrow``); a
resumed run reads them back and starts at the first shard not recorded in
``rank000.json``. A shard and its statistics are written atomically and only then recorded,
so a crash at any moment loses at most the shards in flight.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from hookscope.store import files
from hookscope.store.positions import Policy
from hookscope.store.stats import RunningMoments, for_dim, save

__all__ = ["Site", "Prepared", "plan_shards", "run_rank"]


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
        if policy.kind in ("mean", "image"):
            return 1
        if policy.kind == "all" and self.ids is None:
            return self.tokens_per_image
        return len(self.positions[i])

    def save(self, path: Path) -> None:
        cols = {"positions": pa.array([p.tolist() for p in self.positions], pa.list_(pa.int64()))}
        if self.ids is not None:
            cols["ids"] = pa.array([a.tolist() for a in self.ids], pa.list_(pa.int64()))
        table = pa.table(cols, metadata={b"start": str(self.start).encode()})
        files.atomic_write(path, lambda f: _write_table(f, table))

    @classmethod
    def load(cls, path: Path, images: Tensor | None) -> Prepared:
        shard = files.read_shard(path)
        table = shard.table
        start = int(table.schema.metadata[b"start"])
        ids = None
        if "ids" in table.column_names:
            ids = [np.asarray(v, dtype=np.int64) for v in table.column("ids").to_pylist()]
        positions = [np.asarray(v, dtype=np.int64) for v in table.column("positions").to_pylist()]
        return cls(start, ids, images, positions)


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
    shards, current, size = [], [0, 0, 0], 0
    for lo, hi in zip(cuts, cuts[1:]):
        rows = sum(prepared.rows(policy, i) for i in range(lo, hi))
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
    if prepared.ids is None:
        return prepared.images[lo:hi], None  # type: ignore[index]
    rows = prepared.ids[lo:hi]
    width = max(len(r) for r in rows)
    ids = torch.full((hi - lo, width), pad, dtype=torch.long)
    mask = torch.zeros((hi - lo, width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.from_numpy(r)
        mask[k, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}, mask


def _select(
    t: Tensor, policy: Policy, mask: Tensor | None, positions: Sequence[np.ndarray]
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Rows of one site's batch tensor [b, pos, ...]: (rows, example-in-batch, position)."""
    b = t.shape[0]
    if policy.kind == "image":
        return t, np.arange(b), np.full(b, -1)
    if policy.kind == "all" and mask is None:  # ViT: every token of every image
        p = t.shape[1]
        return t.reshape(b * p, *t.shape[2:]), np.repeat(np.arange(b), p), np.tile(np.arange(p), b)
    if policy.kind == "mean":
        assert mask is not None
        m = mask.to(t.device, torch.float32).reshape(b, -1, *([1] * (t.ndim - 2)))
        mean = (t.float() * m).sum(1) / m.sum(1)
        return mean, np.arange(b), np.full(b, -1)
    ex = np.concatenate([np.full(len(p), k) for k, p in enumerate(positions)])
    pos = np.concatenate(list(positions)) if len(positions) else np.zeros(0, dtype=np.int64)
    rows = t[torch.from_numpy(ex).to(t.device), torch.from_numpy(pos).to(t.device)]
    return rows, ex, pos


class _Writer(threading.Thread):
    """Writes finished shards in the background (one in flight), then records them."""

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
                continue
            try:
                self.record(job())
            except BaseException as err:  # handed to the extracting thread, re-raised there
                self.error = err

    def submit(self, job: Callable[[], dict]) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def finish(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


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

    todo = [s for s in plan if s["index"] not in done]
    total = sum(s["stop"] - s["start"] for s in todo)
    bar = tqdm(total=total, desc=f"extracting (rank {rank})", unit="ex", disable=not progress)
    names = [s.address for s in sites]
    writer = _Writer(record)
    writer.start()
    try:
        for shard in todo:
            buffers = {s.name: None for s in sites}
            stats = {s.name: for_dim(s.width) for s in sites}
            index = {"__example": [], "__position": [], "__token": []}
            filled = 0
            lo = shard["start"]
            while lo < shard["stop"]:
                hi = min(shard["stop"], lo + batch_size - ((prepared.start + lo) % batch_size))
                inputs, mask = _batch_inputs(prepared, lo, hi, pad)
                _, cache = model.run_with_cache(inputs, names=names)
                positions = prepared.positions[lo:hi]
                for site in sites:
                    rows, ex, pos = _select(cache[site.address], policy, mask, positions)
                    rows = rows.to("cpu", files.DTYPES[dtype][0]).reshape(rows.shape[0], site.width)
                    if buffers[site.name] is None:
                        buffers[site.name] = torch.empty(
                            shard["rows"], site.width, dtype=rows.dtype
                        )
                    buffers[site.name][filled : filled + rows.shape[0]] = rows
                    stats[site.name].add(rows)
                index["__example"].append(ex + prepared.start + lo)
                index["__position"].append(pos)
                if prepared.ids is not None and policy.kind not in ("mean",):
                    index["__token"].append(
                        np.asarray(
                            [prepared.ids[lo + e][p] for e, p in zip(ex, pos, strict=True)],
                            dtype=np.int64,
                        )
                    )
                filled += rows.shape[0]
                bar.update(hi - lo)
                lo = hi
            columns = {s.name: buffers[s.name][:filled] for s in sites}
            idx = {k: np.concatenate(v) for k, v in index.items() if v}
            if policy.kind in ("mean", "image"):
                idx.pop("__position", None)
            writer.submit(_shard_job(folder, rank, shard, sites, dtype, columns, idx, stats))
        writer.finish()
    finally:
        bar.close()
        if writer.is_alive():
            writer.jobs.put(None)


def shard_name(rank: int, index: int) -> str:
    return f"rank{rank:03d}-shard{index:06d}.arrow"


def _shard_job(
    folder: Path,
    rank: int,
    shard: dict,
    sites: list[Site],
    dtype: str,
    columns: dict[str, Tensor],
    index: dict[str, np.ndarray],
    stats: dict[str, RunningMoments],
) -> Callable[[], dict]:
    def job() -> dict:
        name = shard_name(rank, shard["index"])
        cols = {s.name: files.to_arrow(columns[s.name], dtype, s.shape) for s in sites}
        nbytes, sha = files.write_shard(folder / name, cols, index)
        save(stats, folder / (name + ".stats.safetensors"))
        return {
            "file": name,
            "rank": rank,
            "index": shard["index"],
            "examples": [shard["global_start"], shard["global_stop"]],
            "rows": int(next(iter(columns.values())).shape[0]),
            "bytes": nbytes,
            "sha256": sha,
        }

    return job
