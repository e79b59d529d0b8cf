"""Pages: read each planned input and turn it into one row per page.

PDF pages are rendered with PyMuPDF straight at the size the model needs (longest edge = the processor's
`longest_edge`), rather than rendered big and shrunk. Images are decoded with Pillow and converted to RGB
with the transformers reference semantics (transparency composited onto white); every frame of a
multi-frame TIFF is a page. Whatever goes wrong with one input becomes an error row for it.
"""

from __future__ import annotations

import io
import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from connectors.storage import StorageOptions, read_bytes, redact
from pipeline.schema import PAGE_SCHEMA, table_from_rows

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif"}
PDF_EXTENSIONS = {".pdf"}


def kind_of(name: str) -> str:
    lower = name.lower()
    dot = lower.rfind(".")
    ext = lower[dot:] if dot >= 0 else ""
    if ext in PDF_EXTENSIONS:
        return "pdf"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return "unknown"


class PageError(Exception):
    """An input or page that cannot be turned into pixels; the message is the row's `error`."""


@dataclass(frozen=True)
class RenderSettings:
    longest_edge: int = 980
    max_pixels: int = 40_000_000
    max_pages: int = 5000
    timeout_s: float = 60.0


@contextmanager
def time_limit(seconds: float, what: str):
    """Raise PageError if the body runs longer than `seconds`.

    Uses SIGALRM, so it only works on a process's main thread (where Ray runs tasks); elsewhere it
    is a no-op. Pure-Python loops and PyMuPDF's per-page callbacks are interrupted; a single C call
    that never returns to Python is not, which is why render sizes are capped before rendering.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise PageError(f"{what} took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render_pdf_pages(data: bytes, settings: RenderSettings, skip: set[int]) -> Iterator[dict]:
    """Yield one dict per PDF page: page, n_pages, width, height, image (HWC uint8 bytes), text_layer."""
    import pymupdf

    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except Exception as exc:  # PyMuPDF raises several types for broken files
        raise PageError(f"cannot open PDF: {exc}") from None
    with doc:
        if doc.needs_pass and not doc.authenticate(""):
            raise PageError("PDF is encrypted with a user password")
        n_pages = doc.page_count
        if n_pages == 0:
            raise PageError("PDF has no pages")
        if n_pages > settings.max_pages:
            raise PageError(f"PDF has {n_pages} pages, more than render.max_pages={settings.max_pages}")
        for number in range(n_pages):
            if number in skip:
                continue
            try:
                with time_limit(settings.timeout_s, f"rendering page {number}"):
                    yield {"page": number, "n_pages": n_pages, **_render_page(doc, number, settings)}
            except PageError as exc:
                yield {"page": number, "n_pages": n_pages, "error": str(exc)}
            except Exception as exc:
                yield {"page": number, "n_pages": n_pages, "error": f"cannot render page: {exc}"}


def _render_page(doc, number: int, settings: RenderSettings) -> dict:
    import pymupdf

    page = doc.load_page(number)
    rect = page.rect
    if not (rect.width > 0 and rect.height > 0):
        raise PageError(f"page has an empty page box ({rect.width}x{rect.height})")
    # Scale so the longest edge is exactly the target; never from the page box's own claims.
    zoom = settings.longest_edge / max(rect.width, rect.height)
    width, height = max(1, round(rect.width * zoom)), max(1, round(rect.height * zoom))
    matrix = pymupdf.Matrix(width / rect.width, height / rect.height)
    pix = page.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
    array = np.frombuffer(pix.samples, dtype=np.uint8).reshape(pix.height, pix.width, pix.n)
    text = page.get_text("text")
    return {
        "width": pix.width,
        "height": pix.height,
        "image": np.ascontiguousarray(array[:, :, :3]).tobytes(),
        "text_layer": text,
    }


def decode_image_frames(data: bytes, settings: RenderSettings, skip: set[int]) -> Iterator[dict]:
    """Yield one dict per image frame (one for most formats, several for multi-frame TIFF)."""
    from PIL import Image, ImageSequence
    from transformers.image_transforms import convert_to_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Exception as exc:
            raise PageError(f"cannot decode image: {exc}") from None
        width, height = image.size
        if width * height > settings.max_pixels:
            raise PageError(f"image is {width}x{height}, more than render.max_pixels={settings.max_pixels}")
        n_frames = getattr(image, "n_frames", 1)
        if image.format != "TIFF":
            n_frames = 1  # animated GIF/WebP: the first frame is the image
        for number, frame in enumerate(ImageSequence.Iterator(image)):
            if number >= n_frames:
                break
            if number in skip:
                continue
            try:
                with time_limit(settings.timeout_s, f"decoding frame {number}"):
                    frame.load()
                    if frame.size[0] * frame.size[1] > settings.max_pixels:
                        raise PageError(f"frame is {frame.size}, more than render.max_pixels")
                    rgb = convert_to_rgb(frame, return_numpy=True)
                yield {
                    "page": number,
                    "n_pages": n_frames,
                    "width": rgb.shape[1],
                    "height": rgb.shape[0],
                    "image": np.ascontiguousarray(rgb, dtype=np.uint8).tobytes(),
                    "text_layer": None,
                }
            except PageError as exc:
                yield {"page": number, "n_pages": n_frames, "error": str(exc)}
            except Exception as exc:
                yield {"page": number, "n_pages": n_frames, "error": f"cannot decode image: {exc}"}


def pages_of(plan_row: dict, settings: RenderSettings, storage: StorageOptions) -> Iterator[dict]:
    """All page rows of one planned input, errors included. Never raises for a bad input."""
    base = {k: plan_row.get(k) for k in ("source_uri", "size", "etag", "kind")}
    if plan_row.get("error"):
        yield {**base, "page": 0, "status": "error", "error": plan_row["error"], "stage": "list"}
        return
    try:
        data = read_bytes(plan_row["source_uri"], storage)
    except Exception as exc:
        yield {**base, "page": 0, "status": "error", "error": redact(f"cannot read: {_describe(exc)}"), "stage": "read"}
        return
    skip = set(plan_row.get("done_pages") or [])
    kind = plan_row.get("kind")
    stage = "render" if kind == "pdf" else "decode"
    try:
        if not data:
            raise PageError("file is empty (0 bytes)")
        if kind == "pdf":
            frames = render_pdf_pages(data, settings, skip)
        elif kind == "image":
            frames = decode_image_frames(data, settings, skip)
        else:
            raise PageError(f"unsupported file type: {plan_row['source_uri'].rsplit('/', 1)[-1]}")
        for frame in frames:
            error = frame.pop("error", None)
            status = "error" if error else "ok"
            yield {**base, **frame, "status": status, "error": error, "stage": stage if error else None}
    except PageError as exc:
        yield {**base, "page": 0, "status": "error", "error": str(exc), "stage": stage}
    except Exception as exc:
        yield {**base, "page": 0, "status": "error", "error": f"{stage} failed: {_describe(exc)}", "stage": stage}


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 500 else text[:500] + "..."


class RenderPages:
    """Ray Data step: plan rows in, page rows out, a few pages at a time so memory stays bounded."""

    def __init__(self, settings: RenderSettings, storage: StorageOptions, pages_per_block: int = 4):
        self.settings = settings
        self.storage = storage
        self.pages_per_block = pages_per_block

    def __call__(self, plan: pa.Table) -> Iterator[pa.Table]:
        pending: list[dict] = []
        for row in plan.to_pylist():
            for page in pages_of(row, self.settings, self.storage):
                pending.append(page)
                if len(pending) >= self.pages_per_block:
                    yield table_from_rows(pending, PAGE_SCHEMA)
                    pending = []
        if pending:
            yield table_from_rows(pending, PAGE_SCHEMA)


def page_image(row: dict) -> np.ndarray:
    """The HWC uint8 array of a page row."""
    return np.frombuffer(row["image"], dtype=np.uint8).reshape(row["height"], row["width"], 3)


