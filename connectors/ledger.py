"""The ledger: what a previous run already finished, read from the published files themselves.

A source is *complete* when, for its recorded source ETag, every page (0..n_pages-1) has a row for every
(task, question) the job asks of a page, and its document row (page = -1) has one for every unit asked
of the whole document (tasks with scope = "document"). The units are given per source when it is
planned, because QA questions may come per document from a manifest. Complete sources are skipped at
planning time without being read; partially done sources are read again, but only their missing pages
are rendered, and on those pages only the missing units are generated (the plan's `done_units`). Rows
for units already published that reach the sink anyway are dropped there (connectors/sink_guard.py).
A source whose rows were made from another version of it (another ETag, or several) is *stale*: its
rows are replaced. Error rows are answers too, unless the run retries them (`errors_done=False`).

How it stays small at 10^8 units: the published files are read once, by one DuckDB query over their
key columns (connectors/output_query.py), into two compact tables in a temporary DuckDB database:
`sources` (one row per source: page count, ETag, errors) and `bits` (one row per source, unit and 64
pages: the pages that have the unit, as a bitmap). A 50-page document with two tasks is three rows
in all. The listing is then looked up in batches, one join each, and each source's pages are decided
with exact set arithmetic on its bitmaps (Python integers, bit p = page p). No Python object is ever
held per published unit, and the published files stay the only source of truth: nothing is kept
beside them between runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scriptorium.connectors.output_query import PAGE_WORD_BITS, PublishedFiles, connect, page_bit, page_word
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.schema import DOCUMENT_PAGE, KEY_COLUMNS
from scriptorium.core.units import Units

log = logging.getLogger("scriptorium")

LEDGER_COLUMNS = ["source_uri", "page", "n_pages", "task", "question", "status", "source_etag", "model"]
LOOKUP_BATCH = 20_000  # listing rows looked up per join: one scan of the ledger's tables each


@dataclass(slots=True)  # one is made per listed source: slots make that cheap
class SourceRecord:
    """What the published files hold for one source (counting only rows that count as done)."""

    has_rows: bool = False  # any row at all, error rows included
    n_pages: int = 1
    etag: str | None = ""  # the ETag its rows were made from; None when they disagree
    has_errors: bool = False
    has_done: bool = False  # some unit is published (and counts as done)
    complete_for: Units | None = None  # units it is known to have in full (the job-wide ones), if so
    pages: dict = field(default_factory=dict)  # (task, question) -> bitmap of the pages that have it
    document: frozenset = frozenset()  # (task, question) published on the document row

    def done_page_mask(self, units: Units) -> int:
        """Bitmap of the pages 0..n_pages-1 with every page unit published."""
        mask = (1 << self.n_pages) - 1
        if units == self.complete_for:
            return mask
        for unit in units.page:
            mask &= self.pages.get(unit, 0)
        return mask

    def document_done(self, units: Units) -> bool:
        return units == self.complete_for or units.document <= self.document

    def done_pages(self, units: Units) -> list[int]:
        """Pages with every unit published, and DOCUMENT_PAGE first when the document row's units are."""
        done = [DOCUMENT_PAGE] if self.document_done(units) else []
        return done + _set_bits(self.done_page_mask(units))

    def done_units(self, done_pages: list[int]) -> list[dict]:
        """The units published on pages not in `done_pages` (those pages still owe other units)."""
        skip = set(done_pages)
        by_page: dict[int, list] = {}
        if DOCUMENT_PAGE not in skip:
            for unit in self.document:
                by_page.setdefault(DOCUMENT_PAGE, []).append(unit)
        for unit, bits in self.pages.items():
            for page in _set_bits(bits):
                if page not in skip:
                    by_page.setdefault(page, []).append(unit)
        return [{"page": page, "task": task, "question": question}
                for page in sorted(by_page)
                for task, question in sorted(by_page[page], key=lambda unit: (unit[0], unit[1] or ""))]

    def is_complete(self, etag: str | None, units: Units) -> bool:
        if not self.has_done:
            return False
        if etag and self.etag != etag:  # no ETag now (lookup failed): keep what is done
            return False
        if units == self.complete_for:
            return True
        return units.document <= self.document and self.done_page_mask(units).bit_count() == self.n_pages

    def is_stale(self, etag: str | None) -> bool:
        """The source has rows, but they were made from a different version of it."""
        return self.has_rows and bool(etag) and self.etag != etag


NO_ROWS = SourceRecord()


def _set_bits(bits: int) -> list[int]:
    """The positions of the set bits, ascending."""
    positions = []
    while bits:
        low = bits & -bits
        positions.append(low.bit_length() - 1)
        bits ^= low
    return positions


class PageCounts:
    """Pages a previous run finished, for each partly done source: what the progress line needs to
    tell when such a document is done. Sorted 64-bit hashes and counts in two numpy arrays (12 bytes
    a source); a hash collision could only misplace a count in the progress line, never a row."""

    def __init__(self, uris: Iterable[str] = (), counts: Iterable[int] = ()):
        hashes = np.fromiter((hash(uri) for uri in uris), np.int64)
        order = np.argsort(hashes)
        self.hashes, self.counts = hashes[order], np.fromiter(counts, np.int32, len(hashes))[order]

    def get(self, uri: str, default: int = 0) -> int:
        key = hash(uri)
        at = int(np.searchsorted(self.hashes, key))
        return int(self.counts[at]) if at < len(self.hashes) and self.hashes[at] == key else default

    def __len__(self) -> int:
        return len(self.hashes)


class SourceSet:
    """A set of source URIs as sorted 64-bit hashes (8 bytes a source). `contains` may say yes for a
    source not in it (a hash collision), never no for one in it: fit to skip work, not to decide."""

    def __init__(self):
        self._hashes = np.zeros(0, np.int64)
        self._added: list[np.ndarray] = []  # sorted in on the next `contains`

    def add(self, uris: list[str]) -> None:
        if uris:
            self._added.append(np.fromiter((hash(uri) for uri in uris), np.int64, len(uris)))

    def contains(self, uri: str) -> bool:
        if self._added:
            self._hashes, self._added = np.unique(np.concatenate([self._hashes, *self._added])), []
        key = hash(uri)
        at = int(np.searchsorted(self._hashes, key))
        return at < len(self._hashes) and self._hashes[at] == key


class Ledger:
    """The published output's completion state, in a temporary DuckDB database of two small tables."""

    def __init__(self, store: ParquetStore, units: Units, errors_done: bool = True):
        self.units = units  # the job-wide units: `sources` says which sources have all of them
        self._looked_up: SourceSet | None = None  # listed sources with units published, not all done
        folder = tempfile.mkdtemp(prefix="scriptorium-ledger-")
        self.db = connect(folder, os.path.join(folder, "ledger.duckdb"))
        self._cleanup = weakref.finalize(self, _remove_database, self.db, folder)  # also if never closed
        self.n_rows, self.models, self.duplicate_rows = self._read(store, errors_done)
        if self.duplicate_rows:
            log.warning("output %s holds %d rows for units published more than once", store.uri,
                        self.duplicate_rows)

    def _read(self, store: ParquetStore, errors_done: bool) -> tuple[int, set[str], int]:
        """One scan of every published file into `bits` and `sources`; returns (rows, models, duplicates)."""
        counted = "TRUE" if errors_done else "status IS DISTINCT FROM 'error'"
        files = PublishedFiles(self.db, store, store.data_files(), LEDGER_COLUMNS)
        # The scan groups by every column it needs whole (a source's ETag, model and status are
        # the same on all its rows, normally: no extra groups), which is cheaper than aggregating them.
        files.execute(f"""
            CREATE TEMP TABLE words AS
            SELECT source_uri, task, question, {page_word()} AS word, source_etag, model, status,
                   bit_or({page_bit()}) AS bits, count(*) AS n_rows, max(n_pages) AS n_pages
            FROM {{rows}} GROUP BY source_uri, task, question, word, source_etag, model, status""")
        self.db.execute(f"""
            CREATE TABLE bits AS
            SELECT source_uri, task, question, word, bit_or(bits) AS bits
            FROM words WHERE {counted} GROUP BY source_uri, task, question, word""")
        self._create_sources(counted)
        n_rows, counted_rows = self.db.execute(
            f"SELECT coalesce(sum(n_rows), 0), coalesce(sum(n_rows) FILTER (WHERE {counted}), 0) FROM words").fetchone()
        distinct_units = self.db.execute("SELECT coalesce(sum(bit_count(bits)), 0) FROM bits").fetchone()[0]
        models = {m for (m,) in self.db.execute("SELECT DISTINCT model FROM words WHERE model IS NOT NULL").fetchall()}
        self.db.execute("DROP TABLE words")
        self._has_bits = distinct_units > 0
        return int(n_rows), models, int(counted_rows - distinct_units)

    def _create_sources(self, counted: str) -> None:
        """One row per source: its facts, and how far it is under the job-wide units (`done_pages`:
        pages with every page unit; `complete`), so a listed source that needs just those units is
        decided without its bitmaps leaving DuckDB."""
        page_units, document_units = self.units.page, self.units.document
        self.db.register("page_units", _units_table(page_units))
        self.db.register("document_units", _units_table(document_units))
        try:
            self.db.execute(f"""
                CREATE TABLE sources AS
                WITH facts AS (
                    SELECT source_uri, greatest(coalesce(max(n_pages), 1), 1) AS n_pages,
                           CASE WHEN min(coalesce(source_etag, '')) = max(coalesce(source_etag, ''))
                                THEN min(coalesce(source_etag, '')) END AS etag,
                           bool_or(status = 'error') AS has_errors, bool_or({counted}) AS has_done
                    FROM words GROUP BY source_uri),
                unit_words AS (  -- per 64 pages: the pages that have every page unit
                    SELECT b.source_uri, b.word, bit_and(b.bits) AS bits, count(*) AS units
                    FROM bits b JOIN page_units u ON b.task = u.task AND b.question IS NOT DISTINCT FROM u.question
                    WHERE b.word >= 0 GROUP BY b.source_uri, b.word),
                pages_done AS (
                    SELECT w.source_uri, sum(bit_count(w.bits & {_first_pages('f.n_pages', 'w.word')})) AS pages
                    FROM unit_words w JOIN facts f USING (source_uri)
                    WHERE w.units = {len(page_units)} GROUP BY w.source_uri),
                documents_done AS (
                    SELECT b.source_uri FROM bits b JOIN document_units u
                      ON b.task = u.task AND b.question IS NOT DISTINCT FROM u.question
                    WHERE b.word = -1 GROUP BY b.source_uri HAVING count(*) = {len(document_units)})
                SELECT f.*, {"coalesce(p.pages, 0)" if page_units else "f.n_pages"} AS done_pages,
                       {"d.source_uri IS NOT NULL" if document_units else "TRUE"} AS document_done
                FROM facts f LEFT JOIN pages_done p USING (source_uri) LEFT JOIN documents_done d USING (source_uri)""")
        finally:
            self.db.unregister("page_units")
            self.db.unregister("document_units")

    # -- looking sources up ------------------------------------------------------------------------
    def look_up(self, listing: Iterable[dict], units_of: Callable[[dict], Units]
                ) -> Iterator[tuple[dict, Units, SourceRecord]]:
        """(plan row, the units it needs, its source's record) for each listed row, in listing order,
        a batch at a time: one join for the batch, one more for the bitmaps of the sources that are
        not simply complete under the job-wide units."""
        rows = iter(listing)
        while batch := list(islice(rows, LOOKUP_BATCH)):
            units = [units_of(row) for row in batch]
            facts = self._facts([row["source_uri"] for row in batch])
            detailed = [row["source_uri"] for row, needs in zip(batch, units)
                        if row["source_uri"] in facts and not (needs == self.units and facts[row["source_uri"]][-1])]
            pages, documents = self._bits(detailed)
            if self._looked_up is None:
                self._looked_up = SourceSet()
            self._looked_up.add(detailed)
            for row, needs in zip(batch, units):
                uri = row["source_uri"]
                fact = facts.get(uri)
                if fact is None:
                    yield row, needs, NO_ROWS
                    continue
                n_pages, etag, has_errors, has_done, complete = fact
                yield row, needs, SourceRecord(True, n_pages, etag, has_errors, has_done,
                                               self.units if complete else None,
                                               pages.get(uri, {}), frozenset(documents.get(uri, ())))

    def _facts(self, uris: list[str]) -> dict[str, tuple]:
        """uri -> (n_pages, etag, has_errors, has_done, complete under the job-wide units)."""
        rows = self._join(uris, """
            SELECT s.source_uri, s.n_pages, s.etag, s.has_errors, s.has_done,
                   s.has_done AND s.done_pages = s.n_pages AND s.document_done
            FROM wanted JOIN sources s USING (source_uri)""")
        return {uri: fact for uri, *fact in rows}

    def _bits(self, uris: list[str]) -> tuple[dict[str, dict], dict[str, set]]:
        """For those sources: (task, question) -> page bitmap, and the units of their document rows."""
        pages: dict[str, dict] = {}
        documents: dict[str, set] = {}
        for uri, task, question, word, bits in self._join(uris, "SELECT b.* FROM wanted JOIN bits b USING (source_uri)"):
            if word == -1:
                documents.setdefault(uri, set()).add((task, question))
            else:
                unit_pages = pages.setdefault(uri, {})
                unit_pages[(task, question)] = unit_pages.get((task, question), 0) | bits << (PAGE_WORD_BITS * word)
        return pages, documents

    def _join(self, uris: list[str], query: str) -> list[tuple]:
        """Rows of `query`, in which `wanted` is the table of `uris`."""
        if not uris:
            return []
        self.db.register("wanted", pa.table({"source_uri": pa.array(uris, pa.string())}))
        try:
            return self.db.execute(query).fetchall()
        finally:
            self.db.unregister("wanted")

    def source(self, uri: str, units: Units | None = None) -> SourceRecord:
        """One source's record (for a listing, `look_up` asks for thousands at a time)."""
        [(_, _, record)] = self.look_up([{"source_uri": uri}], lambda row: units or self.units)
        return record

    def is_complete(self, uri: str, etag: str | None, units: Units | None = None) -> bool:
        return self.source(uri, units).is_complete(etag, units or self.units)

    def is_stale(self, uri: str, etag: str | None) -> bool:
        return self.source(uri).is_stale(etag)

    def done_pages_of(self, uri: str, units: Units | None = None) -> list[int]:
        return self.source(uri, units).done_pages(units or self.units)

    # -- during the run --------------------------------------------------------------------------------
    def done_page_counts(self) -> PageCounts:
        """Sources with some but not all units published (under the job-wide units) -> how many of
        their pages are done, for the progress line (a previous run's pages will not come out again)."""
        rows = self.db.execute("""
            SELECT source_uri, done_pages FROM sources
            WHERE done_pages > 0 AND NOT (has_done AND done_pages = n_pages AND document_done)""").fetchall()
        return PageCounts((uri for uri, _ in rows), (pages for _, pages in rows))

    def published(self, batch: pa.Table) -> np.ndarray:
        """For each row of a result batch: is its unit published already (counted as done)?

        Only rows of sources that `look_up` found with published units not known to be all done can
        be (the others are complete, and never planned, or new); the rest are answered without asking
        DuckDB, so a run of new sources costs no query at all. Before any `look_up`, every row is
        checked."""
        found = np.zeros(batch.num_rows, bool)
        if not self._has_bits or not batch.num_rows:
            return found
        rows = np.arange(batch.num_rows)
        if self._looked_up is not None:
            sources = pc.unique(batch["source_uri"]).to_pylist()
            candidates = [uri for uri in sources if self._looked_up.contains(uri)]
            if not candidates:
                return found
            rows = np.flatnonzero(pc.is_in(batch["source_uri"], value_set=pa.array(candidates, pa.string())))
        keys = batch.select(list(KEY_COLUMNS)).take(rows).append_column("row", pa.array(rows))
        self.db.register("result_keys", keys)
        try:
            hits = self.db.execute(f"""
                SELECT k.row FROM result_keys k JOIN bits b
                  ON b.source_uri = k.source_uri AND b.task = k.task AND b.question IS NOT DISTINCT FROM k.question
                 AND b.word = {page_word('k.page')}
                WHERE b.bits & {page_bit('k.page')} <> 0""").fetchnumpy()["row"]
        finally:
            self.db.unregister("result_keys")
        found[hits] = True
        return found

    def forget(self, uris: list[str]) -> None:
        """Drop sources whose published rows were just deleted (stale ones), without reading again."""
        if uris:
            self.db.register("gone", pa.table({"source_uri": pa.array(uris, pa.string())}))
            try:
                for table in ("sources", "bits"):
                    self.db.execute(f"DELETE FROM {table} WHERE source_uri IN (SELECT source_uri FROM gone)")
            finally:
                self.db.unregister("gone")

    def close(self) -> None:
        self._cleanup()


def _remove_database(db, folder: str) -> None:
    db.close()
    shutil.rmtree(folder, ignore_errors=True)


def _units_table(units: frozenset) -> pa.Table:
    return pa.table({"task": pa.array([t for t, _ in units], pa.string()),
                     "question": pa.array([q for _, q in units], pa.string())})


def _first_pages(n_pages: str, word: str) -> str:
    """SQL: the bits of `word` that stand for pages below `n_pages`."""
    return (f"(CASE WHEN {n_pages} >= {PAGE_WORD_BITS} * ({word} + 1) THEN 18446744073709551615::UBIGINT "
            f"WHEN {n_pages} <= {PAGE_WORD_BITS} * {word} THEN 0::UBIGINT "
            f"ELSE (1::UBIGINT << ({n_pages} - {PAGE_WORD_BITS} * {word})) - 1 END)")


def read_ledger(store: ParquetStore, units: Units | set | None = None, errors_done: bool = True) -> Ledger:
    """Build the ledger from every published file. `units`: the job-wide units (a set of (task, question)
    means page units only), used where `is_complete`/`done_pages_of` are not given a source's own.
    `errors_done=False` (--retry-failed): error rows do not count as done, so their units are redone."""
    if isinstance(units, (set, frozenset)):
        units = Units(page=frozenset(units))
    return Ledger(store, units or Units(), errors_done)
