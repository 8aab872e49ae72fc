"""The report of a run: ``report.md`` and one self-contained ``report.html`` from its artifacts.

:func:`write_report` reads what the runner left in a run folder and writes both reports
atomically (a temporary file in the same folder, fsynced, renamed into place):

* ``artifacts.json`` - ``run_name`` (required), ``config``, ``versions``, ``git_commit``,
  ``seeds``, ``files`` (relative path -> sha256), ``store_keys``, ``started``, ``finished``,
  ``durations`` (stage -> seconds); all but ``run_name`` may be absent ("not recorded").
* ``metrics.json`` - the action's summary: ``action``, ``question``, ``metrics`` (name ->
  number or nested dict of numbers), ``tables`` (``name``, ``title``, ``columns``, ``rows``,
  ``explain``: column -> one sentence), ``figures`` (``name``, ``title``, ``caption``),
  ``notes`` (paragraphs).
* ``figures/{name}.png`` for every figure listed (embedded as a base64 data URI).

Conventions of the tables:

* numbers get three decimals (``0.912``); magnitudes below 0.001 or from 10^6 up get three
  significant digits (``1.2e-05``); integers are printed whole; p-values (a column or metric
  named ``p``, ``p_value``, ``pvalue``, ``*_p``, ``p_*``) get ``%.3g``; NaN and null are ``—``.
* a confidence interval travels as two columns and is printed in brackets after its
  value, ``0.912 [0.884, 0.937]``: ``X_ci_low``/``X_ci_high`` belong to column ``X``;
  bare ``ci_low``/``ci_high`` belong to ``score`` when the table has one, else to the
  column just left of ``ci_low``. Every other column keeps its place, so controls stay
  beside the scores they control.

The HTML page loads nothing: no script, stylesheet, font or image outside the file. It has
a viewport meta tag, a max-width and tables that scroll sideways inside their own box, so it
reads on a phone.

>>> md_path, html_path = write_report("runs/collapse")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import struct
import urllib.parse
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hookscope.errors import ExperimentError
from hookscope.store.files import atomic_write

__all__ = ["write_report", "format_number", "is_p_value", "ReportTable", "report_tables"]

MISSING = "—"  # NaN, null and absent values
_P_VALUE = re.compile(r"(?:^|_)p(?:_?val(?:ue)?)?(?:_|$)")
_CELL_TYPES = (str, int, float, bool, type(None))
_BREAK_AFTER = re.compile(r"([._])")  # where a long metric name may wrap


def format_number(value: Any, p_value: bool = False) -> str:
    """A table cell as text: three decimals for floats (three significant digits below 0.001
    or from 10^6 up), whole integers, ``%.3g`` for p-values, ``—`` for NaN and null.

    >>> format_number(0.91234), format_number(3), format_number(1.234e-5), format_number(None)
    ('0.912', '3', '1.23e-05', '—')
    >>> format_number(0.0004567, p_value=True)
    '0.000457'
    """
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if p_value:
            return f"{value:.3g}"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            text = f"{value:.3f}"
            return "0.000" if text == "-0.000" else text
        return f"{value:.3g}"
    return str(value)


def is_p_value(name: str) -> bool:
    """Whether a column or metric name is a p-value (``p``, ``p_value``, ``perm_p``, ``p_holm``)."""
    key = re.sub(r"[\s.\-]+", "_", str(name).strip().lower())
    return _P_VALUE.search(key) is not None


@dataclass(frozen=True)
class _Column:
    """One printed column: the source column and, when it has one, its CI bound columns."""

    name: str
    index: int
    low: int | None = None
    high: int | None = None

    @property
    def header(self) -> str:
        return f"{self.name} [CI]" if self.low is not None else self.name


@dataclass(frozen=True)
class ReportTable:
    """A metrics.json table as printed: headers and cell text, CI columns merged into their
    value's cell, column order otherwise kept."""

    name: str
    title: str
    headers: list[str]
    cells: list[list[str]]
    numeric: list[bool]  # per printed column: right-align as numbers
    explain: list[tuple[str, str]]  # (column, sentence) in the table's column order


def _printed_columns(columns: Sequence[str]) -> list[_Column]:
    where = {c: i for i, c in enumerate(columns)}
    owner: dict[str, tuple[int, int]] = {}  # value column -> (low index, high index)
    taken: set[int] = set()
    for i, c in enumerate(columns):
        if c.endswith("_ci_low") and c[: -len("_ci_low")] in where:
            base, high = c[: -len("_ci_low")], c[: -len("_ci_low")] + "_ci_high"
            if high in where:
                owner[base] = (i, where[high])
                taken |= {i, where[high]}
    if "ci_low" in where and "ci_high" in where:
        low, high = where["ci_low"], where["ci_high"]
        if "score" in where and "score" not in owner:
            base: str | None = "score"
        elif low > 0 and low - 1 not in taken and columns[low - 1] != "ci_high":
            base = columns[low - 1]
        else:
            base = None
        if base is not None:
            owner[base] = (low, high)
            taken |= {low, high}
    out = []
    for i, c in enumerate(columns):
        if i in taken:
            continue
        low_high = owner.get(c)
        out.append(_Column(c, i, *low_high) if low_high else _Column(c, i))
    return out


def _cell(row: Sequence[Any], col: _Column) -> str:
    p = is_p_value(col.name)
    text = format_number(row[col.index], p_value=p)
    if col.low is None or text == MISSING:
        return text
    low, high = row[col.low], row[col.high]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        return text
    if any(math.isnan(float(v)) for v in (low, high)):
        return text
    return f"{text} [{format_number(low, p)}, {format_number(high, p)}]"


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def report_tables(tables: Sequence[dict[str, Any]]) -> list[ReportTable]:
    """The printed form of metrics.json's ``tables`` (validated by :func:`write_report`)."""
    out = []
    for t in tables:
        cols = _printed_columns(t["columns"])
        rows = t["rows"]
        explain = t.get("explain") or {}
        out.append(
            ReportTable(
                name=t["name"],
                title=t.get("title") or t["name"],
                headers=[c.header for c in cols],
                cells=[[_cell(r, c) for c in cols] for r in rows],
                numeric=[all(_is_number(r[c.index]) for r in rows) for c in cols],
                explain=[(c, str(explain[c])) for c in t["columns"] if c in explain],
            )
        )
    return out


# --------------------------------------------------------------------------- reading inputs


def _read_json(run_dir: Path, name: str) -> dict[str, Any]:
    path = run_dir / name
    if not path.is_file():
        raise ExperimentError(
            f"cannot build the report: {name} is missing from the run folder {run_dir}"
        )
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ExperimentError(
            f"cannot build the report: {path} is not valid JSON "
            f"(line {err.lineno}, column {err.colno}: {err.msg})"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ExperimentError(f"cannot build the report: cannot read {path}: {err}") from err
    if not isinstance(value, dict):
        raise ExperimentError(
            f"cannot build the report: {path} holds a {type(value).__name__}, not an object"
        )
    return value


def _check(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise ExperimentError(f"cannot build the report: {path}: {what}")


def _check_metrics(summary: dict[str, Any], path: Path) -> None:
    _check(isinstance(summary.get("question", ""), str), path, "'question' must be a string")
    _check(isinstance(summary.get("metrics", {}), dict), path, "'metrics' must be an object")
    tables = summary.get("tables", [])
    _check(isinstance(tables, list), path, "'tables' must be a list")
    for k, t in enumerate(tables):
        where = f"tables[{k}]"
        _check(isinstance(t, dict), path, f"{where} must be an object")
        _check(isinstance(t.get("name"), str), path, f"{where} needs a string 'name'")
        cols = t.get("columns")
        _check(
            isinstance(cols, list) and all(isinstance(c, str) for c in cols),
            path,
            f"{where} ({t['name']}) needs 'columns', a list of strings",
        )
        rows = t.get("rows", [])
        _check(isinstance(rows, list), path, f"{where} ({t['name']}): 'rows' must be a list")
        for i, row in enumerate(rows):
            _check(
                isinstance(row, list) and len(row) == len(cols),
                path,
                f"{where} ({t['name']}) row {i} has "
                f"{len(row) if isinstance(row, list) else 'no list of'} cells for "
                f"{len(cols)} columns",
            )
            bad = [v for v in row if not isinstance(v, _CELL_TYPES)]
            _check(
                not bad,
                path,
                f"{where} ({t['name']}) row {i}: a cell is a {type(bad[0]).__name__ if bad else ''}"
                "; cells are numbers, strings or null",
            )
        _check(
            isinstance(t.get("explain", {}), dict), path, f"{where}: 'explain' must be an object"
        )
    figures = summary.get("figures", [])
    _check(isinstance(figures, list), path, "'figures' must be a list")
    for k, f in enumerate(figures):
        name = f.get("name") if isinstance(f, dict) else None
        _check(
            isinstance(name, str) and Path(name).name == name and name not in ("", ".", ".."),
            path,
            f"figures[{k}] needs a 'name' that is a file name (figures/<name>.png), not {name!r}",
        )
    notes = summary.get("notes", [])
    _check(
        isinstance(notes, list) and all(isinstance(n, str) for n in notes),
        path,
        "'notes' must be a list of strings",
    )


@dataclass(frozen=True)
class _Figure:
    name: str
    title: str
    caption: str
    png: bytes
    width: int
    height: int


def _read_figures(run_dir: Path, figures: Sequence[dict[str, Any]]) -> list[_Figure]:
    from PIL import Image  # matplotlib's own dependency

    out = []
    for f in figures:
        rel = f"figures/{f['name']}.png"
        path = run_dir / rel
        if not path.is_file():
            raise ExperimentError(
                f"cannot build the report: {rel} (figure {f['name']!r} of metrics.json) is "
                f"missing from the run folder {run_dir}"
            )
        data = path.read_bytes()
        try:  # verify() checks the chunks' CRCs; load() decodes every pixel
            with Image.open(io.BytesIO(data)) as im:
                fmt, size = im.format, im.size
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as err:
            raise ExperimentError(
                f"cannot build the report: {path} is not a readable PNG: {err}"
            ) from err
        if fmt != "PNG":
            raise ExperimentError(f"cannot build the report: {path} is a {fmt} file, not a PNG")
        out.append(
            _Figure(
                f["name"],
                str(f.get("title") or f["name"]),
                str(f.get("caption") or ""),
                data,
                *size,
            )
        )
    return out


# --------------------------------------------------------------------------- shared pieces


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


def _metric_text(name: str, value: Any) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(value, list):
        return ", ".join(format_number(v, is_p_value(leaf)) for v in value)
    return format_number(value, is_p_value(leaf))


def _config_text(config: Any) -> str:
    if config is None:
        return "not recorded"
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _plain(value: Any) -> str:
    """A version, seed or other recorded value as text (null is "—")."""
    if value is None:
        return MISSING
    return value if isinstance(value, str) else json.dumps(value)


def _seconds(value: Any) -> str:
    return format_number(float(value)) if _is_number(value) and value is not None else str(value)


@dataclass(frozen=True)
class _Run:
    run_dir: Path
    artifacts: dict[str, Any]
    summary: dict[str, Any]
    tables: list[ReportTable]
    figures: list[_Figure]

    @property
    def name(self) -> str:
        return str(self.artifacts["run_name"])

    def pairs(self, key: str) -> list[tuple[str, str]]:
        """A flat artifacts.json object as (name, text) rows."""
        value = self.artifacts.get(key) or {}
        if not isinstance(value, dict):
            return [("", str(value))]
        if key == "durations":
            return [(str(k), _seconds(v)) for k, v in value.items()]
        return [(str(k), _plain(v)) for k, v in value.items()]

    def files(self) -> list[tuple[str, str]]:
        files = self.artifacts.get("files") or {}
        return [(str(k), str(v)) for k, v in sorted(files.items())]


def _load(run_dir: Path) -> _Run:
    if not run_dir.is_dir():
        raise ExperimentError(f"cannot build the report: the run folder {run_dir} does not exist")
    artifacts = _read_json(run_dir, "artifacts.json")
    _check(
        isinstance(artifacts.get("run_name"), str) and artifacts["run_name"],
        run_dir / "artifacts.json",
        "needs a string 'run_name'",
    )
    summary = _read_json(run_dir, "metrics.json")
    _check_metrics(summary, run_dir / "metrics.json")
    figures = _read_figures(run_dir, summary.get("figures", []))
    return _Run(run_dir, artifacts, summary, report_tables(summary.get("tables", [])), figures)


# --------------------------------------------------------------------------- markdown


def _md_text(text: Any) -> str:
    """Plain text for markdown: HTML-significant characters as entities, so a ``<b>`` in a
    site name or a question stays text on GitHub."""
    return html.escape(str(text), quote=False)


def _md(text: Any) -> str:
    """Plain text for a markdown table cell: one line, entities, pipes escaped."""
    return _md_text(" ".join(str(text).split())).replace("|", "\\|")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric=None) -> list[str]:
    numeric = numeric or [False] * len(headers)
    align = ["---:" if n else "---" for n in numeric]
    lines = ["| " + " | ".join(_md(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _render_markdown(run: _Run) -> str:
    s = run.summary
    out = [f"# {_md(run.name)}", ""]
    if s.get("action"):
        out += [f"Action: `{s['action']}`", ""]
    out += ["## Question", "", _md_text(s.get("question") or "not recorded"), ""]
    if run.tables:
        out += ["## Results", ""]
    for t in run.tables:
        out += [f"### {_md(t.title)}", ""]
        out += _md_table(t.headers, t.cells, t.numeric)
        if any(h.endswith("[CI]") for h in t.headers):
            out += ["Brackets hold the confidence interval `[low, high]`.", ""]
        if t.explain:
            out += ["What each number means:", ""]
            out += [f"- **{_md(c)}**: {_md(e)}" for c, e in t.explain] + [""]
    metrics = _flatten(s.get("metrics") or {})
    if metrics:
        out += ["## Summary metrics", ""]
        rows = [(k, _metric_text(k, v)) for k, v in metrics]
        out += _md_table(["metric", "value"], rows, [False, True])
    if run.figures:
        out += ["## Figures", ""]
    for f in run.figures:
        link = f"figures/{urllib.parse.quote(f.name)}"
        out += [f"### {_md(f.title)}", "", f"![{_md(f.title)}]({link}.png) ([SVG]({link}.svg))"]
        out += ["", _md_text(f.caption), ""] if f.caption else [""]
    if s.get("notes"):
        out += ["## Notes", ""]
        for note in s["notes"]:
            out += [_md_text(note), ""]
    out += _md_provenance(run)
    return "\n".join(out).rstrip("\n") + "\n"


def _md_provenance(run: _Run) -> list[str]:
    a = run.artifacts
    out = ["## Reproducibility", ""]
    if a.get("started") or a.get("finished"):
        when = f"Started {a.get('started', '?')}, finished {a.get('finished', '?')}."
        out += [_md_text(when), ""]
    out += ["### Config", "", "```yaml", _config_text(a.get("config")).rstrip("\n"), "```", ""]
    commit = a.get("git_commit")
    out += ["### Versions", "", f"Git commit: `{commit}`" if commit else "Git commit: none", ""]
    out += _md_table(["package", "version"], run.pairs("versions"))
    for key, title, head in (
        ("seeds", "Seeds", ["seed", "value"]),
        ("durations", "Durations", ["stage", "seconds"]),
    ):
        rows = run.pairs(key)
        out += [f"### {title}", ""]
        out += _md_table(head, rows, [False, key == "durations"]) if rows else ["not recorded", ""]
    keys = a.get("store_keys") or []
    out += ["### Store keys", ""]
    out += [f"- `{k}`" for k in keys] + [""] if keys else ["none", ""]
    files = run.files()
    out += ["### Files", ""]
    out += (
        _md_table(["file", "sha256"], [(p, f"`{h[:12]}`") for p, h in files])
        if files
        else ["not recorded", ""]
    )
    return out


# --------------------------------------------------------------------------- HTML

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 60rem; padding: 1rem; font: 16px/1.5 system-ui, -apple-system,
  "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1b1f24; background: #fff;
  overflow-wrap: break-word; }
h1 { font-size: 1.6rem; margin: 0.5rem 0; }
h2 { font-size: 1.3rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.1rem; }
.meta { color: #57606a; font-size: 0.9rem; }
.question { font-size: 1.1rem; padding: 0.5rem 0.75rem; border-left: 4px solid #2166ac;
  background: #f3f6fa; }
.table-wrap { overflow-x: auto; -webkit-overflow-scrolling: touch; margin: 0.5rem 0; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.5rem; text-align: left;
  white-space: nowrap; vertical-align: top; }
td.key { white-space: normal; min-width: 8rem; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.explain { font-size: 0.9rem; }
dl.explain dt { font-weight: 600; }
dl.explain dd { margin: 0 0 0.4rem 1rem; }
figure { margin: 1rem 0; }
img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9rem; color: #57606a; }
pre { overflow-x: auto; background: #f6f8fa; padding: 0.75rem; font-size: 0.85rem; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    numeric: Sequence[bool] | None = None,
    attr: str = "",
    keys: bool = False,
) -> str:
    """A table in its scrolling wrapper; ``attr`` marks it (``data-table`` for a metrics.json
    table, ``data-part`` for the report's own). ``keys``: the first column holds long dotted
    names that may wrap after a ``.`` or ``_``."""
    numeric = list(numeric or [False] * len(headers))
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in headers)

    def cell(text: str, n: bool, first: bool) -> str:
        if first and keys:
            return '<td class="key">' + _BREAK_AFTER.sub(r"\1<wbr>", _e(text)) + "</td>"
        return f'<td class="num">{_e(text)}</td>' if n else f"<td>{_e(text)}</td>"

    body = "".join(
        "<tr>"
        + "".join(cell(c, n, j == 0) for j, (c, n) in enumerate(zip(row, numeric, strict=True)))
        + "</tr>\n"
        for row in rows
    )
    return (
        f'<div class="table-wrap"><table{attr}>\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}</tbody></table></div>\n"
    )


def _render_html(run: _Run) -> str:
    s, a = run.summary, run.artifacts
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(run.name)} · hookscope report</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(run.name)}</h1>",
    ]
    meta = [f"action <code>{_e(s['action'])}</code>"] if s.get("action") else []
    if a.get("started") or a.get("finished"):
        meta.append(f"ran {_e(a.get('started', '?'))} → {_e(a.get('finished', '?'))}")
    if meta:
        out.append(f'<p class="meta">{" · ".join(meta)}</p>')
    out += [
        '<section id="question"><h2>Question</h2>',
        f'<p class="question">{_e(s.get("question") or "not recorded")}</p></section>',
    ]
    if run.tables:
        out.append('<section id="results"><h2>Results</h2>')
    for t in run.tables:
        out.append(f"<h3>{_e(t.title)}</h3>")
        out.append(_html_table(t.headers, t.cells, t.numeric, f' data-table="{_e(t.name)}"'))
        if any(h.endswith("[CI]") for h in t.headers):
            out.append('<p class="meta">Brackets hold the confidence interval [low, high].</p>')
        if t.explain:
            items = "".join(f"<dt>{_e(c)}</dt><dd>{_e(e)}</dd>" for c, e in t.explain)
            out.append(f'<p>What each number means:</p><dl class="explain">{items}</dl>')
    if run.tables:
        out.append("</section>")
    metrics = _flatten(s.get("metrics") or {})
    if metrics:
        out.append('<section id="metrics"><h2>Summary metrics</h2>')
        rows = [(k, _metric_text(k, v)) for k, v in metrics]
        out.append(
            _html_table(["metric", "value"], rows, [False, True], ' data-part="metrics"', keys=True)
        )
        out.append("</section>")
    if run.figures:
        out.append('<section id="figures"><h2>Figures</h2>')
    for f in run.figures:
        uri = "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")
        cap = f"<strong>{_e(f.title)}.</strong> {_e(f.caption)}".rstrip()
        out.append(
            f'<figure id="figure-{_e(f.name)}"><img src="{uri}" alt="{_e(f.title)}" '
            f'width="{f.width}" height="{f.height}"><figcaption>{cap}</figcaption></figure>'
        )
    if run.figures:
        out.append("</section>")
    if s.get("notes"):
        out.append('<section id="notes"><h2>Notes</h2>')
        out += [f"<p>{_e(n)}</p>" for n in s["notes"]]
        out.append("</section>")
    out.append(_html_provenance(run))
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _html_provenance(run: _Run) -> str:
    a = run.artifacts
    out = ['<section id="reproducibility"><h2>Reproducibility</h2>']
    out.append(f"<h3>Config</h3><pre>{_e(_config_text(a.get('config')))}</pre>")
    commit = a.get("git_commit")
    out.append("<h3>Versions</h3>")
    out.append(
        f"<p>Git commit: <code>{_e(commit)}</code></p>" if commit else "<p>Git commit: none</p>"
    )
    versions = run.pairs("versions")
    out.append(
        _html_table(["package", "version"], versions, attr=' data-part="versions"')
        if versions
        else "<p>not recorded</p>"
    )
    for key, title, head in (
        ("seeds", "Seeds", ["seed", "value"]),
        ("durations", "Durations", ["stage", "seconds"]),
    ):
        rows = run.pairs(key)
        out.append(f"<h3>{title}</h3>")
        out.append(
            _html_table(head, rows, [False, key == "durations"], f' data-part="{key}"')
            if rows
            else "<p>not recorded</p>"
        )
    keys = a.get("store_keys") or []
    out.append("<h3>Store keys</h3>")
    out.append(
        "<ul>" + "".join(f"<li><code>{_e(k)}</code></li>" for k in keys) + "</ul>"
        if keys
        else "<p>none</p>"
    )
    files = run.files()
    out.append("<h3>Files</h3>")
    if files:
        body = "".join(
            f'<tr><td>{_e(p)}</td><td><code title="{_e(h)}">{_e(h[:12])}</code></td></tr>\n'
            for p, h in files
        )
        out.append(
            '<div class="table-wrap"><table data-part="files">\n<thead><tr>'
            '<th scope="col">file</th><th scope="col">sha256</th></tr></thead>\n'
            f"<tbody>\n{body}</tbody></table></div>"
        )
    else:
        out.append("<p>not recorded</p>")
    out.append("</section>")
    return "\n".join(out)


# --------------------------------------------------------------------------- entry point


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Build ``report.md`` and ``report.html`` in ``run_dir`` from its ``artifacts.json``,
    ``metrics.json`` and ``figures/*.png``; return their paths ``(md, html)``.

    Everything is read and checked before anything is written, so a missing or invalid input
    (an ExperimentError naming the file and the run folder) leaves the old reports as they
    were. Each report is written atomically; the same inputs give the same bytes.
    """
    run_dir = Path(run_dir)
    run = _load(run_dir)
    md_text, html_text = _render_markdown(run), _render_html(run)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write(md_path, lambda f: f.write(md_text.encode("utf-8")))
    atomic_write(html_path, lambda f: f.write(html_text.encode("utf-8")))
    return md_path, html_path
