"""Per-token values as text and as self-contained HTML: attributions over a text, a neuron's
activation over its context.

:func:`token_text` marks each token with its value (``The[+0.12] cat[+0.80]``);
:func:`token_html` colours each token's background by its value (red positive, blue
negative, intensity ``|value| / scale``) with the value in a tooltip. Token text is
HTML-escaped; nothing is fetched (inline styles only).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

__all__ = ["token_text", "token_html", "color"]

POSITIVE, NEGATIVE = (178, 24, 43), (33, 102, 172)  # the ends of RdBu, as hookscope.plot


def _scale(values: np.ndarray, scale: float | None) -> float:
    if scale is not None:
        return float(scale)
    top = float(np.abs(values).max()) if values.size else 0.0
    return top if top > 0 else 1.0


def color(value: float, scale: float) -> str:
    """The background of a token: white blended towards red (positive) or blue (negative)
    by ``min(|value| / scale, 1)``, as ``rgb(r, g, b)``."""
    weight = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    end = POSITIVE if value >= 0 else NEGATIVE
    r, g, b = (round(255 + (c - 255) * weight) for c in end)
    return f"rgb({r}, {g}, {b})"


def token_text(
    tokens: Sequence[str], values: Sequence[float] | np.ndarray, *, marked: int | None = None
) -> str:
    """One line: each token followed by its value in brackets; ``marked`` (a position) is
    wrapped in ``>>`` ``<<``."""
    values = np.asarray(values, dtype=float)
    parts = []
    for i, (tok, v) in enumerate(zip(tokens, values, strict=True)):
        piece = f"{tok!r}[{v:+.3g}]"
        parts.append(f">>{piece}<<" if i == marked else piece)
    return " ".join(parts)


def token_html(
    tokens: Sequence[str],
    values: Sequence[float] | np.ndarray,
    *,
    scale: float | None = None,
    marked: int | None = None,
    title: str | None = None,
) -> str:
    """An HTML fragment: one ``<span>`` per token with its background coloured by its value
    (``scale``: the value shown at full colour; default the largest ``|value|``); ``marked``
    gets an outline. Whitespace in tokens is kept (``white-space: pre``)."""
    values = np.asarray(values, dtype=float)
    top = _scale(values, scale)
    spans = []
    for i, (tok, v) in enumerate(zip(tokens, values, strict=True)):
        outline = "outline:2px solid #000;" if i == marked else ""
        spans.append(
            f'<span title="{v:+.4g}" style="background:{color(v, top)};{outline}'
            f'white-space:pre;font-family:monospace;padding:0 1px">{html.escape(tok)}</span>'
        )
    head = f"<div><b>{html.escape(title)}</b></div>" if title else ""
    return f"<div>{head}<div>{''.join(spans)}</div></div>"
