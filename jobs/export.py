"""`scriptorium export OUTPUT --to URI --format {markdown,text,jsonl,dolma}`: an output's rows as documents
(and `--format csv --task NAME`: an extract task's records as a table, jobs/export_table.py).

An output holds one row per page, task and question; what people hand on is documents. The rows of one
document may lie in many files written by several runs; jobs/export_rows.py groups them in bounded memory
however large the output, and jobs/export_formats.py renders each document. A document is a source file;
an image of a shard that has a name (a tar member, a Parquet row's path) is a document of its own.

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
import json
import tempfile
from datetime import datetime, timezone
from itertools import chain, islice
from typing import Iterator

from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.connectors.storage import filesystem_for, protocol_of
from scriptorium.core.errors import SpecError
from scriptorium.core.spec import StorageSpec
from scriptorium.jobs.export_formats import FORMATS, to_dolma, to_markdown, to_record, to_text
from scriptorium.jobs.export_rows import Document, bucket_count, documents, sorted_rows, spill
from scriptorium.jobs.export_table import export_table

TABLE_FORMATS = ("csv",)  # one extract task's records as a table (jobs/export_table.py)

DOCUMENTS_PER_FILE = 10_000  # jsonl and dolma: documents per part file


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


def _check_target(output: str, to: str, storage: StorageSpec) -> ParquetStore:
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


def export(output: str, to: str, fmt: str, storage: StorageSpec | None = None, text_task: str = "ocr",
           run_id: str | None = None, bucket_mb: int = 64, task: str | None = None) -> dict:
    """Write the documents of `output` to `to` as `fmt` (or, as csv, extract task `task`'s records:
    jobs/export_table.py); returns counts (documents, pages, files, error units, missing units; rows for
    csv). Raises SpecError when there is nothing to export or `to` cannot take it."""
    if fmt not in FORMATS + TABLE_FORMATS:
        raise SpecError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS + TABLE_FORMATS)}")
    storage = storage or StorageSpec()
    store = ParquetStore(output, storage)
    files = store.data_files()
    if not files:
        raise SpecError(f"no results in {output}: nothing to export")
    if fmt == "csv" and not task:
        raise SpecError("--format csv exports one extract task's records: name it with --task NAME")
    target = _check_target(output, to, storage)
    if fmt == "csv":
        return {"documents": 0, "pages": 0, "error_units": 0, "missing_units": 0,
                **export_table(store, target, task, run_id)}
    counts = {"documents": 0, "pages": 0, "files": 0, "error_units": 0, "missing_units": 0}
    with tempfile.TemporaryDirectory(prefix="scriptorium-export-") as spill_dir:
        buckets, layout = spill(store, files, run_id, bucket_count(store, files, bucket_mb), spill_dir)
        if not (layout.page_tasks or layout.document_tasks):
            raise SpecError(f"no rows of run {run_id!r} in {output}")
        if text_task not in layout.page_tasks:
            raise SpecError(f"no rows of task {text_task!r} in {output}: choose the text with --text-task "
                            f"(this output has {', '.join(layout.page_tasks + layout.document_tasks)})")
        found = _counted(documents(sorted_rows(buckets), layout), counts)
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
