"""The ``hookscope store`` commands (see :mod:`hookscope.cli` for the command line as a whole
and :mod:`hookscope.store` for the store itself)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hookscope.cli import (
    PROG,
    CLIError,
    _choice,
    _output_folder,
    _positive_int,
)
from hookscope.errors import HookscopeError, format_choices, suggestion

__all__ = ["add_store_parser"]

# ---------------------------------------------------------------------- store

STORE_DTYPES = ("float32", "float16", "bfloat16")
DIST_TIMEOUT_HOURS = 24  # ranks wait at most this long for each other at a barrier
#: --data NAME[:ARG] -> (what it is, default text column or None for images)
STORE_DATA = {
    "agreement": ("agreement:N  subject-verb agreement prompts", "prompt"),
    "ioi": ("ioi:N        IOI clean prompts", "clean"),
    "factual": ("factual      curated facts (one-token answers for this tokenizer)", "prompt"),
    "digits": ("digits[:S]   8x8 digit images (S: train, test or all; default --split)", None),
}
DATA_FILES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _size(text: str) -> int:
    """Bytes, with an optional K / M / G suffix (powers of 1024): 512M, 2G, 65536."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    number, unit = (text[:-1], text[-1].lower()) if text[-1:].isalpha() else (text, "")
    try:
        value = int(float(number) * units[unit]) if unit else int(number)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected a size like 512M or 65536, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte; got {text}")
    return value


def _store_epilog() -> str:
    data = "\n".join(f"  {desc}" for desc, _ in STORE_DATA.values())
    return (
        f"--data (task data, built for the model's tokenizer):\n{data}\n"
        "  or a folder saved with datasets' save_to_disk (a DatasetDict: --split picks one),\n"
        "  or a .jsonl / .json / .csv / .parquet file\n\n"
        f"--model: a zoo model (hookscope localize --help lists them) or a local Hugging Face "
        "folder\n\n"
        "examples:\n"
        "  hookscope store extract --model smollm2-135m --data agreement:2000 \\\n"
        "      --sites 'resid_post.*' 'head.3.*' --positions last --dtype float16 --out acts/\n"
        "  torchrun --nproc_per_node 2 -m hookscope store extract ...   (same result)"
    )


def add_store_parser(sub: Any) -> None:
    store = sub.add_parser(
        "store",
        help="extract activations into a store (resumable, data-parallel); ls, verify, merge",
        description="Activation stores: extract once (resumable, data-parallel under "
        "torchrun), read many times. See hookscope.store for the disk format.",
    )
    actions = store.add_subparsers(dest="action", metavar="ACTION", required=True)
    ex = actions.add_parser(
        "extract",
        help="extract sites of a model over a dataset into a store folder",
        description=textwrap.fill(
            "Extract --sites of --model over --data into the store --out, keyed by the "
            "model's weights, the sites, positions, data, preprocessing and dtype. The same "
            "command again returns at once (complete) or resumes at the first missing shard "
            "(interrupted). Under torchrun every rank extracts a contiguous block of batches "
            "and the result is bitwise equal to a single-process run.",
            width=78,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog_factory=_store_epilog,
    )
    ex.add_argument("--model", required=True, metavar="M", help="zoo name or local HF folder")
    ex.add_argument("--data", required=True, metavar="D", help="task data or a path (below)")
    ex.add_argument(
        "--sites",
        required=True,
        nargs="+",
        metavar="SEL",
        help="addresses or selections, space- or comma-separated: 'resid_post.*' head.1.*",
    )
    ex.add_argument(
        "--positions",
        default=None,
        metavar="P",
        help="last | mean | all | an int | ints like 0,-1 | a dataset column "
        "(default: last; image for vision models)",
    )
    ex.add_argument("--out", required=True, metavar="DIR", help="store folder")
    ex.add_argument(
        "--text-column", default=None, metavar="COL", help="default: the task's, else 'text'"
    )
    ex.add_argument(
        "--input-column", default="image", metavar="COL", help="images (default 'image')"
    )
    ex.add_argument("--batch-size", type=_positive_int, default=32, metavar="N")
    ex.add_argument(
        "--dtype",
        type=_choice(STORE_DTYPES),
        default="float32",
        metavar="{float32,float16,bfloat16}",
    )
    ex.add_argument("--split", default="train", metavar="S", help="split name (default train)")
    ex.add_argument("--max-length", type=_positive_int, default=None, metavar="N")
    ex.add_argument("--template", default="{text}", metavar="T", help="e.g. 'Q: {text} A:'")
    ex.add_argument("--shard-size", type=_size, default=None, metavar="BYTES", help="default 128M")
    ex.add_argument(
        "--device",
        default=None,
        metavar="DEV",
        help="default: cuda:LOCAL_RANK where CUDA is available, else cpu",
    )
    ex.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ex.set_defaults(run=_store_extract)
    ls = actions.add_parser("ls", help="list the entries of a store")
    ls.add_argument("folder", metavar="DIR")
    ls.set_defaults(run=_store_ls)
    ver = actions.add_parser(
        "verify", help="check every shard's size and sha256; exit status 1 on a problem"
    )
    ver.add_argument("folder", metavar="DIR")
    ver.set_defaults(run=_store_verify)
    mer = actions.add_parser(
        "merge",
        help="merge per-node store folders (multi-node torchrun, no shared filesystem)",
        description=textwrap.fill(
            "Gather each entry's rank files from the input store folders into OUT (hard "
            "links where possible, else copies), check that the ranks are disjoint, complete "
            "and agree, and write the manifest. Nothing is written if a check fails.",
            width=78,
        ),
    )
    mer.add_argument("out", metavar="OUT", help="the merged store (created if missing)")
    mer.add_argument("inputs", nargs="+", metavar="IN", help="each node's --out folder")
    mer.add_argument(
        "--key", action="append", default=None, metavar="PREFIX", help="only these entries"
    )
    mer.add_argument("--copy", action="store_true", help="copy files, never hard-link")
    mer.set_defaults(run=_store_merge)


@contextlib.contextmanager
def _process_group() -> Iterator[tuple[int, int, int]]:
    """torchrun's process group for the command, as (rank, world size, local rank); a single
    process outside torchrun. nccl where CUDA is available, gloo otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        yield 0, 1, 0
        return
    import datetime

    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # the caller's group (main() called from a script)
        yield dist.get_rank(), dist.get_world_size(), local
        return
    options: dict[str, Any] = {"timeout": datetime.timedelta(hours=DIST_TIMEOUT_HOURS)}
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise CLIError(
                f"LOCAL_RANK {local} but {torch.cuda.device_count()} GPU(s) on this node; "
                "run at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local)
        options.update(backend="nccl", device_id=torch.device("cuda", local))
    else:
        options.update(backend="gloo")
    dist.init_process_group(**options)
    try:
        yield dist.get_rank(), dist.get_world_size(), local
    finally:
        dist.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _load_store_model(name: str, device: str) -> Any:
    from hookscope import zoo
    from hookscope.model import HookedModel

    if name in zoo.names():
        return zoo.load(name, device=device)
    if Path(name).is_dir():
        return HookedModel.from_pretrained(name, device=device)
    raise CLIError(
        f"--model {name}: neither a zoo model nor a folder; zoo models: "
        f"{format_choices(zoo.names())}." + suggestion(name, zoo.names())
    )


def _load_store_data(spec: str, model: Any, split: str) -> tuple[Any, str]:
    """The dataset of --data and its default text column."""
    import datasets

    path = Path(spec)
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(
                f"--data {spec}: not a dataset saved with save_to_disk ({err})"
            ) from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise CLIError(
                    f"--data {spec} holds splits {', '.join(data)}; pick one with --split"
                )
            data = data[split]
        return data, "text"
    if path.is_file():
        if path.suffix not in DATA_FILES:
            raise CLIError(f"--data {spec}: a data file must end in {', '.join(DATA_FILES)}")
        try:
            return datasets.load_dataset(
                DATA_FILES[path.suffix], data_files=str(path), split="train"
            ), "text"
        except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
            raise CLIError(
                f"--data {spec}: cannot read it ({' '.join(str(err).split())})"
            ) from None
    name, _, arg = spec.partition(":")
    if name not in STORE_DATA:
        raise CLIError(
            f"--data {spec}: neither a path nor task data ({', '.join(STORE_DATA)}, e.g. "
            "agreement:2000)." + suggestion(name, STORE_DATA)
        )
    from hookscope import data as hs_data

    if name == "digits":
        return hs_data.digits(arg or split), "image"
    if name == "factual":
        return hs_data.factual_recall(model.tokenizer), "prompt"
    if not arg.isdigit() or int(arg) < 1:
        raise CLIError(f"--data {name}:N needs a positive number of rows, e.g. {name}:2000")
    if name == "agreement":
        return hs_data.agreement(int(arg), tokenizer=model.tokenizer), "prompt"
    return hs_data.ioi(model.tokenizer, int(arg)), "clean"


def _positions(text: str | None, model: Any) -> Any:
    if text is None:
        return "last" if model.tokenizer is not None else "image"
    numbers = text.replace(" ", "").split(",")
    if all(n.lstrip("-").isdigit() for n in numbers):
        values = [int(n) for n in numbers]
        return values[0] if "," not in text else values
    return text


def _store_extract(args: argparse.Namespace) -> int:
    from hookscope.errors import StoreError
    from hookscope.store import ActivationStore

    with _process_group() as (rank, world, local):
        try:
            import torch

            device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
            from hookscope.hf_compat import progress_bars

            with progress_bars(not args.no_progress):
                model = _load_store_model(args.model, device)
            data, text_column = _load_store_data(args.data, model, args.split)
            if rank == 0:  # one process creates the store; the others open it after
                _output_folder(args.out)
                store = ActivationStore(args.out)
            _barrier(world)
            if rank != 0:
                store = ActivationStore(args.out)
            options = {"shard_bytes": args.shard_size} if args.shard_size else {}
            try:
                acts = store.extract(
                    model,
                    data,
                    sites=[s for text in args.sites for s in text.split(",") if s],
                    positions=_positions(args.positions, model),
                    text_column=args.text_column or text_column,
                    input_column=args.input_column,
                    batch_size=args.batch_size,
                    dtype=args.dtype,
                    split=args.split,
                    max_length=args.max_length,
                    template=args.template,
                    progress=not args.no_progress,
                    **options,
                )
            except StoreError as err:
                here = getattr(err, "ranks_here", None)
                if here is None:
                    raise
                if rank == min(here):  # this node's ranks are done: not a failure
                    print(f"{PROG}: {' '.join(str(err).split())}", file=sys.stderr)
                return 0
        except (CLIError, HookscopeError) as err:
            if world == 1:
                raise
            raise CLIError(f"[rank {rank}] {err}") from None
        if rank == 0:
            print(repr(acts))
            print(f"wrote {acts.folder}")
    return 0


def _existing_store(text: str) -> Any:
    from hookscope.store import ActivationStore
    from hookscope.store.store import MARKER

    if not (Path(text) / MARKER).is_file():
        raise CLIError(f"{text} is not an activation store (no {MARKER} in it)")
    return ActivationStore(text)


def _store_ls(args: argparse.Namespace) -> int:
    print(repr(_existing_store(args.folder).list()))
    return 0


def _store_verify(args: argparse.Namespace) -> int:
    report = _existing_store(args.folder).verify()
    print(repr(report))
    return 0 if report.ok else 1


def _store_merge(args: argparse.Namespace) -> int:
    from hookscope.store.merge import merge_stores

    for folder in args.inputs:
        _existing_store(folder)
    report = merge_stores(args.out, args.inputs, keys=args.key, copy=args.copy)
    print(repr(report))
    if any(e["state"] == "merged" for e in report):
        print(f"wrote {args.out} (check its checksums with: {PROG} store verify {args.out})")
    return 0
