"""What the engine reads off a model once, through its adapter's public structure: the
blocks, the unembedding, the last block's MLP and attention output projection, whether
head writes reach a block's output linearly, and under which keyword the model's forward
takes a key/value cache (:mod:`hookscope.hf_compat` knows the transformers versions)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hookscope.hf_compat import kv_cache_candidates
from hookscope.interventions._onednn import fast_forwards
from hookscope.model import HookedModel

__all__ = ["Structure"]


@dataclass
class Structure:
    """A model's structure as the engine uses it (see the module docstring)."""

    blocks: list[nn.Module] | None
    unembed: nn.Linear | None  #: the unembedding, when a plain linear layer
    last_mlp: nn.Module | None
    last_out_proj: nn.Module | None
    linear_head_tail: bool
    kv_keywords: tuple[str, ...]  #: keywords to try for a key/value cache (causal models)
    fast: dict  #: oneDNN forwards of plain fp32 linear layers and gated MLPs
    shortcuts_off: dict[str, str]  #: shortcuts that cannot run on this model, with why

    @classmethod
    def of(cls, model: HookedModel) -> Structure:
        adapter = model.adapter
        blocks = adapter.blocks()
        fast, off = fast_forwards(model)
        if not blocks:
            return cls(None, None, None, None, False, (), fast, off)
        head = adapter.unembed_module()
        last = len(blocks) - 1
        return cls(
            blocks=blocks,
            unembed=head if isinstance(head, nn.Linear) else None,
            last_mlp=adapter.block_part(last, "mlp"),
            last_out_proj=adapter.block_part(last, "out_proj"),
            linear_head_tail=adapter.linear_head_tail,
            kv_keywords=kv_cache_candidates(model.model) if adapter.causal else (),
            fast=fast,
            shortcuts_off=off,
        )
