"""The HTML report in a real headless Chromium: tokens and values on the page, no console errors, no network.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``:
JSON messages separated by NUL bytes on file descriptors 3 and 4), so no websocket client
or driver package is needed. Screenshots are saved under ``artifacts/`` (git-ignored).
If Chromium is not installed the tests are SKIPPED with the reason -- never passed.
"""

import base64
import fcntl
import json
import os
import queue
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from selfattn.checkpoint import save
from selfattn.explain import FULL_MATRIX_MAX_TOKENS, explain
from selfattn.explain.labels import fmt, token_label
from selfattn.explain.plot import png_size
from selfattn.model import AttentionStack

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
         "--remote-debugging-pipe"]
TIMEOUT = 30.0


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A headless Chromium and a minimal DevTools-protocol client over its debugging pipe."""

    def __init__(self, exe):
        self.user_data = tempfile.mkdtemp(prefix="selfattn-chromium-")
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # move the child's ends to free descriptors above 9 (out of the way of 3 and 4), then let the shell place them
        r_hi, w_hi = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{r_hi} 4>&{w_hi} {r_hi}<&- {w_hi}>&-', exe, *FLAGS,
               f"--user-data-dir={self.user_data}", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(r_hi, w_hi), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        os.close(r_hi)
        os.close(w_hi)
        self.out = os.fdopen(to_chrome_w, "wb", buffering=0)
        self.inbox = queue.Queue()
        self.events = []
        self.next_id = 0
        threading.Thread(target=self._read, args=(from_chrome_r,), daemon=True).start()
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # drain its log so it never blocks

    def _read(self, fd):
        buf = b""
        with os.fdopen(fd, "rb", buffering=0) as f:
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    self.inbox.put(None)
                    return
                buf += chunk
                while b"\0" in buf:
                    msg, buf = buf.split(b"\0", 1)
                    self.inbox.put(json.loads(msg))

    def _get(self, deadline):
        try:
            msg = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("Chromium did not answer in time") from None
        if msg is None:
            raise RuntimeError(f"Chromium closed its debugging pipe (exit status {self.proc.poll()})")
        return msg

    def send(self, method, params=None, session=None):
        self.next_id += 1
        mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.out.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            m = self._get(deadline)
            if m.get("id") == mid:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method, session, seconds=TIMEOUT):
        deadline = time.monotonic() + seconds
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._get(deadline))

    def settle(self, seconds=0.3):
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.events.append(self._get(deadline))
            except TimeoutError:
                return

    def load(self, url, screenshot=None, width=1300):
        """Open ``url`` in a new tab; return (visible text, console errors, network requests, evaluate)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=s)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=s)
        start = len(self.events)
        self.send("Page.navigate", {"url": url}, session=s)
        self.wait_event("Page.loadEventFired", s)
        self.settle()

        def evaluate(expr):
            r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=s)
            return r["result"].get("value")

        text = evaluate("document.body.innerText")
        if screenshot is not None:
            height = int(evaluate("Math.min(document.documentElement.scrollHeight, 12000)"))
            self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=s)
            shot = self.send("Page.captureScreenshot", {"format": "png"}, session=s)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        mine = [e for e in self.events[start:] if e.get("sessionId") == s]
        errors = [_describe(e) for e in mine if
                  (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or e["method"] == "Runtime.exceptionThrown"
                  or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        requests = [e["params"]["request"]["url"] for e in mine if e["method"] == "Network.requestWillBeSent"]
        return text, errors, requests, {"evaluate": evaluate}

    def close(self):
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        shutil.rmtree(self.user_data, ignore_errors=True)


def _describe(event) -> str:
    p = event["params"]
    if event["method"] == "Runtime.consoleAPICalled":
        return "console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
    if event["method"] == "Runtime.exceptionThrown":
        d = p["exceptionDetails"]
        return "exception: " + d.get("exception", {}).get("description", d.get("text", ""))
    return f"log error: {p['entry'].get('text', '')} ({p['entry'].get('url', '')})"


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed, so the HTML report was NOT checked in a browser "
                    "(scripts/setup.sh --test installs Debian's chromium when run as root with apt-get)")
    b = Chromium(exe)
    try:
        b.send("Browser.getVersion")
        yield b
    finally:
        b.close()


def _external(requests, page):
    return [u for u in requests if u != page and not u.startswith("data:")]


def test_harness_catches_console_errors_and_network_requests(browser, tmp_path):
    # the detector must see what it is there to see: an error, an exception, a request (to a port Chromium refuses)
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><p>probe</p><script>console.error('probe error');"
                    "fetch('http://127.0.0.1:9/probe').catch(() => {}); throw new Error('probe exception');</script></body></html>")
    text, errors, requests, _ = browser.load(page.as_uri())
    assert "probe" in text
    assert any("probe error" in e for e in errors) and any("probe exception" in e for e in errors)
    assert "http://127.0.0.1:9/probe" in _external(requests, page.as_uri())


def _check_report(browser, path, name):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    text, errors, requests, extra = browser.load(path.as_uri(), screenshot=shot)
    assert errors == [], errors
    assert _external(requests, path.as_uri()) == [], requests
    data = shot.read_bytes()
    w, h = struct.unpack(">II", data[16:24])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and w == 1300 and h > 900
    return text, extra["evaluate"]


def test_report_in_chromium(browser, tmp_path):
    tr = explain("The cat sat on the mat, and the cat slept.", causal=True)
    path = tmp_path / "report.html"
    tr.to_html(path)
    text, evaluate = _check_report(browser, path, "explain_report")
    for t in set(tr.tokens):
        assert t in text
    for name in ("weights", "output", "scaled"):
        for x in tr.steps[name].flatten():
            assert fmt(float(x)) in text, (name, fmt(float(x)))
    for x in tr.stats.entropy:
        assert fmt(float(x)) in text
    # the embedded heatmap decoded at its full size; the inline SVG charts rendered
    assert evaluate("document.querySelector('img.heatmap').naturalWidth") == png_size(tr)[0]
    assert evaluate("document.querySelectorAll('svg polyline').length") == 2


def test_model_report_in_chromium(browser, tmp_path):
    torch.manual_seed(5)
    vocab = [f"t{i}" for i in range(12)]
    model = AttentionStack(len(vocab), 8, [{"type": "SelfAttention"}, {"type": "MultiHeadAttention", "num_heads": 2, "rope": True}],
                           causal=True, residual=True)
    save(tmp_path / "ck", model, model.config, vocab=vocab)
    words = [vocab[(i * 5) % 12] for i in range(FULL_MATRIX_MAX_TOKENS + 10)]
    mt = explain(" ".join(words), checkpoint=tmp_path / "ck", rows="0,-1")
    path = tmp_path / "model.html"
    mt.to_html(path)
    text, evaluate = _check_report(browser, path, "explain_model_report")
    assert "Per-head overview" in text
    for tr in mt.heads:
        assert tr.label in text
        for i, r in enumerate(tr.rows):
            assert token_label(tr, r) in text and fmt(float(tr.stats.entropy[r])) in text
            assert fmt(float(tr.row_weights[i].max())) in text
    assert evaluate("document.querySelector('img.heatmap').naturalWidth") == png_size(mt)[0]


def test_long_and_language_model_reports_in_chromium(browser, tmp_path):
    """Issue 16 in the browser: a long input's text is folded (the page opens short), its row charts
    carry token labels; a language model's report shows its predictions; masked cells are hatched."""
    from selfattn.model import Transformer, TransformerConfig

    text = " ".join(f"w{(i * 7) % 23}" for i in range(400))
    tr = explain(text, causal=True)
    path = tmp_path / "long.html"
    tr.to_html(path)
    page, evaluate = _check_report(browser, path, "explain_long_report")
    assert "show all 400" in page and "w0@0" in page  # folded text; token-labelled chart axes
    assert evaluate("document.querySelector('details.meta').open") is False
    assert evaluate("document.querySelector('details.meta').getBoundingClientRect().height") < 120

    torch.manual_seed(0)
    vocab = [f"t{i}" for i in range(10)]
    lm = Transformer(TransformerConfig(vocab_size=len(vocab), dim=16, n_layers=1, n_heads=2, context=32))
    save(tmp_path / "lm", lm, lm.checkpoint_config(), vocab=vocab)
    mt = explain("t1 t2 t3 t1 t2", checkpoint=tmp_path / "lm")
    path = tmp_path / "lm.html"
    mt.to_html(path)
    page, evaluate = _check_report(browser, path, "explain_lm_report")
    assert "The model's predictions" in page and "actual next" in page
    for i, guesses in enumerate(mt.predictions):
        assert f"{guesses[0][0]}: {guesses[0][1]:.3f}" in page
    # causal: the weights tables draw masked pairs hatched, with the word "masked"
    assert evaluate("document.querySelectorAll('td.masked').length") > 0
    bg = evaluate("getComputedStyle(document.querySelector('td.masked')).backgroundImage")
    assert "repeating-linear-gradient" in bg
