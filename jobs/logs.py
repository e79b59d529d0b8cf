"""Log lines as people read them (the default) or as one JSON object per line (`--log-format json`,
`[logging] format = "json"`), for log collectors:

    {"time": "2026-12-01T10:15:02.125Z", "level": "WARNING", "run_id": "nightly", "event": "log",
     "logger": "scriptorium.lease", "message": "output s3://b/out: took over the lease of ...", "fields": {...}}

`event` names what happened (`log` for a plain log call, `progress`, `run.finished`, `error`,
`worker.log`, `output` ...), `fields` holds its structured values. Every string in it is redacted
(core/redaction.py), like every text line.

In JSON mode every line the driver writes is such an object, whoever writes it:
- its own logging and the libraries' (Ray's, Ray Data's, transformers'), through JsonFormatter, Python
  warnings and an uncaught exception included;
- the stages' warnings and errors on Ray workers: each worker formats its own log records as JSON
  (`setup_worker_logging`, a Ray worker-process setup hook), and the driver writes the lines Ray
  forwards from the workers as JSON objects with the worker's pid and name added (`worker_lines_as_json`,
  in place of Ray's "(pid=...)" prefixed lines), wrapping any line that is not one;
- anything else that reaches the process's stdout or stderr (C++ code, a stray print, a child process):
  both file descriptors are read back through pipes and each line that is not a JSON object is wrapped
  into one (`event: output`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import sys
import threading
import time
from typing import Any

from scriptorium.core.redaction import redact

_state: dict[str, Any] = {"format": "text", "run_id": None, "pipes": []}


def set_run_id(run_id: str | None) -> None:
    """The run id every JSON line carries from now on (in this process)."""
    _state["run_id"] = run_id


def current_run_id() -> str | None:
    return _state["run_id"]


def json_active() -> bool:
    return _state["format"] == "json"


def _iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{int(epoch_s % 1 * 1000):03d}Z"


def _redacted(value):
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {str(k): _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    return value


def json_line(entry: dict) -> str:
    """One redacted JSON object, on one line."""
    return json.dumps(_redacted(entry), default=str, ensure_ascii=False)


def event_line(event: str, message: str = "", level: str = "INFO", **fields) -> str:
    """A JSON line for what is printed rather than logged (a run's result, a command's error)."""
    entry = {"time": _iso(time.time()), "level": level, "run_id": _state["run_id"], "event": event,
             "message": message}
    if fields:
        entry["fields"] = fields
    return json_line(entry)


class RedactingFormatter(logging.Formatter):
    """Log lines without credentials or signed-URL secrets, whatever logged them (core/redaction.py)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line: `extra={"event": ..., "fields": {...}}` give its event and fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _iso(record.created), "level": record.levelname, "run_id": _state["run_id"],
                 "event": getattr(record, "event", None) or "log", "logger": record.name,
                 "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            entry["fields"] = fields
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json_line(entry)


def configure_logging(log_format: str = "text", run_id: str | None = None) -> None:
    """The driver's logging: INFO and up to stderr, as text lines or (once asked, for the rest of the
    process) JSON lines, see the module's docstring."""
    if run_id is not None:
        set_run_id(run_id)
    if log_format == "json" and json_active():
        return
    _state["format"] = log_format
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s"))
    # Text: as before, a no-op where logging is set up already (a caller's, pytest's); JSON replaces it.
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=log_format == "json")
    if log_format == "json":
        _everything_as_json()


def _everything_as_json() -> None:
    logging.captureWarnings(True)
    log = logging.getLogger("scriptorium")

    def uncaught(kind, value, traceback):
        log.critical("%s: %s", kind.__name__, value, exc_info=(kind, value, traceback), extra={"event": "crash"})

    sys.excepthook = uncaught
    threading.excepthook = lambda args: uncaught(args.exc_type, args.exc_value, args.exc_traceback)
    adopt_stream_handlers()
    for stream, fd, level in ((sys.stdout, 1, "INFO"), (sys.stderr, 2, "WARNING")):
        stream.flush()
        _state["pipes"].append(_LinesAsJson(fd, level))
    atexit.register(_close_pipes)


def adopt_stream_handlers() -> None:
    """In JSON mode: the libraries' own console handlers (Ray's, Ray Data's, transformers') format as
    JSON too. Called again after Ray starts, which sets up handlers of its own."""
    if not json_active():
        return
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())


def _close_pipes() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    while _state["pipes"]:
        _state["pipes"].pop().close()


class _LinesAsJson:
    """File descriptor `fd` pointed at a pipe, read back by a thread that writes each line to where `fd`
    pointed before: a JSON object as it is (redacted), any other line wrapped into one."""

    def __init__(self, fd: int, level: str):
        self.fd, self.level = fd, level
        self.original = os.dup(fd)
        self.read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._pump, name=f"scriptorium-json-fd{fd}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self.read_end], [], [], 0.1)
            if not ready:
                if self.closing.is_set():
                    break
                continue
            chunk = os.read(self.read_end, 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._emit(line)
        if pending:
            self._emit(pending)
        os.close(self.read_end)

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return
        entry = json_object(text)
        if entry is not None:
            line = json_line(entry)
        else:
            stream = "stdout" if self.fd == 1 else "stderr"
            line = event_line("output", text.split("\r")[-1].strip(), level=self.level, stream=stream)
        data = (line + "\n").encode()
        while data:
            data = data[os.write(self.original, data):]

    def close(self) -> None:
        os.dup2(self.original, self.fd)  # this process's write end closes: the reader sees the end, unless
        self.closing.set()  # a child process still holds it, so it also stops once the pipe is quiet
        self.thread.join(timeout=2)


def json_object(text: str) -> dict | None:
    """The JSON object a line holds, or None when it holds something else."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        entry = json.loads(text)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


AUTOSCALER_EVENT = ":event_summary:"  # the autoscaler lines Ray itself shows (its status dumps it does not)


def worker_lines_as_json(data: dict) -> None:
    """A batch of lines Ray forwards from a worker's stdout or stderr (what Ray would print prefixed with
    "(ActorName pid=...)"), written to stderr as JSON objects: a worker's JSON log line with its pid and
    name added to its fields, any other line wrapped. Of the autoscaler's, only its events, as Ray does."""
    worker = {"pid": data.get("pid"), "ip": data.get("ip"),
              "worker": data.get("actor_name") or data.get("task_name") or None}
    for text in data.get("lines", []):
        if worker["pid"] == "autoscaler":
            if AUTOSCALER_EVENT not in text:
                continue
            text = text.split(AUTOSCALER_EVENT, 1)[1]
        text = text.split("\r")[-1]  # a progress bar's last state
        if not text.strip():
            continue
        entry = json_object(text)
        if entry is not None:
            entry.setdefault("run_id", _state["run_id"])
            fields = entry.get("fields") if isinstance(entry.get("fields"), dict) else {}
            entry["fields"] = {**fields, **{key: value for key, value in worker.items() if value is not None}}
            line = json_line(entry)
        else:
            line = event_line("worker.output", text, level="WARNING" if data.get("is_err") else "INFO",
                              stream="stderr" if data.get("is_err") else "stdout", **worker)
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def setup_worker_logging(run_id: str) -> None:
    """On each Ray worker of a JSON-logging run (a worker-process setup hook): warnings and errors as
    JSON lines on stderr, which Ray forwards to the driver."""
    _state["format"] = "json"
    set_run_id(run_id)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.captureWarnings(True)


def worker_setup_hook(run_id: str | None):
    """`setup_worker_logging` for this run, as Ray's worker_process_setup_hook wants it: a named function
    (Ray pickles it and names it in its errors)."""

    def scriptorium_worker_logging() -> None:
        setup_worker_logging(run_id)

    return scriptorium_worker_logging
