"""Exports of a store entry to other tools: a Hugging Face ``datasets.Dataset`` over the shard
files themselves, Parquet, and the cached-activations folder SAELens trains from.

Conventions shared by the three:

- a site is one column of flattened values, ``[rows, prod(shape)]`` (the per-row shape is in
  ``acts.manifest["site_shapes"]`` and in the Arrow/Parquet field metadata
  ``hookscope.shape``);
- bfloat16 sites keep their raw bits as uint16 in ``to_dataset`` and ``to_parquet`` (Arrow,
  Parquet and ``datasets`` have no bfloat16); ``to_saelens`` widens them to float32 (exact);
- the index columns ``__example`` / ``__position`` / ``__token`` and the dataset's own columns
  (labels, ids; not the text) come aligned with the rows;
- every file is written to a temporary name, fsynced and renamed, so a reader sees a whole
  export or none.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from hookscope.errors import StoreError, format_choices
from hookscope.store import files

if TYPE_CHECKING:
    import datasets

    from hookscope.store.stored import StoredActivations

__all__ = [
    "to_dataset",
    "to_parquet",
    "to_saelens",
    "transformer_lens_name",
    "bfloat16_from_bits",
    "ROW_GROUP_BYTES",
    "SAELENS_FILE_BYTES",
]

INDEX = ("__example", "__position", "__token")
#: Parquet row groups hold at most this many bytes of site values (at least one row).
ROW_GROUP_BYTES = 64 * 2**20
#: ``to_saelens`` starts a new ``data-*.arrow`` file past this size (datasets' own default).
SAELENS_FILE_BYTES = 500 * 2**20
_CHUNK_BYTES = 64 * 2**20  # site values read at a time by to_saelens

# hookscope slot kind -> TransformerLens hook name ({L}: the layer). The inverse of the
# grammar's TransformerLens aliases; transformer_lens_name checks each name parses back.
_TL_HOOKS = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "z": "blocks.{L}.attn.hook_z",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "v": "blocks.{L}.attn.hook_v",
    "result": "blocks.{L}.attn.hook_result",
    "neuron_pre": "blocks.{L}.mlp.hook_pre",
    "neuron_post": "blocks.{L}.mlp.hook_post",
    "embed": "hook_embed",
    "final_norm": "ln_final.hook_normalized",
}


# ---------------------------------------------------------------------- datasets


def to_dataset(acts: StoredActivations) -> datasets.Dataset:
    """The entry as a ``datasets.Dataset`` memory-mapping the shard files (no copy).

    Columns: each site as a fixed-length list of ``prod(shape)`` values (bfloat16 as uint16
    bits), the int64 index columns, then the dataset's own columns repeated per row (built in
    memory: one value per row, never the activations). ``ds.cache_files`` are the shards. A
    ``rows(...)`` subset becomes ``ds.select(rows)``: an index mapping, the data stay mapped.

    bfloat16 back: ``bfloat16_from_bits(ds.with_format("torch")[a:b][site])`` (datasets'
    ``"torch"`` and ``"numpy"`` formats widen uint16 to int64; the values are the bits).
    """
    import datasets
    from datasets.table import InMemoryTable

    parts = [datasets.Dataset.from_file(str(acts.folder / s["file"])) for s in acts.shards]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    table = acts._dataset_columns
    if table is not None and table.num_columns:
        _check_names(ds.column_names, table.column_names)
        example = _whole_index(acts, "__example")
        features = datasets.Features.from_arrow_schema(table.schema)
        aligned = datasets.Dataset(
            InMemoryTable(table.take(example)),
            info=datasets.DatasetInfo(features=features),
        )
        ds = datasets.concatenate_datasets([ds, aligned], axis=1)
    return ds if acts._rows is None else ds.select(acts._rows)


def bfloat16_from_bits(bits: Any) -> Tensor:
    """bfloat16 values from their 16-bit patterns, as exported (uint16) or as datasets'
    formats hand them back (widened to int64): a tensor or array of integers in 0..65535.

    >>> x = bfloat16_from_bits(acts.to_dataset().with_format("torch")[:100]["resid_post.3"])
    """
    t = bits if isinstance(bits, Tensor) else torch.from_numpy(np.array(bits))
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise StoreError(f"bfloat16_from_bits takes integer bit patterns, got {t.dtype}")
    return t.to(torch.uint16).view(torch.bfloat16)


# ---------------------------------------------------------------------- parquet


def to_parquet(
    acts: StoredActivations,
    path: str | os.PathLike[str],
    sites: Sequence[str] | str | None = None,
    *,
    row_group_bytes: int = ROW_GROUP_BYTES,
) -> Path:
    """Write the rows to one Parquet file: ``sites`` (default: all) as fixed-size lists
    (float32 / float16; bfloat16 as uint16 bits), the index columns and the dataset's own
    columns. Row groups hold at most ``row_group_bytes`` of site values; memory stays at about
    one row group. Written to a temporary name and renamed. Returns the path.

    >>> acts.to_parquet("acts.parquet", ["resid_post.3"])
    >>> pd.read_parquet("acts.parquet")          # resid_post.3 holds one array per row
    """
    import pyarrow.parquet as pq

    path = Path(path)
    names = _sites(acts, sites)
    _positive("row_group_bytes", row_group_bytes)
    table = acts._dataset_columns
    extra = [] if table is None else table.column_names
    _check_names(names + list(INDEX), extra)
    row_bytes = sum(_row_bytes(acts, n) for n in names)
    group = max(1, row_group_bytes // max(1, row_bytes))
    index = [n for n in INDEX if n in _first_shard_columns(acts)]

    def chunks() -> Iterator[pa.Table]:
        for rows in _chunks(acts, group, at_least_one=True):
            columns, fields = [], []
            for n in names:
                shape = tuple(acts.manifest["site_shapes"][n])
                column, meta = files.to_arrow(_gather(acts, n, rows), acts.manifest["dtype"], shape)
                columns.append(column)
                fields.append(pa.field(n, column.type, nullable=False, metadata=meta))
            for n in index:
                columns.append(pa.array(_gather(acts, n, rows).numpy()))
                fields.append(pa.field(n, pa.int64(), nullable=False))
            if extra:
                example = _gather(acts, "__example", rows).numpy()
                picked = table.take(example)
                columns.extend(picked.columns)
                fields.extend(picked.schema)
            yield pa.table(columns, schema=pa.schema(fields))

    def write(f: Any) -> None:
        sink = pa.PythonFile(f, mode="w")
        writer = None
        try:
            for chunk in chunks():
                if writer is None:
                    writer = pq.ParquetWriter(sink, chunk.schema)
                writer.write_table(chunk, row_group_size=chunk.num_rows)
        finally:  # while the temporary file is open (it is removed on an error)
            if writer is not None:
                writer.close()

    files.atomic_write(path, write)
    _share(path)
    return path


# ---------------------------------------------------------------------- SAELens


def transformer_lens_name(site: str) -> str:
    """TransformerLens' hook name for a stored site: ``resid_post.3`` ->
    ``blocks.3.hook_resid_post``, ``head.3`` -> ``blocks.3.attn.hook_z``, ``neuron.2`` ->
    ``blocks.2.mlp.hook_post``. StoreError for a site TransformerLens has no hook for (a
    single head or neuron: pass ``hook_names=`` to name it yourself)."""
    from hookscope.addresses import parse

    address = parse(site)
    pattern = _TL_HOOKS.get(address.slot.kind)
    name = None if pattern is None else pattern.format(L=address.slot.layer)
    if name is None or parse(name) != address:
        raise StoreError(
            f"{site} has no TransformerLens hook of its own (TransformerLens hooks whole "
            "layers: resid_post.L, attn_out.L, head.L, neuron.L, ...); name it with "
            f"hook_names={{{site!r}: '...'}}"
        )
    return name


def to_saelens(
    acts: StoredActivations,
    path: str | os.PathLike[str],
    hook_names: dict[str, str] | None = None,
    *,
    sites: Sequence[str] | str | None = None,
    file_bytes: int = SAELENS_FILE_BYTES,
) -> Path:
    """Write the layout SAELens' ``CacheActivationsRunner`` writes and its ``ActivationsStore``
    reads (``cached_activations_path=path``): a ``save_to_disk`` folder of one row per context
    with ``{hook_name: Array2D((context_size, d_in), dtype), "token_ids": Sequence(int32,
    length=context_size)}`` (checked against sae-lens 6.54).

    Needs ``positions="all"`` over contexts of one length (every example the same number of
    tokens). ``hook_names`` maps sites to column names (default: TransformerLens' names, see
    :func:`transformer_lens_name`); ``sites`` defaults to every stored site. A site of shape
    ``[n_heads, d_head]`` is flattened to ``d_in = n_heads * d_head`` as SAELens does; bfloat16
    is widened to float32 (exact), since ``datasets`` has no bfloat16. The folder is built
    under a temporary name and renamed into place; ``path`` must not exist (or be empty).

    >>> acts.to_saelens("cached/")
    >>> LanguageModelSAERunnerConfig(sae=StandardTrainingSAEConfig(d_in=512, d_sae=4096),
    ...     use_cached_activations=True, cached_activations_path="cached/",
    ...     hook_name="blocks.3.hook_resid_post", context_size=128, ...)
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    path = Path(path)
    names = _sites(acts, sites)
    _positive("file_bytes", file_bytes)
    columns = _hook_names(acts, names, hook_names)
    positions = acts.manifest["key_fields"]["positions"]
    if positions != "all":
        raise StoreError(
            f"to_saelens needs an entry extracted with positions='all' (SAELens trains on every "
            f"token of fixed-length contexts); this entry has positions={positions!r}"
        )
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise StoreError(f"{path} exists and is not an empty folder; pass a new path")
    context = _context_size(acts)
    has_tokens = "__token" in _first_shard_columns(acts)
    out_dtype = "float32" if acts.manifest["dtype"] == "bfloat16" else acts.manifest["dtype"]
    widths = {n: _width(acts, n) for n in names}
    feats: dict[str, Any] = {
        columns[n]: datasets.Array2D((context, widths[n]), out_dtype) for n in names
    }
    if has_tokens:
        feats["token_ids"] = datasets.Sequence(datasets.Value("int32"), length=context)
    features = datasets.Features(feats)
    context_bytes = context * sum(widths.values()) * np.dtype(out_dtype).itemsize
    per_chunk = max(1, _CHUNK_BYTES // max(1, context_bytes))
    per_file = max(1, file_bytes // max(1, context_bytes))
    n_contexts = acts.n_rows // context
    n_files = max(1, -(-n_contexts // per_file))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        data_files = []
        for k in range(n_files):
            name = f"data-{k:05d}-of-{n_files:05d}.arrow"
            writer = ArrowWriter(features=features, path=str(tmp / name))
            try:
                lo = k * per_file
                for c in range(lo, min(n_contexts, lo + per_file), per_chunk):
                    stop = min(n_contexts, lo + per_file, c + per_chunk)
                    rows = _self_rows(acts, c * context, stop * context)
                    chunk = _saelens_chunk(acts, names, columns, rows, context, out_dtype)
                    writer.write_table(chunk)
                writer.finalize()
            finally:
                writer.close()
            _fsync(tmp / name)
            data_files.append({"filename": name})
        info = datasets.DatasetInfo(
            description=f"hookscope store entry {acts.key} exported for SAELens", features=features
        )
        info.write_to_directory(str(tmp))
        _fsync(tmp / "dataset_info.json")
        state = {
            "_data_files": data_files,
            "_fingerprint": _fingerprint(acts, columns),
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        files.write_json(tmp / "state.json", state)
        _share(tmp)
        if path.exists():
            path.rmdir()  # empty (checked above)
        os.rename(tmp, path)
        _fsync(path.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise StoreError(
                f"no space left on the device while exporting to {path}; nothing was left "
                "behind. Free space (or export elsewhere) and run it again"
            ) from err
        raise StoreError(f"could not export to {path}: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _hook_names(
    acts: StoredActivations, names: list[str], hook_names: dict[str, str] | None
) -> dict[str, str]:
    given = dict(hook_names or {})
    for site, column in given.items():
        acts._check_site(site)
        if not isinstance(column, str) or not column:
            raise StoreError(f"hook_names[{site!r}] must be a non-empty string, got {column!r}")
    unused = [s for s in given if s not in names]
    if unused:
        raise StoreError(f"hook_names names sites not exported: {format_choices(unused)}")
    out = {n: given[n] if n in given else transformer_lens_name(n) for n in names}
    if len(set(out.values())) < len(out) or "token_ids" in out.values():
        raise StoreError(f"hook names must be distinct and not 'token_ids'; got {out}")
    return out


def _context_size(acts: StoredActivations) -> int:
    """The common number of rows per example; StoreError unless every example gives the same
    number, in position order 0..n-1 (a ``rows`` subset must keep whole examples)."""
    example = acts._index_column("__example")
    position = acts._index_column("__position")
    if example is None or position is None or not len(example):
        raise StoreError("to_saelens needs a non-empty entry with a position index")
    starts = np.flatnonzero(np.r_[True, example[1:] != example[:-1]])
    lengths = np.diff(np.r_[starts, len(example)])
    context = int(lengths[0])
    whole = lengths.min() == lengths.max() and np.array_equal(
        position, np.tile(np.arange(context), len(starts))
    )
    if whole:
        return context
    if acts._rows is not None:
        raise StoreError(
            "to_saelens needs whole contexts, each in position order 0..n-1; this selection of "
            "rows cuts or reorders them (select whole examples in order, e.g. "
            "rows(slice(k * context_size, m * context_size)))"
        )
    raise StoreError(
        f"to_saelens needs every example to give the same number of tokens (SAELens reads "
        f"[context_size, d_in] contexts); these examples have {lengths.min()} to "
        f"{lengths.max()} tokens. Extract from a fixed-length dataset (texts cut into "
        "equal token windows), or with max_length=N over texts of at least N tokens"
    )


def _saelens_chunk(
    acts: StoredActivations,
    names: list[str],
    columns: dict[str, str],
    rows: np.ndarray,
    context: int,
    out_dtype: str,
) -> pa.Table:
    data: dict[str, pa.Array] = {}
    for n in names:
        t = _gather(acts, n, rows)
        if t.dtype == torch.bfloat16:
            t = t.float()
        flat = t.reshape(-1).contiguous().numpy()
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), _width(acts, n))
        data[columns[n]] = pa.FixedSizeListArray.from_arrays(inner, context)
        assert flat.dtype == np.dtype(out_dtype)
    if "__token" in _first_shard_columns(acts):
        tokens = _gather(acts, "__token", rows).numpy().astype(np.int32)
        data["token_ids"] = pa.FixedSizeListArray.from_arrays(pa.array(tokens), context)
    return pa.table(data)


def _fingerprint(acts: StoredActivations, columns: dict[str, str]) -> str:
    rows = "all" if acts._rows is None else hashlib.sha256(acts._rows.tobytes()).hexdigest()
    text = json.dumps([acts.key, columns, rows], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- rows and columns


def _sites(acts: StoredActivations, sites: Sequence[str] | str | None) -> list[str]:
    if sites is None:
        return acts.sites
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise StoreError("sites is empty; pass None for every stored site")
    return [acts._check_site(n) for n in names]


def _positive(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StoreError(f"{what} must be a positive int, got {value!r}")


def _check_names(stored: list[str], extra: list[str]) -> None:
    clash = sorted(set(stored) & set(extra))
    if clash:
        raise StoreError(
            f"dataset column(s) {format_choices(clash)} have the name of a stored site or index "
            "column; rename them in the dataset before extracting"
        )


def _width(acts: StoredActivations, site: str) -> int:
    return int(np.prod(acts.manifest["site_shapes"][site]))


def _row_bytes(acts: StoredActivations, site: str) -> int:
    return _width(acts, site) * files.DTYPES[acts.manifest["dtype"]][0].itemsize


def _first_shard_columns(acts: StoredActivations) -> list[str]:
    return acts._opened[0].table.column_names if acts.shards else []


def _whole_index(acts: StoredActivations, name: str) -> np.ndarray:
    """Index column over every row of the entry (not the subset)."""
    parts = [shard.index(name) for shard in acts._opened]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _self_rows(acts: StoredActivations, lo: int, hi: int) -> np.ndarray:
    """Entry row numbers of rows lo..hi of ``acts`` (a subset or the whole entry)."""
    return np.arange(lo, hi) if acts._rows is None else acts._rows[lo:hi]


def _chunks(acts: StoredActivations, size: int, at_least_one: bool = False) -> Iterator[np.ndarray]:
    n = acts.n_rows
    if n == 0 and at_least_one:
        yield np.zeros(0, dtype=np.int64)
    for lo in range(0, n, size):
        yield _self_rows(acts, lo, min(n, lo + size))


def _part(acts: StoredActivations, name: str) -> Callable[[int], Tensor]:
    if name in INDEX:
        return lambda k: _readonly_tensor(acts._opened[k].index(name))
    return lambda k: acts._opened[k].tensor(name)


def _readonly_tensor(values: np.ndarray) -> Tensor:
    """A tensor over a read-only index column (only ever read, gathered or copied here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values)


def _gather(acts: StoredActivations, name: str, rows: np.ndarray) -> Tensor:
    """Entry rows ``rows`` of a site or index column: a view of the memory map when they are
    consecutive in one shard, else one copy."""
    part = _part(acts, name)
    offsets = acts._offsets
    if len(rows) == 0:
        return part(0)[:0]
    which = np.searchsorted(offsets, rows, side="right") - 1
    first = int(rows[0])
    if which[0] == which[-1] and np.array_equal(rows, np.arange(first, first + len(rows))):
        lo = first - int(offsets[which[0]])
        return part(int(which[0]))[lo : lo + len(rows)]
    out = None
    for k in np.unique(which):
        mask = which == k
        piece = part(int(k))[torch.from_numpy(rows[mask] - offsets[k])]
        if out is None:
            out = torch.empty((len(rows), *piece.shape[1:]), dtype=piece.dtype)
        out[torch.from_numpy(np.flatnonzero(mask))] = piece
    assert out is not None
    return out


def _share(path: Path) -> None:
    """Give an export (a file, or a folder and its files) the usual permissions under the
    umask: temporary names are created private (0600 / 0700)."""
    umask = files.umask()
    for p in [path, *(path.iterdir() if path.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
