"""DuckDB over an output's published files: the columnar engine behind the ledger and the run summary.

An output of 10^8 rows cannot be counted in Python objects, so whatever must look at every published
row (what is done, how many distinct pages there are) is one SQL query here instead, run by an embedded
DuckDB with a memory limit: it reads only the columns asked for, in parallel, and spills to a
temporary folder rather than grow past the limit. Local files are read by DuckDB itself; files on an
object store through the store's own fsspec filesystem (its credentials, endpoint and retries).

Pages are counted exactly with bitmaps: a group of rows keeps `bit_or(1 << page % 64)` per 64 pages
(`page_word`, `page_bit`), so a 50-page document's unit is one integer rather than 50 rows, and
`bit_count` of the merged words is its number of distinct pages, however often a page repeats.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import duckdb

from scriptorium.connectors.parquet_sink import ParquetStore, _is_local
from scriptorium.connectors.storage import uri_for
from scriptorium.core.schema import RESULT_SCHEMA

MEMORY_LIMIT = "1GB"  # DuckDB's own ceiling; beyond it, its hash tables spill to disk
PAGE_WORD_BITS = 64



def page_word(page: str = "page") -> str:
    """SQL: the 64-page word a row's page falls in; -1 for the document row (the only negative page)."""
    return f"(CASE WHEN {page} >= 0 THEN {page} >> 6 ELSE -1 END)"


def page_bit(page: str = "page") -> str:
    """SQL: the row's page as a bit of its word (the document row is bit 0 of word -1)."""
    return f"(CASE WHEN {page} >= 0 THEN 1::UBIGINT << ({page} & 63) ELSE 1::UBIGINT END)"


def connect(spill_folder: str | None = None, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a memory limit, spilling below `spill_folder` (default: the system's
    temporary folder) into a folder of its own, which DuckDB makes only if it spills and removes when
    the connection closes."""
    connection = duckdb.connect(database)
    spill = os.path.join(spill_folder or tempfile.gettempdir(), f"scriptorium-spill-{uuid.uuid4().hex[:12]}")
    connection.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    connection.execute("SET temp_directory = ?", [spill])
    connection.execute("SET preserve_insertion_order = false")  # lets aggregates stream and spill
    connection.execute("SET autoinstall_known_extensions = false")  # never fetch anything at run time
    connection.execute("SET autoload_known_extensions = false")
    return connection


class PublishedFiles:
    """Published files as the `{rows}` of SQL queries: their rows, with just the given columns."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, store: ParquetStore, paths: list[str],
                 columns: list[str]):
        self.connection = connection
        self.columns = columns
        if _is_local(store.fs):
            self.paths = list(paths)
        else:
            connection.register_filesystem(store.fs)
            self.paths = [uri_for(store.fs, path) for path in paths]

    def execute(self, query: str) -> duckdb.DuckDBPyConnection:
        """Run `query`, in which `{rows}` stands for the files' rows. Files are read as they are; if some
        file lacks a column (written by an older Scriptorium), again, matching columns by name across
        files with nulls filling in (that costs reading every file's footer first, so only then)."""
        if not self.paths:
            empty = ", ".join(f"NULL::{sql_type(c)} AS {c}" for c in self.columns)
            return self.connection.execute(query.format(rows=f"(SELECT {empty} LIMIT 0)"))
        files = {"files": self.paths}
        try:
            return self.connection.execute(query.format(rows=self._rows(self.columns, union=False)), files)
        except (duckdb.BinderException, duckdb.InvalidInputException):
            present = {row[0] for row in self.connection.execute(
                "DESCRIBE SELECT * FROM read_parquet($files, union_by_name = true)", files).fetchall()}
            columns = [c if c in present else f"NULL::{sql_type(c)} AS {c}" for c in self.columns]
            return self.connection.execute(query.format(rows=self._rows(columns, union=True)), files)

    @staticmethod
    def _rows(columns: list[str], union: bool) -> str:
        return f"(SELECT {', '.join(columns)} FROM read_parquet($files, union_by_name = {str(union).lower()}))"


def sql_type(column: str) -> str:
    """The DuckDB type of a RESULT_SCHEMA column."""
    kind = str(RESULT_SCHEMA.field(column).type)
    return {"string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT", "bool": "BOOLEAN",
            "float": "FLOAT"}[kind]
