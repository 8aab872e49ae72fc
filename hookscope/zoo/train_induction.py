"""Train the shipped ``tiny-induction`` model: a 2-layer pythia-style GPT-NeoX that forms
induction heads on repeated random token sequences.

    python -m hookscope.zoo.train_induction            # writes hookscope/zoo/weights/tiny-induction/

The data are :func:`hookscope.data.induction.induction_tensors` sequences
``[bos] + prefix + prefix + filler`` with the prefix length drawn per sample from
``PREFIX_LEN`` (a fixed offset would let the model copy by position and skip the
previous-token head). The loss is ordinary next-token cross-entropy at every position.
After training, :func:`hookscope.zoo.induction.induction_circuit` scores every head on a
held-out evaluation set (seed ``EVAL_SEED``), picks the circuit and verifies it by
zero-ablation; the numbers go into ``card.json`` next to ``model.safetensors``, with the
sha256 of the weights (checked when the model is loaded).

Seeded (torch and numpy), single process, CPU: a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hookscope.data.induction import induction_tensors
from hookscope.zoo.induction import induction_circuit
from hookscope.zoo.shipped import WEIGHTS_DIR, build_module, save_weights, write_card

NAME = "tiny-induction"
VOCAB_SIZE = 64
PREFIX_LEN = (4, 20)
N_REPEATS = 2
BOS = 0
SEQ_LEN = 1 + N_REPEATS * PREFIX_LEN[1]
#: pythia-70m's GPT-NeoX settings (parallel residual, partial rotary, untied unembedding),
#: shrunk to 2 layers of width 64
CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    hidden_act="gelu",
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=SEQ_LEN,
    layer_norm_eps=1e-5,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    bos_token_id=BOS,
    eos_token_id=BOS,
)
SEED = 0
DATA_SEED = 1
EVAL_SEED = 1234
EVAL_N = 1000
STEPS = 1500
BATCH = 64
LR = 1e-3
WEIGHT_DECAY = 0.01
WARMUP = 100
COMMAND = "python -m hookscope.zoo.train_induction"


ARCHITECTURE = (
    "gpt_neox (pythia-style: parallel residual, rotary on 25% of each head, untied unembedding)"
)


def build() -> dict:
    """The card's build record (see ``hookscope.zoo.shipped.build_module``)."""
    return {"kind": "gpt_neox", "config": dict(CONFIG)}


def eval_batch():
    """The held-out evaluation sequences the card's metrics are measured on."""
    return induction_tensors(
        EVAL_N, VOCAB_SIZE, PREFIX_LEN, N_REPEATS, seed=EVAL_SEED, bos=BOS, seq_len=SEQ_LEN
    )


def train(steps: int = STEPS, seed: int = SEED, progress: bool = True) -> torch.nn.Module:
    """Train from scratch under ``seed``; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = build_module(build())
    data = induction_tensors(
        steps * BATCH, VOCAB_SIZE, PREFIX_LEN, N_REPEATS, seed=DATA_SEED, bos=BOS, seq_len=SEQ_LEN
    ).tokens
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )
    model.train()
    bar = tqdm(range(steps), desc=f"train {NAME}", disable=not progress)
    for step in bar:
        tokens = data[step * BATCH : (step + 1) * BATCH]
        logits = model(input_ids=tokens, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def _size(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    c = CONFIG
    return (
        f"{c['num_hidden_layers']} layers, d_model {c['hidden_size']}, "
        f"{c['num_attention_heads']} heads, d_mlp {c['intermediate_size']}, "
        f"vocab {c['vocab_size']}, {n / 1000:.0f}k params"
    )


def _head(h: str) -> str:
    return h.removeprefix("head.")


def write(model: torch.nn.Module, folder: Path, seconds: float) -> dict:
    """Save weights (+ a Hugging Face config.json) and the card; returns the card."""
    import transformers

    from hookscope.model import HookedModel

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_weights(state, folder / "model.safetensors")
    model.config.to_json_file(str(folder / "config.json"))
    report = induction_circuit(HookedModel.wrap(model), eval_batch())
    metrics = report.to_dict()
    ind, prev = report.induction, report.previous_token
    known = (
        "induction heads "
        + ", ".join(f"{la}.{he} ({ind[la, he]:.2f})" for la, he in report.induction_heads)
        + "; previous-token head"
        + ("s " if len(report.previous_token_heads) > 1 else " ")
        + ", ".join(f"{la}.{he} ({prev[la, he]:.2f})" for la, he in report.previous_token_heads)
        + f"; zeroing them raises repeat loss {report.clean_loss:.2f} -> "
        f"{report.circuit_loss:.2f} nats (ln vocab = {report.uniform_loss:.2f})"
    )
    info = {
        "name": NAME,
        "architecture": ARCHITECTURE,
        "build": build(),
        "size": _size(model),
        "source": f"shipped in hookscope/zoo/weights/{NAME}, trained by `{COMMAND}`",
        "known": known,
        "metrics": metrics,
        "seed": SEED,
        "command": COMMAND,
        "checkpoints": [],
        "training": {
            "steps": STEPS,
            "batch_size": BATCH,
            "optimizer": "AdamW",
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "schedule": f"linear warmup {WARMUP} steps, cosine decay to 0",
            "grad_clip": 1.0,
            "loss": "next-token cross-entropy at every position",
            "data_seed": DATA_SEED,
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
        },
        "data": {
            "generator": "hookscope.data.induction.induction_tensors",
            "vocab_size": VOCAB_SIZE,
            "prefix_len": list(PREFIX_LEN),
            "n_repeats": N_REPEATS,
            "bos": BOS,
            "seq_len": SEQ_LEN,
            "eval": {"n": EVAL_N, "seed": EVAL_SEED},
            "definitions": "see hookscope.zoo.induction (module docstring)",
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    info = write_card(folder, info)  # adds the sha256 of the weights just saved
    print(report)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / NAME, help="output folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train()
    write(model, args.out, time.perf_counter() - start)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
