"""Resume planning against a published output, as a rerun does it: complete sources are skipped, partly
done ones owe only their missing units, changed ones are replaced; and the driver's safety net writes
each unit once with exact keys. The ledger reads the output with DuckDB page bitmaps (connectors/ledger.py);
these tests pin that it decides exactly as the set-based ledger it replaced."""

from __future__ import annotations

import importlib.util
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scriptorium.connectors.ledger import read_ledger
from scriptorium.connectors.listing import list_inputs
from scriptorium.connectors.parquet_sink import ParquetSink, ParquetStore
from scriptorium.connectors.sink_guard import SinkGuard
from scriptorium.core.schema import DOCUMENT_PAGE, RESULT_SCHEMA, table_from_rows
from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, StorageSpec, TaskSpec
from scriptorium.core.units import work_units
from scriptorium.jobs.planning import write_plan
from scriptorium.jobs.tally import tally_files
from tests.conftest import REPO, read_rows

OCR_AND_CAPTION = [TaskSpec(kind="ocr"), TaskSpec(kind="caption")]


def rows(source: str, etag: str, n_pages: int, units: list[tuple], status: str = "ok") -> list[dict]:
    """Result rows of `source` for (page, task[, question]) units."""
    return [{"source_uri": source, "page": unit[0], "n_pages": n_pages, "task": unit[1],
             "question": unit[2] if len(unit) > 2 else None, "status": status, "source_etag": etag,
             "model": "tiny", "error": "boom" if status == "error" else None} for unit in units]


def part(number: int) -> str:
    """The name of a published data file, as the sink makes them (connectors/namespace.py)."""
    return f"part-run1-{number:06d}-{number:08x}.parquet"


def publish(store: ParquetStore, name: str, result_rows: list[dict]) -> None:
    store.publish(table_from_rows(result_rows, RESULT_SCHEMA), name)


def plan_of(folder, output, tasks, retry_failed: bool = False):
    """What a rerun plans: (Plan, {source name: plan row}) read back from its plan files."""
    spec = JobSpec(run_id="rerun", input=InputSpec(uri=str(folder)),
                   output=OutputSpec(uri=str(output), retry_failed=retry_failed), model=ModelSpec(id="tiny"),
                   tasks=tasks).check_runnable()
    store = ParquetStore(str(output))
    ledger = read_ledger(store, work_units(spec.tasks), errors_done=not retry_failed)
    plan = write_plan(spec, store, ledger)
    planned = [row for path in plan.files for row in pq.read_table(path).to_pylist()]
    return plan, {row["source_uri"].rsplit("/", 1)[-1]: row for row in planned}


@pytest.fixture
def archive(tmp_path):
    """Five listed sources (their bytes do not matter to planning) and their ETags (mtimes) as listed."""
    folder = tmp_path / "archive"
    folder.mkdir()
    for name in ("done.pdf", "half.pdf", "changed.pdf", "new.pdf", "failed.pdf"):
        (folder / name).write_bytes(b"%PDF-1.4 " + name.encode())
    etags = {row["source_uri"]: row["etag"] for row in list_inputs(InputSpec(uri=str(folder)), StorageSpec())}
    return folder, etags


def test_a_rerun_skips_complete_sources_and_plans_only_what_is_missing(archive, tmp_path):
    folder, etags = archive
    uri = {name: str(folder / name) for name in ("done.pdf", "half.pdf", "changed.pdf", "failed.pdf")}
    store = ParquetStore(str(tmp_path / "out"))
    both = lambda pages: [(p, t) for p in pages for t in ("ocr", "caption")]  # noqa: E731
    publish(store, part(1), rows(uri["done.pdf"], etags[uri["done.pdf"]], 3, both(range(3)))
            + rows(uri["half.pdf"], etags[uri["half.pdf"]], 4, both([0, 1]) + [(2, "ocr")]))
    publish(store, part(2), rows(uri["changed.pdf"], "mtime:long ago", 2, both(range(2)))
            + rows(uri["failed.pdf"], etags[uri["failed.pdf"]], 1, [(0, "ocr")])
            + rows(uri["failed.pdf"], etags[uri["failed.pdf"]], 1, [(0, "caption")], status="error"))

    plan, planned = plan_of(folder, tmp_path / "out", OCR_AND_CAPTION)
    assert (plan.skipped, sorted(planned)) == (2, ["changed.pdf", "half.pdf", "new.pdf"])  # done, failed: skipped
    assert plan.stale == [uri["changed.pdf"]] and plan.retried == []
    half = planned["half.pdf"]
    assert (half["done_pages"], half["known_pages"]) == ([DOCUMENT_PAGE, 0, 1], 4)  # pages 2, 3 are rendered
    assert half["done_units"] == [{"page": 2, "task": "ocr", "question": None}]  # page 2 only owes its caption
    for fresh in ("changed.pdf", "new.pdf"):  # a changed source is redone whole
        assert (planned[fresh]["done_pages"], planned[fresh]["done_units"], planned[fresh]["known_pages"]) == (
            None, None, None)

    # --retry-failed: the error row is not an answer any more; the OCR unit published beside it stays.
    plan, planned = plan_of(folder, tmp_path / "out", OCR_AND_CAPTION, retry_failed=True)
    assert plan.retried == [uri["failed.pdf"]] and sorted(planned) == ["changed.pdf", "failed.pdf", "half.pdf", "new.pdf"]
    assert planned["failed.pdf"]["done_pages"] == [DOCUMENT_PAGE]
    assert planned["failed.pdf"]["done_units"] == [{"page": 0, "task": "ocr", "question": None}]


def test_document_rows_count_for_completion_on_their_own(archive, tmp_path):
    folder, etags = archive
    tasks = [TaskSpec(kind="ocr"), TaskSpec(kind="caption", name="overview", scope="document")]
    store = ParquetStore(str(tmp_path / "out"))
    done, half, failed = (str(folder / n) for n in ("done.pdf", "half.pdf", "failed.pdf"))
    publish(store, part(1),
            rows(done, etags[done], 2, [(0, "ocr"), (1, "ocr"), (DOCUMENT_PAGE, "overview")])
            + rows(half, etags[half], 2, [(0, "ocr"), (1, "ocr")])  # every page, but no document row yet
            + rows(failed, etags[failed], 3, [(DOCUMENT_PAGE, "overview"), (2, "ocr")]))

    plan, planned = plan_of(folder, tmp_path / "out", tasks)
    assert "done.pdf" not in planned and plan.skipped == 1
    assert (planned["half.pdf"]["done_pages"], planned["half.pdf"]["done_units"]) == ([0, 1], [])
    assert (planned["failed.pdf"]["done_pages"], planned["failed.pdf"]["done_units"]) == ([DOCUMENT_PAGE, 2], [])


def test_files_written_before_a_column_existed_are_read_with_it_null(tmp_path):
    store = ParquetStore(str(tmp_path))
    older = table_from_rows(rows("old.pdf", "e1", 2, [(0, "ocr"), (1, "ocr")]), RESULT_SCHEMA)
    pq.write_table(older.drop_columns(["question", "model"]), tmp_path / part(0))  # as an old version wrote it
    publish(store, part(1), rows("new.pdf", "e1", 1, [(0, "ocr")]))
    ledger = read_ledger(store, {("ocr", None)})
    assert ledger.is_complete("old.pdf", "e1") and ledger.is_complete("new.pdf", "e1")
    assert ledger.models == {"tiny"} and ledger.n_rows == 3
    # And when no file has the column at all.
    (tmp_path / part(1)).unlink()
    assert read_ledger(store, {("ocr", None)}).is_complete("old.pdf", "e1")


# -- the same decisions as the set-based ledger it replaced, on a random output -----------------------------
def ledger_before():
    """bench/_ledger_before.py: the ledger as it was before issue #19 (every key in Python sets)."""
    spec = importlib.util.spec_from_file_location("ledger_before", REPO / "bench" / "_ledger_before.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("errors_done", [True, False])
def test_the_bitmap_ledger_decides_every_source_as_the_set_based_one_did(tmp_path, errors_done):
    rng = random.Random(19)
    tasks = [TaskSpec(kind="ocr"), TaskSpec(kind="qa"), TaskSpec(kind="caption", name="overview", scope="document")]
    questions = [["Who?"], ["Who?", "When?"], ["When?", "Where?"]]
    store, published, listed = ParquetStore(str(tmp_path)), [], []
    for number in range(300):
        source, n_pages = f"s3://b/doc-{number}.pdf", rng.choice([1, 2, 5, 63, 64, 65, 130])
        asked = rng.choice(questions)
        units = [(page, task, question) for page in [DOCUMENT_PAGE, *range(n_pages)]
                 for task, question in work_units(tasks, asked).page | work_units(tasks, asked).document
                 if (page == DOCUMENT_PAGE) == (task == "overview")]
        units += [(rng.randrange(n_pages), "qa", "Why?")]  # a unit no job asks for any more
        kept = rng.choice([0.0, 0.5, 0.97, 1.0])
        for unit in units:
            if rng.random() < kept:
                published += rows(source, "e1", n_pages, [unit], status="error" if rng.random() < 0.05 else "ok")
        listed.append((source, rng.choice(["e1", "e1", "e2", "", None]), asked))
    rng.shuffle(published)
    for start in range(0, len(published), 1500):  # a source's rows spread over several files
        publish(store, part(start), published[start:start + 1500])

    job_units = work_units(tasks)
    new, old = read_ledger(store, job_units, errors_done), ledger_before().read_ledger(store, job_units, errors_done)
    assert (new.n_rows, new.models) == (old.n_rows, old.models)
    listing = [{"source_uri": source, "etag": etag, "questions": asked} for source, etag, asked in listed]
    decided = 0
    for row, units, record in new.look_up(listing, lambda row: work_units(tasks, row["questions"])):
        uri, etag = row["source_uri"], row["etag"]
        assert record.is_complete(etag, units) == old.is_complete(uri, etag, units), uri
        assert record.is_stale(etag) == old.is_stale(uri, etag), uri
        assert record.has_done == (uri in old.got) and record.has_errors == (uri in old.error_sources)
        if record.has_done:
            done_pages = record.done_pages(units)
            assert done_pages == old.done_pages_of(uri, units), uri
            assert record.done_units(done_pages) == old.done_units_of(uri, done_pages), uri
            assert record.n_pages == old.n_pages[uri]
            decided += not record.is_complete(etag, units)
    assert decided > 50  # plenty of partly done sources were compared, not only trivial ones
    counts = new.done_page_counts()
    for uri, pages in old.done_pages.items():
        assert counts.get(uri) == len(pages), uri


# -- the safety net in the driver ----------------------------------------------------------------------------
def results(source: str, pages, tasks=("ocr", "caption"), questions=(None,)) -> pa.Table:
    return table_from_rows([{"source_uri": source, "page": page, "n_pages": 10, "task": task, "question": question,
                             "status": "ok", "text": f"{source} {page} {task} {question}"}
                            for page in pages for task in tasks for question in questions], RESULT_SCHEMA)


def test_a_unit_published_before_is_dropped_once_planning_has_seen_its_source(archive, tmp_path):
    folder, etags = archive
    half = str(folder / "half.pdf")
    store = ParquetStore(str(tmp_path / "out"))
    publish(store, part(1), rows(half, etags[half], 4, [(0, "ocr"), (1, "ocr")]))
    ledger = read_ledger(store, {("ocr", None)})
    listed = list(ledger.look_up(list_inputs(InputSpec(uri=str(folder)), StorageSpec()),
                                 lambda row: ledger.units))
    assert {row["source_uri"] for row, _, record in listed if record.has_done} == {half}
    again = results(half, range(4), tasks=("ocr",))  # pages 0 and 1 were published before this run
    assert SinkGuard(ledger).drop_done(again)["page"].to_pylist() == [2, 3]


def test_a_batch_ray_delivers_twice_is_written_once(tmp_path):
    store = ParquetStore(str(tmp_path))
    guard, sink = SinkGuard(read_ledger(store, {("ocr", None), ("caption", None)})), ParquetSink(store, "run", 7)
    block = results("a.pdf", range(5))
    for batch in (block, results("b.pdf", range(3)), block, results("a.pdf", range(3, 8)), block.slice(2, 3)):
        sink.write(guard.drop_done(batch))  # the third and fifth come again, as a retried task re-emits them
    sink.close()
    keys = [(r["source_uri"], r["page"], r["task"]) for r in read_rows(tmp_path)]
    assert sorted(keys) == sorted({(s, p, t) for s, pages in (("a.pdf", range(8)), ("b.pdf", range(3)))
                                   for p in pages for t in ("ocr", "caption")})


def test_distinct_units_are_never_taken_for_each_other():
    """Keys that differ in one detail are different units: every one of them is written."""
    guard = SinkGuard(read_ledger(ParquetStore("memory://sink-guard-test/empty")))
    near = [results(source, [DOCUMENT_PAGE, 0, 1, 64, 65], tasks=("ocr", "OCR", "ocr "), questions=(None, "", "None"))
            for source in ("a.pdf", "A.pdf", "a.pdf ", "dir/a.pdf")]
    many = [results(f"s3://b/{number:06d}.tif", range(number % 7 + 1)) for number in range(5000)]
    kept = sum(guard.drop_done(batch).num_rows for batch in near + many)
    assert kept == sum(batch.num_rows for batch in near + many)


def test_the_written_keys_stay_bounded_and_catch_a_redelivery_within_them():
    guard = SinkGuard(read_ledger(ParquetStore("memory://sink-guard-test/empty2")), capacity=100)
    first = results("s3://b/early.pdf", range(4))
    guard.drop_done(first)
    for number in range(99):  # 99 more sources: early.pdf is still among the 100 kept
        guard.drop_done(results(f"s3://b/{number}.pdf", [0]))
    assert guard.drop_done(first).num_rows == 0
    for number in range(1000):
        guard.drop_done(results(f"s3://b/later-{number}.pdf", [0]))
    assert len(guard.written) == 100


# -- counting an output: exact distinct pages, whatever the rows -----------------------------------------------
def test_the_summary_counts_each_page_once_across_files_and_past_64_pages(tmp_path):
    store = ParquetStore(str(tmp_path))
    publish(store, part(1), rows("long.pdf", "e1", 130, [(p, "ocr") for p in range(130)]))
    publish(store, part(2), rows("long.pdf", "e1", 130, [(p, "caption") for p in range(0, 130, 2)])
            + rows("long.pdf", "e1", 130, [(129, "summary")], status="error")
            + rows("one.png", "e1", 1, [(0, "ocr"), (DOCUMENT_PAGE, "summary")]))
    counts = tally_files(store, store.data_files())
    assert counts["pages"] == {"total": 131, "ok": 130, "error": 1}
    assert counts["documents"] == {"total": 2, "with_errors": 1}
    assert counts["rows"]["total"] == 130 + 65 + 1 + 2 and counts["rows"]["by_status"] == {"error": 1, "ok": 197}
    assert counts["errors_by_reason"] == {"unknown: boom": 1}


@pytest.mark.slow
def test_an_output_on_s3_is_read_by_duckdb_from_its_own_files_only(s3_server):
    from scriptorium.core.spec import StorageSpec

    bucket = s3_server.new_bucket("ledger")
    store = ParquetStore(f"s3://{bucket}/out", StorageSpec(endpoint_url=s3_server.endpoint))
    for name in (part(1), part(2)):
        publish(store, name, rows(f"s3://in/{name}.pdf", "e1", 1, [(0, "ocr")]))
    not_ours = ("_work/run/plan-000000.parquet", "_runs/r/summary.json", f".{part(3)}.tmp", f"sub/{part(4)}",
                "notes.parquet")
    for name in not_ours:
        s3_server.put(bucket, f"out/{name}", b"not ours to read")
    assert [p.split("/out/", 1)[1] for p in store.data_files()] == [part(1), part(2)]
    ledger = read_ledger(store, {("ocr", None)})  # DuckDB reads the files through the store's filesystem
    assert ledger.is_complete(f"s3://in/{part(1)}.pdf", "e1") and ledger.n_rows == 2
