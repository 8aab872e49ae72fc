"""Reading an entry: sites as tensors over memory maps, rows, the dataset's columns, the
position index, statistics, a shuffling loader, and exports."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hookscope.errors import StoreError, format_choices, suggestion
from hookscope.store import files
from hookscope.store.stats import RunningMoments, load, merge_all

__all__ = ["StoredActivations"]

_INDEX = ("__example", "__position", "__token")


class StoredActivations:
    """One complete store entry (or a row subset of it).

    >>> x = acts["resid_post.3"]            # [rows, d_model] over the shard's memory map
    >>> acts.rows(slice(0, 1000))           # a lazy subset
    >>> acts.columns                        # the dataset's own columns, one row per stored row
    >>> for batch in acts.loader(["resid_post.3", "label"], batch_size=4096, shuffle=True): ...

    Tensors of an entry that fits in one shard are zero-copy views of the file, mapped
    copy-on-write (changing one in place never changes the store). An entry of several
    shards is concatenated on lookup (one copy); :meth:`shard_tensors` and :meth:`loader`
    stay out of core.
    """

    def __init__(self, folder: Path, manifest: dict, rows: np.ndarray | None = None):
        self.folder = Path(folder)
        self.manifest = manifest
        self._rows = rows  # None: every row, in order

    # ------------------------------------------------------------------ basics
    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def n_rows(self) -> int:
        return int(self._total if self._rows is None else len(self._rows))

    @property
    def _total(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    def __len__(self) -> int:
        return self.n_rows

    @cached_property
    def _opened(self) -> list[files.Shard]:
        return [files.read_shard(self.folder / s["file"]) for s in self.shards]

    @cached_property
    def _offsets(self) -> np.ndarray:
        return np.cumsum([0] + [int(s["rows"]) for s in self.shards])

    def _check_site(self, name: Any) -> str:
        name = str(name)
        if name not in self.manifest["sites"]:
            raise StoreError(
                f"{name!r} is not stored in this entry; stored sites: "
                f"{format_choices(self.sites)}." + suggestion(name, self.sites)
            )
        return name

    def shard_tensors(self, site: Any) -> list[Tensor]:
        """The site in each shard, [rows_in_shard, *shape], every one a zero-copy view."""
        name = self._check_site(site)
        return [shard.tensor(name) for shard in self._opened]

    def __getitem__(self, site: Any) -> Tensor:
        """[rows, *shape] in the storage dtype (see the class docstring on copies)."""
        parts = self.shard_tensors(site)
        whole = parts[0] if len(parts) == 1 else torch.cat(parts)
        return whole if self._rows is None else whole[torch.from_numpy(self._rows)]

    def __contains__(self, site: object) -> bool:
        return str(site) in self.manifest["sites"]

    def rows(self, selection: slice | Sequence[int] | np.ndarray | Tensor) -> StoredActivations:
        """A lazy subset of rows (a slice, or row numbers); nothing is read until a lookup."""
        base = np.arange(self._total) if self._rows is None else self._rows
        if isinstance(selection, slice):
            picked = base[selection]
        else:
            idx = np.asarray(selection.cpu() if isinstance(selection, Tensor) else selection)
            if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
                raise StoreError(f"rows takes a slice or integer row numbers, got {idx.dtype}")
            if idx.size and (idx.max() >= len(base) or idx.min() < -len(base)):
                raise StoreError(f"row numbers must lie in 0-{len(base) - 1}")
            picked = base[idx]
        return StoredActivations(self.folder, self.manifest, picked)

    # ------------------------------------------------------------------ aligned columns
    def _index_column(self, name: str) -> np.ndarray | None:
        parts = []
        for shard in self._opened:
            if name not in shard.table.column_names:
                return None
            parts.append(shard.index(name))
        whole = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return whole if self._rows is None else whole[self._rows]

    @property
    def index(self):
        """Per row: ``example`` (dataset row), ``position`` and ``token`` id where the policy
        reads positions (a pandas DataFrame)."""
        import pandas as pd

        data = {}
        for name in _INDEX:
            col = self._index_column(name)
            if col is not None:
                data[name.strip("_")] = col
        return pd.DataFrame(data)

    @cached_property
    def _dataset_columns(self):
        path = self.folder / "columns.arrow"
        if not path.exists():
            return None
        return files.read_shard(path).table

    @property
    def columns(self):
        """The dataset's own columns (labels, ids, ...; not the text), one row per stored row
        (repeated per position where an example gives several rows): a pandas DataFrame."""
        import pandas as pd

        table = self._dataset_columns
        if table is None:
            return pd.DataFrame(index=range(self.n_rows))
        example = self._index_column("__example")
        return table.take(example).to_pandas()

    def column(self, name: str) -> np.ndarray:
        """One dataset column aligned with the rows, as numpy."""
        table = self._dataset_columns
        names = [] if table is None else table.column_names
        if name not in names:
            raise StoreError(
                f"{name!r} is not a dataset column of this entry; columns: "
                f"{format_choices(names) or 'none'}." + suggestion(name, names)
            )
        return (
            table.column(name).take(self._index_column("__example")).to_numpy(zero_copy_only=False)
        )

    # ------------------------------------------------------------------ statistics
    def stats(self, site: Any) -> RunningMoments:
        """Mean, covariance (or variance for wide sites) and row norms of ``site`` over every
        stored row, accumulated in float64 while extracting and merged over shards and ranks
        (Chan's update). Statistics describe the whole entry, not a ``rows`` subset."""
        name = self._check_site(site)
        parts = [load(self.folder / (s["file"] + ".stats.safetensors"))[name] for s in self.shards]
        return merge_all(parts)

    # ------------------------------------------------------------------ loading
    def loader(
        self,
        names: Sequence[str],
        batch_size: int = 4096,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Batches of rows as ``{name: tensor}`` for stored sites and dataset columns.

        ``shuffle=True`` draws a permutation of all rows (``seed``), so a batch mixes rows
        from every shard; each batch reads only its rows' pages from the memory maps. Sites
        come in the storage dtype unless ``dtype`` is given."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise StoreError(f"batch_size must be a positive int, got {batch_size!r}")
        names = [names] if isinstance(names, str) else list(names)
        sites = [n for n in names if n in self.manifest["sites"]]
        others = [n for n in names if n not in sites]
        table = self._dataset_columns
        have = [] if table is None else table.column_names
        for n in others:
            if n not in have:
                raise StoreError(
                    f"{n!r} is neither a stored site nor a dataset column; sites: "
                    f"{format_choices(self.sites)}; columns: {format_choices(have) or 'none'}"
                )
        order = np.arange(self.n_rows)
        if shuffle:
            order = np.random.default_rng(seed).permutation(self.n_rows)
        global_rows = order if self._rows is None else self._rows[order]
        shards = {n: self.shard_tensors(n) for n in sites}
        example = self._index_column("__example") if others else None  # per row of self
        for lo in range(0, len(order), batch_size):
            picked = global_rows[lo : lo + batch_size]
            if drop_last and len(picked) < batch_size:
                return
            batch: dict[str, Tensor] = {}
            which = np.searchsorted(self._offsets, picked, side="right") - 1
            for n in sites:
                out = None
                for k in np.unique(which):
                    sel = picked[which == k] - self._offsets[k]
                    part = shards[n][k][torch.from_numpy(sel)]
                    if out is None:
                        out = torch.empty((len(picked), *part.shape[1:]), dtype=part.dtype)
                    out[torch.from_numpy(np.nonzero(which == k)[0])] = part
                batch[n] = out if dtype is None else out.to(dtype)
            if others:
                assert example is not None and table is not None
                rows_ex = example[order[lo : lo + batch_size]]
                for n in others:
                    values = table.column(n).take(rows_ex).to_numpy(zero_copy_only=False)
                    batch[n] = torch.from_numpy(np.array(values))
            yield batch

    # ------------------------------------------------------------------ exports
    def to_dataset(self):
        """A ``datasets.Dataset`` memory-mapping the shard files (no copy): sites (bfloat16 as
        uint16 bits), index columns and the dataset's own columns; a ``rows`` subset is a
        ``select``. See :func:`hookscope.store.export.to_dataset`."""
        from hookscope.store.export import to_dataset

        return to_dataset(self)

    def to_parquet(
        self,
        path: str | Path,
        sites: Sequence[str] | str | None = None,
        **kwargs: Any,
    ) -> Path:
        """One Parquet file of ``sites`` (default all), index and dataset columns, written
        atomically in bounded row groups. See :func:`hookscope.store.export.to_parquet`."""
        from hookscope.store.export import to_parquet

        return to_parquet(self, path, sites, **kwargs)

    def to_saelens(
        self,
        path: str | Path,
        hook_names: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Path:
        """The folder SAELens reads as cached activations (``positions="all"`` over
        fixed-length contexts), hook names defaulting to TransformerLens'. See
        :func:`hookscope.store.export.to_saelens`."""
        from hookscope.store.export import to_saelens

        return to_saelens(self, path, hook_names, **kwargs)

    # ------------------------------------------------------------------ text
    def __repr__(self) -> str:
        m = self.manifest
        sites = m["sites"]
        lines = [
            f"StoredActivations {m['key'][:12]}: {self.n_rows} rows"
            + (f" (of {self._total})" if self._rows is not None else "")
            + f", {len(sites)} sites, {m['dtype']}, positions={m['key_fields']['positions']!r}, "
            f"{len(self.shards)} shard(s), {sum(s['bytes'] for s in self.shards) / 2**20:.1f} MiB",
        ]
        for name in sites[:12]:
            lines.append(f"  {name:<22} {list(m['site_shapes'][name])}")
        if len(sites) > 12:
            lines.append(f"  ... ({len(sites) - 12} more)")
        return "\n".join(lines)
