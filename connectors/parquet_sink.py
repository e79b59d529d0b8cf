"""The Parquet sink and its ledger: the only writer of a run's output.

Exactly-once without a coordinator:
- Every output file is published whole. It is serialized in memory and then either renamed into place
  from a hidden temporary name (local disks) or sent as one PUT / multipart upload that the store makes
  visible only when complete (object stores). A half-written file is never visible as done.
- A unit of work (source_uri, page, task, question) is done when its row sits in a published file, so
  the ledger is simply the key columns of the published files. A rerun reads them, drops the units that
  are done before any work starts, and can therefore never write a unit twice; a kill can only lose
  unpublished rows, which the rerun redoes.
- Dropping rows (`--retry-failed`, changed sources) republishes a file without them under the same
  name, with the same atomic publish: a reader, or a run killed half-way, sees the old file or the new
  one, never both and never a part of one.
- Local temporaries are hidden (`.name.<lease token>.xxxx.tmp`) and fsynced before the rename; `recover`,
  at the start of every run, deletes the ones killed runs left behind, and their plan files.

One run writes to an output at a time: the one holding its lease (connectors/lease.py), which `publish`
checks. The store reads, rewrites and deletes only the output's own files (connectors/namespace.py): a
user's table beside them, another job's partition below them or the input itself are never touched.

Everything in the output folder that is not a finished Parquet file starts with `_` or `.`, so the
folder reads as one dataset with pyarrow, pandas, duckdb or Spark.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scriptorium.connectors import namespace
from scriptorium.connectors.storage import filesystem_for, redact, unreachable_reason, uri_for
from scriptorium.core.errors import OutputError
from scriptorium.core.schema import RESULT_SCHEMA
from scriptorium.core.spec import StorageSpec

log = logging.getLogger("scriptorium.sink")


class ParquetStore:
    """A folder of published Parquet files at any fsspec URI."""

    def __init__(self, uri: str, options: StorageSpec | None = None):
        self.uri = uri
        self.options = options
        self.fs, self.root = filesystem_for(uri, options)
        self.root = self.root.rstrip("/")
        self.lease = None  # the OutputLease this store writes under (connectors/lease.py: hold_output)

    def ensure_writable(self) -> None:
        """Fail early, with one clear line, if the output cannot be written."""
        unreachable = unreachable_reason(self.uri, self.options)  # seconds, not minutes of retries
        if unreachable:
            raise OutputError(f"cannot reach output {self.uri}: {unreachable}")
        probe = f"{self.root}/_scriptorium_probe_{uuid.uuid4().hex[:8]}"
        try:
            if _is_local(self.fs):  # on object stores makedirs would silently create a missing bucket
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
        except Exception as exc:
            raise OutputError(redact(f"cannot write to output {self.uri}: {type(exc).__name__}: {exc}")) from None

    # -- the output's own files (connectors/namespace.py) ----------------------------------------
    def own_files(self) -> namespace.OwnFiles:
        """Which names directly in the output folder are ours, as the file list says now."""
        folder = uri_for(self.fs, self.root)
        try:
            data = self.fs.cat_file(f"{self.root}/{namespace.FILE_LIST}")
        except FileNotFoundError:
            data = None
        try:
            return namespace.parse_file_list(folder, data)
        except namespace.FileListError as exc:
            raise OutputError(f"{folder}/{namespace.FILE_LIST} is not a Scriptorium file list ({exc}): delete it "
                              "and the next run lists the output's files again from their names") from None

    def _names_in_folder(self) -> list[str]:
        """Names of the files directly in the output folder (nothing below it is ever ours)."""
        self.fs.invalidate_cache(self.root)  # s3fs/gcsfs cache listings: what was published since counts
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        return [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file"]

    def data_files(self) -> list[str]:
        """The output's own published files: what the ledger, reports and summaries read."""
        own = self.own_files()
        return sorted(f"{self.root}/{name}" for name in self._names_in_folder() if own.owns(name))

    def check_columns(self, schema: pa.Schema) -> None:
        """Raise OutputError if a published file holds a column of `schema` under another type (an extract
        task's schema changed between runs): one output reads as one dataset with one type per column.
        One footer per run is read: a run's files share its schema."""
        first_of_run: dict[str, str] = {}
        for path in self.data_files():
            match = namespace.DATA_FILE.fullmatch(posixpath.basename(path))
            first_of_run.setdefault(match["run"] if match else path, path)
        for path in first_of_run.values():
            with self.fs.open(path, "rb") as handle:
                published = pq.read_schema(handle)
            for field in published:
                if field.name in schema.names and not schema.field(field.name).type.equals(field.type):
                    raise OutputError(
                        f"output {self.uri} holds column {field.name} as {field.type} ({posixpath.basename(path)}), "
                        f"and this job would write it as {schema.field(field.name).type}: keep the schema, or "
                        "write to a new output (e.g. a {run_id} partition)")

    def record_own_files(self, run_id: str = "") -> None:
        """Rewrite the file list (atomically) from the own files that exist, adding `run_id` to its runs."""
        own = self.own_files()
        if run_id:
            own = own.with_run(run_id)
        names = [name for name in self._names_in_folder() if own.owns(name)]
        self._write_whole(namespace.FILE_LIST, namespace.file_list_bytes(own, names))

    def work_folder(self, run_id: str) -> str:
        """Where a run keeps its plan files: named by its run id and lease token, see `recover`."""
        writer = self.lease.token if self.lease else ""
        return f"{self.root}/{namespace.WORK_FOLDER}/{namespace.work_folder_name(run_id, writer)}"

    def _check_writer(self) -> None:
        if self.lease is not None:
            self.lease.ensure_held()  # raises LeaseLost once another run has taken the output over

    # -- writing ----------------------------------------------------------------------------------
    def publish(self, table: pa.Table, name: str) -> str:
        """Write `table` as `name` (a data file name, namespace.data_file_name) directly under the root,
        atomically (replacing a file of that name whole). Returns the published path."""
        if not namespace.DATA_FILE.fullmatch(name):
            raise ValueError(f"{name!r} is not a name of Scriptorium's data files (part-RUN-NNNNNN-XXXXXXXX.parquet)")
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        return self._write_whole(name, buffer.getvalue())

    def _write_whole(self, name: str, data: bytes) -> str:
        """Put `data` at `name` below the root so that readers see the old bytes or the new, never a part."""
        self._check_writer()
        final = f"{self.root}/{name}"
        if _is_local(self.fs):
            self._move_into_place(self._write_temporary(name, data), final)
        else:
            self.fs.pipe_file(final, data)  # visible only once the upload completes
        return final

    @contextmanager
    def publishing(self, name: str) -> Iterator[BinaryIO]:
        """A file to stream `name` into (any kind of file, too large to hold in memory), published whole
        when the block ends, as `publish` does: local disks rename a hidden temporary into place, object
        stores get one upload of the finished file. Nothing is published if the block raises."""
        final = f"{self.root}/{name}"
        local = _is_local(self.fs)
        if local:
            os.makedirs(posixpath.dirname(final), exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{posixpath.basename(final)}.", suffix=".tmp",
                                             dir=posixpath.dirname(final) if local else None)
        try:
            with os.fdopen(handle, "wb") as file:
                yield file
                if local:
                    file.flush()
                    os.fsync(file.fileno())
            if local:
                self._move_into_place(temporary, final)
            else:
                self.fs.put_file(temporary, final)  # visible only once the upload completes
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def _write_temporary(self, name: str, data: bytes) -> str:
        """A hidden file next to the final one (same filesystem, so the rename is atomic), on disk."""
        folder, base = posixpath.split(f"{self.root}/{name}")
        os.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/{namespace.temporary_name(base, self.lease.token if self.lease else '')}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not publish a file whose bytes are not on disk yet
        return temporary

    def _move_into_place(self, temporary: str, final: str) -> None:
        os.replace(temporary, final)
        directory = os.open(posixpath.dirname(final), os.O_RDONLY)
        try:
            os.fsync(directory)  # and the rename itself survives a power cut
        finally:
            os.close(directory)

    def read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """A published file's `columns` (all by default). A column the file predates (it was written by
        an older Scriptorium) comes back as nulls of the current schema's type."""
        with self.fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            present = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
            table = parquet.read(columns=present)
        for name in columns or []:
            if name not in table.column_names:
                kind = RESULT_SCHEMA.field(name).type if name in RESULT_SCHEMA.names else pa.null()
                table = table.append_column(pa.field(name, kind), pa.nulls(len(table), kind))
        return table if columns is None else table.select(columns)

    def recover(self) -> list[str]:
        """At the start of a run, holding the lease: clear what killed runs left behind (half-written
        temporaries and plan folders: those not named by this lease's token), and reconcile the file
        list, adding this run to it. Returns the paths removed. Published files need no repair: each one
        is whole (see the module docstring). Files that are not ours are never looked at."""
        self._check_writer()
        writer = self.lease.token if self.lease else ""  # no lease (tests): every leftover goes

        def left_behind(by: str | None) -> bool:
            return by is not None and not (writer and by == writer)

        removed = []
        if _is_local(self.fs):  # object stores have no temporaries: an upload is visible only when whole
            for folder in (self.root, f"{self.root}/{namespace.FOLDER}"):
                for name in os.listdir(folder) if os.path.isdir(folder) else []:
                    if left_behind(namespace.temporary_writer(name)):
                        os.remove(f"{folder}/{name}")
                        removed.append(f"{folder}/{name}")
        work = f"{self.root}/{namespace.WORK_FOLDER}"
        if self.fs.isdir(work):
            for entry in self.fs.ls(work, detail=False):
                if left_behind(namespace.work_folder_writer(posixpath.basename(entry.rstrip("/")))):
                    self.fs.rm(entry, recursive=True)
                    removed.append(entry)
            if _is_local(self.fs) and not os.listdir(work):
                os.rmdir(work)
        if self.lease is not None:
            self.record_own_files(self.lease.run_id)
        return removed

    def drop_rows(self, should_drop: Callable[[pa.Table], pa.Array], columns: list[str]) -> int:
        """Remove the rows for which `should_drop(table)` is true, file by file, each file replaced
        atomically (or deleted when nothing is left). Returns how many rows went."""
        dropped = 0
        for path in self.data_files():
            mask = should_drop(self.read(path, columns))
            n = pc.sum(mask).as_py() or 0
            if not n:
                continue
            kept = self.read(path).filter(pc.invert(mask))
            if kept.num_rows:
                self.publish(kept, posixpath.basename(path))
            else:
                self._check_writer()
                self.fs.rm(path)
            dropped += n
        return dropped

    def delete_all(self) -> int:
        """`--overwrite`: remove the output's own files and bookkeeping (not its lease), nothing else.
        Files that are not ours stay, and are listed once in a warning. Returns how many files went."""
        files = self.data_files()
        self._check_writer()
        for path in files:
            self.fs.rm(path)
        for name in namespace.BOOKKEEPING:
            target = f"{self.root}/{name}"
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
        # Only now, with every listed file gone, may the list forget them (and their runs).
        self._write_whole(namespace.FILE_LIST, namespace.file_list_bytes(namespace.OwnFiles(""), []))
        self._warn_of_foreign_files()
        return len(files)

    def _warn_of_foreign_files(self, shown: int = 5) -> None:
        from scriptorium.connectors.listing import iter_objects
        from scriptorium.core.spec import InputSpec

        count, names = 0, []
        try:  # streams: an output that is the parent of a big input is not listed into memory
            for _uri, _info, relative in iter_objects(InputSpec(uri=self.uri), self.options):
                count += 1
                if len(names) < shown:
                    names.append(relative)
        except FileNotFoundError:
            return
        if count:
            more = f" and {count - shown} more" if count > shown else ""
            log.warning("--overwrite left %d file(s) in %s that this output did not write: %s%s", count, self.uri,
                        ", ".join(names), more)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


class ParquetSink:
    """Buffers result tables and publishes them as whole files of about `rows_per_file` rows."""

    def __init__(self, store: ParquetStore, run_id: str, rows_per_file: int = 2000, seconds_per_file: float = 120.0):
        self.store = store
        self.run_id = run_id
        self.rows_per_file = rows_per_file
        self.seconds_per_file = seconds_per_file
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_publish = time.monotonic()
        self._sequence = 0
        self.published: list[str] = []
        self.rows_written = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
        due = time.monotonic() - self._last_publish >= self.seconds_per_file
        if self._pending_rows >= self.rows_per_file or (due and self._pending_rows):
            self.flush()

    def flush(self) -> None:
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending)
        self.published.append(self.store.publish(table, namespace.data_file_name(self.run_id, self._sequence)))
        self.rows_written += table.num_rows
        self._sequence += 1
        self._pending, self._pending_rows = [], 0
        self._last_publish = time.monotonic()

    close = flush
