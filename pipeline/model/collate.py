"""Collation inside the model actor: uint8 crops -> batches -> the model's pixel tensors.

`batch_by_shape` decides which sequences share a `generate` call: sorted by crop count and size, so
crops of one shape meet in the same vision-tower calls (see `features.py`), and cut by a count
and optional pixel and token budgets (`budget.py` sizes the token budget to the GPU).

`collate_pixels` mirrors the reference processor's last steps exactly: rescale (computed in float64,
stored as float32, as `transformers.image_transforms.rescale` does), normalize in float32, zero-pad every
crop to the largest height and width in the batch, and mark valid pixels in the mask. It runs on the
actor's device, so on a GPU node the CPU stage never builds float tensors at all: the uint8 crops cross
to the GPU in one transfer and become floats there.
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from scriptorium.core.image_settings import ImageSettings

T = TypeVar("T")


def batch_by_shape(
    items: list[T],
    crops_of: Callable[[T], list[np.ndarray]],
    batch_size: int,
    max_batch_pixels: int = 0,
    tokens_of: Callable[[T], int] | None = None,
    max_batch_tokens: int = 0,
) -> Iterator[list[T]]:
    """Sort `items` by (crop count, tallest crop, widest crop), then cut batches of at most `batch_size`
    items and, where a budget is > 0, at most `max_batch_pixels` crop pixels and `max_batch_tokens`
    tokens (`tokens_of(item)`: prompt + new tokens, what the item's KV cache holds). A single item over a
    budget still gets a batch of its own. Crops are encoded at their own size, so their own pixels are
    the cost."""

    def shape(item: T) -> tuple[int, int, int]:
        crops = crops_of(item)
        return len(crops), max(c.shape[0] for c in crops), max(c.shape[1] for c in crops)

    def pixels(item: T) -> int:
        return sum(c.shape[0] * c.shape[1] for c in crops_of(item))

    def tokens(item: T) -> int:
        return tokens_of(item) if tokens_of is not None and max_batch_tokens else 0

    batch: list[T] = []
    batch_pixels = batch_tokens = 0
    for item in sorted(items, key=shape):
        item_pixels, item_tokens = pixels(item), tokens(item)
        full = (
            len(batch) >= batch_size
            or (max_batch_pixels and batch_pixels + item_pixels > max_batch_pixels)
            or (max_batch_tokens and batch_tokens + item_tokens > max_batch_tokens)
        )
        if batch and full:
            yield batch
            batch, batch_pixels, batch_tokens = [], 0, 0
        batch.append(item)
        batch_pixels += item_pixels
        batch_tokens += item_tokens
    if batch:
        yield batch


def normalization_table(settings: ImageSettings, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(3, 256): the normalized value of every uint8 level per channel, in `dtype`.

    A uint8 pixel has 256 possible values, so rescale + normalize is a table lookup; the table is built
    with the reference's arithmetic (float64 rescale, float32 normalize), so lookups are bit-exact, and
    a table cast to fp16/bf16 gives exactly the reference's float32 tensor cast to that dtype.
    """
    levels = (torch.arange(256, dtype=torch.float64) * settings.rescale_factor).to(torch.float32)
    mean = torch.tensor(settings.image_mean, dtype=torch.float32).view(3, 1)
    std = torch.tensor(settings.image_std, dtype=torch.float32).view(3, 1)
    return ((levels.view(1, 256) - mean) / std).to(device=device, dtype=dtype)


def collate_pixels(
    pages: list[list[np.ndarray]],
    settings: ImageSettings,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pages[i]` is the list of HWC uint8 crops of sequence i.

    Returns pixel_values (B, N, 3, H, W) in `dtype` and pixel_attention_mask (B, N, H, W) bool, where N is
    the largest number of crops of any sequence (missing ones are all-zero, which the model skips).
    """
    n_images = max(len(crops) for crops in pages)
    height = max(c.shape[0] for crops in pages for c in crops)
    width = max(c.shape[1] for crops in pages for c in crops)
    pixel_values = torch.zeros((len(pages), n_images, 3, height, width), dtype=dtype, device=device)
    mask = torch.zeros((len(pages), n_images, height, width), dtype=torch.bool, device=device)
    lut = normalization_table(settings, device, dtype)
    # One host copy and one transfer for the whole batch (uint8), then everything happens on `device`.
    flat = np.concatenate([np.asarray(c, dtype=np.uint8).reshape(-1) for crops in pages for c in crops])
    levels = torch.from_numpy(flat)
    if torch.device(device).type == "cuda":  # page-locked, so the copy runs beside the GPU's other work
        levels = levels.pin_memory()
    levels = levels.to(device, non_blocking=True)
    offset = 0
    for i, crops in enumerate(pages):
        for j, crop in enumerate(crops):
            h, w = crop.shape[:2]
            hwc = levels[offset : offset + h * w * 3].view(h, w, 3)
            offset += h * w * 3
            # A gather per crop: channel c's level v becomes lut[c, v], laid out channels-first.
            chw = hwc.permute(2, 0, 1).reshape(3, h * w).long()
            pixel_values[i, j, :, :h, :w] = lut.gather(1, chw).view(3, h, w)
            mask[i, j, :h, :w] = True
    return pixel_values, mask
