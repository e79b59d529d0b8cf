"""The tiny checkpoints are image-sensitive: different images give different greedy tokens (every family).

Every equality test of model output (pipeline vs the model card snippet, one engine vs another) relies
on this: with a checkpoint whose output ignores the image, a batch that handed page A's image to page
B's prompt would still "match".
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.conftest import draw_image


def greedy_tokens(model_path, images: list[Image.Image], max_new_tokens: int = 8) -> list[tuple[int, ...]]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, backend="pil")
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        add_generation_prompt=True)
    outputs = []
    for image in images:
        inputs = processor(text=prompt, images=[image], return_tensors="pt")
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(tuple(generated[0, inputs["input_ids"].shape[1]:].tolist()))
    return outputs


def test_plain_pages_of_different_colours_give_different_tokens(tiny_model):
    pages = [Image.new("RGB", (400, 300), colour) for colour in ("white", "black", "red", (0, 128, 255))]
    outputs = greedy_tokens(tiny_model, pages)
    assert len(set(outputs)) == len(pages), outputs


def test_drawn_pictures_give_different_tokens_with_and_without_splitting(tiny_model, tiny_model_split):
    pictures = [draw_image((400, 300), (40 * i, 200 - 30 * i, 90), f"image {i}") for i in range(5)]
    for checkpoint in (tiny_model, tiny_model_split):
        outputs = greedy_tokens(checkpoint, pictures)
        assert len(set(outputs)) == len(pictures), (checkpoint, outputs)


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def tiny_family(request, tmp_path_factory):
    """A tiny Idefics3 or SmolVLM checkpoint that splits images, into 2 x 2 tiles (and the global image)
    for the pages below: the real checkpoints' 4 x 3 would make each generation several times slower."""
    from scriptorium.pipeline.model.tiny import build_tiny

    if request.param == "smolvlm":
        pytest.importorskip("torchvision", reason="transformers' SmolVLMProcessor needs torchvision")
    tile = {"idefics3": 364, "smolvlm": 512}[request.param]
    return build_tiny(tmp_path_factory.mktemp("models") / request.param, family=request.param, longest_edge=2 * tile)


def test_every_family_gives_different_tokens_for_different_pictures(tiny_family):
    pages = [Image.new("RGB", (400, 300), colour) for colour in ("white", "black", "red")]
    pictures = [draw_image((400, 300), (40 * i, 200 - 30 * i, 90), f"image {i}") for i in range(3)]
    outputs = greedy_tokens(tiny_family, pages + pictures)
    assert len(set(outputs)) == len(pages + pictures), outputs
