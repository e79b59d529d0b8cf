"""The Tesseract route: OCR units when routing.ocr_engine = "tesseract", on CPU, through PyMuPDF's OCR."""

from __future__ import annotations

import os

import numpy as np

from scriptorium.core.pixels import page_image
from scriptorium.core.spec import RoutingSpec, TaskSpec
from scriptorium.pipeline.results import routed


def tesseract_ocr(image: np.ndarray, language: str = "eng") -> str:
    """Tesseract on an HWC uint8 image through PyMuPDF (MuPDF's built-in Tesseract; needs its language
    data: Debian's `tesseract-ocr-eng`, found through TESSDATA_PREFIX or the `tesseract` command)."""
    import pymupdf

    pixmap = pymupdf.Pixmap(pymupdf.csRGB, image.shape[1], image.shape[0], np.ascontiguousarray(image).tobytes(), False)
    with pymupdf.open("pdf", pixmap.pdfocr_tobytes(language=language, tessdata=tessdata_path())) as ocr:
        return "".join(page.get_text() for page in ocr).strip()


def tessdata_path() -> str:
    """Where Tesseract's language files are; raises RuntimeError naming the fix when they are not."""
    import pymupdf

    path = os.environ.get("TESSDATA_PREFIX") or pymupdf.get_tessdata()
    if not path or not os.path.isdir(path):
        raise RuntimeError("Tesseract language data not found: install it (apt-get install tesseract-ocr "
                           "tesseract-ocr-eng) or set TESSDATA_PREFIX to its tessdata folder")
    return path


def route_tesseract(row: dict, units: list[tuple[TaskSpec, str | None]], routing: RoutingSpec) -> list:
    """Answer the OCR units of `row` with Tesseract (errors become error answers); return the units left."""
    if routing.ocr_engine != "tesseract" or not any(t.kind == "ocr" for t, _q in units):
        return units
    try:
        text, error = tesseract_ocr(page_image(row), routing.tesseract_language), None
    except Exception as exc:
        text, error = None, f"tesseract failed: {type(exc).__name__}: {exc}"
    for task, question in units:
        if task.kind == "ocr":
            row["routed"].append(routed(task, question, route="tesseract", status="error" if error else "ok",
                                        text=text, error=error, stage="tesseract" if error else None,
                                        model=f"tesseract:{routing.tesseract_language}"))
    return [(t, q) for t, q in units if t.kind != "ocr"]
