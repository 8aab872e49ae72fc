"""What makes two extractions the same entry: fingerprints of everything that shapes the data.

The key is the sha256 of the canonical JSON of :func:`key_fields`; an entry's folder is named
by its first 20 hex digits. Any changed input (one weight, the tokenizer's vocabulary, the
dataset's content, a site, the position policy, the dtype, the format version) gives a
different key, so a store cannot hand back activations of another model: a different
model has different weights, hence a different fingerprint, hence a different folder.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import pyarrow as pa
import torch
from torch import nn

__all__ = ["model_fingerprint", "dataset_fingerprint", "tokenizer_fingerprint", "entry_key"]

# model -> (parameter version counters, fingerprint): hashing 135M weights takes ~1 s
_MODEL_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(module: nn.Module) -> str:
    """sha256 over the state dict: every name, dtype, shape and byte (never a revision name:
    a hub branch can serve other weights than its name says). Memoised per module until a
    parameter changes in place."""
    state = module.state_dict()
    versions = tuple(t._version for t in state.values())
    memo = _MODEL_MEMO.get(module)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach()
        if t.device.type == "meta":  # offloaded by accelerate: its real values live elsewhere
            from hookscope.dispatch import weight

            owner, _, leaf = name.rpartition(".")
            t = weight(module.get_submodule(owner) if owner else module, leaf)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    _MODEL_MEMO[module] = (versions, digest)
    return digest


def dataset_fingerprint(table: pa.Table) -> str:
    """sha256 of the columns extraction reads (their names, types and values, in order)."""
    h = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """The tokenizer's identity: class, name, sha256 of its vocabulary and special tokens."""
    if tokenizer is None:
        return {"tokenizer": None}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    special = json.dumps(
        {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}, ensure_ascii=False
    )
    return {
        "class": type(tokenizer).__name__,
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
        "special_tokens_sha256": hashlib.sha256(special.encode()).hexdigest(),
    }


def entry_key(fields: dict) -> str:
    """sha256 of the canonical JSON of the key fields."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
