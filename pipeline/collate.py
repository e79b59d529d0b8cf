"""Collation inside the model actor: uint8 crops -> the model's pixel tensors.

Mirrors the reference processor's last steps exactly: rescale (computed in float64, stored as float32,
as `transformers.image_transforms.rescale` does), normalize in float32, zero-pad every crop to the
largest height and width in the batch, and mark valid pixels in the mask. Done on the actor's device, so
on a GPU node the CPU stage never builds float tensors at all.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.preprocess import ImageSettings


def normalization_table(settings: ImageSettings, device) -> torch.Tensor:
    """(3, 256) float32: the normalized value of every uint8 level per channel.

    A uint8 pixel has 256 possible values, so rescale + normalize is a table lookup; the table is built
    with the reference's arithmetic (float64 rescale, float32 normalize), so lookups are bit-exact.
    """
    levels = (torch.arange(256, dtype=torch.float64) * settings.rescale_factor).to(torch.float32)
    mean = torch.tensor(settings.image_mean, dtype=torch.float32).view(3, 1)
    std = torch.tensor(settings.image_std, dtype=torch.float32).view(3, 1)
    return ((levels.view(1, 256) - mean) / std).to(device)


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
    batch = len(pages)
    pixel_values = torch.zeros((batch, n_images, 3, height, width), dtype=torch.float32, device=device)
    mask = torch.zeros((batch, n_images, height, width), dtype=torch.bool, device=device)
    lut = normalization_table(settings, device)
    for i, crops in enumerate(pages):
        for j, crop in enumerate(crops):
            h, w = crop.shape[:2]
            hwc = torch.from_numpy(np.ascontiguousarray(crop)).to(device, non_blocking=True).long()
            for channel in range(3):
                pixel_values[i, j, channel, :h, :w] = lut[channel][hwc[:, :, channel]]
            mask[i, j, :h, :w] = True
    return pixel_values.to(dtype), mask
