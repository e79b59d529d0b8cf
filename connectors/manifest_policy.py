"""What a manifest may point at: by default, what lies beside it and public web hosts.

A manifest is a list that someone else may have written, read with this job's credentials, and what its
entries hold ends up in the output (as transcriptions and captions). So by default an entry may name:

- an object in the manifest's own bucket (`s3://`, `gs://`, `memory://`), anywhere in it; for a local
  manifest, a file in the manifest's folder or below it; for a manifest served over http(s), a URL on
  the same scheme, host and port;
- an http(s) URL on a public host (URL lists are how captioning corpora ship): not a loopback, private,
  link-local or metadata address. The name is checked when the job is planned (here), and again when
  the URL is fetched, redirects and resolved addresses included (http_guard.py).

Anything else (`file:///etc/passwd`, a local path outside the manifest's folder, another bucket through
`../../other-bucket/x.pdf`, a host on the private network) is an error row (stage "list") and is never
read, unless a prefix in `[input] manifest_allow` covers it, e.g. `["s3://other-bucket/", "/data/scans/",
"http://10.0.0.5:8080/"]`, or `["*"]` for anything. Entries are compared in their redacted form (no
userinfo, no query string: core/redaction.py).
"""

from __future__ import annotations

import os
import posixpath
from typing import Sequence
from urllib.parse import urlsplit

from scriptorium.connectors.http_guard import HTTP, private_host, url_allowed_by
from scriptorium.connectors.storage import protocol_of
from scriptorium.core.redaction import redact_uri


def entry_refusal(uri: str, manifest_uri: str, allow: Sequence[str]) -> str | None:
    """Why manifest entry `uri` may not be read (None if it may), for its error row."""
    uri, manifest_uri = redact_uri(uri), redact_uri(manifest_uri)
    if allowed_by(uri, allow) or _beside(uri, manifest_uri):
        return None
    fix = f"allow it with [input] manifest_allow = [\"{_suggested_prefix(uri)}\"]"
    if protocol_of(uri) in HTTP:
        private = private_host(urlsplit(uri).hostname or "")
        return None if private is None else f"manifest entry {uri} is not read: {private}; {fix}"
    where = {"file": "folder", "http": "host", "https": "host"}.get(protocol_of(manifest_uri), "bucket")
    return f"manifest entry {uri} is not read: it is outside the manifest's {where}; {fix}"


def allowed_by(uri: str, allow: Sequence[str]) -> bool:
    """Does a prefix in `allow` (or "*") cover `uri`? Local paths are compared as absolute paths."""
    if protocol_of(uri) in HTTP:
        return url_allowed_by(uri, allow)
    target = _comparable(uri)
    return any(prefix == "*" or target.startswith(_comparable(prefix)) for prefix in allow)


def _beside(uri: str, manifest_uri: str) -> bool:
    """In the manifest's own bucket, below its folder (local), or on its own origin (http)."""
    scheme = protocol_of(manifest_uri)
    if protocol_of(uri) != scheme:
        return False
    if scheme == "file":
        folder = os.path.dirname(_local_path(manifest_uri))
        return os.path.commonpath([folder, _local_path(uri)]) == folder
    if scheme in HTTP:
        return urlsplit(uri).netloc.lower() == urlsplit(manifest_uri).netloc.lower()
    return _bucket(uri) == _bucket(manifest_uri)


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def _local_path(uri: str) -> str:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def _comparable(uri: str) -> str:
    """A local path or object URI as prefixes are matched: local paths absolute (a trailing / kept)."""
    if protocol_of(uri) == "file":
        return "file://" + _local_path(uri) + ("/" if uri.endswith("/") else "")
    return uri


def _suggested_prefix(uri: str) -> str:
    """The prefix to allow for `uri`: its bucket, its host, or its folder."""
    scheme = protocol_of(uri)
    if scheme == "file":
        return posixpath.dirname(_local_path(uri)) + "/"
    if scheme in HTTP:
        parts = urlsplit(uri)
        return f"{parts.scheme}://{parts.netloc}/"
    return f"{scheme}://{_bucket(uri)}/"
