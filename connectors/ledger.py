"""The ledger: what a previous run already finished, read from the published files themselves.

A source is *complete* when, for its recorded source ETag, every page (0..n_pages-1) has a row for every
(task, question) the job asks of a page, and its document row (page = -1) has one for every unit asked
of the whole document (tasks with scope = "document"). The units are given per source when it is
planned, because QA questions may come per document from a manifest. Complete sources are skipped at
planning time without being read; partially done sources are read again, but only their missing pages
are rendered, and on those pages only the missing units are generated (the plan's `done_units`). Rows
for units already published that reach the sink anyway are dropped there.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from connectors.parquet_sink import ParquetStore
from core.schema import DOCUMENT_PAGE
from core.units import Units

LEDGER_COLUMNS = ["source_uri", "page", "n_pages", "task", "question", "status", "source_etag", "model"]


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
