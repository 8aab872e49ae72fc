"""Small models built offline with seeded random weights, for tests and benchmarks.

Nothing here touches the network: configs are written out, weights are random under a
fixed seed, and the tokenizer is a byte-level BPE trained on a few sentences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

PYTHIA_70M = dict(
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    intermediate_size=2048,
    vocab_size=50304,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=2048,
    layer_norm_eps=1e-5,
    use_parallel_residual=True,
    hidden_act="gelu",
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
)

CORPUS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "When Alice and Bob went to the park, Bob gave a ball to Alice.",
    "The keys to the cabinet are on the table. The key to the cabinets is on the table.",
    "Then, Tom and Anna had a long argument, and afterwards Tom said to Anna.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def make_tokenizer():
    """A byte-level BPE tokenizer (vocabulary of a few hundred) as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def pythia_like(seed: int = 0, **overrides):
    """GPT-NeoX with pythia-70m's exact configuration and seeded random weights."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**{**PYTHIA_70M, **overrides})).eval()


def save_pythia_like(folder: Path, seed: int = 0) -> Path:
    """``save_pretrained`` a pythia-70m-shaped model and the test tokenizer into ``folder``."""
    pythia_like(seed).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def eager_copy(hf):
    """A deep copy of a Hugging Face model (config included) on its own eager attention."""
    import copy

    eager = copy.deepcopy(hf)
    eager.config._attn_implementation = "eager"
    return eager.eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama_gqa(seed: int = 0):
    """Llama with grouped-query attention: 4 query heads sharing 2 k/v heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=500,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_neox(seed: int = 0, parallel: bool = True):
    return pythia_like(
        seed,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=500,
        use_parallel_residual=parallel,
    )


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10)
    ).eval()


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 20),
        nn.ReLU(),
        nn.Linear(20, 10),
    ).eval()


def tiny_vit(seed: int = 0):
    from hookscope.models import ViT

    torch.manual_seed(seed)
    return ViT(
        image_size=8, patch_size=2, in_channels=1, d_model=32, n_layers=2, n_heads=4, d_mlp=64
    ).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=300,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(cfg).eval()


def tiny_gemma3(seed: int = 0, softcap: float | None = None):
    """Gemma 3 with grouped-query attention and sliding-window layers (window 4)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=64,
        final_logit_softcapping=softcap,
    )
    return Gemma3ForCausalLM(cfg).eval()


def with_random_biases(model: nn.Module, seed: int = 11, scale: float = 0.1) -> nn.Module:
    """``model`` with every 1-D ``bias`` parameter (linear and norm layers) set to seeded
    noise: Hugging Face initialises biases to zero, which would hide a read or a shortcut
    that drops or doubles one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.ndim == 1:
                bias.copy_(scale * torch.randn(bias.shape, generator=g))
    return model


def with_scaled_weights(model: nn.Module, factor: float = 5.0) -> nn.Module:
    """``model`` with every parameter of two or more dimensions (projections, embeddings)
    multiplied by ``factor``: Hugging Face's initialisation (std 0.02) leaves a tiny model
    nearly linear and a patch's effect on the logits near rounding, so a test comparing
    patched runs could not tell a right answer from a slightly wrong one."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(factor)
    return model


@dataclass(frozen=True)
class Architecture:
    """One tiny model of an architecture family, and what kind of transformer it is.

    ``build()`` returns the seeded model in eval mode; ``adapter`` is the hookscope adapter
    that must be detected for it. Flags: ``causal`` (a position sees
    only earlier ones), ``gqa`` (fewer k/v heads than query heads), ``parallel_residual``
    (attention and MLP both read the block input), ``has_resid_mid`` (a residual stream
    between attention and MLP exists), ``token_input`` (token ids in, [batch, pos, vocab]
    logits out; else images in, [batch, classes] out), ``vision``, ``softcap`` (final
    logit soft-capping). ``tests/test_contract.py`` checks the flags against each model.
    """

    name: str
    build: Callable[[], nn.Module]
    adapter: str
    causal: bool
    gqa: bool
    parallel_residual: bool
    has_resid_mid: bool
    token_input: bool = True
    vision: bool = False
    softcap: bool = False

    def __str__(self) -> str:
        return self.name


ARCHITECTURES = [
    Architecture(
        "gpt2",
        tiny_gpt2,
        "gpt2",
        causal=True,
        gqa=False,
        parallel_residual=False,
        has_resid_mid=True,
    ),
    Architecture(
        "llama_gqa",
        tiny_llama_gqa,
        "llama",
        causal=True,
        gqa=True,
        parallel_residual=False,
        has_resid_mid=True,
    ),
    Architecture(
        "neox_parallel",
        partial(tiny_neox, parallel=True),
        "gpt_neox",
        causal=True,
        gqa=False,
        parallel_residual=True,
        has_resid_mid=False,
    ),
    Architecture(
        "neox_sequential",
        partial(tiny_neox, parallel=False),
        "gpt_neox",
        causal=True,
        gqa=False,
        parallel_residual=False,
        has_resid_mid=True,
    ),
    Architecture(
        "bert",
        tiny_bert,
        "bert",
        causal=False,
        gqa=False,
        parallel_residual=False,
        has_resid_mid=True,
    ),
    Architecture(
        "gemma3",
        tiny_gemma3,
        "gemma3",
        causal=True,
        gqa=True,
        parallel_residual=False,
        has_resid_mid=True,
    ),
    Architecture(
        "gemma3_softcap",
        partial(tiny_gemma3, softcap=30.0),
        "gemma3",
        causal=True,
        gqa=True,
        parallel_residual=False,
        has_resid_mid=True,
        softcap=True,
    ),
    Architecture(
        "vit",
        tiny_vit,
        "vit",
        causal=False,
        gqa=False,
        parallel_residual=False,
        has_resid_mid=True,
        token_input=False,
        vision=True,
    ),
]

#: the same entries by name
ARCHITECTURES_BY_NAME = {a.name: a for a in ARCHITECTURES}
