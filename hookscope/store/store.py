"""ActivationStore: extract once (resumably, data-parallel), read many times (see the package
docstring for the disk format)."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from hookscope.errors import AddressError, HookscopeError, StoreError, format_choices
from hookscope.store import files
from hookscope.store.extract import Prepared, Site, plan_shards, run_rank, shard_name
from hookscope.store.keys import (
    dataset_fingerprint,
    entry_key,
    model_fingerprint,
    tokenizer_fingerprint,
)
from hookscope.store.positions import Policy, parse_policy
from hookscope.store.stored import StoredActivations

__all__ = ["ActivationStore", "FORMAT_VERSION", "DEFAULT_SHARD_BYTES"]

FORMAT_VERSION = 1
MARKER = "hookscope-store.json"
DEFAULT_SHARD_BYTES = 128 * 2**20  # far under the ~2 GB where Arrow writers struggle; the
# extraction holds at most two shard buffers (one filling, one being written)


def _dist() -> tuple[int, int, Any]:
    """(rank, world size, barrier) of the initialised torch.distributed group, else (0, 1, no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None


def _versions() -> dict[str, str]:
    import datasets
    import transformers

    import hookscope

    return {
        "hookscope": hookscope.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pa.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


class Listing(list):
    """``store.list()``: one dict per entry, a text table and ``to_pandas()``."""

    def __repr__(self) -> str:
        if not self:
            return "(empty store)"
        lines = [f"{'key':<14}{'state':<11}{'rows':>10}{'MiB':>9}  sites"]
        for e in self:
            sites = ", ".join(e["sites"][:4]) + (
                f", ... ({len(e['sites'])})" if len(e["sites"]) > 4 else ""
            )
            lines.append(
                f"{e['key'][:12]:<14}{e['state']:<11}{e['rows']:>10}{e['bytes'] / 2**20:>9.1f}  {sites}"
            )
        return "\n".join(lines)

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(list(self))


class Verification(list):
    """``store.verify()``: the problems found (empty when every shard checks out)."""

    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self

    def __repr__(self) -> str:
        if self.ok:
            return f"store verified: {self.checked} files, every size and sha256 as recorded"
        return "store problems:\n" + "\n".join(f"  {p}" for p in self)


class ActivationStore:
    """A folder of extracted activations, keyed by everything that shapes them.

    >>> store = hs.ActivationStore("acts/")
    >>> acts = store.extract(model, ds, sites=["resid_post.*"], positions="last", dtype="float16")
    >>> acts = store.get(model, ds, sites=["resid_post.*"], positions="last", dtype="float16")
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        marker = self.folder / MARKER
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"{self.folder} is a file, not a store folder")
        if self.folder.is_dir() and not marker.exists() and _foreign(self.folder):
            raise StoreError(
                f"{self.folder} is not an activation store (no {MARKER}) and is not empty; pass "
                "a new or empty folder, or an existing store"
            )
        if marker.exists():
            info = files.read_json(marker)
            if info.get("format") != "hookscope-store":
                raise StoreError(f"{marker} is not a hookscope store marker: {info}")
            _check_version(info.get("version"), marker)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            files.write_json(marker, {"format": "hookscope-store", "version": FORMAT_VERSION})
        (self.folder / "entries").mkdir(exist_ok=True)

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.folder)!r}, {len(self.list())} entries)"

    # ------------------------------------------------------------------ the key
    def _request(
        self,
        model: Any,
        data: Any,
        sites: Any,
        positions: Any,
        text_column: str,
        dtype: Any,
        split: str,
        max_length: int | None,
        template: str,
        input_column: str,
    ) -> dict:
        """Check every argument (no forward) and compute the key."""
        from hookscope.model import HookedModel

        if not isinstance(model, HookedModel):
            raise StoreError(f"model must be a hookscope HookedModel, got {type(model).__name__}")
        dtype = _dtype_name(dtype)
        table = _as_table(data)
        vision = not getattr(getattr(model.adapter, "spec", None), "token_input", True) or (
            model.adapter.name in ("mlp", "cnn")
        )
        column = input_column if vision else text_column
        if column not in table.column_names:
            what = "input column (images)" if vision else "text column"
            raise StoreError(
                f"{what} {column!r} is not in the dataset; its columns: "
                f"{format_choices(table.column_names)}; pass "
                + ("input_column=" if vision else "text_column=")
                + "the right one"
            )
        policy = parse_policy(positions, table.column_names, vision)
        if not isinstance(split, str) or not split:
            raise StoreError(f"split must be a non-empty string, got {split!r}")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise StoreError(f"max_length must be a positive int or None, got {max_length!r}")
        if not isinstance(template, str) or "{text}" not in template:
            raise StoreError(f"template must be a string containing '{{text}}', got {template!r}")
        ftype = table.schema.field(column).type
        pretokenized = (
            not vision
            and (pa.types.is_list(ftype) or pa.types.is_large_list(ftype))
            and pa.types.is_integer(ftype.value_type)
        )
        if pretokenized and template != "{text}":
            raise StoreError(f"column {column!r} holds token ids; a template applies to text only")
        if not vision and not pretokenized and model.tokenizer is None:
            raise StoreError(
                "this model has no tokenizer; a text dataset needs one (or give a column of "
                "token ids, e.g. hs.data.induction's 'tokens', as text_column)"
            )
        addresses = _sites(model, sites)
        used = [column] + ([policy.column] if policy.column else [])
        fields = {
            "format_version": FORMAT_VERSION,
            "model": model_fingerprint(model.model),
            "adapter": model.adapter.name,
            "sites": [str(a) for a in addresses],
            "positions": policy.describe(),
            "dataset": {
                "fingerprint": dataset_fingerprint(table.select(used)),
                "rows": table.num_rows,
                "split": split,
            },
            "preprocessing": {
                "column": column,
                "template": template,
                "max_length": max_length,
                "padding_side": "right",
                **(
                    {
                        "tokenizer": "token ids"
                        if pretokenized
                        else tokenizer_fingerprint(model.tokenizer)
                    }
                    if not vision
                    else {}
                ),
            },
            "dtype": dtype,
        }
        key = entry_key(fields)
        return {
            "key": key,
            "fields": fields,
            "table": table,
            "policy": policy,
            "addresses": addresses,
            "dtype": dtype,
            "vision": vision,
            "pretokenized": pretokenized,
            "column": column,
        }

    def _entry(self, key: str) -> Path:
        return self.folder / "entries" / key[:20]

    # ------------------------------------------------------------------ public
    def get(
        self,
        model: Any,
        data: Any,
        sites: Any,
        positions: Any = "last",
        *,
        text_column: str = "text",
        input_column: str = "image",
        dtype: Any = "float32",
        split: str = "train",
        max_length: int | None = None,
        template: str = "{text}",
    ) -> StoredActivations:
        """The complete entry for these arguments, without any forward; StoreError if it was
        not extracted (or is unfinished: run :meth:`extract` to resume it)."""
        req = self._request(
            model,
            data,
            sites,
            positions,
            text_column,
            dtype,
            split,
            max_length,
            template,
            input_column,
        )
        found = self._complete(req["key"])
        if found is None:
            state = (
                "unfinished (extract resumes it)"
                if self._entry(req["key"]).exists()
                else "not extracted"
            )
            raise StoreError(
                f"no complete entry for this model, data, sites, positions and dtype ({state}); "
                "call store.extract(...) with the same arguments"
            )
        return found

    def _complete(self, key: str) -> StoredActivations | None:
        path = self._entry(key) / "manifest.json"
        if not path.exists():
            return None
        manifest = files.read_json(path)
        _check_version(manifest.get("format_version"), path)
        if manifest.get("key") != key:
            raise StoreError(
                f"{path} records key {manifest.get('key')!r}, not {key!r}; the entry folder was renamed or copied over"
            )
        return StoredActivations(path.parent, manifest)

    def extract(
        self,
        model: Any,
        data: Any,
        sites: Any,
        positions: Any = "last",
        *,
        text_column: str = "text",
        input_column: str = "image",
        batch_size: int = 32,
        dtype: Any = "float32",
        split: str = "train",
        max_length: int | None = None,
        template: str = "{text}",
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        progress: bool = True,
    ) -> StoredActivations:
        """Extract ``sites`` of ``model`` over ``data`` (a ``datasets.Dataset`` or a list of
        texts) and return the entry; an existing complete entry is returned without a
        forward, an unfinished one resumes at its first missing shard.

        ``sites``: addresses or selections (``"resid_post.*"``, ``"head.3.*"``,
        ``"neuron.2"``); per-head ``pattern`` cannot be stored (it has no position axis of
        its own). ``positions``: see :mod:`hookscope.store.positions`. ``dtype``: float32,
        float16 or bfloat16 storage. ``template`` formats each text (``"Q: {text} A:"``);
        ``max_length`` truncates. Under ``torchrun`` every rank extracts a contiguous block
        of batches into its own shards and rank 0 writes the manifest.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise StoreError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise StoreError(f"shard_bytes must be a positive int, got {shard_bytes!r}")
        req = self._request(
            model,
            data,
            sites,
            positions,
            text_column,
            dtype,
            split,
            max_length,
            template,
            input_column,
        )
        found = self._complete(req["key"])
        if found is not None:
            return found
        rank, world, barrier = _dist()
        folder = self._entry(req["key"])
        folder.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(folder, rank)  # only this rank's: another's may be in flight
        state_path = folder / f"rank{rank:03d}.json"
        table, policy = req["table"], req["policy"]
        n = table.num_rows
        n_batches = -(-n // batch_size)
        lo_b, hi_b = rank * n_batches // world, (rank + 1) * n_batches // world
        lo, hi = min(n, lo_b * batch_size), min(n, hi_b * batch_size)
        settings = {
            "batch_size": batch_size,
            "shard_bytes": shard_bytes,
            "world": world,
            "examples": [lo, hi],
        }
        for other in sorted(folder.glob("rank*.json")):  # every rank refuses, none waits
            recorded = files.read_json(other).get("settings", {}).get("world")
            if recorded != world:
                raise StoreError(
                    f"an unfinished extraction of this entry ran with {recorded} process(es) "
                    f"({other.name}); this call has {world}. Resume with the same number of "
                    f"processes (torchrun --nnodes x --nproc_per_node = {recorded}), or "
                    f"store.delete({req['key'][:12]!r}) to start over"
                )
        if state_path.exists():
            state = files.read_json(state_path)
            if state["settings"] != settings:
                raise StoreError(
                    f"an unfinished extraction of this entry used {state['settings']}; resume with "
                    f"the same batch_size, shard_bytes and number of processes (this call: "
                    f"{settings}), or store.delete({req['key'][:12]!r}) to start over"
                )
            images = None
            if req["vision"]:
                images = _images(table, req["column"], lo, hi) if hi > lo else torch.empty(0)
            prepared = Prepared.load(folder / f"rank{rank:03d}.tokens.arrow", images)
            prepared.tokens_per_image = state.get("tokens_per_image", 0)
            sites = [
                Site(s["name"], _address(s["name"]), tuple(s["shape"])) for s in state["sites"]
            ]
        else:
            if hi > lo:
                prepared = probe = _prepare(model, table, req, lo, hi)
            else:  # more processes than batches: this rank has nothing to extract
                ids, images = (None, torch.empty(0)) if req["vision"] else ([], None)
                prepared, probe = Prepared(lo, ids, images, []), _prepare(model, table, req, 0, 1)
            sites, prepared.tokens_per_image = _probe(model, probe, policy, req["addresses"])
            row_bytes = sum(s.width for s in sites) * files.DTYPES[req["dtype"]][0].itemsize
            plan = plan_shards(prepared, policy, batch_size, row_bytes, shard_bytes)
            prepared.save(folder / f"rank{rank:03d}.tokens.arrow")
            state = {
                "settings": settings,
                "key": req["key"],  # key, fields and dataset columns: for `hookscope store merge`
                "key_fields": req["fields"],
                "columns": [c for c in table.column_names if c != req["column"]],
                "sites": [{"name": s.name, "shape": list(s.shape)} for s in sites],
                "tokens_per_image": prepared.tokens_per_image,
                "plan": plan,
                "done": {},
            }
            files.write_json(state_path, state)

        def record(entry: dict) -> None:
            state["done"][str(entry["index"])] = entry
            files.write_json(state_path, state)

        done = {int(k): v for k, v in state["done"].items() if (folder / v["file"]).exists()}
        run_rank(
            model, folder, rank, prepared, policy, sites, req["dtype"], state["plan"], done,
            record, _pad_id(model), batch_size, progress,
        )  # fmt: skip
        barrier()
        failure = None
        if rank == 0:
            try:
                self._finish(folder, req, world, sites, batch_size, shard_bytes)
            except StoreError as err:  # raised after the barrier: no rank waits forever
                failure = err
        barrier()
        if failure is not None:
            raise failure
        result = self._complete(req["key"])
        if result is None:  # no shared filesystem: the other ranks' files are on other nodes
            here = [r for r in range(world) if (folder / f"rank{r:03d}.json").exists()]
            err = StoreError(
                f"ranks {_ranges([r for r in range(world) if r not in here])} of this "
                f"{world}-process extraction wrote their files elsewhere (no shared "
                f"filesystem?); ranks {_ranges(here)} finished in {folder}. Copy every node's "
                "store folder to one machine and run `hookscope store merge OUT FOLDER...`"
            )
            err.ranks_here = here  # type: ignore[attr-defined]  # read by the CLI
            raise err
        return result

    def _finish(
        self,
        folder: Path,
        req: dict,
        world: int,
        sites: list[Site],
        batch_size: int,
        shard_bytes: int,
    ) -> None:
        """Rank 0, once every rank is done: the dataset's columns, then the manifest if every
        rank's files are in ``folder`` (per-node folders wait for ``hookscope store merge``)."""
        table = req["table"]
        others = [c for c in table.column_names if c != req["column"]]
        if others:
            t = table.select(others)
            files.atomic_write(folder / "columns.arrow", lambda f: _write_stream(f, t))
        if all((folder / f"rank{r:03d}.json").exists() for r in range(world)):
            shapes = {s.name: list(s.shape) for s in sites}
            write_manifest(
                folder, req["key"], req["fields"], world, shapes, batch_size, shard_bytes, others
            )

    def list(self) -> Listing:
        """Every entry: key, state (complete / unfinished), rows, bytes, sites."""
        out = Listing()
        for entry in sorted((self.folder / "entries").iterdir()):
            manifest = entry / "manifest.json"
            if manifest.exists():
                m = files.read_json(manifest)
                out.append(
                    {
                        "key": m["key"],
                        "state": "complete",
                        "rows": m["n_rows"],
                        "bytes": sum(s["bytes"] for s in m["shards"]),
                        "sites": m["sites"],
                        "positions": m["key_fields"]["positions"],
                        "dtype": m["dtype"],
                        "created": m["created"],
                    }
                )
            else:
                states = [files.read_json(p) for p in sorted(entry.glob("rank*.json"))]
                done = [d for s in states for d in s["done"].values()]
                out.append(
                    {
                        "key": entry.name,
                        "state": "unfinished",
                        "rows": sum(d["rows"] for d in done),
                        "bytes": sum(d["bytes"] for d in done),
                        "sites": [x["name"] for x in states[0]["sites"]] if states else [],
                        "positions": None,
                        "dtype": None,
                        "created": None,
                    }
                )
        return out

    def verify(self) -> Verification:
        """Check every recorded shard of every entry: present, the recorded size and sha256,
        readable, with its statistics; the problems name the file (empty when all is well)."""
        report = Verification()
        for entry in sorted((self.folder / "entries").iterdir()):
            manifest = entry / "manifest.json"
            if manifest.exists():
                records = files.read_json(manifest)["shards"]
            else:
                records = [
                    d
                    for p in sorted(entry.glob("rank*.json"))
                    for d in files.read_json(p)["done"].values()
                ]
            for rec in records:
                path = entry / rec["file"]
                report.checked += 1
                if not path.exists():
                    report.append(f"{path}: missing")
                    continue
                size = path.stat().st_size
                if size != rec["bytes"]:
                    report.append(
                        f"{path}: {size} bytes, the manifest records {rec['bytes']} (truncated or overwritten)"
                    )
                    continue
                if files.sha256_file(path) != rec["sha256"]:
                    report.append(f"{path}: sha256 differs from the manifest (corrupted)")
                    continue
                if not (entry / (rec["file"] + ".stats.safetensors")).exists():
                    report.append(f"{path}: its statistics file is missing")
        return report

    def delete(self, key: str) -> None:
        """Remove one entry (a key or a unique prefix of at least 6 characters)."""
        if not isinstance(key, str) or len(key) < 6:
            raise StoreError(
                f"pass an entry key (or a prefix of at least 6 characters), got {key!r}"
            )
        entries = [p for p in (self.folder / "entries").iterdir() if p.name.startswith(key[:20])]
        if len(entries) != 1:
            keys = [p.name for p in (self.folder / "entries").iterdir()]
            raise StoreError(
                f"{key!r} matches {len(entries)} entries; keys: {format_choices(keys) or 'none'}"
            )
        shutil.rmtree(entries[0])


# ---------------------------------------------------------------------- helpers


def write_manifest(
    folder: Path,
    key: str,
    fields: dict,
    world: int,
    site_shapes: dict[str, list[int]],
    batch_size: int,
    shard_bytes: int,
    columns: list[str],
    extra: dict | None = None,
) -> dict:
    """Write ``manifest.json`` of an entry whose ranks ``0..world-1`` all recorded every
    planned shard in ``folder`` (extraction's rank 0, or ``hookscope store merge``); it lists
    the shards in rank order, which is dataset order. StoreError if a rank is unfinished."""
    shards = []
    for r in range(world):
        state = files.read_json(folder / f"rank{r:03d}.json")
        missing = [s["index"] for s in state["plan"] if str(s["index"]) not in state["done"]]
        if missing:
            raise StoreError(
                f"rank {r} did not finish shards {missing}; run the same extraction again"
            )
        shards += [state["done"][str(s["index"])] for s in state["plan"]]
    manifest = {
        "format": "hookscope-store-entry",
        "format_version": FORMAT_VERSION,
        "key": key,
        "key_fields": fields,
        "sites": list(site_shapes),
        "site_shapes": site_shapes,
        "dtype": fields["dtype"],
        "n_examples": fields["dataset"]["rows"],
        "n_rows": sum(s["rows"] for s in shards),
        "batch_size": batch_size,
        "shard_bytes": shard_bytes,
        "world_size": world,
        "shards": shards,
        "columns": columns,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "seed": None,  # extraction is deterministic: no randomness is drawn
        **(extra or {}),
    }
    files.write_json(folder / "manifest.json", manifest)
    return manifest


def _ranges(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ", ".join(parts) or "none"


def _foreign(folder: Path) -> bool:
    """Whether ``folder`` holds anything but a store being created right now by another
    process (its ``entries`` folder and the marker's temporary file)."""
    for p in folder.iterdir():
        creating = p.name.startswith(f".{MARKER}.") and p.name.endswith(".tmp")
        if not creating and p.name != "entries":
            return True
    return False


def _check_version(version: Any, path: Path) -> None:
    if not isinstance(version, int):
        raise StoreError(f"{path} has no format version; it was not written by hookscope")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} is store format {version}, newer than this hookscope reads "
            f"({FORMAT_VERSION}); upgrade hookscope to read it"
        )


def _dtype_name(dtype: Any) -> str:
    names = {v[0]: k for k, v in files.DTYPES.items()}
    if isinstance(dtype, torch.dtype) and dtype in names:
        return names[dtype]
    if isinstance(dtype, str) and dtype in files.DTYPES:
        return dtype
    raise StoreError(f"dtype must be one of {', '.join(files.DTYPES)}, got {dtype!r}")


def _as_table(data: Any) -> pa.Table:
    import datasets

    if isinstance(data, datasets.Dataset):
        return data.with_format(None).data.table if hasattr(data.data, "table") else data.data
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        return pa.table({"text": list(data)})
    raise StoreError(
        f"data must be a datasets.Dataset or a non-empty list of texts, got {type(data).__name__}"
    )


def _sites(model: Any, sites: Any) -> list[Any]:
    try:
        addresses = model.resolve(sites)
    except HookscopeError as err:
        raise StoreError(f"sites: {err}") from None
    if not addresses:
        raise StoreError("sites selects nothing; e.g. sites=['resid_post.*']")
    bad = [str(a) for a in addresses if a.slot.kind == "pattern"]
    if bad:
        raise StoreError(
            f"{bad[0]} is an attention pattern ([batch, dest, src]): it has no per-position "
            "row to store; store head.L.H (z), q, k or v instead"
        )
    return addresses


def _address(name: str) -> Any:
    from hookscope.addresses import parse

    try:
        return parse(name)
    except AddressError as err:
        raise StoreError(f"stored site {name!r}: {err}") from None


def _pad_id(model: Any) -> int:
    tok = model.tokenizer
    if tok is None:
        return 0
    from hookscope.inputs import pad_token

    return pad_token(tok)


def _images(table: pa.Table, column: str, lo: int, hi: int) -> torch.Tensor:
    import datasets

    ds = datasets.Dataset(table.slice(lo, hi - lo)).with_format("numpy", columns=[column])
    try:
        x = torch.from_numpy(np.asarray(ds[column], dtype=np.float32))
    except (ValueError, TypeError) as err:
        raise StoreError(f"column {column!r} does not hold equal-shaped arrays: {err}") from None
    return x.unsqueeze(1) if x.ndim == 3 else x  # [n, h, w] images: one channel


def _prepare(model: Any, table: pa.Table, req: dict, lo: int, hi: int) -> Prepared:
    policy: Policy = req["policy"]
    if req["vision"]:
        images = _images(table, req["column"], lo, hi)
        return Prepared(lo, None, images, [np.zeros(0, dtype=np.int64)] * (hi - lo))
    texts = table.column(req["column"]).slice(lo, hi - lo).to_pylist()
    max_length = req["fields"]["preprocessing"]["max_length"]
    if req.get("pretokenized"):  # a column of token ids: the ids as they are
        arrays = [np.asarray(r[:max_length] if max_length else r, dtype=np.int64) for r in texts]
        empty = [i for i, a in enumerate(arrays) if not len(a)]
        if empty:
            raise StoreError(f"row {lo + empty[0]} of column {req['column']!r} has no token ids")
        lengths = np.asarray([len(a) for a in arrays])
        column = (
            table.column(policy.column).slice(lo, hi - lo).to_pylist() if policy.column else None
        )
        return Prepared(lo, arrays, None, policy.positions(lengths, column))
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise StoreError(
            f"text column {req['column']!r} row {lo + bad[0]} is not a string: {texts[bad[0]]!r}"
        )
    template = req["fields"]["preprocessing"]["template"]
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    arrays = []
    for at in range(0, len(texts), 256):  # in chunks: the tokenizer's output is ~20x the ids
        chunk = [template.format(text=t) for t in texts[at : at + 256]]
        ids = model.tokenizer(chunk, return_attention_mask=False, **kwargs)["input_ids"]
        arrays += [np.asarray(r, dtype=np.int64) for r in ids]
    empty = [i for i, a in enumerate(arrays) if not len(a)]
    if empty:
        raise StoreError(f"row {lo + empty[0]} ({texts[empty[0]]!r}) gives no tokens")
    lengths = np.asarray([len(a) for a in arrays])
    column = table.column(policy.column).slice(lo, hi - lo).to_pylist() if policy.column else None
    return Prepared(lo, arrays, None, policy.positions(lengths, column))


def _probe(
    model: Any, prepared: Prepared, policy: Policy, addresses: list
) -> tuple[list[Site], int]:
    """One example through the model: each site's per-row shape (and a check that it has a
    position axis where the policy reads positions)."""
    from hookscope.store.extract import _batch_inputs

    inputs, mask = _batch_inputs(prepared, 0, 1, 0)
    _, cache = model.run_with_cache(inputs, names=addresses)
    sites, tokens = [], 0
    for a in addresses:
        t = cache[a]
        if policy.kind == "image":
            shape = tuple(t.shape[1:])
        else:
            length = mask.shape[1] if mask is not None else None
            if t.ndim < 2 or (length is not None and t.shape[1] != length):
                raise StoreError(
                    f"{a} has shape {tuple(t.shape)}: no position axis to read rows from; use "
                    "positions='image' for a whole activation per example"
                )
            shape = tuple(t.shape[2:])
            tokens = t.shape[1]
        sites.append(Site(str(a), a, shape))
    return sites, tokens


def _write_stream(f: Any, table: pa.Table) -> None:
    sink = pa.PythonFile(f, mode="w")
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _remove_temporaries(folder: Path, rank: int) -> None:
    """Temporary files a crash left behind: this rank's, and (rank 0) the entry's own."""
    mine = (f".rank{rank:03d}.", f".rank{rank:03d}-")
    for tmp in folder.glob(".*.tmp"):
        if tmp.name.startswith(mine) or (rank == 0 and not tmp.name.startswith(".rank")):
            tmp.unlink(missing_ok=True)


def delete_shard_files(folder: Path, names: Sequence[str]) -> None:  # used by tests
    for n in names:
        (folder / n).unlink(missing_ok=True)


shard_file = shard_name
