"""Files of the store: atomic writes, shard files (Arrow IPC streams), checksums.

A shard is one Arrow IPC *stream* file (the format ``datasets.Dataset.from_file`` opens) with
one record batch: a ``fixed_size_list`` column per site (float16 / float32; bfloat16 as its
raw uint16 bits, marked in the field metadata) and, where a row is not one example, int64
index columns ``__example``, ``__position``, ``__token``. Everything is written to a
temporary name in the same folder, flushed, fsynced, renamed into place and the folder
fsynced, so a reader sees a whole file or none.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from hookscope.errors import StoreError

__all__ = [
    "DTYPES",
    "atomic_write",
    "write_json",
    "read_json",
    "sha256_file",
    "write_shard",
    "read_shard",
    "Shard",
    "to_arrow",
    "fixed_size_column",
    "shard_batch",
    "write_error",
]

#: storage dtype name -> (torch dtype, arrow value type)
DTYPES: dict[str, tuple[torch.dtype, pa.DataType]] = {
    "float32": (torch.float32, pa.float32()),
    "float16": (torch.float16, pa.float16()),
    "bfloat16": (torch.bfloat16, pa.uint16()),  # the raw bits; Arrow has no bfloat16
}
_DTYPE_KEY = b"hookscope.dtype"
_SHAPE_KEY = b"hookscope.shape"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file in the same folder, fsync,
    rename into place, fsync the folder. A full disk (or any OSError) leaves no temporary file
    and the old ``path`` unchanged, and is re-raised as StoreError (:func:`write_error`)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it private; a store is shareable
    except OSError as err:
        raise write_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        _remove(tmp)
        raise write_error(path, err) from err
    except BaseException:
        _remove(tmp)
        raise


def write_error(path: Path, err: OSError) -> StoreError:
    """The StoreError for an OSError while writing ``path`` (a full disk says what to do)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(
            f"no space left on the device while writing {path}; the store is unchanged "
            "and readable. Free space (or extract to another folder) and run the same "
            "call again: it resumes at this shard"
        )
    return StoreError(f"could not write {path}: {err}")


def _remove(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_json(path: Path, value: Any) -> None:
    """Atomically write ``value`` as indented JSON."""
    data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"cannot read {path}: {err}") from err


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read through one reused buffer (no allocation per block)."""
    h = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def to_arrow(
    values: np.ndarray | torch.Tensor, dtype: str, shape: tuple[int, ...]
) -> tuple[pa.Array, dict]:
    """A [rows, width] array as a fixed_size_list column (zero copy) and its field metadata."""
    t = values if isinstance(values, torch.Tensor) else torch.from_numpy(values)
    t = t.detach().to("cpu", DTYPES[dtype][0]).contiguous()
    flat = t.reshape(-1)
    arr_np = flat.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else flat.numpy()
    return fixed_size_column(pa.py_buffer(arr_np), dtype, shape, int(t.shape[0]))


def fixed_size_column(
    values: pa.Buffer, dtype: str, shape: tuple[int, ...], rows: int
) -> tuple[pa.Array, dict]:
    """``rows`` rows of ``prod(shape)`` values of the storage ``dtype`` in ``values`` (row
    major, no copy) as a fixed_size_list column and its field metadata."""
    width = int(np.prod(shape)) if shape else 1
    child = pa.Array.from_buffers(DTYPES[dtype][1], rows * width, [None, values])
    column = pa.FixedSizeListArray.from_arrays(child, width)
    meta = {_DTYPE_KEY: dtype.encode(), _SHAPE_KEY: json.dumps(list(shape)).encode()}
    return column, meta


def shard_batch(
    columns: dict[str, tuple[pa.Array, dict]], index: dict[str, np.ndarray]
) -> pa.RecordBatch:
    """The one record batch of a shard: the site columns, then the int64 index columns."""
    arrays, fields = [], []
    for name, (array, meta) in columns.items():
        arrays.append(array)
        fields.append(pa.field(name, array.type, nullable=False, metadata=meta))
    for name, values in index.items():
        arrays.append(pa.array(np.asarray(values, dtype=np.int64)))
        fields.append(pa.field(name, arrays[-1].type, nullable=False))
    return pa.record_batch(arrays, schema=pa.schema(fields))


def write_shard(
    path: Path, columns: dict[str, tuple[pa.Array, dict]], index: dict[str, np.ndarray]
) -> tuple[int, str]:
    """Write one shard atomically; return (bytes, sha256)."""
    batch = shard_batch(columns, index)
    digest = hashlib.sha256()

    def write(f: Any) -> None:
        class Hashing:  # hash while writing: no second read of the shard
            def write(self, data: Any) -> int:
                view = memoryview(data)
                digest.update(view)
                return f.write(view)

            def flush(self) -> None:
                f.flush()

            @property
            def closed(self) -> bool:
                return False

        sink = pa.PythonFile(Hashing(), mode="w")
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        sink.flush()

    atomic_write(path, write)
    return os.path.getsize(path), digest.hexdigest()


class Shard:
    """One shard file opened for reading: its table over a read-only memory map, and each
    site as a tensor over a *copy-on-write* memory map of the same bytes (zero copy; an
    in-place change to such a tensor stays in this process and never reaches the file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            mm = pa.memory_map(str(path))
            self._base = mm.read_buffer(mm.size()).address
            mm.seek(0)
            with pa.ipc.open_stream(mm) as reader:
                self.table = reader.read_all()
        except (OSError, pa.ArrowInvalid) as err:
            raise StoreError(
                f"shard {path} cannot be read ({err}); store.verify() checks every shard, and "
                "deleting the entry (store.delete(key)) and extracting again restores it"
            ) from err

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def tensor(self, name: str) -> torch.Tensor:
        """Site ``name`` as [rows, *shape] in its storage dtype."""
        field = self.table.schema.field(name)
        meta = dict(field.metadata or {})
        dtype = meta[_DTYPE_KEY].decode()
        shape = tuple(json.loads(meta[_SHAPE_KEY]))
        (chunk,) = self.table.column(name).chunks  # one record batch per shard
        width = chunk.type.list_size
        values = chunk.values
        rows = len(chunk)
        np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
        itemsize = np.dtype(np_dtype).itemsize
        buffer = values.buffers()[1]
        offset = buffer.address - self._base + (values.offset + chunk.offset * width) * itemsize
        if rows == 0:
            arr = np.zeros(0, dtype=np_dtype)
        else:
            arr = np.memmap(
                self.path, dtype=np_dtype, mode="c", offset=offset, shape=(rows * width,)
            )
        t = torch.from_numpy(arr)
        if dtype == "bfloat16":
            t = t.view(torch.int16).view(torch.bfloat16)
        return t.reshape(rows, *shape)

    def index(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()


def read_shard(path: Path) -> Shard:
    """Open one shard (see :class:`Shard`)."""
    return Shard(path)


def umask() -> int:
    """The process umask, read without changing it (Linux), else 0o022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
