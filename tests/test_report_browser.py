"""The HTML reports, opened from disk in a real browser (headless Chromium).

For a decomposition report and a Jacobian report, each opened from a ``file://`` URL:

* no JavaScript error: no uncaught exception, no ``console.error``, no error-level log entry;
* every figure is drawn: each ``.plotly-graph-div`` holds a ``.main-svg`` with content;
* nothing is fetched from the network (plotly.js is inlined once; no CDN, no MathJax);
* a screenshot is not blank (many distinct pixel colours);
* hostile token strings (``<script>...</script>``, ``<img onerror=...>``) put into the corpus,
  the prompt, the tokenizer's vocabulary and the model id are shown as text and never run:
  no global is set, no alert dialog opens, and the raw HTML holds them only escaped.

Driver: Chromium's DevTools protocol over ``--remote-debugging-pipe`` (file descriptors 3 and
4, JSON messages separated by NUL), so no Python browser package is needed. The test needs
``/usr/bin/chromium`` (Debian: ``apt-get install -y chromium chromium-driver``; ``.ci/run``
installs it) and fails, rather than skips, when it is missing. ``CHROMIUM=/path`` overrides.

Both reports are built from tiny random models (a Llama through nnsight) that use the real
SmolLM2 tokenizer with the hostile strings added as whole tokens, so the strings reach every
place a token can appear: hover texts, tables, legends, axis labels, titles.
"""
from __future__ import annotations

import base64
import fcntl
import html
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--window-size=1200,1600", "--remote-debugging-pipe"]

# The first two, if they ever ran, would set window.__xss and open an alert dialog; the third is markup
# Plotly itself understands (bold, line break), which a token string must not turn into.
PAYLOADS = ("<script>window.__xss=1;alert(1)</script>", '<img src=x onerror="window.__xss=2;alert(2)">',
            "<b>bold</b><br>")
HOSTILE_ID = "tiny<script>window.__xss=3;alert(3)</script>"


# ----- a minimal DevTools-protocol client over the pipe ------------------------------------------
class Browser:
    """Headless Chromium driven through ``--remote-debugging-pipe``; one page (flattened session)."""

    def __init__(self, user_data_dir: Path, timeout: float = 60.0):
        if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
            pytest.fail(f"headless Chromium is needed at {CHROMIUM} for the HTML report test and is missing. "
                        f"Install it (Debian/Ubuntu: `apt-get install -y chromium chromium-driver`; CI's .ci/run "
                        f"does this) or point CHROMIUM=/path/to/chromium at another build.", pytrace=False)
        self.timeout = timeout
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds():  # in the child: fd 3 = commands in, fd 4 = replies out (either may be 3 or 4 already)
            r, w = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, preexec_fn=wire_fds, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        self.session = None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                break
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                        if msg.get("method") == "Page.javascriptDialogOpening":
                            # answer from a thread of its own: the page is blocked until then
                            threading.Thread(target=self.send, args=("Page.handleJavaScriptDialog",),
                                             kwargs={"accept": True}, daemon=True).start()
                    self._cond.notify_all()

    def send(self, method: str, **params) -> dict:
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        msg = {"id": msg_id, "method": method, "params": params}
        if self.session is not None:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while msg_id not in self._replies:
                if self.proc.poll() is not None or not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    if time.monotonic() >= deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"Chromium did not answer {method} (exit code {self.proc.poll()}); "
                                           f"stderr: {b''.join(self._stderr)[-2000:].decode(errors='replace')}")
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def evaluate(self, expression: str, await_promise: bool = False):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluating {expression[:80]!r} threw: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for_event(self, method: str, since: int = 0) -> dict:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                for ev in self.events[since:]:
                    if ev.get("method") == method:
                        return ev
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"no {method} event within {self.timeout} s")

    def close(self) -> None:
        try:
            self.session = None
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


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


def _hover(browser: "Browser", point: int) -> dict:
    """Move the mouse onto ``point`` of the first figure's first trace; the hover label and the point hit."""
    xy = browser.evaluate(POINT_XY % point)
    browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=xy["x"] - 3, y=xy["y"] - 3)
    browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=xy["x"], y=xy["y"])
    deadline = time.monotonic() + 10
    while True:
        label = browser.evaluate(HOVER_LABEL)
        if label["text"] or time.monotonic() > deadline:
            return label
        time.sleep(0.1)


def _problems(events: list[dict]) -> list[str]:
    out = []
    for ev in events:
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == "Page.javascriptDialogOpening":
            out.append(f"dialog opened: {p.get('type')} {p.get('message')!r}")
    return out


def _open_and_check(browser: Browser, report: Path, screenshot_to: Path) -> dict:
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

    start = len(browser.events)
    browser.send("Page.navigate", url=report.resolve().as_uri())
    browser.wait_for_event("Page.loadEventFired", since=start)
    deadline = time.monotonic() + 60
    while True:
        state = browser.evaluate(FIGURE_STATE)
        if state["n"] and state["drawn"] == state["n"]:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{report.name}: only {state['drawn']} of {state['n']} figures drew; empty: {state['empty']}")
        time.sleep(0.2)
    time.sleep(0.5)  # let late errors (async plotly work) arrive
    events = browser.events[start:]

    assert not _problems(events), f"{report}: {_problems(events)}"
    requests = [ev["params"]["request"]["url"] for ev in events if ev.get("method") == "Network.requestWillBeSent"]
    remote = [u for u in requests if not u.startswith(("file:", "data:", "about:", "blob:"))]
    assert not remote, f"the report fetched from the network: {remote}"
    assert browser.evaluate("typeof window.__xss") == "undefined", "a hostile token string was executed"
    injected = browser.evaluate("document.querySelectorAll('img[src=\"x\"]').length + [...document.scripts]"
                                ".filter(s => s.text.trim().startsWith('window.__xss')).length")
    assert injected == 0, "a hostile token string became an element"

    shot = browser.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
    screenshot_to.write_bytes(base64.b64decode(shot))
    pixels = browser.evaluate(COUNT_COLOURS % shot, await_promise=True)
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
    assert not _problems(browser.events), _problems(browser.events)


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
        Browser(tmp_path / "profile")
