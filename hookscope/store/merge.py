"""Merging per-node store folders into one store (``hookscope store merge OUT IN...``).

When the nodes of a multi-node ``torchrun`` extraction share no filesystem, each node's
``--out`` folder holds only its own ranks' files of the entry (``rankRRR.json``,
``rankRRR.tokens.arrow``, ``rankRRR-shard*.arrow`` and their ``.stats.safetensors``; the
node of rank 0 also ``columns.arrow``) and no manifest. :func:`merge_stores` gathers the
files of each entry key from every input into ``OUT/entries/<key[:20]>/``, after checking,
for every entry, before anything is written:

* every rank's state records the same key, key fields, sites, batch size, shard size and
  world size, and the example range that rank was given (the same split extraction makes);
* the ranks are disjoint (no rank in two inputs) and complete (``0 .. world-1``);
* every planned shard of every rank is recorded as done and its file and statistics are
  present at the recorded size; ``columns.arrow`` is present where the dataset has columns.

Files are hard-linked where the input and ``OUT`` share a filesystem, else copied (always
with ``copy=True``); each lands under a temporary name and is renamed into place, and the
manifest is written last, the way extraction's rank 0 writes it
(:func:`hookscope.store.store.write_manifest`), so an interrupted merge leaves an
unfinished entry that the same merge completes. Checksums are not recomputed here (that
reads every byte): ``hookscope store verify OUT`` checks every shard's sha256.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hookscope.errors import StoreError
from hookscope.store import files
from hookscope.store.store import MARKER, ActivationStore, write_manifest

__all__ = ["merge_stores", "MergeReport"]


class MergeReport(list):
    """``merge_stores``: one dict per entry (key, state, ranks, files linked / copied)."""

    def __repr__(self) -> str:
        if not self:
            return "nothing to merge: the inputs hold no entries"
        lines = []
        for e in self:
            if e["state"] == "already complete":
                lines.append(f"{e['key'][:12]}  already complete in the output")
            else:
                lines.append(
                    f"{e['key'][:12]}  merged ranks 0-{e['world'] - 1} from {len(e['inputs'])} "
                    f"folder(s): {e['rows']} rows, {e['linked']} files linked, "
                    f"{e['copied']} copied"
                )
        return "\n".join(lines)


def merge_stores(
    out: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    keys: Sequence[str] | None = None,
    copy: bool = False,
) -> MergeReport:
    """Merge the entries of the store folders ``inputs`` into the store ``out`` (created if
    missing; it may also be one of the inputs). An entry complete in one input is taken
    from that input alone. ``keys``: only the entries whose key starts with one of these
    prefixes. StoreError naming every problem, before any file is written,
    if an entry's ranks overlap, are incomplete or disagree (see the module docstring)."""
    sources = [_open_input(p) for p in inputs]
    if not sources:
        raise StoreError("pass at least one input store folder to merge")
    target = ActivationStore(out)
    found: dict[str, list[Path]] = {}
    for store in sources:
        for entry in sorted((store / "entries").iterdir()):
            if entry.is_dir() and (not keys or any(entry.name.startswith(k[:20]) for k in keys)):
                found.setdefault(entry.name, []).append(entry)
    if keys and not found:
        raise StoreError(f"no entry in the inputs starts with {', '.join(keys)}")
    plans, problems = [], []
    for name, folders in sorted(found.items()):
        dest = target.folder / "entries" / name
        if (dest / "manifest.json").exists():
            plans.append({"key": files.read_json(dest / "manifest.json")["key"], "done": True})
            continue
        complete = [f for f in folders if (f / "manifest.json").exists()]
        try:  # an input that holds the whole entry is taken alone
            plans.append(_plan(name, complete[:1] or folders))
        except StoreError as err:
            problems.append(f"entry {name[:12]}: {err}")
    if problems:
        raise StoreError("cannot merge; nothing was written. " + " | ".join(problems))
    report = MergeReport()
    for plan in plans:
        if plan.get("done"):
            report.append({"key": plan["key"], "state": "already complete"})
            continue
        report.append(_apply(plan, target.folder / "entries" / plan["key"][:20], copy))
    return report


def _open_input(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    if not (folder / MARKER).exists():
        raise StoreError(
            f"{folder} is not an activation store (no {MARKER}); pass the --out folder of "
            "each node's extraction"
        )
    ActivationStore(folder)  # checks the marker and its format version
    return folder.resolve()


def _plan(name: str, folders: list[Path]) -> dict[str, Any]:
    """Check one entry's rank files across the input folders; what to copy from where."""
    ranks: dict[int, tuple[Path, dict]] = {}
    for folder in folders:
        for path in sorted(folder.glob("rank*.json")):
            r = int(path.name[4:-5])
            state = files.read_json(path)
            if r in ranks and ranks[r][0] != folder:
                raise StoreError(
                    f"rank {r} is in both {ranks[r][0]} and {folder}; pass each node's folder "
                    "once (the ranks of the nodes must be disjoint)"
                )
            ranks[r] = (folder, state)
    if not ranks:
        raise StoreError(f"no rank files in {', '.join(map(str, folders))}")
    first_rank, (first_folder, first) = min(ranks.items())
    if "key" not in first:
        raise StoreError(
            f"{first_folder / f'rank{first_rank:03d}.json'} records no key (written before "
            "merging existed); extract it again with this hookscope"
        )
    same = ("key", "key_fields", "sites", "columns")
    for r, (folder, state) in sorted(ranks.items()):
        where = folder / f"rank{r:03d}.json"
        for field in same:
            if state.get(field) != first[field]:
                raise StoreError(
                    f"{where} records another {field} than rank {first_rank}; these folders "
                    "hold different extractions under one entry"
                )
        s, f = state["settings"], first["settings"]
        for field in ("world", "batch_size", "shard_bytes"):
            if s.get(field) != f.get(field):
                raise StoreError(
                    f"{where} ran with {field}={s.get(field)}, rank {first_rank} with "
                    f"{f.get(field)}; every rank of an entry must run with the same settings"
                )
    key = first["key"]
    if not key.startswith(name):
        raise StoreError(f"its rank files record key {key[:20]}, not the folder's name {name}")
    world = first["settings"]["world"]
    missing = [r for r in range(world) if r not in ranks]
    if missing:
        raise StoreError(
            f"the extraction ran with {world} processes; rank(s) {missing} are in none of the "
            "inputs: add the folder of the node that ran them"
        )
    if max(ranks) >= world:
        raise StoreError(f"rank {max(ranks)} does not belong to a {world}-process extraction")
    n, batch = first["key_fields"]["dataset"]["rows"], first["settings"]["batch_size"]
    n_batches = -(-n // batch)
    todo: list[tuple[Path, str]] = []
    for r in range(world):
        folder, state = ranks[r]
        lo, hi = r * n_batches // world, (r + 1) * n_batches // world
        want = [min(n, lo * batch), min(n, hi * batch)]
        if state["settings"]["examples"] != want:
            raise StoreError(
                f"rank {r} extracted examples {state['settings']['examples']}, not {want}"
            )
        unfinished = [s["index"] for s in state["plan"] if str(s["index"]) not in state["done"]]
        if unfinished:
            raise StoreError(
                f"rank {r} ({folder}) did not finish shards {unfinished}; run the same torchrun "
                "command on that node again (it resumes), then merge"
            )
        todo += [(folder, f"rank{r:03d}.json"), (folder, f"rank{r:03d}.tokens.arrow")]
        for s in state["plan"]:
            rec = state["done"][str(s["index"])]
            path = folder / rec["file"]
            size = path.stat().st_size if path.exists() else None
            if size != rec["bytes"]:
                got = "missing" if size is None else f"{size} bytes"
                raise StoreError(f"{path}: {got}, its rank file records {rec['bytes']} bytes")
            todo += [(folder, rec["file"]), (folder, rec["file"] + ".stats.safetensors")]
    for folder, file in todo:
        if not (folder / file).exists():
            raise StoreError(f"{folder / file} is missing")
    if first["columns"]:
        holders = [f for f in folders if (f / "columns.arrow").exists()]
        if not holders:
            raise StoreError(
                "columns.arrow (the dataset's own columns, written by the node of rank 0) is "
                f"in none of {', '.join(map(str, folders))}; add that node's folder"
            )
        todo.append((holders[0], "columns.arrow"))
    return {
        "key": key,
        "fields": first["key_fields"],
        "world": world,
        "shapes": {s["name"]: s["shape"] for s in first["sites"]},
        "settings": first["settings"],
        "columns": first["columns"],
        "todo": todo,
        "inputs": sorted({str(f.parent.parent) for f in folders}),  # the store folders
    }


def _apply(plan: dict, dest: Path, copy: bool) -> dict:
    """Link or copy the planned files into ``dest``, then write the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    linked = copied = 0
    for folder, name in plan["todo"]:
        src, dst = folder / name, dest / name
        if dst.exists() and (os.path.samefile(src, dst) or _same_bytes(src, dst)):
            continue
        if not copy and _link(src, dst):
            linked += 1
        else:
            with open(src, "rb") as fin:
                files.atomic_write(dst, lambda f, fin=fin: shutil.copyfileobj(fin, f, 1 << 22))
            copied += 1
    s = plan["settings"]
    manifest = write_manifest(
        dest, plan["key"], plan["fields"], plan["world"], plan["shapes"], s["batch_size"],
        s["shard_bytes"], plan["columns"], extra={"merged_from": plan["inputs"]},
    )  # fmt: skip
    return {
        "key": plan["key"],
        "state": "merged",
        "world": plan["world"],
        "rows": manifest["n_rows"],
        "inputs": plan["inputs"],
        "linked": linked,
        "copied": copied,
    }


def _link(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` to ``dst`` (through a temporary name); False where it cannot."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and files.sha256_file(a) == files.sha256_file(b)
