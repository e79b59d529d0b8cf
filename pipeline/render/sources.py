"""Sources: a file's bytes opened as pages, whatever its kind: a PDF or an image (decoders.py), or a tar
or Parquet shard of images (shards.py). The render sandbox's child opens every file through here."""

from __future__ import annotations

from typing import Iterator

from scriptorium.core.errors import PageError
from scriptorium.core.kinds import SHARD_KINDS
from scriptorium.core.spec import RenderSpec
from scriptorium.pipeline.render.decoders import frames_of, open_document, time_limit


def open_source(kind: str, data: bytes, settings: RenderSpec):
    """The file as a document with `n_pages`, `what`, `render(number)` and `close()`: a PdfDocument, an
    ImageDocument, or a shard's ShardImages. Raises PageError (the reason) for a file with no pages to give."""
    if kind not in SHARD_KINDS:
        return open_document(kind, data, settings)
    if not data:
        raise PageError("file is empty (0 bytes)")
    from scriptorium.pipeline.render.shards import ShardImages  # pyarrow: imported only where a shard is opened

    with time_limit(settings.timeout_s, "opening the file"):
        return ShardImages(kind, data, settings)


def source_frames(kind: str, data: bytes, settings: RenderSpec, skip: set[int]) -> Iterator[dict]:
    """Every page not in `skip`, rendered in this process. Raises PageError if the file cannot be opened."""
    yield from frames_of(open_source(kind, data, settings), settings, skip)
