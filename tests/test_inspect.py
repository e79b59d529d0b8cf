"""`scriptorium inspect` on a mixed folder: documents, pages, bytes and types as a run would see them,
the files a run would turn into error rows (and why), and the GPU-hour estimate, without any model."""

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
