"""The lean data path gives the reference processor's tensors exactly.

Scriptorium splits and resizes on CPU workers (`model_crops`, uint8), ships the crops packed as bytes,
and rescales, normalizes, pads and masks in the model actor (`collate_pixels`). The reference is the
checkpoint's own image processor, `processor.image_processor(images)`, called on the same list of
images, so batch padding and masks are compared too.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from core.image_settings import ImageSettings
from core.pixels import unpack_crops
from core.schema import PAGE_SCHEMA, table_from_rows
from core.spec import RenderSpec
from pipeline.crops import model_crops
from pipeline.model.collate import collate_pixels
from pipeline.preprocess import PreprocessPages
from pipeline.render.decoders import local_frames
from tests.conftest import make_pdf

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


def test_the_preprocess_stage_ships_uint8_crops_that_collate_to_the_reference(processor, tmp_path):
    """Through the real stages: PDF page rendered at 980, preprocessed to packed bytes, unpacked, collated."""
    pdf = make_pdf(tmp_path / "doc.pdf", ["A first page of text.", "A second page, with more text on it."])
    pages = [{"source_uri": str(pdf), "kind": "pdf", "status": "ok", **p}
             for p in local_frames("pdf", pdf.read_bytes(), RenderSpec(longest_edge=980), skip=set())]
    settings = ImageSettings.from_processor(processor)
    assert settings.do_image_splitting

    out = pa.concat_tables(PreprocessPages(settings)(table_from_rows(pages, PAGE_SCHEMA)))

    assert out.schema.field("pixels").type == pa.large_binary()  # bytes of uint8, no float or mask column
    assert "pixel_attention_mask" not in out.schema.names
    images = [np.frombuffer(p["image"], np.uint8).reshape(p["height"], p["width"], 3) for p in pages]
    shipped = [unpack_crops(row["pixels"], row["crop_shapes"]) for row in out.to_pylist()]
    for row in out.to_pylist():
        assert len(row["pixels"]) == sum(h * w * 3 for h, w in row["crop_shapes"])
    ref_pixels, ref_mask = reference(processor, images)
    pixels, mask = collate_pixels(shipped, settings)
    assert torch.equal(pixels, ref_pixels)
    assert torch.equal(mask, ref_mask.bool())
    # What crosses the object store is the uint8 crops: a quarter of the float32 pixels alone.
    assert out["pixels"].nbytes * 4 <= ref_pixels.nbytes


def test_crops_encoded_at_their_own_size_give_the_models_features_and_tokens(processor, tiny_model_split):
    """The model stage encodes each crop unpadded (image_features.py); the model itself pads them all to
    the batch's largest. Same features up to rounding, same greedy tokens."""
    from transformers import AutoModelForImageTextToText

    from pipeline.model.features import encode_crops, generate_kwargs

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
