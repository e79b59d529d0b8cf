"""The sink and the ledger: files are published whole, kills leave nothing half-done behind, and the
ledger (the published keys) says exactly what a rerun may skip."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from scriptorium.connectors.ledger import read_ledger
from scriptorium.connectors.parquet_sink import ParquetSink, ParquetStore
from scriptorium.connectors.sink_guard import SinkGuard
from scriptorium.core.schema import RESULT_SCHEMA, table_from_rows

PART_1, PART_2, PART_3 = (f"part-run1-{n:06d}-0000000{n}.parquet" for n in (1, 2, 3))  # as the sink names files


class Killed(BaseException):
    """Stands for SIGKILL landing at one exact point: nothing after it runs."""


def results(source: str, pages, n_pages: int, task: str = "ocr", status: str = "ok", etag: str = "e1") -> pa.Table:
    rows = [{"source_uri": source, "page": p, "n_pages": n_pages, "task": task, "status": status,
             "text": f"{source}#{p}", "source_etag": etag, "error": None if status == "ok" else "boom"}
            for p in pages]
    return table_from_rows(rows, RESULT_SCHEMA)


def everything(folder) -> pa.Table:
    """The output as any reader sees it: pyarrow's dataset over the folder."""
    return pads.dataset(str(folder), format="parquet").to_table()


def page_rows_done(ledger, source: str) -> list[int]:
    """Pages (not the document row, page -1) with every unit published."""
    return [p for p in ledger.done_pages_of(source) if p >= 0]


def kill_at_the_rename(monkeypatch):
    def killed(*args):
        raise Killed()

    monkeypatch.setattr(ParquetStore, "_move_into_place", killed)


def test_a_publish_killed_before_its_rename_leaves_only_a_hidden_temporary(tmp_path, monkeypatch):
    store = ParquetStore(str(tmp_path))
    store.publish(results("a.pdf", range(3), 3), PART_1)
    kill_at_the_rename(monkeypatch)
    with pytest.raises(Killed):
        store.publish(results("b.pdf", range(2), 2), PART_2)
    monkeypatch.undo()

    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    # Every reader sees the one published file only: the ledger, pyarrow, duckdb's *.parquet glob.
    assert [p.rsplit("/", 1)[-1] for p in store.data_files()] == [PART_1]
    assert read_ledger(store, {("ocr", None)}).n_rows == 3
    assert everything(tmp_path).num_rows == 3
    assert duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/*.parquet')").fetchall() == [(3,)]
    assert len(store.recover()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_half_written_temporary_is_never_read_as_done(tmp_path):
    store = ParquetStore(str(tmp_path))
    good = results("a.pdf", range(2), 2)
    store.publish(good, PART_1)
    # What a kill in the middle of writing leaves: the first bytes of a Parquet file under a hidden name.
    (tmp_path / f".{PART_2}.0badf00d.tmp").write_bytes(b"PAR1" + b"\x00" * 100)
    ledger = read_ledger(store, {("ocr", None)})
    assert ledger.n_rows == 2 and ledger.is_complete("a.pdf", "e1")
    assert everything(tmp_path).num_rows == 2
    store.recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == [PART_1]


def test_an_interrupted_replacement_leaves_the_old_file_whole_and_can_be_redone(tmp_path, monkeypatch):
    store = ParquetStore(str(tmp_path))
    store.publish(pa.concat_tables([results("a.pdf", [0, 1], 3), results("a.pdf", [2], 3, status="error")]),
                  PART_1)
    store.publish(results("b.pdf", [0], 1, status="error"), PART_2)
    failed = lambda t: pc.equal(t["status"], "error")  # noqa: E731  (what --retry-failed drops)

    kill_at_the_rename(monkeypatch)
    with pytest.raises(Killed):
        store.drop_rows(failed, ["status"])
    monkeypatch.undo()
    assert everything(tmp_path).num_rows == 4  # nothing lost, nothing doubled
    store.recover()

    assert store.drop_rows(failed, ["status"]) == 2
    table = everything(tmp_path)
    assert sorted(zip(table["source_uri"].to_pylist(), table["page"].to_pylist())) == [("a.pdf", 0), ("a.pdf", 1)]
    assert [p.rsplit("/", 1)[-1] for p in store.data_files()] == [PART_1]  # b's file had nothing left
    ledger = read_ledger(store, {("ocr", None)})
    assert page_rows_done(ledger, "a.pdf") == [0, 1] and not ledger.is_complete("a.pdf", "e1")


def test_recover_clears_the_plan_files_of_killed_runs(tmp_path):
    store = ParquetStore(str(tmp_path))
    (tmp_path / "_work" / "killed-run").mkdir(parents=True)
    (tmp_path / "_work" / "killed-run" / "plan-000000.parquet").write_bytes(b"plan")
    store.recover()
    assert not (tmp_path / "_work").exists()


def test_the_sink_publishes_whole_files_as_rows_arrive(tmp_path):
    store = ParquetStore(str(tmp_path))
    sink = ParquetSink(store, "run1", rows_per_file=5, seconds_per_file=3600)
    for page in range(12):
        sink.write(results("a.pdf", [page], 12))
        assert everything(tmp_path).num_rows == 5 * ((page + 1) // 5)  # only whole files are visible
    sink.close()
    assert len(sink.published) == 3 and sorted(everything(tmp_path)["page"].to_pylist()) == list(range(12))


def test_publish_and_drop_rows_on_an_object_store_use_single_puts():
    store = ParquetStore("memory://scriptorium-sink-test/out")
    store.publish(results("a.pdf", [0, 1], 2, status="error"), PART_1)
    store.publish(results("b.pdf", [0], 1), PART_2)
    assert store.drop_rows(lambda t: pc.equal(t["status"], "error"), ["status"]) == 2
    assert [p.rsplit("/", 1)[-1] for p in store.data_files()] == [PART_2]
    assert store.recover() == []
    store.fs.rm(store.root, recursive=True)


# -- the ledger --------------------------------------------------------------------------------------------
def test_the_ledger_tells_complete_partial_and_changed_sources_apart(tmp_path):
    store = ParquetStore(str(tmp_path))
    store.publish(results("whole.pdf", range(3), 3), PART_1)
    store.publish(results("half.pdf", [0, 2], 4), PART_2)
    store.publish(results("unreadable.pdf", [0], None, status="error"), PART_3)  # one error row
    ledger = read_ledger(store, {("ocr", None)})
    assert ledger.is_complete("whole.pdf", "e1") and not ledger.is_complete("whole.pdf", "e2")
    assert ledger.is_stale("whole.pdf", "e2") and not ledger.is_stale("whole.pdf", "e1")
    assert not ledger.is_complete("half.pdf", "e1") and page_rows_done(ledger, "half.pdf") == [0, 2]
    assert ledger.is_complete("unreadable.pdf", "e1")  # an error row is an answer: not redone unless asked
    assert not ledger.is_complete("new.pdf", "e1")
    # A second task makes every source partial: its units are not published anywhere yet.
    two_tasks = read_ledger(store, {("ocr", None), ("caption", None)})
    assert not two_tasks.is_complete("whole.pdf", "e1") and page_rows_done(two_tasks, "whole.pdf") == []


def test_a_source_of_unknown_version_is_complete_once_answered(tmp_path):
    """A manifest entry that could not be looked up has no ETag (null); its error row is an answer too."""
    store = ParquetStore(str(tmp_path))
    store.publish(results("s3://b/missing.pdf", [0], None, status="error", etag=None), PART_1)
    ledger = read_ledger(store, {("ocr", None)})
    assert ledger.is_complete("s3://b/missing.pdf", None) and ledger.is_complete("s3://b/missing.pdf", "")
    assert not ledger.is_complete("s3://b/missing.pdf", "e-new")  # it appeared since: redo it
    # A finished source whose lookup fails now (no ETag) is not read again for nothing.
    store.publish(results("s3://b/done.pdf", range(2), 2), PART_2)
    assert read_ledger(store, {("ocr", None)}).is_complete("s3://b/done.pdf", None)


def test_the_driver_drops_units_done_before_and_units_it_already_wrote(tmp_path):
    store = ParquetStore(str(tmp_path))
    store.publish(results("a.pdf", [0], 3), PART_1)
    guard = SinkGuard(read_ledger(store, {("ocr", None)}))
    first = guard.drop_done(results("a.pdf", [0, 1, 2], 3))
    assert first["page"].to_pylist() == [1, 2]
    again = guard.drop_done(results("a.pdf", [1, 2, 3], 4))  # a batch delivered a second time
    assert again["page"].to_pylist() == [3]


def test_a_file_written_before_a_column_existed_reads_with_that_column_null(tmp_path):
    import pyarrow.parquet as pq

    older = results("a.pdf", [0, 1], 2).drop_columns(["member"])  # as Scriptorium wrote it before `member`
    pq.write_table(older, tmp_path / "part-old-000000-0000abcd.parquet")
    store = ParquetStore(str(tmp_path))
    table = store.read(store.data_files()[0], ["source_uri", "page", "member"])
    assert table.column_names == ["source_uri", "page", "member"]
    assert table["member"].to_pylist() == [None, None] and table.schema.field("member").type == pa.string()
    assert read_ledger(store, {("ocr", None)}).is_complete("a.pdf", "e1")
