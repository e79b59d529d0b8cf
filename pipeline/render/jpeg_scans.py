"""Scanned pages the short way: a page that shows one JPEG scan and nothing else is decoded by Pillow.

Most archive scans are PDFs whose every page is one JPEG image laid over the whole page. MuPDF renders
such a page by decoding the JPEG with plain libjpeg and drawing it scaled; Pillow's libjpeg-turbo
decodes it faster (and, for a page wanted at half the scan's size or less, decodes it straight at a
reduced scale in the DCT domain), and one area-averaging resize (Pillow's box filter, each output pixel
the mean of the scan pixels it covers) brings it to the render size. On bench/preprocess.py's scans that
is a third less time than MuPDF for the same page (BENCHMARKS.md), and the pixels differ from MuPDF's by
a few levels of 255, the difference between two downscaling filters.

Only pages where the two must agree take this way: upright (no page rotation, no flipped or rotated
image), the one image drawn once and covering the page box, a plain 8-bit DCT stream in RGB or gray
with no mask, decode array or decode parameters, nothing else drawn visibly (no visible text, vector
paths or annotations; invisible OCR text is fine), and a render size no larger than the scan. Any
other page, and any JPEG that Pillow cannot decode, is MuPDF's as before.

Runs in the render sandbox's child process, with the decoders: PyMuPDF and Pillow only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pipeline.render.size import PageContents

COLORSPACES = {"DeviceRGB": ("RGB",), "DeviceGray": ("L",), "ICCBased": ("RGB", "L")}
ALIGNMENT_PT = 0.5  # how far the image's box may be from the page box, in points


def decode_scan(page, width: int, height: int, max_pixels: int, contents: PageContents | None = None) -> bytes | None:
    """The page as `width` x `height` HWC uint8 RGB bytes, when it is one JPEG scan this module may
    decode (see above); None for every other page, to be rendered by MuPDF."""
    jpeg = _the_one_jpeg(page, contents or PageContents(page))
    if jpeg is None:
        return None
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(jpeg.data))
        if image.format != "JPEG" or image.mode not in COLORSPACES[jpeg.colorspace]:
            return None
        if image.size != jpeg.size or width > image.width or height > image.height:
            return None  # a stream that disagrees with its dictionary, or a page wanted above the scan's size
        image.draft(image.mode, (width, height))  # DCT-domain scaling by 1/2, 1/4 or 1/8 where it still fits
        if image.width * image.height > max_pixels:
            return None  # MuPDF decodes it subsampled, within the renderer's limits
        image.load()
    except Exception:  # a damaged JPEG: MuPDF renders what it can of it, or says why not
        return None
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BOX)
    return (image if image.mode == "RGB" else image.convert("RGB")).tobytes()


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
