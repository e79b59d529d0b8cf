"""Pages: read each planned input and turn it into one row per page.

PDF pages are rendered with PyMuPDF straight at the size the model can use (pipeline/render_size.py decides
it: twice the processor's `longest_edge` with image splitting, never more than a scan's own pixels),
rather than rendered big and shrunk. Images are decoded with Pillow and converted to RGB
with the transformers reference semantics (transparency composited onto white; 16-bit scans scaled to
8 bits rather than clipped); every frame of a multi-frame TIFF is a page, and every image of a tar or
Parquet shard (pipeline/shards.py).

Whatever goes wrong with one input becomes an error row for it, and every page ends as exactly one row.
Sizes are checked before anything is allocated (decompression bombs, giant page boxes); each page has a
time limit, soft (SIGALRM) and hard: pages are rendered in a child process (pipeline/sandbox.py) that is
killed if a page overruns, so a pathological file cannot stall or crash a worker.
"""

from __future__ import annotations

import io
import logging
import signal
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from connectors.storage import StorageOptions, read_bytes, redact
from pipeline.render_size import page_pixel_size
from pipeline.schema import PAGE_SCHEMA, SOURCE_COLUMNS, table_from_rows

log = logging.getLogger("scriptorium")

# JPEG 2000 is what many libraries and archives keep their master scans in; AVIF is common on the web.
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".gif", ".jp2", ".j2k", ".avif"}
PDF_EXTENSIONS = {".pdf"}
# Shards of many images (pipeline/shards.py): WebDataset-style tars, Parquet tables of images.
SHARD_EXTENSIONS = {".tar": "tar", ".parquet": "parquet"}
KINDS = ("pdf", "image", *SHARD_EXTENSIONS.values())


def kind_of(name: str) -> str:
    lower = name.lower()
    dot = lower.rfind(".")
    ext = lower[dot:] if dot >= 0 else ""
    if ext in PDF_EXTENSIONS:
        return "pdf"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return SHARD_EXTENSIONS.get(ext, "unknown")


class PageError(Exception):
    """An input or page that cannot be turned into pixels; the message is the row's `error`."""


@dataclass(frozen=True)
class RenderSettings:
    longest_edge: int = 980  # a PDF page's longest edge in pixels...
    dpi: float = 0  # ...or, when > 0, this many pixels per inch of its page box
    scans_at_own_resolution: bool = False  # a scanned page at most at its scan's resolution (render_size.py)
    max_pixels: int = 40_000_000
    max_pages: int = 5000
    timeout_s: float = 60.0  # per page, and for opening a file; 0 = no limit
    # Render in a child process that is killed when a page overruns its time limit or crashes it
    # (pipeline/sandbox.py); False renders in this process, where only the soft limit applies.
    isolate: bool = True


@contextmanager
def time_limit(seconds: float, what: str):
    """Raise PageError if the body runs longer than `seconds`: the soft time limit.

    Uses SIGALRM, so it only works on a process's main thread (elsewhere it is a no-op), and it
    interrupts Python code only: Pillow decodes in chunks and is interrupted, but MuPDF renders a
    page in one C call that holds the GIL until it is done. The hard limit, for that, is the
    sandbox's (pipeline/sandbox.py), which kills the process rendering the page.
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


class PdfDocument:
    """An open PDF whose pages are rendered one at a time, at the size `page_pixel_size` gives."""

    what = "rendering page"

    def __init__(self, data: bytes, settings: RenderSettings):
        import pymupdf

        try:
            self.doc = pymupdf.open(stream=data, filetype="pdf")
        except Exception as exc:  # PyMuPDF raises several types for broken files
            raise PageError(f"cannot open PDF: {_describe(exc)}") from None
        self.settings = settings
        self.n_pages = self.doc.page_count
        if self.doc.needs_pass and not self.doc.authenticate(""):  # owner-only passwords open as is
            self.close()
            raise PageError("PDF is encrypted with a user password")
        if self.n_pages == 0:
            self.close()
            raise PageError("PDF has no pages")
        if self.n_pages > settings.max_pages:
            self.close()
            raise PageError(f"PDF has {self.n_pages} pages, more than render.max_pages={settings.max_pages}")

    def render(self, number: int) -> dict:
        return _render_page(self.doc, number, self.settings)

    def close(self) -> None:
        self.doc.close()


def _render_page(doc, number: int, settings: RenderSettings) -> dict:
    import pymupdf

    page = doc.load_page(number)
    rect = page.rect
    if not (rect.width > 0 and rect.height > 0):
        raise PageError(f"page has an empty page box ({rect.width}x{rect.height})")
    width, height = page_pixel_size(page, settings)
    matrix = pymupdf.Matrix(width / rect.width, height / rect.height)
    pix = page.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
    array = np.frombuffer(pix.samples_mv, dtype=np.uint8).reshape(pix.height, pix.width, pix.n)
    text = page.get_text("text")
    return {
        "width": pix.width,
        "height": pix.height,
        "image": np.ascontiguousarray(array[:, :, :3]).tobytes(),
        "text_layer": text,
    }


class ImageDocument:
    """A decoded image header; its frames (one, or every frame of a multi-frame TIFF) decode one at a time."""

    what = "decoding frame"

    def __init__(self, data: bytes, settings: RenderSettings):
        from PIL import Image, UnidentifiedImageError

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                self.image = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:
                raise PageError("cannot decode image: not an image format Pillow knows") from None
            except Exception as exc:  # includes Pillow's own DecompressionBombError
                raise PageError(f"cannot decode image: {_describe(exc)}") from None
        self.settings = settings
        try:
            self._check_size()  # from the header, before a single pixel is allocated
        except PageError:
            self.close()
            raise
        # Animated GIF/WebP: the first frame is the image. TIFF: every frame is a page.
        self.n_pages = getattr(self.image, "n_frames", 1) if self.image.format == "TIFF" else 1

    def _check_size(self) -> None:
        width, height = self.image.size
        if width * height > self.settings.max_pixels:
            raise PageError(f"image is {width}x{height}, more than render.max_pixels={self.settings.max_pixels}")

    def render(self, number: int) -> dict:
        if number or self.n_pages > 1:
            self.image.seek(number)
        self._check_size()  # each TIFF frame has its own size
        self.image.load()
        rgb = to_rgb(_eight_bit(self.image))
        return {
            "width": rgb.shape[1],
            "height": rgb.shape[0],
            "image": np.ascontiguousarray(rgb, dtype=np.uint8).tobytes(),
            "text_layer": None,
        }

    def close(self) -> None:
        self.image.close()


def to_rgb(image) -> np.ndarray:
    """HWC uint8 RGB with transparency composited onto white: transformers' `convert_to_rgb` (checked
    against it in the tests), without importing transformers and torch into every renderer process."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.array(image.convert("RGB"))


def _eight_bit(image):
    """16-bit, 32-bit and float grayscale images scaled to 8-bit grayscale.

    Pillow's convert("RGB") clips these at 255, which turns a 16-bit scan almost entirely white.
    """
    from PIL import Image

    if image.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8))  # mode L


def open_document(kind: str, data: bytes, settings: RenderSettings) -> PdfDocument | ImageDocument:
    """Open a file's bytes as pages; raises PageError (the reason) for a file that has none to give."""
    if not data:
        raise PageError("file is empty (0 bytes)")
    _import_renderers()  # before the clock starts: a first import can take seconds on a busy node
    with time_limit(settings.timeout_s, "opening the file"):
        if kind == "pdf":
            return PdfDocument(data, settings)
        if kind == "image":
            return ImageDocument(data, settings)
    raise PageError(f"unsupported file kind {kind!r}")


def _import_renderers() -> None:
    import pymupdf  # noqa: F401
    from PIL import Image  # noqa: F401


def render_one(document: PdfDocument | ImageDocument, number: int, settings: RenderSettings) -> dict:
    """One page as {page, n_pages, width, height, image, text_layer}, or {page, n_pages, error}."""
    head = {"page": number, "n_pages": document.n_pages}
    try:
        with time_limit(settings.timeout_s, f"{document.what} {number}"):
            return {**head, **document.render(number)}
    except PageError as exc:
        return {**head, "error": str(exc)}
    except Exception as exc:
        return {**head, "error": f"{document.what} {number} failed: {_describe(exc)}"}


def local_frames(kind: str, data: bytes, settings: RenderSettings, skip: set[int]) -> Iterator[dict]:
    """Every page not in `skip`, rendered in this process. Raises PageError if the file cannot be opened."""
    document = open_document(kind, data, settings)
    try:
        for number in range(document.n_pages):
            if number not in skip:
                yield render_one(document, number, settings)
    finally:
        document.close()


def render_pdf_pages(data: bytes, settings: RenderSettings, skip: set[int]) -> Iterator[dict]:
    """Yield one dict per PDF page: page, n_pages, width, height, image (HWC uint8 bytes), text_layer."""
    return local_frames("pdf", data, settings, skip)


def decode_image_frames(data: bytes, settings: RenderSettings, skip: set[int]) -> Iterator[dict]:
    """Yield one dict per image frame (one for most formats, several for multi-frame TIFF)."""
    return local_frames("image", data, settings, skip)


def pages_of(plan_row: dict, settings: RenderSettings, storage: StorageOptions) -> Iterator[dict]:
    """All page rows of one planned input, errors included. Never raises for a bad input.

    Exactly one row for every page not already done (`done_pages`): a page that fails is an error row
    for that page; a file that cannot be listed, read or opened is an error row on every page it still
    owes (page 0 for a new file); a document that fails part-way has error rows for the rest.
    """
    base = {k: plan_row.get(k) for k in SOURCE_COLUMNS}
    published = units_by_page(plan_row)

    def page_row(number: int, **values) -> dict:
        return {**base, "page": number, "done_units": published.get(number), **values}

    skip = set(plan_row.get("done_pages") or [])
    known = plan_row.get("known_pages")
    # A file that cannot be listed, read or opened: one error row on each page it still owes. For a
    # partly done source the ledger knows how many; a new one owes its first page.
    owed = [p for p in range(known) if p not in skip] if known else [next(p for p in range(len(skip) + 1) if p not in skip)]

    def whole_file_failed(error: str, stage: str) -> Iterator[dict]:
        for page in owed:
            yield page_row(page, n_pages=known, status="error", error=error, stage=stage)

    kind = plan_row.get("kind")
    if plan_row.get("error"):
        yield from whole_file_failed(plan_row["error"], "list")
        return
    if kind not in KINDS:  # known from the name: not worth reading
        name = plan_row["source_uri"].rsplit("/", 1)[-1]
        reason = (f"unsupported file type: {name} (not a PDF, a .tar or .parquet shard of images, or one of "
                  f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        yield from whole_file_failed(reason, "list")
        return
    try:
        data = read_bytes(plan_row["source_uri"], storage)
    except Exception as exc:
        yield from whole_file_failed(redact(f"cannot read: {_describe(exc)}"), "read")
        return
    stage = "render" if kind == "pdf" else "decode"
    frames = isolated_frames if settings.isolate else local_frames
    n_pages, emitted = None, set()
    try:
        if kind in SHARD_EXTENSIONS.values():  # each image in it is a page, decoded as an image file is
            from pipeline.shards import shard_frames

            source_frames = shard_frames(kind, data, settings, skip, image_frames=frames)
        else:
            source_frames = frames(kind, data, settings, skip)
        for frame in source_frames:
            n_pages = frame["n_pages"]
            if frame["page"] in emitted:
                continue  # never two rows for one page
            emitted.add(frame["page"])
            error = frame.pop("error", None)
            yield page_row(frame.pop("page"), **frame, status="error" if error else "ok", error=error,
                           stage=stage if error else None)
        return
    except PageError as exc:
        reason = str(exc)
    except Exception as exc:
        reason = f"{stage} failed: {_describe(exc)}"
    if n_pages is None:  # the file never opened
        yield from whole_file_failed(reason, stage)
        return
    for number in range(n_pages):  # the document failed part-way: its remaining pages say why
        if number not in skip and number not in emitted:
            yield page_row(number, n_pages=n_pages, status="error", error=reason, stage=stage)


def units_by_page(plan_row: dict) -> dict[int, list[dict]]:
    """The plan's `done_units` (units published on pages that still owe others), by page."""
    by_page: dict[int, list[dict]] = {}
    for unit in plan_row.get("done_units") or []:
        by_page.setdefault(unit["page"], []).append(unit)
    return by_page


def isolated_frames(kind: str, data: bytes, settings: RenderSettings, skip: set[int]) -> Iterator[dict]:
    """`local_frames`, but rendered in this thread's sandbox process (pipeline/sandbox.py)."""
    from pipeline.sandbox import SandboxUnavailable, sandbox_for_this_thread

    sandbox = sandbox_for_this_thread()
    try:
        sandbox.ensure_started()
    except SandboxUnavailable as exc:  # no process can be started here: the soft limit only
        if not sandbox.warned:
            log.warning("rendering in-process, without a hard time limit: %s", exc)
            sandbox.warned = True
        return local_frames(kind, data, settings, skip)
    return sandbox.frames(kind, data, settings, skip)


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 500 else text[:500] + "..."


class RenderPages:
    """Ray Data step: plan rows in, page rows out, a few pages at a time so memory stays bounded."""

    def __init__(self, settings: RenderSettings, storage: StorageOptions, pages_per_block: int = 4,
                 document_window: int = 0, page_rows: bool = True):
        self.settings = settings
        self.storage = storage
        self.pages_per_block = pages_per_block
        self.document_window = document_window  # > 0: also one document row of that many pages (documents.py)
        self.page_rows = page_rows  # False when no task works per page: only document rows come out

    def _rows_of(self, plan_row: dict) -> Iterator[dict]:
        def render(row: dict) -> Iterator[dict]:
            return pages_of(row, self.settings, self.storage)

        if not self.document_window:
            return render(plan_row)
        from pipeline.documents import with_document_row

        return with_document_row(plan_row, render, self.document_window, self.page_rows)

    def __call__(self, plan: pa.Table) -> Iterator[pa.Table]:
        pending: list[dict] = []
        for row in plan.to_pylist():
            for page in self._rows_of(row):
                pending.append(page)
                if len(pending) >= self.pages_per_block:
                    yield table_from_rows(pending, PAGE_SCHEMA)
                    pending = []
        if pending:
            yield table_from_rows(pending, PAGE_SCHEMA)


def page_image(row: dict) -> np.ndarray:
    """The HWC uint8 array of a page row."""
    return np.frombuffer(row["image"], dtype=np.uint8).reshape(row["height"], row["width"], 3)


def page_images(row: dict) -> list[np.ndarray]:
    """The HWC uint8 arrays of a row: one for a page, several (in page order) for a document row."""
    if not row.get("image_shapes"):
        return [page_image(row)]
    from pipeline.preprocess import unpack_crops  # the same layout: HWC images one after the other

    return unpack_crops(row["image"], row["image_shapes"])


