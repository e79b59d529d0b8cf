"""Fidelity: what the pipeline generates equals the model card's snippet, token for token.

The snippet (https://huggingface.co/HuggingFaceM4/idefics2-8b): processor(text=prompt, images=[images]),
then model.generate greedy, batch of one. The pipeline instead renders, preprocesses to uint8 crops on
CPU workers, ships them compressed, collates batches of several pages of different shapes in the actor
and generates them together. On CPU in fp32 both must give the same tokens for every row: images, PDF
pages (for the snippet, the page rendered at the size its row reports), scans, and document rows whose
prompt shows several pages.

The tiny checkpoint is image-sensitive (tests/test_tiny_model.py), so these comparisons would catch a
batch that handed one page's crops to another page's prompt: `test_a_mix_up_inside_a_batch_is_caught`
makes that mistake on purpose and shows it.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from scriptorium.core.pixels import page_image
from scriptorium.core.schema import DOCUMENT_PAGE
from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, RenderSpec, ResourceSpec, StorageSpec, TaskSpec
from scriptorium.jobs.runner import run_job
from scriptorium.pipeline.render.stage import pages_of
from scriptorium.pipeline.stages import derive, job_stages, stage_named
from tests.conftest import job, make_image, make_pdf, make_scan_pdf, plan_row, preprocessed, read_rows

MAX_NEW_TOKENS = 12
DOCUMENT_PAGES = 2
TASKS = [
    TaskSpec(kind="caption", max_new_tokens=MAX_NEW_TOKENS),
    TaskSpec(kind="qa", questions=["What is written here?"], max_new_tokens=MAX_NEW_TOKENS),
    TaskSpec(kind="qa", name="about", scope="document", document_pages=DOCUMENT_PAGES,
             questions=["What is this document?"], max_new_tokens=MAX_NEW_TOKENS),
]


@functools.lru_cache(maxsize=2)
def load_reference(model_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path, backend="pil")
    return processor, AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()


_snippets: dict = {}


def snippet_generate(model_path, prompt: str, images: list[Image.Image]) -> tuple[str, int]:
    """The model card's snippet, batch of one: (text, number of new tokens)."""
    key = (str(model_path), prompt, tuple(hashlib.sha1(i.tobytes()).hexdigest() + str(i.size) for i in images))
    if key not in _snippets:
        processor, model = load_reference(model_path)
        inputs = processor(text=prompt, images=[images], return_tensors="pt")
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new_tokens = generated[0, inputs["input_ids"].shape[1]:]
        _snippets[key] = (processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), len(new_tokens))
    return _snippets[key]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Images of several sizes and formats, a born-digital PDF of three pages and a low-resolution scan."""
    folder = tmp_path_factory.mktemp("mixed")
    sizes = [(400, 300), (300, 520), (1200, 900), (90, 700)]
    for i, size in enumerate(sizes):
        suffix = "jpg" if i == 2 else "png"
        make_image(folder / f"img{i}.{suffix}", size=size, color=(40 * i, 200 - 30 * i, 90), text=f"image {i}")
    make_pdf(folder / "report.pdf", ["Annual report\nTitle page", "Revenue grew by 12 percent.", "Appendix"],
             size=(612, 792))
    make_scan_pdf(folder / "scan.pdf", dpi=60, text="A scanned letter")  # 510 x 660: rendered as it is
    return folder


def rendered_page(source: str, page: int, width: int, height: int) -> Image.Image:
    """A PDF page rendered at the size its row reports (the pipeline's own renderer). Even edges: the page
    was rendered for splitting, its short edge rounded to an even number (pipeline/render/size.py)."""
    render = RenderSpec(page_edge=max(width, height), scans_at_own_resolution=False)
    if width % 2 == height % 2 == 0:
        render = render.with_halvable_pages()
    row = next(r for r in pages_of(plan_row(Path(source)), render, StorageSpec()) if r["page"] == page)
    assert (row["width"], row["height"]) == (width, height)
    return Image.fromarray(page_image(row))


def row_images(row: dict, sizes: dict) -> list[Image.Image]:
    """The images a row's prompt shows, as the snippet is given them."""
    pages = range(DOCUMENT_PAGES) if row["page"] == DOCUMENT_PAGE else [row["page"]]
    if row["source_uri"].endswith(".pdf"):
        return [rendered_page(row["source_uri"], p, *sizes[(row["source_uri"], p)])
                for p in pages if (row["source_uri"], p) in sizes]
    return [Image.open(row["source_uri"])]


@pytest.fixture(scope="module", params=["tiny_model", "tiny_model_split"])
def pipeline_run(request, mixed_folder, ray_local, tmp_path_factory):
    """(checkpoint, result rows, page sizes) of one run over the mixed folder, in batches of 4."""
    model_path = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("out") / "results"
    spec = JobSpec(
        run_id="fidelity",
        input=InputSpec(uri=str(mixed_folder)),
        output=OutputSpec(uri=str(out)),
        model=ModelSpec(id=str(model_path), device="cpu", dtype="fp32"),
        tasks=TASKS,
        resources=ResourceSpec(batch_size=4),  # several differently sized pages share a batch
    )
    run_job(spec)
    rows = read_rows(out)
    sizes = {(r["source_uri"], r["page"]): (r["width"], r["height"]) for r in rows if r["page"] != DOCUMENT_PAGE}
    return model_path, rows, sizes


@pytest.mark.slow
def test_pipeline_tokens_equal_the_model_card_snippet(pipeline_run):
    model_path, rows, sizes = pipeline_run
    n_pages, n_documents = 4 + 3 + 1, 4 + 2
    assert len(rows) == 2 * n_pages + n_documents and all(r["status"] == "ok" for r in rows)
    for row in rows:
        images = row_images(row, sizes)
        assert len(images) == row["prompt"].count("<image>")
        assert (row["text"], row["n_output_tokens"]) == snippet_generate(model_path, row["prompt"], images), \
            (row["source_uri"], row["page"], row["task"])


@pytest.mark.slow
def test_pdf_pages_are_rendered_at_what_the_model_can_use(pipeline_run, mixed_folder):
    model_path, _, sizes = pipeline_run
    split = load_reference(model_path)[0].image_processor.do_image_splitting
    report = str(mixed_folder / "report.pdf")
    assert max(sizes[(report, 0)]) == (1960 if split else 980)
    assert sizes[(str(mixed_folder / "scan.pdf"), 0)] == (510, 660)  # never upscaled


@pytest.mark.slow
def test_rows_sharing_a_prompt_would_tell_their_images_apart(pipeline_run):
    """Rows that share a prompt are the ones batched together. Their snippets all differ, so a row given
    a batch neighbour's image would produce that neighbour's snippet, not its own, and fail above."""
    model_path, rows, sizes = pipeline_run
    by_prompt: dict[str, list] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append(snippet_generate(model_path, row["prompt"], row_images(row, sizes)))
    for prompt, outputs in by_prompt.items():
        assert len(set(outputs)) == len(outputs), (prompt, outputs)


def test_a_mix_up_inside_a_batch_is_caught(tiny_model, tmp_path, monkeypatch):
    """A deliberately wrong collation (each sequence gets its batch neighbour's crops) fails the
    comparison: every row then reads like the snippet of the image it was wrongly handed."""
    from scriptorium.pipeline.model import features, stage

    paths = [make_image(tmp_path / f"page{i}.png", size=size, color=color, text=f"page {i}")
             for i, (size, color) in enumerate([((400, 300), (200, 40, 40)), ((300, 520), (40, 200, 40)),
                                                ((640, 480), (40, 40, 200))])]
    encode_crops = stage.encode_crops

    def shifted(model, crops_per_sequence, *args):
        return encode_crops(model, crops_per_sequence[1:] + crops_per_sequence[:1], *args)

    # Both ways crops reach the vision tower: ahead of their batch (the vision stream), and in it.
    monkeypatch.setattr(features, "encode_crops", shifted)
    monkeypatch.setattr(stage, "encode_crops", shifted)
    # The three pages in one block to the model stage, as Ray Data hands a replica one batch of pages.
    spec = job(tiny_model, [TASKS[0]])
    model_stage = stage_named(job_stages(spec, derive(spec)), "generate")
    answer = model_stage.step(**model_stage.kwargs)
    rows = pa.concat_tables(answer(preprocessed(spec, [plan_row(p) for p in paths]))).to_pylist()

    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    ours = {r["source_uri"]: (r["text"], r["n_output_tokens"]) for r in rows}
    snippets = {str(p): snippet_generate(tiny_model, rows[0]["prompt"], [Image.open(p)]) for p in paths}
    assert all(ours[source] != snippets[source] for source in ours)  # the comparison fails for every row
    assert sorted(ours.values()) == sorted(snippets.values())  # each row got one of the other pages' images
