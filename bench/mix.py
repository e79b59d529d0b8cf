"""The benchmark mix: born-digital report pages, scanned pages and photos, as a digitization job meets them.

- born-digital: `documents.document_pdf` report pages (vector text, a table, a chart, a small raster photo);
- scanned: PDFs whose every page is one embedded raster image, made as a flatbed scanner makes them: a
  report page rendered at `dpi` on slightly tinted paper, a little blurred and noisy (sensor noise,
  so it compresses like a scan and not like a clean render), JPEG-compressed and placed over the page;
- photos: JPEG files of natural-looking scenes: random fields with a natural image's 1/f spectrum (large
  smooth regions, detail at every scale), a few hard-edged shapes, and sensor noise.
"""

from __future__ import annotations

import io
import random

import numpy as np

from documents import document_pdf, paragraph

LETTER = (612, 792)  # points
SCAN_DPI = (300, 200)  # scanned documents alternate between the two
PHOTO_SIZES = [(1024, 768), (800, 1200), (1600, 1200), (640, 480)]  # (width, height)


def text_page_pdf(n_pages: int, seed: int = 0, fontsize: float = 10.0, fontname: str = "helv") -> tuple[bytes, list[str]]:
    """Letter pages of running text at `fontsize` points in one of PDF's base fonts (helv: Helvetica,
    tiro: Times); returns the PDF and each page's text."""
    import pymupdf

    rng = random.Random(seed)
    doc = pymupdf.open()
    texts = []
    for _ in range(n_pages):
        page = doc.new_page(width=LETTER[0], height=LETTER[1])
        box = pymupdf.Rect(54, 54, LETTER[0] - 54, LETTER[1] - 54)
        paragraphs = [paragraph(rng, 5) for _ in range(60)]
        while paragraphs and page.insert_textbox(box, "\n".join(paragraphs), fontsize=fontsize, fontname=fontname) < 0:
            paragraphs.pop()  # PyMuPDF writes nothing when text overflows: shorten until it fits
        texts.append(page.get_text("text"))
    data = doc.tobytes()
    doc.close()
    return data, texts


def scanned_pdf(n_pages: int, seed: int = 0, dpi: int = 300) -> bytes:
    """A PDF of `n_pages` scanned pages: each one raster image of a report page at `dpi`, and no text."""
    import pymupdf
    from PIL import Image, ImageFilter

    source = pymupdf.open(stream=document_pdf(n_pages, seed), filetype="pdf")
    scanned = pymupdf.open()
    noise = np.random.default_rng(seed)
    for page in source:
        pix = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csRGB, alpha=False)
        pixels = np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.width, 3).astype(np.float32)
        paper = np.array([246, 242, 232], np.float32)  # off-white
        pixels = pixels / 255 * paper + noise.normal(0, 5, (pix.height, pix.width, 1)).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        out = scanned.new_page(width=page.rect.width, height=page.rect.height)
        out.insert_image(out.rect, stream=buffer.getvalue())
    data = scanned.tobytes()
    scanned.close()
    source.close()
    return data


def photo_jpeg(seed: int = 0, size: tuple[int, int] | None = None) -> bytes:
    """A natural-looking photo as JPEG bytes (quality 90), `size` = (width, height)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = size or PHOTO_SIZES[seed % len(PHOTO_SIZES)]
    # 1/f^1.3 noise per channel (natural images fall off at about 1/f), correlated across channels as
    # colours in a scene are, over a sky-to-ground gradient.
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    amplitude = np.maximum(np.hypot(fx, fy), 1 / max(width, height)) ** -1.3
    shared = rng.normal(size=(height, width // 2 + 1)) + 1j * rng.normal(size=(height, width // 2 + 1))
    channels = []
    for _ in range(3):
        own = rng.normal(size=shared.shape) + 1j * rng.normal(size=shared.shape)
        field = np.fft.irfft2((0.8 * shared + 0.4 * own) * amplitude, s=(height, width))
        channels.append((field - field.mean()) / field.std())
    sky, ground = rng.uniform(120, 230, 3), rng.uniform(40, 140, 3)
    blend = np.linspace(0, 1, height)[:, None, None]
    pixels = sky * (1 - blend) + ground * blend + 30 * np.stack(channels, axis=-1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # objects with edges
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(20, max(21, min(width, height) // 5)))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 3, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_mix(folder, n_pages: int, pages_per_document: int = 10) -> dict[str, list]:
    """About `n_pages` pages in `folder`, a third of each kind (scans at 300 and 200 dpi, document by
    document); their paths by kind."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_kind = max(1, n_pages // 3)
    paths: dict[str, list] = {"born-digital": [], "scanned": [], "photo": []}
    for i in range(0, per_kind, pages_per_document):
        n, number = min(pages_per_document, per_kind - i), i // pages_per_document
        born_digital, scanned = folder / f"born-digital-{number:04d}.pdf", folder / f"scanned-{number:04d}.pdf"
        born_digital.write_bytes(document_pdf(n, seed=i))
        scanned.write_bytes(scanned_pdf(n, seed=i, dpi=SCAN_DPI[number % len(SCAN_DPI)]))
        paths["born-digital"].append(born_digital)
        paths["scanned"].append(scanned)
    for i in range(n_pages - 2 * per_kind):
        path = folder / f"photo-{i:04d}.jpg"
        path.write_bytes(photo_jpeg(seed=i))
        paths["photo"].append(path)
    return paths
