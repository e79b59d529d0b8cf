"""`build_tiny` / `scriptorium tiny-model --family`: each family's tiny checkpoint loads and runs through the
model card's snippet offline, with image splitting on (these families' default) and off, and its processor
and model agree on the image tokens."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from scriptorium.jobs.cli import main
from scriptorium.pipeline.model.tiny import build_tiny

# family: (tile px, image tokens per tile, the real checkpoint's rendering of one user turn)
FAMILIES = {
    "idefics3": (364, 169, "<|begin_of_text|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"),
    "smolvlm": (512, 64, "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"),
}


def needs(family: str) -> None:
    if family == "smolvlm":
        pytest.importorskip("torchvision", reason="transformers' SmolVLMProcessor needs torchvision")


@pytest.mark.parametrize("split", [True, False], ids=["split", "whole"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_card_snippet_runs_offline(family, split, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    needs(family)
    tile, seq_len, rendered = FAMILIES[family]
    options = {} if split else {"do_image_splitting": False}
    path = build_tiny(tmp_path / family, family=family, longest_edge=2 * tile, **options)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert processor.image_seq_len == seq_len
    assert model.config.scale_factor ** 2 * seq_len == (tile // model.config.vision_config.patch_size) ** 2
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == rendered
    inputs = processor(text=prompt, images=[[Image.new("RGB", (400, 300), "red")]], return_tensors="pt")
    tiles = 5 if split else 1  # 2 x 2 tiles and the global image, or the image whole
    assert inputs["pixel_values"].shape[1:] == (tiles, 3, tile, tile)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == tiles * seq_len
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_cli_builds_each_family_with_its_default_splitting(tmp_path):
    assert main(["tiny-model", str(tmp_path / "i3"), "--family", "idefics3"]) == 0
    config = json.loads((tmp_path / "i3" / "config.json").read_text())
    assert config["model_type"] == "idefics3"
    images = json.loads((tmp_path / "i3" / "processor_config.json").read_text())["image_processor"]
    assert images["do_image_splitting"] is True and images["max_image_size"] == {"longest_edge": 364}
    assert main(["tiny-model", str(tmp_path / "i2"), "--family", "idefics2"]) == 0
    assert json.loads((tmp_path / "i2" / "config.json").read_text())["model_type"] == "idefics2"
    with pytest.raises(SystemExit):
        main(["tiny-model", str(tmp_path / "x"), "--family", "llava"])
