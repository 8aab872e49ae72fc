"""Attention rollout and attention flow (Abnar & Zuidema, 2020, "Quantifying Attention Flow
in Transformers"): how much each input token reaches a query token (a ViT's CLS, a language
model's last real token) through the attention of all layers.

Conventions, shared by both methods (each step is one function of this module):

1. **Head fusion** (:func:`fuse_heads`): each layer's pattern ``[batch, heads, dest, src]`` is
   reduced over heads by ``"mean"``, ``"max"`` or ``"min"`` to ``A [batch, dest, src]``.
2. **Discard** (rollout only, ``discard_ratio`` in [0, 1)): in each example's fused matrix
   separately, the ``int(discard_ratio * m * m)`` smallest entries of the ``m x m`` block of
   real tokens (padding excluded) are set to 0; ties are broken by position (row-major, a
   stable sort), so exactly that many go. No entry is protected (jacobgil/vit-explain keeps
   the CLS->CLS entry and, through a flattening bug, discards with the whole batch's indices
   in example 0 only): the identity added next keeps every token's own path, so no row of
   the graph goes empty.
3. **Residual** (``residual=True``): ``A' = (A + I) / rowsum(A + I)``. For rows of ``A`` that
   sum to 1 (mean fusion, no discard) this is ``0.5 A + 0.5 I`` as in the paper; after max or
   min fusion or a discard the rows are renormalised the same way (the identity then weighs
   1 against the remaining attention mass). With ``residual=False`` the rows of ``A`` are
   renormalised alone; a row with no mass left stays zero.
4. **Padding**: rows and columns of padded positions (``attention_mask == 0``) are zeroed
   before steps 2-3, so a padded row of a batch gives exactly what the row alone gives; a
   pad's own row becomes the identity (``residual=True``) or zero.
5. **Rollout** (:func:`rollout_from_patterns`): ``R = A'_L @ ... @ A'_1`` over the chosen
   layers in forward order; row ``q`` of ``R`` is how much each token at the input reaches
   token ``q`` at the output; every row of ``R`` sums to 1 (when no row went empty).
6. **Flow** (:func:`flow_from_patterns`): the layered graph with nodes ``(l, i)`` for
   ``l = 0..L`` and an edge ``(l-1, j) -> (l, i)`` of capacity ``A'_l[i, j]``; the value for
   input token ``j`` is the maximum flow from ``(0, j)`` to the query node ``(L, q)``
   (networkx's preflow-push). Values are the raw flows, not normalised (the paper's code
   divides each row by its sum: ``flow.values / flow.values.sum(-1, keepdim=True)``).

Both return a :class:`~hookscope.attribution.rollout.Rollout`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from hookscope.addresses import AttentionHead
from hookscope.attribution._common import Inputs, as_model, prepare_inputs
from hookscope.attribution.rollout import Rollout
from hookscope.errors import InputError, format_choices
from hookscope.model import HookedModel
from hookscope.modes import in_eval_mode

__all__ = [
    "HEAD_FUSIONS",
    "Rollout",
    "fuse_heads",
    "transition_matrices",
    "rollout_from_patterns",
    "flow_from_patterns",
    "attention_rollout",
    "attention_flow",
]

HEAD_FUSIONS = ("mean", "max", "min")
QUERIES = ("cls", "last")
_FLOW_PROGRESS_MIN = 500  # max-flow problems from which progress=None shows a bar


# ---------------------------------------------------------------------------- arguments


def _check_head_fusion(head_fusion: Any) -> str:
    if head_fusion not in HEAD_FUSIONS:
        raise InputError(
            f"head_fusion {head_fusion!r} is unknown; choose one of {format_choices(HEAD_FUSIONS)}"
        )
    return head_fusion


def _check_discard(discard_ratio: Any) -> float:
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)):
        raise InputError(
            f"discard_ratio must be a number in [0, 1), got {type(discard_ratio).__name__}"
        )
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise InputError(
            f"discard_ratio must be in [0, 1) (the fraction of each example's smallest "
            f"attention weights set to 0), got {discard_ratio}"
        )
    return float(discard_ratio)


def _check_patterns(patterns: Any, mask: Tensor | None) -> list[Tensor]:
    if isinstance(patterns, Tensor) or not isinstance(patterns, Sequence) or not patterns:
        raise InputError(
            "patterns must be a non-empty list of per-layer attention tensors "
            "[batch, heads, n, n], one per layer in forward order"
        )
    shape = None
    for i, p in enumerate(patterns):
        if not isinstance(p, Tensor) or p.ndim != 4 or p.shape[-1] != p.shape[-2]:
            got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise InputError(
                f"patterns[{i}] must be an attention tensor [batch, heads, n, n], got {got}"
            )
        if shape is not None and (p.shape[0], p.shape[-1]) != shape:
            raise InputError(
                f"patterns[{i}] has batch {p.shape[0]} and {p.shape[-1]} tokens but patterns[0] "
                f"has batch {shape[0]} and {shape[1]} tokens"
            )
        shape = (p.shape[0], p.shape[-1])
    if mask is not None and tuple(mask.shape) != shape:
        raise InputError(
            f"mask must be [batch, n] = {list(shape)} (1 for real tokens), got {list(mask.shape)}"
        )
    return list(patterns)


def _layers(available: Sequence[int], layers: Iterable[int] | None, start_layer: int) -> list[int]:
    """The layers to combine, in forward order; InputError names the valid ones."""
    if not available:
        raise InputError("no layers with attention patterns")
    choices = f"{available[0]}..{available[-1]}"
    if isinstance(start_layer, bool) or not isinstance(start_layer, int):
        raise InputError(f"start_layer must be an int in {choices}, got {start_layer!r}")
    if layers is None:
        if start_layer not in available:
            raise InputError(
                f"start_layer {start_layer} is out of range; the model's attention layers "
                f"are {choices}"
            )
        return [layer for layer in available if layer >= start_layer]
    if start_layer != 0:
        raise InputError("give layers or start_layer, not both")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    wanted = list(layers) if isinstance(layers, Iterable) else None
    if (
        not wanted
        or wanted is None
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in wanted)
    ):
        raise InputError(
            f"layers must be a non-empty list of layer indices in {choices}, got {layers!r}"
        )
    bad = [x for x in wanted if x not in available]
    if bad:
        raise InputError(
            f"layer {bad[0]} is out of range; the model's attention layers are {choices}"
        )
    return sorted(set(wanted))


# ---------------------------------------------------------------------------- mathematics


def fuse_heads(
    pattern: Float[Tensor, "batch heads dest src"], head_fusion: str = "mean"
) -> Float[Tensor, "batch dest src"]:
    """One layer's attention fused over heads by ``"mean"``, ``"max"`` or ``"min"``."""
    head_fusion = _check_head_fusion(head_fusion)
    if head_fusion == "mean":
        return pattern.mean(1)
    if head_fusion == "max":
        return pattern.amax(1)
    return pattern.amin(1)


def _discard(a: Tensor, ratio: float, valid: Tensor) -> Tensor:
    """``a`` [batch, n, n] with each example's ``int(ratio * count)`` smallest valid entries
    zeroed (``valid`` [batch, n, n] bool); ties go in row-major order (a stable sort)."""
    flat = a.flatten(1)
    ok = valid.flatten(1)
    counts = ok.sum(1).tolist()
    k = torch.tensor([int(ratio * c) for c in counts], device=a.device)
    order = flat.masked_fill(~ok, math.inf).argsort(dim=1, stable=True)
    ranked_drop = torch.arange(flat.shape[1], device=a.device)[None, :] < k[:, None]
    drop = torch.zeros_like(ranked_drop).scatter(1, order, ranked_drop)
    return flat.masked_fill(drop, 0.0).view_as(a)


def transition_matrices(
    patterns: Sequence[Float[Tensor, "batch heads n n"]],
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: bool = True,
    mask: Tensor | None = None,
) -> list[Float[Tensor, "batch n n"]]:
    """Each layer's row-stochastic matrix ``A'`` (head fusion, discard, residual, row
    renormalisation; steps 1-4 of the module docstring), float32 or float64.

    ``mask`` [batch, n]: 1 for real tokens, 0 for padding (default: all real).
    """
    head_fusion = _check_head_fusion(head_fusion)
    discard_ratio = _check_discard(discard_ratio)
    if not isinstance(residual, bool):
        raise InputError(f"residual must be True or False, got {residual!r}")
    mask = None if mask is None else torch.as_tensor(mask)
    patterns = _check_patterns(patterns, mask)
    batch, n = patterns[0].shape[0], patterns[0].shape[-1]
    device = patterns[0].device
    dtype = torch.float64 if patterns[0].dtype == torch.float64 else torch.float32
    real = (
        torch.ones(batch, n, dtype=torch.bool, device=device)
        if mask is None
        else mask.to(device).bool()
    )
    valid = real[:, :, None] & real[:, None, :]
    eye = torch.eye(n, dtype=dtype, device=device)
    mats = []
    for pattern in patterns:
        a = fuse_heads(pattern.to(device, dtype), head_fusion) * valid
        if discard_ratio > 0:
            a = _discard(a, discard_ratio, valid)
        if residual:
            a = a + eye
        mats.append(a / a.sum(-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny))
    return mats


def rollout_from_patterns(
    patterns: Sequence[Float[Tensor, "batch heads n n"]],
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: bool = True,
    mask: Tensor | None = None,
) -> Float[Tensor, "batch n n"]:
    """Attention rollout ``A'_L @ ... @ A'_1`` of per-layer patterns (forward order).

    ``patterns``: one tensor [batch, heads, n, n] per layer (dest rows, src columns, rows
    summing to 1 as a softmax gives them); ``mask`` [batch, n] marks real tokens. Row ``q``
    of the result is how much each input token reaches token ``q`` at the last layer.

    >>> roll = rollout_from_patterns([p0, p1], head_fusion="max")   # [batch, n, n]
    """
    mats = transition_matrices(
        patterns,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        residual=residual,
        mask=mask,
    )
    result = mats[0]
    for m in mats[1:]:
        result = m @ result
    return result


def _layered_graph(mats: Sequence[np.ndarray]) -> Any:
    """networkx DiGraph with nodes (layer, token), edges (l-1, j) -> (l, i) of capacity
    mats[l-1][i, j] (only positive capacities)."""
    nx = _networkx()
    graph = nx.DiGraph()
    n = mats[0].shape[0]
    graph.add_nodes_from((layer, i) for layer in range(len(mats) + 1) for i in range(n))
    for layer, m in enumerate(mats, start=1):
        dest, src = np.nonzero(m > 0)
        graph.add_edges_from(
            ((layer - 1, int(j)), (layer, int(i)), {"capacity": float(m[i, j])})
            for i, j in zip(dest, src, strict=True)
        )
    return graph


def _networkx() -> Any:
    try:
        import networkx
    except ImportError as err:  # pragma: no cover - torch itself depends on networkx
        raise ImportError(
            "attention_flow needs networkx (a dependency of torch): pip install networkx"
        ) from err
    return networkx


def flow_from_patterns(
    patterns: Sequence[Float[Tensor, "batch heads n n"]],
    query: int | Sequence[int] | Tensor,
    *,
    head_fusion: str = "mean",
    residual: bool = True,
    mask: Tensor | None = None,
    progress: bool | None = None,
) -> Float[Tensor, "batch n"]:
    """Attention flow: the maximum flow from each input token to the query token's node at
    the last layer, through the layered graph of ``A'`` (step 6 of the module docstring).

    ``query``: the query position, one for all examples or one per example. Padded positions
    (``mask`` 0) are left out of the graph and get 0. Slow: one max-flow problem per example
    and input token, each over ``(L + 1) * n`` nodes; a tqdm bar counts examples
    (``progress=None`` shows it from 500 problems on). float64 on the CPU.
    """
    mask = None if mask is None else torch.as_tensor(mask)
    patterns = _check_patterns(patterns, mask)
    batch, n = patterns[0].shape[0], patterns[0].shape[-1]
    queries = _query_positions(query, batch, n, mask)
    mats = transition_matrices(
        [p.detach().to("cpu", torch.float64) for p in patterns],
        head_fusion=head_fusion,
        residual=residual,
        mask=None if mask is None else mask.cpu(),
    )
    stacked = torch.stack(mats, 1).numpy()  # [batch, layers, n, n]
    real = np.ones((batch, n), bool) if mask is None else mask.cpu().bool().numpy()
    nx = _networkx()
    from networkx.algorithms.flow import build_residual_network, preflow_push
    from tqdm.auto import tqdm

    n_layers = len(mats)
    show = progress if progress is not None else batch * n >= _FLOW_PROGRESS_MIN
    out = torch.zeros(batch, n, dtype=torch.float64)
    for b in tqdm(range(batch), desc="attention flow", unit="example", disable=not show):
        keep = np.flatnonzero(real[b])
        sub = [m[np.ix_(keep, keep)] for m in stacked[b]]
        graph = _layered_graph(sub)
        residual_net = build_residual_network(graph, "capacity")
        sink = (n_layers, int(np.searchsorted(keep, queries[b])))
        for k, j in enumerate(keep):
            out[b, j] = nx.maximum_flow_value(
                graph, (0, k), sink, flow_func=preflow_push, residual=residual_net
            )
    return out


def _query_positions(query: Any, batch: int, n: int, mask: Tensor | None) -> list[int]:
    if isinstance(query, Tensor):
        query = query.reshape(-1).tolist()
    elif isinstance(query, int) and not isinstance(query, bool):
        query = [query]
    if (
        not isinstance(query, Sequence)
        or len(query) not in (1, batch)
        or not all(isinstance(q, int) and not isinstance(q, bool) for q in query)
    ):
        raise InputError(f"query must be one position or one per example ({batch}), got {query!r}")
    query = list(query) * (batch if len(query) == 1 else 1)
    for b, q in enumerate(query):
        if not 0 <= q < n or (mask is not None and not bool(mask[b, q])):
            raise InputError(
                f"query position {q} of example {b} is not a real token (positions 0..{n - 1}"
                + (", unpadded" if mask is not None else "")
                + ")"
            )
    return query


# ---------------------------------------------------------------------------- model front


@dataclass
class _Run:
    patterns: list[Tensor]
    inputs: Inputs
    query: list[int]
    layers: list[int]
    tokens: list[list[str]] | None


def _pattern_layers(model: HookedModel) -> list[int]:
    layers = sorted(
        a.layer
        for a in model.addresses("head")
        if isinstance(a, AttentionHead) and a.site == "pattern" and a.head is None
    )
    if not layers:
        kinds = sorted({str(a).split(".")[0] for a in model.addresses()})
        raise InputError(
            f"this model has no attention pattern sites (head.L.pattern); its sites are "
            f"{format_choices(kinds)}. Attention rollout and flow need a transformer: a ViT "
            "(hs.zoo.load('digits-vit')) or a language model"
        )
    return layers


def _run(model: Any, inputs: Any, layers: Any, start_layer: int, query: Any) -> _Run:
    model = as_model(model)
    chosen = _layers(_pattern_layers(model), layers, start_layer)
    if (
        query is not None
        and query not in QUERIES
        and (isinstance(query, bool) or not isinstance(query, int))
    ):
        raise InputError(
            f"query must be None, one of {format_choices(QUERIES)} or a token position, "
            f"got {query!r}"
        )
    prepared = prepare_inputs(model, inputs)
    names = [AttentionHead(layer, None, "pattern") for layer in chosen]
    _, cache = model.run_with_cache(prepared.tensor, names, **prepared.kwargs())
    patterns = [cache[name] for name in names]
    batch, n = patterns[0].shape[0], patterns[0].shape[-1]
    mask = prepared.mask
    if mask is not None and tuple(mask.shape) != (batch, n):
        raise InputError(
            f"attention_mask {tuple(mask.shape)} does not match the patterns' "
            f"[batch, pos] = {[batch, n]}"
        )
    if query is None:
        query = "last" if prepared.is_tokens else "cls"
    if query == "cls":
        positions = [0] * batch
    elif query == "last":
        last = prepared.last if prepared.last is not None else torch.full((batch,), n - 1)
        positions = [int(x) for x in last]
    else:
        positions = _query_positions(query, batch, n, mask)
    tokens = None
    if prepared.is_tokens and model.tokenizer is not None:
        ids = prepared.tensor.cpu()
        tokens = [
            model.to_str_tokens(ids[b][mask[b].bool().cpu()] if mask is not None else ids[b])
            for b in range(batch)
        ]
    return _Run(patterns, prepared, positions, chosen, tokens)


def _mask(run: _Run) -> Tensor | None:
    return None if run.inputs.mask is None else run.inputs.mask.bool()


@in_eval_mode
def attention_rollout(
    model: Any,
    inputs: Any,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    layers: Iterable[int] | None = None,
    start_layer: int = 0,
    residual: bool = True,
    query: str | int | None = None,
) -> Rollout:
    """Attention rollout (Abnar & Zuidema 2020) of a transformer on a batch, in one forward.

    ``inputs``: images [batch, C, H, W] for a ViT (CLS first), or token ids, texts or a dict
    with input_ids and attention_mask for a language model (padding excluded, see the
    module docstring). ``layers`` (or ``start_layer``): the layers combined, default all.
    ``query``: the token explained, ``"cls"`` (images' default), ``"last"`` (the last real
    token, texts' default) or a position. Head fusion, discard and residual as in the module
    docstring. ``.cls`` [batch, n_patches] / ``.grid`` [batch, g, g] for images, ``.last``
    [batch, pos] for texts, ``.matrix`` [batch, n, n] the whole rollout.

    >>> vit = hs.zoo.load("digits-vit"); X, y = hs.data.digits("test", tensors=True)
    >>> roll = attention_rollout(vit, X[:16], head_fusion="max", discard_ratio=0.9)
    >>> roll.grid.shape                                  # torch.Size([16, 4, 4])
    """
    head_fusion = _check_head_fusion(head_fusion)
    discard_ratio = _check_discard(discard_ratio)
    run = _run(model, inputs, layers, start_layer, query)
    mask = _mask(run)
    matrix = rollout_from_patterns(
        run.patterns,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        residual=residual,
        mask=mask,
    )
    idx = torch.tensor(run.query, device=matrix.device)
    row = matrix[torch.arange(matrix.shape[0], device=matrix.device), idx]
    if mask is not None:
        row = row * mask.to(row.device)
    return Rollout(
        method="rollout",
        row=row.cpu(),
        query=idx.cpu(),
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        residual=bool(residual),
        layers=tuple(run.layers),
        is_image=not run.inputs.is_tokens,
        matrix=matrix.cpu(),
        mask=None if mask is None else mask.cpu(),
        tokens=run.tokens,
    )


@in_eval_mode
def attention_flow(
    model: Any,
    inputs: Any,
    *,
    head_fusion: str = "mean",
    residual: bool = True,
    layers: Iterable[int] | None = None,
    start_layer: int = 0,
    query: str | int | None = None,
    progress: bool | None = None,
) -> Rollout:
    """Attention flow (Abnar & Zuidema 2020): the maximum flow from each input token to the
    query token at the last layer through the graph of residual-added, renormalised fused
    attention (module docstring, step 6). Arguments as in :func:`attention_rollout`.

    Slow: one max-flow problem per example and input token (networkx, on the CPU); keep the
    batch small. ``progress``: a tqdm bar over examples (``None``: from 500 problems on).
    The values are raw flows (not normalised to sum 1); ``.matrix`` is None.

    >>> flow = attention_flow(hs.zoo.load("digits-vit"), X[:4])
    >>> flow.grid.shape                                  # torch.Size([4, 4, 4])
    """
    head_fusion = _check_head_fusion(head_fusion)
    run = _run(model, inputs, layers, start_layer, query)
    mask = _mask(run)
    row = flow_from_patterns(
        run.patterns,
        run.query,
        head_fusion=head_fusion,
        residual=residual,
        mask=mask,
        progress=progress,
    ).float()
    return Rollout(
        method="flow",
        row=row,
        query=torch.tensor(run.query),
        head_fusion=head_fusion,
        discard_ratio=0.0,
        residual=bool(residual),
        layers=tuple(run.layers),
        is_image=not run.inputs.is_tokens,
        mask=None if mask is None else mask.cpu(),
        tokens=run.tokens,
    )
