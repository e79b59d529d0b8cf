"""The lean data path gives the reference processor's tensors exactly.

Scriptorium splits and resizes on CPU workers (`model_crops`, uint8), ships the crops compressed
losslessly (`compress_crops`), and decompresses, rescales, normalizes, pads and masks in the model actor
(`decompress_crops`, `collate_pixels`). The reference is the
checkpoint's own image processor, `processor.image_processor(images)`, called on the same list of
images, so batch padding and masks are compared too.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.pixels import compress_crops, decompress_crops, page_image
from scriptorium.core.schema import PLAN_SCHEMA, table_from_rows
from scriptorium.core.spec import TaskSpec
from scriptorium.pipeline.crops import model_crops
from scriptorium.pipeline.local import walk
from scriptorium.pipeline.model.collate import collate_pixels
from scriptorium.pipeline.stages import derive, job_stages, stage_named
from tests.conftest import job, make_pdf, make_scan_pdf, plan_row

# (height, width): taller and wider than longest_edge, in between, smaller than shortest_edge, a
# rendered A4 page, extreme strips, and odd sizes whose halves and aspect ratios do not divide evenly.
SIZES = [(1386, 980), (300, 2000), (700, 500), (101, 57), (980, 693), (3000, 200), (601, 1337), (981, 979)]


@pytest.fixture(scope="module")
def processor(tiny_model_split):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_split, backend="pil")


def noise_image(height: int, width: int, seed: int) -> np.ndarray:
    """Random pixels: every resize rounding difference would show."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reference(processor, images: list[np.ndarray], **kwargs):
    """The checkpoint's image processor on PIL images, one image per sequence."""
    out = processor.image_processor([[Image.fromarray(i)] for i in images], return_tensors="pt", **kwargs)
    return out["pixel_values"], out["pixel_attention_mask"]


def ours(images: list[np.ndarray], settings: ImageSettings, dtype=torch.float32):
    return collate_pixels([model_crops(image, settings) for image in images], settings, "cpu", dtype)


@pytest.mark.parametrize("splitting", [False, True], ids=["whole", "split"])
def test_a_batch_of_differently_sized_images_equals_the_reference_exactly(processor, splitting):
    images = [noise_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    settings = ImageSettings.from_processor(processor, {"do_image_splitting": splitting})

    ref_pixels, ref_mask = reference(processor, images, do_image_splitting=splitting)
    pixels, mask = ours(images, settings)

    assert pixels.dtype == ref_pixels.dtype == torch.float32
    assert pixels.shape == ref_pixels.shape
    assert pixels.shape[1] == (5 if splitting else 1)
    assert torch.equal(pixels, ref_pixels)  # bit for bit, padding included
    assert mask.dtype == torch.bool
    assert torch.equal(mask, ref_mask.bool()) and set(ref_mask.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("splitting", [False, True], ids=["whole", "split"])
def test_each_image_alone_equals_the_reference(processor, splitting):
    settings = ImageSettings.from_processor(processor, {"do_image_splitting": splitting})
    for seed, (h, w) in enumerate(SIZES):
        image = noise_image(h, w, 100 + seed)
        ref_pixels, ref_mask = reference(processor, [image], do_image_splitting=splitting)
        pixels, mask = ours([image], settings)
        assert torch.equal(pixels, ref_pixels), (h, w)
        assert torch.equal(mask, ref_mask.bool()), (h, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_equals_the_reference_rounded_once(processor, dtype):
    """Built in half precision directly, yet equal to the float32 reference cast to that dtype."""
    images = [noise_image(h, w, seed) for seed, (h, w) in enumerate(SIZES[:4])]
    settings = ImageSettings.from_processor(processor)
    ref_pixels, _ = reference(processor, images)
    pixels, _ = ours(images, settings, dtype)
    assert pixels.dtype == dtype
    assert torch.equal(pixels, ref_pixels.to(dtype))


def test_other_edge_sizes_equal_the_reference(processor):
    images = [noise_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    settings = ImageSettings.from_processor(processor, {"longest_edge": 490, "shortest_edge": 200})
    ref_pixels, ref_mask = reference(processor, images, size={"longest_edge": 490, "shortest_edge": 200})
    pixels, mask = ours(images, settings)
    assert max(pixels.shape[-2:]) == 490
    assert torch.equal(pixels, ref_pixels)
    assert torch.equal(mask, ref_mask.bool())


def test_the_cpu_stages_ship_compressed_crops_that_collate_to_the_reference(processor, tiny_model_split, tmp_path):
    """Through the job's own render and preprocess stages at the default render rule: born-digital PDF
    pages rendered at twice the longest edge in even pixels (the whole page halved by the fast way), a
    scan at its own resolution, an image as it is; crops
    compressed, decompressed as the model stage does, collated: the reference's tensors on the same pages."""
    pdf = make_pdf(tmp_path / "doc.pdf", ["A first page of text.", "A second page, with more text on it."])
    scan = make_scan_pdf(tmp_path / "scan.pdf", dpi=100)
    photo = tmp_path / "noise.png"
    Image.fromarray(noise_image(480, 640, 7)).save(photo)  # incompressible: the worst case
    spec = job(tiny_model_split, [TaskSpec(kind="ocr")])
    stages = job_stages(spec, derive(spec))

    plans = table_from_rows([plan_row(p) for p in (pdf, scan, photo)], PLAN_SCHEMA)
    pages = pa.concat_tables(walk([stage_named(stages, "render")], [plans]))
    out = pa.concat_tables(walk([stage_named(stages, "preprocess")], [pages]))

    images = [page_image(row) for row in pages.to_pylist()]
    assert [image.shape[:2] for image in images] == [(1960, 1386), (1960, 1386), (1100, 850), (480, 640)]
    assert out.schema.field("pixels").type == pa.large_binary()  # bytes of uint8, no float or mask column
    assert "pixel_attention_mask" not in out.schema.names
    rows = out.to_pylist()
    shipped = [decompress_crops(row["pixels"], row["crop_shapes"]) for row in rows]
    settings = ImageSettings.from_processor(processor)
    ref_pixels, ref_mask = reference(processor, images)
    pixels, mask = collate_pixels(shipped, settings)
    assert torch.equal(pixels, ref_pixels)
    assert torch.equal(mask, ref_mask.bool())
    raw = [sum(h * w * 3 for h, w in row["crop_shapes"]) for row in rows]
    assert all(len(row["pixels"]) * 10 < n for row, n in zip(rows[:2], raw))  # text pages: >10x smaller
    assert len(rows[3]["pixels"]) < raw[3] * 1.01  # noise: no gain, and next to no cost


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (2, 3), (379, 491), (980, 693)])
def test_compressed_crops_come_back_exactly(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    smooth = np.linspace(0, 255, shape[0] * shape[1] * 3).reshape(*shape, 3).astype(np.uint8)
    crops = [noise_image(*shape, seed=1), smooth, np.full((*shape, 3), 255, np.uint8),
             rng.integers(250, 256, (*shape, 3), dtype=np.uint8)]
    pixels, shapes = compress_crops(crops)
    assert shapes == [list(shape)] * len(crops)
    back = decompress_crops(pixels, shapes)
    assert all(b.dtype == np.uint8 and b.flags.c_contiguous and np.array_equal(b, c) for b, c in zip(back, crops))


def test_crops_encoded_at_their_own_size_give_the_models_features_and_tokens(processor, tiny_model_split):
    """The model stage encodes each crop unpadded (pipeline/model/features.py); the model itself pads them all to
    the batch's largest. Same features up to rounding, same greedy tokens."""
    from transformers import AutoModelForImageTextToText

    from scriptorium.pipeline.model.features import encode_crops, generate_kwargs

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_split, dtype=torch.float32).eval()
    settings = ImageSettings.from_processor(processor)
    images = [noise_image(h, w, seed) for seed, (h, w) in enumerate([(980, 693), (693, 980), (700, 500)])]
    ref_pixels, ref_mask = reference(processor, images)
    crops = [model_crops(image, settings) for image in images]
    with torch.inference_mode():
        ref_features = torch.cat(model.model.get_image_features(ref_pixels, ref_mask, return_dict=True).pooler_output)
        features = encode_crops(model, crops, settings, "cpu", torch.float32)
    assert features.shape == ref_features.shape == (3 * 5 * 64, model.config.text_config.hidden_size)
    torch.testing.assert_close(features, ref_features, rtol=1e-5, atol=1e-5)

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    ids = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
    input_ids = ids["input_ids"].expand(len(images), -1)
    greedy = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(input_ids))
    with torch.inference_mode():
        padded = model.generate(input_ids=input_ids, pixel_values=ref_pixels, pixel_attention_mask=ref_mask, **greedy)
        unpadded = model.generate(input_ids=input_ids, **generate_kwargs(model, features), **greedy)
    assert torch.equal(unpadded, padded)
