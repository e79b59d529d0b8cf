"""Run summaries against a known run: the counts, pages and tokens in `_runs/<id>/summary.json` are the
ones the published Parquet rows hold, a resumed run adds nothing, `scriptorium summary` prints them again,
and the GPU-hour and cost arithmetic is the one docs/operations.md states."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import make_image, make_pdf, read_rows


@pytest.fixture(scope="module")
def known_run(tmp_path_factory, tiny_model, ray_local):
    """Two PDFs (3 pages), an image, a corrupt PDF and a text file; OCR plus QA with two questions."""
    from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, ResourceSpec, TaskSpec
    from scriptorium.jobs.runner import run_job

    inputs = tmp_path_factory.mktemp("summary-in")
    make_pdf(inputs / "report.pdf", ["First page.", "Second page."])
    make_pdf(inputs / "memo.pdf", ["A memo."])
    make_image(inputs / "receipt.png", size=(240, 320))
    (inputs / "broken.pdf").write_bytes(b"%PDF-1.7 truncated")
    (inputs / "notes.txt").write_text("not a document")
    output = tmp_path_factory.mktemp("summary-out") / "results"

    def spec(run_id):
        return JobSpec(run_id=run_id, input=InputSpec(uri=str(inputs)), output=OutputSpec(uri=str(output)),
                       model=ModelSpec(id=str(tiny_model), device="cpu"),
                       tasks=[TaskSpec(kind="ocr", max_new_tokens=6),
                              TaskSpec(kind="qa", questions=["What is the title?", "Who wrote it?"], max_new_tokens=3)],
                       resources=ResourceSpec(gpu_price_per_hour=3.0))

    progress_lines: list[str] = []  # not on a terminal, progress is logged: keep those lines
    handler = logging.Handler()
    handler.emit = lambda record: progress_lines.append(record.getMessage())
    progress_log = logging.getLogger("scriptorium.progress")
    progress_log.addHandler(handler)
    level, progress_log.level = progress_log.level, logging.INFO
    try:
        first = run_job(spec("first"))
    finally:
        progress_log.removeHandler(handler)
        progress_log.setLevel(level)
    second = run_job(spec("second"))  # everything is done: a resume that writes nothing
    rows = read_rows(output)
    return {"output": output, "first": first, "second": second, "rows": rows, "spec": spec("first"),
            "progress_lines": progress_lines}


@pytest.mark.slow
def test_run_summary_matches_the_published_rows(known_run):
    rows, output = known_run["rows"], known_run["output"]
    saved = json.loads((output / "_runs" / "first" / "summary.json").read_text())
    assert saved == known_run["first"].summary["run"]

    assert saved["rows"]["total"] == len(rows) == 6 * 3  # 6 pages (3 PDF pages, an image, 2 bad files) x 3 units
    assert saved["rows"]["by_status"] == dict(Counter(r["status"] for r in rows))
    assert saved["rows"]["by_task"] == dict(Counter(r["task"] for r in rows))
    assert saved["rows"]["truncated"] == sum(bool(r["truncated"]) for r in rows)
    assert saved["tokens"] == {"input": sum(r["n_input_tokens"] or 0 for r in rows),
                               "output": sum(r["n_output_tokens"] or 0 for r in rows)}
    assert saved["tokens"]["output"] > 0
    pages = {(r["source_uri"], r["page"]) for r in rows}
    failed_pages = {(r["source_uri"], r["page"]) for r in rows if r["status"] == "error"}
    assert saved["pages"] == {"total": len(pages), "ok": len(pages - failed_pages), "error": len(failed_pages)}
    assert saved["documents"] == {"total": 5, "with_errors": 2}
    assert saved["inputs"] == {"planned": 5, "skipped_complete": 0}
    # Each bad file gives one error row per task unit, grouped by stage and a reason without file names.
    stage = {Path(r["source_uri"]).name: r["stage"] for r in rows if r["status"] == "error"}
    assert saved["errors_by_reason"] == {f"{stage['broken.pdf']}: cannot open PDF": 3,
                                         f"{stage['notes.txt']}: unsupported file type": 3}
    assert saved["throughput"]["pages_per_s"] == pytest.approx(len(pages) / saved["wall_s"], rel=1e-3)
    assert saved["gpu"]["gpu_hours"] == 0 and saved["gpu"]["cost"] is None  # a CPU run holds no GPUs


@pytest.mark.slow
def test_a_resume_that_finds_everything_done_counts_nothing_new(known_run):
    second = known_run["second"].summary
    assert second["run"]["rows"]["total"] == 0
    assert second["run"]["inputs"]["skipped_complete"] == 5
    # The output view still sees every row, and both runs.
    assert second["output"]["rows"]["total"] == len(known_run["rows"])
    assert second["output"]["runs"] == ["first", "second"]
    assert second["output"]["tokens"] == known_run["first"].summary["run"]["tokens"]


@pytest.mark.slow
def test_progress_was_logged_while_running(known_run):
    lines = known_run["progress_lines"]
    assert lines[0].startswith("progress: docs 0/5 | pages 0 |")
    assert lines[-1].startswith("progress: docs 5/5 (2 failed) | pages 6 (2 failed) |") and "ETA 0:00" in lines[-1]


@pytest.mark.slow
def test_gpu_hours_and_cost_per_million_pages(known_run):
    """The same published rows, summarized as if the run had held 2 replicas x 1 GPU for 1.5 hours."""
    from scriptorium.connectors.parquet_sink import ParquetStore
    from scriptorium.jobs.summary import build_run_summary

    result = known_run["first"]
    spec = known_run["spec"].updated(resources={"num_replicas": 2})
    as_if = type(result)(**{**result.__dict__, "wall_s": 5400.0})
    summary = build_run_summary(ParquetStore(str(known_run["output"])), spec, as_if, gpus_per_replica=1.0)
    pages = summary["pages"]["total"]
    assert summary["gpu"]["gpu_hours"] == pytest.approx(3.0)  # 2 x 1 x 1.5 h
    assert summary["gpu"]["cost"] == pytest.approx(9.0)  # at 3.0 per GPU-hour
    assert summary["gpu"]["cost_per_million_pages"] == pytest.approx(9.0 / pages * 1e6, rel=1e-4)


@pytest.mark.slow
def test_summary_command_prints_the_latest_run_and_the_output(known_run, capsys):
    from scriptorium.jobs.cli import main

    assert main(["summary", str(known_run["output"])]) == 0
    text = capsys.readouterr().out
    assert text.startswith("run second ")
    assert ": cannot open PDF" in text and f"output {known_run['output']}" in text

    assert main(["summary", str(known_run["output"]), "--run-id", "first", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["run"] == known_run["first"].summary["run"]
    assert printed["output"]["rows"] == known_run["second"].summary["output"]["rows"]

    assert main(["summary", str(known_run["output"]), "--run-id", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_error_reasons_group_errors_that_differ_only_in_details():
    from scriptorium.jobs.tally import error_reason

    assert error_reason("render", "rendering page 3 took longer than 60 s") == "render: rendering page N took longer than N s"
    assert error_reason("read", "cannot read: no such object: s3://b/x.pdf") == "read: cannot read"
    assert error_reason("generate", "generate failed: OutOfMemoryError: CUDA out of memory. Tried 2 GiB") == \
        "generate: generate failed: OutOfMemoryError"
    assert error_reason(None, None) == "unknown: unknown error"


def test_progress_line_counts_pages_documents_and_rates():
    import pyarrow as pa

    from scriptorium.jobs.progress import Progress

    now = [100.0]
    progress = Progress(documents=3, skipped_documents=1, done_pages={"b.pdf": 1}, live=False, clock=lambda: now[0])

    def batch(*rows):
        names = ["source_uri", "page", "n_pages", "status", "n_input_tokens", "n_output_tokens"]
        return pa.Table.from_pylist([dict(zip(names, r)) for r in rows])

    now[0] = 110.0
    progress.update(batch(("a.pdf", 0, 2, "ok", 50, 10), ("a.pdf", 1, 2, "error", None, None)))
    assert (progress.docs_done, progress.docs_failed, progress.pages_done, progress.pages_failed) == (1, 1, 2, 1)
    progress.update(batch(("b.pdf", 1, 2, "ok", 50, 30)))  # page 0 was done by an earlier run
    assert (progress.docs_done, progress.docs_failed, progress.pages_done, progress.pages_failed) == (2, 1, 3, 1)
    # Another task's rows for pages already counted arrive later: no page or document is counted twice,
    # but a late error does fail its page (and a document that had none yet).
    progress.update(batch(("a.pdf", 0, 2, "ok", 50, 10), ("b.pdf", 1, 2, "error", None, None)))
    assert (progress.docs_done, progress.docs_failed, progress.pages_done, progress.pages_failed) == (2, 2, 3, 2)
    assert progress.line() == "docs 2/3 (2 failed, 1 skipped) | pages 3 (2 failed) | 0.30 pages/s | 5.0 tok/s | ETA 0:05 | 0:10"


def test_progress_redraws_one_line_on_a_terminal():
    import io

    import pyarrow as pa

    from scriptorium.jobs.progress import Progress

    stream, now = io.StringIO(), [0.0]
    with Progress(documents=2, stream=stream, live=True, clock=lambda: now[0]) as progress:
        for second, source in ((1.0, "a.png"), (2.0, "b.png")):
            now[0] = second
            progress.update(pa.Table.from_pylist([{"source_uri": source, "page": 0, "n_pages": 1, "status": "ok",
                                                   "n_input_tokens": 1, "n_output_tokens": 4}]))
    drawn = stream.getvalue()
    assert drawn.count("\r\x1b[K") == 4 and drawn.endswith("\n") and drawn.count("\n") == 1
    assert drawn.rstrip("\n").rsplit("\r\x1b[K", 1)[1].startswith("docs 2/2 | pages 2 | 1.00 pages/s")


def test_whole_document_rows_count_for_documents_but_not_as_pages():
    from scriptorium.core.schema import DOCUMENT_PAGE, RESULT_SCHEMA, table_from_rows
    from scriptorium.jobs.tally import SUMMARY_COLUMNS, RowTally

    rows = [
        {"source_uri": "a.pdf", "page": 0, "task": "ocr", "status": "ok", "n_output_tokens": 5, "truncated": False},
        {"source_uri": "a.pdf", "page": 1, "task": "ocr", "status": "ok", "n_output_tokens": 7, "truncated": True},
        {"source_uri": "a.pdf", "page": DOCUMENT_PAGE, "task": "summary", "status": "error", "stage": "generate",
         "error": "generate failed: OutOfMemoryError: CUDA out of memory"},
    ]
    tally = RowTally()
    tally.add(table_from_rows(rows, RESULT_SCHEMA).select(SUMMARY_COLUMNS))
    counts = tally.as_dict()
    assert counts["pages"] == {"total": 2, "ok": 2, "error": 0}
    assert counts["documents"] == {"total": 1, "with_errors": 1}
    assert counts["rows"]["truncated"] == 1 and counts["tokens"]["output"] == 12
    assert counts["errors_by_reason"] == {"generate: generate failed: OutOfMemoryError": 1}


@pytest.mark.slow
def test_attempts_of_one_run_id_add_up_in_its_summary(known_run, tmp_path):
    """The known run's rows summarized as two attempts of one run id, as if the first held 2 GPUs for
    1.5 hours and the resumed one for half an hour: wall time, GPU-hours and cost are the sums, and each
    attempt keeps its own figures."""
    import shutil

    from scriptorium.connectors.parquet_sink import ParquetStore
    from scriptorium.jobs.summary_files import write_run_summary
    from scriptorium.jobs.summary_text import format_summary

    output = tmp_path / "copy"
    shutil.copytree(known_run["output"], output)
    shutil.rmtree(output / "_runs" / "first")  # the real run's summary: these two attempts replace it
    result, spec = known_run["first"], known_run["spec"].updated(resources={"num_replicas": 2})
    store = ParquetStore(str(output))
    write_run_summary(store, spec, type(result)(**{**result.__dict__, "wall_s": 5400.0}), gpus_per_replica=1.0)
    resumed = type(result)(**{**result.__dict__, "wall_s": 1800.0, "rows_written": 0, "files": []})
    latest = write_run_summary(store, spec, resumed, gpus_per_replica=1.0)

    run = json.loads((output / "_runs" / "first" / "summary.json").read_text())
    assert run == latest["run"]
    assert [(a["wall_s"], a["gpu_hours"], a["cost"]) for a in run["attempts"]] == [(5400.0, 3.0, 9.0), (1800.0, 1.0, 3.0)]
    assert (run["wall_s"], run["gpu"]["gpu_hours"], run["gpu"]["cost"]) == (7200.0, 4.0, 12.0)
    assert run["rows"]["total"] == 18 and run["files"] == known_run["first"].summary["run"]["files"]  # every row of "first"
    assert latest["output"]["gpu_hours_total"] == pytest.approx(4.0)  # "second" held no GPU
    assert "over 2 attempts" in format_summary(latest)


@pytest.mark.slow
def test_a_resumed_run_id_keeps_the_attempt_before_it(tiny_model, tmp_path, ray_local):
    """`run_id = "nightly"` run, then run again after a new file arrived: one run of two attempts,
    counting the rows of both, its wall time the sum of theirs."""
    from scriptorium.core.spec import JobSpec, spec_from_dict
    from scriptorium.jobs.runner import run_job

    inputs = tmp_path / "in"
    inputs.mkdir()
    make_image(inputs / "a.png")

    def spec() -> JobSpec:
        return spec_from_dict({"run_id": "nightly", "input": {"uri": str(inputs)}, "output": {"uri": str(tmp_path / "out")},
                               "model": {"id": str(tiny_model), "device": "cpu"},
                               "tasks": [{"kind": "ocr", "max_new_tokens": 2}]})

    first = run_job(spec()).summary["run"]
    make_image(inputs / "b.png", color=(200, 30, 30))
    second = run_job(spec()).summary["run"]

    assert [a["rows_written"] for a in second["attempts"]] == [1, 1]
    assert second["attempts"][0] == first["attempts"][0]
    assert second["wall_s"] == pytest.approx(sum(a["wall_s"] for a in second["attempts"]), abs=0.01)
    assert second["rows"]["total"] == 2 and second["started_at"] == first["started_at"]
    assert len(second["files"]) == 2
