"""The foundation, end to end: a folder of PDFs and images -> `scriptorium run` -> Parquet.

These run the real command in a subprocess (its own local Ray, the tiny checkpoint from disk) and read
the output back with pyarrow, pandas and duckdb, as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.conftest import make_image, make_pdf, read_rows, run_cli

pytestmark = pytest.mark.slow

REQUIRED_COLUMNS = {
    "source_uri", "page", "task", "question", "prompt", "text", "status", "error", "model",
    "max_new_tokens", "n_input_tokens", "n_output_tokens", "width", "height",
}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Two multi-page PDFs, a PNG, a JPEG, a WebP, a TIFF, in nested folders, and one corrupt PDF."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "letters").mkdir()
    make_pdf(root / "report.pdf", ["Page one of the report.", "Page two.", "Page three, the last."])
    make_pdf(root / "letters" / "letter.pdf", ["Dear reader,", "Yours sincerely."], size=(842, 595))
    make_image(root / "receipt.png", size=(400, 300))
    make_image(root / "letters" / "photo.jpg", size=(640, 480))
    make_image(root / "scan.webp", size=(300, 500))
    make_image(root / "scan.tiff", size=(500, 700))
    (root / "broken.pdf").write_bytes(b"%PDF-1.7\n this is not really a pdf \x00\xff" * 10)
    return root


@pytest.fixture(scope="module")
def finished_run(mixed_folder, tiny_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "results"
    proc = run_cli(
        "run", "--input", str(mixed_folder), "--output", str(output), "--task", "ocr",
        "--model", str(tiny_model), "--max-new-tokens", "8", "--device", "cpu",
    )
    return proc, output


def test_run_exits_zero_even_with_a_corrupt_input(finished_run):
    proc, _ = finished_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows written" in proc.stdout


def test_exactly_one_ok_row_per_page_and_image(finished_run, mixed_folder):
    _, output = finished_run
    table = pads.dataset(str(output), format="parquet").to_table()
    assert REQUIRED_COLUMNS <= set(table.column_names)
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    keys = sorted((Path(r["source_uri"]).name, r["page"]) for r in ok)
    assert keys == sorted(
        [("report.pdf", 0), ("report.pdf", 1), ("report.pdf", 2), ("letter.pdf", 0), ("letter.pdf", 1),
         ("receipt.png", 0), ("photo.jpg", 0), ("scan.webp", 0), ("scan.tiff", 0)]
    )
    for row in ok:
        assert row["task"] == "ocr" and row["error"] is None
        assert row["max_new_tokens"] == 8 and 1 <= row["n_output_tokens"] <= 8
        assert row["n_input_tokens"] > 64  # 64 image tokens plus the prompt
        assert row["prompt"].startswith("User:<image>") and row["prompt"].endswith("<end_of_utterance>\nAssistant:")
        assert isinstance(row["text"], str)
        assert row["width"] > 0 and row["height"] > 0


def test_corrupt_file_is_an_error_row_with_a_reason(finished_run):
    _, output = finished_run
    rows = read_rows(output)
    broken = [r for r in rows if r["source_uri"].endswith("broken.pdf")]
    assert len(broken) == 1
    assert broken[0]["status"] == "error"
    assert "PDF" in broken[0]["error"] and broken[0]["stage"] == "render"
    assert broken[0]["text"] is None


def test_output_folder_reads_as_one_dataset_with_other_readers(finished_run):
    duckdb = pytest.importorskip("duckdb")
    pandas = pytest.importorskip("pandas")
    _, output = finished_run
    # Anything that is not a finished Parquet file is hidden by a leading "_" or ".".
    for path in output.rglob("*"):
        if path.is_file() and not path.name.endswith(".parquet"):
            assert any(part.startswith(("_", ".")) for part in path.relative_to(output).parts), path
    frame = pandas.read_parquet(output)
    counted = duckdb.sql(f"SELECT count(*) FROM read_parquet('{output}/*.parquet')").fetchall()[0][0]
    assert len(frame) == counted == 10


def test_job_file_gives_the_same_settings_as_flags(mixed_folder, tiny_model, tmp_path):
    single = mixed_folder / "receipt.png"
    output = tmp_path / "from-job"
    job = tmp_path / "job.toml"
    job.write_text(
        f'run_id = "from-toml"\n[input]\nuri = "{single}"\n[output]\nuri = "{output}"\n'
        f'[model]\nid = "{tiny_model}"\ndevice = "cpu"\n'
        '[[tasks]]\nkind = "qa"\nquestions = ["What is the total?"]\nmax_new_tokens = 5\n'
    )
    proc = run_cli("run", "--job", str(job), "--max-new-tokens", "3")  # the flag overrides the file
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(output)
    assert [(r["task"], r["question"], r["max_new_tokens"], r["run_id"]) for r in rows] == [
        ("qa", "What is the total?", 3, "from-toml")
    ]
    assert "What is the total?<end_of_utterance>" in rows[0]["prompt"]


def test_missing_model_is_a_job_error_not_a_traceback(mixed_folder, tmp_path):
    proc = run_cli("run", "--input", str(mixed_folder), "--output", str(tmp_path / "o"), "--task", "ocr",
                   "--model", str(tmp_path / "no-such-model"))
    assert proc.returncode == 2
    assert "no-such-model" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.parquet"))


def test_tiny_model_command_builds_a_loadable_checkpoint(tmp_path):
    proc = run_cli("tiny-model", str(tmp_path / "tiny"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert saved["model_type"] == "idefics2"
    assert saved["perceiver_config"]["resampler_n_latents"] == 64
