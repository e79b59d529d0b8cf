"""The sink's safety net: each unit reaches the output at most once, whatever Ray delivers.

Planning keeps published units out of the pipeline (`done_pages`, `done_units`), so normally nothing
here fires; the warnings say when it does. Two things could still bring a unit to the sink again:

- a unit published before this run (a planning bug): checked against the ledger's page bitmaps,
  which stay in the ledger's DuckDB tables (`Ledger.published`), not in Python;
- a unit this run wrote already: Ray retries a task whose worker or model replica died, and the retry
  runs its whole input block again; when the second attempt cuts its output into blocks differently
  (a batch halved after an out-of-memory error, the crash journal generating pages one by one), rows
  the first attempt had delivered come again. The retry follows the first attempt by one restart,
  so the rows come back while their source is still among the most recently written: this run's
  keys are kept, exactly, for the RECENT_SOURCES sources written most recently.

Keys are exact (source, page, task, question), never hashes: a collision would drop a distinct row
without a trace. They are kept compactly: per source, one bitmap of pages per (task, question).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from scriptorium.core.schema import KEY_COLUMNS

log = logging.getLogger("scriptorium")

# Sources whose written keys are kept. A source costs ~0.5 KB (more for thousands of pages), so at
# most ~50 MB; a task retry re-delivers within far fewer sources than this (all the pages in flight
# across a cluster belong to a few thousand documents).
RECENT_SOURCES = 100_000


class WrittenKeys:
    """The units this run wrote, per source, for the most recently written sources."""

    def __init__(self, capacity: int = RECENT_SOURCES):
        self.capacity = capacity
        self._sources: OrderedDict[str, dict] = OrderedDict()  # source -> (task, question) -> page bitmap

    def add(self, source: str, page: int, task: str, question: str | None) -> bool:
        """Record a unit; False if it was recorded already (a second delivery)."""
        units = self._sources.get(source)
        if units is None:
            units = self._sources[source] = {}
            if len(self._sources) > self.capacity:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        bit = 1 << (page + 1)  # bit 0: the document row (page -1)
        pages = units.get((task, question), 0)
        units[(task, question)] = pages | bit
        return not pages & bit

    def __len__(self) -> int:
        return len(self._sources)


class SinkGuard:
    """Drops the rows of a result batch whose unit is published already or was written by this run."""

    def __init__(self, ledger, capacity: int = RECENT_SOURCES):
        self.ledger = ledger
        self.written = WrittenKeys(capacity)

    def drop_done(self, batch: pa.Table) -> pa.Table:
        published = self.ledger.published(batch)
        keep = np.ones(batch.num_rows, bool)
        again = redone = 0
        for row, key in enumerate(zip(*(batch[c].to_pylist() for c in KEY_COLUMNS))):
            source, page, task, question = key
            if published[row]:
                keep[row] = False
                redone += 1
            elif not self.written.add(source, page, task, question):
                keep[row] = False
                again += 1
        if again:
            log.warning("dropped %d rows for units this run had already written", again)
        if redone:
            log.warning("dropped %d rows for units published before this run", redone)
        return batch if keep.all() else batch.filter(pa.array(keep))
