"""Tokenizer helpers shared by the language tasks of :mod:`hookscope.data`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hookscope.errors import InputError

__all__ = ["check_tokenizer", "next_token_ids", "split_pieces", "token_at", "tokenizer_name"]


def check_tokenizer(tokenizer: Any, task: str) -> None:
    """InputError unless ``tokenizer`` is a fast Hugging Face tokenizer (token offsets needed)."""
    if not callable(tokenizer) or not getattr(tokenizer, "is_fast", False):
        hint = ""
        if hasattr(tokenizer, "tokenizer"):
            hint = " (pass model.tokenizer, not the model)"
        elif type(tokenizer).__name__ == "Tokenizer":
            hint = " (wrap a tokenizers.Tokenizer in PreTrainedTokenizerFast(tokenizer_object=...))"
        raise InputError(
            f"{task} needs a fast Hugging Face tokenizer (AutoTokenizer.from_pretrained(..., "
            f"use_fast=True)), got {type(tokenizer).__name__}{hint}"
        )


def next_token_ids(
    tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str]
) -> list[int | None]:
    """Id of each continuation where it is exactly one token after its prompt, else None.

    ``continuation`` is one token after ``prompt`` when ``prompt + continuation`` tokenizes
    to the prompt's tokens plus one more (no special tokens added). This is the single-token
    test of every task in :mod:`hookscope.data`: it sees the answer in its real context, so
    it also holds for tokenizers that mark word starts differently at the start of a text.
    """
    if not prompts:
        return []
    base = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    full = tokenizer(
        [p + c for p, c in zip(prompts, continuations, strict=True)], add_special_tokens=False
    )["input_ids"]
    return [
        f[-1] if len(f) == len(b) + 1 and f[:-1] == b else None
        for b, f in zip(base, full, strict=True)
    ]


def split_pieces(tokenizer: Any, prompt: str, continuation: str) -> list[str]:
    """The tokens ``continuation`` becomes after ``prompt`` (for error messages)."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    keep = 0
    while keep < min(len(base), len(full)) and base[keep] == full[keep]:
        keep += 1
    return tokenizer.convert_ids_to_tokens(full[keep:])


def token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token whose character span holds ``char`` (special tokens hold none)."""
    for k, (a, b) in enumerate(offsets):
        if a <= char < b:
            return k
    raise InputError(f"no token holds character {char} (token offsets {list(offsets)})")


def tokenizer_name(tokenizer: Any) -> str:
    """The tokenizer's ``name_or_path`` (quoted), or its class name when it has none."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    return repr(name) if name else type(tokenizer).__name__
