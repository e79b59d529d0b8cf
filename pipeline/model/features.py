"""Image features for a batch, each crop encoded at its own size.

Passing a batch's pixels to `generate` pads every crop to the largest height and width in the batch, and
with image splitting a page's four quadrants (e.g. 490x378) are padded to the whole page (980x693):
the vision tower then runs on ~2.4x the patches a split page has, and with SDPA attention builds a
(crops, patches, patches) mask, several GB for 64 split pages. Here the crops are grouped by exact shape and
each group goes through the vision tower and the perceiver unpadded, in chunks of bounded size, so no
mask is needed and padding costs nothing. The features then go to `generate` in place of the pixels.

The vision tower attends only to a crop's own patches (padding is masked out) and derives patch
positions from the crop's own size, so the features are the reference's up to floating-point rounding
(`tests/test_preprocess_fidelity.py` compares them).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from scriptorium.core.image_settings import ImageSettings
from scriptorium.pipeline.family import family_named
from scriptorium.pipeline.model.collate import collate_pixels

# Pixels per vision-tower call: bounds its activations (e.g. 64 crops of 980x980 at once) however large
# the text batch is, so the decode batch can grow without the vision tower running out of memory.
VISION_CHUNK_PIXELS = 64 * 980 * 980


@torch.inference_mode()
def encode_crops(model, sequences: list[list[np.ndarray]], settings: ImageSettings, device, dtype) -> torch.Tensor:
    """(number of crops x image_seq_len, hidden) features of every crop of every sequence, in order:
    sequence by sequence, crop by crop, which is the order of the `<image>` tokens in the batch."""
    crops = [crop for sequence in sequences for crop in sequence]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, crop in enumerate(crops):
        by_shape.setdefault(crop.shape[:2], []).append(index)
    features: list[torch.Tensor | None] = [None] * len(crops)
    for (height, width), indices in by_shape.items():
        per_call = max(1, VISION_CHUNK_PIXELS // (height * width))
        for start in range(0, len(indices), per_call):
            chunk = indices[start : start + per_call]
            pixels, _ = collate_pixels([[crops[i]] for i in chunk], settings, device, dtype)
            for i, feature in zip(chunk, encode_same_shape(model, pixels[:, 0])):
                features[i] = feature
    return torch.cat(features)


class VisionStream:
    """Where a replica encodes a block's crops while another block decodes (the vision tower is
    compute-bound, decoding is bound by memory and the host, so the two share the GPU well).

    On CUDA the crops are encoded on a stream of the replica's own; the calling thread waits for that
    stream only (the decoding thread's stream runs on), and the features are marked as used on the
    default stream, where `generate` reads them, so the allocator never hands their memory out early.
    Off CUDA it is `encode_crops` in the calling thread."""

    def __init__(self, device: str):
        self.stream = torch.cuda.Stream() if device == "cuda" else None

    def encode(self, model, sequences: list[list[np.ndarray]], settings: ImageSettings, device, dtype) -> torch.Tensor:
        if self.stream is None:
            return encode_crops(model, sequences, settings, device, dtype)
        with torch.cuda.stream(self.stream):
            features = encode_crops(model, sequences, settings, device, dtype)
        self.stream.synchronize()
        features.record_stream(torch.cuda.default_stream(features.device))
        return features


def encode_same_shape(model, pixels: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) crops of one shape -> (n, image_seq_len, hidden): the vision tower, then the family's
    connector (Idefics2: modality projection and perceiver resampler; Idefics3: pixel shuffle and
    projection), as `get_image_features` runs them, with every patch real."""
    inner = model.model
    patch = inner.config.vision_config.patch_size
    n, _, height, width = pixels.shape
    patch_mask = torch.ones((n, height // patch, width // patch), dtype=torch.bool, device=pixels.device)
    hidden = inner.vision_model(pixel_values=pixels.to(model.dtype), patch_attention_mask=patch_mask).last_hidden_state
    return family_named(model.config.model_type).connect(inner, hidden, patch_mask)


def generate_kwargs(model, features: torch.Tensor) -> dict:
    """How this transformers version takes precomputed image features in `generate`."""
    if "mm_encoder_outputs" in inspect.signature(model.forward).parameters:  # transformers >= 5
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[features])}}
    return {"image_hidden_states": features}  # transformers 4


def features_passed(generate_call_kwargs: dict) -> torch.Tensor | None:
    """The image features a recorded `generate(**kwargs)` call received (the inverse of `generate_kwargs`)."""
    if "mm_encoder_outputs" in generate_call_kwargs:
        return torch.cat(generate_call_kwargs["mm_encoder_outputs"]["image"].pooler_output)
    return generate_call_kwargs.get("image_hidden_states")
