"""One-JPEG scan pages are decoded by libjpeg-turbo (pipeline/render/jpeg_scans.py: simplejpeg, or Pillow
where it is missing) and brought to the render size by PyTorch's antialiased bilinear kernel (Pillow's
box filter without torch, and for gray); every other page is MuPDF's.

The short way must give the page MuPDF would have drawn, up to the difference between two downscaling
filters, and it must step aside for every page where the two could disagree: rotated, mirrored, not
covering the page, with something else drawn on it, masked, inverted, or not a plain JPEG.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pymupdf
import pytest
from PIL import Image

from scriptorium.core.spec import RenderSpec
from scriptorium.pipeline.render.decoders import PdfDocument
from scriptorium.pipeline.render.jpeg_scans import decode_scan
from scriptorium.pipeline.render.size import page_pixel_size

SETTINGS = RenderSpec(page_edge=600)


def scan_jpeg(size=(850, 1100), mode="RGB", seed=0, **save) -> bytes:
    """A page-like picture: paper, dark text-like bars, a coloured block; smooth enough that two good
    downscalers agree closely on it."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.full((height, width, 3), (245, 240, 228), np.float32)
    for top in range(60, height - 60, 40):
        for left in rng.integers(40, width // 2, 3):
            pixels[top : top + 14, left : left + int(rng.integers(60, width // 3))] = (30, 30, 40)
    pixels[height // 2 : height // 2 + 200, 80:380] = (180, 60, 40)
    image = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def scan_pdf(jpeg: bytes, page_size=(612, 792), where=None, edit=None) -> pymupdf.Document:
    doc = pymupdf.open()
    page = doc.new_page(width=page_size[0], height=page_size[1])
    page.insert_image(where or page.rect, stream=jpeg)
    if edit:
        edit(doc, page)
    return pymupdf.open(stream=doc.tobytes(), filetype="pdf")


def mupdf_pixels(page, width, height) -> np.ndarray:
    pix = page.get_pixmap(matrix=pymupdf.Matrix(width / page.rect.width, height / page.rect.height),
                          colorspace=pymupdf.csRGB, alpha=False)
    return np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.width, 3)


@pytest.mark.parametrize("without", [(), ("simplejpeg",), ("simplejpeg", "torch")],
                         ids=["simplejpeg+torch", "pillow+torch", "pillow-only"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_scan_decodes_to_the_page_mupdf_draws(mode, without, monkeypatch):
    for module in without:  # as on a machine where it is not installed: importing it fails
        monkeypatch.setitem(sys.modules, module, None)
    page = scan_pdf(scan_jpeg(mode=mode))[0]
    width, height = page_pixel_size(page, SETTINGS)
    ours = decode_scan(page, width, height, SETTINGS.max_pixels)

    assert ours is not None, "a plain one-JPEG page takes the short way"
    ours = np.frombuffer(ours, np.uint8).reshape(height, width, 3)
    difference = np.abs(ours.astype(int) - mupdf_pixels(page, width, height).astype(int))
    assert difference.mean() < 3 and np.median(difference) <= 2, difference.mean()


def test_the_renderer_reports_the_short_ways_pixels_for_a_scan_page():
    data = scan_pdf(scan_jpeg()).tobytes()
    document = PdfDocument(data, SETTINGS)
    frame = document.render(0)
    page = document.doc[0]
    assert (frame["width"], frame["height"]) == page_pixel_size(page, SETTINGS)
    assert frame["image"] == decode_scan(page, frame["width"], frame["height"], SETTINGS.max_pixels)


def mirrored(doc, page):
    xref = page.get_contents()[0]
    doc.update_stream(xref, b"q -612 0 0 792 612 0 cm /fzImg0 Do Q")  # drawn right to left


def inverted(doc, page):
    doc.xref_set_key(page.get_images()[0][0], "Decode", "[1 0 1 0 1 0]")


def stamped(doc, page):
    page.insert_text((40, 40), "RECEIVED 12 MAR 1987", fontsize=12)


def boxed(doc, page):
    page.draw_rect(pymupdf.Rect(20, 20, 200, 80), color=(1, 0, 0), width=3)


def rotated(doc, page):
    page.set_rotation(90)


def annotated(doc, page):
    page.add_text_annot((100, 100), "see p. 3")


def png(size=(850, 1100)) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(scan_jpeg(size))).save(buffer, format="PNG")
    return buffer.getvalue()


def with_alpha(size=(850, 1100)) -> bytes:
    image = Image.open(io.BytesIO(scan_jpeg(size))).convert("RGBA")
    image.putalpha(200)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cmyk() -> bytes:
    return scan_jpeg(mode="CMYK")


def truncated() -> bytes:
    data = scan_jpeg()
    return data[: len(data) // 2]


REFUSED = {
    "mirrored on the page": dict(edit=mirrored),
    "inverted by a decode array": dict(edit=inverted),
    "a visible stamp beside the scan": dict(edit=stamped),
    "a vector frame beside the scan": dict(edit=boxed),
    "a rotated page": dict(edit=rotated),
    "an annotation": dict(edit=annotated),
    "not covering the page": dict(where=pymupdf.Rect(36, 36, 576, 756)),
    "a Flate (PNG) image": dict(jpeg=png),
    "an image with a soft mask": dict(jpeg=with_alpha),
    "a CMYK JPEG": dict(jpeg=cmyk),
    "a damaged JPEG": dict(jpeg=truncated),
}


@pytest.mark.parametrize("case", REFUSED)
def test_pages_where_pillow_and_mupdf_could_disagree_are_mupdfs(case):
    options = dict(REFUSED[case])
    jpeg = options.pop("jpeg", scan_jpeg)()
    doc = scan_pdf(jpeg, **options)
    page = doc[0]
    width, height = page_pixel_size(page, SETTINGS)

    assert decode_scan(page, width, height, SETTINGS.max_pixels) is None
    frame = PdfDocument(doc.tobytes(), SETTINGS).render(0)
    expected = mupdf_pixels(pymupdf.open(stream=doc.tobytes(), filetype="pdf")[0], width, height)
    assert frame["image"] == expected.tobytes()


def test_a_scan_is_never_enlarged_by_the_short_way():
    """Asked for more pixels than the scan has (a `dpi` override), the page is MuPDF's to draw."""
    page = scan_pdf(scan_jpeg(size=(425, 550)))[0]
    width, height = page_pixel_size(page, RenderSpec(dpi=150))
    assert (width, height) == (1275, 1650)
    assert decode_scan(page, width, height, SETTINGS.max_pixels) is None
    assert decode_scan(page, 425, 550, SETTINGS.max_pixels) is not None  # at its own size it is the scan itself
