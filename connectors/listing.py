"""Listing: turn the job's input into a stream of planned inputs (one row per object).

`--input` may be a folder or prefix (everything below it), a glob (`s3://bucket/archive/**/*.pdf`), a
single object, or, with `--manifest`, a file that lists the inputs (see `connectors/manifest.py`).
Objects are yielded as they are found, so a prefix with millions of keys never becomes one giant list.
Below a folder or a glob's fixed part, names starting with `_` or `.` are skipped (temporary and hidden
files, and Scriptorium's own `_scriptorium`/`_work`/`_runs` bookkeeping when the output sits inside the
input). The runner also passes `skip` (`results_filter`), which says which objects are the job's
results, so an output inside its input is never read back as input.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Callable, Iterator

import fsspec.asyn
from fsspec.utils import glob_translate

from scriptorium.connectors.manifest import ManifestEntry, read_manifest
from scriptorium.connectors.manifest_policy import entry_refusal
from scriptorium.connectors.storage import filesystem_for, redact, uri_for
from scriptorium.core.kinds import kind_of
from scriptorium.core.redaction import redact_uri
from scriptorium.core.spec import InputSpec, StorageSpec

GLOB_CHARS = "*?["
LIST_PAGE = 1000  # objects per S3 ListObjectsV2 / GCS objects.list page (both APIs' maximum)
HEAD_CONCURRENCY = 16  # parallel metadata lookups for manifest entries
HEAD_CHUNK = 256  # manifest entries looked up per round: bounds memory for huge manifests


def source_version(info: dict) -> str:
    """ETag for object stores, mtime for local files: what tells a rerun that a source has changed."""
    for key in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        if info.get(key):
            return f"mtime:{info[key]}"
    return ""


def _is_hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _is_s3(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "s3" in protocols and hasattr(fs, "_iterdir")


def _stream_s3(fs, key_prefix: str) -> Iterator[tuple[str, dict]]:
    """(path, info) for every object whose key starts with `key_prefix` ("bucket/some/prefix").

    `fs.find`, `fs.glob` and `fs.walk` on s3fs all collect the complete listing before returning
    (find builds one dict of every key below the prefix), so a million-object prefix would sit in
    memory before the first document is planned. s3fs's `_iterdir` is an async generator over
    ListObjectsV2 pages (each page retried by s3fs's `_call_s3`); without a delimiter it walks the
    whole tree flat. We pull it one page at a time on s3fs's event loop, so memory holds one page.
    """
    bucket, key, _ = fs.split_path(key_prefix)
    pages = fs._iterdir(bucket, delimiter="", prefix=key)
    while True:
        page = fsspec.asyn.sync(fs.loop, _take, pages, LIST_PAGE)
        for info in page:
            if info.get("type") == "file" and not info["name"].endswith("/"):  # "folder/" placeholders
                yield info["name"], info
        if len(page) < LIST_PAGE:
            return


def _is_gcs(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "gs" in protocols and hasattr(fs, "_process_object")


def _stream_gcs(fs, key_prefix: str) -> Iterator[tuple[str, dict]]:
    """(path, info) for every object whose name starts with `key_prefix` ("bucket/some/prefix").

    gcsfs has no paged iterator: `walk`, `find` and `glob` gather every page of a listing before they
    return. So we ask for one objects.list page at a time through gcsfs's own `_call` (its auth,
    retries and requester-pays parameters apply), without a delimiter so the tree comes flat, and turn
    items into info dicts the way gcsfs does (`_process_object`): memory holds one page.
    """
    bucket, key, _ = fs.split_path(key_prefix)
    token = None
    while True:
        page = fsspec.asyn.sync(fs.loop, fs._call, "GET", "b/{}/o", bucket, json_out=True,
                                prefix=key or None, maxResults=LIST_PAGE, pageToken=token)
        for item in page.get("items", []):
            if not item["name"].endswith("/"):  # "folder/" placeholders
                info = fs._process_object(bucket, item)
                yield info["name"], info
        token = page.get("nextPageToken")
        if not token:
            return


async def _take(items, n: int) -> list:
    """Up to n items from an async iterator (fewer only when it is exhausted)."""
    taken = []
    try:
        while len(taken) < n:
            taken.append(await items.__anext__())
    except StopAsyncIteration:
        pass
    return taken


def _files_below(fs, root: str, name_prefix: str = "") -> Iterator[tuple[str, dict]]:
    """(path, info) for every file below folder `root` whose path starts with `root/name_prefix`."""
    start = f"{root}/{name_prefix}" if root else name_prefix
    if _is_s3(fs):
        yield from _stream_s3(fs, start)
        return
    if _is_gcs(fs):
        yield from _stream_gcs(fs, start)
        return
    # Local, memory, ...: one directory listing at a time.
    for directory, _dirs, files in fs.walk(root, detail=True):
        for name in sorted(files):
            info = files[name]
            path = info.get("name") or posixpath.join(directory, name)
            if path.startswith(start):
                yield path, info


def _split_glob(path: str) -> tuple[str, str]:
    """("bucket/archive", "doc") for "bucket/archive/doc*/**/*.pdf": the folder before the first wildcard
    and the fixed start of the name after it (S3 lists by key prefix, so that narrows the listing)."""
    first = min(i for i in (path.find(ch) for ch in GLOB_CHARS) if i >= 0)
    fixed = path[:first]
    root, _, name_prefix = fixed.rpartition("/")
    return root, name_prefix


def iter_objects(spec: InputSpec, options: StorageSpec,
                 skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, dict, str]]:
    """(uri, info, name relative to the listing root) for every object the input names, unfiltered but
    for hidden names and the URIs `skip` is true of, below a folder or glob."""
    fs, path = filesystem_for(spec.uri, options)
    skipped = skip or (lambda uri: False)
    if any(ch in path for ch in GLOB_CHARS):
        root, name_prefix = _split_glob(path)
        pattern = re.compile(glob_translate(path))
        for match, info in _files_below(fs, root, name_prefix):
            relative = match[len(root):].lstrip("/")
            if pattern.fullmatch(match) and not _is_hidden(relative) and not skipped(uri := uri_for(fs, match)):
                yield uri, info, relative
        return
    info = fs.info(path)  # raises FileNotFoundError for a missing input: a job-level error
    if info.get("type") == "directory":
        root = path.rstrip("/")
        for child, child_info in _files_below(fs, root):
            relative = child[len(root):].lstrip("/")
            if not _is_hidden(relative) and not skipped(uri := uri_for(fs, child)):
                yield uri, child_info, relative
    else:
        yield uri_for(fs, path), info, posixpath.basename(path)


def _selected(relative: str, spec: InputSpec) -> bool:
    """include/exclude globs match the name relative to the listing root, or the bare file name."""
    name = posixpath.basename(relative)

    def matches(pattern: str) -> bool:
        return fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(name, pattern)

    if spec.include and not any(matches(p) for p in spec.include):
        return False
    return not any(matches(p) for p in spec.exclude)


def _plan_row(uri: str, info: dict | None, relative: str, spec: InputSpec, questions=None,
              fetch_uri: str | None = None) -> dict:
    """The plan row of one object. `source_uri` is `uri` redacted (no userinfo, no http(s) query: it is
    written to every row); the URI to read, when it differs, is `fetch_uri`, which only the reader sees."""
    size = info.get("size") if info else None
    source_uri = redact_uri(uri)
    row = {
        "source_uri": source_uri,
        "fetch_uri": fetch_uri or (uri if uri != source_uri else None),
        "size": int(size) if size is not None else None,
        "etag": source_version(info) if info else None,
        "kind": kind_of(posixpath.basename(relative)),
        "error": None,
        "questions": list(questions) if questions else None,
    }
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:  # a name in a legacy encoding (old archives): Parquet strings must be UTF-8
        row["source_uri"] = uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        row["error"] = "file name is not valid UTF-8: rename it (e.g. convmv -f latin1 -t utf8)"
        return row
    max_bytes = int(spec.max_size_mb * 1024 * 1024) if spec.max_size_mb else 0
    if max_bytes and size is not None and size > max_bytes:
        row["error"] = redact(f"file is {size} bytes, more than input.max_size_mb={spec.max_size_mb:g}")
    if info and info.get("type") == "directory":
        row["error"] = redact(f"manifest entry {uri} is a folder: list files, or pass the folder as --input")
    return row


def _manifest_rows(spec: InputSpec, options: StorageSpec) -> Iterator[dict]:
    """Plan rows for the entries of a manifest, with each object's size and ETag looked up in parallel.

    An entry whose lookup fails (missing, forbidden) is still planned, with null size and ETag: reading
    it fails the same way in the pages stage, which records an error row (stage "read") for it. An entry
    the manifest policy refuses (connectors/manifest_policy.py) is planned as an error, never looked up.
    """
    entries = (e for e in read_manifest(spec.uri, options) if _selected(_path_part(e.uri), spec))
    with ThreadPoolExecutor(HEAD_CONCURRENCY) as pool:
        while chunk := list(islice(entries, HEAD_CHUNK)):
            refusals = [entry_refusal(e.uri, spec.uri, spec.manifest_allow) for e in chunk]
            infos = pool.map(lambda e, refused: None if refused else _info_or_none(e, options), chunk, refusals)
            for entry, refusal, info in zip(chunk, refusals, infos):
                row = _plan_row(entry.uri, info, _path_part(entry.uri), spec, entry.questions, entry.fetch_uri)
                if refusal:
                    row["error"] = refusal
                yield row


def _path_part(uri: str) -> str:
    return uri.split("://", 1)[-1]


def _info_or_none(entry: ManifestEntry, options: StorageSpec) -> dict | None:
    try:
        fs, path = filesystem_for(entry.fetch_uri or entry.uri, options)
        return fs.info(path)
    except Exception:  # missing, forbidden, unreachable: the read will record why
        return None


def results_filter(spec: InputSpec, options: StorageSpec, output_template: str,
                   owns: Callable[[str], bool]) -> Callable[[str], bool]:
    """What a listing of `spec` must skip so that a job never reads results back as input: the output's
    own files (`owns(uri)`: an output that is the input folder itself), and, when the output lies inside
    the folder the listing walks, everything below it. For an output partitioned by run
    (`.../run_id={run_id}`) that is everything below the part before `{run_id}`: every run's partition."""
    fs, path = filesystem_for(spec.uri, options)
    walked = uri_for(fs, _split_glob(path)[0] if any(ch in path for ch in GLOB_CHARS) else path.rstrip("/")) + "/"
    static, partitioned, _ = output_template.partition("{run_id}")
    output_fs, output_path = filesystem_for(static if partitioned else output_template, options)
    prefix = uri_for(output_fs, output_path.rstrip("/")) + ("" if partitioned and not static.endswith("/") else "/")
    inside = prefix.startswith(walked) and prefix != walked
    return lambda uri: owns(uri) or (inside and uri.startswith(prefix))


def list_inputs(spec: InputSpec, options: StorageSpec, skip: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Planned inputs: dicts with source_uri, size, etag, kind, questions and (for unusable ones) error.
    `skip(uri)`: objects never listed below a folder or glob (the job's own output files)."""
    if spec.manifest:
        yield from _manifest_rows(spec, options)
        return
    for uri, info, relative in iter_objects(spec, options, skip):
        if _selected(relative, spec):
            yield _plan_row(uri, info, relative, spec)
