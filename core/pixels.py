"""Pixels between stages: HWC uint8 RGB images with their shapes beside them, raw or compressed.

A page row carries its image raw, as bytes with `width`/`height` (a document row several, one after the
other, with `image_shapes`). A preprocessed row carries the model's crops compressed losslessly as
`pixels`, with `crop_shapes`: at the render size the model can use (pipeline/render/size.py) a split page
is ~10 MB of raw crops, and it crosses the object store to the model stage. Each crop is filtered the way
PNG and lossless WebP filter images, then compressed with zstd level 1 (pyarrow's codec):

- *up*: each row minus the row above (mod 256): smooth content becomes small residuals;
- *subtract green*: red and blue minus green (mod 256), stored as three planes: the channels of paper,
  ink and photos move together, so two planes become near-constant;
- zstd level 1: on the benchmark mix (text pages, scans, photos) higher levels gain nothing on the
  filtered crops, for up to twice the time (BENCHMARKS.md).

Every step is exact modular arithmetic on uint8, so the model actor gets back the very bytes the CPU
stage made: the collated tensors stay bit-identical to the reference processor's
(tests/test_preprocess_fidelity.py). These functions are the only ones that pack and unpack pixels.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

CODEC = pa.Codec("zstd", compression_level=1)


def unpack_crops(pixels: bytes, shapes: list[list[int]]) -> list[np.ndarray]:
    """Raw HWC images one after the other -> views into `pixels`, no copies."""
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


def compress_crops(crops: list[np.ndarray]) -> tuple[bytes, list[list[int]]]:
    """HWC uint8 crops -> (one compressed blob, [[h, w], ...]): a preprocessed row's `pixels`, `crop_shapes`."""
    shapes = [[int(c.shape[0]), int(c.shape[1])] for c in crops]
    filtered = np.empty(sum(h * w * 3 for h, w in shapes), dtype=np.uint8)
    offset = 0
    for crop, (height, width) in zip(crops, shapes):
        planes = filtered[offset : offset + height * width * 3].reshape(3, height, width)
        _filter(np.asarray(crop, dtype=np.uint8), planes)
        offset += height * width * 3
    return CODEC.compress(filtered, asbytes=True), shapes


def decompress_crops(pixels: bytes, shapes: list[list[int]]) -> list[np.ndarray]:
    """The crops `compress_crops` packed, as contiguous HWC uint8 arrays."""
    filtered = np.frombuffer(CODEC.decompress(pixels, sum(h * w * 3 for h, w in shapes)), dtype=np.uint8)
    crops, offset = [], 0
    for height, width in shapes:
        planes = filtered[offset : offset + height * width * 3].reshape(3, height, width)
        crops.append(_unfilter(planes))
        offset += height * width * 3
    return crops


def _filter(crop: np.ndarray, planes: np.ndarray) -> None:
    """Write the residuals of `crop` (H, W, 3) into `planes` (3, H, W): up, then subtract green. The
    channels are taken apart first (one strided copy), so both filters then run on contiguous planes: a
    third faster than filtering the interleaved pixels."""
    separate = np.empty_like(planes)
    np.copyto(separate, crop.transpose(2, 0, 1))
    planes[:, 0] = separate[:, 0]
    np.subtract(separate[:, 1:], separate[:, :-1], out=planes[:, 1:])
    np.subtract(planes[0], planes[1], out=planes[0])
    np.subtract(planes[2], planes[1], out=planes[2])


def _unfilter(planes: np.ndarray) -> np.ndarray:
    """The inverse of `_filter`: add green back while interleaving the channels, then sum the rows down
    (a loop over rows: a third of the time numpy's cumsum along that axis takes)."""
    crop = np.empty((planes.shape[1], planes.shape[2], 3), dtype=np.uint8)
    crop[..., 1] = planes[1]
    np.add(planes[0], planes[1], out=crop[..., 0])
    np.add(planes[2], planes[1], out=crop[..., 2])
    for row in range(1, crop.shape[0]):
        np.add(crop[row], crop[row - 1], out=crop[row])
    return crop
