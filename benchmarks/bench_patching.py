"""Patching sweeps: hookscope against TransformerLens 4.x's ``transformer_lens.patching``.

Run from the repository root:

    .venv/bin/python benchmarks/bench_patching.py            # median of 3 repeats (~4 minutes)
    .venv/bin/python benchmarks/bench_patching.py --quick    # one repeat, shorter prompt

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
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_forward import cpu_name, timed  # noqa: E402

import hookscope as hs  # noqa: E402
from hookscope import interventions as iv  # noqa: E402

import builders  # noqa: E402


def gemm_table(repeats: int = 200) -> None:
    """GFLOP/s of torch's and oneDNN's fp32 linear at the sweeps' shapes (interleaved)."""
    from hookscope.interventions._forward_edits import _onednn_linear

    onednn = _onednn_linear()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, 12 tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    repeats, n_tok = (1, 12) if args.quick else (args.repeats, args.tokens)

    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        gemm_table()
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

    print(f"pythia-70m-shaped GPT-NeoX, batch 1 x {n_tok} tokens, median of {repeats} repeats")
    for title, fns in sweeps.items():
        names = list(fns)
        # agreement: every exact sweep equals TL's raw values
        theirs = fns[names[0]]().flatten().double()
        for name in names[1:]:
            res = fns[name]()
            raw = res.flat
            if res.normalised:
                b = res.baselines
                raw = raw * (b["clean"] - b["corrupted"]) + b["corrupted"]
            err = float((raw - theirs).abs().max())
            kind = "first-order estimate" if "attribution" in name else "exact"
            print(f"  {title}: {name} vs TL max |difference| {err:.2e} ({kind})")
        times = timed(fns, repeats)
        base = names[0]
        print(f"\n{title}")
        print(f"  {'variant':<42}{'median s':>10}{'min-max s':>18}{'TL / variant':>14}")
        for name in names:
            t = times[name]
            speed = statistics.median(a / b for a, b in zip(times[base], t, strict=True))
            print(
                f"  {name:<42}{statistics.median(t):>10.3f}"
                f"{f'{min(t):.3f}-{max(t):.3f}':>18}{speed:>13.1f}x"
            )
        print()


if __name__ == "__main__":
    main()
