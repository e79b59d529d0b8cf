"""A small Google Cloud Storage JSON API server on loopback, for tests: real HTTP, in-memory buckets.

It speaks the part of the API that gcsfs uses (https://cloud.google.com/storage/docs/json_api/v1):
bucket get, objects.list with prefix / delimiter / maxResults / pageToken, object metadata, media
download with Range (and the `x-goog-generation` header), simple / multipart / resumable uploads,
rewrite (copy) and delete, with `ifGenerationMatch` preconditions on uploads and deletes (412 when the
live object's generation differs; 0 means "no live object"), as the output lease uses them. Point gcsfs at
it with `GCSFileSystem(endpoint_url=server.endpoint, token="anon")`, or a job with
`[storage] gcs_endpoint_url = server.endpoint` and `anon = true`. Every request is recorded, so a test can
count how many listing pages a client asked for.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

OBJECT = re.compile(r"^/(download/)?storage/v1/b/([^/]+)/o/([^/]+)$")
REWRITE = re.compile(r"^/storage/v1/b/([^/]+)/o/([^/]+)/(?:rewriteTo|copyTo)/b/([^/]+)/o/([^/]+)$")
LIST = re.compile(r"^/storage/v1/b/([^/]+)/o/?$")
BUCKET = re.compile(r"^/storage/v1/b/([^/]+)/?$")
UPLOAD = re.compile(r"^/upload/storage/v1/b/([^/]+)/o/?$")


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query
    query: dict[str, str]


@dataclass
class Upload:
    """A resumable upload session: the object's metadata and the bytes received so far."""

    bucket: str
    meta: dict
    data: bytearray = field(default_factory=bytearray)


class GcsServer:
    def __init__(self):
        self.buckets: dict[str, dict[str, tuple[bytes, dict]]] = {}  # bucket -> name -> (data, resource)
        self.uploads: dict[str, Upload] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._generation = itertools.count(1_700_000_000_000_000)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- for tests ----------------------------------------------------------------------------------
    def new_bucket(self, stem: str = "bkt") -> str:
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self.buckets[name] = {}
        return name

    def put(self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream",
            if_generation_match: str | None = None) -> dict | None:
        """Store an object; None (and nothing stored) when `if_generation_match` does not hold."""
        with self._lock:
            if not self._generation_matches(bucket, name, if_generation_match):
                return None
            generation = str(next(self._generation))
            resource = {
                "kind": "storage#object",
                "id": f"{bucket}/{name}/{generation}",
                "name": name,
                "bucket": bucket,
                "size": str(len(data)),
                "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
                "crc32c": "AAAAAA==",
                "etag": base64.b64encode(f"{generation}:{hashlib.md5(data).hexdigest()}".encode()).decode(),
                "generation": generation,
                "metageneration": "1",
                "contentType": content_type,
                "storageClass": "STANDARD",
                "timeCreated": _now(),
                "updated": _now(),
            }
            self.buckets[bucket][name] = (bytes(data), resource)
            return resource

    def _generation_matches(self, bucket: str, name: str, expected: str | None) -> bool:
        live = self.buckets[bucket].get(name)
        return expected is None or expected == (live[1]["generation"] if live else "0")

    def delete(self, bucket: str, name: str, if_generation_match: str | None = None) -> bool:
        with self._lock:
            if not self._generation_matches(bucket, name, if_generation_match):
                return False
            self.buckets[bucket].pop(name, None)
            return True

    def resource(self, bucket: str, name: str) -> dict:
        return self.buckets[bucket][name][1]

    def data(self, bucket: str, name: str) -> bytes:
        return self.buckets[bucket][name][0]

    def list_requests(self, bucket: str) -> list[Request]:
        """objects.list calls on `bucket`, in the order they came."""
        return [r for r in self.requests if r.method == "GET" and r.path.rstrip("/") == f"/storage/v1/b/{bucket}/o"]

    # -- the API ------------------------------------------------------------------------------------
    def list_objects(self, bucket: str, query: dict[str, str]) -> dict:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        page_size = min(int(query.get("maxResults") or 1000), 1000)
        start, end = query.get("startOffset", ""), query.get("endOffset", "")
        with self._lock:
            names = sorted(n for n in self.buckets[bucket] if n.startswith(prefix))
            objects = {n: self.buckets[bucket][n][1] for n in names}
        # Collapse names below a delimiter into one prefix entry; each entry starts at its first name,
        # which is what the page token points at.
        entries: list[tuple[str, str | None]] = []  # (first name, prefix or None for an object)
        seen_prefixes = set()
        for name in names:
            if (start and name < start) or (end and name >= end):
                continue
            rest = name[len(prefix):]
            if delimiter and delimiter in rest:
                folder = prefix + rest[: rest.index(delimiter) + len(delimiter)]
                if folder not in seen_prefixes:
                    seen_prefixes.add(folder)
                    entries.append((name, folder))
            else:
                entries.append((name, None))
        token = query.get("pageToken")
        after = base64.urlsafe_b64decode(token.encode()).decode() if token else ""
        entries = [e for e in entries if e[0] >= after]
        page, more = entries[:page_size], entries[page_size:]
        out: dict = {"kind": "storage#objects"}
        items = [objects[name] for name, folder in page if folder is None]
        prefixes = [folder for _, folder in page if folder is not None]
        if items:
            out["items"] = items
        if prefixes:
            out["prefixes"] = prefixes
        if more:
            out["nextPageToken"] = base64.urlsafe_b64encode(more[0][0].encode()).decode()
        return out

    def upload(self, bucket: str, query: dict[str, str], headers, body: bytes) -> tuple[int, dict, dict]:
        """objects.insert: (status, response headers, JSON body)."""
        kind = query.get("uploadType", "media")
        condition = query.get("ifGenerationMatch")
        if kind == "media":
            return _stored(self.put(bucket, query["name"], body, headers.get("Content-Type") or "application/octet-stream",
                                    condition))
        if kind == "multipart":
            meta, data, content_type = _multipart(headers.get("Content-Type", ""), body)
            return _stored(self.put(bucket, meta.get("name") or query["name"], data,
                                    meta.get("contentType") or content_type, condition))
        if kind == "resumable" and "upload_id" not in query:
            meta = json.loads(body or b"{}")
            meta.setdefault("name", query.get("name"))
            meta.setdefault("contentType", headers.get("X-Upload-Content-Type") or "application/octet-stream")
            meta["ifGenerationMatch"] = condition  # checked when the last part arrives
            upload_id = uuid.uuid4().hex
            with self._lock:
                self.uploads[upload_id] = Upload(bucket, meta)
            location = f"{self.endpoint}/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=resumable&upload_id={upload_id}"
            return 200, {"Location": location}, {}
        return self.upload_chunk(query["upload_id"], headers, body)

    def upload_chunk(self, upload_id: str, headers, body: bytes) -> tuple[int, dict, dict]:
        """One part of a resumable upload; Content-Range says where it goes and whether it is the last.
        Until then the answer is 308 with the bytes received so far (the `Range` header)."""
        session = self.uploads.get(upload_id)
        if session is None:
            return 404, {}, {"error": {"code": 404, "message": "no such upload"}}
        match = re.match(r"bytes (\*|(\d+)-(\d+))/(\*|\d+)", headers.get("Content-Range", "bytes */*"))
        if match is None:
            return 400, {}, {"error": {"code": 400, "message": "bad Content-Range"}}
        if match.group(2) is not None:
            offset = int(match.group(2))
            session.data[offset:] = body  # a resent part replaces what it overlaps
        total = match.group(4)
        if total != "*" and len(session.data) >= int(total):
            with self._lock:
                self.uploads.pop(upload_id, None)
            meta = session.meta
            return _stored(self.put(session.bucket, meta["name"], bytes(session.data[: int(total)]), meta["contentType"],
                                    meta.get("ifGenerationMatch")))
        received = {"Range": f"bytes=0-{len(session.data) - 1}"} if session.data else {}
        return 308, received, {}


def _stored(resource: dict | None) -> tuple[int, dict, dict]:
    if resource is None:
        return 412, {}, {"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}}
    return 200, {}, resource


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _multipart(content_type: str, body: bytes) -> tuple[dict, bytes, str]:
    """(metadata, data, data's content type) from a multipart/related upload body."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    parts = body.split(b"--" + boundary)[1:-1]
    fields = []
    for part in parts:
        part = part[2:] if part.startswith(b"\r\n") else part[1:]  # the newline after the boundary
        crlf, lf = part.find(b"\r\n\r\n"), part.find(b"\n\n")
        head_end, gap = (crlf, 4) if crlf >= 0 and (lf < 0 or crlf < lf) else (lf, 2)
        head, content = part[:head_end].decode(), part[head_end + gap:]
        content = content[:-2] if content.endswith(b"\r\n") else content[:-1]  # the newline before the next
        kind = re.search(r"(?im)^content-type:\s*(.+?)\s*$", head)
        fields.append((kind.group(1) if kind else "application/octet-stream", content))
    (_, meta), (data_type, data) = fields[0], fields[1]
    return json.loads(meta), data, data_type


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) for a `Range: bytes=...` header, or None for the whole object."""
    match = re.match(r"bytes=(\d*)-(\d*)$", header or "")
    if not match:
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        return max(0, size - int(last)), size
    return int(first), min(size, int(last) + 1) if last else size


def _handler(server: GcsServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes | dict = b"", headers: dict | None = None) -> None:
            if isinstance(body, dict):
                body = json.dumps(body).encode() if body or status < 300 else b""
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _missing(self, what: str) -> None:
            self._send(404, {"error": {"code": 404, "message": f"No such object: {what}"}})

        def _route(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            server.requests.append(Request(self.command, unquote(url.path), query))
            method, path = self.command, url.path

            if match := UPLOAD.match(path):
                bucket = unquote(match.group(1))
                if bucket not in server.buckets:
                    return self._missing(bucket)
                status, headers, out = server.upload(bucket, query, self.headers, body)
                return self._send(status, out, headers)
            if match := REWRITE.match(path):
                source, name, target, new_name = (unquote(g) for g in match.groups())
                if name not in server.buckets.get(source, {}) or target not in server.buckets:
                    return self._missing(f"{source}/{name}")
                data, resource = server.buckets[source][name]
                copied = server.put(target, new_name, data, resource["contentType"])
                return self._send(200, {"kind": "storage#rewriteResponse", "done": True, "resource": copied,
                                        "totalBytesRewritten": copied["size"], "objectSize": copied["size"]})
            if match := OBJECT.match(path):
                bucket, name = unquote(match.group(2)), unquote(match.group(3))
                stored = server.buckets.get(bucket, {}).get(name)
                if stored is None:
                    return self._missing(f"{bucket}/{name}")
                data, resource = stored
                if method == "DELETE":
                    if not server.delete(bucket, name, query.get("ifGenerationMatch")):
                        return self._send(412, {"error": {"code": 412, "message": "precondition failed"}})
                    return self._send(204)
                if method == "PATCH":
                    return self._send(200, resource)
                if query.get("alt") != "media" and not match.group(1):  # metadata, not the bytes
                    return self._send(200, resource)
                span = _byte_range(self.headers.get("Range"), len(data))
                media = {"Content-Type": resource["contentType"], "x-goog-generation": resource["generation"]}
                if span is None:
                    return self._send(200, data, media)
                start, end = span
                return self._send(206, data[start:end], {**media, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
            if (match := LIST.match(path)) and method == "GET":
                bucket = unquote(match.group(1))
                if bucket not in server.buckets:
                    return self._missing(bucket)
                return self._send(200, server.list_objects(bucket, query))
            if (match := BUCKET.match(path)) and method == "GET":
                bucket = unquote(match.group(1))
                if bucket not in server.buckets:
                    return self._missing(bucket)
                return self._send(200, {"kind": "storage#bucket", "id": bucket, "name": bucket,
                                        "location": "US", "storageClass": "STANDARD"})
            if path.rstrip("/") == "/storage/v1/b" and method == "GET":
                return self._send(200, {"kind": "storage#buckets",
                                        "items": [{"kind": "storage#bucket", "name": b} for b in sorted(server.buckets)]})
            self._send(400, {"error": {"code": 400, "message": f"not supported here: {method} {path}"}})

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _route

    return Handler
