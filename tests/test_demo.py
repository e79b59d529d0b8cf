"""The demo a newcomer runs (`make demo`): jobs/demo.toml over samples/, then its review report, opened in
headless Chromium. The report shows every sample page as a thumbnail beside real text, each row labelled
by its route: the born-digital PDFs' text layer, Tesseract's reading of the scans, the tiny model's
captions. The terminal shows Scriptorium's own lines, and none of Ray's C++ log lines.
"""

from __future__ import annotations

import base64
import io
import re

import pytest

from tests.conftest import REPO, run_cli
from tests.test_report_browser import CHROMIUM, Chromium

# Ray's C++ log lines, as "[2026-12-01 21:09:02,115 E 30741 30741] core_worker.cc:2465: ..."
RAY_NATIVE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [IWEF] \d+ \d+\] ", re.MULTILINE)


def tesseract_missing() -> str | None:
    from scriptorium.pipeline.routes.tesseract import tessdata_path

    try:
        tessdata_path()
    except RuntimeError as exc:
        return str(exc)
    return None


TESSERACT_PROBLEM = tesseract_missing()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.skipif(TESSERACT_PROBLEM is not None, reason=str(TESSERACT_PROBLEM)),
]


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory, tiny_model):
    """The demo job as `make demo` runs it (in its own process, so with its own local Ray), on a temporary
    output, and the report `make demo` writes after it."""
    folder = tmp_path_factory.mktemp("demo")
    run = run_cli("run", "--job", "jobs/demo.toml", "--output", str(folder / "out"), "--model", str(tiny_model))
    assert run.returncode == 0, run.stderr[-3000:]
    report = run_cli("report", str(folder / "out"), "--html", str(folder / "report.html"))
    assert report.returncode == 0, report.stderr[-3000:]
    return folder / "report.html", run


def test_the_demo_terminal_shows_no_ray_log_lines(demo_report):
    _, run = demo_report
    assert "16 rows written (16 ok, 0 error)" in run.stdout
    assert not RAY_NATIVE_LOG.findall(run.stderr), run.stderr[-3000:]
    assert "core_worker" not in run.stderr


def test_the_demo_report_shows_thumbnails_beside_real_text(demo_report, tmp_path):
    from PIL import Image

    html, _ = demo_report
    browser = Chromium()
    try:
        browser.open(html)
        assert browser.console_errors() == []
        cards = browser.evaluate("""Array.from(document.querySelectorAll('section.page')).map(card => {
            const image = card.querySelector('img'), box = image && image.getBoundingClientRect();
            return {title: card.querySelector('h2').textContent,
                    thumbnail: image ? image.complete && image.naturalWidth > 0 : false,
                    thumbnailRight: box ? box.right : null,
                    rows: Array.from(card.querySelectorAll('tr.result')).map(row => ({
                        task: row.cells[0].textContent, route: row.querySelector('td.route').textContent,
                        text: row.querySelector('td.text').textContent,
                        textLeft: row.querySelector('td.text').getBoundingClientRect().left}))};
        })""")
        height = browser.evaluate("document.documentElement.scrollHeight")
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=height, deviceScaleFactor=1, mobile=False)
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
    (tmp_path / "demo-report.png").write_bytes(shot)  # to look at: the page as a reader sees it
    picture = Image.open(io.BytesIO(shot)).convert("L")
    assert picture.size == (1280, height) and picture.getextrema()[1] - picture.getextrema()[0] > 100

    samples = sorted(p.name for p in (REPO / "samples").iterdir() if not p.name.startswith("_"))
    pages = {"report.pdf": 3}
    assert sorted(c["title"].split(" · ")[0].rsplit("/", 1)[1] for c in cards) == sorted(
        name for name in samples for _ in range(pages.get(name, 1)))
    for card in cards:  # a thumbnail, and the rows' text to the right of it
        assert card["thumbnail"], card["title"]
        assert all(row["textLeft"] >= card["thumbnailRight"] for row in card["rows"])
        assert [row["route"] for row in card["rows"] if row["task"] == "caption"] == ["model"]

    def ocr_of(name: str, page: int = 0) -> dict:  # `page` as the column counts it; the title counts from 1
        card = next(c for c in cards
                    if c["title"].split(" · ")[0].endswith("/" + name) and f"page {page + 1} " in c["title"])
        return next(row for row in card["rows"] if row["task"] == "ocr")

    born_digital = ocr_of("report.pdf")
    assert born_digital["route"] == "text_layer"
    assert "The archive holds letters, ledgers and maps" in born_digital["text"]
    assert ocr_of("memo.pdf")["route"] == "text_layer"
    scan, receipt = ocr_of("scan.pdf"), ocr_of("receipt.png")
    assert scan["route"] == receipt["route"] == "tesseract"
    assert {"harvest", "bushels", "wheat", "Miller"} <= set(re.findall(r"\w+", scan["text"]))
    assert "RECEIPT" in receipt["text"] and "12.50" in receipt["text"]
    assert {row["route"] for card in cards for row in card["rows"]} == {"text_layer", "tesseract", "model"}
