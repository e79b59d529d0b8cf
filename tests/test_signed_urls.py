"""Signed URLs and what a manifest may point at.

A manifest of presigned URLs (AWS SigV4 and SigV2, GCS V4, Azure SAS, `TOKEN@host`, `user:pass@host`),
served by a loopback HTTP server that checks nothing, is run end to end: every document is read with
its full URL, and no signature, credential or token appears in any output file, summary, the report or
anything printed. The manifest policy (connectors/manifest_policy.py) keeps entries to the manifest's own
folder or bucket and public hosts unless `[input] manifest_allow` opens more, when planning and again
when fetching (redirects, names that resolve to private addresses).
"""

from __future__ import annotations

import json
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest

from scriptorium.connectors.listing import list_inputs
from scriptorium.core.redaction import redact, redact_uri
from scriptorium.core.spec import InputSpec, RenderSpec, StorageSpec
from scriptorium.pipeline.render.stage import pages_of
from tests.conftest import make_image, make_pdf, read_rows, run_cli

SECRETS = {
    "sigv4_signature": "5e1f0c9aSIGV4SIGNATURE7d2b",
    "sigv4_credential": "AKIAFAKESIGV4CRED42",
    "sigv4_token": "FQoGZXIvYXdzFAKESESSIONTOKEN",
    "sigv2_key": "AKIAFAKESIGV2KEY17",
    "sigv2_signature": "FAKESIGV2SIGNATUREx9",
    "gcs_credential": "scribe-FAKEGCSCRED@project.iam.gserviceaccount.com",
    "gcs_signature": "0badc0deFAKEGCSSIGNATURE",
    "azure_signature": "FAKEAZURESASSIGw8",
    "token": "ghp_FAKETOKENINUSERINFO",
    "user": "alice-FAKEUSER",
    "password": "FAKEPASSWORDhunter2",
}


class FileServer:
    """Serves a folder on 127.0.0.1, whatever the query string or credentials, recording each request
    (method, path with query); `redirects` maps a path to where it sends the client; each path in
    `unavailable_once` is answered 503 to its first GET (a busy server), then served."""

    def __init__(self, folder: Path):
        self.requests: list[tuple[str, str]] = []
        self.redirects: dict[str, str] = {}
        self.unavailable_once: set[str] = set()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_head(self):
                server.requests.append((self.command, self.path))
                if self.command == "GET" and self.path.split("?", 1)[0] in server.unavailable_once:
                    server.unavailable_once.discard(self.path.split("?", 1)[0])
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                target = server.redirects.get(self.path.split("?", 1)[0])
                if target:
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return super().send_head()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def signed_urls(origin: str) -> dict[str, str]:
    """Each document's name -> its URL in the manifest, signed in one of the common ways."""
    s, host = SECRETS, origin.split("://", 1)[1]
    return {
        "a.pdf": f"{origin}/a.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={s['sigv4_credential']}"
                 f"%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600"
                 f"&X-Amz-SignedHeaders=host&X-Amz-Security-Token={s['sigv4_token']}&X-Amz-Signature={s['sigv4_signature']}",
        "b.png": f"{origin}/b.png?AWSAccessKeyId={s['sigv2_key']}&Expires=1767225600&Signature={s['sigv2_signature']}",
        "c.pdf": f"{origin}/c.pdf?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential={quote(s['gcs_credential'], safe='')}"
                 f"%2F20260101%2Fauto%2Fstorage%2Fgoog4_request&X-Goog-Date=20260101T000000Z&X-Goog-Expires=900"
                 f"&X-Goog-SignedHeaders=host&X-Goog-Signature={s['gcs_signature']}",
        "d.png": f"{origin}/d.png?sv=2022-11-02&ss=b&srt=o&sp=r&se=2026-12-31T00%3A00%3A00Z&st=2026-01-01T00%3A00%3A00Z"
                 f"&spr=https,http&sig={s['azure_signature']}",
        "e.png": f"http://{s['token']}@{host}/e.png",
        "f.png": f"http://{s['user']}:{s['password']}@{host}/f.png",
        "missing.pdf": f"{origin}/missing.pdf?X-Amz-Credential={s['sigv4_credential']}&X-Amz-Signature={s['sigv4_signature']}",
        "broken.png": f"{origin}/broken.png?sv=2022-11-02&sig={s['azure_signature']}",
    }


def serve_documents(folder: Path) -> None:
    for name, color in (("b.png", (200, 30, 30)), ("d.png", (30, 200, 30)), ("e.png", (30, 30, 200)),
                        ("f.png", (200, 200, 30))):
        make_image(folder / name, color=color, text=name)
    make_pdf(folder / "a.pdf", ["A signed letter.", "Its second page."])
    make_pdf(folder / "c.pdf", ["A signed receipt."])
    (folder / "broken.png").write_bytes(b"\x89PNG not really")


def leaked(text: str) -> list[str]:
    """The secrets that appear in `text`, as they are or URL-encoded."""
    return [name for name, value in SECRETS.items() if value in text or quote(value, safe="") in text]


def every_string_in(folder: Path) -> str:
    """Every byte of every file below `folder` as text, and every value of its Parquet files (whose pages
    may be compressed) written out."""
    parts = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        parts.append(path.read_bytes().decode("utf-8", "replace"))
        if path.suffix == ".parquet":
            parts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_manifest_of_signed_urls_leaks_no_secret_anywhere(tiny_model, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    serve_documents(served)
    output, report = tmp_path / "out", tmp_path / "review.html"
    job = tmp_path / "job.toml"
    job.write_text("[render]\npage_edge = 64\n[model]\nlongest_edge = 56\nshortest_edge = 28\ndevice = \"cpu\"\n"
                   "[resources]\nbatch_size = 4\n")
    with FileServer(served) as server:
        urls = signed_urls(server.origin)
        assert sorted(leaked("\n".join(urls.values()))) == sorted(SECRETS)  # each one is found where it is
        manifest = tmp_path / "signed.jsonl"
        manifest.write_text("".join(json.dumps({"uri": url}) + "\n" for url in urls.values()))
        run = run_cli("run", "--job", str(job), "--input", str(manifest), "--manifest", "--output", str(output),
                      "--task", "ocr", "--model", str(tiny_model), "--max-new-tokens", "2",
                      "--manifest-allow", f"{server.origin}/", timeout=540)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = run_cli("summary", str(output))
        review = run_cli("report", str(output), "--html", str(report))
        assert summary.returncode == 0 and review.returncode == 0, summary.stderr + review.stderr
        # Every document was fetched with its signed URL as listed.
        fetched = {path for _, path in server.requests}
        assert any(path.endswith(f"X-Amz-Signature={SECRETS['sigv4_signature']}") for path in fetched)
        assert any(f"sig={SECRETS['azure_signature']}" in path for path in fetched)

    rows = {(Path(r["source_uri"]).name, r["page"]): r for r in read_rows(output)}
    assert {r["source_uri"] for r in rows.values()} == {f"{server.origin}/{name}" for name in urls}
    assert sorted(key for key, row in rows.items() if row["status"] == "ok") == [
        ("a.pdf", 0), ("a.pdf", 1), ("b.png", 0), ("c.pdf", 0), ("d.png", 0), ("e.png", 0), ("f.png", 0)]
    rows = {name: row for (name, _), row in rows.items()}
    assert rows["missing.pdf"]["error"] == f"cannot read: no such object: {server.origin}/missing.pdf"
    assert rows["broken.png"]["stage"] == "decode"

    assert leaked(every_string_in(output)) == []
    assert leaked(report.read_text()) == []
    for proc in (run, summary, review):
        assert leaked(proc.stdout + proc.stderr) == []


# -- the manifest policy -----------------------------------------------------------------------------------
def planned(manifest: Path, allow=()) -> dict[str, str | None]:
    spec = InputSpec(uri=str(manifest), manifest=True, manifest_allow=list(allow))
    return {row["source_uri"]: row["error"] for row in list_inputs(spec, StorageSpec().with_manifest_policy(spec))}


def test_by_default_a_manifest_reads_only_beside_itself_and_public_hosts(tmp_path):
    lists = tmp_path / "lists"
    (lists / "docs").mkdir(parents=True)
    beside = make_pdf(lists / "docs" / "ok.pdf", ["listed beside its manifest"])
    outside = make_pdf(tmp_path / "outside.pdf", ["one folder up"])
    with FileServer(tmp_path) as server:
        port = server.origin.rsplit(":", 1)[1]
        entries = ["docs/ok.pdf", "../outside.pdf", "file:///etc/hostname", "/etc/passwd", f"{server.origin}/outside.pdf",
                   f"http://localhost:{port}/outside.pdf", f"http://2130706433:{port}/outside.pdf",
                   f"http://[::1]:{port}/outside.pdf", "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                   "http://metadata.google.internal/computeMetadata/v1/", "s3://another-bucket/x.pdf",
                   "https://images.example.org/cat.jpg"]
        manifest = lists / "batch.txt"
        manifest.write_text("\n".join(entries) + "\n")

        refused = planned(manifest)
        assert server.requests == []  # nothing was fetched, not even looked up
        assert refused[str(beside)] is None and refused["https://images.example.org/cat.jpg"] is None
        assert refused[str(outside)] == (f"manifest entry {outside} is not read: it is outside the manifest's folder; "
                                         f"allow it with [input] manifest_allow = [\"{tmp_path}/\"]")
        assert refused["file:///etc/hostname"].startswith("manifest entry file:///etc/hostname is not read: it is outside")
        assert refused["/etc/passwd"].startswith("manifest entry /etc/passwd is not read: it is outside")
        assert refused["s3://another-bucket/x.pdf"].endswith("manifest_allow = [\"s3://another-bucket/\"]")
        for url in entries[4:10]:
            assert "is a loopback, private, link-local or reserved address" in refused[url] \
                or "is a local or metadata host name" in refused[url], url

        allowed = planned(manifest, allow=[f"{server.origin}/", f"{tmp_path}/"])
        assert allowed[str(outside)] is None and allowed[f"{server.origin}/outside.pdf"] is None
        assert allowed[f"http://localhost:{port}/outside.pdf"] is not None  # another host than the allowed one
        (page,) = pages_of({"source_uri": f"{server.origin}/outside.pdf", "kind": "pdf"}, RenderSpec(page_edge=64),
                           StorageSpec(http_allow=(f"{server.origin}/",)))
        assert page["status"] == "ok"


def test_a_fetch_is_checked_again_redirects_and_resolved_addresses_included(tmp_path):
    make_pdf(tmp_path / "doc.pdf", ["a page"])
    with FileServer(tmp_path) as allowed_host, FileServer(tmp_path) as other:
        other_port = other.origin.rsplit(":", 1)[1]
        allowed_host.redirects["/moved.pdf"] = f"http://localhost:{other_port}/doc.pdf"
        options = StorageSpec(http_allow=(f"{allowed_host.origin}/",))
        settings = RenderSpec(page_edge=64)

        (page,) = pages_of({"source_uri": f"{allowed_host.origin}/moved.pdf", "kind": "pdf"}, settings, options)
        assert page["stage"] == "read" and f"localhost:{other_port}/doc.pdf is not read: localhost is a local" in page["error"]
        assert other.requests == []  # the redirect was not followed

        name = socket.gethostname()
        try:
            address = socket.gethostbyname(name)
        except OSError:
            pytest.skip(f"this machine's name {name} does not resolve")
        if not address.startswith("127."):
            pytest.skip(f"{name} resolves to {address}, where the test server does not listen")
        by_name = f"http://{name}:{other_port}/doc.pdf"  # a name that passes as public, resolving to loopback
        (page,) = pages_of({"source_uri": by_name, "kind": "pdf"}, settings, options)
        assert page["stage"] == "read" and f"{name} resolves to {address}, not a public address" in page["error"]
        assert other.requests == []
        (page,) = pages_of({"source_uri": by_name, "kind": "pdf"}, settings, StorageSpec())  # no policy: read
        assert page["status"] == "ok" and other.requests


@pytest.mark.parametrize("url, kept", [
    ("https://b.s3.amazonaws.com/k/a.pdf?X-Amz-Signature=abc&X-Amz-Credential=AKIA", "https://b.s3.amazonaws.com/k/a.pdf"),
    ("https://storage.googleapis.com/b/c.pdf?X-Goog-Signature=abc#page=2", "https://storage.googleapis.com/b/c.pdf"),
    ("https://acct.blob.core.windows.net/c/d.png?sv=1&sig=abc", "https://acct.blob.core.windows.net/c/d.png"),
    ("https://TOKEN@host.example/e.png", "https://host.example/e.png"),
    ("http://user:p%40ss@host.example:8080/f.png", "http://host.example:8080/f.png"),
    ("s3://bucket/user@example.com/g.pdf", "s3://bucket/user@example.com/g.pdf"),  # an @ in a key is a key
    ("/data/scans/h.tiff", "/data/scans/h.tiff"),
])
def test_redacting_a_uri_keeps_scheme_host_and_path(url, kept):
    assert redact_uri(url) == kept
    assert redact(f"cannot read: 403, url='{url}'") == f"cannot read: 403, url='{kept}'"


def test_signed_url_parameters_are_masked_outside_urls_too():
    assert redact("GET /a.pdf?AWSAccessKeyId=AKIA1&Signature=s%2B1&Expires=9 failed") == \
        "GET /a.pdf?AWSAccessKeyId=***&Signature=***&Expires=*** failed"
