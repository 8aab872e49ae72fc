"""Which layers a tracker measures, and how a layer's tensor becomes a [rows, features] matrix.

Sites are hookscope addresses of whole layers. ``"auto"`` means every hidden layer: the
post-activation units ``neuron.L`` of an MLP or CNN (the layer after each hidden Linear/Conv),
the residual stream after each block ``resid_post.L`` of a transformer (language or ViT).

Rows (the convention of the dimensionality-tracking project's tracker, and the one
:mod:`hookscope.analysis` asks for): a ``[batch, d]`` tensor is used as is; ``[batch, pos,
d]`` of a transformer (tokens, patches) makes every position a sample: ``[batch * pos,
d]``, padded positions left out when the batch is a mapping with an ``attention_mask``; a
conv feature map ``[batch, C, H, W]`` (or ``[batch, C, L]``) is one row per example with
``C * H * W`` features (``conv="flatten"``, the default). ``conv="channels"`` makes every spatial position a sample
of ``C`` channel features (``[batch * H * W, C]``); ``conv="mean"`` averages over space
(``[batch, C]``, what the project's Phase-1 calibration runs measured).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hookscope.addresses import Address, AttentionHead, MLPNeuron, slot_address
from hookscope.errors import InputError

__all__ = ["CONV", "auto_sites", "resolve_sites", "is_token_model", "attention_mask", "as_rows"]

CONV = ("flatten", "channels", "mean")


def auto_sites(model: Any) -> list[Address]:
    """Every hidden layer of ``model`` (a HookedModel): see the module docstring."""
    if is_token_model(model):
        found = model.addresses("resid_post")
    else:
        found = [a for a in model.addresses("neuron") if getattr(a, "site", "post") == "post"]
    if not found:
        raise InputError(
            f"found no hidden layers to track in {model!r}; pass sites= explicitly "
            f"(addresses: {', '.join(map(str, model.addresses()))})"
        )
    return found


def resolve_sites(model: Any, sites: Any) -> list[Address]:
    """``sites`` ("auto", a selection string, an address or a list) as layer addresses."""
    if isinstance(sites, str) and sites == "auto":
        return auto_sites(model)
    found = model.resolve(sites)
    if not found:
        raise InputError(f"sites={sites!r} selects nothing in {model!r}")
    for address in found:
        unit = isinstance(address, (MLPNeuron, AttentionHead)) and address.index is not None
        if unit:
            raise InputError(
                f"{address} is one unit; dimensionality is measured over a whole layer: "
                f"use {slot_address(address.slot)} or a selection such as 'neuron.*', 'resid_post.*'"
            )
        if isinstance(address, AttentionHead) and address.site == "pattern":
            raise InputError(
                f"{address} is an attention pattern, not a representation; track "
                "resid_post.*, attn_out.*, mlp_out.*, neuron.* or head.L (z) instead"
            )
    return list(dict.fromkeys(found))


def is_token_model(model: Any) -> bool:
    """Whether ``model``'s 3-D activations are [batch, position, d] (it has attention)."""
    return bool(model.addresses("head"))


def attention_mask(inputs: Any) -> Tensor | None:
    """The ``attention_mask`` of a tokenised batch (a mapping holding one), else None."""
    if isinstance(inputs, Mapping) and inputs.get("attention_mask") is not None:
        return torch.as_tensor(inputs["attention_mask"]).bool()
    return None


def as_rows(
    t: Tensor, conv: str = "flatten", tokens: bool = False, mask: Tensor | None = None
) -> Tensor:
    """``t`` as a [rows, features] matrix (the conventions in the module docstring).

    ``tokens``: ``t`` is [batch, pos, d] (a transformer's; every position a row, those where
    ``mask`` is 0 left out); otherwise axes after the first two are spatial (conv maps).
    """
    if t.ndim < 2:
        raise InputError(
            f"an activation of shape {tuple(t.shape)} has no [batch, features] to measure"
        )
    if t.ndim == 2:
        return t
    if tokens and t.ndim == 3:
        if mask is not None and tuple(mask.shape) == tuple(t.shape[:2]):
            return t[mask.to(t.device)]
        return t.reshape(-1, t.shape[-1])
    if conv == "channels":
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    if conv == "mean":
        return t.flatten(2).mean(dim=2)
    return t.flatten(1)
