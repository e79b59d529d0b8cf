"""Preprocess on CPU workers: Idefics2's image-processor semantics, shipped compact.

The reference (`Idefics2ImageProcessorPil`) does, per image: RGB conversion, optional split into 4
crops plus the original (split first, at full resolution), resize each with bilinear PIL to the
`longest_edge`/`shortest_edge` rule, rescale to [0, 1], normalize, then pad the batch and build an int64
mask. This stage does the expensive, per-page part (split + resize) and stops there: its uint8 crops are
exactly what the reference resized, so the actor's rescale/normalize/pad (see `collate.py`) reproduces
the reference tensors bit for bit, while far fewer bytes cross the object store: uint8 instead of float32,
compressed losslessly (`transit.py`; `tests/test_preprocess_fidelity.py` holds it to that).

Everything above `PreprocessPages` needs only numpy and Pillow, so `bench/gpu.py` can drive the same
code on a GPU machine that has torch and transformers but neither Ray nor pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class ImageSettings:
    """The part of the checkpoint's processor config (plus job overrides) that shapes pixels."""

    do_image_splitting: bool = False
    longest_edge: int = 980
    shortest_edge: int = 378
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_seq_len: int = 64  # <image> tokens per image; must equal the perceiver's resampler_n_latents
    resample: int = 2  # PIL bilinear
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def images_per_page(self) -> int:
        return 5 if self.do_image_splitting else 1

    @classmethod
    def from_processor(cls, processor, overrides: dict | None = None) -> "ImageSettings":
        """Read the settings off a loaded Idefics2 processor, then apply job overrides (None = keep)."""
        ip = processor.image_processor
        size = ip.size if isinstance(ip.size, dict) else ip.size.__dict__
        values = dict(
            do_image_splitting=bool(ip.do_image_splitting),
            longest_edge=int(size["longest_edge"]),
            shortest_edge=int(size["shortest_edge"]),
            rescale_factor=float(ip.rescale_factor),
            image_mean=tuple(float(x) for x in ip.image_mean),
            image_std=tuple(float(x) for x in ip.image_std),
            image_seq_len=int(processor.image_seq_len),
            resample=int(ip.resample),
        )
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        return cls(**values)


def target_size(height: int, width: int, settings: ImageSettings) -> tuple[int, int]:
    """The reference's resize rule (`get_resize_output_image_size` of Idefics2's image processor):
    cap the longest edge keeping the aspect ratio (truncating), then raise each edge to shortest_edge."""
    aspect_ratio = width / height
    if width >= height and width > settings.longest_edge:
        width = settings.longest_edge
        height = int(width / aspect_ratio)
    elif height > width and height > settings.longest_edge:
        height = settings.longest_edge
        width = int(height * aspect_ratio)
    return max(height, settings.shortest_edge), max(width, settings.shortest_edge)


def model_crops(image: np.ndarray, settings: ImageSettings) -> list[np.ndarray]:
    """HWC uint8 page -> the HWC uint8 crops the model sees, resized exactly as the reference resizes.

    Resizing stays in Pillow on uint8 (the reference's own resize), with no float copies. A crop already
    at its target size (Pillow would return an identical copy) is a view into `image`: a page rendered
    at twice the longest edge has four such quadrants, and only its whole-page crop is resized.
    """
    height, width = image.shape[:2]
    boxes = crop_boxes(width, height) if settings.do_image_splitting else [(0, 0, width, height)]
    crops = []
    for left, upper, right, lower in boxes:
        crop = image[upper:lower, left:right]
        target_height, target_width = target_size(crop.shape[0], crop.shape[1], settings)
        if (target_height, target_width) != crop.shape[:2]:
            resized = Image.fromarray(np.ascontiguousarray(crop)).resize((target_width, target_height),
                                                                        resample=settings.resample)
            crop = np.asarray(resized)
        crops.append(crop)
    return crops


def crop_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The reference's split as Pillow (left, upper, right, lower) boxes: the four quadrants (top-left,
    top-right, bottom-left, bottom-right, cut at width // 2 and height // 2), then the whole image."""
    mid_w, mid_h = width // 2, height // 2
    return [(0, 0, mid_w, mid_h), (mid_w, 0, width, mid_h), (0, mid_h, mid_w, height),
            (mid_w, mid_h, width, height), (0, 0, width, height)]


def unpack_crops(pixels: bytes, shapes: list[list[int]]) -> list[np.ndarray]:
    buffer = np.frombuffer(pixels, dtype=np.uint8)
    crops, offset = [], 0
    for height, width in shapes:
        n = height * width * 3
        crops.append(buffer[offset : offset + n].reshape(height, width, 3))
        offset += n
    return crops


class PreprocessPages:
    """Ray Data step: page rows in, rows with their uint8 crops compressed (transit.py) out; errors pass through."""

    def __init__(self, settings: ImageSettings):
        self.settings = settings

    def __call__(self, pages: pa.Table) -> Iterator[pa.Table]:
        from pipeline.pages import page_images
        from pipeline.schema import PREPROCESSED_SCHEMA, table_from_rows
        from pipeline.transit import compress_crops

        rows = []
        for row in pages.to_pylist():
            image_bytes = row.pop("image")
            row["pixels"], row["crop_shapes"] = None, None
            # No image on an ok row: routes.py answered all its units without the model.
            if row["status"] == "ok" and image_bytes is not None:
                try:
                    # A document row's images one after the other, in page order: the prompt's order.
                    images = page_images({**row, "image": image_bytes})
                    crops = [crop for image in images for crop in model_crops(image, self.settings)]
                    row["pixels"], row["crop_shapes"] = compress_crops(crops)
                except Exception as exc:
                    row.update(status="error", error=f"preprocess failed: {exc}", stage="preprocess")
            rows.append(row)
        yield table_from_rows(rows, PREPROCESSED_SCHEMA)
