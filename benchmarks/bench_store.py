"""The activation store against plain forwards and the peers' write paths (issue 13).

Run from the repository root:

    .venv/bin/python benchmarks/bench_store.py                  # 512 x 128 tokens (~25 minutes on 2 busy cores)
    .venv/bin/python benchmarks/bench_store.py --rss-factor 4   # a smaller data factor for the RSS check
    .venv/bin/python benchmarks/bench_store.py --quick          # 64 x 32 tokens (smoke run)

Model: the pythia-70m-shaped GPT-NeoX of ``tests/builders.py`` (``pythia_like(0)``: exact config,
random weights) saved with ``save_pretrained`` and loaded with ``HookedModel.from_pretrained``,
float32, CPU, torch's default thread count, everything under ``torch.no_grad()``. Data: texts of
random words (seed 0) cut to exactly 128 tokens (``max_length``), so every batch is 32 x 128
without padding. Stored: the 6 layers' ``resid_post`` at every position, float16 (6 KiB a row).

* (a) **Extraction**: the whole ``store.extract(...)`` call on a fresh folder (tokenising, key,
  probe, forwards, writes, fsyncs, manifest) against the plain Hugging Face forward of the same
  batches (``hf(ids, attention_mask, use_cache=False)``, full logits) and against the compute
  floor: hookscope's ``run_with_cache`` of the 6 sites with the unembedding skipped, writing
  nothing. Variants interleave (order rotating per repeat); a ratio is the median over repeats
  of the ratio within one repeat.
* (b) **Peak RSS** (``VmHWM``) of a fresh subprocess that loads the model and extracts N x 128
  tokens, for N = 512 and N = 512 x ``--rss-factor``: the whole process's, and the extraction's
  alone (the peak reset through ``/proc/self/clear_refs`` after loading).
* (c) **Re-read**: one layer (``resid_post.3``) read from the store into memory (a fresh
  ``StoredActivations`` each time, ``torch.cat`` of its shards' memory-mapped tensors: one
  copy; median of 5, after one warm-up read: warm page cache)
  against recomputing it (forwards through block 3, stopped there, over all batches).
* (d) **Bytes on disk**: the shard files against the payload (rows x 6 x 512 x 2 bytes), and
  the whole entry folder (with the per-shard statistics, tokens, manifest).
* (e) **Peers, same data**: TransformerLens' ``TransformerBridge.boot_transformers`` on the same
  folder, ``run_with_cache(tokens, names_filter=<6 hook_resid_post>, stop_at_layer=6)`` (as
  SAELens calls it), then (1) ``torch.save`` of the 6 float16 tensors per batch, read back with
  ``torch.load(mmap=True)``; (2) the Hugging Face datasets path of SAELens'
  ``CacheActivationsRunner``: ``Dataset.from_dict({hook: [batch, 128, 512]}, features=
  Array2D(float16) ...)`` + ``save_to_disk`` per batch, read back with ``load_from_disk`` +
  ``concatenate_datasets`` + ``with_format("torch")``. Both reuse one bridge forward per batch
  (timed once); write time = that forward + the variant's saving.

Figures go to ``results/bench_store.json`` (versions, seed, machine load, every number). No test
runs this; single timings on a shared 2-core VM vary by 10-20 %: read ratios with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hookscope as hs  # noqa: E402
from hookscope.scope import Scope  # noqa: E402
from hookscope.store import ActivationStore, StoredActivations  # noqa: E402

import builders  # noqa: E402

SEED = 0
SITES = [f"resid_post.{i}" for i in range(6)]
HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(6)]
READ_SITE, READ_LAYER = "resid_post.3", 3
WORDS = (
    "the of and store John Mary drink park ball keys cabinet table fox dog quick brown lazy "
    "argument Tom Anna when went gave said afterwards long 0123 456789"
).split()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def texts(n: int, seed: int = SEED) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 200)) for _ in range(n)]


def dataset(n: int, length: int, tokenizer):
    import datasets

    t = texts(n)
    lengths = set()
    for at in range(0, n, 256):  # in chunks: the RSS children measure this process
        enc = tokenizer(t[at : at + 256], truncation=True, max_length=length)
        lengths |= {len(ids) for ids in enc["input_ids"]}
    assert lengths == {length}, f"texts must give {length} tokens each, got {lengths}"
    return datasets.Dataset.from_dict({"text": t})


def batches(tokenizer, ds, length: int, batch_size: int) -> list[dict]:
    """The extraction's batches: its tokens, cut the same way."""
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size]}
        for i in range(0, len(ids), batch_size)
    ]


def extract(model, ds, folder: Path, length: int, batch_size: int):
    shutil.rmtree(folder, ignore_errors=True)
    store = ActivationStore(folder)
    acts = store.extract(
        model, ds, sites=SITES, positions="all", max_length=length, batch_size=batch_size,
        dtype="float16", progress=False,
    )  # fmt: skip
    return store, acts


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------- (b) RSS child


def peak_rss_mib() -> float:
    """This process's peak RSS since exec (VmHWM). ``ru_maxrss`` would not do: Linux carries
    it over from the parent at fork and keeps it across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def rss_child(args: argparse.Namespace) -> None:
    """Extract in a fresh process and print its peak RSS (the parent runs this)."""
    start = time.perf_counter()
    model = hs.HookedModel.from_pretrained(args.model_folder)
    ds = dataset(args.examples, args.length, model.tokenizer)
    loaded = peak_rss_mib()
    clear = Path("/proc/self/clear_refs")
    if clear.exists():
        clear.write_text("5")  # the peak starts again from the current RSS
    with torch.no_grad():
        _, acts = extract(model, ds, Path(args.store), args.length, args.batch_size)
    during = peak_rss_mib()
    shutil.rmtree(args.store, ignore_errors=True)
    result = {
        "examples": args.examples,
        "rows": acts.n_rows,
        "shards": len(acts.shards),
        "payload_mib": acts.n_rows * 6 * 512 * 2 / 2**20,
        "peak_loading_mib": loaded,
        "peak_extracting_mib": during,
        "peak_mib": max(loaded, during),
        "seconds": time.perf_counter() - start,
    }
    print("RSS " + json.dumps(result), flush=True)


def rss_run(folder: Path, examples: int, length: int, batch_size: int, store: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--rss-child", "--model-folder", str(folder),
        "--examples", str(examples), "--length", str(length), "--batch-size", str(batch_size),
        "--store", str(store),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RSS "))
    return json.loads(line[4:])


# ---------------------------------------------------------------------- peers


def peers(folder: Path, work: Path, token_batches: list[dict], n_layers: int) -> dict:
    """TransformerLens forwards + torch.save, and SAELens' datasets path, on the same tokens."""
    import datasets
    from datasets import Array2D, Features, Sequence, Value
    from transformer_lens.model_bridge import TransformerBridge

    datasets.disable_progress_bars()
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    length = token_batches[0]["input_ids"].shape[1]
    features = Features(
        {
            **{h: Array2D(shape=(length, 512), dtype="float16") for h in HOOKS},
            "token_ids": Sequence(Value("int32"), length=length),
        }
    )
    pt_dir, hf_dir = work / "torch_save", work / "hf_datasets"
    for d in (pt_dir, hf_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    forward = save_pt = save_hf = 0.0
    for k, batch in enumerate(token_batches):
        ids = batch["input_ids"]
        start = time.perf_counter()
        _, cache = bridge.run_with_cache(ids, names_filter=HOOKS, stop_at_layer=n_layers)
        acts = {h: cache[h].to(torch.float16) for h in HOOKS}
        forward += time.perf_counter() - start
        start = time.perf_counter()
        torch.save(acts, pt_dir / f"batch{k:05d}.pt")
        save_pt += time.perf_counter() - start
        start = time.perf_counter()
        shard = datasets.Dataset.from_dict(
            {**{h: acts[h].numpy() for h in HOOKS}, "token_ids": ids.to(torch.int32).numpy()},
            features=features,
        )
        shard.save_to_disk(str(hf_dir / f"shard_{k}"), num_shards=1)
        save_hf += time.perf_counter() - start
        del cache, acts, shard
    pt_files = sorted(pt_dir.glob("*.pt"))
    hook = HOOKS[READ_LAYER]

    def read_pt() -> torch.Tensor:
        parts = [torch.load(p, mmap=True, weights_only=True)[hook] for p in pt_files]
        return torch.cat(parts).reshape(-1, 512)

    def read_hf() -> torch.Tensor:
        shards = [datasets.load_from_disk(str(hf_dir / f"shard_{k}")) for k in range(len(pt_files))]
        ds = datasets.concatenate_datasets(shards).with_format("torch", columns=[hook])
        return ds[:][hook].reshape(-1, 512)

    out = {"forward_s": forward}
    for name, save_s, read, d in (
        ("torch_save", save_pt, read_pt, pt_dir),
        ("hf_datasets", save_hf, read_hf, hf_dir),
    ):
        x = read()  # warm
        reads = [timed(read) for _ in range(3)]
        out[name] = {
            "save_s": save_s,
            "write_s": forward + save_s,
            "read_s": statistics.median(reads),
            "read_gb_s": x.numel() * x.element_size() / statistics.median(reads) / 1e9,
            "bytes": folder_bytes(d),
            "layer": x,
        }
    return out


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 x 32 tokens, batch 16")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of (a)")
    parser.add_argument("--rss-factor", type=int, default=10, help="data factor of (b)")
    parser.add_argument("--rss-only", action="store_true", help="only (b), the peak RSS")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_store.json"))
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-folder", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args)
    n = args.examples or (64 if args.quick else 512)
    length = args.length or (32 if args.quick else 128)
    batch_size = args.batch_size or (16 if args.quick else 32)

    from importlib.metadata import version

    versions = {
        p: version(p)
        for p in ("torch", "transformers", "transformer-lens", "datasets", "pyarrow", "numpy")
    }
    versions["python"] = platform.python_version()
    versions["hookscope"] = hs.__version__
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    load_before = loadavg()
    print(
        f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"load average {', '.join(map(str, load_before))}"
    )
    print(
        f"model: pythia-70m-shaped GPT-NeoX (random weights), float32; {n} x {length} tokens, "
        f"batch {batch_size}; 6 x resid_post, positions='all', float16; seed {SEED}",
        flush=True,
    )
    torch.manual_seed(SEED)
    results: dict = {
        "versions": versions,
        "seed": SEED,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "config": {"examples": n, "length": length, "batch_size": batch_size, "sites": SITES},
    }
    if args.rss_only:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            folder = builders.save_pythia_like(Path(tmp) / "model", SEED)
            rss = rss_section(folder, n, length, batch_size, args.rss_factor, Path(tmp))
        results["rss"] = rss
        results["machine"]["load_before"] = load_before
        results["machine"]["load_after"] = loadavg()
        report_rss(rss)
        return write(results, args.out)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp, torch.no_grad():
        tmp = Path(tmp)
        folder = builders.save_pythia_like(tmp / "model", SEED)
        model = hs.HookedModel.from_pretrained(str(folder))
        hf = model.model
        ds = dataset(n, length, model.tokenizer)
        token_batches = batches(model.tokenizer, ds, length, batch_size)
        payload = n * length * 6 * 512 * 2

        # (a) extraction against the plain forward and the compute floor
        def plain(token_batches=token_batches) -> None:
            for b in token_batches:
                hf(**b, use_cache=False)

        def floor(token_batches=token_batches) -> None:
            with Scope() as scope:
                scope.replace_forward(hf.get_output_embeddings(), lambda h, *a, **k: h)
                for b in token_batches:
                    model.run_with_cache(b, names=SITES)

        def extraction(ds=ds, folder=tmp / "store") -> None:
            extract(model, ds, folder, length, batch_size)

        fns = {
            "plain HF forward (full logits)": plain,
            "compute floor": floor,
            "store.extract": extraction,
        }
        names = list(fns)
        times: dict[str, list[float]] = {k: [] for k in names}
        # warm-up on the first two batches: page faults of the weights, the model's weight
        # fingerprint (computed once per model), first calls
        plain(token_batches[:2])
        floor(token_batches[:2])
        extraction(ds.select(range(2 * batch_size)), tmp / "warm")
        for r in range(args.repeats):
            for name in names[r % 3 :] + names[: r % 3]:
                times[name].append(timed(fns[name]))
                print(f"  repeat {r}: {name}: {times[name][-1]:.1f} s", flush=True)
        store, acts = extract(model, ds, tmp / "store", length, batch_size)

        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        ext, base, fl = names[2], names[0], names[1]
        results["extraction"] = {
            "seconds": times,
            "extract_over_plain": ratio(ext, base),
            "extract_over_floor": ratio(ext, fl),
        }
        # the stored rows are the compute floor's activations, bitwise
        b0 = token_batches[0]
        _, cache = model.run_with_cache(b0, names=SITES[-1])
        rows0 = cache[SITES[-1]].reshape(-1, 512).to(torch.float16)
        assert torch.equal(acts[SITES[-1]][: rows0.shape[0]], rows0)

        # (c) re-read one layer against recomputing it
        class Stop(Exception):
            pass

        def stop(module, args, out):
            raise Stop

        def recompute() -> None:
            handle = hf.gpt_neox.layers[READ_LAYER].register_forward_hook(stop)
            try:
                for b in token_batches:
                    try:
                        hf(**b, use_cache=False)
                    except Stop:
                        pass
            finally:
                handle.remove()

        def read() -> torch.Tensor:  # into memory: one copy out of the page cache
            return torch.cat(StoredActivations(acts.folder, acts.manifest).shard_tensors(READ_SITE))

        layer = read()  # warm
        reads = [timed(read) for _ in range(5)]
        get_s = timed(
            lambda: store.get(model, ds, SITES, "all", max_length=length, dtype="float16")
        )
        recompute_s = timed(recompute)
        read_s = statistics.median(reads)
        results["reread"] = {
            "read_s": read_s,
            "read_gb_s": layer.numel() * 2 / read_s / 1e9,
            "get_s": get_s,
            "recompute_s": recompute_s,
            "recompute_over_read": recompute_s / read_s,
        }

        # (d) bytes on disk
        shard_bytes = sum(s["bytes"] for s in acts.shards)
        results["bytes"] = {
            "payload": payload,
            "shards": shard_bytes,
            "entry": folder_bytes(acts.folder),
            "shards_over_payload": shard_bytes / payload - 1,
            "entry_over_payload": folder_bytes(acts.folder) / payload - 1,
        }

        # (e) peers
        print("  peers ...", flush=True)
        peer = peers(folder, tmp / "peers", token_batches, len(hf.gpt_neox.layers))
        for key in ("torch_save", "hf_datasets"):
            diff = (peer[key].pop("layer").float() - layer.float()).abs().max().item()
            peer[key]["max_abs_diff_vs_store"] = diff
        results["peers"] = peer

        # (b) peak RSS, fresh processes
        results["rss"] = rss_section(folder, n, length, batch_size, args.rss_factor, tmp)
    results["machine"]["load_before"] = load_before
    results["machine"]["load_after"] = loadavg()
    report(results, names, times, payload)
    write(results, args.out)


def write(results: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out}")


def rss_section(folder: Path, n: int, length: int, batch_size: int, factor: int, tmp: Path) -> dict:
    print("  RSS subprocesses ...", flush=True)
    small = rss_run(folder, n, length, batch_size, tmp / "rss_store")
    big = rss_run(folder, n * factor, length, batch_size, tmp / "rss_store")
    return {
        "factor": factor,
        "small": small,
        "big": big,
        "increase": big["peak_mib"] / small["peak_mib"] - 1,
        "increase_extracting": big["peak_extracting_mib"] / small["peak_extracting_mib"] - 1,
    }


def report_rss(rss: dict) -> None:
    print(f"\n## (b) Peak RSS, fresh process (data x{rss['factor']})")
    print(
        f"{'examples':>9}{'rows':>10}{'shards':>8}{'payload MiB':>13}{'peak MiB':>10}"
        f"{'loading':>9}{'extracting':>12}{'s':>7}"
    )
    for k in ("small", "big"):
        x = rss[k]
        print(
            f"{x['examples']:>9}{x['rows']:>10}{x['shards']:>8}{x['payload_mib']:>13.0f}"
            f"{x['peak_mib']:>10.0f}{x['peak_loading_mib']:>9.0f}{x['peak_extracting_mib']:>12.0f}"
            f"{x['seconds']:>7.0f}"
        )
    met = "met" if rss["increase"] < 0.10 else "NOT met"
    print(
        f"peak RSS increase: {100 * rss['increase']:+.1f}% (target < 10%: {met}); while "
        f"extracting: {100 * rss['increase_extracting']:+.1f}%"
    )


def report(r: dict, names: list[str], times: dict, payload: int) -> None:
    ext = r["extraction"]
    print(f"\n## (a) Extraction of {payload / 2**20:.0f} MiB, {len(times[names[0]])} repeats")
    print(f"{'variant':<34}{'median s':>10}{'min-max s':>14}")
    for name in names:
        ts = times[name]
        print(f"{name:<34}{statistics.median(ts):>10.1f}{f'{min(ts):.1f}-{max(ts):.1f}':>14}")
    met = "met" if ext["extract_over_plain"] <= 1.10 else "NOT met"
    print(
        f"store.extract / plain forward: {ext['extract_over_plain']:.3f}x (target <= 1.10x: {met})"
    )
    print(f"store.extract / compute floor: {ext['extract_over_floor']:.3f}x")

    report_rss(r["rss"])

    rr = r["reread"]
    print(f"\n## (c) Re-read {READ_SITE}")
    print(
        f"read {rr['read_s'] * 1e3:.1f} ms ({rr['read_gb_s']:.2f} GB/s, warm page cache; "
        f"store.get key check {rr['get_s'] * 1e3:.0f} ms), recompute {rr['recompute_s']:.1f} s: "
        f"{rr['recompute_over_read']:.0f}x (target >= 50x: "
        f"{'met' if rr['recompute_over_read'] >= 50 else 'NOT met'}; >= 1 GB/s: "
        f"{'met' if rr['read_gb_s'] >= 1 else 'NOT met'})"
    )

    b = r["bytes"]
    print("\n## (d) Bytes on disk")
    print(
        f"payload {b['payload'] / 2**20:.1f} MiB; shard files {b['shards'] / 2**20:.1f} MiB "
        f"({100 * b['shards_over_payload']:+.2f}%, target <= +2%: "
        f"{'met' if b['shards_over_payload'] <= 0.02 else 'NOT met'}); whole entry with "
        f"statistics {b['entry'] / 2**20:.1f} MiB ({100 * b['entry_over_payload']:+.2f}%)"
    )

    p = r["peers"]
    floor_s = statistics.median(times[names[1]])
    print("\n## (e) Write and read paths, same tokens")
    print(
        f"{'path':<44}{'write s':>9}{'x floor':>9}{'read ms':>9}{'GB/s':>7}{'MiB':>8}{'max|diff|':>11}"
    )
    rows = [
        (
            "hookscope store.extract (forward+write)",
            statistics.median(times[names[2]]),
            rr["read_s"],
            rr["read_gb_s"],
            b["entry"],
            0.0,
        )
    ]
    for key, label in (
        ("torch_save", "TL bridge run_with_cache + torch.save"),
        ("hf_datasets", "TL bridge + datasets save_to_disk (SAELens)"),
    ):
        x = p[key]
        rows.append(
            (
                label,
                x["write_s"],
                x["read_s"],
                x["read_gb_s"],
                x["bytes"],
                x["max_abs_diff_vs_store"],
            )
        )
    for label, w, rd, gbs, nbytes, diff in rows:
        print(
            f"{label:<44}{w:>9.1f}{w / floor_s:>9.2f}{rd * 1e3:>9.0f}{gbs:>7.2f}"
            f"{nbytes / 2**20:>8.0f}{diff:>11.1e}"
        )
    print(
        f"(TL forward alone {p['forward_s']:.1f} s; saving: torch.save "
        f"{p['torch_save']['save_s']:.1f} s, datasets {p['hf_datasets']['save_s']:.1f} s)"
    )
    print(f"load average before {r['machine']['load_before']}, after {r['machine']['load_after']}")


if __name__ == "__main__":
    main()
