"""Manifest inputs: a .txt, .csv, .jsonl or .parquet file listing the documents (optionally with
per-document questions), read from the local disk and from a real S3 API (moto on loopback)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scriptorium.connectors.listing import list_inputs
from scriptorium.connectors.manifest import ManifestEntry, ManifestError, read_manifest
from scriptorium.core.spec import InputSpec, RenderSpec, StorageSpec
from scriptorium.pipeline.render.stage import pages_of
from tests.conftest import make_pdf

FORMATS = ["txt", "csv", "jsonl", "parquet"]


def manifest_bytes(fmt: str, entries: list[tuple[str, list[str]]]) -> bytes:
    """The same list of (entry, questions) written the way a user would write it in each format."""
    if fmt == "txt":  # a text manifest has no room for questions
        return ("# documents to transcribe\n\n" + "\n".join(uri for uri, _ in entries) + "\n").encode()
    if fmt == "csv":  # one row per question; a document without questions has an empty cell
        lines = ["uri,question"]
        for uri, questions in entries:
            lines += [f'{uri},"{q}"' for q in questions] or [f"{uri},"]
        return ("\n".join(lines) + "\n").encode()
    if fmt == "jsonl":
        return "".join(json.dumps({"uri": uri, "questions": qs} if qs else {"uri": uri}) + "\n" for uri, qs in entries).encode()
    table = pa.table({"uri": [u for u, _ in entries], "questions": [qs or None for _, qs in entries]},
                     schema=pa.schema([("uri", pa.string()), ("questions", pa.list_(pa.string()))]))
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


QUESTIONS = ["What is the title?", "Who signed it, and when?"]  # a comma: CSV quoting must hold


@pytest.mark.parametrize("fmt", FORMATS)
def test_local_manifest_resolves_paths_against_its_folder(tmp_path, fmt):
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / f"batch.{fmt}"
    entries = [("docs/a.pdf", QUESTIONS), ("../scans/b.png", []), (str(tmp_path / "c.pdf"), []), ("s3://bucket/d.pdf", [])]
    manifest.write_bytes(manifest_bytes(fmt, entries))

    found = list(read_manifest(str(manifest)))

    with_questions = tuple(QUESTIONS) if fmt != "txt" else None
    assert found == [
        ManifestEntry(str(tmp_path / "lists" / "docs" / "a.pdf"), with_questions),
        ManifestEntry(str(tmp_path / "scans" / "b.png"), None),
        ManifestEntry(str(tmp_path / "c.pdf"), None),
        ManifestEntry("s3://bucket/d.pdf", None),
    ]


def test_rows_of_one_document_are_merged_and_single_question_keys_accepted(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"uri": "a.pdf", "question": "Q1"}\n'
        '{"uri": "b.pdf"}\n'
        '{"uri": "a.pdf", "questions": ["Q2", "Q1"]}\n'
    )
    assert list(read_manifest(str(manifest))) == [
        ManifestEntry(str(tmp_path / "a.pdf"), ("Q1", "Q2")),
        ManifestEntry(str(tmp_path / "b.pdf"), None),
    ]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("m.jsonl", '{"uri": "a.pdf"}\n{"uri": "b.pdf",\n', "line 2 is not JSON"),
        ("m.jsonl", '{"uri": "a.pdf"}\n{"url": "b.pdf"}\n', "line 2: no uri"),
        ("m.csv", "path,question\na.pdf,\n", "'uri' column"),
        ("m.xlsx", "whatever", "must end in .txt, .csv, .jsonl"),
    ],
)
def test_a_malformed_manifest_names_the_problem(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ManifestError, match=message) as raised:
        list(read_manifest(str(tmp_path / name)))
    assert name in str(raised.value)


@pytest.fixture(scope="module")
def documents(s3_server, tmp_path_factory) -> str:
    """A bucket with two real PDFs under docs/; manifests go under lists/."""
    bucket = s3_server.new_bucket("manifest")
    folder = tmp_path_factory.mktemp("docs")
    s3_server.put(bucket, "docs/a.pdf", make_pdf(folder / "a.pdf", ["first page", "second page"]))
    s3_server.put(bucket, "docs/b.pdf", make_pdf(folder / "b.pdf", ["only page"]))
    return bucket


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_s3_manifest_plans_listed_objects_with_their_questions(s3_server, documents, fmt):
    bucket = documents
    entries = [("../docs/a.pdf", QUESTIONS), (f"s3://{bucket}/docs/b.pdf", []), ("/docs/missing.pdf", [])]
    s3_server.put(bucket, f"lists/batch.{fmt}", manifest_bytes(fmt, entries))
    options = StorageSpec(endpoint_url=s3_server.endpoint)

    rows = list(list_inputs(InputSpec(uri=f"s3://{bucket}/lists/batch.{fmt}", manifest=True), options))

    assert [r["source_uri"] for r in rows] == [f"s3://{bucket}/docs/{n}" for n in ("a.pdf", "b.pdf", "missing.pdf")]
    assert rows[0]["questions"] == (QUESTIONS if fmt != "txt" else None)
    assert rows[1]["questions"] is None
    for row in rows[:2]:
        head = s3_server.client.head_object(Bucket=bucket, Key=row["source_uri"].split("/", 3)[3])
        assert (row["size"], row["etag"], row["kind"]) == (head["ContentLength"], head["ETag"].strip('"'), "pdf")
    # The missing object is still planned: reading it records why it failed.
    assert (rows[2]["size"], rows[2]["etag"], rows[2]["error"]) == (None, None, None)


@pytest.mark.slow
def test_missing_manifest_entry_becomes_a_read_error_row(s3_server, documents):
    bucket = documents
    s3_server.put(bucket, "lists/mixed.txt", b"../docs/b.pdf\n../docs/missing.pdf\n")
    options = StorageSpec(endpoint_url=s3_server.endpoint)
    plan = list(list_inputs(InputSpec(uri=f"s3://{bucket}/lists/mixed.txt", manifest=True), options))

    pages = [page for row in plan for page in pages_of(row, RenderSpec(page_edge=64), options)]

    assert [(p["source_uri"].rsplit("/", 1)[-1], p["page"], p["status"], p["stage"]) for p in pages] == [
        ("b.pdf", 0, "ok", None),
        ("missing.pdf", 0, "error", "read"),
    ]
    assert pages[1]["error"] == f"cannot read: no such object: s3://{bucket}/docs/missing.pdf"


@pytest.mark.slow
def test_include_exclude_apply_to_manifest_entries(s3_server, documents):
    bucket = documents
    s3_server.put(bucket, "lists/all.txt", b"../docs/a.pdf\n../docs/b.pdf\n../docs/c.png\n")
    rows = list_inputs(InputSpec(uri=f"s3://{bucket}/lists/all.txt", manifest=True, exclude=["a.*", "*.png"]),
                       StorageSpec(endpoint_url=s3_server.endpoint))
    assert [r["source_uri"] for r in rows] == [f"s3://{bucket}/docs/b.pdf"]


@pytest.mark.slow
@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", "caf\xe9/menu.pdf\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3): save it as UTF-8"),
    ("huge_field.csv", b"uri,question\na.pdf,\"" + b"?" * 200_000 + b"\"\n", "cannot be read: Error: field larger than"),
])
def test_a_manifest_that_cannot_be_read_is_one_line_and_exit_2(tiny_model, tmp_path, name, content, message):
    from tests.conftest import one_line_error, run_cli

    (tmp_path / name).write_bytes(content)
    proc = run_cli("run", "--input", str(tmp_path / name), "--manifest", "--output", str(tmp_path / "out"),
                   "--task", "ocr", "--model", str(tiny_model), timeout=300)
    one_line_error(proc, f"manifest {tmp_path / name}", message)
