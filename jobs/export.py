"""`scriptorium export OUTPUT --to URI --format {markdown,text,jsonl,dolma}`: an output's rows as documents.

An output holds one row per page, task and question; what people hand on is documents. The rows of one
document may lie in many files written by several runs, so the export groups them in two passes, in
bounded memory however large the output: it first copies the rows, one published file at a time, into
buckets on local disk by a hash of their source (all of a document's rows land in one bucket), then
reads one bucket at a time (about `bucket_mb`, 64 MiB by default), sorts it by source, page, task and
question, and writes its documents out one by one. (DuckDB's out-of-core ORDER BY was tried first: on
rows with 2 KB of text, DuckDB 2.0 ran out of memory at a 128 MB limit from 100,000 rows on, and the
limit it needed grew with the rows.)

What a document is: a source file (a PDF, an image, a TIFF). An image of a shard that has a name (a tar
member, a Parquet row's path) is a document of its own, named by its member; the rows a shard has without
a member (a shard that cannot be opened, the end of one cut short) make the shard's own document.

Which text is the document's text: the `--text-task` task's (default "ocr": the transcription), page by
page. Every other task and question (captions, QA answers, custom prompts) is its own section of its
page, and tasks with scope = "document" are sections of the whole document.

    markdown  one .md file per document: "## Page N" headings in page order, the text under each, then a
              "### task: question" section per other unit; document-scope units under "## Document".
              Model output is escaped, so a Markdown renderer shows it as written, never as markup.
    text      one .txt file per document: the same, with "=== page N of M ===" lines.
    jsonl     part-NNNNN.jsonl: one JSON object per document: provenance, `text` (the pages' text joined
              by newlines), `document` (document-scope units) and `pages` (each page's units, 0-based).
    dolma     documents/part-NNNNN.jsonl.gz: Dolma documents as olmOCR writes them (id, text, source,
              added, created, metadata, attributes.pdf_page_numbers = [[start, end, page], ...], pages
              counted from 1), other units under metadata.

Nothing goes silently missing: a unit whose row is an error is shown as an error (stage and reason), and
a unit with no row at all (a run killed before it published that page's task) is shown as missing. An
output that holds several rows for one unit (the parent folder of several runs) exports one of them: an
ok row over an error row, then the greatest run id; `--run-id` exports one run's rows only.

File names (markdown, text) follow the sources' paths below the folder all of them share, so
`archive/1850/letter.pdf` becomes `1850/letter.pdf.md`; a name that has to be changed to be safe (no
`..`, no hidden or control characters) gets a hash of its URI, so two sources never share a file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import posixpath
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import chain, groupby, islice
from operator import itemgetter
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.parquet_sink import ParquetStore
from connectors.storage import StorageOptions, filesystem_for, protocol_of
from jobs.spec import SpecError
from pipeline.schema import DOCUMENT_PAGE, RESULT_SCHEMA

FORMATS = ("markdown", "text", "jsonl", "dolma")
ROW_COLUMNS = ["source_uri", "page", "n_pages", "member", "task", "question", "text", "status", "error", "stage",
               "model", "route", "truncated", "degenerate", "n_input_tokens", "n_output_tokens",
               "source_size", "source_etag", "run_id"]
UNIT_FIELDS = ("task", "question", "status", "text", "error", "stage", "route", "model", "run_id",
               "truncated", "degenerate")
DOCUMENTS_PER_FILE = 10_000  # jsonl and dolma: documents per part file
DOLMA_SOURCE = "scriptorium"


# -- reading: the rows of every document, grouped, in bounded memory -------------------------------------
@dataclass
class Layout:
    """What the whole output holds, gathered while its rows are spilled: the tasks every page and every
    document should have a row for, and the folder all sources share (file names start below it)."""

    page_tasks: list[str]
    document_tasks: list[str]
    common_folder: str


def _bucket_count(store: ParquetStore, files: list[str], bucket_mb: int) -> int:
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


def _spill(store: ParquetStore, files: list[str], run_id: str | None, buckets: int, folder: str) -> tuple[list[str], Layout]:
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


def _sorted_rows(bucket_files: list[str], slice_rows: int = 2048) -> Iterator[dict]:
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


# -- formats ---------------------------------------------------------------------------------------------
def body_units(page: Page, text_task: str) -> list[Unit]:
    return [u for u in page.units if u.task == text_task]


def page_text(page: Page, text_task: str) -> str:
    """A page's text: its text task's ok answers ("" for an error or a missing unit)."""
    return "\n".join(u.text or "" for u in body_units(page, text_task) if u.status == "ok")


def _problem(unit: Unit) -> str:
    """What went wrong with a unit that is not ok, in words."""
    if unit.status == "missing":
        return f"no {unit.label()} result (the run did not finish it: run the job again to complete it)"
    return f"{unit.label()} failed at stage {unit.stage or '?'}: {unit.error or 'no reason recorded'}"


INLINE_MARKUP = re.compile(r"([\\`*_\[\]<>|~&])")
LINE_START_MARKUP = re.compile(r"^([#+=-])")
ORDERED_LIST = re.compile(r"^(\d{1,9})([.)])")


def markdown_escape(text: str) -> str:
    """Text that a CommonMark renderer shows as written: markup characters backslash-escaped, and lines
    that would start a heading, list, quote or code block made plain."""
    lines = []
    for line in text.splitlines():
        line = INLINE_MARKUP.sub(r"\\\1", line.strip())
        line = LINE_START_MARKUP.sub(r"\\\1", line)
        lines.append(ORDERED_LIST.sub(r"\1\\\2", line))
    return "\n".join(lines)


def _markdown_unit(unit: Unit) -> str:
    if unit.status != "ok":
        return f"> **{unit.status.capitalize()}**: {markdown_escape(_problem(unit))}"
    return markdown_escape(unit.text or "") or "*(no text)*"


def _page_heading(document: Document, page: Page) -> str:
    """"Page 2 of 3"; a shard's image is "Image 2 of 3" (its place in the shard, as in the `page` column)."""
    kind = "Image" if document.member else "Page"
    return f"{kind} {page.number + 1}" + (f" of {document.n_pages}" if document.n_pages else "")


def _facts(document: Document) -> list[tuple[str, object]]:
    return [(label, value) for label, value in [
        ("Source", document.source_uri), ("Image", document.member),
        ("Images in the shard" if document.member else "Pages", document.n_pages),
        ("Source version", document.source_etag), ("Models", ", ".join(document.models)),
        ("Runs", ", ".join(document.run_ids))] if value not in (None, "")]


def to_markdown(document: Document, text_task: str) -> str:
    out = [f"# {markdown_escape(document.title)}", ""]
    out += [f"- {label}: {markdown_escape(str(value))}" for label, value in _facts(document)]
    if document.document_units:
        out += ["", "## Document"]
        for unit in document.document_units:
            out += ["", f"### {markdown_escape(unit.label())}", "", _markdown_unit(unit)]
    for page in document.pages:
        out += ["", f"## {_page_heading(document, page)}"]
        for unit in body_units(page, text_task):
            out += ["", _markdown_unit(unit)]
        for unit in page.units:
            if unit.task != text_task:
                out += ["", f"### {markdown_escape(unit.label())}", "", _markdown_unit(unit)]
    return "\n".join(out) + "\n"


def _text_unit(unit: Unit) -> str:
    return (unit.text or "(no text)") if unit.status == "ok" else f"[{unit.status}: {_problem(unit)}]"


def to_text(document: Document, text_task: str) -> str:
    out = [document.title] + [f"{label.lower()}: {value}" for label, value in _facts(document)]
    if document.document_units:
        out += ["", "=== document ==="]
        for unit in document.document_units:
            out += ["", f"[{unit.label()}]", _text_unit(unit)]
    for page in document.pages:
        out += ["", f"=== {_page_heading(document, page).lower()} ==="]
        for unit in body_units(page, text_task):
            out += ["", _text_unit(unit)]
        for unit in page.units:
            if unit.task != text_task:
                out += ["", f"[{unit.label()}]", _text_unit(unit)]
    return "\n".join(out) + "\n"


def to_record(document: Document, text_task: str) -> dict:
    """The JSONL record: provenance, the document's text, and every unit of every page."""
    return {
        "source_uri": document.source_uri,
        "member": document.member,
        "n_pages": document.n_pages,
        "source_etag": document.source_etag,
        "source_size": document.source_size,
        "models": document.models,
        "run_ids": document.run_ids,
        "text_task": text_task,
        "text": "\n".join(page_text(page, text_task) for page in document.pages),
        "document": [unit.as_dict() for unit in document.document_units],
        "pages": [{"page": page.number, "units": [unit.as_dict() for unit in page.units]} for page in document.pages],
    }


def to_dolma(document: Document, text_task: str, now: str) -> dict:
    """A Dolma document as olmOCR's pipeline builds one: the pages' text joined by newlines, each page's
    span in attributes.pdf_page_numbers as [start, end, page number from 1]. Unlike olmOCR (which hashes
    the text, so equal texts share an id), the id hashes the source URI, member and version."""
    text, spans = "", []
    for index, page in enumerate(document.pages):
        start = len(text)
        text += page_text(page, text_task) + ("\n" if index < len(document.pages) - 1 else "")
        spans.append([start, len(text), page.number + 1])
    problems = lambda status: [p.number + 1 for p in document.pages  # noqa: E731
                               if any(u.status == status for u in body_units(p, text_task))]
    others = [{"page": None, **u.as_dict()} for u in document.document_units]
    others += [{"page": p.number + 1, **u.as_dict()} for p in document.pages for u in p.units if u.task != text_task]
    identity = f"{document.source_uri}#{document.member or ''}@{document.source_etag or ''}"
    return {
        "id": hashlib.sha1(identity.encode()).hexdigest(),
        "text": text,
        "source": DOLMA_SOURCE,
        "added": now,
        "created": now,
        "metadata": {
            "Source-File": document.source_uri,
            "member": document.member,
            "pdf-total-pages": document.n_pages,
            "source-etag": document.source_etag,
            "models": document.models,
            "run-ids": document.run_ids,
            "text-task": text_task,
            "total-input-tokens": document.input_tokens,
            "total-output-tokens": document.output_tokens,
            "error-pages": problems("error"),
            "missing-pages": problems("missing"),
            "results": others,
        },
        "attributes": {"pdf_page_numbers": spans},
    }


# -- writing ---------------------------------------------------------------------------------------------
def _write_parts(records: Iterator[dict], target: ParquetStore, pattern: str, compress: bool) -> int:
    """JSON lines, DOCUMENTS_PER_FILE records per part file, each file published whole once written (a
    failure half-way publishes nothing of the file it was writing). Returns the number of files."""
    number = 0
    for first in records:
        with target.publishing(pattern.format(number)) as raw:
            handle = gzip.GzipFile(fileobj=raw, mode="wb") if compress else raw
            for record in chain([first], islice(records, DOCUMENTS_PER_FILE - 1)):
                handle.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            if compress:
                handle.close()  # writes the gzip trailer; `raw` stays open for publishing
        number += 1
    return number


def _write_files(documents_: Iterator[Document], target: ParquetStore, fmt: str, text_task: str) -> int:
    """One file per document, each published whole. Returns the number of files."""
    render, extension = (to_markdown, ".md") if fmt == "markdown" else (to_text, ".txt")
    written = 0
    for document in documents_:
        with target.publishing(document.name + extension) as handle:
            handle.write(render(document, text_task).encode("utf-8"))
        written += 1
    return written


def _check_target(output: str, to: str, storage: StorageOptions) -> ParquetStore:
    target = ParquetStore(to, storage)  # a folder of files published whole (here not Parquet files)
    _, output_root = filesystem_for(output, storage)
    if protocol_of(output) == protocol_of(to) and (target.root + "/").startswith(output_root.rstrip("/") + "/"):
        raise SpecError(f"--to {to} is inside the output {output}: readers of the output would trip over "
                        "the exported files; export to another folder")
    try:
        taken = target.fs.exists(target.root) and bool(target.fs.ls(target.root))
    except FileNotFoundError:
        taken = False
    if taken:
        raise SpecError(f"--to {to} is not empty: export into a new folder (or remove it first)")
    return target


def _counted(documents_: Iterator[Document], counts: dict) -> Iterator[Document]:
    for document in documents_:
        counts["documents"] += 1
        counts["pages"] += len(document.pages)
        for unit in document.units():
            counts["error_units"] += unit.status == "error"
            counts["missing_units"] += unit.status == "missing"
        yield document


def export(output: str, to: str, fmt: str, storage: StorageOptions | None = None, text_task: str = "ocr",
           run_id: str | None = None, bucket_mb: int = 64) -> dict:
    """Write the documents of `output` to `to` as `fmt`; returns counts (documents, pages, files, error
    units, missing units). Raises SpecError when there is nothing to export or `to` cannot take it."""
    if fmt not in FORMATS:
        raise SpecError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    storage = storage or StorageOptions()
    store = ParquetStore(output, storage)
    files = store.data_files()
    if not files:
        raise SpecError(f"no results in {output}: nothing to export")
    target = _check_target(output, to, storage)
    counts = {"documents": 0, "pages": 0, "files": 0, "error_units": 0, "missing_units": 0}
    with tempfile.TemporaryDirectory(prefix="scriptorium-export-") as spill_dir:
        buckets, layout = _spill(store, files, run_id, _bucket_count(store, files, bucket_mb), spill_dir)
        if not (layout.page_tasks or layout.document_tasks):
            raise SpecError(f"no rows of run {run_id!r} in {output}")
        if text_task not in layout.page_tasks:
            raise SpecError(f"no rows of task {text_task!r} in {output}: choose the text with --text-task "
                            f"(this output has {', '.join(layout.page_tasks + layout.document_tasks)})")
        found = _counted(documents(_sorted_rows(buckets), layout), counts)
        if fmt == "jsonl":
            counts["files"] = _write_parts((to_record(d, text_task) for d in found), target,
                                           "part-{:05d}.jsonl", compress=False)
        elif fmt == "dolma":
            now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            counts["files"] = _write_parts((to_dolma(d, text_task, now) for d in found), target,
                                           "documents/part-{:05d}.jsonl.gz", compress=True)
        else:
            counts["files"] = _write_files(found, target, fmt, text_task)
    return counts
