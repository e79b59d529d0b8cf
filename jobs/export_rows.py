"""The rows of an output grouped into documents, in bounded memory however large the output.

The rows of one document may lie in many files written by several runs. Two passes group them: `spill`
copies the rows, one published file at a time, into buckets on local disk by a hash of their source (all
of a document's rows land in one bucket), and `sorted_rows` reads one bucket at a time (about
`bucket_mb`), sorted by source, page, task and question, for `documents` to cut into Documents. Memory
holds one bucket and one document. (DuckDB's out-of-core ORDER BY was tried first: on rows with 2 KB of
text, DuckDB 2.0 ran out of memory at a 128 MB limit from 100,000 rows on, and the limit it needed grew
with the rows.)

A document is a source file (a PDF, an image, a TIFF). An image of a shard that has a name (a tar member,
a Parquet row's path) is a document of its own, named by its member; the rows a shard has without a
member (a shard that cannot be opened, the end of one cut short) make the shard's own document. Each page
of a document has a unit for every task the output has (and every question its source was asked): its
row, or a missing unit when no row was published for it.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
import zlib
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.schema import DOCUMENT_PAGE, RESULT_SCHEMA

ROW_COLUMNS = ["source_uri", "page", "n_pages", "member", "task", "question", "text", "status", "error", "stage",
               "model", "route", "truncated", "degenerate", "n_input_tokens", "n_output_tokens",
               "source_size", "source_etag", "run_id"]
UNIT_FIELDS = ("task", "question", "status", "text", "error", "stage", "route", "model", "run_id",
               "truncated", "degenerate")


# -- two passes: spill into buckets, read them back sorted ---------------------------------------------
@dataclass
class Layout:
    """What the whole output holds, gathered while its rows are spilled: the tasks every page and every
    document should have a row for, and the folder all sources share (file names start below it)."""

    page_tasks: list[str]
    document_tasks: list[str]
    common_folder: str


def bucket_count(store: ParquetStore, files: list[str], bucket_mb: int) -> int:
    """Buckets of about `bucket_mb` MiB each, from the files' own (uncompressed) column sizes."""
    total = 0
    for path in files:
        with store.fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
        for group in range(metadata.num_row_groups):
            columns = metadata.row_group(group)
            total += sum(columns.column(i).total_uncompressed_size for i in range(columns.num_columns)
                         if columns.column(i).path_in_schema in ROW_COLUMNS)
    return max(1, math.ceil(total / (bucket_mb << 20)))


def spill(store: ParquetStore, files: list[str], run_id: str | None, buckets: int,
          folder: str) -> tuple[list[str], Layout]:
    """Copy every row to one of `buckets` files on local disk, by a hash of its source_uri, so that all the
    rows of a document land in one bucket whatever file and run they came from. Reads one published file
    at a time (a sink file: a few thousand rows). Returns the bucket files and the output's Layout."""
    schema = pa.schema([RESULT_SCHEMA.field(name) for name in ROW_COLUMNS])
    paths = [f"{folder}/bucket-{number:05d}.arrow" for number in range(buckets)]
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    tasks: set[tuple[str, bool]] = set()
    first = last = None
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    try:
        for path in files:
            table = store.read(path, ROW_COLUMNS).cast(schema)
            if run_id:
                table = table.filter(pc.equal(table["run_id"], run_id).fill_null(False))
            if not table.num_rows:
                continue
            tasks |= set(zip(table["task"].to_pylist(), pc.equal(table["page"], DOCUMENT_PAGE).to_pylist()))
            low, high = pc.min_max(table["source_uri"]).values()
            first = min(first, low.as_py()) if first is not None else low.as_py()
            last = max(last, high.as_py()) if last is not None else high.as_py()
            sources = table["source_uri"].combine_chunks().dictionary_encode()
            bucket_of_source = pa.array([zlib.crc32(uri.encode()) % buckets for uri in sources.dictionary.to_pylist()])
            bucket = pc.take(bucket_of_source, sources.indices)
            for number in pc.unique(bucket).to_pylist():
                if number not in writers:
                    writers[number] = pa.ipc.new_stream(paths[number], schema, options=options)
                writers[number].write_table(table.filter(pc.equal(bucket, number)))
    finally:
        for writer in writers.values():
            writer.close()
    # The longest prefix all names share is the one the first and the last name share, in sorted order.
    shared = posixpath.commonprefix([first or "", last or ""])
    layout = Layout(page_tasks=sorted(t for t, whole in tasks if t and not whole),
                    document_tasks=sorted(t for t, whole in tasks if t and whole),
                    common_folder=shared[: shared.rfind("/") + 1])
    return [paths[number] for number in sorted(writers)], layout


UNIT_ORDER = [("source_uri", "ascending"), ("page", "ascending"), ("task", "ascending"), ("_question", "ascending"),
              ("_ok", "descending"), ("_run", "descending")]


def sorted_rows(bucket_files: list[str], slice_rows: int = 2048) -> Iterator[dict]:
    """Every row to export, bucket by bucket, each bucket sorted by source_uri, page, task, question
    (null first): one row per unit, an ok one before an error one, then the greatest run id's."""
    for path in bucket_files:
        with pa.memory_map(path) as source:
            table = pa.ipc.open_stream(source).read_all()
        table = table.append_column("_question", pc.fill_null(table["question"], ""))
        table = table.append_column("_ok", pc.equal(table["status"], "ok").fill_null(False).cast(pa.int8()))
        table = table.append_column("_run", pc.fill_null(table["run_id"], ""))
        table = table.sort_by(UNIT_ORDER).select(ROW_COLUMNS)
        previous = None
        for offset in range(0, table.num_rows, slice_rows):
            for row in table.slice(offset, slice_rows).to_pylist():
                key = (row["source_uri"], row["page"], row["task"], row["question"])
                if key != previous:  # later rows of the same unit lost to the preferred one
                    yield row
                previous = key
        del table  # before the next bucket is read


# -- documents --------------------------------------------------------------------------------------------
@dataclass
class Unit:
    """One task (and question) of a page or document: a row (status ok or error), or a missing one."""

    task: str
    question: str | None
    status: str  # ok | error | missing
    text: str | None = None
    error: str | None = None
    stage: str | None = None
    route: str | None = None
    model: str | None = None
    run_id: str | None = None
    truncated: bool | None = None
    degenerate: bool | None = None

    @classmethod
    def of(cls, row: dict) -> "Unit":
        return cls(**{name: row[name] for name in UNIT_FIELDS})

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in UNIT_FIELDS}

    def label(self) -> str:
        return self.task + (f": {self.question}" if self.question else "")


@dataclass
class Page:
    number: int  # 0-based, as in the output
    units: list[Unit]


@dataclass
class Document:
    source_uri: str
    member: str | None  # a shard's image: its own document
    n_pages: int | None
    source_etag: str | None
    source_size: int | None
    name: str  # its file name below --to, without the extension (markdown, text)
    document_units: list[Unit] = field(default_factory=list)
    pages: list[Page] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0

    def units(self) -> Iterator[Unit]:
        yield from self.document_units
        for page in self.pages:
            yield from page.units

    @property
    def run_ids(self) -> list[str]:
        return sorted({u.run_id for u in self.units() if u.run_id})

    @property
    def models(self) -> list[str]:
        return sorted({u.model for u in self.units() if u.model})

    @property
    def title(self) -> str:
        return self.member or posixpath.basename(self.source_uri.rstrip("/")) or self.source_uri


def documents(rows: Iterable[dict], layout: Layout) -> Iterator[Document]:
    """Documents from rows sorted by source_uri, page, task, question (see _sorted_rows)."""
    for source_uri, source_rows in groupby(rows, key=itemgetter("source_uri")):
        yield from _documents_of_source(source_uri, source_rows, layout)


def _documents_of_source(source_uri: str, rows: Iterable[dict], layout: Layout) -> Iterator[Document]:
    own: dict[int, list[dict]] = {}  # page -> rows of the source's own document
    member_pages: set[int] = set()
    member_names: set[str] = set()
    questions: dict[str, set] = {}  # task -> questions seen in this source so far
    n_pages = None
    for page, page_rows in groupby(rows, key=itemgetter("page")):
        page_rows = list(page_rows)
        for row in page_rows:
            questions.setdefault(row["task"], set()).add(row["question"])
            if row["n_pages"]:
                n_pages = max(n_pages or 0, row["n_pages"])
        member = next((r["member"] for r in page_rows if r["member"]), None)
        if member is None or page == DOCUMENT_PAGE:
            own[page] = page_rows
            continue
        member_pages.add(page)
        name = _file_name(source_uri, layout.common_folder, member)
        if name in member_names:  # a tar may hold two members of one name
            name = f"{name}~{page}"
        member_names.add(name)
        document = _new_document(source_uri, member, n_pages, page_rows, name)
        document.pages = [Page(page, _units(page_rows, layout.page_tasks, questions))]
        _count_tokens(document, page_rows)
        yield document
    expected = set(range(n_pages or 0)) - member_pages
    if own or expected:
        all_rows = [row for page_rows in own.values() for row in page_rows]
        document = _new_document(source_uri, None, n_pages, all_rows, _file_name(source_uri, layout.common_folder))
        document.document_units = _units(own.get(DOCUMENT_PAGE, []), layout.document_tasks, questions)
        for page in sorted((expected | set(own)) - {DOCUMENT_PAGE}):
            document.pages.append(Page(page, _units(own.get(page, []), layout.page_tasks, questions)))
        _count_tokens(document, all_rows)
        yield document


def _new_document(source_uri: str, member: str | None, n_pages, rows: list[dict], name: str) -> Document:
    newest = max(rows, key=lambda r: r["run_id"] or "", default={})  # provenance of the latest run's rows
    return Document(source_uri, member, n_pages, newest.get("source_etag"), newest.get("source_size"), name)


def _count_tokens(document: Document, rows: list[dict]) -> None:
    document.input_tokens = sum(r["n_input_tokens"] or 0 for r in rows)
    document.output_tokens = sum(r["n_output_tokens"] or 0 for r in rows)


def _units(rows: list[dict], tasks: list[str], questions: dict[str, set]) -> list[Unit]:
    """The rows as units, plus a missing unit for each task (and question of this source) without one."""
    present = {(r["task"], r["question"]): Unit.of(r) for r in rows}
    for task in tasks:
        for question in questions.get(task) or {None}:
            present.setdefault((task, question), Unit(task, question, "missing"))
    return [present[key] for key in sorted(present, key=lambda k: (k[0] or "", k[1] or ""))]


# -- file names ------------------------------------------------------------------------------------------
UNSAFE = re.compile(r"[^\w.\- ]")  # \w: letters and digits of any script, and "_"
MAX_PART = 120  # characters of one path component (file systems allow 255 bytes)


def _file_name(source_uri: str, common_folder: str, member: str | None = None) -> str:
    """A relative path for a document's file: the source's path below the shared folder (a shard's image
    below a folder named after the shard), each part made safe; a hash of the URI when that changed it."""
    relative = source_uri[len(common_folder):] if source_uri.startswith(common_folder) else source_uri
    if "://" in relative:  # sources from several stores: keep them apart by scheme
        scheme, rest = relative.split("://", 1)
        relative = f"{scheme}/{rest}"
    raw_parts = [p for p in relative.split("/") if p] + [p for p in (member or "").split("/") if p]
    parts = [_safe_part(p) for p in raw_parts] or ["document"]
    name = "/".join(parts)
    if parts != raw_parts:
        name += "~" + hashlib.sha1(f"{source_uri}#{member or ''}".encode()).hexdigest()[:12]
    return name


def _safe_part(part: str) -> str:
    safe = UNSAFE.sub("_", part).strip()
    if safe in ("", ".", ".."):
        safe = "_"
    if safe[0] in "._":  # hidden names, and our own bookkeeping's
        safe = "-" + safe[1:]
    return safe[:MAX_PART]
