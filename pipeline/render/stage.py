"""The render stage: planned inputs in, one row per page out (errors included), a few pages at a time.

Each planned input is read (or taken from the row's `data`, when a caller hands bytes instead of a URI),
opened by its kind's decoder (sources.py: decoders.py, or shards.py for tar and Parquet shards of images) in the render
sandbox (sandbox.py), and its pages that are not done yet come out as rows. Whatever goes wrong with one
input becomes error rows for it, and every page owed ends as exactly one row. For tasks with scope =
"document" the stage also builds each document's multi-image row (documents.py).
"""

from __future__ import annotations

import logging
from typing import Iterator

import pyarrow as pa

from scriptorium.connectors.storage import read_bytes, redact
from scriptorium.core.errors import PageError
from scriptorium.core.kinds import IMAGE_EXTENSIONS, KINDS
from scriptorium.core.schema import PAGE_SCHEMA, PLAN_SCHEMA, SOURCE_COLUMNS, table_from_rows
from scriptorium.core.spec import RenderSpec, StorageSpec
from scriptorium.core.units import units_by_page
from scriptorium.pipeline.metrics import Meter
from scriptorium.pipeline.render.decoders import describe
from scriptorium.pipeline.render.documents import with_document_row
from scriptorium.pipeline.render.sandbox import SandboxUnavailable, sandbox_for_this_thread
from scriptorium.pipeline.render.sources import source_frames

log = logging.getLogger("scriptorium")


def pages_of(plan_row: dict, settings: RenderSpec, storage: StorageSpec) -> Iterator[dict]:
    """All page rows of one planned input, errors included. Never raises for a bad input.

    Exactly one row for every page not already done (`done_pages`): a page that fails is an error row
    for that page; a file that cannot be listed, read or opened is an error row on every page it still
    owes (page 0 for a new file); a document that fails part-way has error rows for the rest.
    """
    base = {k: plan_row.get(k) for k in SOURCE_COLUMNS}
    published = units_by_page(plan_row)

    def page_row(number: int, **values) -> dict:
        return {**base, "page": number, "done_units": published.get(number), **values}

    skip = set(plan_row.get("done_pages") or [])
    known = plan_row.get("known_pages")
    # A file that cannot be listed, read or opened: one error row on each page it still owes. For a
    # partly done source the ledger knows how many; a new one owes its first page.
    owed = [p for p in range(known) if p not in skip] if known else [next(p for p in range(len(skip) + 1) if p not in skip)]

    def whole_file_failed(error: str, stage: str) -> Iterator[dict]:
        for page in owed:
            yield page_row(page, n_pages=known, status="error", error=error, stage=stage)

    kind = plan_row.get("kind")
    if plan_row.get("error"):
        yield from whole_file_failed(plan_row["error"], "list")
        return
    if kind not in KINDS:  # known from the name: not worth reading
        name = plan_row["source_uri"].rsplit("/", 1)[-1]
        reason = (f"unsupported file type: {name} (not a PDF, a .tar or .parquet shard of images, or one of "
                  f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        yield from whole_file_failed(reason, "list")
        return
    size, memory_limit = plan_row.get("size"), settings.max_memory_mb * 2**20
    if size and 0 < memory_limit < size:  # the renderer holds a file whole: not worth reading
        yield from whole_file_failed(f"file is {size} bytes, more than render.max_memory_mb={settings.max_memory_mb}: "
                                     "too large to render", "read")
        return
    try:
        data = plan_row.get("data")
        if data is None:  # a signed URL's query string is in `fetch_uri` only, never in `source_uri`
            data = read_bytes(plan_row.get("fetch_uri") or plan_row["source_uri"], storage)
    except Exception as exc:
        yield from whole_file_failed(redact(f"cannot read: {describe(exc)}"), "read")
        return
    stage = "render" if kind == "pdf" else "decode"
    frames = isolated_frames if settings.sandbox else source_frames
    n_pages, emitted = None, set()
    try:
        for frame in frames(kind, data, settings, skip):
            n_pages = frame["n_pages"]
            if frame["page"] in emitted:
                continue  # never two rows for one page
            emitted.add(frame["page"])
            error = frame.pop("error", None)
            yield page_row(frame.pop("page"), **frame, status="error" if error else "ok", error=error,
                           stage=stage if error else None)
        return
    except PageError as exc:
        reason = str(exc)
    except Exception as exc:
        reason = f"{stage} failed: {describe(exc)}"
    if n_pages is None:  # the file never opened
        yield from whole_file_failed(reason, stage)
        return
    for number in range(n_pages):  # the document failed part-way: its remaining pages say why
        if number not in skip and number not in emitted:
            yield page_row(number, n_pages=n_pages, status="error", error=reason, stage=stage)


def isolated_frames(kind: str, data: bytes, settings: RenderSpec, skip: set[int]) -> Iterator[dict]:
    """`source_frames`, but rendered in this thread's sandbox process (sandbox.py)."""
    sandbox = sandbox_for_this_thread()
    try:
        sandbox.ensure_started()
    except SandboxUnavailable as exc:  # no process can be started here: the soft limit only
        if not sandbox.warned:
            log.warning("rendering in-process, without a hard time limit: %s", exc)
            sandbox.warned = True
        return source_frames(kind, data, settings, skip)
    return sandbox.frames(kind, data, settings, skip)


class RenderPages:
    """Plan rows in, page rows out, a few pages at a time so memory stays bounded."""

    input_schema, output_schema = PLAN_SCHEMA, PAGE_SCHEMA

    def __init__(self, render: RenderSpec, storage: StorageSpec, document_window: int = 0,
                 page_rows: bool = True, pages_per_block: int = 4, meter: Meter = Meter()):
        self.meter = meter
        self.render = render
        self.storage = storage
        self.document_window = document_window  # > 0: also one document row of that many pages (documents.py)
        self.page_rows = page_rows  # False when no task works per page: only document rows come out
        self.pages_per_block = pages_per_block

    def rows_of(self, plan_row: dict) -> Iterator[dict]:
        def render(row: dict) -> Iterator[dict]:
            return pages_of(row, self.render, self.storage)

        if not self.document_window:
            return render(plan_row)
        return with_document_row(plan_row, render, self.document_window, self.page_rows)

    def __call__(self, plan: pa.Table) -> Iterator[pa.Table]:
        pending: list[dict] = []
        read_bytes = 0
        for row in plan.to_pylist():
            was_read = False  # some page got past reading the file: its bytes count as read
            for page in self.rows_of(row):
                was_read = was_read or page["status"] == "ok" or page["stage"] not in ("list", "read")
                pending.append(page)
                if len(pending) >= self.pages_per_block:
                    yield self._block(pending)
                    pending = []
            if was_read:
                read_bytes += row["size"] or len(row.get("data") or b"")
        if pending:
            yield self._block(pending)
        self.meter.bytes_read(read_bytes)

    def _block(self, pages: list[dict]) -> pa.Table:
        self.meter.pages("render", pages)
        return table_from_rows(pages, PAGE_SCHEMA)
