"""A synthetic published output of N units and the listing a rerun would see, for bench/ledger.py.

The output is what the sink publishes after two runs over an archive of 50-page documents with two
tasks (OCR and caption): RESULT_SCHEMA files of `rows_per_file` rows, zstd, named as the sink names
them, each document's rows spread over neighbouring files in completion order. Among the documents:

- 1 in 500 is partly done (a killed run): pages 0-29 have both units, pages 30-39 only OCR, 40-49 none;
- 1 in 100 has an error row (page 10's caption): done for a plain rerun, redone by --retry-failed;
- the listing has every document, 1 in 1000 of them with a new ETag (changed since), plus 1% new ones.

Built once per size and folder (a `_complete` marker says it is whole), in parallel processes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from _synthetic import PAGES_PER_DOCUMENT, TASKS, ResultRows, source_etag, source_uri

UNITS_PER_DOCUMENT = PAGES_PER_DOCUMENT * len(TASKS)
PARTIAL_EVERY, ERROR_EVERY, STALE_EVERY, NEW_PER_100 = 500, 100, 1000, 1
COMPLETE_MARKER = "_complete"


def n_documents(units: int) -> int:
    return max(units // UNITS_PER_DOCUMENT, 1)


def is_partial(i):
    return i % PARTIAL_EVERY == 7


def has_error(i):
    return i % ERROR_EVERY == 3


def is_stale(i):
    return i % STALE_EVERY == 11


def _write_chunk(args) -> int:
    folder, first, count, rows_per_file, sequence, run_id = args
    rows = ResultRows(seed=first)
    unit = rows.rng.permutation(count * UNITS_PER_DOCUMENT)  # completion order, within a few files
    documents = first + unit // UNITS_PER_DOCUMENT
    pages = unit % UNITS_PER_DOCUMENT // len(TASKS)
    tasks = unit % len(TASKS)
    missing = is_partial(documents) & ((pages >= 40) | ((pages >= 30) & (tasks == 1)))
    documents, pages, tasks = documents[~missing], pages[~missing], tasks[~missing]
    failed = has_error(documents) & (pages == 10) & (tasks == 1)
    table = rows.table(documents, pages, tasks, run_id, failed)
    written = 0
    for start in range(0, table.num_rows, rows_per_file):
        name = f"part-{run_id}-{sequence + written:06d}-{uuid.UUID(int=first * 1000 + written).hex[-8:]}.parquet"
        pq.write_table(table.slice(start, rows_per_file), os.path.join(folder, name), compression="zstd")
        written += 1
    return written


def build(folder: Path, units: int, rows_per_file: int = 2000, workers: int = 2) -> Path:
    """The output of `units` units in `folder` (reused if a whole one is there already)."""
    if (folder / COMPLETE_MARKER).exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    documents = n_documents(units)
    chunk = max(rows_per_file * 2 // UNITS_PER_DOCUMENT, 1)  # a document's rows land in about two files
    files_per_chunk = -(-chunk * UNITS_PER_DOCUMENT // rows_per_file)
    jobs = []
    for number, first in enumerate(range(0, documents, chunk)):
        run_id = "bench-run-1" if first < documents // 2 else "bench-run-2"
        jobs.append((str(folder), first, min(chunk, documents - first), rows_per_file, number * files_per_chunk, run_id))
    with ProcessPoolExecutor(workers) as pool:
        sum(pool.map(_write_chunk, jobs, chunksize=16))
    (folder / COMPLETE_MARKER).write_text(f"{units} units, {documents} documents\n")
    return folder


def listing(units: int):
    """The plan rows list_inputs would yield for the archive now: every document, some changed, some new."""
    documents = n_documents(units)
    for i in range(documents + documents * NEW_PER_100 // 100):
        yield {"source_uri": source_uri(i), "size": 2_000_000 + i * 17 % 1_000_000,
               "etag": source_etag(i, version=1 if is_stale(i) else 0), "kind": "pdf", "error": None,
               "questions": None}
