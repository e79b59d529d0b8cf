"""`scriptorium report OUTPUT --html FILE`: one self-contained HTML page to review a run by eye.

It shows a sample of pages plus every page with an error row; each page is a card with a thumbnail of
the page image (jobs/report_thumbnails.py) next to its result rows (task, question, transcription/answer/
caption, status, error, confidence). Two selects filter the rows by status and by task, a third orders
the pages by confidence (the lowest token log-probability of their rows, worst first), in plain
JavaScript: no CDN, no network, one file to mail or attach to a ticket (jobs/report_page.py).
"""

from __future__ import annotations

import heapq
import zlib

import pyarrow as pa
import pyarrow.compute as pc

from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.connectors.storage import redact
from scriptorium.core.spec import StorageSpec
from scriptorium.pipeline.extraction import is_extract_answer
from scriptorium.jobs.report_page import NO_PREVIEW, render_html
from scriptorium.jobs.report_thumbnails import (
    THUMB_EDGE,
    sources_to_preview,
    thumbnail_page,
    thumbnail_settings,
    thumbnails,
)
from scriptorium.jobs.summary_files import load_summary
from scriptorium.jobs.summary_text import format_summary

KEY_COLUMNS = ["source_uri", "page", "status", "run_id"]
ROW_COLUMNS = ["source_uri", "page", "n_pages", "member", "task", "question", "text", "status", "error", "stage",
               "n_output_tokens", "truncated", "route", "logprob_mean", "logprob_min", "run_id", "source_size",
               "generation"]
MAX_ERROR_PAGES = 500  # pages with errors shown (all of them up to this many; the summary counts the rest)


def build_report(output: str, storage: StorageSpec, sample: int = 50, run_id: str | None = None,
                 thumb_edge: int = THUMB_EDGE) -> tuple[str, dict]:
    """The report's HTML and a few counts (pages, rows, errors left out). Raises SpecError when the
    output has no results."""
    store = ParquetStore(output, storage)
    summary = load_summary(store, run_id)  # SpecError for an empty output or an unknown run
    keys, errors_left_out = choose_pages(store, sample, run_id)
    rows = read_rows(store, keys, run_id)
    limits = (summary.get("run") or {}).get("limits") or {}
    manifest_allow = (limits.get("input") or {}).get("manifest_allow") or []
    storage = storage.updated(http_allow=tuple(manifest_allow))  # the run's policy for http(s) sources
    thumbs = thumbnails(sources_to_preview(keys, rows), storage, thumbnail_settings(limits, thumb_edge))
    page_thumbs = {(source, page): thumbs.get((source, thumbnail_page(page)), NO_PREVIEW) for source, page in keys}
    note = f"{errors_left_out} more pages with errors not shown" if errors_left_out else ""
    title = f"Scriptorium report: {redact(output)}" + (f" (run {run_id})" if run_id else "")
    page = render_html(title, format_summary(summary), rows, page_thumbs, note)
    return page, {"pages": len(keys), "rows": len(rows), "errors_left_out": errors_left_out}


def choose_pages(store: ParquetStore, sample: int, run_id: str | None, seed: int = 0) -> tuple[set, int]:
    """(source_uri, page) keys to show: every page with an error row (up to MAX_ERROR_PAGES) and a
    deterministic pseudo-random sample of `sample` other pages. Reads only the key columns.
    Returns (keys, number of error pages left out)."""
    error_pages: set[tuple] = set()
    sampled: list[tuple] = []  # heap of (-rank, key): the `sample` pages of smallest rank
    in_sample: set[tuple] = set()  # a page has a row per task: sample it once
    for path in store.data_files():
        keys = store.read(path, KEY_COLUMNS)
        if run_id:
            keys = keys.filter(pc.equal(keys["run_id"], run_id))
        for source, page, status in zip(*(keys[c].to_pylist() for c in ("source_uri", "page", "status"))):
            key = (source, page)
            if status == "error":
                error_pages.add(key)
            if key in in_sample:
                continue
            # The rank depends on the page only, so a page that left the sample can never come back.
            rank = zlib.crc32(f"{seed}|{source}|{page}".encode())
            if len(sampled) < sample:
                heapq.heappush(sampled, (-rank, key))
                in_sample.add(key)
            elif sample and -sampled[0][0] > rank:
                in_sample.discard(heapq.heapreplace(sampled, (-rank, key))[1])
                in_sample.add(key)
    errors = sorted(error_pages)
    chosen = set(errors[:MAX_ERROR_PAGES]) | {key for _, key in sampled}
    return chosen, max(len(errors) - MAX_ERROR_PAGES, 0)


def read_rows(store: ParquetStore, keys: set, run_id: str | None) -> list[dict]:
    """Every result row of the chosen pages."""
    sources = pa.array(sorted({source for source, _ in keys}), pa.string())
    rows = []
    for path in store.data_files():
        table = store.read(path, ROW_COLUMNS)
        table = table.filter(pc.is_in(table["source_uri"], value_set=sources))
        if run_id:
            table = table.filter(pc.equal(table["run_id"], run_id))
        for row in table.to_pylist():
            if (row["source_uri"], row["page"]) in keys:
                rows.append({**row, "extracted": is_extract_answer(row["generation"])})
    return sorted(rows, key=lambda r: (r["source_uri"], r["page"], r["task"] or "", r["question"] or ""))
