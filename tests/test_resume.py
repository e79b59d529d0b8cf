"""Resume: a run killed at any moment is rerun with the same command and ends with every page exactly once;
`--overwrite` starts fresh; `--retry-failed` redoes the error rows only, and replaces them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest

from scriptorium.core.spec import JobSpec, spec_from_dict
from scriptorium.jobs.runner import run_job
from tests.conftest import REPO, driver_job_toml, make_pdf, read_rows, small_ocr_job

N_DOCS, PAGES_PER_DOC = 3, 8
# Small pages, small files, long enough generations: the run publishes a file every few pages for a
# while, so there is a middle to kill it in (the kill lands after the first file, about 5 of the 24
# pages; more pages would only lengthen the rerun).
JOB = driver_job_toml(rows_per_file=5)


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume-inputs")
    for number in range(N_DOCS):
        make_pdf(folder / f"doc{number}.pdf", [f"document {number}, page {p}" for p in range(PAGES_PER_DOC)],
                 size=(200, 260))
    return folder


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children...), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_run_killed_with_sigkill_resumes_to_every_page_exactly_once(documents, tiny_model, tmp_path):
    output = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(JOB)
    args = ["run", "--job", str(job), "--input", str(documents), "--output", str(output), "--task", "ocr",
            "--model", str(tiny_model), "--max-new-tokens", "64"]
    total = N_DOCS * PAGES_PER_DOC

    with open(tmp_path / "killed-run.log", "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "scriptorium.jobs.cli", *args], cwd=REPO, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while not any(output.glob("part-*.parquet")):  # wait until the run has published something
        assert driver.poll() is None, (tmp_path / "killed-run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no file published in 300 s"
        time.sleep(0.02)
    family = descendants(driver.pid)  # Ray's processes and workers, the renderers
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    published = len(read_rows(output, empty_ok=True))
    assert 0 < published < total, "the kill should land in the middle of the run"

    # The same command, at once; meanwhile, nothing of the killed run may outlive it: Ray's processes are
    # tied to the driver that started them (its agents give up on the dead GCS within about a minute).
    with open(tmp_path / "rerun.log", "wb") as log:
        rerun = subprocess.Popen([sys.executable, "-m", "scriptorium.jobs.cli", *args], cwd=REPO, stdout=log, stderr=log)
    deadline = time.monotonic() + 90
    while alive(family) and time.monotonic() < deadline:
        time.sleep(1)
    survivors = alive(family)
    names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:60] for pid in survivors}
    for pid in survivors:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not survivors, names
    assert rerun.wait(timeout=400) == 0, (tmp_path / "rerun.log").read_text()[-3000:]

    rows = read_rows(output)
    keys = Counter((Path(r["source_uri"]).name, r["page"], r["task"]) for r in rows)
    assert sorted(keys) == sorted((f"doc{d}.pdf", p, "ocr") for d in range(N_DOCS) for p in range(PAGES_PER_DOC))
    assert set(keys.values()) == {1}
    assert {r["status"] for r in rows} == {"ok"}
    # The rows published before the kill were kept, not redone: two runs wrote the output.
    assert len({r["run_id"] for r in rows}) == 2
    count, distinct = duckdb.sql(
        f"select count(*), count(distinct (source_uri, page, task)) from read_parquet('{output}/*.parquet')").fetchall()[0]
    assert count == distinct == total


# -- --retry-failed and --overwrite, in this process (one Ray for all runs) --------------------------------
def job_spec(documents: Path, output: Path, model: Path, **output_options) -> JobSpec:
    job = small_ocr_job(documents, output, model)
    job["output"].update(rows_per_file=4, **output_options)
    return spec_from_dict(job)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    make_pdf(folder / "a.pdf", ["one", "two"], size=(200, 260))
    make_pdf(folder / "b.pdf", ["three", "four"], size=(200, 260))
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(noise).save(folder / "big.png")  # ~270 kB of incompressible pixels
    return folder


@pytest.fixture(scope="module")
def first_run(small_folder, tiny_model, tmp_path_factory, ray_local):
    """A finished run in which big.png was refused at listing (input.max_size_mb): one error row."""
    output = tmp_path_factory.mktemp("first") / "out"
    spec = job_spec(small_folder, output, tiny_model).updated(input={"max_size_mb": 0.1})
    return run_job(spec).run_id, output


def copy_of(output: Path, tmp_path: Path) -> Path:
    shutil.copytree(output, tmp_path / "out")
    return tmp_path / "out"


def pages_and_status(output: Path) -> list[tuple[str, int, str]]:
    return sorted((Path(r["source_uri"]).name, r["page"], r["status"]) for r in read_rows(output))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_retry_failed_redoes_only_the_error_rows_and_replaces_them(first_run, small_folder, tiny_model, tmp_path):
    first_id, first_output = first_run
    output = copy_of(first_output, tmp_path)
    assert pages_and_status(output) == [
        ("a.pdf", 0, "ok"), ("a.pdf", 1, "ok"), ("b.pdf", 0, "ok"), ("b.pdf", 1, "ok"), ("big.png", 0, "error")]
    assert next(r for r in read_rows(output) if r["status"] == "error")["stage"] == "list"

    # A plain rerun takes the error row as the answer: nothing to do, even with the limit lifted.
    rerun = run_job(job_spec(small_folder, output, tiny_model))
    assert (rerun.planned_inputs, rerun.rows_written) == (0, 0)

    retry = run_job(job_spec(small_folder, output, tiny_model, retry_failed=True))
    assert (retry.planned_inputs, retry.rows_written) == (1, 1)
    assert pages_and_status(output) == [
        ("a.pdf", 0, "ok"), ("a.pdf", 1, "ok"), ("b.pdf", 0, "ok"), ("b.pdf", 1, "ok"), ("big.png", 0, "ok")]
    rows = read_rows(output)  # the ok rows were left as they were: written by the first run
    assert {r["run_id"] for r in rows if r["source_uri"].endswith(".pdf")} == {first_id}
    assert {r["run_id"] for r in rows if r["source_uri"].endswith(".png")} == {retry.run_id}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_retry_failed_keeps_the_error_rows_of_sources_it_does_not_list(first_run, small_folder, tiny_model, tmp_path):
    _, first_output = first_run
    output = copy_of(first_output, tmp_path)
    narrower = job_spec(small_folder, output, tiny_model, retry_failed=True)
    narrower = narrower.updated(input={"include": ["*.pdf"]})  # big.png is not part of this run
    retry = run_job(narrower)
    assert (retry.planned_inputs, retry.rows_written) == (0, 0)
    # big.png's error row is still the answer for its page: not redone, and not lost either.
    assert ("big.png", 0, "error") in pages_and_status(output)


@pytest.mark.slow
def test_resuming_with_another_model_says_so(first_run, small_folder, tiny_model, tmp_path, caplog):
    _, first_output = first_run
    output = copy_of(first_output, tmp_path)
    other_model = shutil.copytree(tiny_model, tmp_path / "other-model")
    with caplog.at_level("WARNING", logger="scriptorium"):
        run_job(job_spec(small_folder, output, other_model))
    assert f"already holds rows made by {tiny_model}" in caplog.text and "--overwrite" in caplog.text


def test_a_partly_done_document_that_became_unreadable_owes_an_error_row_per_missing_page(tmp_path):
    from scriptorium.core.spec import RenderSpec, StorageSpec
    from scriptorium.pipeline.render.stage import pages_of

    gone = {"source_uri": str(tmp_path / "gone.pdf"), "kind": "pdf", "etag": "e1", "size": 100,
            "done_pages": [0, 1, 2], "known_pages": 6}
    rows = list(pages_of(gone, RenderSpec(page_edge=64, sandbox=False), StorageSpec()))
    assert [(r["page"], r["status"], r["stage"]) for r in rows] == [(3, "error", "read"), (4, "error", "read"),
                                                                     (5, "error", "read")]
    assert all("cannot read" in r["error"] for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_overwrite_starts_fresh(first_run, small_folder, tiny_model, tmp_path):
    _, first_output = first_run
    output = copy_of(first_output, tmp_path)
    old_files = {p.name for p in output.glob("*.parquet")}
    again = run_job(job_spec(small_folder, output, tiny_model, overwrite=True))
    assert (again.planned_inputs, again.skipped_inputs) == (3, 0)
    rows = read_rows(output)
    assert len(rows) == 5 and {r["run_id"] for r in rows} == {again.run_id}
    assert {r["status"] for r in rows} == {"ok"}  # the limit is gone: big.png is read this time
    assert not old_files & {p.name for p in output.glob("*.parquet")}


# -- a task added to a finished output -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_task_added_to_a_finished_output_runs_only_the_new_task(first_run, small_folder, tiny_model, tmp_path,
                                                                   caplog):
    first_id, first_output = first_run
    output = copy_of(first_output, tmp_path)
    spec = job_spec(small_folder, output, tiny_model)
    spec = spec.updated(input={"max_size_mb": 0.1},  # as in the first run: big.png stays refused
                        tasks=[*spec.tasks, spec_from_dict({"tasks": [{"kind": "caption", "max_new_tokens": 4}]}).tasks[0]])
    with caplog.at_level("WARNING", logger="scriptorium"):
        added = run_job(spec.check_runnable())

    # Every page is rendered again (its caption is missing) but the OCR units are not generated again:
    # nothing reaches the sink's safety net, and the OCR rows are the first run's.
    assert "published before this run" not in caplog.text and "already written" not in caplog.text
    assert (added.planned_inputs, added.rows_written) == (3, 5)
    rows = read_rows(output)
    assert Counter((Path(r["source_uri"]).name, r["page"], r["task"]) for r in rows) == Counter(
        {(name, page, task): 1 for name, pages in (("a.pdf", 2), ("b.pdf", 2), ("big.png", 1))
         for page in range(pages) for task in ("ocr", "caption")})
    assert {r["run_id"] for r in rows if r["task"] == "ocr"} == {first_id}
    assert {r["run_id"] for r in rows if r["task"] == "caption"} == {added.run_id}


def test_a_page_that_owes_some_units_generates_only_those(small_folder, tiny_model):
    from scriptorium.core.spec import TaskSpec
    from tests.conftest import job, plan_row, run_stages

    spec = job(tiny_model, [TaskSpec(kind="ocr", max_new_tokens=4), TaskSpec(kind="caption", max_new_tokens=4),
                            TaskSpec(kind="qa", questions=["Who?", "When?"], max_new_tokens=4)])
    published = [{"page": 0, "task": "ocr", "question": None}, {"page": 0, "task": "qa", "question": "When?"},
                 {"page": 1, "task": "caption", "question": None}]
    rows = run_stages(spec, [{**plan_row(small_folder / "a.pdf"), "done_units": published}])
    assert [(r["page"], r["task"], r["question"]) for r in rows] == [
        (0, "caption", None), (0, "qa", "Who?"),
        (1, "ocr", None), (1, "qa", "When?"), (1, "qa", "Who?")]
    assert {r["status"] for r in rows} == {"ok"}


def test_each_page_row_carries_only_its_own_pages_published_units(small_folder):
    """A 5,000-page document with a task added must not copy all its published units onto every page."""
    from scriptorium.core.spec import RenderSpec, StorageSpec
    from scriptorium.pipeline.render.stage import pages_of
    from tests.conftest import plan_row

    on_page = [{"page": p, "task": "ocr", "question": None} for p in (0, 1)]
    rows = list(pages_of({**plan_row(small_folder / "a.pdf"), "done_units": on_page},
                         RenderSpec(page_edge=64, sandbox=False), StorageSpec()))
    assert [(r["page"], r["done_units"]) for r in rows] == [(0, [on_page[0]]), (1, [on_page[1]])]
