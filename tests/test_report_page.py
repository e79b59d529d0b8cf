"""The report's HTML from its template, without a run or a browser (tests/test_report_browser.py opens a
real one): pages are numbered as a reader counts them, user text is escaped, the inlined style and script
are the ones the Content Security Policy allows."""

from __future__ import annotations

import base64
import hashlib
import html
import re

from scriptorium.jobs.report_page import render_html

XSS_TEXT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">&amp; \'quoted\''


def result_row(source: str, page: int, **values) -> dict:
    row = dict(source_uri=source, page=page, n_pages=1, member=None, task="ocr", question=None, text="text",
               status="ok", error=None, stage=None, n_output_tokens=4, truncated=False, route="model",
               logprob_mean=-0.5, logprob_min=-1.0, run_id="r", source_size=100)
    return {**row, **values}


def headings(page: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r"<h2>(.*?)</h2>", page)]


def test_pages_and_shard_images_are_counted_from_one():
    rows = [result_row("/in/one.pdf", 0), result_row("/in/four.pdf", 3, n_pages=4),
            result_row("/in/four.pdf", -1, n_pages=4, task="summary"),
            result_row("/in/shard.tar", 0, n_pages=40, member="scan-001.jpg")]
    page = render_html("report", "summary", rows, {})
    assert headings(page) == ["/in/one.pdf \u00b7 page 1 of 1", "/in/four.pdf \u00b7 page 4 of 4",
                              "/in/four.pdf \u00b7 whole document", "/in/shard.tar \u00b7 scan-001.jpg (image 1 of 40)"]


def test_user_text_is_escaped_and_missing_values_are_blank():
    rows = [result_row("/in/<b>.pdf", 0, question="<i>who?</i>", text=XSS_TEXT, route=None),
            result_row("/in/<b>.pdf", 1, status="error", error="cannot open <PDF>", stage="render", text=None)]
    thumbs = {("/in/<b>.pdf", 0): 'data:image/jpeg;base64,AAAA"><script>', ("/in/<b>.pdf", 1): "!bad <page>"}
    page = render_html("<title>", "a & b", rows, thumbs, note="<note>")
    body = page.split("<main>")[1].split("<script>")[0]
    assert "<script" not in body and "<img src=x" not in body and "<b>" not in page and "<i>" not in page
    texts = [html.unescape(t) for t in re.findall(r'<td class="text">(.*?)</td>', page, re.S)]
    assert texts == [XSS_TEXT, "[render] cannot open <PDF>"]
    assert "no preview: bad &lt;page&gt;" in page and "&lt;note&gt;" in page and "a &amp; b" in page
    assert '<td class="route"></td>' in page and "None" not in page


def test_the_inlined_style_and_script_are_the_ones_the_policy_allows():
    page = render_html("report", "summary", [result_row("/in/a.pdf", 0)], {})
    policy = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1))
    for tag, directive in (("style", "style-src"), ("script", "script-src")):
        (inlined,) = re.findall(fr"<{tag}>(.*?)</{tag}>", page, re.S)
        digest = base64.b64encode(hashlib.sha256(inlined.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in policy
    assert policy.startswith("default-src 'none'; img-src data:;")
