"""The HTML review report, opened in a real headless Chromium (Debian's `chromium`, driven over the
Chrome DevTools Protocol): it loads without console errors, shows every error row and the sampled pages
with their thumbnails, its status/task filters hide and show the right rows, and model output that
looks like HTML stays text.

The report is built from a real run (tiny model, in-process on the session's Ray) plus one published
file whose text is an XSS attempt, as a model could produce.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from tests.conftest import make_image, make_pdf, read_rows, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None,
                       reason="Debian's chromium is not installed (CI installs it: apt-get install -y chromium)"),
]

XSS_TEXT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">&amp; "quoted"'


class Chromium:
    """A headless Chromium with one page, driven over the DevTools Protocol (websocket)."""

    def __init__(self):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "--remote-allow-origins=*",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        port = self._devtools_port()
        page = next(t for t in self._targets(port) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self._next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _devtools_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                # Keep draining its log, or a full pipe would stall the browser.
                threading.Thread(target=self.process.stderr.read, daemon=True).start()
                return int(match.group(1))
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError("chromium did not start its DevTools endpoint")

    @staticmethod
    def _targets(port: int) -> list[dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            return json.loads(response.read())

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def open(self, path: Path) -> None:
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        self.evaluate("0")  # flush: events that arrived meanwhile are collected by call()
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(params["entry"].get("text", ""))
        return errors

    def close(self) -> None:
        self.ws.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def reviewed_output(tmp_path_factory, tiny_model, ray_local):
    """A finished two-task run over two PDFs (4 pages), an image and a corrupt PDF, plus an XSS row."""
    from scriptorium.connectors.namespace import data_file_name
    from scriptorium.connectors.parquet_sink import ParquetStore
    from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, TaskSpec
    from scriptorium.jobs.runner import run_job

    inputs = tmp_path_factory.mktemp("report-in")
    make_pdf(inputs / "letter.pdf", ["Dear reader,", "Yours sincerely."])
    make_pdf(inputs / "memo.pdf", ["A memo.", "Its second page."])
    make_image(inputs / "photo.png", size=(300, 200))
    (inputs / "broken.pdf").write_bytes(b"%PDF-1.7 not really")
    output = tmp_path_factory.mktemp("report-out") / "results"
    spec = JobSpec(input=InputSpec(uri=str(inputs)), output=OutputSpec(uri=str(output)),
                   model=ModelSpec(id=str(tiny_model), device="cpu"),
                   tasks=[TaskSpec(kind="ocr", max_new_tokens=4), TaskSpec(kind="caption", max_new_tokens=4)],
                   run_id="report-test")
    run_job(spec)

    store = ParquetStore(str(output))
    table = pads.dataset(str(output), format="parquet").to_table()
    ok_row = next(r for r in table.to_pylist() if r["status"] == "ok" and r["source_uri"].endswith("photo.png"))
    injected = {**ok_row, "task": "qa", "question": "<b>q?</b>", "text": XSS_TEXT}
    store.publish(pa.Table.from_pylist([injected], schema=table.schema), data_file_name(spec.run_id, 999))
    return output, read_rows(output)


@pytest.fixture(scope="module")
def browser():
    chrome = Chromium()
    yield chrome
    chrome.close()


def visible_rows(browser, selector="tr.result") -> int:
    return browser.evaluate(
        f"Array.from(document.querySelectorAll('{selector}')).filter(e => e.getClientRects().length > 0).length")


def choose(browser, select_id: str, value: str) -> None:
    """What a user's pick in a <select> does: set the value, fire `change`."""
    browser.evaluate(f"""(() => {{ const s = document.getElementById('{select_id}');
        s.value = {json.dumps(value)}; s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()""")


def test_report_loads_cleanly_and_filters_rows(reviewed_output, browser, tmp_path):
    output, rows = reviewed_output
    html_file = tmp_path / "report.html"
    proc = run_cli("report", str(output), "--html", str(html_file), "--sample", "50")
    assert proc.returncode == 0, proc.stderr[-2000:]

    browser.open(html_file)
    assert browser.console_errors() == []
    # A sample of 50 covers every page of this run, so every row is there.
    assert visible_rows(browser) == len(rows)
    pages = {(r["source_uri"], r["page"]) for r in rows}
    assert browser.evaluate("document.querySelectorAll('section.page').length") == len(pages)
    # Each readable page has a real thumbnail (a decoded JPEG), the corrupt PDF says why it has none.
    loaded = browser.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
                              ".map(i => Math.max(i.naturalWidth, i.naturalHeight))")
    assert len(loaded) == len(pages) - 1 and max(loaded) <= 256
    assert "cannot open PDF" in browser.evaluate("document.querySelector('.no-thumb').textContent")

    n_errors = sum(r["status"] == "error" for r in rows)
    choose(browser, "status-filter", "error")
    assert visible_rows(browser) == n_errors > 0
    assert visible_rows(browser, "section.page") == len({(r["source_uri"], r["page"]) for r in rows if r["status"] == "error"})
    choose(browser, "status-filter", "ok")
    assert visible_rows(browser) == len(rows) - n_errors
    choose(browser, "task-filter", "caption")
    assert visible_rows(browser) == sum(r["status"] == "ok" and r["task"] == "caption" for r in rows)
    choose(browser, "status-filter", "")
    choose(browser, "task-filter", "qa")
    assert visible_rows(browser) == 1
    assert browser.evaluate("document.getElementById('visible-count').textContent") == f"1 of {len(rows)} rows shown"

    # The model's "HTML" is shown as text and never runs.
    assert browser.evaluate("window.__pwned === undefined")
    shown = browser.evaluate("Array.from(document.querySelectorAll('td.text')).map(e => e.textContent)")
    assert XSS_TEXT in shown
    assert browser.evaluate("document.querySelectorAll('main script, main img[src=x]').length") == 0
    assert browser.console_errors() == []


def test_report_samples_pages_but_keeps_every_error(reviewed_output, browser, tmp_path):
    output, rows = reviewed_output
    from scriptorium.core.spec import StorageSpec
    from scriptorium.jobs.report import build_report

    page, counts = build_report(str(output), StorageSpec(), sample=1)
    html_file = tmp_path / "sampled.html"
    html_file.write_text(page)
    browser.open(html_file)
    assert browser.console_errors() == []
    error_pages = {(r["source_uri"], r["page"]) for r in rows if r["status"] == "error"}
    shown_pages = browser.evaluate("document.querySelectorAll('section.page').length")
    assert counts["pages"] == shown_pages
    assert len(error_pages) <= shown_pages <= len(error_pages) + 1
    choose(browser, "status-filter", "error")
    assert visible_rows(browser) == sum(r["status"] == "error" for r in rows)


def test_report_orders_pages_by_confidence_worst_first(reviewed_output, browser, tmp_path):
    output, rows = reviewed_output
    html_file = tmp_path / "report.html"
    proc = run_cli("report", str(output), "--html", str(html_file), "--sample", "50")
    assert proc.returncode == 0, proc.stderr[-2000:]
    browser.open(html_file)
    cards = "Array.from(document.querySelectorAll('section.page'))"
    listed = browser.evaluate(f"{cards}.map(c => c.querySelector('h2').textContent)")

    choose(browser, "order", "confidence")
    scores = browser.evaluate(f"{cards}.map(c => c.dataset.confidence)")
    scored = [float(v) for v in scores if v]
    assert scored == sorted(scored) and len(scored) == len({(r["source_uri"], r["page"]) for r in rows
                                                            if r["logprob_min"] is not None})
    assert scores[len(scored):] == [""] * (len(scores) - len(scored))  # unscored pages (errors) come last
    worst = min((r for r in rows if r["logprob_min"] is not None), key=lambda r: r["logprob_min"])
    assert browser.evaluate(f"{cards}[0].querySelector('h2').textContent").startswith(worst["source_uri"])
    assert scored[0] == pytest.approx(worst["logprob_min"], abs=1e-4)

    choose(browser, "order", "")
    assert browser.evaluate(f"{cards}.map(c => c.querySelector('h2').textContent)") == listed
    assert browser.console_errors() == []
