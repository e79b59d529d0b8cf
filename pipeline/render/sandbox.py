"""The render sandbox: pages are rendered in a child process, under a hard time limit.

MuPDF renders a page in one C call that holds the GIL until it returns, so neither SIGALRM nor a
watchdog thread can stop it: a PDF of a few kilobytes whose form XObjects each draw the next one
four times keeps it busy for hours, and a malformed file can crash the process outright. So each
rendering thread keeps one child process that opens documents and renders the pages it is asked
for, one request at a time, and waits for each answer at most `hard_limit_s`. A child that overruns
is killed and a child that dies is noticed; either way that page becomes an error row, a fresh child
reopens the document and rendering goes on with the next page. After MAX_LOST_PAGES such pages in
one document, its remaining pages become error rows too, so a file built to stall costs bounded time.

Protocol: pickled tuples over a socket pair, one request and then its answer.
    child, once started              -> ("ready",)
    ("open", kind, data, settings)   -> ("opened", n_pages) | ("failed", reason)
    ("page", number)                 -> ("page", frame)    frame: page, n_pages, and pixels or error
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Iterator

from core.errors import PageError
from core.spec import RenderSpec
from pipeline.render import decoders

MAX_LOST_PAGES = 3  # pages of one document that may hang or crash the child before the rest is given up
STARTUP_LIMIT_S = 300.0  # importing PyMuPDF and Pillow on a busy node


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
        self.unavailable: str | None = None  # why no child could be started (then none is tried again)
        self.warned = False  # the caller said so once

    @property
    def pid(self) -> int | None:
        """The renderer's process id, while one runs."""
        return self._process.pid if self._process is not None else None

    # -- the child --------------------------------------------------------------------------------
    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.render.sandbox", str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
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
        self._process, self._connection, self._document = None, None, None

    def _ask(self, request: tuple, limit_s: float, what: str) -> tuple:
        if self._process is None:
            self._start()
        try:
            self._connection.send(request)
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
    def _open(self, kind: str, data: bytes, settings: RenderSpec, token: object) -> int:
        try:
            answer = self._ask(("open", kind, data, settings), hard_limit_s(settings), "opening the file")
        except ChildLost as exc:
            raise PageError(str(exc)) from None
        if answer[0] == "failed":
            raise PageError(answer[1])
        self._document = token
        return answer[1]

    def frames(self, kind: str, data: bytes, settings: RenderSpec, skip: set[int]) -> Iterator[dict]:
        """Every page not in `skip`, as `decoders.local_frames` gives them, but safe from hangs and crashes.
        Raises PageError if the file cannot be opened."""
        token = object()
        n_pages = self._open(kind, data, settings, token)
        what = "rendering page" if kind == "pdf" else "decoding frame"

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
            except ChildLost as exc:
                lost += 1
                yield {"page": number, "n_pages": n_pages, "error": str(exc)}
                if lost >= MAX_LOST_PAGES:
                    yield from the_rest(number + 1, f"not rendered: {lost} pages of this file hung or crashed the renderer")
                    return
                continue
            yield frame


def _exit_reason(code: int | None) -> str:
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


def serve(fd: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    decoders._import_renderers()  # once, before saying ready: time limits then measure rendering only

    connection = Connection(fd)
    connection.send(("ready",))
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
            _, kind, data, settings = request
            try:
                document = decoders.open_document(kind, data, settings)
                connection.send(("opened", document.n_pages))
            except PageError as exc:
                connection.send(("failed", str(exc)))
            except Exception as exc:
                connection.send(("failed", f"cannot open the file: {decoders.describe(exc)}"))
        elif request[0] == "page":
            connection.send(("page", decoders.render_one(document, request[1], settings)))


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
