"""Column contracts between stages, as Arrow schemas.

Every stage takes and returns Arrow tables, so nulls and types are explicit and rows can carry an error
from any stage to the sink unchanged: a failure is a row with `status="error"`, the `stage` where it
happened and a readable `error`, never an exception that kills the job or a page that disappears.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Units already published on pages that still owe others (a task added to a finished output, a run
# killed between a page's tasks): those pages are rendered again, but only their missing units run.
DONE_UNIT = pa.struct([("page", pa.int32()), ("task", pa.string()), ("question", pa.string())])

# What the lister plans: one row per input object.
PLAN_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),  # redacted: no userinfo, no http(s) query string (connectors/storage.py)
        ("fetch_uri", pa.string()),  # the URI to read when it is not source_uri (a signed URL); never written out
        ("size", pa.int64()),
        ("etag", pa.string()),  # ETag for object stores, mtime for local files: tells a changed source
        ("kind", pa.string()),  # pdf | image | unknown
        ("error", pa.string()),  # set when the object is already known to be unusable (too large, ...)
        ("done_pages", pa.list_(pa.int32())),  # pages whose every task is committed (resume)
        ("known_pages", pa.int32()),  # a partly done source's page count from the ledger (null: new source)
        ("done_units", pa.list_(DONE_UNIT)),  # published units on pages not in done_pages
        ("questions", pa.list_(pa.string())),  # per-document questions from a manifest (null: none)
        # The file's bytes, when a caller hands them instead of a URI to read (pipeline/processor.py);
        # null in plan files: workers read each source themselves.
        ("data", pa.large_binary()),
    ]
)

# The plan columns every page row of a source carries along (each row also gets its own page's
# `done_units`, not the whole source's).
SOURCE_COLUMNS = ("source_uri", "size", "etag", "kind", "questions")

# A result made before the model (pipeline/routes/): the text layer, Tesseract, or a duplicate's result.
# It rides on its page row to the model stage, which emits it as a result row without generating.
ROUTED_RESULT = pa.struct(
    [
        ("task", pa.string()),
        ("question", pa.string()),
        ("route", pa.string()),  # text_layer | tesseract | dedup
        ("status", pa.string()),  # ok | error | pending (a duplicate whose original is still being processed)
        ("text", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("model", pa.string()),
        ("prompt", pa.string()),
        ("generation", pa.string()),
        ("max_new_tokens", pa.int32()),
        ("n_input_tokens", pa.int32()),
        ("n_output_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("dedup_of", pa.string()),  # "source_uri#page" whose result a duplicate reuses
    ]
)

# Rendered pages: one row per PDF page, image, or TIFF frame; raw RGB uint8 pixels, row-major HWC.
# A document row (page = -1, for tasks with scope = "document") holds several pages' images
# concatenated, one [h, w] per image in `image_shapes`.
PAGE_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("kind", pa.string()),
        ("page", pa.int32()),
        ("n_pages", pa.int32()),
        ("member", pa.string()),  # a tar shard's page: the member's name in the tar (null otherwise)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.large_binary()),
        ("text_layer", pa.string()),  # the PDF page's embedded text, for routing (null for images)
        ("status", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("questions", pa.list_(pa.string())),  # the document's manifest questions (QA tasks without their own)
        ("image_shapes", pa.list_(pa.list_(pa.int32()))),  # document rows: [[h, w], ...] of each page image
        ("content_hash", pa.string()),  # hash of the rendered pixels (routing.dedup)
        ("routed", pa.list_(ROUTED_RESULT)),  # units already answered before the model (pipeline/routes/)
        ("done_units", pa.list_(DONE_UNIT)),  # this row's units published before this run: not redone
    ]
)

# Preprocessed pages: the crops the model will see, each resized with the processor's semantics and
# shipped as uint8 (C=3), compressed losslessly (core/pixels.py). Rescale, normalize and padding happen in
# the model stage: a split page rendered at 1960 px is ~0.5-3 MB here instead of ~10 MB of raw crops, or
# 39 MB of float32 plus a 27 MB int64 mask at 980 px. No mask is shipped: before collation every crop is
# all valid, so the mask is implied by its shape.
PREPROCESSED_SCHEMA = pa.schema(
    [f for f in PAGE_SCHEMA if f.name != "image"]
    + [
        ("pixels", pa.large_binary()),
        ("crop_shapes", pa.list_(pa.list_(pa.int32()))),  # [[h, w], ...] in the order of `pixels`
        # [[rows, cols], ...] per image: the tile grid it was cut into ([0, 0]: none), which the Idefics3
        # family's prompt spells out (pipeline/family.py)
        ("image_grids", pa.list_(pa.list_(pa.int32()))),
        ("preprocessed_at", pa.float64()),  # when preprocessing finished (Unix time): a replica's wait metric
    ]
)

# Results: one row per (page, task[, question]). This is the output dataset's schema.
RESULT_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("page", pa.int32()),
        ("n_pages", pa.int32()),
        ("member", pa.string()),  # tar shards: the image member's name, to join results to samples
        ("task", pa.string()),
        ("question", pa.string()),
        ("prompt", pa.string()),
        ("text", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("model", pa.string()),
        ("max_new_tokens", pa.int32()),
        ("n_input_tokens", pa.int32()),
        ("n_output_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("degenerate", pa.bool_()),  # the output ends in one phrase repeated until max_new_tokens (model/degenerate.py)
        ("route", pa.string()),  # model | text_layer | tesseract | dedup: what produced `text`
        ("generation", pa.string()),  # JSON of the generation settings (model rows and their duplicates)
        ("content_hash", pa.string()),  # hash of the page's rendered pixels (set when routing.dedup is on)
        ("dedup_of", pa.string()),  # route dedup: "source_uri#page" whose result this row reuses
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_size", pa.int64()),
        ("source_etag", pa.string()),
        ("run_id", pa.string()),
        ("replica", pa.string()),
        ("node", pa.string()),
        ("generate_s", pa.float32()),  # seconds the page's batch spent in generate, shared by its rows
        # Confidence: the mean and the lowest log-probability of the generated tokens (pipeline/model/logprobs.py);
        # null for rows the model did not make. Sort by logprob_min to review the worst pages first.
        ("logprob_mean", pa.float32()),
        ("logprob_min", pa.float32()),
    ]
)

# The columns that name a unit of work: a unit is done when a row with these values is published.
KEY_COLUMNS = ("source_uri", "page", "task", "question")

# The `page` of a row about a whole document (tasks with scope = "document"), not about one page.
DOCUMENT_PAGE = -1


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) to a table of `schema`; missing columns are null.

    Large binary columns (a page's pixels: ~9 MB at 1960 px) are not copied: each value becomes its own
    one-row chunk over the very bytes object (or Arrow buffer) the row holds. Copying them cost more
    than rendering a born-digital page (bench/preprocess.py).
    """
    blobs = {field.name: _blob_column([row.get(field.name) for row in rows])
             for field in schema if field.type == pa.large_binary()}
    others = pa.schema([field for field in schema if field.name not in blobs])
    table = pa.Table.from_pylist([{name: row.get(name) for name in others.names} for row in rows], schema=others)
    return pa.Table.from_arrays([blobs[name] if name in blobs else table[name] for name in schema.names], schema=schema)


def _blob_column(values: list) -> pa.ChunkedArray:
    """A large_binary column, one chunk per value, each over the value's own memory (no copy)."""
    chunks = []
    for value in values:
        if value is None:
            chunks.append(pa.nulls(1, pa.large_binary()))
            continue
        data = value if isinstance(value, pa.Buffer) else pa.py_buffer(value)
        offsets = pa.array([0, data.size], pa.int64()).buffers()[1]
        chunks.append(pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data]))
    return pa.chunked_array(chunks, pa.large_binary())


def rows_of(table: pa.Table) -> list[dict]:
    """A table's rows as dicts; large binary values as zero-copy Arrow buffers (bytes-like: numpy,
    hashlib, Pillow and `table_from_rows` take them as they are), not copied into Python bytes."""
    blobs = [field.name for field in table.schema if field.type == pa.large_binary()]
    if not blobs:
        return table.to_pylist()
    rows = table.drop_columns(blobs).to_pylist()
    for name in blobs:
        for row, value in zip(rows, _blob_values(table[name])):
            row[name] = value
    # Keep the column order of the table, as to_pylist does.
    return [{name: row[name] for name in table.schema.names} for row in rows]


def _blob_values(column: pa.ChunkedArray) -> list:
    """The values of a large_binary column as Arrow buffers sliced from its data (None for nulls)."""
    values = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        if offsets is None:  # a chunk of nulls only
            values.extend([None] * len(chunk))
            continue
        starts = np.frombuffer(offsets, np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        for valid, start, end in zip(chunk.is_valid().to_pylist(), starts[:-1], starts[1:]):
            if not valid:
                values.append(None)
            else:
                values.append(data.slice(int(start), int(end - start)) if data is not None else pa.py_buffer(b""))
    return values
