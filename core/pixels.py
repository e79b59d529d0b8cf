"""Pixels between stages: raw HWC uint8 RGB, packed one image after another with their shapes beside them.

A page row carries its image as bytes with `width`/`height` (a document row several, with
`image_shapes`); a preprocessed row carries the model's crops as `pixels` with `crop_shapes`. Both use
the same layout, and these functions are the only ones that pack and unpack it.
"""

from __future__ import annotations

import numpy as np


def pack_crops(crops: list[np.ndarray]) -> tuple[bytes, list[list[int]]]:
    """HWC uint8 images -> (their bytes one after the other, [[h, w], ...])."""
    return b"".join(np.ascontiguousarray(c).tobytes() for c in crops), [[c.shape[0], c.shape[1]] for c in crops]


def unpack_crops(pixels: bytes, shapes: list[list[int]]) -> list[np.ndarray]:
    """The inverse of `pack_crops`: views into `pixels`, no copies."""
    buffer = np.frombuffer(pixels, dtype=np.uint8)
    crops, offset = [], 0
    for height, width in shapes:
        n = height * width * 3
        crops.append(buffer[offset : offset + n].reshape(height, width, 3))
        offset += n
    return crops


def page_image(row: dict) -> np.ndarray:
    """The HWC uint8 array of a page row."""
    return np.frombuffer(row["image"], dtype=np.uint8).reshape(row["height"], row["width"], 3)


def page_images(row: dict) -> list[np.ndarray]:
    """The HWC uint8 arrays of a row: one for a page, several (in page order) for a document row."""
    if not row.get("image_shapes"):
        return [page_image(row)]
    return unpack_crops(row["image"], row["image_shapes"])
