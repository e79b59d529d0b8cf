"""The render sandbox: files are opened and pages rendered in a child process, under a hard time limit
and a memory limit.

MuPDF renders a page in one C call that holds the GIL until it returns, so neither SIGALRM nor a
watchdog thread can stop it: a PDF of a few kilobytes whose form XObjects each draw the next one
four times keeps it busy for hours, and a malformed file can crash the process outright. So each
rendering thread keeps one child process that opens documents and renders the pages it is asked
for, one request at a time, and waits for each answer at most `hard_limit_s`. A child that overruns
is killed and a child that dies is noticed; either way that page becomes an error row, a fresh child
reopens the document and rendering goes on with the next page. After MAX_LOST_PAGES such pages in
one document, its remaining pages become error rows too, so a file built to stall costs bounded time.

Memory: a shard's index is parsed here too (shards.py, through sources.py), and the child's address
space is capped (RLIMIT_AS) at what its libraries map once started plus `render.max_memory_mb`, so a
file that expands past it fails an allocation in the child (an error row: "out of memory") or, where a
library cannot recover, ends the child, which is noticed like any crash. A file larger than the limit
is not sent at all. The worker never holds more than the file's own bytes.

Protocol: pickled tuples over a socket pair, one request and then its answer.
    child, once started                    -> ("ready",)
    ("open", kind, settings, length)       -> ("opened", n_pages, what) | ("failed", reason)
    ("page", number)                       -> ("page", frame)    frame: page, n_pages, and pixels or error

A page's pixels (~9 MB at 1960 px) do not cross the socket: the child writes them into a shared memory
file (a memfd both processes map, `SharedPixels`) and the frame says how many bytes; the parent copies
them out once. Pickled through the socket they took five copies and as long as rendering the page. The
file to open comes the other way the same way (`length` bytes of the shared file). Where there are no
memfds (not Linux), `length` is None, the file's bytes follow as one message and frames carry the pixels.
"""

from __future__ import annotations

import atexit
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Iterator

from scriptorium.core.errors import PageError
from scriptorium.core.spec import RenderSpec
from scriptorium.pipeline.render import decoders, sources

MAX_LOST_PAGES = 3  # pages of one document that may hang or crash the child before the rest is given up
STARTUP_LIMIT_S = 300.0  # importing PyMuPDF and Pillow on a busy node
OUT_OF_MEMORY_EXIT = 3  # the child's exit status when an allocation failed where it could not answer
# The child's allocators, set so that its address space is close to what it uses: pyarrow's default
# allocator reserves a gigabyte up front and each glibc malloc arena 64 MiB. Blocks over 32 MiB (a giant
# page, a bomb) are always mapped, so unmapped when freed; smaller ones (a page at 1960 px, a decoded scan)
# stay in the heap and are reused: mapping each afresh cost a scan page a quarter of its render time.
CHILD_ENVIRONMENT = {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}


class SharedPixels:
    """Bytes between the renderer and its parent, through one shared memory file (a memfd).

    One side `put`s (growing the file when the bytes are more than any before, shrinking it after a
    giant page) and sends their length; the other `take`s that many bytes, one copy, before anything is
    put again: the parent puts a file to open, the child each page's pixels. Each side maps the file at
    its current size.
    """

    SHRINK_OVER = 64 * 2**20  # a file this much larger than the page just written is cut down to it

    def __init__(self, fd: int):
        self.fd = fd
        self._map: mmap.mmap | None = None

    @classmethod
    def create(cls) -> SharedPixels | None:
        """A new shared file (inheritable, for the child), or None where memfds do not exist (not Linux)."""
        if not hasattr(os, "memfd_create"):
            return None
        try:
            return cls(os.memfd_create("scriptorium-pixels"))
        except OSError:
            return None

    def _mapping(self) -> mmap.mmap:
        size = os.fstat(self.fd).st_size
        if self._map is None or len(self._map) != size:
            if self._map is not None:
                self._map.close()
            self._map = mmap.mmap(self.fd, size) if size else None
        return self._map

    def put(self, data: bytes) -> int:
        """`data` into the file; returns its length."""
        size = os.fstat(self.fd).st_size
        if size < len(data) or size > len(data) + self.SHRINK_OVER:
            os.ftruncate(self.fd, len(data))
        if data:
            self._mapping()[: len(data)] = data
        return len(data)

    def take(self, length: int) -> bytes:
        """The `length` bytes the other side put."""
        return self._mapping()[:length] if length else b""

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self.fd)


def hard_limit_s(settings: RenderSpec) -> float:
    """How long the parent waits for one answer: past the soft limit, so that one fires first when it can."""
    return settings.timeout_s * 1.5 + 2.0 if settings.timeout_s > 0 else 0.0


class ChildLost(Exception):
    """The child overran the hard limit (and was killed) or died; the message says which."""


class SandboxUnavailable(RuntimeError):
    """No renderer process could be started here (the caller renders in its own process instead)."""


class RenderSandbox:
    """One child process that renders for this thread, restarted whenever it is lost."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None
        self._document: object | None = None  # token of the document the child has open
        self._pixels: SharedPixels | None = None  # where the child puts each page's pixels
        self.unavailable: str | None = None  # why no child could be started (then none is tried again)
        self.warned = False  # the caller said so once

    @property
    def pid(self) -> int | None:
        """The renderer's process id, while one runs."""
        return self._process.pid if self._process is not None else None

    # -- the child --------------------------------------------------------------------------------
    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        self._pixels = SharedPixels.create()
        shared = [self._pixels.fd] if self._pixels else []
        self._process = subprocess.Popen(
            [sys.executable, "-m", "scriptorium.pipeline.render.sandbox", str(theirs.fileno()), str(os.getpid()),
             *map(str, shared)],
            pass_fds=[theirs.fileno(), *shared],
            stdin=subprocess.DEVNULL,
            env={**os.environ, **CHILD_ENVIRONMENT},
        )
        theirs.close()
        self._connection = Connection(ours.detach())
        try:
            self._receive(STARTUP_LIMIT_S, "starting the renderer")
        except ChildLost as exc:
            self.unavailable = str(exc)
            raise SandboxUnavailable(self.unavailable) from None

    def ensure_started(self) -> None:
        if self.unavailable:
            raise SandboxUnavailable(self.unavailable)
        if self._process is None:
            self._start()

    def stop(self) -> None:
        """Kill the child (if any) and forget it; the next request starts a fresh one."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        if self._connection is not None:
            self._connection.close()
        if self._pixels is not None:
            self._pixels.close()
        self._process, self._connection, self._document, self._pixels = None, None, None, None

    def _ask(self, request: tuple, limit_s: float, what: str, data: bytes | None = None) -> tuple:
        if self._process is None:
            self._start()
        try:
            if data is None:
                self._connection.send(request)
            elif self._pixels is not None:  # the file through the shared file too: its length follows
                self._connection.send((*request, self._pixels.put(data)))
            else:  # as is, not pickled: no second copy of a large file in this process
                self._connection.send((*request, None))
                self._connection.send_bytes(data)
        except OSError:
            pass  # the child is gone: _receive says how
        return self._receive(limit_s, what)

    def _receive(self, limit_s: float, what: str) -> tuple:
        try:
            if limit_s > 0 and not self._connection.poll(limit_s):
                self.stop()
                raise ChildLost(f"{what} took longer than {limit_s:g} s (hard limit; the renderer was killed)")
            return self._connection.recv()
        except (EOFError, OSError):
            code = self._process.wait()
            self.stop()
            raise ChildLost(f"{what} crashed the renderer ({_exit_reason(code)})") from None

    # -- documents --------------------------------------------------------------------------------
    def _open(self, kind: str, data: bytes, settings: RenderSpec, token: object) -> tuple[int, str]:
        """(pages, what rendering one is called) of the file, now open in the child."""
        if 0 < settings.max_memory_mb * 2**20 < len(data):
            raise PageError(f"file is {len(data)} bytes, more than the renderer's render.max_memory_mb={settings.max_memory_mb}")
        try:
            answer = self._ask(("open", kind, settings), hard_limit_s(settings), "opening the file", data)
        except ChildLost as exc:
            raise PageError(str(exc)) from None
        if answer[0] == "failed":
            raise PageError(answer[1])
        self._document = token
        return answer[1], answer[2]

    def frames(self, kind: str, data: bytes, settings: RenderSpec, skip: set[int]) -> Iterator[dict]:
        """Every page not in `skip`, as `sources.source_frames` gives them, but safe from hangs, crashes and
        memory bombs. Raises PageError if the file cannot be opened."""
        token = object()
        n_pages, what = self._open(kind, data, settings, token)

        def the_rest(first: int, reason: str) -> Iterator[dict]:
            return ({"page": p, "n_pages": n_pages, "error": reason} for p in range(first, n_pages) if p not in skip)

        lost = 0
        for number in range(n_pages):
            if number in skip:
                continue
            if self._document is not token:  # the child was lost, or another document was opened since
                try:
                    self._open(kind, data, settings, token)
                except PageError as exc:
                    yield from the_rest(number, f"not rendered: reopening the file failed: {exc}")
                    return
            try:
                frame = self._ask(("page", number), hard_limit_s(settings), f"{what} {number}")[1]
                if isinstance(frame.get("image"), int):  # its length in the shared file
                    frame["image"] = self._pixels.take(frame["image"])
            except ChildLost as exc:
                lost += 1
                yield {"page": number, "n_pages": n_pages, "error": str(exc)}
                if lost >= MAX_LOST_PAGES:
                    yield from the_rest(number + 1, f"not rendered: {lost} pages of this file hung or crashed the renderer")
                    return
                continue
            yield frame


def _exit_reason(code: int | None) -> str:
    if code == OUT_OF_MEMORY_EXIT:
        return "out of memory: over render.max_memory_mb"
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


_threads = threading.local()
_all: list[RenderSandbox] = []


def sandbox_for_this_thread() -> RenderSandbox:
    sandbox = getattr(_threads, "sandbox", None)
    if sandbox is None:
        sandbox = _threads.sandbox = RenderSandbox()
        _all.append(sandbox)
    return sandbox


@atexit.register
def _stop_all() -> None:
    for sandbox in _all:
        sandbox.stop()


# -- the child process ------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills us when the parent dies, even in the middle of a page that never ends."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(0)


def _address_space() -> int | None:
    """This process's mapped address space in bytes (Linux), what RLIMIT_AS counts."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _limit_memory(baseline: int | None, megabytes: int) -> None:
    """Cap the address space at `baseline` (the libraries, mapped once started) + `megabytes` (0: no
    cap). Only the soft limit: the next document may have another setting."""
    import resource

    if baseline is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = baseline + megabytes * 2**20 if megabytes > 0 else hard
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def serve(fd: int, parent_pid: int, pixels_fd: int | None = None) -> None:
    _die_with_parent(parent_pid)
    decoders._import_renderers()  # once, before saying ready: time limits then measure rendering only
    baseline = _address_space()

    connection = Connection(fd)
    connection.send(("ready",))
    try:
        _serve_requests(connection, baseline, SharedPixels(pixels_fd) if pixels_fd is not None else None)
    except MemoryError:  # where no answer could be made (receiving a file): the parent reports it
        os._exit(OUT_OF_MEMORY_EXIT)


def _serve_requests(connection: Connection, baseline: int | None, pixels: SharedPixels | None) -> None:
    document, settings = None, None
    while True:
        try:
            request = connection.recv()
        except EOFError:  # the parent is gone
            return
        if request[0] == "open":
            if document is not None:
                document.close()
                document = None
            _, kind, settings, length = request
            _limit_memory(baseline, settings.max_memory_mb)  # before the file's bytes arrive: they count
            data = connection.recv_bytes() if length is None else pixels.take(length)
            try:
                document = sources.open_source(kind, data, settings)
                connection.send(("opened", document.n_pages, document.what))
            except PageError as exc:
                connection.send(("failed", str(exc)))
            except Exception as exc:
                connection.send(("failed", f"cannot open the file: {decoders.describe(exc)}"))
        elif request[0] == "page":
            frame = decoders.render_one(document, request[1], settings)
            if pixels is not None and frame.get("image") is not None:
                try:
                    frame["image"] = pixels.put(frame["image"])
                except (MemoryError, OSError) as exc:  # mapping a page past render.max_memory_mb
                    frame = {"page": frame["page"], "n_pages": frame["n_pages"],
                             "error": f"{document.what} {request[1]} failed: out of memory ({exc})"}
            connection.send(("page", frame))


if __name__ == "__main__":
    serve(*map(int, sys.argv[1:]))
