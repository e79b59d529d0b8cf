"""Scanned pages the short way: a page that shows one JPEG scan and nothing else is decoded here.

Most archive scans are PDFs whose every page is one JPEG image laid over the whole page. MuPDF renders
such a page by decoding the JPEG with plain libjpeg and drawing it scaled; libjpeg-turbo decodes it
faster, straight into an array through simplejpeg (Pillow's decoder where simplejpeg is missing; for a
page wanted at half the scan's size or less, either decodes it at a reduced scale in the DCT domain),
and one antialiased resize brings it to the render size: bilinear
with a triangle as wide as the scale (the processor's own filter) by PyTorch's uint8 kernel, 3x faster
than Pillow's box filter, which stands in where torch is not installed. On bench/preprocess.py's scans
that is half the time MuPDF takes for the same page (BENCHMARKS.md), and the pixels differ from MuPDF's
by a few levels of 255, the difference between two downscaling filters.

Only pages where the two must agree take this way: upright (no page rotation, no flipped or rotated
image), the one image drawn once and covering the page box, a plain 8-bit DCT stream in RGB or gray
with no mask, decode array or decode parameters, nothing else drawn visibly (no visible text, vector
paths or annotations; invisible OCR text is fine), and a render size no larger than the scan. Any
other page, and any JPEG the decoder refuses (damaged, CMYK, ...), is MuPDF's as before.

Runs in the render sandbox's child process, with the decoders: PyMuPDF, simplejpeg, and torch from the
first page that needs a resize (imported then, not at the child's start: most jobs never need it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from scriptorium.pipeline.crops import bilinear_by_torch
from scriptorium.pipeline.render.size import PageContents

COLORSPACES = {"DeviceRGB": ("RGB",), "DeviceGray": ("L",), "ICCBased": ("RGB", "L")}
ALIGNMENT_PT = 0.5  # how far the image's box may be from the page box, in points


def decode_scan(page, width: int, height: int, max_pixels: int, contents: PageContents | None = None) -> bytes | None:
    """The page as `width` x `height` HWC uint8 RGB bytes, when it is one JPEG scan this module may
    decode (see above); None for every other page, to be rendered by MuPDF."""
    jpeg = _the_one_jpeg(page, contents or PageContents(page))
    if jpeg is None:
        return None
    try:
        pixels = _decoded(jpeg, width, height, max_pixels)
    except Exception:  # a damaged JPEG: MuPDF renders what it can of it, or says why not
        return None
    if pixels is None:
        return None
    if pixels.shape[:2] != (height, width):
        pixels = _downscaled(pixels, width, height)
    if pixels.shape[2] == 1:  # gray: the same value in R, G and B
        pixels = np.broadcast_to(pixels, (height, width, 3))
    return pixels.tobytes()


def _decoded(jpeg: _Jpeg, width: int, height: int, max_pixels: int) -> np.ndarray | None:
    """The JPEG as an HWC uint8 array (3 channels, or 1 for gray), at its own size or reduced by 2, 4 or 8
    in the DCT domain where that still covers width x height: by simplejpeg (libjpeg-turbo straight
    into an array; 1.6x Pillow's decode and copy on 300-dpi scans), by Pillow where simplejpeg is not
    installed. None where the stream disagrees with its dictionary, is wanted above its size, or would
    decode past max_pixels (MuPDF then decodes it subsampled, within the renderer's limits)."""
    try:
        import simplejpeg
    except ImportError:
        return _decoded_by_pillow(jpeg, width, height, max_pixels)
    scan_height, scan_width, colorspace, _ = simplejpeg.decode_jpeg_header(jpeg.data)
    mode = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "L"}.get(colorspace)
    if mode not in COLORSPACES[jpeg.colorspace] or (scan_width, scan_height) != jpeg.size:
        return None
    if width > scan_width or height > scan_height:
        return None
    # Only factors of 2: libjpeg-turbo's other DCT scales (5/8, 3/4, ...) take longer than a full decode.
    factor = next(f for f in (8, 4, 2, 1) if -(-scan_width // f) >= width and -(-scan_height // f) >= height)
    min_width, min_height = -(-scan_width // factor), -(-scan_height // factor)
    if min_width * min_height > max_pixels:
        return None
    return simplejpeg.decode_jpeg(jpeg.data, colorspace="GRAY" if mode == "L" else "RGB", min_width=min_width,
                                  min_height=min_height)


def _decoded_by_pillow(jpeg: _Jpeg, width: int, height: int, max_pixels: int) -> np.ndarray | None:
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg.data))
    if image.format != "JPEG" or image.mode not in COLORSPACES[jpeg.colorspace]:
        return None
    if image.size != jpeg.size or width > image.width or height > image.height:
        return None
    image.draft(image.mode, (width, height))  # DCT-domain scaling by 1/2, 1/4 or 1/8 where it still fits
    if image.width * image.height > max_pixels:
        return None
    pixels = np.asarray(image)
    return pixels if pixels.ndim == 3 else pixels[:, :, None]


def _downscaled(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """A decoded scan (HWC, 3 channels or 1) brought down to `width` x `height`. RGB: antialiased bilinear
    by PyTorch's uint8 kernel (pipeline/crops.py), 3x faster than Pillow; gray, and RGB where torch cannot
    be imported: Pillow's box filter (for one channel it is the faster of the two)."""
    if pixels.shape[2] == 3:
        try:
            return bilinear_by_torch(pixels, height, width)
        except Exception:  # torch not installed, or past this renderer's memory cap (render.max_memory_mb)
            pass
    from PIL import Image

    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    resized = np.asarray(image.resize((width, height), Image.Resampling.BOX))
    return resized if resized.ndim == 3 else resized[:, :, None]


@dataclass
class _Jpeg:
    """A JPEG stream's bytes, with the size and colour space its PDF dictionary gives."""

    data: bytes
    size: tuple[int, int]
    colorspace: str


def _the_one_jpeg(page, contents: PageContents) -> _Jpeg | None:
    """The raw JPEG stream of the one image of a page that shows only it, upright, over the whole page."""
    if page.rotation % 360 or page.first_annot is not None:
        return None
    images = page.get_images(full=True)
    if len(images) != 1:
        return None
    xref, smask, img_width, img_height, bits, colorspace, _, _, _, _ = images[0]
    if xref <= 0 or smask or bits != 8 or colorspace not in COLORSPACES:
        return None
    doc = page.parent
    if doc.xref_get_key(xref, "Filter") != ("name", "/DCTDecode"):
        return None
    if any(doc.xref_get_key(xref, key)[0] != "null" for key in ("Decode", "DecodeParms", "Mask", "ImageMask")):
        return None
    drawn = contents.images
    if len(drawn) != 1:  # drawn more than once, or inline images beside it
        return None
    a, b, c, d, _, _ = drawn[0]["transform"]
    box, rect = drawn[0]["bbox"], page.rect
    if b or c or a <= 0 or d <= 0:  # rotated or mirrored on the page
        return None
    if max(abs(box[0] - rect.x0), abs(box[1] - rect.y0), abs(box[2] - rect.x1), abs(box[3] - rect.y1)) > ALIGNMENT_PT:
        return None
    if contents.visible_characters or contents.drawings:
        return None
    return _Jpeg(doc.xref_stream_raw(xref), (img_width, img_height), colorspace)
