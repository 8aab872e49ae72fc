"""hookscope.experiments.report: report.md and one self-contained report.html from a run
folder, checked in a real browser (Debian's headless Chromium, driven over the DevTools
protocol): no console errors, every image decodes, phone- and desktop-width screenshots are
not blank, and the tables hold the numbers of metrics.json, formatted by this file's own
rule, not by the report's code."""

import base64
import html
import io
import json
import math
import os
import re
import select
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from hookscope.errors import ExperimentError, HookscopeError
from hookscope.experiments.report import format_number, is_p_value, report_tables, write_report

CHROMIUM = shutil.which("chromium")
NAN = float("nan")
DASH = "—"
PHONE, DESKTOP = 390, 1280

# ------------------------------------------------------------------------- a fake run

SWEEP = {
    "name": "probe_sweep",
    "title": "Probe accuracy per site, with controls",
    # bare ci_low / ci_high belong to "score"; the controls stay beside it
    "columns": [
        "site",
        "score",
        "ci_low",
        "ci_high",
        "shuffle",
        "random_features",
        "control_task",
        "selectivity",
        "p_value",
        "n",
    ],
    "rows": [
        ["resid_post.0", 0.61234, 0.58111, 0.64399, 0.50123, 0.52, 0.55, 0.06234, 0.0123, 400],
        ["resid_post.1", 0.91234, 0.88421, 0.93712, 0.49876, 0.53, 0.6, 0.31234, 1.234e-05, 400],
        ["resid_post.2 <b>&", 0.875, None, None, None, 0.5, NAN, None, 0.5, 400],
    ],
    "explain": {
        "score": "Test accuracy of a logistic probe at this site.",
        "ci_low": "Lower end of the 95 % bootstrap interval of the score.",
        "shuffle": "Accuracy of the same probe trained on shuffled labels.",
        "selectivity": "Score minus the control-task score.",
        "p_value": "Permutation p-value of score > shuffle.",
    },
}
CURVE = {
    "name": "layer_curve",
    "title": "Decodability across layers",
    # X_ci_low / X_ci_high belong to X, for two columns at once
    "columns": [
        "layer",
        "accuracy",
        "accuracy_ci_low",
        "accuracy_ci_high",
        "control_gap",
        "control_gap_ci_low",
        "control_gap_ci_high",
        "perm_p",
        "verdict",
    ],
    "rows": [
        [0, 0.5551, 0.5123, 0.5987, 0.01234, -0.0201, 0.0444, 0.3456, "chance"],
        [1, 0.7777, 0.74, 0.81, 0.2001, 0.15, 0.25, 0.001, "decodable"],
        [2, 0.999, 0.99, 1.0, 0.41, 0.38, 0.44, 0.0000789, None],
    ],
    "explain": {
        "accuracy": "Held-out accuracy of the probe at this layer.",
        "control_gap": "Accuracy minus the best control's accuracy.",
        "perm_p": "Permutation p-value of the accuracy.",
    },
}
FIGURES = [
    {"name": "cka", "title": "CKA between layers", "caption": "Linear CKA; darker is closer."},
    {"name": "curve", "title": "Layer curve", "caption": "Accuracy with its 95 % band."},
]
QUESTION = "Where does subject number become linearly decodable? <script>alert(1)</script>"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One fake run folder, made once; tests that change it work on a copy."""
    return _make_run(tmp_path_factory.mktemp("template") / "run")


def _make_run(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "figures").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=80)
    ax.imshow(rng.random((6, 6)), cmap="viridis")
    ax.set_title("CKA")
    fig.savefig(folder / "figures/cka.png")
    fig.savefig(folder / "figures/cka.svg")
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    x = np.arange(6)
    ax.fill_between(x, 0.4 + 0.08 * x, 0.6 + 0.08 * x, color="#2166ac", alpha=0.5)
    ax.plot(x, 0.5 + 0.08 * x, color="#b2182b", lw=3)
    fig.savefig(folder / "figures/curve.png")
    fig.savefig(folder / "figures/curve.svg")
    plt.close("all")
    artifacts = {
        "run_name": "digits_collapse <demo>",
        "config": {
            "run_name": "digits_collapse",
            "seed": 42,
            "dataset": {"name": "digits", "n": 2000, "split": {"train": 0.6, "test": 0.4}},
            "action": {"name": "repr_collapse", "params": {"metric": "accuracy"}},
            "controls": ["shuffle", "random_features", "control_task"],
        },
        "versions": {"hookscope": "0.1.0", "torch": "2.5.1", "transformers": "5.9.0"},
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "seeds": {"seed": 42, "split": 43},
        "files": {
            "metrics.json": "a" * 64,
            "figures/cka.png": "b" * 64,
            "predictions.parquet": "c" * 64,
        },
        "store_keys": ["digits_cnn/0123abcd"],
        "started": "2025-01-01T10:00:00",
        "finished": "2025-01-01T10:00:42",
        "durations": {"extract": 12.3456, "fit": 20.5, "report": 0.25},
    }
    summary = {
        "action": "repr_collapse",
        "question": QUESTION,
        "metrics": {"collapse_index": 0.1234, "peak": {"layer": 2, "accuracy": 0.999}, "p": 0.04},
        "tables": [SWEEP, CURVE],
        "figures": FIGURES,
        "notes": ["Scores are on the held-out split.", "A <note> with & in it."],
    }
    (folder / "artifacts.json").write_text(json.dumps(artifacts, indent=2))
    # NaN as JSON's null and as Python's NaN token: both must print as a dash
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2))
    return folder


def _expected(v, p=False):
    """This file's own rule for a printed number (independent of the report's code)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return f"{v:.3g}" if p else f"{v:.3f}"


def _expected_cells(table, merged):
    """Printed rows: ``merged`` maps a value column to its (low, high) CI columns."""
    cols = table["columns"]
    bounds = {c for pair in merged.values() for c in pair}
    out = []
    for row in table["rows"]:
        cells = []
        for col, v in zip(cols, row):
            if col in bounds:
                continue
            p = col in ("p_value", "perm_p")
            text = _expected(v, p)
            if col in merged and text != DASH:
                lo, hi = (row[cols.index(c)] for c in merged[col])
                if lo is not None and hi is not None:
                    text += f" [{_expected(lo, p)}, {_expected(hi, p)}]"
            cells.append(text)
        out.append(cells)
    return out


EXPECTED = {
    "probe_sweep": _expected_cells(SWEEP, {"score": ("ci_low", "ci_high")}),
    "layer_curve": _expected_cells(
        CURVE,
        {
            "accuracy": ("accuracy_ci_low", "accuracy_ci_high"),
            "control_gap": ("control_gap_ci_low", "control_gap_ci_high"),
        },
    ),
}
HEADERS = {
    "probe_sweep": [
        "site",
        "score [CI]",
        "shuffle",
        "random_features",
        "control_task",
        "selectivity",
        "p_value",
        "n",
    ],
    "layer_curve": ["layer", "accuracy [CI]", "control_gap [CI]", "perm_p", "verdict"],
}


# ------------------------------------------------------------------------- the browser
#
# Why the DevTools protocol and not `chromium --headless --enable-logging=stderr --dump-dom`:
# that log prints console.log and console.error alike as "INFO:CONSOLE" lines (checked on
# Chromium 156), so it cannot tell an error from a message, and it cannot say whether an
# image decoded. `--remote-debugging-pipe` needs no port and no extra package: Chromium reads
# JSON commands, each ended by a NUL byte, from fd 3 and writes replies and events to fd 4.
# Console calls then come typed (Runtime.consoleAPICalled type "error"), uncaught exceptions
# as Runtime.exceptionThrown, failed loads as Log.entryAdded level "error", every request as
# Network.requestWillBeSent; HTMLImageElement.decode() says whether each image decodes; and
# Page.captureScreenshot takes a full-page screenshot at any width with mobile emulation (so
# the viewport meta tag matters, as on a phone).


class Browser:
    """Headless Chromium over --remote-debugging-pipe; one page (target) per load."""

    def __init__(self, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--mute-audio",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # bash puts the two pipe ends on fds 3 and 4 (thread-safe, unlike preexec_fn; dash
        # rejects descriptors above 9)
        script = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        self.stderr = profile.parent / "chromium-stderr.txt"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [shutil.which("bash") or "bash", "-c", script, CHROMIUM, *flags],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=(to_browser_r, from_browser_w),
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer in {self.timeout} s")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError(f"Chromium exited; see {self.stderr}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout
        seen = [e for e in self.events if e.get("method") == method]
        for e in seen:
            if e.get("sessionId") == session:
                return e
        while True:
            e = self._read_message(deadline)
            self.events.append(e)
            if e.get("method") == method and e.get("sessionId") == session:
                return e

    def evaluate(self, session: str, expression: str):
        res = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session,
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:60]}...: {res['exceptionDetails']}")
        return res["result"].get("value")

    def open(self, url: str) -> str:
        """A new page loading ``url``; returns its session once the load event fired."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        # let late work (image decoding, timers) report before the errors are read
        self.evaluate(session, "new Promise(r => requestAnimationFrame(() => setTimeout(r, 100)))")
        return session

    def errors(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions and error log entries of one page."""
        out = []
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append("console." + p["type"] + ": " + str(p["args"][:1]))
            elif m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(
                    f"exception: {d.get('text')} {d.get('exception', {}).get('description')}"
                )
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def requests(self, session: str) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("sessionId") == session and e.get("method") == "Network.requestWillBeSent"
        ]

    def images(self, session: str) -> list:
        """[naturalWidth, naturalHeight] of every <img>, or an error text where decode() fails."""
        return self.evaluate(
            session,
            "Promise.all([...document.images].map(i => i.decode()"
            ".then(() => [i.naturalWidth, i.naturalHeight], e => 'failed: ' + e.message)))",
        )

    def screenshot(self, session: str, width: int, mobile: bool) -> tuple[Image.Image, dict]:
        """A full-page screenshot at ``width`` CSS pixels, and the page's layout there."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": mobile},
            session,
        )
        layout = self.evaluate(
            session,
            "new Promise(r => requestAnimationFrame(() => r({"
            "inner: innerWidth, scroll: document.documentElement.scrollWidth,"
            "height: document.documentElement.scrollHeight,"
            "body: [document.body.getBoundingClientRect().left, document.body.clientWidth],"
            "images: [...document.images].map(i => { const b = i.getBoundingClientRect();"
            "  return [b.left + scrollX, b.top + scrollY, b.width, b.height]; }),"
            "wraps: [...document.querySelectorAll('.table-wrap')].map(w =>"
            "  [getComputedStyle(w).overflowX, w.scrollWidth, w.clientWidth])})))",
        )
        height = min(layout["height"], 16000)
        shot = self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
            session,
        )
        return Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB"), layout

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=20)
        except (OSError, EOFError, TimeoutError, RuntimeError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=20)
            os.close(self._w)
            os.close(self._r)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = _make_run(tmp_path_factory.mktemp("report") / "run")
    md, html_path = write_report(folder)
    return folder, md, html_path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    b = Browser(tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


@pytest.fixture(scope="module")
def page(run, browser):
    """report.html loaded once: errors, requests, image decodes, DOM, two screenshots."""
    _, _, html_path = run
    session = browser.open(html_path.as_uri())
    out = {
        "errors": browser.errors(session),
        "requests": browser.requests(session),
        "images": browser.images(session),
        "dom": browser.evaluate(session, "document.documentElement.outerHTML"),
    }
    out["phone"] = browser.screenshot(session, PHONE, mobile=True)
    out["desktop"] = browser.screenshot(session, DESKTOP, mobile=False)
    out["errors_after"] = browser.errors(session)
    return out


# ------------------------------------------------------------------------- parsing helpers


class _Tables(HTMLParser):
    """Every <table data-table=...>: its header texts and its rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self._cur = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.imgs: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        if tag == "table":
            # metrics.json tables by name, the report's own ones (metrics, files...) as "part:"
            key = attrs.get("data-table") or "part:" + attrs.get("data-part", "")
            self._cur = self.tables.setdefault(key, {"head": [], "rows": []})
        elif tag == "tr" and self._cur is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            key = "head" if not self._cur["head"] and not self._cur["rows"] else "rows"
            if key == "head":
                self._cur["head"] = self._row
            else:
                self._cur["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._cur = None


def _parse(html_text: str) -> _Tables:
    p = _Tables()
    p.feed(html_text)
    return p


def _md_tables(md: str) -> list[list[list[str]]]:
    """GitHub tables of a markdown text: rows of cells, the alignment row dropped."""
    tables, cur = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [
                html.unescape(c.strip().replace("\\|", "|"))
                for c in re.split(r"(?<!\\)\|", line)[1:-1]
            ]
            if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                continue
            if cur is None:
                cur = []
                tables.append(cur)
            cur.append(cells)
        else:
            cur = None
    return tables


def _non_white(img: Image.Image) -> float:
    a = np.asarray(img.convert("RGB"), dtype=np.int16)
    return float((a < 235).any(axis=-1).mean())


# ------------------------------------------------------------------------- conventions


def test_format_number_follows_the_stated_rule():
    assert format_number(0.91234) == "0.912"
    assert format_number(12.34567) == "12.346"
    assert format_number(-0.0001) == "-0.0001"
    assert format_number(1.234e-5) == "1.23e-05"
    assert format_number(2.5e7) == "2.5e+07"
    assert format_number(0.0) == "0.000"
    assert format_number(-1e-9 * 0) == "0.000"
    assert format_number(7) == "7"
    assert format_number(None) == format_number(NAN) == DASH
    assert format_number(0.0004567, p_value=True) == "0.000457"
    assert format_number(0.05, p_value=True) == "0.05"
    assert format_number(True) == "true"
    assert format_number("resid_post.3") == "resid_post.3"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("p", True),
        ("p_value", True),
        ("pvalue", True),
        ("p-value", True),
        ("perm_p", True),
        ("p_holm", True),
        ("peak_layer", False),
        ("gap", False),
        ("map_score", False),
        ("top_k", False),
    ],
)
def test_p_value_names(name, expected):
    assert is_p_value(name) is expected


def test_ci_columns_merge_into_their_value_and_the_rest_keep_their_order():
    t = {
        "name": "t",
        "columns": ["site", "acc", "ci_low", "ci_high", "shuffle", "x", "x_ci_low", "x_ci_high"],
        "rows": [["a", 0.5, 0.4, 0.6, 0.1, 1.0, 0.9, 1.1]],
    }
    (out,) = report_tables([t])
    # no "score" column: the bare pair belongs to the column on its left
    assert out.headers == ["site", "acc [CI]", "shuffle", "x [CI]"]
    assert out.cells == [["a", "0.500 [0.400, 0.600]", "0.100", "1.000 [0.900, 1.100]"]]
    assert out.numeric == [False, True, True, True]


# ------------------------------------------------------------------------- in the browser


def test_report_loads_with_no_console_error_and_no_request_outside_the_file(run, page):
    _, _, html_path = run
    assert page["errors"] == [] and page["errors_after"] == []
    # the page itself, then only data: URIs (embedded figures); nothing from a network
    assert page["requests"][0] == html_path.as_uri()
    assert all(u.startswith("data:") for u in page["requests"][1:]), page["requests"]


def test_the_error_detector_catches_errors(browser, tmp_path):
    """Control: a page that does err is seen to err, so the clean result above means something."""
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><p>bad</p>"
        f'<img src="data:image/png;base64,{png}"><img src="missing.png">'
        '<script>console.log("harmless-log"); console.error("deliberate"); undefined_fn();</script>'
        "</body></html>"
    )
    session = browser.open(bad.as_uri())
    errors = browser.errors(session)
    assert any("console.error" in e and "deliberate" in e for e in errors), errors
    assert any("exception" in e and "undefined_fn" in e for e in errors), errors
    assert any("missing.png" in e for e in errors), errors  # the failed load of a file
    assert not any("harmless-log" in e for e in errors)  # console.log is not an error
    images = browser.images(session)
    assert len(images) == 2 and all(isinstance(i, str) and "failed" in i for i in images)


def test_every_image_decodes_in_pil_and_in_the_browser(run, page):
    _, _, html_path = run
    srcs = _parse(html_path.read_text()).imgs
    assert len(srcs) == len(FIGURES)
    sizes = []
    for src, fig in zip(srcs, FIGURES):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        data = base64.b64decode(src[len(prefix) :], validate=True)
        assert data == (run[0] / "figures" / f"{fig['name']}.png").read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            sizes.append(list(im.size))
    # the browser decodes each and finds the same pixel size
    assert page["images"] == sizes
    # the SVGs beside them (linked from the markdown) are well-formed XML
    for fig in FIGURES:
        root = ET.parse(run[0] / "figures" / f"{fig['name']}.svg").getroot()
        assert root.tag.endswith("svg")


@pytest.mark.parametrize("width", [PHONE, DESKTOP])
def test_screenshots_at_phone_and_desktop_width_are_not_blank(page, width, tmp_path):
    img, layout = page["phone" if width == PHONE else "desktop"]
    img.save(tmp_path / f"report_{width}.png")  # kept in pytest's tmp folder to look at
    assert img.width == width and layout["inner"] == width
    # the page itself never scrolls sideways; a wide table scrolls inside its own box
    assert layout["scroll"] <= width, layout
    assert layout["wraps"] and all(w[0] == "auto" for w in layout["wraps"])
    if width == PHONE:
        assert any(w[1] > w[2] for w in layout["wraps"]), "no table is wider than a phone?"
    left, body_width = layout["body"]  # the content column (max-width), without the margins
    drawn = _non_white(img.crop((int(left), 0, int(left + body_width), img.height)))
    assert drawn > 0.05, f"{drawn:.1%} of the screenshot is drawn"
    assert len(layout["images"]) == len(FIGURES)
    for x, y, w, h in layout["images"]:
        assert 0 < w <= width and h > 50  # max-width: 100 %
        region = img.crop((int(x), int(y), int(x + w), int(y + h)))
        assert _non_white(region) > 0.05, f"figure at y={y} is blank in the screenshot"


def test_tables_hold_the_numbers_of_metrics_json(page):
    tables = _parse(page["dom"]).tables
    for name, rows in EXPECTED.items():
        assert tables[name]["head"] == HEADERS[name]
        assert tables[name]["rows"] == rows
    # spot checks of the rule, written out by hand
    assert tables["probe_sweep"]["rows"][1][1] == "0.912 [0.884, 0.937]"
    assert tables["probe_sweep"]["rows"][1][6] == "1.23e-05"
    assert tables["probe_sweep"]["rows"][2][0] == "resid_post.2 <b>&"  # text, not markup
    assert tables["probe_sweep"]["rows"][2][1] == "0.875"  # null CI: the value alone
    assert tables["probe_sweep"]["rows"][2][5] == DASH  # null
    assert tables["probe_sweep"]["rows"][2][4] == DASH  # NaN
    assert tables["layer_curve"]["rows"][0][2] == "0.012 [-0.020, 0.044]"
    assert tables["part:metrics"]["rows"] == [
        ["collapse_index", "0.123"],
        ["peak.layer", "2"],
        ["peak.accuracy", "0.999"],
        ["p", "0.04"],
    ]


def test_html_holds_question_explanations_figures_notes_and_provenance(run, page):
    dom = page["dom"]
    parsed = _parse(dom)
    # escaped: the question's <script> is text; the page holds no script, link or iframe
    assert not any(t in ("script", "link", "iframe", "object", "embed") for t, _ in parsed.tags)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in dom
    for t in (SWEEP, CURVE):
        for sentence in t["explain"].values():
            assert html.escape(sentence, quote=False) in dom
    for fig in FIGURES:
        assert fig["caption"] in dom and fig["title"] in dom
    assert "A &lt;note&gt; with &amp; in it." in dom
    assert "digits_collapse &lt;demo&gt;" in dom
    assert "repr_collapse" in dom and "control_task" in dom  # the config
    assert "0123456789abcdef0123456789abcdef01234567" in dom
    assert parsed.tables["part:versions"]["rows"] == [
        ["hookscope", "0.1.0"],
        ["torch", "2.5.1"],
        ["transformers", "5.9.0"],
    ]
    assert parsed.tables["part:seeds"]["rows"] == [["seed", "42"], ["split", "43"]]
    assert parsed.tables["part:durations"]["rows"] == [
        ["extract", "12.346"],
        ["fit", "20.500"],
        ["report", "0.250"],
    ]
    assert parsed.tables["part:files"]["rows"] == [
        ["figures/cka.png", "b" * 12],
        ["metrics.json", "a" * 12],
        ["predictions.parquet", "c" * 12],
    ]


def test_markdown_holds_the_same_tables(run, page):
    _, md_path, _ = run
    md = md_path.read_text()
    dom_tables = _parse(page["dom"]).tables
    md_tables = _md_tables(md)
    for name in ("probe_sweep", "layer_curve", "part:metrics", "part:versions", "part:durations"):
        want = [dom_tables[name]["head"], *dom_tables[name]["rows"]]
        assert want in md_tables, name
    assert [HEADERS["probe_sweep"], *EXPECTED["probe_sweep"]] in md_tables
    for fig in FIGURES:
        assert f"(figures/{fig['name']}.png)" in md and fig["caption"] in md
    # text, never markup: GitHub would render a raw <script> or <b>
    assert html.escape(QUESTION, quote=False) in md and "<script>" not in md
    assert "resid_post.2 &lt;b&gt;&amp;" in md and "A &lt;note&gt; with &amp; in it." in md
    assert "seed: 42" in md  # the config, as YAML


# ------------------------------------------------------------------------- writing


def test_same_inputs_give_the_same_bytes_and_leave_no_temporary_file(template, tmp_path):
    folder = shutil.copytree(template, tmp_path / "run")
    md, html_path = write_report(folder)
    first = md.read_bytes(), html_path.read_bytes()
    assert write_report(folder) == (folder / "report.md", folder / "report.html")
    assert (md.read_bytes(), html_path.read_bytes()) == first
    assert sorted(p.name for p in folder.iterdir()) == [
        "artifacts.json",
        "figures",
        "metrics.json",
        "report.html",
        "report.md",
    ]


def _drop(name):
    def change(folder):
        (folder / name).unlink()

    return change


def _edit_metrics(edit):
    def change(folder):
        summary = json.loads((folder / "metrics.json").read_text())
        edit(summary)
        (folder / "metrics.json").write_text(json.dumps(summary))

    return change


@pytest.mark.parametrize(
    "change, words",
    [
        (_drop("metrics.json"), ["metrics.json is missing"]),
        (_drop("artifacts.json"), ["artifacts.json is missing"]),
        (_drop("figures/curve.png"), ["figures/curve.png", "missing"]),
        (
            lambda f: (f / "metrics.json").write_text('{"tables": [\n  1,,\n]}'),
            ["not valid JSON", "line 2"],
        ),
        (
            lambda f: (f / "figures/cka.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated"),
            ["cka.png", "not a readable PNG"],
        ),
        (
            _edit_metrics(lambda s: s["tables"][1]["rows"][2].pop()),
            ["layer_curve", "row 2 has 8 cells for 9 columns"],
        ),
        (
            _edit_metrics(lambda s: s["tables"][0]["rows"][0].__setitem__(1, {"x": 1})),
            ["probe_sweep", "row 0", "numbers, strings or null"],
        ),
        (
            _edit_metrics(lambda s: s["figures"][0].__setitem__("name", "../../etc/x")),
            ["figures[0]", "file name"],
        ),
        (
            lambda f: (f / "artifacts.json").write_text('{"config": {}}'),
            ["artifacts.json", "run_name"],
        ),
    ],
)
def test_missing_or_invalid_input_names_the_file_and_writes_nothing(
    template, tmp_path, change, words
):
    folder = shutil.copytree(template, tmp_path / "run")
    change(folder)
    with pytest.raises(ExperimentError) as err:
        write_report(folder)
    assert isinstance(err.value, HookscopeError)
    message = str(err.value)
    for w in words:
        assert w in message, message
    assert str(folder) in message
    assert not (folder / "report.md").exists() and not (folder / "report.html").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_a_run_with_no_table_figure_or_note_still_reports(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "artifacts.json").write_text(json.dumps({"run_name": "bare"}))
    (folder / "metrics.json").write_text(json.dumps({"action": "x", "question": "Why?"}))
    md, html_path = write_report(folder)
    page = html_path.read_text()
    assert "<h1>bare</h1>" in page and "Why?" in page and "not recorded" in page
    assert "<img" not in page and "# bare" in md.read_text()


def test_a_run_folder_that_does_not_exist(tmp_path):
    with pytest.raises(ExperimentError, match="does not exist"):
        write_report(tmp_path / "nowhere")
