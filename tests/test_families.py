"""The Idefics3 family through the job's own stages gives the model card's snippet's tokens
(`processor(text=..., images=...)`, then `generate`), token for token, on both engines.

On tiny image-sensitive checkpoints of each family (CPU, fp32, greedy), splitting at a longest edge of two
tiles, so pages of different shapes are cut into different grids (2 x 2, 1 x 2, 2 x 1) and their prompts
spell out different tile tags: PDF pages, a photo of odd size, a thumbnail, a banner and a strip of
extreme aspect ratios in one job; a question over a document's first pages; few-shot examples with images.

Each test runs on Idefics3, on SmolVLM, and on SmolVLM's model under Idefics3's processor classes.
transformers' SmolVLMProcessor needs torchvision and num2words; where they are missing (the development
environment) the SmolVLM checkpoint skips, and the third one runs SmolVLM's model classes (its vision
tower, its pixel shuffle by 4, its Llama text model) behind the same image rule and image text.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from PIL import Image

from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.schema import DOCUMENT_PAGE
from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, ResourceSpec, TaskSpec
from scriptorium.pipeline.crops_idefics3 import image_grid
from scriptorium.pipeline.model.tiny import build_tiny
from tests.conftest import job, make_image, make_pdf, plan_row, read_rows, run_stages
from tests.test_engine import assert_confidence_is_a_log_probability, assert_same_generation, both_engines
from tests.test_fidelity import MAX_NEW_TOKENS, load_reference, snippet_generate
from tests.test_multi_image import rendered_pages

TEMPLATE_START = {"idefics3": "<|begin_of_text|>User:<image>", "smolvlm": "<|im_start|>User:<image>"}
TASKS = [TaskSpec(kind="ocr", max_new_tokens=MAX_NEW_TOKENS),
         TaskSpec(kind="qa", questions=["What is written here?"], max_new_tokens=MAX_NEW_TOKENS)]


@pytest.fixture(scope="module", params=["idefics3", "smolvlm", "smolvlm-model"])
def checkpoint(request, tmp_path_factory):
    """(family, tiny checkpoint cutting at most 2 x 2 tiles: the real ones' 4 x 4 would be slow on CPU)."""
    family = request.param.removesuffix("-model")
    options = {"idefics3_processor": True} if request.param == "smolvlm-model" else {}
    if request.param == "smolvlm":
        pytest.importorskip("torchvision", reason="transformers' SmolVLMProcessor needs torchvision")
        pytest.importorskip("num2words", reason="transformers' SmolVLMProcessor needs num2words")
    tile = {"idefics3": 364, "smolvlm": 512}[family]
    path = build_tiny(tmp_path_factory.mktemp("models") / request.param, family=family, longest_edge=2 * tile, **options)
    return family, path


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> list:
    """A two-page PDF, a photo of odd size, a thumbnail (each 2 x 2 tiles), a banner (1 x 2) and a strip (2 x 1)."""
    folder = tmp_path_factory.mktemp("pages")
    return [make_pdf(folder / "letter.pdf", ["Dear reader,\nthe invoice is attached.", "Total due: 12.50"],
                     size=(612, 792)),
            make_image(folder / "photo.png", size=(517, 333), color=(200, 60, 40), text="a red photo"),
            make_image(folder / "banner.png", size=(1400, 90), color=(20, 90, 160), text="SALE"),
            make_image(folder / "thumb.png", size=(40, 30), color=(90, 160, 20), text="t"),
            make_image(folder / "strip.png", size=(90, 700), color=(240, 240, 200), text="receipt")]


def image_of(row: dict, pdf_pages: list[Image.Image]) -> Image.Image:
    """The page a row answers, as the snippet is given it: a PDF page as the pipeline renders it."""
    return pdf_pages[row["page"]] if row["source_uri"].endswith(".pdf") else Image.open(row["source_uri"])


def test_pages_of_different_grids_give_the_snippets_tokens(checkpoint, pages):
    family, model = checkpoint
    static, engine = both_engines(model, TASKS, [plan_row(p) for p in pages])

    assert len(static) == (2 + 4) * len(TASKS)
    processor = load_reference(str(model))[0]
    pdf_pages = rendered_pages(pages[0], processor)
    settings = ImageSettings.from_processor(processor)
    grids = {image_grid(image_of(r, pdf_pages).height, image_of(r, pdf_pages).width, settings) for r in static}
    assert grids == {(2, 2), (1, 2), (2, 1)}  # three prompts' ids: three batches
    for row in static:
        expected = snippet_generate(model, row["prompt"], [image_of(row, pdf_pages)])
        assert (row["text"], row["n_output_tokens"]) == expected, (row["source_uri"], row["page"], row["task"])
        assert row["prompt"].startswith(TEMPLATE_START[family])  # the family's chat template
    assert_same_generation(static, engine)
    assert_confidence_is_a_log_probability(engine)


def test_a_document_prompt_shows_its_pages_tiles_in_order(checkpoint, pages):
    _, model = checkpoint
    task = TaskSpec(kind="qa", name="about", scope="document", document_pages=2, questions=["Who is it for?"],
                    max_new_tokens=MAX_NEW_TOKENS)
    static, engine = both_engines(model, [task], [plan_row(pages[0])])

    [row] = static
    assert row["page"] == DOCUMENT_PAGE and row["status"] == "ok"
    assert row["prompt"].count("<image>") == 2
    first, second = rendered_pages(pages[0], load_reference(str(model))[0])
    assert (row["text"], row["n_output_tokens"]) == snippet_generate(model, row["prompt"], [first, second])
    assert (row["text"], row["n_output_tokens"]) != snippet_generate(model, row["prompt"], [second, first])
    assert_same_generation(static, engine)


def test_few_shot_example_images_come_first_with_their_own_grid(checkpoint, pages, tmp_path):
    _, model = checkpoint
    example = make_image(tmp_path / "example.png", size=(300, 700), color=(230, 230, 230), text="TOTAL 12.00")
    task = TaskSpec(kind="qa", questions=["What is the total?"], max_new_tokens=MAX_NEW_TOKENS,
                    examples=[{"image": str(example), "prompt": "What is the total?", "text": "12.00"}])
    static, engine = both_engines(model, [task], [plan_row(pages[1])])

    [row] = static
    assert row["prompt"].count("<image>") == 2 and "Assistant: 12.00<end_of_utterance>" in row["prompt"]
    images = [Image.open(example), Image.open(pages[1])]  # a 2 x 1 grid, then a 1 x 2 one
    assert (row["text"], row["n_output_tokens"]) == snippet_generate(model, row["prompt"], images)
    assert_same_generation(static, engine)


@pytest.mark.slow
def test_a_job_runs_through_scriptorium_run_and_the_processor(checkpoint, pages, ray_local, tmp_path):
    """The whole job on Ray, and the same stages as a Ray Data processor: the in-process rows."""
    family, model = checkpoint
    import ray

    from scriptorium.jobs.runner import run_job
    from scriptorium.pipeline.processor import build_processor

    task = [TASKS[0]]
    expected = run_stages(job(model, task), [plan_row(p) for p in pages])
    spec = JobSpec(run_id=family, input=InputSpec(uri=str(pages[0].parent)),
                   output=OutputSpec(uri=str(tmp_path / "out")), tasks=task,
                   model=ModelSpec(id=str(model), device="cpu", dtype="fp32"), resources=ResourceSpec(batch_size=2))
    run_job(spec)
    rows = sorted(read_rows(tmp_path / "out"), key=lambda r: (r["source_uri"], r["page"]))
    assert_same_generation(expected, rows)

    documents = ray.data.from_items([{"source_uri": str(p)} for p in pages])
    processed = build_processor(spec)(documents).take_all()
    assert_same_generation(expected, sorted(processed, key=lambda r: (r["source_uri"], r["page"])))


def test_a_base_prompt_and_an_extract_task_run_on_the_family(checkpoint, pages):
    """Plain prompts (a base checkpoint's), and an answer under its schema's grammar, typed."""
    _, model = checkpoint
    base = job(model, [TaskSpec(kind="ocr", max_new_tokens=MAX_NEW_TOKENS)]).updated(model={"prompt_format": "base"})
    [row] = run_stages(base, [plan_row(pages[1])])
    assert row["prompt"] == "<image>Transcription of the text on this page:"
    assert (row["text"], row["n_output_tokens"]) == snippet_generate(model, row["prompt"], [Image.open(pages[1])])

    schema = {"type": "object", "additionalProperties": False, "required": ["total", "paid"],
              "properties": {"total": {"type": "integer", "minimum": 0, "maximum": 99}, "paid": {"type": "boolean"}}}
    rows = run_stages(job(model, [TaskSpec(kind="extract", name="bill", schema=schema, max_new_tokens=60)]),
                      [plan_row(p) for p in pages[1:]])
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 3, [r["error"] for r in rows]  # random weights: only the grammar makes it JSON
    for row in ok:
        jsonschema.validate(json.loads(row["text"]), schema)
        assert row["extract_bill"] == json.loads(row["text"])


def test_a_processor_and_model_that_disagree_on_image_tokens_are_refused(checkpoint):
    import copy

    from scriptorium.pipeline.model.loading import check_image_tokens

    processor, model = load_reference(str(checkpoint[1]))
    check_image_tokens(processor, model)
    fewer = copy.deepcopy(processor)
    fewer.image_seq_len -= 1
    with pytest.raises(ValueError, match="image tokens a crop takes"):
        check_image_tokens(fewer, model)
    smaller = copy.deepcopy(processor)
    smaller.image_processor.max_image_size = {"longest_edge": 224}
    with pytest.raises(ValueError, match="tiles of 224 px"):
        check_image_tokens(smaller, model)


def test_a_prompt_beyond_the_models_context_is_an_error_row_that_says_what_to_change(checkpoint, pages):
    """Past its trained positions a model degrades without an error: a unit that would go there is not
    generated (the tiny checkpoints' text models take 8192 tokens, as Idefics3-8B's Llama 3 does)."""
    _, model = checkpoint
    document = TaskSpec(kind="qa", name="whole", scope="document", document_pages=2, questions=["Total?"],
                        max_new_tokens=7800)
    page = TaskSpec(kind="ocr", max_new_tokens=MAX_NEW_TOKENS)
    for rows in both_engines(model, [document, page], [plan_row(pages[0])]):
        by_task = {row["task"]: row for row in rows}
        assert {row["status"] for row in rows if row["task"] == "ocr"} == {"ok"}
        refused = by_task["whole"]
        assert (refused["status"], refused["stage"]) == ("error", "generate")
        assert "max_new_tokens is 7800: more than the model's context of 8192 tokens" in refused["error"]
        assert "(10 image crops)" in refused["error"]
