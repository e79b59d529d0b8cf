"""The Idefics3 family's uint8 crops (pipeline/crops_idefics3.py) collate to the processors' tensors exactly.

The reference is the family's own image processor, `Idefics3ImageProcessorPil` or `SmolVLMImageProcessorPil`,
built with each published checkpoint's settings (no checkpoint needed), called on the same list of images:
pixel_values and pixel_attention_mask of the batch, padding included, and its rows/cols, compared with
`idefics3_crops` + `collate_pixels` (the actor's collation, unchanged), bit for bit in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.pixels import compress_crops, decompress_crops, page_image
from scriptorium.core.spec import RenderSpec, StorageSpec
from scriptorium.pipeline.crops_idefics3 import PUBLISHED, idefics3_crops, image_grid
from scriptorium.pipeline.model.collate import collate_pixels
from tests.conftest import make_image, make_pdf, make_scan_pdf, plan_row

# (height, width): a rendered A4 page, landscape, odd sizes, extreme strips both ways, a single pixel,
# and sizes near the tiles of every checkpoint (364, 384, 512): exactly one, one pixel over, one under.
SIZES = [(1456, 1030), (700, 990), (601, 1337), (101, 57), (90, 2000), (3000, 40), (1, 1), (2, 1),
         (364, 364), (365, 364), (512, 513), (383, 384), (1, 4100), (2100, 2099)]

FAMILIES = sorted(PUBLISHED)  # idefics3 (Idefics3-8B-Llama3), smolvlm (256M/500M), smolvlm-instruct (2.2B)


def image_processor(name: str, **overrides):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    cls = Idefics3ImageProcessorPil if name.startswith("idefics3") else SmolVLMImageProcessorPil
    return cls(**{**PUBLISHED[name], **overrides})


def noise_image(height: int, width: int, seed: int) -> np.ndarray:
    """Random pixels: every resize rounding difference would show."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reference(ip, images: list[np.ndarray], splitting: bool):
    out = ip([[Image.fromarray(i)] for i in images], do_image_splitting=splitting, return_row_col_info=True,
             return_tensors="pt")
    rows = [r[0] for r in out["rows"]]
    cols = [c[0] for c in out["cols"]]
    return out["pixel_values"], out["pixel_attention_mask"], rows, cols


def ours(images: list[np.ndarray], settings: ImageSettings):
    cut = [idefics3_crops(image, settings) for image in images]
    pixels, mask = collate_pixels([crops for crops, _, _ in cut], settings, "cpu", torch.float32)
    return pixels, mask, [rows for _, rows, _ in cut], [cols for _, _, cols in cut]


def assert_equal_to_reference(ip, images, splitting: bool):
    settings = ImageSettings.from_image_processor(ip, overrides={"do_image_splitting": splitting})
    ref_pixels, ref_mask, ref_rows, ref_cols = reference(ip, images, splitting)
    pixels, mask, rows, cols = ours(images, settings)
    assert (rows, cols) == (ref_rows, ref_cols)
    assert [image_grid(*i.shape[:2], settings) for i in images] == list(zip(ref_rows, ref_cols))
    assert pixels.dtype == ref_pixels.dtype == torch.float32
    assert pixels.shape == ref_pixels.shape
    assert torch.equal(pixels, ref_pixels)  # bit for bit, padding included
    assert torch.equal(mask, ref_mask.bool()) and set(ref_mask.unique().tolist()) <= {0, 1}
    return settings, rows, cols


def test_the_published_settings_are_the_processors_and_read_back():
    for name in FAMILIES:
        settings = ImageSettings.from_image_processor(image_processor(name))
        assert settings.family == ("idefics3" if name == "idefics3" else "smolvlm")
        assert (settings.longest_edge, settings.tile_edge) == (PUBLISHED[name]["size"]["longest_edge"],
                                                              PUBLISHED[name]["max_image_size"]["longest_edge"])
        assert settings.resample == int(Image.Resampling.LANCZOS) and settings.do_image_splitting
        assert settings.image_mean == settings.image_std == (0.5, 0.5, 0.5)
        assert settings.render_edge == settings.longest_edge
        assert settings.images_per_page == (settings.longest_edge // settings.tile_edge) ** 2 + 1
    # transformers' own defaults are Idefics3-8B's, for both classes
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    default = ImageSettings.from_image_processor(SmolVLMImageProcessorPil())
    assert (default.longest_edge, default.tile_edge) == (4 * 364, 364)
    # Idefics2's settings are untouched
    assert ImageSettings().family == "idefics2" and ImageSettings().images_per_page == 1
    assert ImageSettings(do_image_splitting=True).render_edge == 2 * 980


@pytest.mark.parametrize("splitting", [True, False], ids=["split", "whole"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_of_odd_and_extreme_sizes_equals_the_processor_exactly(name, splitting):
    ip = image_processor(name)
    images = [noise_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    settings, rows, cols = assert_equal_to_reference(ip, images, splitting)
    if splitting:
        tiles = settings.longest_edge // settings.tile_edge
        assert max(rows) == max(cols) == tiles and min(rows) >= 1  # every image is upscaled, then split
    else:
        assert rows == cols == [0] * len(images)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_image_alone_equals_the_processor(name):
    ip = image_processor(name)
    for seed, (h, w) in enumerate(SIZES[:8]):
        assert_equal_to_reference(ip, [noise_image(h, w, 100 + seed)], True)


@pytest.mark.parametrize("size", [(364, 364), (365, 364), (364, 365), (200, 100), (1, 1)])
def test_a_longest_edge_of_one_tile_or_one_pixel_more(size):
    """With the longest edge at the tile's size an image is one tile, not split (rows = cols = 0); one
    pixel more and it is cut into a grid of two."""
    for longest in (364, 365):
        ip = image_processor("idefics3", size={"longest_edge": longest})
        _, rows, cols = assert_equal_to_reference(ip, [noise_image(*size, seed=3)], True)
        if longest == 364:
            assert (rows, cols) == ([0], [0])
        else:
            assert max(rows[0], cols[0]) == 2


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("documents")
    return [make_pdf(tmp / "doc.pdf", ["A first page of text.", "A second page, with more text on it."]),
            make_pdf(tmp / "wide.pdf", ["A landscape page."], size=(842, 595)),
            make_pdf(tmp / "strip.pdf", ["A receipt."], size=(100, 1400)),
            make_scan_pdf(tmp / "scan.pdf", dpi=100),
            make_image(tmp / "photo.png", size=(641, 479), text="an odd photo"),
            make_image(tmp / "banner.jpg", size=(2001, 45), text="a banner")]


def rendered_pages(paths, settings: ImageSettings) -> list[np.ndarray]:
    """The render stage's page images by the render rule for the family, as the CPU stage has them: PDF
    pages by PyMuPDF in the render sandbox at the longest edge, scans at their own resolution, images decoded."""
    from scriptorium.pipeline.render.size import resolved_render
    from scriptorium.pipeline.render.stage import pages_of

    render = resolved_render(RenderSpec(), settings)
    assert render.page_edge == settings.longest_edge and not render.halvable  # nothing halves here
    return [page_image(row) for path in paths for row in pages_of(plan_row(path), render, StorageSpec())]


@pytest.mark.parametrize("name", FAMILIES)
def test_pdf_pages_scans_and_photos_through_compression_equal_the_processor(name, documents):
    """Rendered pages of every kind, cut, compressed and decompressed as they cross to the model stage,
    then collated: the processor's tensors on the same page images."""
    ip = image_processor(name)
    settings = ImageSettings.from_image_processor(ip)
    images = rendered_pages(documents, settings)
    assert len(images) == 7
    assert [max(i.shape[:2]) for i in images[:4]] == [settings.longest_edge] * 4  # born-digital PDF pages
    assert max(images[4].shape[:2]) < settings.longest_edge  # the scan, at its own resolution
    ref_pixels, ref_mask, ref_rows, ref_cols = reference(ip, images, True)
    shipped, grids = [], []
    for image in images:
        crops, rows, cols = idefics3_crops(image, settings)
        blob, shapes = compress_crops(crops)
        back = decompress_crops(blob, shapes)
        assert all(np.array_equal(b, c) for b, c in zip(back, crops))
        shipped.append(back)
        grids.append((rows, cols))
    assert grids == list(zip(ref_rows, ref_cols))
    pixels, mask = collate_pixels(shipped, settings)
    assert torch.equal(pixels, ref_pixels)
    assert torch.equal(mask, ref_mask.bool())


def test_the_fast_processor_where_torchvision_is_installed():
    """transformers' default backend (torchvision) resizes with its own LANCZOS: compared, not required equal.
    Skipped without torchvision (the development environment)."""
    pytest.importorskip("torchvision")
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

    fast = Idefics3ImageProcessor(**PUBLISHED["idefics3"])
    images = [noise_image(h, w, seed) for seed, (h, w) in enumerate(SIZES[:6])]
    settings = ImageSettings.from_image_processor(fast)
    ref = fast([[Image.fromarray(i)] for i in images], return_tensors="pt")
    pixels, mask, _, _ = ours(images, settings)
    assert pixels.shape == ref["pixel_values"].shape
    assert torch.equal(mask, ref["pixel_attention_mask"].bool())
    print("fast processor: max abs difference", (pixels - ref["pixel_values"]).abs().max().item())
