"""Listing: turn the job's input URI into a stream of planned inputs.

`--input` may be a folder or prefix (everything below it), a glob (`s3://bucket/archive/**/*.pdf`) or a
single object. Objects are yielded as they are found, so a prefix with millions of keys never becomes
one giant list. Names starting with `_` or `.` are skipped (temporary and hidden files).
"""

from __future__ import annotations

import fnmatch
import posixpath
from typing import Iterator

from connectors.storage import StorageOptions, filesystem_for, redact, uri_for
from jobs.spec import InputSpec

GLOB_CHARS = set("*?[")


def _etag(info: dict) -> str:
    """ETag for object stores, mtime for local files: what tells us a source has changed."""
    for key in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        if info.get(key):
            return f"mtime:{info[key]}"
    return ""


def _is_hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.split("/") if part)


def _walk(fs, root: str) -> Iterator[tuple[str, dict]]:
    """(path, info) for every file below root, one directory listing at a time."""
    for directory, _dirs, files in fs.walk(root, detail=True):
        for name in sorted(files):
            info = files[name]
            path = info.get("name") or posixpath.join(directory, name)
            yield path, info


def iter_objects(spec: InputSpec, options: StorageOptions) -> Iterator[tuple[str, dict, str]]:
    """(uri, info, relative name) for every object the input names, before include/exclude filters."""
    fs, path = filesystem_for(spec.uri, options)
    if any(ch in path for ch in GLOB_CHARS):
        for match, info in sorted(fs.glob(path, detail=True).items()):
            if info.get("type") == "file":
                yield uri_for(fs, match), info, match
        return
    info = fs.info(path)  # raises FileNotFoundError for a missing input: a job-level error
    if info.get("type") == "directory":
        root = path.rstrip("/")
        for child, child_info in _walk(fs, root):
            relative = child[len(root):].lstrip("/")
            if not _is_hidden(relative):
                yield uri_for(fs, child), child_info, relative
    else:
        yield uri_for(fs, path), info, posixpath.basename(path)


def list_inputs(spec: InputSpec, options: StorageOptions) -> Iterator[dict]:
    """Planned inputs: dicts with source_uri, size, etag, kind and (for unusable ones) error."""
    from pipeline.pages import kind_of

    max_bytes = int(spec.max_size_mb * 1024 * 1024) if spec.max_size_mb else 0
    for uri, info, relative in iter_objects(spec, options):
        name = posixpath.basename(relative)
        if spec.include and not any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in spec.include):
            continue
        if spec.exclude and any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in spec.exclude):
            continue
        size = int(info.get("size") or 0)
        row = {"source_uri": uri, "size": size, "etag": _etag(info), "kind": kind_of(name), "error": None}
        if max_bytes and size > max_bytes:
            row["error"] = redact(f"file is {size} bytes, more than input.max_size_mb={spec.max_size_mb:g}")
        yield row
