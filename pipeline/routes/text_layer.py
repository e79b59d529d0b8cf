"""The text-layer route: OCR units of a PDF page whose embedded text layer looks like real text take it
as their transcription (PyMuPDF's `page.get_text()`, captured at render time)."""

from __future__ import annotations

import unicodedata

from scriptorium.core.spec import RoutingSpec, TaskSpec
from scriptorium.pipeline.results import routed


def text_layer_problem(text: str | None, min_chars: int = 40) -> str | None:
    """Why this text layer should not stand in for OCR, or None if it looks like real text.

    Scans have no text layer (or a few stray characters); PDFs with broken font encodings give U+FFFD,
    private-use or control characters, or runs of symbols where letters should be.
    """
    chars = [c for c in text or "" if not c.isspace()]
    if len(chars) < min_chars:
        return f"text layer has {len(chars)} characters (fewer than {min_chars})"
    bad = sum(c == "\ufffd" or unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn", "Cs") for c in chars)
    if bad > 0.02 * len(chars):
        return f"text layer has {bad} unmapped or unprintable characters"
    if sum(c.isalnum() for c in chars) < 0.5 * len(chars):
        return "text layer is mostly symbols"
    return None


def route_text_layer(row: dict, units: list[tuple[TaskSpec, str | None]], routing: RoutingSpec) -> list:
    """Answer the OCR units of `row` from a good text layer; return the units still open."""
    usable = (routing.text_layer and row.get("kind") == "pdf"
              and text_layer_problem(row.get("text_layer"), routing.text_layer_min_chars) is None)
    if not usable:
        return units
    import pymupdf  # the worker rendered with it already: this costs nothing

    for task, question in units:
        if task.kind == "ocr":
            row["routed"].append(routed(task, question, route="text_layer", status="ok",
                                        text=row["text_layer"].strip(), model=f"pymupdf-{pymupdf.VersionBind}"))
    return [(t, q) for t, q in units if t.kind != "ocr"]
