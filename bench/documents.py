"""Real-looking document pages for the benchmarks: a title, text paragraphs, a table and a figure.

`document_pdf` writes a multi-page PDF with PyMuPDF (vector text, table rules, a bar chart and an
embedded raster photo), so rendering costs what a real report page costs. `page_images` returns the
pages as HWC uint8 arrays, each at the size the pipeline renders it under a resolved render spec
(`pipeline.render.size`); where PyMuPDF is not installed (a bare GPU machine), it draws the same layout
with Pillow instead, at the spec's page edge.
"""

from __future__ import annotations

import io
import random

import numpy as np

WORDS = (
    "the archive holds letters ledgers and maps from eighteen fifty to nineteen ten each item was "
    "catalogued by the parish clerk who noted its condition date and provenance in a bound register "
    "revenue grew in the third quarter while costs for transport and storage fell as the new depot opened "
    "table figure chapter section total amount invoice page reference report summary appendix results "
    "method sample measurement analysis committee minutes agenda resolution approved budget"
).split()

PAGE_SIZES = [(595, 842), (612, 792), (842, 595), (595, 842), (420, 595)]  # A4, Letter, A4 landscape, A5


def sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, n_sentences: int = 4) -> str:
    return " ".join(sentence(rng, rng.randint(8, 16)) for _ in range(n_sentences))


def photo(rng: random.Random, width: int = 240, height: int = 160) -> np.ndarray:
    """A smooth, photo-like RGB image (gradients plus noise) to embed as a raster figure."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.random() * 6.28
    base = np.stack([
        128 + 100 * np.sin(x / 37 + phase),
        128 + 90 * np.cos(y / 23 + phase),
        128 + 80 * np.sin((x + y) / 51),
    ], axis=-1)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 12, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def document_pdf(n_pages: int, seed: int = 0) -> bytes:
    """A PDF of `n_pages` report pages; page sizes vary so batches see several aspect ratios."""
    import pymupdf
    from PIL import Image

    rng = random.Random(seed)
    doc = pymupdf.open()
    for number in range(n_pages):
        width, height = PAGE_SIZES[number % len(PAGE_SIZES)]
        page = doc.new_page(width=width, height=height)
        margin, y = 48, 48
        page.insert_text((margin, y + 18), f"Report {seed}-{number}: {sentence(rng, 5)}", fontsize=16)
        y += 34
        box = pymupdf.Rect(margin, y, width - margin, y + height * 0.2)
        _fill_textbox(page, box, rng)
        y = box.y1 + 10
        y = _draw_table(page, rng, margin, y, width - 2 * margin)
        y = _draw_figure(page, rng, margin, y + 12, width - 2 * margin, Image)
        box = pymupdf.Rect(margin, y + 10, width - margin, height - margin)
        if box.height > 20:
            _fill_textbox(page, box, rng)
        page.insert_text((width / 2 - 10, height - 20), str(number + 1), fontsize=8)
    data = doc.tobytes()
    doc.close()
    return data


def _fill_textbox(page, box, rng: random.Random, fontsize: float = 9.5) -> None:
    """Fill `box` with paragraphs: PyMuPDF writes nothing when text overflows, so shorten until it fits."""
    sentences = [sentence(rng, rng.randint(8, 16)) for _ in range(int(box.width * box.height / 900) + 4)]
    while sentences:
        text = "\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5))
        if page.insert_textbox(box, text, fontsize=fontsize) >= 0:
            return
        sentences = sentences[: int(len(sentences) * 0.85)]


def _draw_table(page, rng, x0, y0, width, rows=6, cols=4) -> float:
    row_h, col_w = 15, width / cols
    for r in range(rows + 1):
        page.draw_line((x0, y0 + r * row_h), (x0 + width, y0 + r * row_h), width=0.6 if r else 1.2)
    for c in range(cols + 1):
        page.draw_line((x0 + c * col_w, y0), (x0 + c * col_w, y0 + rows * row_h), width=0.6)
    for r in range(rows):
        for c in range(cols):
            text = rng.choice(WORDS).title() if r == 0 or c == 0 else f"{rng.uniform(0, 9999):,.2f}"
            page.insert_text((x0 + c * col_w + 4, y0 + r * row_h + 11), text, fontsize=8,
                             fontname="hebo" if r == 0 else "helv")
    return y0 + rows * row_h


def _draw_figure(page, rng, x0, y0, width, Image) -> float:
    """A bar chart (vector) beside a raster photo, with a caption; returns the y below it."""
    import pymupdf

    fig_h = 120
    chart_w = width * 0.5
    page.draw_line((x0, y0 + fig_h), (x0 + chart_w, y0 + fig_h), width=0.8)
    page.draw_line((x0, y0), (x0, y0 + fig_h), width=0.8)
    n_bars = 8
    for i in range(n_bars):
        h = rng.uniform(0.15, 0.95) * (fig_h - 6)
        left = x0 + 6 + i * (chart_w - 12) / n_bars
        rect = pymupdf.Rect(left, y0 + fig_h - h, left + (chart_w - 12) / n_bars * 0.7, y0 + fig_h)
        page.draw_rect(rect, color=(0.1, 0.3, 0.6), fill=(0.3, 0.5, 0.8))
    buffer = io.BytesIO()
    Image.fromarray(photo(rng)).save(buffer, format="JPEG", quality=85)
    page.insert_image(pymupdf.Rect(x0 + chart_w + 12, y0, x0 + width, y0 + fig_h), stream=buffer.getvalue())
    page.insert_text((x0, y0 + fig_h + 14), f"Figure: {sentence(rng, 9)}", fontsize=8)
    return y0 + fig_h + 18


def render_pdf(data: bytes, render) -> list[np.ndarray]:
    """Every page, rendered at the size the pipeline renders it at under `render`, a RenderSpec the driver
    resolved (`resolved_render`): the pipeline's own `page_pixel_size`, with PyMuPDF alone (no sandbox)."""
    import pymupdf

    from scriptorium.pipeline.render.size import page_pixel_size

    pages = []
    with pymupdf.open(stream=data, filetype="pdf") as doc:
        for page in doc:
            rect = page.rect
            width, height = page_pixel_size(page, render)
            matrix = pymupdf.Matrix(width / rect.width, height / rect.height)
            pix = page.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
            pages.append(np.frombuffer(pix.samples, dtype=np.uint8).reshape(pix.height, pix.width, 3))
    return pages


def page_images(n_pages: int, render, seed: int = 0) -> list[np.ndarray]:
    """`n_pages` document pages as HWC uint8 arrays: PyMuPDF-rendered under `render` (a resolved RenderSpec),
    or Pillow-drawn at its page edge without PyMuPDF."""
    try:
        import pymupdf  # noqa: F401
    except ImportError:
        return [_drawn_page(i, render.page_edge, random.Random(seed * 100_003 + i)) for i in range(n_pages)]
    return render_pdf(document_pdf(n_pages, seed), render)


def _drawn_page(number: int, longest_edge: int, rng: random.Random) -> np.ndarray:
    """The same layout drawn with Pillow's default font (for machines without PyMuPDF)."""
    from PIL import Image, ImageDraw

    width_pt, height_pt = PAGE_SIZES[number % len(PAGE_SIZES)]
    scale = longest_edge / max(width_pt, height_pt)
    width, height = round(width_pt * scale), round(height_pt * scale)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    margin, y, line = int(48 * scale), int(48 * scale), max(10, int(12 * scale))
    draw.text((margin, y), f"Report {number}: {sentence(rng, 5)}", fill="black")
    y += 2 * line
    chars = max(20, (width - 2 * margin) // 6)
    for _ in range(10):
        text = paragraph(rng, 1)[:chars]
        draw.text((margin, y), text, fill="black")
        y += line
    for r in range(7):
        draw.line([(margin, y + r * line), (width - margin, y + r * line)], fill="black")
    y += 7 * line
    image.paste(Image.fromarray(photo(rng, width // 3, height // 6)), (width // 2, y))
    for i in range(8):
        h = int(rng.uniform(0.2, 0.9) * height / 6)
        left = margin + i * (width // 2 - margin) // 8
        draw.rectangle([left, y + height // 6 - h, left + 10, y + height // 6], fill=(70, 120, 200))
    y += height // 6 + line
    while y < height - margin:
        draw.text((margin, y), paragraph(rng, 1)[:chars], fill="black")
        y += line
    return np.asarray(image)


def write_reports(folder, n_pages: int, pages_per_document: int) -> list:
    """`n_pages` pages as report PDFs of `pages_per_document` pages each in `folder`; their paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, n_pages, pages_per_document):
        path = folder / f"report-{i // pages_per_document:04d}.pdf"
        path.write_bytes(document_pdf(min(pages_per_document, n_pages - i), seed=i))
        paths.append(path)
    return paths
