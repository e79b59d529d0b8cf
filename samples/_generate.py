"""Makes the demo's sample documents: `python samples/_generate.py` (the `_` keeps this file out of the
demo's inputs, as it does any bookkeeping file).

    report.pdf          born-digital, three pages (kept as it is): OCR from its text layer
    memo.pdf            born-digital, one landscape page: OCR from its text layer
    scan.pdf            a scanned letter: a picture of a page and no text layer, so OCR is Tesseract's
    receipt.png         a scanned receipt: Tesseract
    photo-lake.jpg      photo-like pictures without text: the model's captions are what they are for
    photo-market.jpg

Text is set with PyMuPDF's built-in Helvetica and scans are that text rasterised, tilted and speckled
as a flatbed scanner leaves paper; the pictures are drawn from fixed seeds. So the files come out the
same each time, and small (under 200 KB together).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pymupdf
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent

MEMO = "Landscape memo: the meeting of the archive committee moved to Thursday at ten, room four."
LETTER = ["Parish of Saint Mary, 12 March 1887", "", "Dear Sir,", "",
          "The harvest this year was good. We send you", "forty bushels of wheat and ten of barley",
          "by the carrier on Monday next.", "", "Yours faithfully,", "John Miller, clerk"]
RECEIPT = ["RECEIPT No. 77", "", "Bread, two loaves      3.20", "Honey, one jar         9.30", "",
           "TOTAL                 12.50", "", "Thank you"]


def typeset(lines: list[str], width_pt: float, height_pt: float, fontsize: float, dpi: int) -> Image.Image:
    """Lines of text on a white page, rasterised: what a scanner sees before the paper's flaws."""
    document = pymupdf.open()
    page = document.new_page(width=width_pt, height=height_pt)
    y = 2.5 * fontsize
    for line in lines:
        page.insert_text((1.8 * fontsize, y), line, fontsize=fontsize, fontname="helv")
        y += 1.5 * fontsize
    pixmap = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY)
    return Image.frombytes("L", (pixmap.width, pixmap.height), pixmap.samples)


def scanned(image: Image.Image, seed: int, grain: float = 6) -> Image.Image:
    """Grey paper, a slight tilt, speckles and a little blur."""
    rng = np.random.default_rng(seed)
    tilted = image.rotate(0.7, resample=Image.BICUBIC, expand=False, fillcolor=255)
    pixels = np.asarray(tilted, dtype=np.float32) * 0.9 + 18 + rng.normal(0, grain, (tilted.height, tilted.width))
    pixels[rng.random(pixels.shape) < 0.0015] = 60  # dust
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))


def save(document: pymupdf.Document, path: Path) -> None:
    """Without dates or a random file /ID, so the same content gives the same bytes."""
    document.set_metadata({})
    document.save(path, garbage=4, deflate=True, no_new_id=True)


def write_memo(path: Path) -> None:
    document = pymupdf.open()
    page = document.new_page(width=842, height=595)
    page.insert_textbox(pymupdf.Rect(40, 40, 802, 555), MEMO, fontsize=16)
    save(document, path)


def write_scan(path: Path) -> None:
    """A PDF whose only content is the JPEG of a scanned A4 letter, as scanners write them."""
    image = scanned(typeset(LETTER, 595, 842, 20, dpi=100), seed=1)
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=70)
    document = pymupdf.open()
    page = document.new_page(width=595, height=842)
    page.insert_image(page.rect, stream=jpeg.getvalue())
    save(document, path)


def write_receipt(path: Path) -> None:
    receipt = scanned(typeset(RECEIPT, 300, 330, 16, dpi=130), seed=2, grain=0)
    receipt.quantize(8, dither=Image.Dither.NONE).save(path, optimize=True)


def draw_lake(rng: random.Random) -> Image.Image:
    width, height = 640, 480
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = 290
    for y in range(horizon):  # sky: deep blue to a pale haze
        t = y / horizon
        draw.line([(0, y), (width, y)], fill=(int(60 + 150 * t), int(110 + 110 * t), int(200 + 40 * t)))
    draw.ellipse([470, 50, 540, 120], fill=(255, 240, 200))
    for shade, base in ((0.55, 200), (0.35, 240)):  # two mountain ranges, the nearer one darker
        points, x = [(0, horizon)], 0
        while x < width:
            points.append((x, base + rng.randint(-60, 20)))
            x += rng.randint(30, 70)
        points += [(width, base), (width, horizon)]
        draw.polygon(points, fill=(int(70 * shade), int(100 * shade), int(120 * shade)))
    for y in range(horizon, height):  # the lake, darker towards the shore
        t = (y - horizon) / (height - horizon)
        draw.line([(0, y), (width, y)], fill=(int(70 - 40 * t), int(120 - 50 * t), int(170 - 60 * t)))
    for _ in range(120):  # ripples
        x, y = rng.randint(0, width), rng.randint(horizon + 5, height)
        draw.line([(x, y), (x + rng.randint(10, 40), y)], fill=(150, 180, 210), width=1)
    for x in range(10, width, 55):  # pines on the far shore
        top = horizon - rng.randint(20, 45)
        draw.polygon([(x, horizon + 4), (x + 12, top), (x + 24, horizon + 4)], fill=(20, 60, 35))
    return image


def draw_market(rng: random.Random) -> Image.Image:
    width, height = 640, 480
    image = Image.new("RGB", (width, height), (235, 225, 205))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 330, width, height], fill=(150, 130, 110))  # cobbles
    for _ in range(400):
        x, y = rng.randint(0, width), rng.randint(335, height)
        draw.ellipse([x, y, x + 14, y + 8], outline=(120, 100, 85))
    stripes = [((200, 40, 40), (245, 240, 230)), ((40, 110, 60), (240, 230, 200)), ((40, 70, 160), (245, 245, 240))]
    for stall, left in enumerate((20, 230, 440)):
        first, second = stripes[stall]
        for i in range(9):  # a striped awning
            draw.rectangle([left + 20 * i, 90, left + 20 * i + 20, 150], fill=first if i % 2 else second)
        draw.rectangle([left + 5, 150, left + 175, 160], fill=(90, 60, 40))
        draw.line([(left + 8, 160), (left + 8, 330)], fill=(90, 60, 40), width=6)
        draw.line([(left + 172, 160), (left + 172, 330)], fill=(90, 60, 40), width=6)
        draw.rectangle([left, 260, left + 180, 300], fill=(120, 85, 55))  # the table
        fruit = [(230, 120, 20), (200, 30, 40), (240, 210, 40), (90, 160, 50)][stall % 4:] + [(230, 120, 20)]
        for _ in range(28):  # a heap of fruit on it
            x, y = left + rng.randint(8, 160), 228 + rng.randint(0, 30)
            draw.ellipse([x, y, x + 18, y + 18], fill=rng.choice(fruit), outline=(60, 40, 20))
    return image


def write_photo(path: Path, drawing: Image.Image, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.asarray(drawing.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    pixels += rng.normal(0, 5, pixels.shape)  # sensor noise
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=78)


def main() -> None:
    write_memo(HERE / "memo.pdf")
    write_scan(HERE / "scan.pdf")
    write_receipt(HERE / "receipt.png")
    write_photo(HERE / "photo-lake.jpg", draw_lake(random.Random(3)), seed=3)
    write_photo(HERE / "photo-market.jpg", draw_market(random.Random(4)), seed=4)
    for path in sorted(HERE.iterdir()):
        if not path.name.startswith("_"):
            print(f"{path.name:18} {path.stat().st_size / 1024:6.1f} KB")


if __name__ == "__main__":
    main()
