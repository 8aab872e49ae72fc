"""Figures: attention patterns, logit-lens tables, direct logit attribution bars.

Every figure the library draws is made by :func:`figure`, through pyplot: it becomes the
current figure, so ``res.plot(); plt.savefig("x.png")`` and ``plt.show()`` work, notebooks
display it, and it is also returned (``fig.savefig(...)``). pyplot keeps it open until
``plt.close(fig)``.

* :func:`attention` - attention-pattern heatmap(s) [dest, src] with token labels, from an
  :class:`~hookscope.cache.ActivationCache` or a pattern tensor.
* :func:`attention_html` - the same pattern as a self-contained interactive HTML view.
* :func:`logit_lens` - a layer x position table of top tokens coloured by a value.
* :func:`dla` - horizontal bars of the largest direct-logit-attribution values.

>>> _, cache = model.run_with_cache(ids, names="head.1.*.pattern")  # doctest: +SKIP
>>> hs.plot.attention(cache, "head.1.*", model.to_str_tokens(ids[0]))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from hookscope._attention_html import AttentionView, render_attention
from hookscope.addresses import Address, AttentionHead, Selection, parse
from hookscope.cache import ActivationCache
from hookscope.errors import AddressError, AddressRangeError, CacheKeyError, InputError

__all__ = ["figure", "attention", "attention_html", "AttentionView", "logit_lens", "dla"]

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"  # the ends of RdBu, as in the patching heatmaps
_MAX_TICKS = 64  # label every position up to this many; every k-th beyond


def figure(figsize: tuple[float, float] = (6.4, 4.8), **kw: Any) -> Figure:
    """A new Figure made through pyplot (so it is the current figure), returned.

    ``kw`` go to :func:`matplotlib.pyplot.figure` (``layout="constrained"``, ``dpi``, ...).
    Close it with ``plt.close(fig)`` when drawing many.
    """
    return plt.figure(figsize=figsize, **kw)


# ---------------------------------------------------------------------------- attention


def _heads_wanted(address: Any) -> tuple[list[int] | None, list[int] | None]:
    """(layers, heads) an attention address asks for; None means all of them."""
    item = parse(address)
    if isinstance(item, AttentionHead):
        layers: list[int] | None = [item.layer]
        heads = None if item.head is None else [item.head]
    elif isinstance(item, Selection) and item.kind == "head":
        span = item.layers
        layers = None if span.is_all else list(range(span.lo, span.hi + 1))  # type: ignore[arg-type]
        unit = item.units
        heads = None if unit is None or unit.is_all else list(range(unit.lo, unit.hi + 1))  # type: ignore[arg-type]
    else:
        raise AddressError(
            f"attention patterns belong to heads; {str(item)!r} is not a head address. Pass "
            "one head ('head.3.5' or 'head.3.5.pattern'), a layer's heads ('head.3.*') or "
            "hs.AttentionHead(3, 5)"
        )
    site = item.site
    if site not in ("z", "pattern"):
        raise AddressError(
            f"{str(item)!r} is the heads' {site!r}, not their pattern; drop the site "
            f"('head.L.H') or write '.pattern'"
        )
    return layers, heads


def _pick(
    heads: list[int] | None, n: int, layer: int | None, tensor: str | None = None
) -> list[int]:
    if heads is None:
        return list(range(n))
    bad = [h for h in heads if h >= n]
    if bad:
        where = f"layer {layer}" if layer is not None else "the pattern"
        raise AddressRangeError(
            f"head {bad[0]} out of range: {where} has {n} heads (0-{n - 1})"
            + ("" if tensor is None else f"; {tensor}")
        )
    return heads


def _title(layer: int | None, head: int | None) -> str:
    return "".join(
        [f"L{layer}" if layer is not None else "", f"H{head}" if head is not None else ""]
    )


def _batch_index(batch: Any, size: int) -> int:
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)):
        raise InputError(f"batch must be an int, got {batch!r}")
    if not -size <= batch < size:
        raise InputError(f"batch {batch} out of range: the pattern holds {size} sequences")
    return int(batch) % size


def _from_cache(cache: ActivationCache, address: Any, batch: int) -> list[tuple[str, Tensor]]:
    layers, heads = _heads_wanted(address)
    cached = sorted({s.layer for s in cache.slots if s.kind == "pattern"})
    wanted = cached if layers is None else layers
    missing = [layer for layer in wanted if layer not in cached]
    if missing or not wanted:
        layer = missing[0] if missing else "L"
        raise CacheKeyError(
            f"the attention pattern of layer {layer} was not cached (cached pattern layers: "
            f"{cached or 'none'}); cache it with model.run_with_cache(inputs, "
            f"names='head.{layer}.*.pattern'), or names='head.*.*.pattern' for every layer"
        )
    out = []
    for layer in wanted:
        by_head = cache.select(f"head.{layer}.*.pattern")  # [batch, dest, src] views
        for h in _pick(heads, len(by_head), layer):
            t = by_head[AttentionHead(layer, h, "pattern")]
            out.append((_title(layer, h), t[_batch_index(batch, t.shape[0])]))
    return out


def _from_tensor(pattern: Any, address: Any, batch: int) -> list[tuple[str, Tensor]]:
    try:
        t = torch.as_tensor(pattern).detach()
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(
            f"source must be an ActivationCache or a pattern tensor, got {type(pattern).__name__}"
        ) from err
    layers, heads = (None, None) if address is None else _heads_wanted(address)
    if (layers is None and address is not None) or (layers is not None and len(layers) > 1):
        raise InputError(
            "a pattern tensor holds one layer; name that layer's heads, e.g. 'head.3.*'"
        )
    layer = layers[0] if layers else None
    if t.ndim == 4:  # [batch, n_heads, dest, src], as cache["head.L.pattern"]
        t = t[_batch_index(batch, t.shape[0])]
    if t.ndim == 2:
        if heads is not None and len(heads) > 1:
            raise InputError(f"a [dest, src] pattern is one head; the address asks for {heads}")
        return [(_title(layer, heads[0] if heads else None) or "attention", t)]
    if t.ndim != 3:
        raise InputError(
            "a pattern tensor must be [dest, src], [n_heads, dest, src] or "
            f"[batch, n_heads, dest, src]; got shape {tuple(t.shape)}"
        )
    how = (
        "a 3-D pattern is read as [n_heads, dest, src] "
        "(for one head's [batch, dest, src] pass pattern[batch])"
    )
    return [(_title(layer, h), t[h]) for h in _pick(heads, t.shape[0], layer, how)]


def _token_labels(tokens: Any, n_dest: int, n_src: int) -> tuple[list[str], list[str]] | None:
    """(dest labels, src labels): src are the tokens, dest the last ``n_dest`` of them."""
    if tokens is None:
        return None
    if isinstance(tokens, str) or not isinstance(tokens, (Sequence, np.ndarray, Tensor)):
        raise InputError(
            "tokens must be a list of token strings, one per position, e.g. "
            f"model.to_str_tokens(ids[0]); got {type(tokens).__name__}"
        )
    labels = [str(t) for t in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]
    if len(labels) != n_src or n_dest > n_src:
        raise InputError(
            f"{len(labels)} tokens for a pattern of {n_dest} destination x {n_src} source "
            "positions; pass one token per source position (the sequence's tokens, padding "
            "included)"
        )
    return labels[n_src - n_dest :], labels


def _resolve(source: Any, address: Any, batch: int) -> list[tuple[str, np.ndarray]]:
    if isinstance(source, ActivationCache):
        if address is None:
            raise AddressError("name the head(s) to draw, e.g. 'head.3.5' or 'head.3.*'")
        found = _from_cache(source, address, batch)
    else:
        found = _from_tensor(source, address, batch)
    return [(title, p.to(torch.float32).cpu().numpy()) for title, p in found]


def _set_ticks(ax: Axes, labels: list[str] | None, n: int, axis: str, fontsize: float) -> None:
    step = max(1, math.ceil(n / _MAX_TICKS))
    ticks = list(range(0, n, step))
    text = [str(i) for i in ticks] if labels is None else [labels[i] for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks, text, rotation=90, fontsize=fontsize, parse_math=False)
    else:
        ax.set_yticks(ticks, text, fontsize=fontsize, parse_math=False)


def attention(
    source: ActivationCache | Tensor | np.ndarray,
    address: str | Address | Selection | None,
    tokens: Sequence[str] | None = None,
    *,
    batch: int = 0,
    ax: Axes | None = None,
) -> Figure:
    """Heatmap of attention patterns: destination (query) on y, source (key) on x.

    ``source``: an ActivationCache holding ``head.L.pattern`` (``cache["head.L.H.pattern"]``
    is [batch, dest, src]; ``batch`` picks the sequence), or a pattern tensor [dest, src],
    [n_heads, dest, src] or [batch, n_heads, dest, src]. ``address``: one head (``"head.3.5"``
    (z, the default site, means that head's pattern), ``"head.3.5.pattern"``,
    ``hs.AttentionHead(3, 5)``) or several (``"head.3.*"``, ``"head.3"``, ``"head.3.0-3"``,
    ``"head.*.*"`` for every cached layer): one subplot per head, titled ``"L3H0"``, ....
    With a tensor the address picks heads along its head axis and names the layer; ``None``
    draws every head of it. A 3-D tensor is read as [n_heads, dest, src]: for one cached
    head's [batch, dest, src] pass ``pattern[batch]``. ``tokens``: one string per source position (they label x, and
    the last ``dest`` of them label y); more than 64 positions are labelled every k-th.
    Colours span weights 0-1. ``ax``: draw one head into this Axes.
    """
    heads = _resolve(source, address, batch)
    n_dest, n_src = heads[0][1].shape
    labels = _token_labels(tokens, n_dest, n_src)
    if ax is not None and len(heads) > 1:
        raise InputError(f"ax= takes one head; {address!r} selects {len(heads)} heads")
    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    side = min(8.0, max(3.0, 1.5 + 0.22 * n_src))
    if ax is None:
        fig = figure(figsize=(cols * side + 1.0, rows * side + 0.3), layout="constrained")
        axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
        for extra in axes[len(heads) :]:
            extra.remove()
    else:
        fig, axes = ax.figure, [ax]  # type: ignore[assignment]
    fontsize = 8 if n_src <= 24 else 6
    image = None
    for k, (title, pattern) in enumerate(heads):
        a = axes[k]
        image = a.imshow(pattern, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        a.set_title(title)
        _set_ticks(a, None if labels is None else labels[1], n_src, "x", fontsize)
        _set_ticks(a, None if labels is None else labels[0], n_dest, "y", fontsize)
        if k % cols == 0:
            a.set_ylabel("destination (query)")
        if k >= len(heads) - cols:
            a.set_xlabel("source (key)")
    fig.colorbar(image, ax=axes[: len(heads)], label="attention weight", shrink=0.8)
    return fig  # type: ignore[return-value]


def attention_html(
    source: ActivationCache | Tensor | np.ndarray,
    address: str | Address | Selection | None,
    tokens: Sequence[str],
    *,
    batch: int = 0,
) -> AttentionView:
    """A self-contained interactive HTML view of one head's or several heads' pattern.

    Same ``source`` / ``address`` / ``batch`` as :func:`attention`; ``tokens`` is required.
    Hover, focus (Tab) or click a token to shade the tokens it attends to by the weight
    (click pins it); buttons switch heads. One string with inline CSS and JS and the
    weights as JSON (6 decimals): no network, no external scripts or fonts. Shows inline
    in Jupyter; ``.save(path)`` writes a standalone page.
    """
    heads = _resolve(source, address, batch)
    n_dest, n_src = heads[0][1].shape
    labels = _token_labels(tokens, n_dest, n_src)
    assert labels is not None
    for name, pattern in heads:
        if not np.isfinite(pattern).all():
            raise InputError(f"the pattern of {name or 'the head'} holds NaN/Inf weights")
    return render_attention(labels[1], heads, title=_view_title(heads, address))


def _view_title(heads: list[tuple[str, np.ndarray]], address: Any) -> str:
    if len(heads) == 1:
        return heads[0][0] or "attention"
    return f"{str(parse(address)) if address is not None else 'attention'} ({len(heads)} heads)"


# ---------------------------------------------------------------------------- logit lens


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} must hold numbers, got {type(x).__name__}") from err


def _labels(given: Sequence[Any] | None, n: int, name: str) -> list[str]:
    if given is None:
        return [str(i) for i in range(n)]
    out = [str(v) for v in given]
    if len(out) != n:
        raise InputError(f"{name} has {len(out)} entries; the table has {n}")
    return out


def logit_lens(
    top_tokens: Sequence[Sequence[str]] | np.ndarray,
    values: Tensor | np.ndarray | Sequence[Sequence[float]] | None = None,
    *,
    layer_labels: Sequence[Any] | None = None,
    position_labels: Sequence[Any] | None = None,
    title: str | None = None,
) -> Figure:
    """A layer x position table: each cell shows its top token, coloured by ``values``.

    ``top_tokens``: [n_layers][n_pos] strings (row 0, the first layer, on top). ``values``:
    [n_layers, n_pos] numbers (e.g. the top token's probability), drawn with the Blues
    colormap over [0, 1] when every value lies in [0, 1], else over their range; NaN cells
    are grey. ``layer_labels`` / ``position_labels`` default to the indices.
    """
    given = top_tokens.tolist() if isinstance(top_tokens, np.ndarray) else top_tokens
    if isinstance(given, str) or not isinstance(given, Sequence):
        raise InputError("top_tokens must be a table [n_layers][n_pos] of token strings")
    if any(isinstance(r, str) or not isinstance(r, Sequence) for r in given):
        raise InputError("top_tokens must be a table [n_layers][n_pos]: a list of rows of strings")
    table = [[str(t) for t in row] for row in given]
    if not table or not table[0] or any(len(r) != len(table[0]) for r in table):
        raise InputError("top_tokens must be a non-empty rectangular table [n_layers][n_pos]")
    n_layers, n_pos = len(table), len(table[0])
    rows = _labels(layer_labels, n_layers, "layer_labels")
    cols = _labels(position_labels, n_pos, "position_labels")
    v = _as_array(values, "values") if values is not None else None
    if v is not None and v.shape != (n_layers, n_pos):
        raise InputError(f"values has shape {v.shape}; top_tokens is ({n_layers}, {n_pos})")
    fig = figure(  # only after every check: a refused call leaves no empty figure behind
        figsize=(1.5 + 0.9 * n_pos, 1.0 + 0.4 * n_layers),
        layout="constrained",
    )
    ax = fig.subplots()
    colour = None
    if v is not None:
        finite = v[np.isfinite(v)]
        unit = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
        lo, hi = (0.0, 1.0) if unit else (float(finite.min()), float(finite.max()))
        cmap = plt.get_cmap("Blues").with_extremes(bad="0.85")
        image = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        fig.colorbar(image, ax=ax)
        colour = image.norm
    else:
        ax.set_xlim(-0.5, n_pos - 0.5)
        ax.set_ylim(n_layers - 0.5, -0.5)
    for i in range(n_layers):
        for j in range(n_pos):
            dark = colour is not None and np.isfinite(v[i, j]) and float(colour(v[i, j])) > 0.6
            ink = "white" if dark else "black"
            cell = ax.text(j, i, table[i][j], ha="center", va="center", fontsize=8, color=ink)
            cell.set_parse_math(False)  # a token like "$x$" stays literal
    ax.set_xticks(range(n_pos), cols, fontsize=8, parse_math=False)
    ax.set_yticks(range(n_layers), rows, fontsize=8, parse_math=False)
    ax.set_xticks(np.arange(-0.5, n_pos), minor=True)
    ax.set_yticks(np.arange(-0.5, n_layers), minor=True)
    ax.grid(which="minor", color="white" if values is not None else "0.85", lw=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    ax.set_title(title if title is not None else "logit lens: top token per layer")
    return fig


# ---------------------------------------------------------------------------- DLA


def dla(
    values: Tensor | np.ndarray | Sequence[float],
    labels: Sequence[Any],
    *,
    top: int | None = 20,
    title: str | None = None,
) -> Figure:
    """Horizontal bars of the ``top`` direct-logit-attribution values by |value|.

    ``values``: [n_components] (one per component, e.g. per head or layer output);
    ``labels``: their names, same length. The largest |value| is the top bar; positive bars
    are blue, negative red. ``top=None`` draws all.
    """
    v = _as_array(values, "values")
    if v.ndim != 1:
        raise InputError(f"values must be 1-D (one per component), got shape {v.shape}")
    names = _labels(labels, v.shape[0], "labels")
    if not np.isfinite(v).all():
        raise InputError(f"values holds {int((~np.isfinite(v)).sum())} NaN/Inf entries")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise InputError(f"top must be a positive int or None, got {top!r}")
    order = np.argsort(-np.abs(v), kind="stable")[: v.shape[0] if top is None else top]
    shown = v[order]
    fig = figure(figsize=(6.0, 1.0 + 0.28 * max(len(order), 4)), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(order)), shown, color=[POSITIVE if x >= 0 else NEGATIVE for x in shown])
    ax.set_yticks(range(len(order)), [names[i] for i in order], fontsize=8, parse_math=False)
    ax.invert_yaxis()
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_xlabel("direct logit attribution")
    default = f"top {len(order)} of {v.shape[0]} components by |DLA|"
    ax.set_title(title if title is not None else default)
    return fig
