"""The reference processor's split and resize, on uint8: the crops of a page exactly as Idefics2's image
processor (`Idefics2ImageProcessorPil`) resizes them, before it rescales and normalizes.

Only numpy and Pillow (no torch, no pyarrow), so `bench/gpu.py` drives the same code on a GPU machine
that has torch and transformers but neither Ray nor pyarrow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from core.image_settings import ImageSettings


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
