"""How many pixels a PDF page is rendered at: the render spec the driver resolves once for a job
(`resolved_render`), then each page's size under it (`page_pixel_size`).

The model sees each image at most the processor's `longest_edge` pixels long (`[model] longest_edge`).
Without image splitting the image is the page, so the page is rendered at `longest_edge`. With splitting
the model sees four quadrants plus the whole page, each brought to at most `longest_edge`, so the page is
rendered at twice that: each quadrant then carries up to `longest_edge` pixels of real detail instead of
half as many stretched (at idefics2-8b's 980, small print is legible at 1960 and lost at 980:
bench/legibility.py). A scanned page (essentially one embedded raster image) holds no more detail than
its scan, so it is rendered at the scan's own resolution when that is lower: a scan is never upscaled. A
page rendered at the full twice-the-model's size gets even edges, the short one rounded to the nearest
even number that halves to exactly the model's size (at most 2 pixels from its aspect ratio): its
quadrants are then alike, and its whole-page crop is an exact 2:1 reduction, which the preprocess stage
does 3-5x faster than any other resize, with the same bytes (pipeline/crops.py). `[render] page_edge` or
`[render] dpi` override the rule for every page. Images (PNG, JPEG, ...) are not rendered: the
preprocess stage splits and resizes them exactly as the reference processor does.

`resolved_render` runs in the driver; `page_pixel_size` in the render sandbox's child process, with the
decoders: PyMuPDF (and crops.target_size, plain arithmetic).
"""

from __future__ import annotations

from functools import cached_property

from scriptorium.core.errors import PageError
from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.spec import RenderSpec
from scriptorium.pipeline.crops import target_size

POINTS_PER_INCH = 72
# A page is a scan when raster images cover this share of it and it shows little else: at most this many
# visible characters (a page number, a stamp; OCR text layers are invisible) and vector paths (a frame).
SCAN_MIN_COVERAGE = 0.9
SCAN_MAX_VISIBLE_CHARS = 40
SCAN_MAX_DRAWINGS = 10


class PageContents:
    """What a PyMuPDF page draws, each part read once when first asked: the render rule here and the
    JPEG-scan check (jpeg_scans.py) ask about the same page."""

    def __init__(self, page):
        self.page = page

    @cached_property
    def images(self) -> list[dict]:
        """`get_image_info()`: each image drawn, with its pixel size, box and transform."""
        return self.page.get_image_info()

    @cached_property
    def visible_characters(self) -> int:
        """Characters drawn visibly (not render mode 3, the invisible text OCR tools lay over a scan)."""
        return sum(sum(not chr(c[0]).isspace() for c in span["chars"]) for span in self.page.get_texttrace()
                   if span["type"] != 3 and span["opacity"] > 0)

    @cached_property
    def drawings(self) -> int:
        """Vector paths drawn."""
        return len(self.page.get_cdrawings())


def resolved_render(render: RenderSpec, image_settings: ImageSettings) -> RenderSpec:
    """The render spec PDF pages are rendered by: the one place the render size is decided. The spec's
    own page_edge or dpi, for every page; else what the model can use (twice the processor's longest
    edge with splitting, ImageSettings.render_edge, in even pixels that halve to the model's size), and
    scans at no more than their own resolution."""
    if not render.automatic_size:
        return render.updated(scans_at_own_resolution=False)
    resolved = render.updated(page_edge=image_settings.render_edge)
    # Halvable pages serve Idefics2's split; the Idefics3 family resizes every page's longest edge anyway.
    halvable = image_settings.do_image_splitting and not image_settings.idefics3_rule
    return resolved.with_halvable_pages() if halvable else resolved


def page_pixel_size(page, settings: RenderSpec, contents: PageContents | None = None) -> tuple[int, int]:
    """(width, height) in pixels to render a PyMuPDF page at; raises PageError past `max_pixels`.

    The page box sets only the aspect ratio, unless `dpi` is asked for: then the size is the page box's
    in inches times the dpi, and a page box too large for `max_pixels` at that dpi is refused.
    """
    rect = page.rect
    edge = settings.page_edge
    if settings.dpi:
        zoom = settings.dpi / POINTS_PER_INCH
    else:
        if settings.scans_at_own_resolution:
            edge = min(edge, scan_longest_edge(page, contents) or edge)
        zoom = edge / max(rect.width, rect.height)
    if settings.halvable and not settings.dpi and edge == settings.page_edge:
        width, height = halvable_size(rect.width * zoom, rect.height * zoom, edge)
    else:
        width, height = max(1, round(rect.width * zoom)), max(1, round(rect.height * zoom))
    if width * height > settings.max_pixels:
        raise PageError(f"page would render at {width}x{height}, more than render.max_pixels={settings.max_pixels}")
    return width, height


def halvable_size(width: float, height: float, page_edge: int) -> tuple[int, int]:
    """(width, height) near these, with even edges that the processor's resize rule (crops.target_size, at
    half of `page_edge`) brings to exactly half: the nearest even edges, or the next even short edge
    where the rule's truncation would take a pixel off. The shortest-edge rule is left out: a page that
    narrow is enlarged to the model's minimum whatever its size."""
    half = ImageSettings(longest_edge=page_edge // 2, shortest_edge=0)
    even_width, even_height = 2 * max(1, round(width / 2)), 2 * max(1, round(height / 2))
    for step in (0, -2, 2):
        candidate = (even_width + step, even_height) if width <= height else (even_width, even_height + step)
        if min(candidate) > 0 and target_size(candidate[1], candidate[0], half) == (candidate[1] // 2, candidate[0] // 2):
            return candidate
    return even_width, even_height


def scan_longest_edge(page, contents: PageContents | None = None) -> int | None:
    """The longest edge, in pixels, at which a scanned page shows its scan pixel for pixel; None when the
    page is not a scan. Where several images cover the page (strips, a mixed raster layer), the finest
    one counts: a page is never rendered coarser than any of its images."""
    if not page.get_images():  # the page's resources only: born-digital text pages stop here
        return None
    import pymupdf

    contents = contents or PageContents(page)
    images = [(info["width"], info["height"], pymupdf.Rect(info["bbox"])) for info in contents.images]
    images = [(w, h, box) for w, h, box in images if w > 0 and h > 0 and not box.is_empty]
    if not images or _coverage(page, [box for _, _, box in images]) < SCAN_MIN_COVERAGE:
        return None
    if contents.visible_characters > SCAN_MAX_VISIBLE_CHARS or contents.drawings > SCAN_MAX_DRAWINGS:
        return None
    # Pixels per point, whatever the image's rotation on the page: its longest side over its box's.
    pixels_per_point = max(max(w, h) / max(box.width, box.height) for w, h, box in images)
    return max(1, round(max(page.rect.width, page.rect.height) * pixels_per_point))


def _coverage(page, boxes) -> float:
    """The share of the page the boxes cover (overlaps counted twice, capped at 1). Image boxes come in
    the page's coordinates, rotated or not depending on how the page was made, so the better of the two
    fits counts. A page this misjudges is rendered at the model's full size, as a born-digital page is."""
    import pymupdf

    width, height = page.rect.width, page.rect.height
    frames = [pymupdf.Rect(0, 0, width, height), pymupdf.Rect(0, 0, height, width)]
    return min(1.0, max(sum((box & frame).get_area() for box in boxes) / frame.get_area() for frame in frames))

