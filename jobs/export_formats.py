"""What a document looks like in each export format (see jobs/export.py for the files they go in).

A page's text is its text task's answer; every other unit is a section (Markdown, text) or a field
(JSONL, Dolma) of its page, document-scope units of the whole document, and a unit that is not ok says
why (its error and stage, or that it is missing).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from scriptorium.jobs.export_rows import Document, Page, Unit

FORMATS = ("markdown", "text", "jsonl", "dolma")
DOLMA_SOURCE = "scriptorium"


def body_units(page: Page, text_task: str) -> list[Unit]:
    return [u for u in page.units if u.task == text_task]


def page_text(page: Page, text_task: str) -> str:
    """A page's text: its text task's ok answers ("" for an error or a missing unit)."""
    return "\n".join(u.text or "" for u in body_units(page, text_task) if u.status == "ok")


def _problem(unit: Unit) -> str:
    """What went wrong with a unit that is not ok, in words."""
    if unit.status == "missing":
        return f"no {unit.label()} result (the run did not finish it: run the job again to complete it)"
    return f"{unit.label()} failed at stage {unit.stage or '?'}: {unit.error or 'no reason recorded'}"


INLINE_MARKUP = re.compile(r"([\\`*_\[\]<>|~&])")
LINE_START_MARKUP = re.compile(r"^([#+=-])")
ORDERED_LIST = re.compile(r"^(\d{1,9})([.)])")


def markdown_escape(text: str) -> str:
    """Text that a CommonMark renderer shows as written: markup characters backslash-escaped, and lines
    that would start a heading, list, quote or code block made plain."""
    lines = []
    for line in text.splitlines():
        line = INLINE_MARKUP.sub(r"\\\1", line.strip())
        line = LINE_START_MARKUP.sub(r"\\\1", line)
        lines.append(ORDERED_LIST.sub(r"\1\\\2", line))
    return "\n".join(lines)


def _markdown_unit(unit: Unit) -> str:
    if unit.status != "ok":
        return f"> **{unit.status.capitalize()}**: {markdown_escape(_problem(unit))}"
    return markdown_escape(unit.text or "") or "*(no text)*"


def _page_heading(document: Document, page: Page) -> str:
    """"Page 2 of 3"; a shard's image is "Image 2 of 3" (its place in the shard, as in the `page` column)."""
    kind = "Image" if document.member else "Page"
    return f"{kind} {page.number + 1}" + (f" of {document.n_pages}" if document.n_pages else "")


def _facts(document: Document) -> list[tuple[str, object]]:
    return [(label, value) for label, value in [
        ("Source", document.source_uri), ("Image", document.member),
        ("Images in the shard" if document.member else "Pages", document.n_pages),
        ("Source version", document.source_etag), ("Models", ", ".join(document.models)),
        ("Runs", ", ".join(document.run_ids))] if value not in (None, "")]


def _outline(document: Document, text_task: str) -> Iterator[tuple[str, str, Unit | None]]:
    """The parts of a document in reading order, for the formats that print it: ("heading", label, None)
    for the whole document's units and for each page, ("text", "", unit) for a page's text, and
    ("section", label, unit) for every other unit."""
    if document.document_units:
        yield "heading", "Document", None
        for unit in document.document_units:
            yield "section", unit.label(), unit
    for page in document.pages:
        yield "heading", _page_heading(document, page), None
        for unit in body_units(page, text_task):
            yield "text", "", unit
        for unit in page.units:
            if unit.task != text_task:
                yield "section", unit.label(), unit


def to_markdown(document: Document, text_task: str) -> str:
    out = [f"# {markdown_escape(document.title)}", ""]
    out += [f"- {label}: {markdown_escape(str(value))}" for label, value in _facts(document)]
    for kind, label, unit in _outline(document, text_task):
        if kind == "heading":
            out += ["", f"## {label}"]
        elif kind == "section":
            out += ["", f"### {markdown_escape(label)}", "", _markdown_unit(unit)]
        else:
            out += ["", _markdown_unit(unit)]
    return "\n".join(out) + "\n"


def _text_unit(unit: Unit) -> str:
    return (unit.text or "(no text)") if unit.status == "ok" else f"[{unit.status}: {_problem(unit)}]"


def to_text(document: Document, text_task: str) -> str:
    out = [document.title] + [f"{label.lower()}: {value}" for label, value in _facts(document)]
    for kind, label, unit in _outline(document, text_task):
        if kind == "heading":
            out += ["", f"=== {label.lower()} ==="]
        elif kind == "section":
            out += ["", f"[{label}]", _text_unit(unit)]
        else:
            out += ["", _text_unit(unit)]
    return "\n".join(out) + "\n"


def to_record(document: Document, text_task: str) -> dict:
    """The JSONL record: provenance, the document's text, and every unit of every page."""
    return {
        "source_uri": document.source_uri,
        "member": document.member,
        "n_pages": document.n_pages,
        "source_etag": document.source_etag,
        "source_size": document.source_size,
        "models": document.models,
        "run_ids": document.run_ids,
        "text_task": text_task,
        "text": "\n".join(page_text(page, text_task) for page in document.pages),
        "document": [unit.as_dict() for unit in document.document_units],
        "pages": [{"page": page.number, "units": [unit.as_dict() for unit in page.units]} for page in document.pages],
    }


def to_dolma(document: Document, text_task: str, now: str) -> dict:
    """A Dolma document as olmOCR's pipeline builds one: the pages' text joined by newlines, each page's
    span in attributes.pdf_page_numbers as [start, end, page number from 1]. Unlike olmOCR (which hashes
    the text, so equal texts share an id), the id hashes the source URI, member and version."""
    text, spans = "", []
    for index, page in enumerate(document.pages):
        start = len(text)
        text += page_text(page, text_task) + ("\n" if index < len(document.pages) - 1 else "")
        spans.append([start, len(text), page.number + 1])
    problems = lambda status: [p.number + 1 for p in document.pages  # noqa: E731
                               if any(u.status == status for u in body_units(p, text_task))]
    others = [{"page": None, **u.as_dict()} for u in document.document_units]
    others += [{"page": p.number + 1, **u.as_dict()} for p in document.pages for u in p.units if u.task != text_task]
    identity = f"{document.source_uri}#{document.member or ''}@{document.source_etag or ''}"
    return {
        "id": hashlib.sha1(identity.encode()).hexdigest(),
        "text": text,
        "source": DOLMA_SOURCE,
        "added": now,
        "created": now,
        "metadata": {
            "Source-File": document.source_uri,
            "member": document.member,
            "pdf-total-pages": document.n_pages,
            "source-etag": document.source_etag,
            "models": document.models,
            "run-ids": document.run_ids,
            "text-task": text_task,
            "total-input-tokens": document.input_tokens,
            "total-output-tokens": document.output_tokens,
            "error-pages": problems("error"),
            "missing-pages": problems("missing"),
            "results": others,
        },
        "attributes": {"pdf_page_numbers": spans},
    }
