"""The output lease: one writer per output at a time, on every store Scriptorium writes to.

A run writes to an output only while it holds the output's lease, the object `_scriptorium/lease.json`:

    {"run_id": "nightly-20261201", "host": "head-7f9c", "pid": 4242, "machine": "<boot id>/pid:[4026531836]",
     "pid_start": "81234567", "started": 1764554400.0, "heartbeat": 1764558000.0, "token": "3f2a9c0d1e4b",
     "timeout_s": 120.0}

- Taking it is an atomic create that fails when the object exists: S3 `PutObject` with
  `If-None-Match: *`, GCS `ifGenerationMatch=0`, a local `open(O_CREAT | O_EXCL)`.
- The holder renews the heartbeat from a background thread every `lease_timeout_s / 6`. A renewal is a
  conditional write of exactly the lease it holds (S3 `If-Match: <ETag>`, GCS
  `ifGenerationMatch=<generation>`, a local folder: the content compared under an flock), so it can
  never overwrite a lease another run has taken.
- A second run finds the lease held and exits 2 with one line naming the holder, or, with `--wait`
  (`[output] wait = true`), polls until the lease is released or its holder is gone.
- A holder that is provably gone is taken over automatically: on the same machine (same boot, same PID
  namespace) when its process no longer runs, so a rerun right after a SIGKILL resumes at once; on any
  host when its heartbeat is older than `lease_timeout_s`. Taking over is a conditional replace of the
  very lease judged stale, so of two contenders only one wins; the other then sees the winner's lease.
- The holder stops writing (publishing raises LeaseLost) once another run has taken the lease, or when
  it could not renew it for half the timeout (its heartbeat may look stale to others by then).
- The lease is released (deleted, conditionally) when the run ends, by an error too.

Heartbeat ages compare the holder's clock with the reader's: hosts are assumed to agree to within a
small part of the timeout (NTP). The lease's `token`, new for every taking, also names the run's
temporaries and plan folder, which is how `ParquetStore.recover` tells a killed run's leftovers from
the files of the run holding the lease (connectors/namespace.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import fsspec.asyn

from scriptorium.connectors.namespace import FOLDER, LEASE_FILE, temporary_name
from scriptorium.connectors.storage import protocol_of, redact, uri_for
from scriptorium.core.errors import OutputError

log = logging.getLogger("scriptorium.lease")

LOCK_FILE = f"{FOLDER}/lease.lock"  # local folders: serializes the compare-and-replace of the lease
RENEWALS_PER_TIMEOUT = 6  # a holder is judged gone after missing about this many heartbeats
MAX_POLL_S = 2.0  # how often a waiting run looks at the lease
RACE_PAUSE_S = 0.1  # after losing a race for the lease, before looking at it again


class LeaseHeld(OutputError):
    """Another run is writing to the output (and this one was not asked to wait)."""


class LeaseLost(OutputError):
    """This run no longer holds the output's lease: it must stop writing."""


# -- what the lease says --------------------------------------------------------------------------
@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    machine: str  # boot id and PID namespace: where `pid` names the holder ("" where /proc cannot tell)
    pid_start: str  # the holder's start time in clock ticks since boot: a reused pid is not the holder
    started: float  # wall-clock seconds
    heartbeat: float
    token: str  # new for every taking of the lease
    timeout_s: float = 0.0  # the holder's output.lease_timeout_s, for readers (0: not recorded, an older run)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None for bytes that are not one (a local create killed half-way)."""
        try:
            fields = json.loads(data)
            return cls(str(fields["run_id"]), str(fields["host"]), int(fields["pid"]), str(fields["machine"]),
                       str(fields["pid_start"]), float(fields["started"]), float(fields["heartbeat"]),
                       str(fields["token"]), float(fields.get("timeout_s") or 0.0))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float) -> str:
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, "
                f"heartbeat {max(0.0, now - self.heartbeat):.0f} s ago)")


def this_machine() -> str:
    """Boot id and PID namespace of this process: two processes with the same value share pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def start_time_of(pid: int) -> str | None:
    """A running process's start time (clock ticks since boot), or None when no such process runs.
    A zombie (killed, not yet reaped by its parent) does not run."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_runs(pid: int) -> bool:
    """Without /proc: does a process of this pid exist (it may be another one, which errs on the safe side)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gone_reason(holder: LeaseRecord | None, timeout_s: float, now: float) -> str:
    """Why the holder is provably gone ("" when it may still be running)."""
    if holder is None:
        return "the lease is unreadable (a run killed while taking it)"
    machine = this_machine()
    if machine and holder.machine == machine and holder.pid_start:
        if start_time_of(holder.pid) != holder.pid_start:
            return f"its process (pid {holder.pid}) no longer runs on this machine"
    elif not machine and holder.host == socket.gethostname() and not _pid_runs(holder.pid):
        return f"its process (pid {holder.pid}) no longer runs on this host"
    age = now - holder.heartbeat
    if age > timeout_s:
        return f"its last heartbeat is {age:.0f} s old (output.lease_timeout_s = {timeout_s:g})"
    return ""


def read_lease(fs, root: str, attempts: int = 3) -> tuple[bool, LeaseRecord | None]:
    """For readers that never write (`scriptorium status`): (whether the output has a lease, its record or
    None when it cannot be read as one). A plain read, no lock: a local lease caught between its create and
    its write reads empty, so an unreadable one is read again a moment later before it counts as such."""
    path = f"{root}/{LEASE_FILE}"
    record = None
    for attempt in range(attempts):
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return False, None
        record = LeaseRecord.from_bytes(data)
        if record is not None:
            return True, record
        time.sleep(RACE_PAUSE_S * (attempt + 1))
    return True, record


# -- the lease object on each store: atomic create, read, compare-and-replace, compare-and-delete -----
@dataclass(frozen=True)
class Stored:
    data: bytes
    version: str  # S3 ETag, GCS generation, or a digest of a local file's content


class LeaseObject(Protocol):
    def create(self, data: bytes) -> str | None: ...  # the new version; None: the lease exists
    def read(self) -> Stored | None: ...  # None: there is no lease
    def replace(self, data: bytes, version: str) -> str | None: ...  # None: it is not `version` any more
    def delete(self, version: str) -> bool: ...  # False: it was not `version` (or not there)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalLeaseFile:
    """A lease in a local (or NFS-mounted) folder. Creating is `O_EXCL`; replacing and deleting compare
    the content first, under an exclusive flock of a lock file beside the lease, so they are atomic
    among all processes using the folder; a replacement is a rename of a complete temporary file."""

    def __init__(self, path: str, writer: str):
        self.path, self.writer = path, writer
        self.folder = os.path.dirname(path)
        self.lock = os.path.join(os.path.dirname(self.folder), LOCK_FILE)

    @contextmanager
    def _exclusive(self):
        os.makedirs(self.folder, exist_ok=True)
        handle = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, or its process dies
            yield
        finally:
            os.close(handle)

    def _write_new(self, path: str, data: bytes) -> None:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(handle, data)
            os.fsync(handle)
        finally:
            os.close(handle)

    def _read_unlocked(self) -> Stored | None:
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            return None
        return Stored(data, _digest(data))

    def create(self, data: bytes) -> str | None:
        with self._exclusive():
            try:
                self._write_new(self.path, data)
            except FileExistsError:
                return None
        return _digest(data)

    def read(self) -> Stored | None:
        with self._exclusive():  # never a half-written create
            return self._read_unlocked()

    def replace(self, data: bytes, version: str) -> str | None:
        with self._exclusive():
            current = self._read_unlocked()
            if current is None or current.version != version:
                return None
            temporary = os.path.join(self.folder, temporary_name(os.path.basename(self.path), self.writer))
            self._write_new(temporary, data)
            os.replace(temporary, self.path)
        return _digest(data)

    def delete(self, version: str) -> bool:
        with self._exclusive():
            current = self._read_unlocked()
            if current is None or current.version != version:
                return False
            os.remove(self.path)
        return True


def _condition_failed(exc: BaseException) -> bool:
    """Did an S3 request fail its precondition (412), or lose a race with a concurrent conditional
    write (409 ConditionalRequestConflict)? s3fs re-raises botocore's error with it as the cause."""
    for _ in range(5):
        if exc is None:
            return False
        if isinstance(exc, FileExistsError):  # s3fs's name for a failed If-None-Match
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)
        exc = exc.__cause__ or exc.__context__
    return False


class S3LeaseObject:
    """A lease on S3 (and S3-compatible stores that enforce conditional writes), through s3fs's client."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs) -> dict:
        return fsspec.asyn.sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=self.key, **kwargs)

    def _conditional(self, method: str, **kwargs) -> str | None:
        try:
            return self._call(method, **kwargs).get("ETag", "")
        except FileNotFoundError:  # If-Match on a lease deleted meanwhile
            return None
        except Exception as exc:
            if _condition_failed(exc):
                return None
            raise

    def create(self, data: bytes) -> str | None:
        return self._conditional("put_object", Body=data, IfNoneMatch="*")

    def read(self) -> Stored | None:
        async def get() -> Stored:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return Stored(await response["Body"].read(), response["ETag"])
            finally:
                response["Body"].close()

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def replace(self, data: bytes, version: str) -> str | None:
        return self._conditional("put_object", Body=data, IfMatch=version)

    def delete(self, version: str) -> bool:
        return self._conditional("delete_object", IfMatch=version) is not None


class GcsLeaseObject:
    """A lease on Google Cloud Storage, through gcsfs's authenticated JSON API calls. gcsfs raises
    FileExistsError for 412 Precondition Failed."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, *args, **kwargs):
        return fsspec.asyn.sync(self.fs.loop, self.fs._call, *args, **kwargs)

    def _upload(self, data: bytes, generation: str) -> str | None:
        # A multipart upload (metadata, then the record): GCS honours ifGenerationMatch on every upload
        # type, fake-gcs-server (what the tests run) only on this one.
        boundary = f"scriptorium-{secrets.token_hex(8)}"
        metadata = json.dumps({"name": self.key, "contentType": "application/json"})
        body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n"
                f"--{boundary}\r\nContent-Type: application/json\r\n\r\n").encode() + data + \
            f"\r\n--{boundary}--\r\n".encode()
        try:
            resource = self._call("POST", f"{self.fs._location}/upload/storage/v1/b/{self.bucket}/o",
                                  uploadType="multipart", ifGenerationMatch=generation, data=body,
                                  headers={"Content-Type": f"multipart/related; boundary={boundary}"}, json_out=True)
        except (FileExistsError, FileNotFoundError):
            return None
        return str(resource["generation"])

    def create(self, data: bytes) -> str | None:
        return self._upload(data, "0")  # generation 0: only if no live object has the name

    def read(self) -> Stored | None:
        try:
            headers, data = self._call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None
        return Stored(data, headers["x-goog-generation"])

    def replace(self, data: bytes, version: str) -> str | None:
        return self._upload(data, version)

    def delete(self, version: str) -> bool:
        try:
            self._call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):
            return False
        return True


def lease_object_for(fs, root: str, uri: str, writer: str) -> LeaseObject:
    path = f"{root}/{LEASE_FILE}"
    protocol = protocol_of(uri)
    if protocol == "file":
        return LocalLeaseFile(path, writer)
    if protocol == "s3":
        return S3LeaseObject(fs, path)
    if protocol == "gs":
        return GcsLeaseObject(fs, path)
    raise OutputError(f"output {uri}: {protocol}:// cannot hold a lease (an atomic create is needed): "
                      "write to a local folder, s3:// or gs://")


# -- holding it -----------------------------------------------------------------------------------
class OutputLease:
    """One run's hold on an output: `acquire()` takes it (or raises LeaseHeld), a background thread
    renews it, `ensure_held()` says whether writing is still allowed, `release()` gives it back."""

    def __init__(self, fs, root: str, uri: str, run_id: str, timeout_s: float = 120.0, wait: bool = False):
        self.uri, self.run_id, self.timeout_s, self.wait = uri, run_id, timeout_s, wait
        self.lease_uri = uri_for(fs, f"{root}/{LEASE_FILE}")
        self.token = uuid.uuid4().hex[:12]
        self.object = lease_object_for(fs, root, uri, self.token)
        self._record: LeaseRecord | None = None
        self._version: str | None = None
        self._renewed_at = 0.0  # time.monotonic() of the last write of our lease
        self._lost = ""  # why the lease is no longer ours
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def heartbeat_s(self) -> float:
        return self.timeout_s / RENEWALS_PER_TIMEOUT

    def acquire(self) -> OutputLease:
        waiting_for = ""
        while True:
            now = time.time()
            record = LeaseRecord(self.run_id, socket.gethostname(), os.getpid(), this_machine(),
                                 start_time_of(os.getpid()) or "", now, now, self.token, self.timeout_s)
            version = self._write(record.to_bytes(), None)
            if version is not None:
                self._refuse_a_store_without_conditions(record.to_bytes())
                return self._hold(record, version)
            current = self.object.read()
            if current is None:
                time.sleep(RACE_PAUSE_S)  # released in between: take it now
                continue
            holder = LeaseRecord.from_bytes(current.data)
            reason = gone_reason(holder, self.timeout_s, time.time())
            if reason:
                version = self._write(record.to_bytes(), current.version)
                if version is not None:
                    log.warning("output %s: took over the lease of %s: %s", self.uri,
                                holder.describe(time.time()) if holder else "an unknown run", reason)
                    return self._hold(record, version)
                time.sleep(RACE_PAUSE_S)  # another run took it over first: look at its lease
                continue
            if not self.wait:
                raise LeaseHeld(
                    f"output {self.uri} is being written by {holder.describe(time.time())}: pass --wait to run "
                    f"after it. If that run is gone, its lease is taken over once its heartbeat is "
                    f"{self.timeout_s:g} s old, or at once if you delete {self.lease_uri}")
            if waiting_for != holder.token:
                log.warning("output %s is being written by %s: waiting for it (--wait)", self.uri,
                            holder.describe(time.time()))
                waiting_for = holder.token
            time.sleep(min(MAX_POLL_S, self.heartbeat_s))

    def _write(self, data: bytes, version: str | None) -> str | None:
        """Create the lease (`version` None) or replace that version of it with `data`: the new version,
        or None when another run's write came first. A request retried after its answer was lost fails
        its own condition: the lease then holds our bytes, and is ours."""
        written = self.object.create(data) if version is None else self.object.replace(data, version)
        if written is None:
            current = self.object.read()
            if current is not None and current.data == data:
                return current.version
        return written

    def _refuse_a_store_without_conditions(self, data: bytes) -> None:
        """A second create of the lease just made must fail. Where it does not, the store ignores
        `If-None-Match` (some S3-compatible stores do), and no lease can keep two runs apart there."""
        if self.object.create(data) is not None:
            self.object.delete(self.object.read().version)
            raise OutputError(f"output {self.uri}: the store ignores conditional writes (If-None-Match), so it cannot "
                              "keep two runs from writing at once: use a store that enforces them (AWS S3, GCS, "
                              "recent MinIO or Ceph, SeaweedFS) or a local folder")

    def _hold(self, record: LeaseRecord, version: str) -> OutputLease:
        self._record, self._version, self._renewed_at = record, version, time.monotonic()
        self._renewer = threading.Thread(target=self._renew_until_released, name="scriptorium-lease", daemon=True)
        self._renewer.start()
        return self

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            record = replace(self._record, heartbeat=time.time())
            try:
                version = self._write(record.to_bytes(), self._version)
                holder = None if version is not None else self.object.read()
            except Exception as exc:  # the store is unreachable for now: try again at the next beat
                log.warning("output %s: could not renew the lease (%s); trying again in %.0f s", self.uri,
                            redact(f"{type(exc).__name__}: {exc}"), self.heartbeat_s)
                continue
            if version is None:
                taker = LeaseRecord.from_bytes(holder.data) if holder else None
                self._lost = f"{taker.describe(time.time())} took it over" if taker else "its lease was deleted"
                log.error("output %s: %s; this run stops writing", self.uri, self._lost)
                return
            self._record, self._version, self._renewed_at = record, version, time.monotonic()

    def ensure_held(self) -> None:
        """Raise LeaseLost unless this run may still write to the output."""
        if self._version is None:
            raise LeaseLost(f"output {self.uri}: this run does not hold the output's lease")
        if self._lost:
            raise LeaseLost(f"output {self.uri}: this run lost the output's lease ({self._lost}) and stopped "
                            "writing; rerun it to resume once the other run is done")
        silent = time.monotonic() - self._renewed_at
        if silent > self.timeout_s / 2:
            raise LeaseLost(f"output {self.uri}: the lease could not be renewed for {silent:.0f} s (storage "
                            "unreachable?); this run stopped writing so that no other run writes at the same "
                            "time. Rerun it to resume")

    def release(self) -> None:
        """Give the lease back (if it is still ours). Never raises: a lease left behind is taken over."""
        if self._version is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self.timeout_s / 2)
        try:
            if not self._lost:
                self.object.delete(self._version)
        except Exception as exc:
            log.warning("output %s: could not release the lease (%s); the next run takes it over once this "
                        "process has ended", self.uri, redact(f"{type(exc).__name__}: {exc}"))
        self._version = None

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def hold_output(store, run_id: str, timeout_s: float, wait: bool) -> OutputLease:
    """Take the lease of `store`'s output for `run_id` (waiting behind its holder if `wait`), and make it
    the lease the store writes under: publishing checks it, temporaries and plan folders carry its token."""
    lease = OutputLease(store.fs, store.root, store.uri, run_id, timeout_s, wait)
    try:
        lease.acquire()
    except OutputError:
        raise
    except Exception as exc:  # the store refused the lease's requests: one line, not a traceback
        raise OutputError(redact(f"output {store.uri}: cannot take its lease {lease.lease_uri}: "
                                 f"{type(exc).__name__}: {exc}")) from None
    store.lease = lease
    return lease
