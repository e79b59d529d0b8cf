"""Decoders: a file's bytes to pages of HWC uint8 RGB pixels, one page at a time.

PDF pages are rendered with PyMuPDF straight at the size the model can use (size.py: twice the
processor's longest edge with image splitting, never more than a scan's own pixels), rather than
rendered big and shrunk; a page that is one JPEG scan and nothing else is decoded by Pillow instead,
faster (jpeg_scans.py). Images are decoded with Pillow and converted to RGB
with the transformers reference semantics (transparency composited onto white; 16-bit scans scaled to
8 bits rather than clipped); every frame of a multi-frame TIFF is a page. Sizes are checked before
anything is allocated (decompression bombs, giant page boxes, more TIFF frames than `max_pages`). Each page has a soft time limit here
(SIGALRM); the hard one is the sandbox's (sandbox.py), which kills the process rendering the page.

This module runs in the render sandbox's child process, so it imports only numpy, PyMuPDF and Pillow.
"""

from __future__ import annotations

import io
import signal
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from scriptorium.core.errors import PageError
from scriptorium.core.spec import RenderSpec
from scriptorium.pipeline.render.jpeg_scans import decode_scan
from scriptorium.pipeline.render.size import PageContents, page_pixel_size


@contextmanager
def time_limit(seconds: float, what: str):
    """Raise PageError if the body runs longer than `seconds`: the soft time limit.

    Uses SIGALRM, so it only works on a process's main thread (elsewhere it is a no-op), and it
    interrupts Python code only: Pillow decodes in chunks and is interrupted, but MuPDF renders a
    page in one C call that holds the GIL until it is done. The hard limit, for that, is the
    sandbox's (sandbox.py), which kills the process rendering the page.
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
    """An open PDF whose pages are rendered one at a time, at the size `page_pixel_size` gives (size.py)."""

    what = "rendering page"

    def __init__(self, data: bytes, settings: RenderSpec):
        import pymupdf

        try:
            self.doc = pymupdf.open(stream=data, filetype="pdf")
        except Exception as exc:  # PyMuPDF raises several types for broken files
            raise PageError(f"cannot open PDF: {describe(exc)}") from None
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


def _render_page(doc, number: int, settings: RenderSpec) -> dict:
    import pymupdf

    page = doc.load_page(number)
    rect = page.rect
    if not (rect.width > 0 and rect.height > 0):
        raise PageError(f"page has an empty page box ({rect.width}x{rect.height})")
    contents = PageContents(page)  # read once for the render rule and the JPEG-scan check
    width, height = page_pixel_size(page, settings, contents)
    text = page.get_text("text")
    scan = decode_scan(page, width, height, settings.max_pixels, contents)  # one JPEG scan: Pillow is faster
    if scan is not None:
        return {"width": width, "height": height, "image": scan, "text_layer": text}
    matrix = pymupdf.Matrix(width / rect.width, height / rect.height)
    pix = page.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
    array = np.frombuffer(pix.samples_mv, dtype=np.uint8).reshape(pix.height, pix.width, pix.n)
    return {
        "width": pix.width,
        "height": pix.height,
        "image": np.ascontiguousarray(array[:, :, :3]).tobytes(),
        "text_layer": text,
    }


class ImageDocument:
    """A decoded image header; its frames (one, or every frame of a multi-frame TIFF) decode one at a time.
    `all_frames=False` takes the first frame only (a shard's image is one sample), without counting them."""

    what = "decoding frame"

    def __init__(self, data: bytes, settings: RenderSpec, all_frames: bool = True):
        from PIL import Image, UnidentifiedImageError

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                self.image = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:
                raise PageError("cannot decode image: not an image format Pillow knows") from None
            except Exception as exc:  # includes Pillow's own DecompressionBombError
                raise PageError(f"cannot decode image: {describe(exc)}") from None
        self.settings = settings
        try:
            self._check_size()  # from the header, before a single pixel is allocated
        except PageError:
            self.close()
            raise
        # Animated GIF/WebP: the first frame is the image. TIFF: every frame is a page. Counting frames
        # reads every frame's header (not its pixels): a file of a few hundred KB can hold thousands.
        self.n_pages = 1
        if all_frames and self.image.format == "TIFF":
            self.n_pages = getattr(self.image, "n_frames", 1)
            if self.n_pages > settings.max_pages:
                self.close()
                raise PageError(f"TIFF has {self.n_pages} frames, more than render.max_pages={settings.max_pages}")

    def _check_size(self) -> None:
        width, height = self.image.size
        if width * height > self.settings.max_pixels:
            raise PageError(f"image is {width}x{height}, more than render.max_pixels={self.settings.max_pixels}")

    def render(self, number: int) -> dict:
        if number or self.n_pages > 1:
            self.image.seek(number)
        self._check_size()  # each TIFF frame has its own size
        self.image.load()
        rgb = rgb_image(_eight_bit(self.image))
        return {"width": rgb.width, "height": rgb.height, "image": rgb.tobytes(), "text_layer": None}

    def close(self) -> None:
        self.image.close()


def to_rgb(image) -> np.ndarray:
    """HWC uint8 RGB with transparency composited onto white: transformers' `convert_to_rgb` (checked
    against it in the tests), without importing transformers and torch into every renderer process."""
    return np.array(rgb_image(image))


def rgb_image(image):
    """`to_rgb` as a Pillow image in mode RGB (`image` itself when it already is one: no copy)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


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


def open_document(kind: str, data: bytes, settings: RenderSpec) -> PdfDocument | ImageDocument:
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


def render_one(document: PdfDocument | ImageDocument, number: int, settings: RenderSpec) -> dict:
    """One page as {page, n_pages, width, height, image, text_layer}, or {page, n_pages, error}."""
    head = {"page": number, "n_pages": document.n_pages}
    try:
        with time_limit(settings.timeout_s, f"{document.what} {number}"):
            return {**head, **document.render(number)}
    except PageError as exc:
        return {**head, "error": str(exc)}
    except Exception as exc:
        return {**head, "error": f"{document.what} {number} failed: {describe(exc)}"}


def local_frames(kind: str, data: bytes, settings: RenderSpec, skip: set[int]) -> Iterator[dict]:
    """Every page not in `skip`, rendered in this process. Raises PageError if the file cannot be opened."""
    yield from frames_of(open_document(kind, data, settings), settings, skip)


def frames_of(document, settings: RenderSpec, skip: set[int]) -> Iterator[dict]:
    """Every page of an open document not in `skip`, rendered in this process; the document is closed after."""
    try:
        for number in range(document.n_pages):
            if number not in skip:
                yield render_one(document, number, settings)
    finally:
        document.close()


def describe(exc: Exception) -> str:
    if isinstance(exc, MemoryError):  # in the renderer: over render.max_memory_mb (sandbox.py)
        return f"out of memory ({exc})" if str(exc) else "out of memory"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 500 else text[:500] + "..."
