"""The Idefics3 family's split and resize, on uint8: the crops of a page exactly as Idefics3's and SmolVLM's
image processors (`Idefics3ImageProcessorPil`, `SmolVLMImageProcessorPil`) resize and cut them, before
they rescale and normalize, with the grid (rows, cols) the prompt needs.

The rule (both processors' code is the same; SmolVLM's is generated from Idefics3's, only the checkpoints'
settings differ), on an image of any size:

1. resize so the longest edge is exactly `size["longest_edge"]` (up or down), the other edge by the aspect
   ratio, truncated, then raised to the next even number, and capped at 4096 (`longest_edge` here);
2. with splitting, resize again to multiples of the tile edge `max_image_size["longest_edge"]` (`tile_edge`):
   the longest edge rounded up to a multiple, the other edge by the aspect ratio, rounded up to a multiple;
   if that is larger than one tile, cut it into rows x cols tiles (row-major: the processor's order) and
   append the whole image resized to one tile (the global image); else it is the only crop, rows = cols = 0;
3. without splitting, the image of step 1 resized to one square tile (aspect ratio not kept), rows = cols = 0.

Every resize is Pillow's, on uint8, with the checkpoint's filter (LANCZOS for every published checkpoint):
the very calls the PIL processor makes, so the bytes are its bytes. The tiles are views into the image of
step 2 (no copies); a resize to the size an image already has is skipped (Pillow would return a copy).
The rescale, normalize, pad and mask are `pipeline/model/collate.py`'s `collate_pixels`, unchanged: these
processors rescale in float64, store float32, normalize in float32 and zero-pad with an int64 mask, like
Idefics2's, so the uint8 crops of this module collate to their `pixel_values` and `pixel_attention_mask`
bit for bit (tests/test_crops_idefics3.py).

Which backend: this matches the PIL processor, `backend="pil"`, as Scriptorium loads Idefics2, so a CPU
node and a GPU node preprocess alike. transformers' default for these families is the torchvision
("fast") `Idefics3ImageProcessor` / `SmolVLMImageProcessor` when torchvision is installed; it resizes
uint8 tensors with torchvision's LANCZOS on CPU (torchvision >= 0.27) and falls back to BICUBIC on CUDA or
an older torchvision, and fuses rescale and normalize: not Pillow's arithmetic, so not these bytes. The
development environment has no working torchvision, so the fast processor is not compared here (the
fidelity test does it where torchvision imports, and reports the largest difference).

Only numpy and Pillow, like `crops.py`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from scriptorium.core.image_settings import ImageSettings

MAX_IMAGE_SIZE = 4096  # the processors' absolute cap on an edge after the first resize

# The image-processor settings of the published checkpoints (their preprocessor_config.json), by family;
# each also has LANCZOS (resample 1), rescale 1/255, mean = std = 0.5 and splitting on: the class defaults.
# transformers' class defaults are Idefics3-8B's for both classes.
PUBLISHED = {
    "idefics3": dict(size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364}),  # Idefics3-8B-Llama3
    "smolvlm": dict(size={"longest_edge": 4 * 512}, max_image_size={"longest_edge": 512}),  # SmolVLM(2)-256M/500M
    "smolvlm-instruct": dict(size={"longest_edge": 4 * 384}, max_image_size={"longest_edge": 384}),  # 2.2B
}


def resized_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Step 1 (the processors' `get_resize_output_image_size`): the longest edge to `longest_edge`, the other
    by the aspect ratio, truncated, raised to an even number, at least 1; then capped at MAX_IMAGE_SIZE."""
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect_ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect_ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Step 2 (the processors' `resize_for_vision_encoder`): both edges to multiples of `tile`, the longest
    rounded up, the other from the aspect ratio (truncated), rounded up."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


def image_grid(height: int, width: int, settings: ImageSettings) -> tuple[int, int]:
    """(rows, cols) of tiles an image of `height` x `width` is cut into: the processor's `rows`/`cols`
    (0, 0 when it is not split). Arithmetic only: what the prompt needs, without the pixels."""
    if not settings.do_image_splitting:
        return 0, 0
    height, width = encoder_size(*resized_size(height, width, settings.longest_edge), settings.tile_edge)
    tile = settings.tile_edge
    if height > tile or width > tile:
        return (height - tile) // tile + 1, (width - tile) // tile + 1
    return 0, 0


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """An HWC uint8 image at `height` x `width` by Pillow's filter `resample`; itself if already that size."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), resample=resample))


def idefics3_crops(image: np.ndarray, settings: ImageSettings) -> tuple[list[np.ndarray], int, int]:
    """HWC uint8 page -> (its HWC uint8 crops in the processor's order, rows, cols)."""
    tile, resample = settings.tile_edge, settings.resample
    image = resize(image, *resized_size(*image.shape[:2], settings.longest_edge), resample)
    if not settings.do_image_splitting:
        return [resize(image, tile, tile, resample)], 0, 0
    image = resize(image, *encoder_size(*image.shape[:2], tile), resample)
    height, width = image.shape[:2]
    if not (height > tile or width > tile):
        return [image], 0, 0
    rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
    crops = [image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]
    crops.append(resize(image, tile, tile, resample))
    return crops, rows, cols
