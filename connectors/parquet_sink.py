"""The Parquet sink and its ledger: the only writer of a run's output.

Exactly-once without a coordinator:
- Every output file is published whole. It is serialized in memory and then either renamed into place
  from a hidden temporary name (local disks) or sent as one PUT / multipart upload that the store makes
  visible only when complete (object stores). A half-written file is never visible as done.
- A unit of work (source_uri, page, task, question) is done when its row sits in a published file, so
  the ledger is simply the key columns of the published files. A rerun reads them, drops the units that
  are done before any work starts, and can therefore never write a unit twice; a kill can only lose
  unpublished rows, which the rerun redoes.
- Rows are never edited in place. Dropping rows (`--retry-failed`, changed sources) publishes a
  replacement file that names the file it replaces in its metadata, then deletes the old one; if a kill
  lands in between, the next start finishes the deletion (`recover`).

Everything in the output folder that is not a finished Parquet file starts with `_` or `.`, so the
folder reads as one dataset with pyarrow, pandas, duckdb or Spark.
"""

from __future__ import annotations

import io
import posixpath
import time
import uuid
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from connectors.storage import StorageOptions, filesystem_for

REPLACES_KEY = b"scriptorium.replaces"


class OutputError(RuntimeError):
    """The output location itself cannot be used (job-level, not per input)."""


def _is_data_file(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith(".parquet") and not name.startswith(("_", "."))


class ParquetStore:
    """A folder of published Parquet files at any fsspec URI."""

    def __init__(self, uri: str, options: StorageOptions | None = None):
        self.uri = uri
        self.fs, self.root = filesystem_for(uri, options)
        self.root = self.root.rstrip("/")

    def ensure_writable(self) -> None:
        """Fail early, with one clear line, if the output cannot be written."""
        probe = f"{self.root}/_scriptorium_probe_{uuid.uuid4().hex[:8]}"
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
        except Exception as exc:
            raise OutputError(f"cannot write to output {self.uri}: {type(exc).__name__}: {exc}") from None

    def data_files(self) -> list[str]:
        try:
            if not self.fs.exists(self.root):
                return []
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        return sorted(p for p in found if _is_data_file(p) and not _in_hidden_dir(p, self.root))

    def publish(self, table: pa.Table, name: str, replaces: str | None = None) -> str:
        """Write `table` as `name` under the root, atomically. Returns the published path."""
        if replaces:
            meta = dict(table.schema.metadata or {})
            meta[REPLACES_KEY] = posixpath.basename(replaces).encode()
            table = table.replace_schema_metadata(meta)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        final = f"{self.root}/{name}"
        if _is_local(self.fs):
            temporary = f"{self.root}/.tmp-{uuid.uuid4().hex}-{name}"
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(temporary, buffer.getvalue())
            self.fs.mv(temporary, final)
        else:
            self.fs.pipe_file(final, buffer.getvalue())  # visible only once the upload completes
        return final

    def read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def recover(self) -> list[str]:
        """Finish interrupted replacements: delete every file that a published file says it replaces."""
        files = self.data_files()
        names = {posixpath.basename(p): p for p in files}
        removed = []
        for path in files:
            with self.fs.open(path, "rb") as handle:
                meta = pq.read_schema(handle).metadata or {}
            old = meta.get(REPLACES_KEY)
            if old and old.decode() in names and names[old.decode()] != path:
                self.fs.rm(names[old.decode()])
                removed.append(names[old.decode()])
        self._remove_stale_temporaries()
        return removed

    def _remove_stale_temporaries(self) -> None:
        if not _is_local(self.fs) or not self.fs.exists(self.root):
            return
        for path in self.fs.ls(self.root, detail=False):
            if posixpath.basename(path).startswith(".tmp-"):
                self.fs.rm(path)

    def drop_rows(self, should_drop: Callable[[pa.Table], pa.Array], columns: list[str]) -> int:
        """Remove the rows for which `should_drop(table)` is true, file by file, crash-safely."""
        dropped = 0
        for path in self.data_files():
            keys = self.read(path, columns)
            mask = should_drop(keys)
            n = pc.sum(mask).as_py() or 0
            if not n:
                continue
            table = self.read(path)
            kept = table.filter(pc.invert(mask))
            if kept.num_rows:
                stem = posixpath.basename(path)[: -len(".parquet")]
                self.publish(kept, f"{stem.split('.')[0]}.r{uuid.uuid4().hex[:6]}.parquet", replaces=path)
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


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


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
