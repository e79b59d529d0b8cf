"""Progress while a job runs: documents and pages done/failed, pages/s, tokens/s and an ETA.

On a terminal it is one status line, redrawn in place a few times a second; elsewhere (CI, cron, a log
file) it is a plain log line every `every_s` seconds, plus a last one when the run ends:

    docs 12/40 (1 failed, 3 skipped) | pages 87 (2 failed) | 1.9 pages/s | 41 tok/s | ETA 2:31 | 0:46

The driver feeds it every result batch (`update`), so it counts what has really come out of the model.
A page counts as done when its first result row arrives (its other tasks' rows follow close behind), a
document when all its pages are; a page or document counts as failed when any of its rows is an error.
Finished documents are remembered (the last REMEMBERED of them, as the bitmap of their failed pages, so
memory stays bounded on millions of documents) so that their late task rows are not counted twice; a
document still open holds two bitmaps of its pages, never a per-page list. The ETA extrapolates the documents done
so far over the documents left.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, TextIO

import pyarrow as pa

from scriptorium.jobs.summary_text import format_duration

log = logging.getLogger("scriptorium.progress")

PROGRESS_COLUMNS = ["source_uri", "page", "n_pages", "status", "n_input_tokens", "n_output_tokens"]
REMEMBERED = 100_000  # finished documents kept to recognise their late rows


@dataclass
class _Document:
    n_pages: int
    pages: int = 0  # bitmap of the pages with a row so far (bit p: page p)
    n_seen: int = 0  # how many bits `pages` has set
    failed: int = 0  # bitmap of the failed rows' pages (bit p + 1: page p; bit 0: the document row)


class Progress:
    def __init__(
        self,
        documents: int,
        skipped_documents: int = 0,
        done_pages: Mapping[str, int] | None = None,
        stream: TextIO | None = None,
        live: bool | None = None,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`documents`: planned this run; `done_pages`: pages of partly done documents that a previous
        run finished (they will not come out again; a dict, or the ledger's PageCounts); `live`: redraw a status line (default: when
        `stream` is a terminal), else log a line every `every_s` seconds."""
        self.documents = documents
        self.skipped_documents = skipped_documents
        self.stream = stream or sys.stderr
        self.live = _is_terminal(self.stream) if live is None else live
        self.every_s = every_s
        self.clock = clock
        self.started = clock()
        self._done_before = done_pages or {}
        self._open: dict[str, _Document] = {}  # documents with some but not all pages out
        self._finished: OrderedDict[str, int] = OrderedDict()  # source -> its failed pages (bitmap)
        self.docs_done = self.docs_failed = 0
        self.pages_done = self.pages_failed = 0
        self.rows = self.input_tokens = self.output_tokens = 0
        self._last_shown = float("-inf")
        self._drawn = False

    # -- counting ----------------------------------------------------------------------------------
    def update(self, batch: pa.Table) -> None:
        """Count one result batch and show progress if it is time to."""
        self.rows += batch.num_rows
        for row in batch.select(PROGRESS_COLUMNS).to_pylist():
            self.input_tokens += row["n_input_tokens"] or 0
            self.output_tokens += row["n_output_tokens"] or 0
            self._count_page(row)
        self.show()

    def _count_page(self, row: dict) -> None:
        source, page, failed = row["source_uri"], row["page"], row["status"] == "error"
        row_bit = 1 << (page + 1)
        doc = self._open.get(source)
        if doc is None:
            failed_before = self._finished.get(source)
            if failed_before is not None:  # a late row of a finished document
                if failed and not failed_before & row_bit:
                    self.docs_failed += not failed_before  # the first failure of a finished document
                    self.pages_failed += page >= 0
                    self._finished[source] = failed_before | row_bit
                return
            doc = self._open[source] = _Document(n_pages=row["n_pages"] or 1)
        if page >= 0 and not doc.pages >> page & 1:  # page -1: a whole-document row
            doc.pages |= 1 << page
            doc.n_seen += 1
            self.pages_done += 1
        if failed and not doc.failed & row_bit:
            self.pages_failed += page >= 0
            doc.failed |= row_bit
        if doc.n_seen + self._done_before.get(source, 0) >= doc.n_pages:
            self._finish(source, doc)

    def _finish(self, source: str, doc: _Document) -> None:
        self.docs_done += 1
        self.docs_failed += bool(doc.failed)
        del self._open[source]
        self._finished[source] = doc.failed
        if len(self._finished) > REMEMBERED:
            self._finished.popitem(last=False)

    # -- rates ---------------------------------------------------------------------------------------
    @property
    def elapsed_s(self) -> float:
        return max(self.clock() - self.started, 1e-9)

    @property
    def pages_per_s(self) -> float:
        return self.pages_done / self.elapsed_s

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far; None until a document is done."""
        return eta_seconds(self.elapsed_s, self.docs_done, self.documents)

    def line(self) -> str:
        docs = f"docs {self.docs_done}/{self.documents}"
        notes = [f"{self.docs_failed} failed"] if self.docs_failed else []
        if self.skipped_documents:
            notes.append(f"{self.skipped_documents} skipped")
        if notes:
            docs += f" ({', '.join(notes)})"
        pages = f"pages {self.pages_done}" + (f" ({self.pages_failed} failed)" if self.pages_failed else "")
        eta = self.eta_s
        return " | ".join([
            docs, pages, f"{self.pages_per_s:.2f} pages/s", f"{self.tokens_per_s:.1f} tok/s",
            "ETA " + (format_duration(eta) if eta is not None else "?"), format_duration(self.elapsed_s),
        ])

    # -- display -------------------------------------------------------------------------------------
    def show(self, force: bool = False) -> None:
        now = self.clock()
        interval = 0.25 if self.live else self.every_s
        if not force and now - self._last_shown < interval:
            return
        self._last_shown = now
        if self.live:
            width = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r\x1b[K" + self.line()[: width - 1])
            self.stream.flush()
            self._drawn = True
        else:  # with JSON logs (jobs/logs.py), an event with the figures as fields
            eta = self.eta_s
            log.info("progress: %s", self.line(), extra={"event": "progress", "fields": {
                "documents_done": self.docs_done, "documents": self.documents, "documents_failed": self.docs_failed,
                "documents_skipped": self.skipped_documents, "pages_done": self.pages_done,
                "pages_failed": self.pages_failed, "pages_per_s": round(self.pages_per_s, 4),
                "output_tokens_per_s": round(self.tokens_per_s, 2), "elapsed_s": round(self.elapsed_s, 1),
                "eta_s": None if eta is None else round(eta, 1)}})

    def close(self) -> None:
        """Show the final numbers (and end the status line, so later output starts on a new line)."""
        self.show(force=True)
        if self.live and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        self.show(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def eta_seconds(elapsed_s: float, done: int, total: int) -> float | None:
    """Seconds left to do `total` documents at the pace of the `done` ones so far; None until one is done.
    The progress line's ETA, and `scriptorium status`'s (jobs/status.py)."""
    if done <= 0:
        return None
    return elapsed_s * max(total - done, 0) / done


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
