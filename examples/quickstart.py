"""hookscope in one page: wrap a model, cache its internals by address, intervene with hooks.

    make demo                                   # through the README's setup
    .venv/bin/python examples/quickstart.py --model EleutherAI/pythia-70m   # real weights, when the hub is reachable

With no ``--model`` (or when the hub is unreachable) it builds a GPT-NeoX with pythia-70m's
exact configuration and seeded random weights, saves it with ``save_pretrained`` and loads it
back through ``HookedModel.from_pretrained`` — the same path a hub name takes — so it runs
offline in seconds. Numbers printed from random weights show mechanics, not model behaviour.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch import nn

import hookscope as hs

PROMPT = "When Mary and John went to the store, John gave a drink to"


def offline_pythia_folder() -> str:
    """Save a pythia-70m-shaped GPT-NeoX (random weights) and a small BPE tokenizer to a temp folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        vocab_size=50304,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    folder = tempfile.mkdtemp(prefix="hookscope_pythia_")
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([PROMPT, "Mary and John went to the store."] * 8, trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def load(name: str | None) -> hs.HookedModel:
    if name is not None:
        try:
            return hs.HookedModel.from_pretrained(name)
        except hs.ModelLoadError as err:
            print(
                f"[{name} unavailable: {str(err)[:120]}...]\n[falling back to a pythia-70m-shaped model with random weights]"
            )
    return hs.HookedModel.from_pretrained(offline_pythia_folder())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="hub name or local folder (default: offline pythia-70m-shaped model)",
    )
    args = parser.parse_args()

    model = load(args.model)
    print(model, "\n")

    # 1. cache what you ask for, by address
    logits, cache = model.run_with_cache(
        PROMPT, names=["resid_post.*", "head.3.*", "head.3.5.pattern", "neuron.2"]
    )
    print(cache, "\n")
    print("resid_post.3       ", tuple(cache["resid_post.3"].shape), "   [batch, pos, d_model]")
    print(
        "head.3.5 (z)       ",
        tuple(cache[hs.AttentionHead(3, 5)].shape),
        "    [batch, pos, d_head]",
    )
    print(
        "head.3.5.pattern   ",
        tuple(cache[hs.AttentionHead(3, 5, "pattern")].shape),
        "    [batch, dest, src]",
    )
    print("neuron.2.187       ", tuple(cache[hs.MLPNeuron(2, 187)].shape), "        [batch, pos]")
    print(
        "stack(resid_post)  ",
        tuple(cache.stack("resid_post").shape),
        "[layer, batch, pos, d_model]\n",
    )

    # 2. intervene: zero one neuron, see how the last position's prediction moves
    tokens = model.to_tokens(PROMPT)
    top = int(logits[0, -1, : len(model.tokenizer)].argmax())  # among ids the tokenizer can spell
    ablated = model.run_with_hooks(tokens, hooks=[("neuron.2.187", lambda act, address: act * 0)])
    print(
        f"top next token {model.to_string([top])!r}: logit {logits[0, -1, top]:.4f} -> {ablated[0, -1, top]:.4f} with neuron.2.187 zeroed"
    )
    with model.hooks([(hs.Residual(1, "post"), lambda act, address: act * 0.5)]):
        halved = model(tokens)
    print(
        f"same logit with resid_post.1 halved inside `with model.hooks(...)`: {halved[0, -1, top]:.4f}\n"
    )

    # 3. any torch module: a small CNN, adapter detected
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10)
    ).eval()
    vision = hs.HookedModel.wrap(cnn)
    images = torch.randn(2, 1, 8, 8)
    _, vcache = vision.run_with_cache(images)
    print(vision)
    print(vcache)
    print(
        "channel 2 of conv layer 0 (neuron.0.2):",
        tuple(vcache["neuron.0.2"].shape),
        "[batch, h, w]",
    )


if __name__ == "__main__":
    main()
