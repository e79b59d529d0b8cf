"""`scriptorium export OUTPUT --to URI --format csv --task NAME`: an extract task's records as one table.

One CSV row per page (or per document, for a task with scope = "document") with the unit's provenance
(`source_uri`, `member`, `page`, `status`, `error`, `run_id`) and then the task's fields, flattened from
its typed column `extract_NAME`: a nested object's fields become dotted columns (`address.city`), and a
list (line items) or a part of the schema without one type stays JSON text in its cell. Error rows are
kept, with empty fields and their reason, so a table never silently lacks a page. As in the other
formats, where the output holds several rows for one unit, an ok row wins over an error row, then the
greatest run id; `--run-id` exports one run's rows only.

DuckDB reads the published files and writes the CSV (sorted by source and page) in bounded memory; the
file is then published whole as `NAME.csv` under `--to`.
"""

from __future__ import annotations

import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from scriptorium.connectors.output_query import connect
from scriptorium.connectors.parquet_sink import ParquetStore, _is_local
from scriptorium.connectors.storage import uri_for
from scriptorium.core.errors import SpecError

PROVENANCE = ("source_uri", "member", "page", "status", "error", "run_id")


def flattened(column: str, kind: pa.DataType, name: str = "") -> list[tuple[str, str]]:
    """(SQL expression, CSV column name) for each leaf of a typed extract column: struct fields
    recursively, anything else (lists included) as one column, lists as JSON text."""
    if pa.types.is_struct(kind):
        leaves = []
        for field in kind:
            path = f"{name}.{field.name}" if name else field.name
            leaves += flattened(f'{column}."{field.name}"', field.type, path)
        return leaves
    expression = f"to_json({column})" if pa.types.is_list(kind) or pa.types.is_large_list(kind) else column
    return [(expression, name or "value")]


def _column_type(store: ParquetStore, files: list[str], column: str) -> pa.DataType | None:
    """The type of `column` in the output's files (check_columns keeps it one type), None if absent."""
    for path in reversed(files):  # the newest runs first
        with store.fs.open(path, "rb") as handle:
            schema = pq.read_schema(handle)
        if column in schema.names:
            return schema.field(column).type
    return None


def export_table(store: ParquetStore, target: ParquetStore, task: str, run_id: str | None = None) -> dict:
    """Write the records of extract task `task` to `target` as `task`.csv; returns counts (rows, ok, files)."""
    files = store.data_files()
    column = f"extract_{task}"
    kind = _column_type(store, files, column)
    if kind is None:
        raise SpecError(f"no extract task {task!r} in {store.uri}: --task names an extract task (its column "
                        "extract_NAME)")
    connection = connect()
    if _is_local(store.fs):
        paths = files
    else:
        connection.register_filesystem(store.fs)
        paths = [uri_for(store.fs, path) for path in files]
    fields = ", ".join(f'{expression} AS "{name}"' for expression, name in flattened(column, kind))
    run_filter = "AND run_id = $run_id" if run_id else ""
    query = f"""
        SELECT {', '.join(PROVENANCE)}, {fields}
        FROM read_parquet($files, union_by_name = true)
        WHERE task = $task {run_filter}
        QUALIFY row_number() OVER (PARTITION BY source_uri, member, page
                                   ORDER BY (status = 'ok') DESC, run_id DESC) = 1
        ORDER BY source_uri, member, page"""
    parameters = {"files": paths, "task": task, **({"run_id": run_id} if run_id else {})}
    with tempfile.TemporaryDirectory(prefix="scriptorium-csv-") as folder:
        local = os.path.join(folder, f"{task}.csv")
        connection.execute(f"COPY ({query}) TO '{local}' (HEADER, DELIMITER ',')", parameters)
        counts = connection.execute(
            f"SELECT count(*), count(*) FILTER (WHERE status = 'ok') FROM read_csv('{local}', header = true, "
            "all_varchar = true)").fetchone()
        if not counts[0]:
            raise SpecError(f"no rows of task {task!r}{f' in run {run_id!r}' if run_id else ''} in {store.uri}")
        with open(local, "rb") as source, target.publishing(f"{task}.csv") as handle:
            while chunk := source.read(1 << 20):
                handle.write(chunk)
    connection.close()
    return {"rows": counts[0], "ok": counts[1], "files": 1}
