"""The report's HTML: jobs/templates/report.html, one card per page, with report.css and report.js inlined.

Everything shown is model output or file names, so the template is rendered with autoescape: every
value is HTML-escaped unless marked safe, and only our own style and script are. A Content Security
Policy allows only that style and script (by hash) and data: images: even a missed escape could not
run script or load anything.
"""

from __future__ import annotations

import base64
import json
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources

import jinja2

TEMPLATES = resources.files("scriptorium.jobs") / "templates"
NO_PREVIEW = "!no preview"


def _blank_for_none(value):
    """A missing value (a null column) shows as nothing, not as "None"."""
    return "" if value is None else value


ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, finalize=_blank_for_none,
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
)


@dataclass
class Card:
    """One page of the report: its thumbnail (or why there is none) beside its result rows."""

    source: str
    label: str  # "page 2 of 5", "whole document", "scan-017.jpg (image 3 of 40)"
    thumbnail: str = ""  # a JPEG data URI
    no_preview: str = ""  # why there is no thumbnail
    confidence: str = ""  # the lowest token log-probability of its rows; "" when no row has one
    rows: list[dict] = field(default_factory=list)


def render_html(title: str, summary_text: str, rows: list[dict], thumbs: dict, note: str = "") -> str:
    """The page over `rows` (report.py's ROW_COLUMNS), grouped by page in their order. `thumbs`:
    {(source, page): data URI or "!reason"} for each page of `rows`."""
    style, script = (TEMPLATES / "report.css").read_text(), (TEMPLATES / "report.js").read_text()
    csp = f"default-src 'none'; img-src data:; style-src {_csp_hash(style)}; script-src {_csp_hash(script)}"
    return ENVIRONMENT.get_template("report.html").render(
        title=title, summary=summary_text, note=note, csp=csp, style=style, script=script,
        statuses=sorted({r["status"] or "" for r in rows}), tasks=sorted({r["task"] or "" for r in rows}),
        cards=page_cards(rows, thumbs),
    )


def page_cards(rows: list[dict], thumbs: dict) -> list[Card]:
    by_page: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_page[(row["source_uri"], row["page"])].append(row)
    cards = []
    for (source, page), page_rows in by_page.items():
        card = Card(source, page_label(page, page_rows[0]["n_pages"], page_rows[0]["member"]),
                    rows=[shown_row(r) for r in page_rows])
        thumb = thumbs.get((source, page), NO_PREVIEW)
        if thumb.startswith("data:image/jpeg;base64,"):
            card.thumbnail = thumb
        else:
            card.no_preview = thumb[1:]
        scores = [r["logprob_min"] for r in page_rows if r["logprob_min"] is not None]
        card.confidence = f"{min(scores):.4f}" if scores else ""
        cards.append(card)
    return cards


def page_label(page: int, n_pages: int | None, member: str | None = None) -> str:
    """Where a row's page is, counted from 1 as a reader does (the `page` column counts from 0)."""
    if page < 0:
        return "whole document"
    if member:  # a tar shard's image
        return f"{member} (image {page + 1} of {n_pages})"
    return f"page {page + 1}" + (f" of {n_pages}" if n_pages else "")


def shown_row(row: dict) -> dict:
    """A result row as its table row shows it: the text, or the stage and error of an error row."""
    tokens = row["n_output_tokens"]
    return {
        "task": row["task"], "question": row["question"], "status": row["status"], "route": row["route"],
        "text": row["text"] if row["status"] == "ok" else f"[{row['stage']}] {row['error']}",
        # An extract task's answer as a small table of its fields (the JSON is valid: an ok row).
        "fields": extracted_fields(json.loads(row["text"])) if row.get("extracted") and row["status"] == "ok" else [],
        "tokens": "" if tokens is None else f"{tokens}{' (truncated)' if row['truncated'] else ''}",
        "confidence": _confidence(row),
    }


def extracted_fields(value, name: str = "") -> list[tuple[str, str]]:
    """(field, value) pairs of an extracted record: nested objects' fields dotted, lists and scalars as
    compact JSON (strings as they are)."""
    if isinstance(value, dict) and value:
        return [pair for key, sub in value.items() for pair in extracted_fields(sub, f"{name}.{key}" if name else key)]
    shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return [(name or "value", shown)]


def _confidence(row: dict) -> str:
    """A model row's mean and lowest token log-probability; nothing for rows the model did not make."""
    if row["logprob_min"] is None:
        return ""
    return f"{row['logprob_mean']:.2f} / {row['logprob_min']:.2f}"


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
