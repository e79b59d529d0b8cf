"""Fidelity: what the pipeline generates equals the model card's snippet, token for token.

The snippet (https://huggingface.co/HuggingFaceM4/idefics2-8b): processor(text=prompt, images=[image]),
then model.generate greedy, batch of one. The pipeline instead renders, preprocesses to uint8 crops on
CPU workers, collates batches of several pages in the actor and generates them together. On CPU in fp32
both must give the same text for every image.
"""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, ResourceSpec, TaskSpec
from jobs.runner import run_job
from tests.conftest import make_image, read_rows

MAX_NEW_TOKENS = 12


@functools.lru_cache(maxsize=2)
def load_reference(model_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, backend="pil")
    return processor, AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)


def snippet_generate(model_path, prompt: str, image: Image.Image) -> str:
    """The model card's snippet, batch of one."""
    processor, model = load_reference(model_path)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1]:]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("checkpoint", ["tiny_model", "tiny_model_split"])
def test_pipeline_text_equals_the_model_card_snippet(checkpoint, request, ray_local, tmp_path):
    model_path = request.getfixturevalue(checkpoint)
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(400, 300), (300, 520), (1200, 900), (380, 380), (90, 700)]
    for i, size in enumerate(sizes):
        make_image(folder / f"img{i}.png", size=size, color=(40 * i, 200 - 30 * i, 90), text=f"image {i}")
    spec = JobSpec(
        run_id="fidelity",
        input=InputSpec(uri=str(folder)),
        output=OutputSpec(uri=str(tmp_path / "out")),
        model=ModelSpec(id=str(model_path), device="cpu", dtype="fp32"),
        tasks=[TaskSpec(kind="caption", max_new_tokens=MAX_NEW_TOKENS),
               TaskSpec(kind="qa", questions=["What is written here?"], max_new_tokens=MAX_NEW_TOKENS)],
        resources=ResourceSpec(batch_size=4),  # several differently sized images share a batch
    )
    run_job(spec)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == len(sizes) * 2 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        image = Image.open(row["source_uri"])
        assert row["text"] == snippet_generate(model_path, row["prompt"], image), row["source_uri"]
