"""The fast resize: a page rendered for splitting halves to its whole-page crop by PyTorch's uint8 kernel,
with exactly Pillow's bytes (pipeline/crops.py), and every other resize stays Pillow's.

Exactness rests on `halving_matches_pillow`, which runs once per process on every input the 2:1
filter's taps can see; these tests hold that check to covering them all, to failing when a kernel is
off by one anywhere, and the fast way to the reference on page-sized images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import scriptorium.pipeline.crops as crops
from scriptorium.core.image_settings import ImageSettings
from scriptorium.pipeline.crops import can_halve, halve, halving_matches_pillow, model_crops

SPLIT = ImageSettings(do_image_splitting=True)  # idefics2-8b's 980 / 378
AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def pillow_half(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width // 2, height // 2), Image.Resampling.BILINEAR))


def test_the_check_sees_every_input_of_the_filters_taps():
    lines = crops._every_tap_input().astype(int)
    assert len(lines) % 3 == 0  # three channels per pixel
    # Each end: the two 3/7 taps' sum with every value of the 1/7 tap beside it.
    for pair, single in (((0, 1), 2), ((7, 6), 5)):
        seen = set(zip((lines[:, pair[0]] + lines[:, pair[1]]).tolist(), lines[:, single].tolist()))
        assert seen == {(s, v) for s in range(511) for v in range(256)}
    # Inside: every weighted sum 1, 3, 3, 1.
    assert set((lines[:, 1] + 3 * lines[:, 2] + 3 * lines[:, 3] + lines[:, 4]).tolist()) == set(range(2041))


@pytest.mark.skipif(not AVX2, reason="PyTorch's uint8 kernel is AVX2's; elsewhere every resize is Pillow's")
def test_pytorchs_kernel_passes_the_check_here():
    assert halving_matches_pillow.__wrapped__()


def test_the_check_fails_for_a_kernel_one_level_off_anywhere(monkeypatch):
    real = crops.bilinear_by_torch

    def off_by_one_at_one_edge_input(image, height, width):
        out = real(image, height, width)
        if image.shape[1] == 8:  # the check's lines: one left-edge input, in one channel, rounds differently
            row, channel = np.argwhere((image[:, 0] == 255) & (image[:, 1] == 0) & (image[:, 2] == 77))[0]
            out[row, 0, channel] ^= 1
        return out

    monkeypatch.setattr(crops, "bilinear_by_torch", off_by_one_at_one_edge_input)
    assert not halving_matches_pillow.__wrapped__()


@pytest.mark.skipif(not AVX2, reason="PyTorch's uint8 kernel is AVX2's; elsewhere every resize is Pillow's")
@pytest.mark.parametrize("shape", [(1960, 1514), (1960, 1386), (1514, 1960), (1960, 980), (1960, 1960), (760, 1960)],
                         ids=["letter", "a4", "landscape", "two-to-one", "square", "wide"])
def test_a_page_rendered_for_splitting_halves_to_pillows_bytes(shape):
    page = noise(*shape, seed=shape[1])
    target = crops.target_size(*shape, SPLIT)
    assert can_halve(shape, target, SPLIT.resample)
    assert np.array_equal(halve(page), pillow_half(page))
    assert np.array_equal(model_crops(page, SPLIT)[-1], pillow_half(page))  # the whole-page crop


@pytest.mark.parametrize("shape, target, resample", [
    ((1960, 1515), (980, 757), 2),  # odd width: not a 2:1 reduction
    ((1960, 1514), (980, 756), 2),  # the rule's truncation took a pixel off
    ((1962, 980), (981, 490), 2),  # more than twice as tall as wide: Pillow 13 goes vertical first
    ((1960, 1514), (980, 757), 3),  # bicubic
    ((700, 500), (350, 250), 2),  # fine, but (with the shortest edge rule) not what the model asks
])
def test_every_other_resize_stays_pillows(shape, target, resample):
    if shape == (700, 500):
        assert crops.target_size(*shape, SPLIT) != target  # the rule raises it to 378: never a halving
    else:
        assert not can_halve(shape, target, resample)


def test_a_tall_strip_falls_back_to_pillow_and_still_equals_it(monkeypatch):
    calls = []
    monkeypatch.setattr(crops, "halve", lambda image: calls.append(image.shape) or halve(image))
    strip = noise(1960, 900)  # 2.2:1, whole crop to 980 x 450
    assert np.array_equal(model_crops(strip, SPLIT)[-1], pillow_half(strip))
    assert calls == []
    page = noise(1960, 1514)
    model_crops(page, SPLIT)
    assert calls == ([(1960, 1514, 3)] if AVX2 else [])
