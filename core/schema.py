"""Column contracts between stages, as Arrow schemas.

Every stage takes and returns Arrow tables, so nulls and types are explicit and rows can carry an error
from any stage to the sink unchanged: a failure is a row with `status="error"`, the `stage` where it
happened and a readable `error`, never an exception that kills the job or a page that disappears.
"""

from __future__ import annotations

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
    """Rows (dicts) to a table of `schema`; missing columns are null."""
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)
