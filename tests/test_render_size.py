"""PDF pages are rendered at what the model can use: twice the processor's longest edge when it splits
pages (each quadrant then carries real detail), the longest edge when it does not, and a scan at no more
than its own resolution. `[render] page_edge` or `[render] dpi` override the rule; the `width` and
`height` columns say what was rendered.
"""

from __future__ import annotations

import pytest

from scriptorium.core.errors import SpecError
from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.spec import RenderSpec, StorageSpec, TaskSpec, load_spec
from scriptorium.pipeline.render.size import resolved_render
from scriptorium.pipeline.render.stage import pages_of
from tests.conftest import job, make_image, make_pdf, make_scan_pdf, plan_row, run_stages

LETTER = (612, 792)  # points: 8.5 x 11 inches
# The idefics2-8b processor: 980 / 378, with image splitting (the tiny_model_split checkpoint's settings).
IDEFICS2_8B = ImageSettings(do_image_splitting=True, longest_edge=980, shortest_edge=378)


def rendered_size(path, render: RenderSpec = RenderSpec(), image: ImageSettings = IDEFICS2_8B) -> tuple[int, int]:
    [row] = pages_of(plan_row(path), resolved_render(render, image), StorageSpec())
    assert row["status"] == "ok", row["error"]
    return row["width"], row["height"]


@pytest.mark.parametrize("checkpoint, page_edge", [("tiny_model_split", 1960), ("tiny_model", 980)],
                         ids=["split", "not-split"])
def test_a_pdf_pages_row_reports_the_size_the_model_can_use(checkpoint, page_edge, request, tmp_path):
    model = request.getfixturevalue(checkpoint)
    pdf = make_pdf(tmp_path / "letter.pdf", ["Dear reader, small print follows."], size=LETTER)
    [row] = run_stages(job(model, [TaskSpec(kind="ocr", max_new_tokens=1)]), [plan_row(pdf)])
    assert row["status"] == "ok"
    assert max(row["width"], row["height"]) == page_edge
    width = LETTER[0] * page_edge / LETTER[1]  # 1514.5 at 1960, 757.3 at 980
    # With splitting the short edge is the nearest even number: the whole page then halves exactly.
    assert row["width"] == (2 * round(width / 2) if checkpoint == "tiny_model_split" else round(width))


@pytest.mark.parametrize("points", [LETTER, (595, 842), (612, 1008), (792, 612), (842, 595), (500, 700), (1000, 999),
                                    (300, 1000)], ids=["letter", "a4", "legal", "letter-landscape", "a4-landscape",
                                                       "odd", "near-square", "strip"])
def test_a_page_rendered_for_splitting_halves_exactly_to_the_models_size(points, tmp_path):
    """Even edges, alike quadrants, and a whole page the processor's resize rule takes to exactly half
    (its 2:1 reduction is the preprocess stage's fast resize, pipeline/crops.py)."""
    from scriptorium.pipeline.crops import target_size

    width, height = rendered_size(make_pdf(tmp_path / "page.pdf", ["A page."], size=points))
    assert max(width, height) == 1960 and width % 2 == height % 2 == 0
    assert abs(width / height - points[0] / points[1]) < 2 / min(width, height)  # the page's shape, within 2 pixels
    assert target_size(height, width, IDEFICS2_8B) == (max(height // 2, 378), max(width // 2, 378))


def test_a_low_resolution_scan_is_not_upscaled(tmp_path):
    scan = make_scan_pdf(tmp_path / "scan-100dpi.pdf", dpi=100)  # 850 x 1100 pixels of scan
    assert rendered_size(scan) == (850, 1100)
    # ...nor one with an OCR text layer: that text is invisible, the page is still the scan.
    ocr = make_scan_pdf(tmp_path / "ocr.pdf", dpi=100, ocr_layer="The text an OCR tool found on the page " * 3)
    assert rendered_size(ocr) == (850, 1100)
    # Unless asked to: then a scan is rendered at the model's size like any page.
    assert rendered_size(scan, RenderSpec(scans_at_own_resolution=False)) == (1514, 1960)


def test_a_fine_scan_is_rendered_at_the_models_size(tmp_path):
    scan = make_scan_pdf(tmp_path / "scan-300dpi.pdf", dpi=300)  # 2550 x 3300
    assert rendered_size(scan) == (1514, 1960)


def test_a_page_with_visible_text_over_a_picture_is_not_a_scan(tmp_path):
    """Born-digital text drawn over a coarse background image keeps its full rendering."""
    page = make_scan_pdf(tmp_path / "poster.pdf", dpi=30, visible_text="Vector text that stays sharp " * 3)
    assert rendered_size(page) == (1514, 1960)


def test_images_are_decoded_at_their_own_size(tmp_path):
    """Images are never resized when read: the preprocess stage splits the native image, as the reference does."""
    photo = make_image(tmp_path / "photo.png", size=(3000, 2000))
    assert rendered_size(photo) == (3000, 2000)


def test_render_overrides_apply_to_every_page(tmp_path):
    letter = make_pdf(tmp_path / "letter.pdf", ["Some text."], size=LETTER)
    scan = make_scan_pdf(tmp_path / "scan.pdf", dpi=100)
    assert rendered_size(letter, RenderSpec(dpi=50)) == (425, 550)
    assert rendered_size(scan, RenderSpec(dpi=200)) == (1700, 2200)  # asked for: upscaled
    assert rendered_size(letter, RenderSpec(page_edge=640)) == (495, 640)
    assert rendered_size(scan, RenderSpec(page_edge=1960)) == (1515, 1960)  # your own edge: no even rounding
    assert rendered_size(letter, image=ImageSettings(do_image_splitting=False, longest_edge=490)) == (379, 490)


def test_a_dpi_too_large_for_max_pixels_is_an_error_row(tmp_path):
    big = make_pdf(tmp_path / "poster.pdf", ["A poster."], size=(2000, 3000))  # 28 x 42 inches
    [row] = pages_of(plan_row(big), resolved_render(RenderSpec(dpi=600), IDEFICS2_8B), StorageSpec())
    assert row["status"] == "error" and row["stage"] == "render"
    assert "more than render.max_pixels=40000000" in row["error"]


def test_dpi_and_page_edge_are_alternatives(tmp_path):
    spec_file = tmp_path / "job.toml"
    spec_file.write_text("[render]\ndpi = 300\n")
    assert load_spec(spec_file).render.dpi == 300
    spec_file.write_text("[render]\ndpi = 300\npage_edge = 1960\n")
    with pytest.raises(SpecError, match="set one of them"):
        load_spec(spec_file)
    with pytest.raises(SpecError, match="render.dpi must be >= 0"):
        RenderSpec(dpi=-1)
