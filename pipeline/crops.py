"""The reference processor's split and resize, on uint8: the crops of a page exactly as Idefics2's image
processor (`Idefics2ImageProcessorPil`) resizes them, before it rescales and normalizes.

One resize has a fast way. A PDF page rendered for splitting is twice the model's size with even edges
(pipeline/render/size.py), so its quadrants need no resize and its whole-page crop is an exact 2:1
reduction. Pillow's bilinear filter then has fixed taps: 1/8, 3/8, 3/8, 1/8 inside, 3/7, 3/7, 1/7 at
the edges. PyTorch's uint8 antialiased bilinear kernel (AVX2; written after Pillow-SIMD) runs the same
two passes, horizontal then vertical, each rounded to uint8, with 16-bit instead of Pillow's 22-bit
fixed-point weights. With these taps the two round every sum alike: `halving_matches_pillow` checks
it once per process on every input the taps can see, and `halve` is used only where that held and
Pillow would also go horizontal first (Pillow 13 runs the vertical pass first on images more than
twice as tall as wide). It is 3-5x faster than Pillow, with the same bytes; anything else is Pillow's.

Only numpy and Pillow, and torch for the fast way when it is installed (no pyarrow), so `bench/gpu.py`
drives the same code on a GPU machine that has torch and transformers but neither Ray nor pyarrow.
"""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
from PIL import Image

from scriptorium.core.image_settings import ImageSettings


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

    Resizing stays in Pillow on uint8 (the reference's own resize), with no float copies, except an
    exact 2:1 bilinear reduction, which `halve` does faster with the same bytes. A crop already at its
    target size (Pillow would return an identical copy) is a view into `image`: a page rendered at
    twice the longest edge has four such quadrants, and only its whole-page crop is resized.
    """
    height, width = image.shape[:2]
    boxes = crop_boxes(width, height) if settings.do_image_splitting else [(0, 0, width, height)]
    crops = []
    for left, upper, right, lower in boxes:
        crop = image[upper:lower, left:right]
        target_height, target_width = target_size(crop.shape[0], crop.shape[1], settings)
        if can_halve(crop.shape[:2], (target_height, target_width), settings.resample):
            crop = halve(crop)
        elif (target_height, target_width) != crop.shape[:2]:
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


BILINEAR = int(Image.Resampling.BILINEAR)


def can_halve(shape: tuple[int, int], target: tuple[int, int], resample: int) -> bool:
    """Whether `halve` gives Pillow's bytes for this resize: a bilinear 2:1 reduction of both edges, of an
    image no more than twice as tall as wide (Pillow runs the horizontal pass first), where the check
    of PyTorch's kernel against Pillow held."""
    (height, width), (target_height, target_width) = shape, target
    return (resample == BILINEAR and height == 2 * target_height and width == 2 * target_width
            and height <= 2 * width and halving_matches_pillow())


def halve(image: np.ndarray) -> np.ndarray:
    """An HWC uint8 image at half its size, by PyTorch's antialiased bilinear kernel (see above)."""
    return bilinear_by_torch(image, image.shape[0] // 2, image.shape[1] // 2)


def bilinear_by_torch(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An HWC uint8 RGB image resized to `height` x `width` by PyTorch's antialiased bilinear uint8 kernel,
    written straight into a new contiguous HWC array: the kernel's own layout, twice as fast as the planes
    `interpolate` returns (and no copy back to HWC after)."""
    import torch

    resized = np.empty((height, width, image.shape[2]), np.uint8)
    with warnings.catch_warnings():  # a read-only page buffer: torch warns that it could write; it only reads
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
    target = torch.from_numpy(resized).permute(2, 0, 1).unsqueeze(0)  # channels-last: HWC memory
    torch._C._nn._upsample_bilinear2d_aa(source, (height, width), False, None, None, out=target)
    return resized


@cache
def halving_matches_pillow() -> bool:
    """Once per process: does PyTorch's 2:1 bilinear reduction equal Pillow's on every input its taps can
    see? Each pass alone, on rows and on columns: every interior sum (0..8*255 with weights 1, 3, 3, 1) and
    every edge input (the two 3/7 taps' sum, 0..510, with the 1/7 tap's value) at both ends; then both
    passes together on random pixels. False (Pillow then does every resize) without torch, without its
    AVX2 kernel, or where any byte differs."""
    try:
        import torch
    except ImportError:
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False  # the generic kernel rounds in floating point: not Pillow's bytes
    lines = _every_tap_input()
    rows = np.ascontiguousarray(lines.reshape(-1, 3, lines.shape[1]).transpose(0, 2, 1))  # (n, 8, 3)
    columns = np.ascontiguousarray(rows.transpose(1, 0, 2))  # (8, n, 3)
    noise = np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)
    cases = [(rows, (rows.shape[0], 4)), (columns, (4, columns.shape[1])), (noise, (48, 32))]
    try:
        for image, (height, width) in cases:
            reference = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
            if not np.array_equal(bilinear_by_torch(image, height, width), reference):
                return False
    except (AttributeError, TypeError, RuntimeError):  # a torch without this kernel's out= form
        return False
    return True


def _every_tap_input() -> np.ndarray:
    """Lines of 8 pixels (a multiple of 3 of them, random elsewhere) that hold every input a 2:1 bilinear
    reduction's taps can see: at each end, a pair of 3/7 taps summing to 0..510 beside any value of the
    1/7 tap; inside, four pixels whose sum with the middle two weighted 3 is every value of 0..2040."""
    pair_sum, third = (grid.ravel() for grid in np.meshgrid(np.arange(511), np.arange(256), indexing="ij"))
    total = np.arange(8 * 255 + 1)
    middle = np.minimum(total // 3, 510)
    edges, inside = len(pair_sum), len(total)
    lines = np.random.default_rng(1).integers(0, 256, (-(-(edges + inside) // 3) * 3, 8)).astype(np.uint8)

    def put(line_slice, columns, sums):  # two pixels that add up to `sums`
        lines[line_slice, columns[0]] = np.minimum(sums, 255)
        lines[line_slice, columns[1]] = sums - np.minimum(sums, 255)

    at_edges, at_inside = slice(0, edges), slice(edges, edges + inside)
    for pair, single in (((0, 1), 2), ((7, 6), 5)):  # output 0 reads pixels 0-2, output 3 pixels 5-7
        put(at_edges, pair, pair_sum)
        lines[at_edges, single] = third
    put(at_inside, (2, 3), middle)  # output 1 reads pixels 1-4: 1*p1 + 3*(p2 + p3) + 1*p4
    put(at_inside, (1, 4), total - 3 * middle)
    return lines
