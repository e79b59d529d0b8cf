"""Multi-image prompts: a question over a document's first pages, and few-shot examples with images.

The reference is the model card's path: `processor(text=prompt, images=[[img1, img2]])` then
`model.generate`, on CPU in fp32 with the tiny checkpoint (with image splitting, so each image is five
crops and the order matters crop by crop). The pipeline must feed the same pixels in the same order and
produce the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.pixels import page_image
from scriptorium.core.schema import DOCUMENT_PAGE
from scriptorium.core.spec import RenderSpec, StorageSpec, TaskSpec
from scriptorium.pipeline.render.size import resolved_render
from scriptorium.pipeline.render.stage import pages_of
from tests.conftest import job, make_image, make_pdf, plan_row, run_stages


@pytest.fixture(scope="module")
def split_model(tmp_path_factory):
    """The tiny checkpoint with image splitting, at a smaller image size so CPU generation is quick."""
    from scriptorium.pipeline.model.tiny import build_tiny_idefics2

    return build_tiny_idefics2(tmp_path_factory.mktemp("models") / "split-448", do_image_splitting=True,
                               longest_edge=448, shortest_edge=224)


@pytest.fixture(scope="module")
def reference(split_model):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(split_model), backend="pil")
    model = AutoModelForImageTextToText.from_pretrained(str(split_model), dtype=torch.float32).eval()
    return processor, model


def reference_inputs(reference, prompt: str, images: list[Image.Image]):
    return reference[0](text=prompt, images=[images], return_tensors="pt")


def reference_generate(reference, prompt: str, images: list[Image.Image], max_new_tokens: int):
    processor, model = reference
    inputs = reference_inputs(reference, prompt, images)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def reference_features(reference, inputs) -> torch.Tensor:
    """The model's image features of the processor's (padded) pixels."""
    with torch.inference_mode():
        out = reference[1].model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"], return_dict=True)
    return torch.cat(out.pooler_output)


def assert_same_inputs(ours: dict, reference, prompt: str, images: list[Image.Image]) -> None:
    """Our tokens and images are the processor's, image by image in prompt order (and not reversed).

    The model stage passes each crop's features, encoded at the crop's own size (pipeline/model/features.py),
    rather than padded pixels: they equal the model's features of the processor's pixels, up to rounding."""
    from scriptorium.pipeline.model.features import features_passed

    expected = reference_inputs(reference, prompt, images)
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    features = features_passed(ours)
    assert features.shape[0] == 5 * len(images) * 64  # five crops per image, 64 latents per crop
    torch.testing.assert_close(features, reference_features(reference, expected), rtol=1e-5, atol=1e-5)
    reversed_features = reference_features(reference, reference_inputs(reference, prompt, images[::-1]))
    assert not torch.allclose(features, reversed_features, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def three_pages(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "report.pdf"
    return make_pdf(path, ["Annual report 2024\nTitle page", "Revenue grew by 12 percent.", "Appendix: tables"])


def rendered_pages(path, processor) -> list[Image.Image]:
    """The pages as the pipeline renders them for this processor (twice its longest edge: it splits)."""
    render = resolved_render(RenderSpec(), ImageSettings.from_processor(processor))
    rows = pages_of(plan_row(path), render, StorageSpec())
    return [Image.fromarray(page_image(row)) for row in rows]


def test_document_prompt_shows_the_first_pages_in_order(split_model, reference, three_pages, model_inputs):
    task = TaskSpec(kind="qa", name="about", scope="document", document_pages=2, questions=["What is this?"],
                    max_new_tokens=6)
    rows = run_stages(job(split_model, [task]), [plan_row(three_pages)])

    [row] = rows  # one row per document, no page rows: no task works per page
    assert row["page"] == DOCUMENT_PAGE and row["n_pages"] == 3 and row["status"] == "ok"
    assert row["prompt"] == "User:<image><image>What is this?<end_of_utterance>\nAssistant:"
    page_0, page_1, _ = rendered_pages(three_pages, reference[0])
    assert max(page_0.size) == 2 * 448
    assert_same_inputs(model_inputs[0], reference, row["prompt"], [page_0, page_1])
    assert (row["text"], row["n_output_tokens"]) == reference_generate(reference, row["prompt"], [page_0, page_1], 6)


def test_few_shot_example_images_come_before_the_page(split_model, reference, tmp_path, model_inputs):
    example = make_image(tmp_path / "example.png", color=(200, 30, 30), text="TOTAL 12.00")
    page = make_image(tmp_path / "receipt.png", color=(30, 200, 30), text="TOTAL 99.50")
    task = TaskSpec(kind="qa", questions=["What is the total?"], max_new_tokens=5,
                    examples=[{"image": str(example), "prompt": "What is the total?", "text": "12.00"}])
    [row] = run_stages(job(split_model, [task]), [plan_row(page)])

    assert row["prompt"] == ("User:<image>What is the total?<end_of_utterance>\nAssistant: 12.00<end_of_utterance>\n"
                             "User:<image>What is the total?<end_of_utterance>\nAssistant:")
    images = [Image.open(example).convert("RGB"), Image.open(page).convert("RGB")]
    assert_same_inputs(model_inputs[0], reference, row["prompt"], images)
    assert (row["text"], row["n_output_tokens"]) == reference_generate(reference, row["prompt"], images, 5)


def test_short_documents_and_broken_documents(tiny_model, three_pages, tmp_path):
    """A document shorter than the window shows all its pages; a broken one gets an error row per unit."""
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 this is not really a PDF")
    tasks = [TaskSpec(kind="ocr", max_new_tokens=2),
             TaskSpec(kind="caption", name="overview", scope="document", document_pages=5, max_new_tokens=2)]
    rows = run_stages(job(tiny_model, tasks), [plan_row(three_pages), plan_row(broken)])

    good = [r for r in rows if r["source_uri"] == str(three_pages)]
    assert [(r["page"], r["task"]) for r in good] == [(-1, "overview"), (0, "ocr"), (1, "ocr"), (2, "ocr")]
    assert good[0]["prompt"].count("<image>") == 3 and all(r["status"] == "ok" for r in good)
    bad = [r for r in rows if r["source_uri"] == str(broken)]
    assert [(r["page"], r["task"], r["status"]) for r in bad] == [(-1, "overview", "error"), (0, "ocr", "error")]
    assert all("cannot open PDF" in r["error"] for r in bad)

