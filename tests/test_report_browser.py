"""The HTML reports, opened from disk in a real browser (headless Chromium).

For a decomposition report and a Jacobian report, each opened from a ``file://`` URL:

* no JavaScript error: no uncaught exception, no ``console.error``, no error-level log entry, no failed request;
* every figure is drawn: each ``.plotly-graph-div`` holds a ``.main-svg`` with content;
* nothing is fetched from the network (plotly.js is inlined once; no CDN, no MathJax);
* a screenshot is not blank (many distinct pixel colours);
* hostile token strings (``<script>...</script>``, ``<img onerror=...>``) put into the corpus,
  the prompt, the tokenizer's vocabulary and the model id are shown as text and never run:
  no global is set, no alert dialog opens, and the raw HTML holds them only escaped.

Driver: Playwright for Python driving the system's Chromium (``executable_path``; Playwright's own
browser downloads are never used, so ``playwright install`` is not needed). The test needs
``/usr/bin/chromium`` (Debian: ``apt-get install -y chromium``; ``make setup`` installs it when run as
root) and fails, rather than skips, when it is missing. ``CHROMIUM=/path`` overrides.

Both reports are built from tiny random models (a Llama through nnsight) that use the real
SmolLM2 tokenizer with the hostile strings added as whole tokens, so the strings reach every
place a token can appear: hover texts, tables, legends, axis labels, titles.
"""
from __future__ import annotations

import base64
import html
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]
VIEWPORT = {"width": 1200, "height": 1600}

# The first two, if they ever ran, would set window.__xss and open an alert dialog; the third is markup
# Plotly itself understands (bold, line break), which a token string must not turn into.
PAYLOADS = ("<script>window.__xss=1;alert(1)</script>", '<img src=x onerror="window.__xss=2;alert(2)">',
            "<b>bold</b><br>")
HOSTILE_ID = "tiny<script>window.__xss=3;alert(3)</script>"


# ----- the browser: Playwright on the system Chromium ----------------------------------------------
def launch_chromium(playwright):
    """The system Chromium, headless; a missing browser is a failure with the fix, never a skip."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"headless Chromium is needed at {CHROMIUM} for the HTML report test and is missing. "
                    f"Install it (Debian/Ubuntu: `apt-get install -y chromium`, which `make setup` does as root) "
                    f"or point CHROMIUM=/path/to/chromium at another build.", pytrace=False)
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)


class Page:
    """One page that records what the checks look at: problems (errors, dialogs) and requested URLs."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport=VIEWPORT)
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda err: self.problems.append(f"uncaught: {err}"))
        self.page.on("console", self._console)
        self.page.on("dialog", self._dialog)
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))

    def _console(self, message) -> None:  # console.error / console.assert and error-level log entries
        if message.type in ("error", "assert"):
            self.problems.append(f"console.{message.type}: {message.text} {message.location.get('url', '')}")

    def _dialog(self, dialog) -> None:
        self.problems.append(f"dialog opened: {dialog.type} {dialog.message!r}")
        dialog.accept()  # the page is blocked until the dialog is answered

    def evaluate(self, expression: str):
        return self.page.evaluate(expression)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield Page(chromium)
        chromium.close()


# ----- hostile tokens in real reports --------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_model():
    """A tiny random Llama (nnsight) with the SmolLM2 tokenizer, the payloads added as whole tokens."""
    from transformers import AutoTokenizer

    from toolkit.backends import make_backend
    from toolkit.models.tiny import tiny_hf_model
    from toolkit.models.weights import SMOLLM2, converted_folder
    tokenizer = AutoTokenizer.from_pretrained(str(converted_folder(SMOLLM2)))
    tokenizer.add_tokens(list(PAYLOADS))
    for p in PAYLOADS:
        assert len(tokenizer(p, add_special_tokens=False)["input_ids"]) == 1, "payload must be a single token"
    hf = tiny_hf_model("llama", vocab_size=len(tokenizer), n_layers=3)
    return make_backend(hf, tokenizer, backend="nnsight", model_id=HOSTILE_ID)


def _hostile_corpus():
    from toolkit.data import Corpus
    words = ("the river", "a bridge", "of stone", "crosses", "north", "and then", "every year", "people walk")
    docs = []
    for d in range(12):
        parts = []
        for i in range(60):
            parts.append(words[(d + i) % len(words)])
            if i % 5 == 2:
                parts.append(PAYLOADS[(d + i) % len(PAYLOADS)])
        docs.append(" ".join(parts))
    return Corpus(f"corpus {PAYLOADS[0]}", docs, source="test_report_browser: hostile tokens")


@pytest.fixture(scope="module")
def decomposition_report(hostile_model, tmp_path_factory):
    from toolkit.decompose.pipeline import decompose
    from toolkit.decompose.report import write_decomposition_report
    result = decompose(hostile_model, _hostile_corpus(), n_train=12, n_test=4, seq_len=32, per_text=4, k=16,
                       rank=8, mlp_steps=20, sweep_k=[8, 16], sweep_rank=[4, 8], n_boot=100, progress=False)
    assert set(PAYLOADS) & set(result.anchors["token"].tolist()), "the corpus should put payloads at some anchors"
    # and for certain at every anchor, so whichever point the mouse hits carries one
    n = len(result.anchors["token"])
    result.anchors["token"] = np.array([PAYLOADS[i % len(PAYLOADS)] for i in range(n)], dtype=str)
    out = tmp_path_factory.mktemp("decomposition")
    return write_decomposition_report(result, out / "report.html")


@pytest.fixture(scope="module")
def jacobian_report(hostile_model, tmp_path_factory):
    from toolkit.jacobian.run import run_jacobian
    out = tmp_path_factory.mktemp("jacobian")
    prompt = f"The bridge {PAYLOADS[0]} out of {PAYLOADS[1]} Marin {PAYLOADS[2]} is the"
    summary = run_jacobian(hostile_model, prompt=prompt, top_k=5, n_vectors=3, out=out)
    assert set(PAYLOADS) <= set(summary["str_tokens"])
    assert summary["detached"]["reconstruction_error"] < 1e-5
    return out / "report.html"


# ----- checks ------------------------------------------------------------------------------------------
FIGURE_STATE = """(() => {
  const divs = [...document.querySelectorAll('.plotly-graph-div')];
  return {n: divs.length,
          drawn: divs.filter(d => d.querySelector('.main-svg') && d._fullLayout
                                  && d.querySelectorAll('.main-svg *').length > 20).length,
          empty: divs.filter(d => !d.querySelector('.main-svg')).map(d => d.id)};
})()"""

COUNT_COLOURS = """new Promise((resolve, reject) => {
  const img = new Image();
  img.onload = () => {
    const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
    const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data, seen = new Set();
    for (let i = 0; i < d.length; i += 4) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    resolve({colours: seen.size, width: c.width, height: c.height});
  };
  img.onerror = () => reject(new Error('screenshot did not decode'));
  img.src = 'data:image/png;base64,%s';
})"""


POINT_XY = """((i) => {
  const gd = document.querySelector('.plotly-graph-div');
  gd.scrollIntoView();
  const fl = gd._fullLayout, tr = gd._fullData[0], box = gd.getBoundingClientRect();
  return {x: box.left + fl._size.l + fl.xaxis.c2p(fl.xaxis.d2c(tr.x[i])),
          y: box.top + fl._size.t + fl.yaxis.c2p(fl.yaxis.d2c(tr.y[i]))};
})(%d)"""

HOVER_LABEL = """(() => {
  const gd = document.querySelector('.plotly-graph-div');
  return {text: [...gd.querySelectorAll('.hoverlayer text')].map(t => t.textContent).join(' '),
          point: gd._hoverdata && gd._hoverdata.length ? gd._hoverdata[0].pointNumber : null};
})()"""


def _hover(browser: Page, point: int) -> dict:
    """Move the mouse onto ``point`` of the first figure's first trace; the hover label and the point hit."""
    xy = browser.evaluate(POINT_XY % point)
    # first off the figure until the previous label is gone, so the label read next is this move's own
    browser.page.mouse.move(1, 1)
    deadline = time.monotonic() + 10
    while browser.evaluate(HOVER_LABEL)["text"] and time.monotonic() < deadline:
        time.sleep(0.05)
    browser.page.mouse.move(xy["x"] - 3, xy["y"] - 3)
    browser.page.mouse.move(xy["x"], xy["y"])
    deadline = time.monotonic() + 10
    while True:
        label = browser.evaluate(HOVER_LABEL)
        if label["text"] or time.monotonic() > deadline:
            return label
        time.sleep(0.1)


def _open_and_check(browser: Page, report: Path, screenshot_to: Path) -> dict:
    """Load ``report`` and run every check; returns the figure state and colour count."""
    text = report.read_text(encoding="utf-8")
    # self-contained: plotly.js inlined once, nothing loaded by URL
    assert text.count("plotly.js v") == 1 or text.count("* plotly.js") == 1, "plotly.js should be inlined once"
    assert not re.search(r"<script[^>]+\bsrc\s*=", text, re.I), "a <script src=...> would need the network"
    assert not re.search(r"<link[^>]+\bhref\s*=\s*['\"]?https?:", text, re.I), "no external stylesheets"
    # hostile strings: never raw in the file, always present escaped
    for payload in (*PAYLOADS, HOSTILE_ID):
        assert payload not in text, f"raw {payload!r} in the HTML"
    assert html.escape(PAYLOADS[0]) in text or html.escape(PAYLOADS[0], quote=False) in text

    problems, requests = len(browser.problems), len(browser.requests)
    browser.page.goto(report.resolve().as_uri(), wait_until="load")
    deadline = time.monotonic() + 60
    while True:
        state = browser.evaluate(FIGURE_STATE)
        if state["n"] and state["drawn"] == state["n"]:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{report.name}: only {state['drawn']} of {state['n']} figures drew; empty: {state['empty']}")
        time.sleep(0.2)
    browser.page.wait_for_timeout(500)  # let late errors (async plotly work) arrive

    assert not browser.problems[problems:], f"{report}: {browser.problems[problems:]}"
    remote = [u for u in browser.requests[requests:] if not u.startswith(("file:", "data:", "about:", "blob:"))]
    assert not remote, f"the report fetched from the network: {remote}"
    assert browser.evaluate("typeof window.__xss") == "undefined", "a hostile token string was executed"
    injected = browser.evaluate("document.querySelectorAll('img[src=\"x\"]').length + [...document.scripts]"
                                ".filter(s => s.text.trim().startsWith('window.__xss')).length")
    assert injected == 0, "a hostile token string became an element"

    shot = browser.page.screenshot(path=screenshot_to, type="png", full_page=False)
    pixels = browser.evaluate(COUNT_COLOURS % base64.b64encode(shot).decode())
    assert pixels["width"] > 500 and pixels["height"] > 500, pixels
    assert pixels["colours"] > 200, f"screenshot looks blank: {pixels}"
    return {**state, **pixels}


def test_decomposition_report_in_browser(browser, decomposition_report, tmp_path):
    info = _open_and_check(browser, decomposition_report, tmp_path / "decomposition.png")
    assert info["n"] >= 8, info  # scatter, rho, rel err, control, alignment, angles, projections, 2 sweeps
    body = browser.evaluate("document.body.innerText")
    assert PAYLOADS[0] in body, "the corpus name should be shown as text, tags and all"
    # a real mouse hover on points of the RelErr-KL scatter (the first figure, WebGL): the label
    # shows the anchor's token itself, tags and all, and nothing runs
    seen = set()
    for point in range(3 * len(PAYLOADS)):
        label = _hover(browser, point)
        assert label["point"] is not None, f"no hover label appeared over point {point}: {label}"
        token = PAYLOADS[label["point"] % len(PAYLOADS)]
        assert token in label["text"], f"the hover label does not show the token {token!r}: {label}"
        assert not re.search(r"&(quot|lt|gt|amp|#x?[0-9a-f]+);", label["text"]), f"undecoded entity: {label}"
        seen.add(token)
        if len(seen) == len(PAYLOADS):
            break
    assert len(seen) == len(PAYLOADS), f"hovering never reached anchors with {set(PAYLOADS) - seen}"
    assert browser.evaluate("typeof window.__xss") == "undefined"
    assert not browser.problems, browser.problems


def test_jacobian_report_in_browser(browser, jacobian_report, tmp_path):
    info = _open_and_check(browser, jacobian_report, tmp_path / "jacobian.png")
    assert info["n"] == 3, info  # reconstruction, spectra, decoded tokens
    body = browser.evaluate("document.body.innerText")
    for payload in PAYLOADS:
        assert payload in body, f"{payload!r} should appear as text in the title and the table"
    # legend entries, table cells, axis labels and heatmap labels show the token itself: every
    # text element that mentions a payload shows all of it (table cells wrap at spaces, so
    # whitespace is ignored), with no entity left undecoded
    texts = browser.evaluate("[...document.querySelectorAll('.main-svg text')].map(t => t.textContent)")
    for payload in PAYLOADS:
        core = payload[1:8]  # '<script', '<img sr', '<b>bold': present wherever the token is
        shown = [t for t in texts if core.replace(" ", "") in t.replace(" ", "")]
        assert shown, f"{payload!r} is not shown as text in any figure"
        for t in shown:
            assert payload.replace(" ", "") in t.replace(" ", ""), f"{payload!r} shown mangled as {t!r}"
    assert not [t for t in texts if re.search(r"&(quot|lt|gt|amp|#x?[0-9a-f]+);", t)], "undecoded entities shown"
    bold = browser.evaluate("[...document.querySelectorAll('.main-svg text tspan')].filter(t => "
                            "(t.style.fontWeight || t.getAttribute('style') || '').includes('bold')).length")
    assert bold == 0, "a token's <b> was rendered as markup"


def test_browser_fails_loudly_without_chromium(monkeypatch, tmp_path):
    """A missing browser is a failure with instructions, never a silent skip."""
    import sys
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        launch_chromium(None)  # refused before Playwright is asked for anything
