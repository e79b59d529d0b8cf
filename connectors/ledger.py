"""The ledger: what a previous run already finished, read from the published files themselves.

A source is *complete* when, for its recorded source ETag, every page (0..n_pages-1) has a row for every
(task, question) the job asks for. Complete sources are skipped at planning time without being read;
partially done sources are read again, but only their missing pages are rendered, and rows for units
that are already published are dropped before they reach the sink.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa

from connectors.parquet_sink import ParquetStore

LEDGER_COLUMNS = ["source_uri", "page", "n_pages", "task", "question", "status", "source_etag"]


@dataclass
class Ledger:
    etags: dict[str, str] = field(default_factory=dict)  # source -> ETag its rows were made from
    complete: set[str] = field(default_factory=set)  # sources with every unit published
    done_pages: dict[str, list[int]] = field(default_factory=dict)  # partial sources: fully done pages
    done_keys: set[tuple] = field(default_factory=set)  # (source, page, task, question) of partial sources
    n_rows: int = 0
    n_errors: int = 0
    duplicates: int = 0

    def is_complete(self, source_uri: str, etag: str) -> bool:
        return source_uri in self.complete and self.etags.get(source_uri) == etag

    def is_stale(self, source_uri: str, etag: str) -> bool:
        """The source has rows, but they were made from a different version of it."""
        return source_uri in self.etags and bool(etag) and self.etags[source_uri] != etag


def read_ledger(store: ParquetStore, units: set[tuple[str, str | None]]) -> Ledger:
    """Build the ledger from every published file; `units` are the job's (task, question) pairs."""
    tables = [store.read(path, LEDGER_COLUMNS) for path in store.data_files()]
    ledger = Ledger()
    if not tables:
        return ledger
    keys = pa.concat_tables(tables, promote_options="permissive").to_pylist()
    ledger.n_rows = len(keys)
    by_source: dict[str, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    n_pages: dict[str, int] = {}
    seen = set()
    for row in keys:
        key = (row["source_uri"], row["page"], row["task"], row["question"])
        if key in seen:
            ledger.duplicates += 1
        seen.add(key)
        ledger.n_errors += row["status"] == "error"
        ledger.etags[row["source_uri"]] = row["source_etag"] or ""
        by_source[row["source_uri"]][row["page"]].add((row["task"], row["question"]))
        n_pages[row["source_uri"]] = max(n_pages.get(row["source_uri"], 1), row["n_pages"] or 1)
    for source, pages in by_source.items():
        done = sorted(p for p, got in pages.items() if units <= got)
        if len(done) == n_pages[source] and done == list(range(n_pages[source])):
            ledger.complete.add(source)
        else:
            ledger.done_pages[source] = done
            for page, got in pages.items():
                ledger.done_keys.update((source, page, task, question) for task, question in got)
    return ledger
