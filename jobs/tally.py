"""Counting result rows: what the summaries report, from the published Parquet rows themselves rather
than from counters kept on the side. One DuckDB query (connectors/output_query.py) sums them up in
bounded memory, so an output of 10^8 rows is counted exactly without holding its pages.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import pyarrow as pa

from scriptorium.connectors.output_query import PublishedFiles, sql_type, connect, page_bit, page_word
from scriptorium.connectors.parquet_sink import ParquetStore

SUMMARY_COLUMNS = ["source_uri", "page", "task", "status", "error", "stage", "n_input_tokens", "n_output_tokens", "truncated"]


def error_reason(stage: str | None, error: str | None) -> str:
    """Group similar errors: `render: cannot open PDF`, `list: file is N bytes, more than input.max_size_mb=N`.

    The error's first clause (up to ': ', which is where details like a file name or the library's
    message start) with numbers replaced by N; an exception class name right after it is kept, so
    `generate failed: OutOfMemoryError: CUDA out of memory...` stays distinguishable from other failures.
    """
    text = (error or "unknown error").strip()
    parts = text.split(": ")
    head = parts[0]
    if len(parts) > 1 and re.fullmatch(r"[A-Z]\w*(Error|Exception|Exceeded|Timeout)", parts[1]):
        head += ": " + parts[1]
    head = re.sub(r"\d+", "N", head)[:120]
    return f"{stage or 'unknown'}: {head}"


class RowTally:
    """Counts over result rows, exact and in bounded memory whatever their number: the rows are summed
    up by one DuckDB query (connectors/output_query.py), pages and documents as per-source bitmaps of
    64 pages, so neither rows nor pages are ever held in Python. Fed Arrow tables (`add`) or published
    files (`add_files`, read by DuckDB itself, in parallel)."""

    def __init__(self):
        self.db = connect()
        columns = ", ".join(f"{name} {sql_type(name)}" for name in SUMMARY_COLUMNS)
        self.db.execute(f"CREATE TEMP TABLE added ({columns})")
        self._files: PublishedFiles | None = None
        self._run_id: str | None = None

    def add(self, table: pa.Table) -> None:
        self.db.register("incoming", table.select(SUMMARY_COLUMNS))
        try:
            self.db.execute("INSERT INTO added SELECT * FROM incoming")
        finally:
            self.db.unregister("incoming")

    def add_files(self, store: ParquetStore, paths: list[str], run_id: str | None = None) -> None:
        """Count the rows of these files (only those of `run_id`, if given)."""
        self._files = PublishedFiles(self.db, store, list(paths), SUMMARY_COLUMNS + ["run_id"] * (run_id is not None))
        self._run_id = run_id

    def as_dict(self) -> dict:
        if self._files is None:
            self._files = _NoFiles(self.db)
        # One scan, several groupings: per source and 64 pages (distinct pages and documents), per
        # status, per task, per error text (grouped into reasons below), and the totals.
        self._files.execute(f"""
            CREATE OR REPLACE TEMP TABLE tally AS
            SELECT GROUPING(source_uri, word) = 0 AS by_page, GROUPING(status) = 0 AS by_status,
                   GROUPING(task) = 0 AS by_task, GROUPING(stage, error) = 0 AS by_error,
                   source_uri, word, status, task, stage, error, count(*) AS n,
                   bit_or(bit) AS pages, bit_or(bit) FILTER (WHERE status = 'error') AS failed,
                   count(*) FILTER (WHERE truncated) AS truncated,
                   coalesce(sum(n_input_tokens), 0) AS input_tokens, coalesce(sum(n_output_tokens), 0) AS output_tokens
            FROM (SELECT *, {page_word()} AS word, {page_bit()} AS bit FROM (SELECT * FROM added UNION ALL
                  SELECT {", ".join(SUMMARY_COLUMNS)} FROM {{rows}} {self._of_the_run()}))
            GROUP BY GROUPING SETS ((source_uri, word), (status), (task), (status, stage, error), ())""")
        documents, failed_documents, pages, failed_pages = self.db.execute("""
            SELECT count(DISTINCT source_uri), count(DISTINCT source_uri) FILTER (WHERE failed IS NOT NULL),
                   coalesce(sum(bit_count(pages)) FILTER (WHERE word >= 0), 0),
                   coalesce(sum(bit_count(failed)) FILTER (WHERE word >= 0), 0)
            FROM tally WHERE by_page""").fetchone()
        rows, truncated, input_tokens, output_tokens = self.db.execute(
            "SELECT n, truncated, input_tokens, output_tokens FROM tally "
            "WHERE NOT (by_page OR by_status OR by_task OR by_error)").fetchone()
        by_status = dict(self.db.execute("SELECT coalesce(status, 'null'), n FROM tally WHERE by_status AND NOT by_error").fetchall())
        by_task = dict(self.db.execute("SELECT coalesce(task, 'null'), n FROM tally WHERE by_task").fetchall())
        errors_by_reason: Counter = Counter()
        texts = self.db.execute("SELECT stage, error, n FROM tally WHERE by_error AND status = 'error'")
        while chunk := texts.fetchmany(10_000):  # one row per distinct error text: streamed, not listed
            for stage, error, n in chunk:
                errors_by_reason[error_reason(stage, error)] += n
        self.db.execute("DROP TABLE tally")
        return {
            "documents": {"total": documents, "with_errors": failed_documents},
            "pages": {"total": pages, "ok": pages - failed_pages, "error": failed_pages},
            "rows": {
                "total": rows,
                "by_status": dict(sorted(by_status.items())),
                "by_task": dict(sorted(by_task.items())),
                "truncated": truncated,
            },
            "errors_by_reason": dict(errors_by_reason.most_common()),
            "tokens": {"input": int(input_tokens), "output": int(output_tokens)},
        }

    def _of_the_run(self) -> str:
        if self._run_id is None:
            return ""
        return "WHERE run_id = '" + self._run_id.replace("'", "''") + "'"


class _NoFiles:
    """Stands for PublishedFiles when only tables were added: `{rows}` is then empty."""

    def __init__(self, db):
        self.db = db

    def execute(self, query: str):
        return self.db.execute(query.format(rows="(SELECT * FROM added LIMIT 0)"))


def tally_files(store: ParquetStore, paths: Iterable[str]) -> dict:
    tally = RowTally()
    tally.add_files(store, list(paths))
    return tally.as_dict()


def tally_run(store: ParquetStore, run_id: str) -> dict:
    """Counts over the rows run `run_id` published, in whichever attempt and file (a file rewritten by
    --retry-failed, an attempt killed before it could write a summary)."""
    tally = RowTally()
    tally.add_files(store, store.data_files(), run_id)
    return tally.as_dict()
