"""The self-contained HTML attention view behind :func:`hookscope.plot.attention_html`.

One HTML fragment: a scoped ``<style>``, the data as ``<script type="application/json">``
and one inline ``<script>`` that builds the tokens with ``textContent`` (token text is never
parsed as HTML). Nothing is fetched: no external scripts, styles or fonts.

Embedded JSON (``data``): ``{"tokens": [str, ...], "heads": [{"title": str,
"pattern": [[float, ...], ...]}, ...]}`` with each pattern [dest, src] rounded to 6
decimals; destination row ``i`` is token ``len(tokens) - dest + i``. ``<``, ``>`` and ``&``
are written as ``\\u003c`` etc., so a token cannot close the script element.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["AttentionView", "render_attention"]


@dataclass(frozen=True, repr=False)
class AttentionView:
    """An interactive attention view: ``.html`` (a standalone page), ``.save(path)``, and
    inline display in Jupyter (``_repr_html_``)."""

    fragment: str
    title: str
    n_heads: int
    n_tokens: int

    @property
    def html(self) -> str:
        """The whole page: the fragment inside a minimal UTF-8 HTML document."""
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(self.title)}</title>\n</head>\n<body>\n"
            f"{self.fragment}\n</body>\n</html>\n"
        )

    def _repr_html_(self) -> str:
        return self.fragment

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :attr:`html` to ``path`` atomically (a temporary file in the same folder,
        then ``os.replace``); returns the path."""
        target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.html)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def __repr__(self) -> str:
        return (
            f"AttentionView({self.title!r}: {self.n_heads} head(s), {self.n_tokens} tokens; "
            "display it in a notebook or .save('view.html'))"
        )


def _script_json(data: object) -> str:
    """JSON safe inside a ``<script>`` element: no ``</script>``, ``<!--`` or ``&`` entities."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


_CSS = """
#__ROOT__ { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px; color: #222; }
#__ROOT__ .hs-title { font-weight: bold; margin: 4px 0; }
#__ROOT__ .hs-heads button { font: inherit; font-size: 12px; margin: 0 4px 4px 0; padding: 1px 6px;
  border: 1px solid #bbb; border-radius: 3px; background: #f6f6f6; cursor: pointer; }
#__ROOT__ .hs-heads button[aria-pressed="true"] { border-color: #2166ac; background: #dbe7f3;
  font-weight: bold; }
#__ROOT__ .hs-tokens { line-height: 2.1; }
#__ROOT__ .hs-tok { display: inline-block; white-space: pre; padding: 0 2px; margin: 1px;
  border: 1px solid #ddd; border-radius: 3px; cursor: pointer; line-height: 1.5; }
#__ROOT__ .hs-tok:focus { outline: 2px solid #555; }
#__ROOT__ .hs-tok.hs-dest { border-color: #b2182b; box-shadow: 0 0 0 1px #b2182b; }
#__ROOT__ .hs-info { color: #666; font-size: 12px; margin-top: 4px; }
"""

_JS = """
(function () {
  var root = document.getElementById("__ROOT__");
  if (!root || root.getAttribute("data-ready")) { return; }
  root.setAttribute("data-ready", "1");
  var data = JSON.parse(root.querySelector("script.hs-data").textContent);
  var toks = data.tokens, heads = data.heads, head = 0, pinned = null, shown = null;
  var bar = root.querySelector(".hs-heads"), box = root.querySelector(".hs-tokens");
  var info = root.querySelector(".hs-info"), buttons = [], spans = [];
  root.querySelector(".hs-title").textContent = data.title;
  function show(j) {
    shown = j;
    var p = heads[head].pattern, first = toks.length - p.length;
    var row = (j === null || j < first) ? null : p[j - first];
    spans.forEach(function (s, i) {
      var w = row ? row[i] : 0;
      s.style.backgroundColor = row ? "rgba(33, 102, 172, " + w + ")" : "";
      s.style.color = w > 0.55 ? "#fff" : "";
      s.title = row ? "weight " + w.toFixed(4) : "";
      s.classList.toggle("hs-dest", j === i);
    });
    buttons.forEach(function (b, k) { b.setAttribute("aria-pressed", k === head ? "true" : "false"); });
    info.textContent = j === null
      ? "Hover, focus (Tab) or click a token to shade the tokens it attends to; click pins it."
      : (row ? heads[head].title + ": token " + j + " attends to the shaded tokens"
             : "token " + j + " is not a destination of this pattern") +
        (pinned === null ? "" : " (pinned; click it again to unpin)");
  }
  heads.forEach(function (h, k) {
    var b = document.createElement("button");
    b.type = "button";
    b.textContent = h.title;
    b.addEventListener("click", function () { head = k; show(shown); });
    bar.appendChild(b);
    buttons.push(b);
  });
  if (heads.length < 2) { bar.style.display = "none"; }
  toks.forEach(function (t, j) {
    var s = document.createElement("span");
    s.className = "hs-tok";
    s.textContent = t;
    s.tabIndex = 0;
    s.setAttribute("role", "button");
    s.addEventListener("mouseenter", function () { if (pinned === null) { show(j); } });
    s.addEventListener("mouseleave", function () { if (pinned === null) { show(null); } });
    s.addEventListener("focus", function () { if (pinned === null) { show(j); } });
    s.addEventListener("blur", function () { if (pinned === null) { show(null); } });
    s.addEventListener("click", function () { pinned = pinned === j ? null : j; show(j); });
    s.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); s.click(); }
    });
    box.appendChild(s);
    spans.push(s);
  });
  show(null);
})();
"""


def render_attention(
    tokens: list[str], heads: list[tuple[str, np.ndarray]], title: str
) -> AttentionView:
    """Build the view: ``tokens`` (one per source position), ``heads`` (title, [dest, src])."""
    uid = f"hs-attn-{uuid.uuid4().hex[:12]}"
    data = {
        "title": title,
        "tokens": list(tokens),
        "heads": [
            {"title": name, "pattern": np.round(p.astype(np.float64), 6).tolist()}
            for name, p in heads
        ],
    }
    fragment = (
        f'<div class="hs-attn" id="{uid}">\n'
        f"<style>{_CSS.replace('#__ROOT__', '#' + uid)}</style>\n"
        '<div class="hs-title"></div>\n<div class="hs-heads" role="toolbar"></div>\n'
        '<div class="hs-tokens"></div>\n<div class="hs-info"></div>\n'
        f'<script type="application/json" class="hs-data">{_script_json(data)}</script>\n'
        f"<script>{_JS.replace('__ROOT__', uid)}</script>\n"
        "<noscript>This attention view needs JavaScript.</noscript>\n</div>"
    )
    return AttentionView(fragment, title, len(heads), len(tokens))
