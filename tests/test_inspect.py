"""`scriptorium inspect` on a mixed folder: documents, pages, bytes and types as a run would see them,
the files a run would turn into error rows (and why), and the GPU-hour estimate, without any model; and
the job's model as inspect tells it without loading it: its family, a typical page's image tokens, and
no GPU-hours from Idefics2's measured pages/s for another family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_image, make_pdf


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    import pymupdf
    from PIL import Image

    root = tmp_path_factory.mktemp("inspect-in")
    (root / "letters").mkdir()
    make_pdf(root / "report.pdf", ["One.", "Two.", "Three."])
    make_pdf(root / "letters" / "letter.pdf", ["Dear reader,"])
    make_image(root / "receipt.png")
    make_image(root / "letters" / "photo.jpg")
    frames = [Image.new("RGB", (120, 160), color) for color in ("white", "gray")]
    frames[0].save(root / "scan.tiff", save_all=True, append_images=frames[1:])
    (root / "broken.pdf").write_bytes(b"%PDF-1.7 this is not a pdf")
    locked = pymupdf.open()
    locked.new_page()
    locked.save(str(root / "locked.pdf"), encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="secret", owner_pw="owner")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not a document")
    make_pdf(root / "_draft.pdf", ["hidden files are not inputs"])
    return root


def inspect(*args: str, capsys) -> tuple[int, str, str]:
    from scriptorium.jobs.cli import main

    code = main(["inspect", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_counts_what_a_run_would_process(mixed_folder, capsys):
    code, out, _ = inspect(str(mixed_folder), "--json", capsys=capsys)
    assert code == 0
    report = json.loads(out)
    assert report["documents"] == 9  # _draft.pdf is hidden, as in a run
    assert report["pages"] == 3 + 1 + 1 + 1 + 2  # PDFs, PNG, JPEG, both TIFF frames
    assert report["bytes"] == sum(p.stat().st_size for p in mixed_folder.rglob("*") if p.is_file() and p.name != "_draft.pdf")
    assert report["by_type"][".pdf"] == {
        "documents": 4, "pages": 4, "unreadable": 2,
        "bytes": sum(p.stat().st_size for p in mixed_folder.rglob("*.pdf") if p.name != "_draft.pdf"),
    }
    assert report["by_type"][".tiff"]["pages"] == 2
    reasons = {Path(f["source_uri"]).name: f["reason"] for f in report["unreadable_files"]}
    assert set(reasons) == {"broken.pdf", "locked.pdf", "empty.png", "notes.txt"}
    assert reasons["locked.pdf"] == "PDF is encrypted with a user password"
    assert reasons["broken.pdf"].startswith("cannot open PDF")
    assert reasons["empty.png"] == "file is empty (0 bytes)"
    assert reasons["notes.txt"].startswith("unsupported file type")


def test_estimate_uses_the_jobs_tasks_resources_and_price(mixed_folder, tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(
        f'[input]\nuri = "{mixed_folder}"\nexclude = ["*.tiff"]\n'
        '[model]\nid = "/no/such/model"\n'  # never loaded: inspect needs no model
        '[resources]\nnum_replicas = 4\ngpus_per_replica = 1\ngpu_price_per_hour = 2.5\n'
        '[[tasks]]\nkind = "ocr"\n[[tasks]]\nkind = "qa"\nquestions = ["Title?", "Date?"]\n'
    )
    code, out, _ = inspect("--job", str(job), "--pages-per-second", "0.25", "--json", capsys=capsys)
    assert code == 0
    report = json.loads(out)
    assert report["pages"] == 6 and ".tiff" not in report["by_type"]
    estimate = report["estimate"]
    assert estimate["pages_per_second_from"] == "--pages-per-second"
    assert estimate["units_per_page"] == 3  # OCR + two questions
    gpu_hours = 6 * 3 / 0.25 / 3600
    assert estimate["gpu_hours"] == pytest.approx(gpu_hours, abs=1e-4)
    assert estimate["wall_hours"] == pytest.approx(gpu_hours / 4, abs=1e-4)
    assert estimate["cost"] == pytest.approx(gpu_hours * 2.5, abs=0.01)


def test_text_output_lists_types_unreadable_files_and_the_estimate(mixed_folder, capsys):
    code, out, _ = inspect(str(mixed_folder), capsys=capsys)
    assert code == 0
    assert out.startswith(f"input {mixed_folder}: 9 documents, 8 pages,")
    assert "locked.pdf: PDF is encrypted with a user password" in out
    assert "GPU-hours" in out and "--pages-per-second" in out
    code, out, _ = inspect(str(mixed_folder), "--files", capsys=capsys)
    assert "report.pdf" in out and "3 pages" in out


@pytest.fixture(scope="module")
def pdf_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect-pdfs")
    make_pdf(root / "letter.pdf", ["One.", "Two."], size=(612, 792))
    make_pdf(root / "a4.pdf", ["Three."], size=(595, 842))
    return root


@pytest.fixture(scope="module")
def tiny_idefics3(tmp_path_factory) -> Path:
    from scriptorium.pipeline.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny-idefics3", family="idefics3")


def test_a_local_idefics3_checkpoint_is_told_by_its_config_and_gets_no_idefics2_estimate(pdf_folder, tiny_idefics3,
                                                                                          capsys):
    code, out, _ = inspect(str(pdf_folder), "--model", str(tiny_idefics3), "--json", capsys=capsys)
    assert code == 0
    report = json.loads(out)
    model = report["model"]
    assert (model["family"], model["family_from"], model["settings_from"]) == ("idefics3", "config.json",
                                                                               "processor files")
    # Idefics3-8B's settings: pages at 1456 px, 364 px tiles of 169 image tokens, plus the global image.
    # A Letter page is 4 x 4 tiles + 1, an A4 page (narrower) 4 x 3 + 1.
    assert model["pages"]["letter"] == {"width": 1125, "height": 1456, "crops": 17, "image_tokens": 17 * 169,
                                        "prompt_image_tokens": 17 * 169 + 2 * 16 + 5 + 3}
    assert model["pages"]["a4"]["crops"] == 13 and model["pages"]["a4"]["image_tokens"] == 13 * 169
    estimate = report["estimate"]
    assert report["pages"] == 3 and estimate["gpu_hours"] is None and estimate["cost"] is None
    assert estimate["pages_per_second_from"].startswith("not measured for idefics3")

    code, out, _ = inspect(str(pdf_folder), "--model", str(tiny_idefics3), "--pages-per-second", "0.5",
                           "--no-image-splitting", "--json", capsys=capsys)
    report = json.loads(out)
    assert report["estimate"]["gpu_hours"] == pytest.approx(3 / 0.5 / 3600, abs=1e-4)  # a pilot's figure: any family
    assert report["model"]["splitting_from"] == "job"
    assert report["model"]["pages"]["letter"]["image_tokens"] == 169  # one square tile, no global image


@pytest.mark.parametrize("family,build", [("idefics3", {}), ("idefics2", {"do_image_splitting": True})])
def test_image_tokens_per_page_are_what_the_checkpoints_processor_makes(family, build, tmp_path):
    """The arithmetic against the real thing: the tiny checkpoint's own processor, given an image of the size
    a Letter page renders at, writes exactly that many <image> tokens, and that many tokens in all for the
    image (the text that follows starts on a new line: Idefics2's processor puts a space before other text)."""
    from PIL import Image
    from transformers import AutoProcessor

    from scriptorium.core.spec import JobSpec
    from scriptorium.jobs.inspect_input import model_plan
    from scriptorium.pipeline.model.tiny import build_tiny

    path = build_tiny(tmp_path / family, family=family, **build)
    page = model_plan(JobSpec().updated(model={"id": str(path)}))["pages"]["letter"]
    processor = AutoProcessor.from_pretrained(path)
    text_only = len(processor(text=["\nDescribe."])["input_ids"][0])
    image = Image.new("RGB", (page["width"], page["height"]), "white")
    ids = processor(text=["<image>\nDescribe."], images=[[image]])["input_ids"][0]
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == page["image_tokens"]
    assert len(ids) - text_only == page["prompt_image_tokens"]


@pytest.mark.parametrize("model_id,family,letter,a4", [
    ("HuggingFaceTB/SmolVLM-256M-Instruct", "smolvlm", 17 * 64, 13 * 64),  # 512 px tiles at 2048 px
    ("HuggingFaceTB/SmolVLM2-500M-Video-Instruct", "smolvlm", 17 * 64, 13 * 64),
    ("HuggingFaceTB/SmolVLM-Instruct", "smolvlm", 17 * 81, 13 * 81),  # the 2.2B: 384 px tiles at 1536 px
    ("HuggingFaceM4/Idefics3-8B-Llama3", "idefics3", 17 * 169, 13 * 169),
])
def test_a_hub_id_is_told_by_its_name_and_the_published_settings(pdf_folder, model_id, family, letter, a4, capsys):
    code, out, _ = inspect(str(pdf_folder), "--model", model_id, "--json", capsys=capsys)  # offline: no download
    assert code == 0
    model = json.loads(out)["model"]
    assert (model["family"], model["family_from"]) == (family, "hub id")
    assert model["settings_from"] == "published checkpoint"
    assert (model["pages"]["letter"]["image_tokens"], model["pages"]["a4"]["image_tokens"]) == (letter, a4)
    assert json.loads(out)["estimate"]["gpu_hours"] is None


def test_only_idefics2_is_estimated_at_the_measured_default(pdf_folder, capsys):
    from scriptorium.jobs.inspect_input import DEFAULT_PAGES_PER_SECOND

    code, out, _ = inspect(str(pdf_folder), "--model", "HuggingFaceM4/idefics2-8b", "--json", capsys=capsys)
    assert code == 0
    report = json.loads(out)
    assert report["model"]["pages"]["letter"]["image_tokens"] == 5 * 64  # four quadrants and the whole page
    assert report["estimate"]["pages_per_second_per_gpu"] == DEFAULT_PAGES_PER_SECOND
    assert report["estimate"]["gpu_hours"] == pytest.approx(3 / DEFAULT_PAGES_PER_SECOND / 3600, abs=1e-4)


def test_text_output_names_the_family_and_why_there_are_no_gpu_hours(pdf_folder, capsys):
    code, out, _ = inspect(str(pdf_folder), "--model", "HuggingFaceTB/SmolVLM-256M-Instruct", capsys=capsys)
    assert code == 0
    assert "model HuggingFaceTB/SmolVLM-256M-Instruct: smolvlm (from its hub id)" in out
    assert "Letter page: 1583x2048 px, 17 crop(s), 1088 image tokens" in out
    assert "GPU-hours not estimated: pages/s not measured for smolvlm" in out and "--pages-per-second" in out
    code, out, _ = inspect(str(pdf_folder), "--model", "someone/llava-13b", capsys=capsys)
    assert "model someone/llava-13b: family unknown: its hub id names none of idefics2, idefics3, smolvlm" in out
    assert "GPU-hours not estimated: pages/s not measured for an unknown model" in out


def test_inspect_of_a_missing_input_is_one_line(tmp_path, capsys):
    code, out, err = inspect(str(tmp_path / "nowhere"), capsys=capsys)
    assert code == 2 and out == ""
    assert err.strip() == f"scriptorium: error: input {tmp_path / 'nowhere'} does not exist"


@pytest.mark.slow
def test_inspect_an_s3_prefix(s3_server, mixed_folder, capsys):
    bucket = s3_server.new_bucket("inspect")
    for name in ("report.pdf", "receipt.png", "scan.tiff", "broken.pdf"):
        s3_server.put(bucket, f"scans/{name}", mixed_folder / name)
    code, out, err = inspect(f"s3://{bucket}/scans/", "--endpoint-url", s3_server.endpoint, "--json", capsys=capsys)
    assert code == 0, err
    report = json.loads(out)
    assert (report["documents"], report["pages"], report["unreadable"]) == (4, 3 + 1 + 2, 1)
    assert report["unreadable_files"][0]["source_uri"] == f"s3://{bucket}/scans/broken.pdf"
