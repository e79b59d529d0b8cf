"""BASELINE, FOR COMPARISON ONLY: the ledger and planning loop as they were before issue #19 (commit
ebc948f, connectors/ledger.py and jobs/runner.py's write_plan and _drop_done), kept verbatim where possible so that
bench/ledger.py can print today's figures next to the new ones. Not used by Scriptorium itself.

It loads every published key into Python sets and dicts, so its memory grows with the output.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.schema import DOCUMENT_PAGE, PLAN_SCHEMA, table_from_rows

LEDGER_COLUMNS = ["source_uri", "page", "n_pages", "task", "question", "status", "source_etag", "model"]
PLAN_ROWS_PER_FILE = 200


@dataclass(frozen=True)
class Units:
    page: frozenset = frozenset()
    document: frozenset = frozenset()


@dataclass
class Ledger:
    etags: dict[str, str] = field(default_factory=dict)  # source -> ETag its rows were made from
    got: dict[str, dict[int, set]] = field(default_factory=dict)  # source -> page -> published (task, question)
    n_pages: dict[str, int] = field(default_factory=dict)
    done_keys: set[tuple] = field(default_factory=set)  # (source, page, task, question) published
    units: Units = field(default_factory=Units)  # the job-wide units, when a caller gives none
    n_rows: int = 0
    error_sources: set[str] = field(default_factory=set)  # sources with error rows (--retry-failed)
    models: set[str] = field(default_factory=set)  # the `model` values of the published rows

    def done_pages_of(self, source_uri: str, units: Units | None = None) -> list[int]:
        """Pages with every unit published, and DOCUMENT_PAGE when the document row's units are."""
        units = units or self.units
        pages = self.got.get(source_uri, {})
        done = [DOCUMENT_PAGE] if units.document <= pages.get(DOCUMENT_PAGE, set()) else []
        return done + [p for p in range(self.n_pages.get(source_uri, 1)) if units.page <= pages.get(p, set())]

    def done_units_of(self, source_uri: str, done_pages: list[int]) -> list[dict]:
        """The units published on pages not in `done_pages` (those pages still owe other units)."""
        skip = set(done_pages)
        return [{"page": page, "task": task, "question": question}
                for page, published in sorted(self.got.get(source_uri, {}).items()) if page not in skip
                for task, question in sorted(published, key=lambda unit: (unit[0], unit[1] or ""))]

    @property
    def done_pages(self) -> dict[str, list[int]]:
        """Sources with some but not all units published (under the job-wide units) -> their done pages."""
        partial = {}
        for source in self.got:
            done = self.done_pages_of(source)
            if len(done) < self.n_pages.get(source, 1) + 1:
                partial[source] = [p for p in done if p != DOCUMENT_PAGE]
        return partial

    def is_complete(self, source_uri: str, etag: str, units: Units | None = None) -> bool:
        if source_uri not in self.got:
            return False
        if etag and self.etags.get(source_uri) != etag:  # no ETag now (lookup failed): keep what is done
            return False
        return len(self.done_pages_of(source_uri, units)) == self.n_pages.get(source_uri, 1) + 1

    def is_stale(self, source_uri: str, etag: str) -> bool:
        """The source has rows, but they were made from a different version of it."""
        return source_uri in self.etags and bool(etag) and self.etags[source_uri] != etag


def read_ledger(store: ParquetStore, units: Units | set | None = None, errors_done: bool = True) -> Ledger:
    """Build the ledger from every published file. `units`: the job-wide units (a set of (task, question)
    means page units only), used where `is_complete`/`done_pages_of` are not given a source's own.
    `errors_done=False` (--retry-failed): error rows do not count as done, so their units are redone."""
    if isinstance(units, (set, frozenset)):
        units = Units(page=frozenset(units))
    ledger = Ledger(units=units or Units())
    by_source: dict[str, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    n_pages: dict[str, int] = {}
    seen = set()
    for path in store.data_files():  # one file at a time: a big output never sits in memory as rows
        table = store.read(path, LEDGER_COLUMNS)
        ledger.n_rows += table.num_rows
        for source, page, n, task, question, status, etag, model in zip(
                *(table[c].to_pylist() for c in LEDGER_COLUMNS)):
            key = (source, page, task, question)
            seen.add(key)
            ledger.etags[source] = etag or ""
            if model:
                ledger.models.add(model)
            n_pages[source] = max(n_pages.get(source, 1), n or 1)
            if status == "error":
                ledger.error_sources.add(source)
                if not errors_done:
                    seen.discard(key)
                    continue
            by_source[source][page].add((task, question))
    ledger.got = {source: dict(pages) for source, pages in by_source.items()}
    ledger.n_pages = n_pages
    ledger.done_keys = seen
    return ledger


def plan_before(ledger: Ledger, listing, units_of, store: ParquetStore, work: str, retry_failed: bool = False) -> dict:
    """The old write_plan loop: per listed source, the ledger's per-source checks, then plan files."""
    counts, buffer, files = {"planned": 0, "skipped": 0, "stale": 0, "retried": 0}, [], []

    def flush():
        if buffer:
            out = io.BytesIO()
            pq.write_table(table_from_rows(buffer, PLAN_SCHEMA), out)
            store.fs.makedirs(work, exist_ok=True)
            store.fs.pipe_file(f"{work}/plan-{len(files):06d}.parquet", out.getvalue())
            files.append(work)
            counts["planned"] += len(buffer)
            buffer.clear()

    for row in listing:
        uri, etag = row["source_uri"], row["etag"]
        units = units_of(row)
        if ledger.is_complete(uri, etag, units):
            counts["skipped"] += 1
            continue
        if ledger.is_stale(uri, etag):
            counts["stale"] += 1
        elif uri in ledger.got:
            row["done_pages"] = ledger.done_pages_of(uri, units)
            row["done_units"] = ledger.done_units_of(uri, row["done_pages"])
            row["known_pages"] = ledger.n_pages.get(uri)
        if retry_failed and uri in ledger.error_sources:
            counts["retried"] += 1
        buffer.append(row)
        if len(buffer) >= PLAN_ROWS_PER_FILE:
            flush()
    flush()
    return counts


def drop_done_before(batch, done: set, written: set):
    """The old jobs/runner.py _drop_done: a Python hash of every key this run wrote."""
    import pyarrow as pa

    from scriptorium.core.schema import KEY_COLUMNS

    keep = []
    for key in zip(*(batch[c].to_pylist() for c in KEY_COLUMNS)):
        digest, published = hash(key), key in done
        first_time = digest not in written
        written.add(digest)
        keep.append(first_time and not published)
    return batch if all(keep) else batch.filter(pa.array(keep))
