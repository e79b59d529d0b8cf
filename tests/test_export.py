"""`scriptorium export`: an output's rows as documents, read back by a standard reader of each format
(markdown-it-py for Markdown, json for JSONL and Dolma, plain reading for text).

The output is a real run (tiny model, in-process Ray) over a three-page born-digital PDF (its OCR comes
from the text layer, so the text is known), a tar shard of two images and one broken image, and a
broken PDF, with OCR, caption, two QA questions and a document-scope summary; then, as a killed run
would leave it, one page's caption is removed, and one answer is replaced with text full of Markdown.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from markdown_it import MarkdownIt

from scriptorium.connectors.namespace import data_file_name
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.schema import RESULT_SCHEMA
from scriptorium.jobs.export import DOCUMENTS_PER_FILE, export
from tests.conftest import make_image, make_pdf, one_line_error, read_rows, run_cli

PAGES = [
    "Chapter one. The archive holds letters, ledgers and maps from 1850 to 1910.",
    "Chapter two. Each ledger lists the harvest of every parish, year by year.",
    "Appendix. Invoice 1042, total due 318.40 EUR, signed by the archivist.",
]
QUESTIONS = ["What is the total?", "Who signed?"]
MARKUP = ("# Not a heading\n- not a list\n1. not a list either\n> not a quote\n"
          "<b>not bold</b> *a* _b_ `c` [d](http://e) &amp; | f | ~~g~~\n===\nend \\ here")


@pytest.fixture(scope="module")
def mixed_output(tmp_path_factory, tiny_model, ray_local) -> Path:
    from scriptorium.core.spec import spec_from_dict
    from scriptorium.jobs.runner import run_job

    inputs = tmp_path_factory.mktemp("export-in")
    make_pdf(inputs / "letter.pdf", PAGES)
    (inputs / "broken.pdf").write_bytes(b"%PDF-1.7 not really")
    members = [("000001.jpg", make_image(inputs / "a.jpg").read_bytes()), ("000001.txt", b"a caption"),
               ("000002.png", make_image(inputs / "b.png", color=(200, 30, 30)).read_bytes()),
               ("000003.jpg", b"not a jpeg")]
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (inputs / "shards").mkdir()
    (inputs / "shards" / "shard-000.tar").write_bytes(shard.getvalue())
    for scratch in ("a.jpg", "b.png"):
        (inputs / scratch).unlink()

    output = tmp_path_factory.mktemp("export-out") / "results"
    run_job(spec_from_dict({
        "run_id": "export-test",
        "input": {"uri": str(inputs)}, "output": {"uri": str(output)},
        "model": {"id": str(tiny_model), "device": "cpu", "longest_edge": 56, "shortest_edge": 28},
        "render": {"page_edge": 64}, "routing": {"text_layer": True}, "resources": {"batch_size": 4},
        "tasks": [{"kind": "ocr", "max_new_tokens": 4}, {"kind": "caption", "max_new_tokens": 4},
                  {"kind": "qa", "questions": QUESTIONS, "max_new_tokens": 4},
                  {"kind": "qa", "name": "summary", "scope": "document", "document_pages": 2,
                   "questions": ["What is this about?"], "max_new_tokens": 4}],
    }))

    store = ParquetStore(str(output))
    letter = str(inputs / "letter.pdf")

    def unit(page: int, task: str, question: str | None = None):
        def matches(table):
            mask = pc.and_(pc.equal(table["source_uri"], letter), pc.equal(table["page"], page))
            mask = pc.and_(mask, pc.equal(table["task"], task))
            if question:
                mask = pc.and_(mask, pc.equal(table["question"], question))
            return mask.fill_null(False)  # a null would make drop_rows drop the row
        return matches

    store.drop_rows(unit(1, "caption"), ["source_uri", "page", "task", "question"])  # a run killed here
    answer = next(r for r in read_rows(output) if r["source_uri"] == letter and r["page"] == 0
                  and r["question"] == "Who signed?")
    store.drop_rows(unit(0, "qa", "Who signed?"), ["source_uri", "page", "task", "question"])
    store.publish(pa.Table.from_pylist([{**answer, "text": MARKUP}], schema=RESULT_SCHEMA), data_file_name("export-test", 999))
    return output


def exported(output: Path, tmp_path: Path, fmt: str) -> Path:
    target = tmp_path / f"export-{fmt}"
    proc = run_cli("export", str(output), "--to", str(target), "--format", fmt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported 6 documents" in proc.stdout and "1 missing" in proc.stdout, proc.stdout
    return target


def inline_text(token) -> str:
    """What a reader sees of an inline token: its text, soft breaks as newlines."""
    return "".join("\n" if child.type in ("softbreak", "hardbreak") else child.content for child in token.children)


def markdown_sections(text: str) -> list[dict]:
    """Headings in order, each with the blocks below it: ("paragraph" | "quote", text, inline children)."""
    sections, quoted = [{"level": 0, "title": "", "blocks": []}], 0
    tokens = MarkdownIt().parse(text)
    for index, token in enumerate(tokens):
        quoted += {"blockquote_open": 1, "blockquote_close": -1}.get(token.type, 0)
        if token.type == "heading_open":
            sections.append({"level": int(token.tag[1]), "title": tokens[index + 1].content, "blocks": []})
        elif token.type == "inline" and tokens[index - 1].type == "paragraph_open":
            kinds = {child.type for child in token.children}
            sections[-1]["blocks"].append(("quote" if quoted else "paragraph", inline_text(token), kinds))
    return sections


@pytest.mark.slow
def test_markdown_has_a_file_per_document_with_pages_in_order(mixed_output, tmp_path):
    target = exported(mixed_output, tmp_path, "markdown")
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*.md"))
    # A shard's images are documents of their own, by member; the shard keeps its document-scope answer.
    assert files == ["broken.pdf.md", "letter.pdf.md", "shards/shard-000.tar.md", "shards/shard-000.tar/000001.jpg.md",
                     "shards/shard-000.tar/000002.png.md", "shards/shard-000.tar/000003.jpg.md"]

    letter = markdown_sections((target / "letter.pdf.md").read_text())
    assert [(s["level"], s["title"]) for s in letter if s["level"] <= 2] == [
        (0, ""), (1, "letter.pdf"), (2, "Document"), (2, "Page 1 of 3"), (2, "Page 2 of 3"), (2, "Page 3 of 3")]
    pages = [s for s in letter if s["title"].startswith("Page")]
    for page, words in zip(pages, PAGES):
        kind, text, _ = page["blocks"][0]  # the text layer's transcription, right under its heading
        assert kind == "paragraph" and " ".join(text.split()) == words
    facts = [text for _, text, _ in letter[1]["blocks"]]  # the list under the title
    assert facts[0].startswith("Source: ") and facts[0].endswith("/letter.pdf")
    assert "Pages: 3" in facts and "Runs: export-test" in facts

    below = {s["title"]: s for s in letter}
    assert below["summary: What is this about?"]["level"] == 3
    captions = [s["blocks"][0][0] for s in letter if s["title"] == "caption"]
    assert captions == ["paragraph", "quote", "paragraph"]  # page 2's caption row is missing, and says so
    page_two = letter[letter.index(pages[1]):letter.index(pages[2])]
    assert [s["title"] for s in page_two] == ["Page 2 of 3", "caption", "qa: What is the total?", "qa: Who signed?"]
    kind, text, _ = page_two[1]["blocks"][0]
    assert kind == "quote" and text.startswith("Missing: no caption result")

    # Model output full of Markdown is shown as written: one paragraph of plain text, no markup.
    answer = letter[letter.index(pages[0]) + 3]
    assert answer["title"] == "qa: Who signed?"
    [(kind, text, kinds)] = answer["blocks"]
    assert kind == "paragraph" and kinds <= {"text", "softbreak"}
    assert text == MARKUP

    broken = markdown_sections((target / "broken.pdf.md").read_text())
    quotes = [text for s in broken for kind, text, _ in s["blocks"] if kind == "quote"]
    assert len(quotes) == 5 and all("cannot open PDF" in q and q.startswith("Error: ") for q in quotes)
    bad_image = markdown_sections((target / "shards/shard-000.tar/000003.jpg.md").read_text())
    assert [s["title"] for s in bad_image if s["level"] == 2] == ["Image 3 of 3"]
    assert "cannot decode image" in bad_image[2]["blocks"][0][1]


@pytest.mark.slow
def test_text_has_page_markers_errors_and_missing_results(mixed_output, tmp_path):
    target = exported(mixed_output, tmp_path, "text")
    letter = (target / "letter.pdf.txt").read_text()
    markers = [line for line in letter.splitlines() if line.startswith("=== ")]
    assert markers == ["=== document ===", "=== page 1 of 3 ===", "=== page 2 of 3 ===", "=== page 3 of 3 ==="]
    positions = [letter.index(" ".join(words.split()[:3])) for words in PAGES]
    assert positions == sorted(positions) and letter.index("=== page 2") < positions[1]
    assert "[missing: no caption result" in letter and MARKUP in letter
    assert (target / "broken.pdf.txt").read_text().count("[error: ") == 5
    assert sorted(p.name for p in (target / "shards" / "shard-000.tar").iterdir()) == [
        "000001.jpg.txt", "000002.png.txt", "000003.jpg.txt"]


@pytest.mark.slow
def test_jsonl_holds_every_result_once_with_provenance(mixed_output, tmp_path):
    target = exported(mixed_output, tmp_path, "jsonl")
    [part] = list(target.iterdir())
    records = [json.loads(line) for line in part.read_text().splitlines()]
    rows = read_rows(mixed_output)
    documents = {(r["source_uri"], r["member"]) for r in records}
    assert len(documents) == len(records) == 6

    units = [(r["source_uri"], page["page"], u["task"], u["question"], u["status"], u["text"])
             for r in records for page in r["pages"] for u in page["units"]]
    units += [(r["source_uri"], -1, u["task"], u["question"], u["status"], u["text"])
              for r in records for u in r["document"]]
    published = sorted((r["source_uri"], r["page"], r["task"], r["question"], r["status"], r["text"]) for r in rows)
    assert sorted(u for u in units if u[4] != "missing") == published  # every row, once
    letter = next(r for r in records if r["source_uri"].endswith("letter.pdf"))
    assert [u[:4] for u in units if u[4] == "missing"] == [(letter["source_uri"], 1, "caption", None)]

    source_rows = [r for r in rows if r["source_uri"] == letter["source_uri"]]
    assert (letter["source_etag"], letter["source_size"]) == (source_rows[0]["source_etag"],
                                                              source_rows[0]["source_size"])
    assert letter["run_ids"] == ["export-test"] and letter["n_pages"] == 3
    assert [p["page"] for p in letter["pages"]] == [0, 1, 2]
    assert [" ".join(t.split()) for t in letter["text"].split("\n", 2)][0].startswith("Chapter one.")
    ocr = [u for p in letter["pages"] for u in p["units"] if u["task"] == "ocr"]
    assert {u["route"] for u in ocr} == {"text_layer"} and all(u["model"].startswith("pymupdf") for u in ocr)
    image = next(r for r in records if r["member"] == "000003.jpg")
    assert image["pages"][0]["page"] == 2 and {u["status"] for u in image["pages"][0]["units"]} == {"error"}


@pytest.mark.slow
def test_dolma_documents_as_olmocr_writes_them(mixed_output, tmp_path):
    target = exported(mixed_output, tmp_path, "dolma")
    [part] = list((target / "documents").iterdir())
    assert part.name == "part-00000.jsonl.gz"
    with gzip.open(part, "rt", encoding="utf-8") as handle:
        documents = [json.loads(line) for line in handle]
    assert len(documents) == 6 and len({d["id"] for d in documents}) == 6
    for document in documents:
        assert {"id", "text", "source", "added", "created", "metadata", "attributes"} <= set(document)
        assert document["source"] == "scriptorium" and document["added"].endswith("Z")

    letter = next(d for d in documents if d["metadata"]["Source-File"].endswith("letter.pdf"))
    spans = letter["attributes"]["pdf_page_numbers"]
    assert [page for _, _, page in spans] == [1, 2, 3]  # counted from 1, as olmOCR does
    assert spans[0][0] == 0 and spans[-1][1] == len(letter["text"])
    for (start, end, _), words in zip(spans, PAGES):
        assert " ".join(letter["text"][start:end].split()) == words
    assert letter["metadata"]["pdf-total-pages"] == 3 and letter["metadata"]["error-pages"] == []
    results = letter["metadata"]["results"]
    assert {(r["page"], r["task"]) for r in results if r["status"] == "missing"} == {(2, "caption")}
    assert {r["task"] for r in results} == {"caption", "qa", "summary"}

    broken = next(d for d in documents if d["metadata"]["Source-File"].endswith("broken.pdf"))
    assert broken["text"] == "" and broken["metadata"]["error-pages"] == [1]  # kept, and says why it is empty


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_export_to_gcs(mixed_output, tmp_path):
    from tests.fake_gcs import FakeGcs

    gcs = FakeGcs()
    try:
        bucket = gcs.new_bucket("exports")
        proc = run_cli("export", str(mixed_output), "--to", f"gs://{bucket}/letters", "--format", "jsonl",
                       env={"STORAGE_EMULATOR_HOST": gcs.endpoint})
        assert proc.returncode == 0, proc.stderr[-3000:]
        # gcsfs's plain class, as connectors/storage.py uses for an emulator: the default one first asks the
        # gRPC Storage Control API (which fake-gcs-server does not serve) for the bucket's layout, a minute.
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(endpoint_url=gcs.endpoint, token="anon", skip_instance_cache=True)
        [part] = fs.ls(f"{bucket}/letters")
        assert part.endswith("part-00000.jsonl")
        assert len(fs.cat_file(part).decode().splitlines()) == 6
    finally:
        gcs.close()


@pytest.mark.slow
def test_export_refuses_what_it_cannot_do(mixed_output, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("someone's file")
    one_line_error(run_cli("export", str(mixed_output), "--to", str(tmp_path / "taken"), "--format", "text"),
                   "not empty")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "someone's file"
    one_line_error(run_cli("export", str(mixed_output), "--to", str(mixed_output / "md"), "--format", "markdown"),
                   "inside the output")
    one_line_error(run_cli("export", str(mixed_output), "--to", str(tmp_path / "x"), "--format", "text",
                           "--text-task", "transcript"), "no rows of task 'transcript'", "ocr")


# -- rows spread over files and runs, without Ray --------------------------------------------------------
def row(source: str, page: int, task: str, run_id: str, status: str = "ok", **values) -> dict:
    return {"source_uri": source, "page": page, "n_pages": 3, "task": task, "status": status, "run_id": run_id,
            "text": f"{task} of page {page} by {run_id}" if status == "ok" else None,
            "error": "model crashed" if status == "error" else None, "stage": "generate" if status == "error" else None,
            "model": "m", "source_etag": "v1", **values}


def test_rows_from_many_files_and_runs_make_one_document(tmp_path):
    """A resumed run and a rerun: a document's rows lie in four files of three runs, in no order, one
    written before the `member` and `degenerate` columns existed. Each unit is exported once: an ok row
    over an error row, then the latest run's."""
    output = tmp_path / "out"
    store = ParquetStore(str(output))
    doc = "s3://bucket/scans/a.pdf"
    files = [
        [row(doc, 2, "ocr", "run-1"), row(doc, 0, "ocr", "run-1", status="error")],
        [row(doc, 0, "ocr", "run-2"), row("s3://bucket/scans/b.png", 0, "ocr", "run-2", n_pages=1)],
        [row(doc, 1, "ocr", "run-1"), row(doc, 1, "ocr", "run-3", status="error")],
    ]
    for number, rows in enumerate(files):
        store.publish(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), data_file_name(f"run-{number}", number))
    old = pa.Table.from_pylist([row(doc, 2, "ocr", "run-0")], schema=RESULT_SCHEMA)
    old = old.drop_columns(["member", "degenerate"])
    pq.write_table(old, output / data_file_name("run-0", 0))

    counts = export(str(output), str(tmp_path / "jsonl"), "jsonl")
    assert counts == {"documents": 2, "pages": 4, "files": 1, "error_units": 0, "missing_units": 0}
    [a, b] = [json.loads(line) for line in (tmp_path / "jsonl" / "part-00000.jsonl").read_text().splitlines()]
    assert [u["text"] for p in a["pages"] for u in p["units"]] == [
        "ocr of page 0 by run-2", "ocr of page 1 by run-1", "ocr of page 2 by run-1"]
    assert a["run_ids"] == ["run-1", "run-2"] and b["source_uri"].endswith("b.png")

    only = export(str(output), str(tmp_path / "run-3"), "jsonl", run_id="run-3")
    assert (only["documents"], only["error_units"], only["missing_units"]) == (1, 1, 2)  # pages 0 and 2 not in run-3


def test_names_are_safe_and_unique(tmp_path):
    output = tmp_path / "out"
    sources = ["gs://b/in/a b.pdf", "gs://b/in/a_b.pdf", "gs://b/in/../x.pdf", "gs://b/in/.hidden.pdf",
               "gs://b/in/sub/deep.pdf"]
    rows = [row(source, 0, "ocr", "r", n_pages=1) for source in sources]
    ParquetStore(str(output)).publish(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), data_file_name("r", 0))
    export(str(output), str(tmp_path / "md"), "markdown")
    names = sorted(str(p.relative_to(tmp_path / "md")) for p in (tmp_path / "md").rglob("*.md"))
    assert len(names) == len(sources) and "sub/deep.pdf.md" in names and "a_b.pdf.md" in names
    assert all(".." not in name.split("/") and not name.split("/")[-1].startswith(".") for name in names)
    assert all((tmp_path / "md" / name).resolve().is_relative_to((tmp_path / "md").resolve()) for name in names)


def test_part_files_hold_a_bounded_number_of_documents(tmp_path):
    output = tmp_path / "out"
    rows = [row(f"/scans/{i:06d}.png", 0, "ocr", "r", n_pages=1) for i in range(DOCUMENTS_PER_FILE + 5)]
    ParquetStore(str(output)).publish(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), data_file_name("r", 0))
    counts = export(str(output), str(tmp_path / "dolma"), "dolma")
    parts = sorted((tmp_path / "dolma" / "documents").iterdir())
    assert counts["files"] == 2 and [p.name for p in parts] == ["part-00000.jsonl.gz", "part-00001.jsonl.gz"]
    with gzip.open(parts[1], "rt") as handle:
        assert len(handle.read().splitlines()) == 5
