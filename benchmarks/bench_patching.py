"""Patching sweeps: hookscope against TransformerLens 4.x's ``transformer_lens.patching``.

Run from the repository root:

    .venv/bin/python benchmarks/bench_patching.py            # median of 3 repeats (~12 minutes)
    .venv/bin/python benchmarks/bench_patching.py --quick    # one repeat, shorter prompt, 2 IOI pairs
    .venv/bin/python benchmarks/bench_patching.py --smollm2-only   # the SmolLM2 section alone

Model: the pythia-70m-shaped GPT-NeoX of ``tests/builders.py`` (``pythia_like(0)``: exact
config, random weights), float32, CPU, torch's default thread count; TransformerLens runs the
same weights through ``TransformerBridge.boot_transformers``. Inputs: batch 1 x 20 tokens,
the corrupted prompt differs from the clean one at 3 positions. Metric: the logit difference
of two tokens at the last position (a plain function of the logits for TransformerLens; the
structured ``iv.logit_diff`` for hookscope, whose normalised scores are converted back to raw
values to check that both sweeps agree).

Sweeps (each one full result, timed end to end from tokens and a clean cache):

* ``resid_pre`` by position: TL ``get_act_patch_resid_pre`` (one forward per layer x
  position, 120 here) vs ``iv.activation_patching(sites="resid_pre.*", positions="each")``
  vs ``iv.attribution_patching`` of the same sweep.
* head outputs, all positions: TL ``get_act_patch_attn_head_out_all_pos`` (48 forwards) vs
  ``sites="head.*.*"``.
* every block by position: TL ``get_act_patch_block_every`` (resid_pre, attn_out and mlp_out
  at each layer and position, 360 forwards) vs ``sites=["resid_pre.*", "attn_out.*",
  "mlp_out.*"], positions="each"``.
* the same hookscope sweeps with a plain-callable metric (full logits, no early readout),
  to show what reading only the metric's logits saves.

Each TL timing includes the clean ``run_with_cache`` whose cache its API takes; each
hookscope timing includes its own clean and corrupted runs. Ratios are medians over repeats
of (TL / hookscope) within the same repeat.

SmolLM2-135M (when installed: ``python -m hookscope.zoo install smollm2-135m``; skipped
otherwise): the IOI head sweep of issue 18, every head at all positions of 8 IOI pairs
(``hs.data.ioi``, ABC corruption, right-padded to one length, read at each prompt's last
token), hookscope against TL ``get_act_patch_attn_head_out_all_pos`` on the same weights
(saved with ``save_pretrained`` for ``boot_transformers``); ``--quick``: 2 pairs.

Every sweep also prints its compute limit: the FLOPs the exact results need
(``flops.exact_flops``: per job, the blocks from the patched one on, at the positions from
the job's first changed one to each row's read position, found from a clean and a
corrupted cached run), divided by the fp32 matrix-product rate measured in the same run
(``flops.gemm_rate``: one block's linear layers on 4096 rows, the better of torch and
oneDNN, the best sample before and after the sweep's timings), and each variant's time /
limit (1.0x would be the matrix products at full rate and nothing else). For SmolLM2 it then
lists the matrix products hookscope's sweep runs (a profiled call) and times each alone at
its shape (``flops.alone_seconds``): what those products need with nothing else running,
and what the rest of the sweep (attention, norms, rotary embeddings, copies) takes.

First, a table of the matrix products behind the sweeps: GFLOP/s of ``nn.functional.linear``
(MKL's sgemm in this torch build) and of oneDNN's ``mkldnn._linear_pointwise``, which
hookscope's sweep forwards use for fp32 linear layers, at pythia-70m's layer shapes and at
row counts of a baseline (40 rows) and of stacked sweep forwards. Not run by the tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' sweeps draw progress bars
# (read when tqdm is imported, which importing torch already does)

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import cpu_name, timed  # noqa: E402
from flops import Limit, alone_seconds, matrix_products, onednn_linear  # noqa: E402

import hookscope as hs  # noqa: E402
from hookscope import interventions as iv  # noqa: E402

import builders  # noqa: E402


def gemm_table(repeats: int = 200) -> None:
    """GFLOP/s of torch's and oneDNN's fp32 linear at the sweeps' shapes (interleaved)."""
    onednn = onednn_linear()
    if onednn is None:
        print("oneDNN linear: not available in this torch build / CPU (sweeps use torch's)\n")
        return
    print("fp32 linear, GFLOP/s (median of 5 samples):")
    print(f"  {'rows x in -> out':<22}{'torch (MKL)':>12}{'oneDNN':>10}{'ratio':>8}")
    g = torch.Generator().manual_seed(0)
    for rows in (40, 136, 680):
        for d_in, d_out in ((512, 1536), (512, 2048), (2048, 512)):
            x = torch.randn(rows, d_in, generator=g)
            w, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
            fns = {
                "torch": lambda x=x, w=w, b=b: torch.nn.functional.linear(x, w, b),
                "onednn": lambda x=x, w=w, b=b: onednn(x, w, b, "none", [], ""),
            }
            times = timed(fns, 5, number=repeats // 5)
            flop = 2 * rows * d_in * d_out / 1e9
            rate = {k: flop / statistics.median(v) for k, v in times.items()}
            print(
                f"  {f'{rows} x {d_in} -> {d_out}':<22}{rate['torch']:>12.0f}{rate['onednn']:>10.0f}"
                f"{rate['onednn'] / rate['torch']:>7.2f}x"
            )
    print()


def agreement(ours: torch.Tensor, theirs: torch.Tensor, exact: bool = True) -> str:
    """Max |difference| of two sweeps' raw values, absolute and relative to the largest
    value, with a verdict for an ``exact`` sweep: agreement to 1e-5 of the largest value
    (fp32 logits of size ~10 differ by ~1e-5 between summation orders)."""
    err = float((ours.double() - theirs.double()).abs().max())
    rel = err / max(1.0, float(theirs.double().abs().max()))
    text = f"max |difference| {err:.2e} ({rel:.1e} of the largest value)"
    if not exact:
        return f"{text}, a first-order estimate"
    return f"{text}: {'agree' if rel <= 1e-5 else 'DISAGREE (> 1e-5)'}"


def raw_values(res) -> torch.Tensor:
    """A hookscope result's raw metric values (normalised scores converted back)."""
    raw = res.flat
    if res.normalised:
        b = res.baselines
        raw = raw * (b["clean"] - b["corrupted"]) + b["corrupted"]
    return raw


def report(title: str, times: dict[str, list[float]], limit: float) -> None:
    """The timing table of one sweep: medians, spread, TL / variant and variant / limit."""
    names = list(times)
    base = names[0]
    print(f"\n{title}")
    print(f"  {'variant':<42}{'median s':>10}{'min-max s':>18}{'TL / variant':>14}{'/ limit':>9}")
    for name in names:
        t = times[name]
        speed = statistics.median(a / b for a, b in zip(times[base], t, strict=True))
        print(
            f"  {name:<42}{statistics.median(t):>10.3f}"
            f"{f'{min(t):.3f}-{max(t):.3f}':>18}{speed:>13.1f}x"
            f"{statistics.median(t) / limit:>8.2f}x"
        )
    print()


def samples(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Like :func:`bench_forward.timed` without its warm-up calls (for sweeps already run
    once, by the agreement check): ``repeats`` interleaved samples, order rotating."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def smollm2(quick: bool, repeats: int) -> None:
    """The IOI head sweep on SmolLM2-135M (all heads, all positions), hookscope vs TL."""
    try:
        model = hs.zoo.load("smollm2-135m")
    except hs.ModelLoadError:
        print("SmolLM2-135M: skipped (not installed; python -m hookscope.zoo install smollm2-135m)")
        return
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    n = 2 if quick else 8
    t = hs.data.ioi_tokens(hs.data.ioi(model.tokenizer, n=n), model.tokenizer)
    clean, corrupted = t.clean_tokens, t.corrupted_tokens
    metric = iv.logit_diff(t.correct, t.incorrect, position=t.end_pos)
    rows = torch.arange(n)

    def plain(logits: torch.Tensor) -> torch.Tensor:
        at = logits[rows, t.end_pos]
        return (at[rows, t.correct] - at[rows, t.incorrect]).mean()

    folder = Path(tempfile.mkdtemp(prefix="hookscope_bench_patching_smollm2_"))
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")

    def tl():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
            return patching.get_act_patch_attn_head_out_all_pos(bridge, corrupted, cache, plain)

    def ours():
        return iv.activation_patching(
            model, clean, corrupted, metric, sites="head.*.*", positions="all", progress=False
        )

    cfg = model.model.config
    print(
        f"SmolLM2-135M ({cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads), IOI "
        f"head sweep: {n} pairs x {clean.shape[1]} tokens (padded), all positions"
    )
    heads = [
        (f"head.{i}.{h}", None)
        for i in range(cfg.num_hidden_layers)
        for h in range(cfg.num_attention_heads)
    ]
    limit = Limit(model, clean, corrupted, heads, t.end_pos.tolist())
    limit.measure()
    fns = {"TL get_act_patch_attn_head_out_all_pos": tl, "hookscope activation_patching": ours}
    start = time.perf_counter()
    theirs = tl().flatten()
    first = {"TL get_act_patch_attn_head_out_all_pos": [time.perf_counter() - start]}
    start = time.perf_counter()
    raw = raw_values(ours())
    first["hookscope activation_patching"] = [time.perf_counter() - start]
    print(f"  hookscope vs TL raw values: {agreement(raw, theirs)}")
    if repeats > 1:
        times = samples(fns, repeats)
        title = f"SmolLM2-135M IOI head sweep, median of {repeats} repeats"
    else:
        times, title = first, "SmolLM2-135M IOI head sweep, first call (with warm-up)"
    limit.measure()
    print(f"  head sweep: {limit}")
    report(title, times, limit.seconds)
    products = matrix_products(ours)
    alone, flop = alone_seconds(products)
    rest = statistics.median(times["hookscope activation_patching"]) - alone
    print(
        f"  hookscope's matrix products: {sum(products.values())} calls, {flop / 1e12:.2f} TFLOP;"
        f" timed one by one at their shapes (the faster of torch and oneDNN, no post-ops):"
        f" {alone:.2f} s = {alone / limit.seconds:.2f}x the limit; the rest of its median"
        f" time: {rest:.2f} s = {rest / limit.seconds:.2f}x the limit\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, 12 tokens, 2 IOI pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--smollm2-only", action="store_true", help="the SmolLM2 section alone")
    args = parser.parse_args()
    repeats, n_tok = (1, 12) if args.quick else (args.repeats, args.tokens)

    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.smollm2_only:
        with torch.no_grad():
            gemm_table()
        pythia(n_tok, repeats)
    smollm2(args.quick, repeats)


def pythia(n_tok: int, repeats: int) -> None:
    """The sweeps on the pythia-70m-shaped model, hookscope vs TL."""
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    folder = Path(tempfile.mkdtemp(prefix="hookscope_bench_patching_"))
    hf = builders.pythia_like(0)
    hf.save_pretrained(folder)
    builders.make_tokenizer().save_pretrained(folder)
    model = hs.HookedModel.wrap(hf)
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50304, (1, n_tok), generator=g)
    corrupted = clean.clone()
    for p in (3, n_tok // 2, n_tok - 2):
        corrupted[0, p] = (clean[0, p] + 1000) % 50304
    with torch.no_grad():
        shift = (model(clean)[0, -1] - model(corrupted)[0, -1]).abs()
    correct, incorrect = (int(i) for i in shift.topk(2).indices)
    metric = iv.logit_diff(correct, incorrect)

    def plain(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, correct] - logits[:, -1, incorrect]).mean()

    def tl_sweep(name: str):
        def run():
            with torch.no_grad():
                _, cache = bridge.run_with_cache(clean)
                return getattr(patching, name)(bridge, corrupted, cache, plain)

        return run

    def ours(sites: str, positions: str, fn=iv.activation_patching, m=metric):
        return lambda: fn(
            model, clean, corrupted, m, sites=sites, positions=positions, progress=False
        )

    every = ["resid_pre.*", "attn_out.*", "mlp_out.*"]
    sweeps = {
        "resid_pre x pos": {
            "TL get_act_patch_resid_pre": tl_sweep("get_act_patch_resid_pre"),
            "hookscope activation_patching": ours("resid_pre.*", "each"),
            "hookscope, plain-callable metric": ours("resid_pre.*", "each", m=plain),
            "hookscope attribution_patching": ours(
                "resid_pre.*", "each", fn=iv.attribution_patching
            ),
        },
        "head outputs, all pos": {
            "TL get_act_patch_attn_head_out_all_pos": tl_sweep(
                "get_act_patch_attn_head_out_all_pos"
            ),
            "hookscope activation_patching": ours("head.*.*", "all"),
            "hookscope, plain-callable metric": ours("head.*.*", "all", m=plain),
            "hookscope attribution_patching": ours("head.*.*", "all", fn=iv.attribution_patching),
        },
        "every block x pos": {
            "TL get_act_patch_block_every": tl_sweep("get_act_patch_block_every"),
            "hookscope activation_patching": ours(every, "each"),
            "hookscope, plain-callable metric": ours(every, "each", m=plain),
            "hookscope attribution_patching": ours(every, "each", fn=iv.attribution_patching),
        },
    }
    cfg = hf.config
    layers, each = range(cfg.num_hidden_layers), range(n_tok)
    jobs = {
        "resid_pre x pos": [(f"resid_pre.{i}", p) for i in layers for p in each],
        "head outputs, all pos": [
            (f"head.{i}.{h}", None) for i in layers for h in range(cfg.num_attention_heads)
        ],
        "every block x pos": [
            (f"{kind}.{i}", p)
            for kind in ("resid_pre", "attn_out", "mlp_out")
            for i in layers
            for p in each
        ],
    }

    print(f"pythia-70m-shaped GPT-NeoX, batch 1 x {n_tok} tokens, median of {repeats} repeats")
    for title, fns in sweeps.items():
        limit = Limit(model, clean, corrupted, jobs[title], [n_tok - 1])
        limit.measure()
        names = list(fns)
        # agreement: every exact sweep equals TL's raw values
        theirs = fns[names[0]]().flatten()
        for name in names[1:]:
            diff = agreement(raw_values(fns[name]()), theirs, exact="attribution" not in name)
            print(f"  {title}: {name} vs TL {diff}")
        times = timed(fns, repeats)
        limit.measure()
        print(f"  {title}: {limit}")
        report(title, times, limit.seconds)


if __name__ == "__main__":
    main()
