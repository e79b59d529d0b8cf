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
- Local temporaries are hidden (`.name.xxxx.tmp`) and fsynced before the rename; `recover`, at the start
  of every run, deletes the ones a killed run left behind, and the plan files of killed runs.

One run writes to an output at a time (a second, concurrent one would see the first one's temporaries
as leftovers).

Everything in the output folder that is not a finished Parquet file starts with `_` or `.`, so the
folder reads as one dataset with pyarrow, pandas, duckdb or Spark.
"""

from __future__ import annotations

import io
import os
import posixpath
import time
import uuid
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.storage import StorageOptions, filesystem_for, redact, unreachable_reason
from pipeline.schema import RESULT_SCHEMA


class OutputError(RuntimeError):
    """The output location itself cannot be used (job-level, not per input)."""


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith(".parquet") and not name.startswith(("_", "."))


class ParquetStore:
    """A folder of published Parquet files at any fsspec URI."""

    def __init__(self, uri: str, options: StorageOptions | None = None):
        self.uri = uri
        self.options = options
        self.fs, self.root = filesystem_for(uri, options)
        self.root = self.root.rstrip("/")

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

    def data_files(self) -> list[str]:
        return sorted(self.iter_data_files())

    def iter_data_files(self) -> Iterator[str]:
        """The published files, as the store lists them: a listing page at a time on S3 and GCS (as
        for inputs, connectors/listing.py), a directory entry at a time on a local disk, so the
        listing of an output of 50,000 files never sits in memory as one dict of infos."""
        from connectors.listing import _files_below  # the listing's paged walk over object stores

        try:
            if _is_local(self.fs):
                yield from _local_data_files(self.root)
                return
            if not self.fs.exists(self.root):
                return
            for path, _info in _files_below(self.fs, self.root):
                if _is_data_file(path) and not _in_hidden_dir(path, self.root):
                    yield path
        except FileNotFoundError:
            return

    def publish(self, table: pa.Table, name: str) -> str:
        """Write `table` as `name` under the root, atomically (replacing a file of that name whole).
        Returns the published path."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        final = f"{self.root}/{name}"
        if _is_local(self.fs):
            self._move_into_place(self._write_temporary(name, buffer.getvalue()), final)
        else:
            self.fs.pipe_file(final, buffer.getvalue())  # visible only once the upload completes
        return final

    def _write_temporary(self, name: str, data: bytes) -> str:
        """A hidden file next to the final one (same filesystem, so the rename is atomic), on disk."""
        folder, base = posixpath.split(f"{self.root}/{name}")
        os.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{base}.{uuid.uuid4().hex[:8]}{TEMPORARY_SUFFIX}"
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
        """Clear what killed runs left behind: half-written temporaries and plan files. Returns their paths.
        Published files need no repair: each one is whole (see the module docstring)."""
        removed = []
        if _is_local(self.fs) and os.path.isdir(self.root):
            for folder, _dirs, names in os.walk(self.root):
                for name in names:
                    if name.startswith(".") and name.endswith(TEMPORARY_SUFFIX):
                        os.remove(os.path.join(folder, name))
                        removed.append(os.path.join(folder, name))
        work = f"{self.root}/_work"
        if self.fs.exists(work):
            self.fs.rm(work, recursive=True)
            removed.append(work)
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
                self.publish(kept, path[len(self.root) + 1:])
            else:
                self.fs.rm(path)
            dropped += n
        return dropped

    def delete_all(self) -> int:
        """`--overwrite`: remove published files and Scriptorium's own bookkeeping, nothing else."""
        files = self.data_files()
        for path in files:
            self.fs.rm(path)
        for name in ("_work", "_summary.json", "_runs"):
            target = f"{self.root}/{name}"
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
        return len(files)


TEMPORARY_SUFFIX = ".tmp"


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _local_data_files(folder: str) -> Iterator[str]:
    """Published files below a local folder, skipping hidden and bookkeeping folders (`_work`, `.x`)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                if not entry.name.startswith(("_", ".")):
                    yield from _local_data_files(entry.path)
            elif _is_data_file(entry.path):
                yield entry.path


def _in_hidden_dir(path: str, root: str) -> bool:
    relative = path[len(root):].strip("/")
    return any(part.startswith(("_", ".")) for part in relative.split("/")[:-1])


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
        name = f"part-{self.run_id}-{self._sequence:06d}-{uuid.uuid4().hex[:8]}.parquet"
        self.published.append(self.store.publish(table, name))
        self.rows_written += table.num_rows
        self._sequence += 1
        self._pending, self._pending_rows = [], 0
        self._last_publish = time.monotonic()

    close = flush
