"""Manifests: a file that lists the inputs (`[input] manifest = true` or `--manifest`).

    .txt      one URI per line; blank lines and lines starting with '#' are ignored
    .csv      a header row with a `uri` column, optionally `question` (one question per row)
    .jsonl    one object per line: {"uri": "...", "questions": ["...", ...]} or {"uri": "...", "question": "..."}
    .parquet  a `uri` column, optionally `question` (string) and/or `questions` (list of strings)

An entry is a URI (`s3://`, `gs://`, `file://`, ...), an absolute path, or a path relative to the
manifest's own folder (`docs/a.pdf` in `s3://b/lists/m.csv` is `s3://b/lists/docs/a.pdf`). A document
listed on several rows is planned once, with the questions of all its rows. The questions travel with
the document to the QA task. The manifest is read whole before planning (about 100-200 MB of driver
memory per million entries), so a malformed line (or a file that is not UTF-8 text) stops the job
before any work starts, with one line naming the problem.

Signed URLs (presigned S3, GCS V4, Azure SAS, `https://TOKEN@host/...`) are read as listed, but a
document is known by its redacted URI (`redact_uri`: no userinfo, no query string): that is its
`source_uri` in every row, and entries that differ only in their query string are one document, read
from the first. What entries may point at is connectors/manifest_policy.py's to decide.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Iterator

from scriptorium.connectors.storage import describe_error, protocol_of, read_bytes, redact
from scriptorium.core.errors import SpecError
from scriptorium.core.redaction import redact_uri
from scriptorium.core.spec import StorageSpec

FORMATS = (".txt", ".csv", ".jsonl", ".ndjson", ".parquet")
log = logging.getLogger("scriptorium")


class ManifestError(SpecError):
    """The manifest cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class ManifestEntry:
    uri: str  # redacted: the document's source_uri
    questions: tuple[str, ...] | None = None
    fetch_uri: str | None = None  # the URI as listed, where redacting changed it (a signed URL)


def read_manifest(manifest_uri: str, options: StorageSpec | None = None) -> Iterator[ManifestEntry]:
    """The manifest's documents in the order first listed, each once, with its questions (or None)."""
    suffix = next((s for s in FORMATS if redact_uri(manifest_uri).lower().endswith(s)), None)
    if suffix is None:
        raise ManifestError(f"manifest {redact(manifest_uri)} must end in {', '.join(FORMATS)}")
    try:
        data = read_bytes(manifest_uri, options)
    except (FileNotFoundError, PermissionError):
        raise  # the caller says the input is missing or forbidden
    except Exception as exc:
        raise ManifestError(f"cannot read manifest: {describe_error(exc, manifest_uri)}") from None
    parse = {".txt": _parse_txt, ".csv": _parse_csv, ".jsonl": _parse_jsonl,
             ".ndjson": _parse_jsonl, ".parquet": _parse_parquet}[suffix]
    questions_of: dict[str, list[str]] = {}  # insertion-ordered: documents in manifest order
    fetch_uri_of: dict[str, str | None] = {}
    merged = 0  # entries that differ from an earlier one only in what redacting removes
    try:
        for where, entry, questions in parse(data):
            if not isinstance(entry, str) or not entry.strip():
                raise ManifestError(f"{where}: no uri")
            bad = [q for q in questions if not isinstance(q, str)]
            if bad:
                raise ManifestError(f"{where}: questions must be strings, got {bad[0]!r}")
            listed = resolve_entry(entry.strip(), manifest_uri)
            uri = redact_uri(listed)
            fetch_uri = listed if listed != uri else None
            merged += uri in fetch_uri_of and fetch_uri_of[uri] != fetch_uri
            fetch_uri_of.setdefault(uri, fetch_uri)
            known = questions_of.setdefault(uri, [])
            known.extend(q.strip() for q in questions if q.strip() and q.strip() not in known)
    except ManifestError as exc:
        raise ManifestError(redact(f"manifest {manifest_uri}: {exc}")) from None
    except UnicodeDecodeError as exc:
        raise ManifestError(redact(f"manifest {manifest_uri} is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                                   f"at offset {exc.start}): save it as UTF-8")) from None
    except Exception as exc:  # csv.Error (a NUL byte, a field too large), a Parquet file damaged past its footer
        raise ManifestError(redact(f"manifest {manifest_uri} cannot be read: {type(exc).__name__}: {exc}")) from None
    if merged:
        log.warning("%d manifest entries differ from an earlier one only in their query string or credentials: "
                    "each such document is read once, from its first entry", merged)
    for uri, questions in questions_of.items():
        yield ManifestEntry(uri, tuple(questions) or None, fetch_uri_of[uri])


def resolve_entry(entry: str, manifest_uri: str) -> str:
    """A manifest entry as a URI: URIs stay, paths are taken relative to the manifest's folder."""
    if "://" in entry:
        return entry
    if protocol_of(manifest_uri) == "file":
        local = manifest_uri[len("file://"):] if manifest_uri.startswith("file://") else manifest_uri
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(local)))
        return os.path.normpath(os.path.join(folder, os.path.expanduser(entry)))
    scheme, _, manifest_path = manifest_uri.partition("://")
    if entry.startswith("/"):  # a key from the root of the manifest's bucket
        return f"{scheme}://{manifest_path.split('/', 1)[0]}{entry}"
    folder = posixpath.dirname(manifest_path)
    return f"{scheme}://{posixpath.normpath(posixpath.join(folder, entry))}"


def _text(data: bytes) -> str:
    return data.decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) is not part of the first URI


def _parse_txt(data: bytes):
    for number, line in enumerate(_text(data).splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield f"line {number}", line, []


def _parse_csv(data: bytes):
    reader = csv.DictReader(io.StringIO(_text(data)))
    fields = [f.strip() for f in reader.fieldnames or []]
    if "uri" not in fields:
        raise ManifestError(f"a CSV manifest needs a header row with a 'uri' column, found {fields}")
    reader.fieldnames = fields
    for row in reader:
        question = (row.get("question") or "").strip()
        yield f"line {reader.line_num}", row.get("uri"), [question] if question else []


def _parse_jsonl(data: bytes):
    for number, line in enumerate(_text(data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"line {number} is not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ManifestError(f"line {number} must be a JSON object with a \"uri\" key")
        yield f"line {number}", record.get("uri"), _questions(record.get("question"), record.get("questions"))


def _parse_parquet(data: bytes):
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(io.BytesIO(data))
    except Exception as exc:
        raise ManifestError(f"not a readable Parquet file: {exc}") from None
    names = table_file.schema_arrow.names
    if "uri" not in names:
        raise ManifestError(f"a Parquet manifest needs a 'uri' column, found {names}")
    columns = [c for c in ("uri", "question", "questions") if c in names]
    number = 0
    for batch in table_file.iter_batches(columns=columns):
        for record in batch.to_pylist():
            number += 1
            yield f"row {number}", record["uri"], _questions(record.get("question"), record.get("questions"))


def _questions(question, questions) -> list:
    """One `question`, a `questions` list, or both, as one list."""
    found = [question] if question else []
    if isinstance(questions, str):
        questions = [questions]
    return found + list(questions or [])
