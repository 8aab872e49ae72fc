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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from hookscope.addresses import AttentionHead
from hookscope.attribution._common import Inputs, as_model, prepare_inputs
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


# ---------------------------------------------------------------------------- result


@dataclass
class Rollout:
    """Attention rollout or flow of a batch: how much each input token reaches the query
    token (CLS for images, the last real token for texts) through the chosen layers.

    * ``row`` [batch, n]: the query row over every input token (CLS included; 0 on padding);
    * ``matrix`` [batch, n, n]: the full rollout (``None`` for flow);
    * ``query`` [batch]: the query position of each example; ``mask`` [batch, n]: real tokens;
    * ``values``: ``.cls`` for images, ``.last`` for texts.
    """

    method: str
    row: Tensor
    query: Tensor
    head_fusion: str
    discard_ratio: float
    residual: bool
    layers: tuple[int, ...]
    is_image: bool
    matrix: Tensor | None = None
    mask: Tensor | None = None
    tokens: list[list[str]] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ views
    @property
    def cls(self) -> Float[Tensor, "batch n_patches"]:
        """Images: the query (CLS) row over the patch tokens, position 0 dropped."""
        if not self.is_image:
            raise InputError(
                ".cls is for image inputs (a ViT with CLS first); for texts use .last or .values"
            )
        return self.row[:, 1:]

    @property
    def grid(self) -> Float[Tensor, "batch g g"]:
        """Images: ``.cls`` on the square patch grid (row-major patches)."""
        cls = self.cls
        g = math.isqrt(cls.shape[1])
        if g * g != cls.shape[1]:
            raise InputError(
                f"{cls.shape[1]} patch tokens after CLS do not form a square grid; use .cls"
            )
        return cls.reshape(-1, g, g)

    @property
    def last(self) -> Float[Tensor, "batch pos"]:
        """Texts: the query row (the last real token's by default) over the tokens, 0 on
        padding."""
        if self.is_image:
            raise InputError(".last is for token inputs; for images use .cls, .grid or .values")
        return self.row

    @property
    def values(self) -> Tensor:
        """``.cls`` [batch, n_patches] for images, ``.last`` [batch, pos] for texts."""
        return self.cls if self.is_image else self.last

    def _length(self, b: int) -> int:
        return self.row.shape[1] if self.mask is None else int(self.mask[b].sum())

    # ------------------------------------------------------------------ outputs
    def to_pandas(self):
        """A long frame: ``example``, ``position`` (patch index for images, token position
        for texts; padding left out), ``row``/``col`` on the patch grid or ``token``, ``value``.
        """
        import pandas as pd

        values = self.values.cpu().numpy()
        frames = []
        for b in range(values.shape[0]):
            n = values.shape[1] if self.is_image else self._length(b)
            if self.mask is not None and not self.is_image:
                pos = np.flatnonzero(self.mask[b].cpu().numpy())
            else:
                pos = np.arange(n)
            frame = {"example": b, "position": pos}
            if self.is_image:
                g = math.isqrt(values.shape[1])
                if g * g == values.shape[1]:
                    frame["row"], frame["col"] = pos // g, pos % g
            elif self.tokens is not None:
                frame["token"] = self.tokens[b]
            frame["value"] = values[b, pos]
            frames.append(pd.DataFrame(frame))
        return pd.concat(frames, ignore_index=True)

    def __repr__(self) -> str:
        batch, n = self.row.shape
        layers = (
            f"{self.layers[0]}-{self.layers[-1]}"
            if list(self.layers) == list(range(self.layers[0], self.layers[-1] + 1))
            else ",".join(map(str, self.layers))
        )
        q = self.query.tolist()
        if self.is_image and q == [0] * batch:
            what = f"{n} tokens (CLS + {n - 1} patches), query CLS"
        elif self.is_image:
            what = f"{n} tokens (CLS + {n - 1} patches), query positions {sorted(set(q))}"
        else:
            what = f"{n} positions, query token at {q[:8]}{' ...' if batch > 8 else ''}"
        v = self.values
        return (
            f"Rollout(method={self.method!r}, head_fusion={self.head_fusion!r}, "
            f"discard_ratio={self.discard_ratio}, residual={self.residual}, layers {layers}; "
            f"{batch} examples, {what}; values mean {float(v.mean()):.4g}, "
            f"max {float(v.max()):.4g})"
        )

    def plot(
        self,
        images: Tensor | np.ndarray | None = None,
        *,
        examples: Sequence[int] | None = None,
        alpha: float = 0.6,
        cmap: str = "inferno",
        ncols: int = 4,
    ):
        """A matplotlib Figure, one axes per example (the first 8 by default).

        Images: ``.grid`` drawn as an image (``ax.images[-1]``, array = the grid), stretched
        over the input image when ``images`` ([batch, C, H, W] or [batch, H, W]) is given
        (drawn first, ``ax.images[0]``). Texts: a heat row over the real tokens
        (``ax.images[0]``, array [1, length]) with the tokens as labels.
        """
        import matplotlib.pyplot as plt

        batch = self.row.shape[0]
        chosen = list(range(min(batch, 8))) if examples is None else list(examples)
        if not chosen or not all(isinstance(b, int) and 0 <= b < batch for b in chosen):
            raise InputError(
                f"examples must be example indices in 0..{batch - 1}, got {examples!r}"
            )
        pictures = self._images(images, max(chosen) + 1) if images is not None else None
        if self.is_image:
            grid = self.grid.cpu().numpy()
            cols = min(ncols, len(chosen))
            rows = -(-len(chosen) // cols)
            fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
            for ax, b in zip(axes.flat, chosen, strict=False):
                if pictures is not None:
                    pic = pictures[b]
                    ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None)
                    h, w = pic.shape[:2]
                    ax.imshow(
                        grid[b], cmap=cmap, alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5)
                    )
                else:
                    ax.imshow(grid[b], cmap=cmap)
                ax.set_title(f"example {b}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
            for ax in list(axes.flat)[len(chosen) :]:
                fig.delaxes(ax)
        else:
            values = self.row.cpu().numpy()
            width = max(self._length(b) for b in chosen)
            fig, axes = plt.subplots(
                len(chosen), 1, figsize=(max(4.0, 0.5 * width), 1.1 * len(chosen)), squeeze=False
            )
            for ax, b in zip(axes[:, 0], chosen, strict=True):
                keep = (
                    np.arange(values.shape[1])
                    if self.mask is None
                    else np.flatnonzero(self.mask[b].cpu().numpy())
                )
                ax.imshow(values[b, keep][None, :], cmap=cmap, aspect="auto")
                labels = self.tokens[b] if self.tokens is not None else [str(i) for i in keep]
                ax.set_xticks(range(len(keep)), labels, rotation=90, fontsize=8)
                ax.set_yticks([])
                ax.set_title(f"example {b}", fontsize=9)
        fig.suptitle(f"attention {self.method} ({self.head_fusion} over heads)", fontsize=10)
        fig.tight_layout()
        return fig

    def _images(self, images: Any, need: int) -> np.ndarray:
        """The images as [rows, H, W] or [rows, H, W, 3] scaled to [0, 1] per image; at
        least ``need`` rows (the examples drawn)."""
        if not self.is_image:
            raise InputError("images= is for image inputs; a text rollout plots as token rows")
        arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
        if arr.ndim == 4 and arr.shape[1] in (1, 3):
            arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)
        if arr.ndim not in (3, 4) or arr.shape[0] < need:
            raise InputError(
                f"images must be [rows, C, H, W] or [rows, H, W] (C 1 or 3) with at least "
                f"{need} rows (the examples drawn), got {tuple(np.shape(images))}"
            )
        arr = arr.astype(np.float64)
        batch = arr.shape[0]
        lo = arr.reshape(batch, -1).min(1).reshape(-1, *([1] * (arr.ndim - 1)))
        hi = arr.reshape(batch, -1).max(1).reshape(-1, *([1] * (arr.ndim - 1)))
        return (arr - lo) / np.where(hi > lo, hi - lo, 1.0)


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
