"""Shards: one source holding many images, each image a page. Two layouts training corpora use:

- **Tar shards** (WebDataset and similar): samples are files sharing a key (`000123.jpg` beside
  `000123.json`). The image members, in the order the tar holds them, are pages 0..n-1 and each row
  names its member (`member`), so captions join back to the samples by key. Members that are not
  images (captions, metadata) are not pages.
- **Parquet tables of images** (Hugging Face datasets' `Image` feature, a struct of `bytes` and
  `path`; or a binary column named image, img, jpg, png, ...): row i is page i, and `member` is the
  row's `path` where the table has one.

Each image is decoded exactly as an image file is (`decoders.py`: the same size checks, the first frame,
transparency onto white), in the render sandbox when there is one, and only that image's bytes are
sent there. An image that fails is an error row for its page; a shard that cannot be opened, or holds
no images, is an error row, as any unreadable file.
"""

from __future__ import annotations

import bisect
import io
import tarfile
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import PageError
from core.kinds import kind_of
from core.spec import RenderSpec
from pipeline.render.decoders import time_limit

# Binary columns taken for images when no column is a Hugging Face `Image` struct.
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")


class TarShard:
    """An open tar shard: its image members, read one at a time."""

    def __init__(self, data: bytes):
        try:
            self.tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        except tarfile.TarError as exc:
            raise PageError(f"cannot open tar: {exc}") from None
        self.members = []
        self.cut_short = None  # why the tar seems truncated (its members after the cut are unknown)
        try:  # a shard cut short (an interrupted upload) keeps the members before the cut
            for member in iter(self.tar.next, None):
                # Only regular files: links and devices name no image of their own.
                if member.isfile() and kind_of(member.name) == "image":
                    self.members.append(member)
        except tarfile.TarError as exc:
            self.cut_short = f"tar is damaged after its first {len(self.members)} images: {exc}"
        if self.cut_short is None and any(data[-2 * tarfile.BLOCKSIZE:]):
            # A whole tar ends with two zero blocks; without them, members after the last one may be lost.
            self.cut_short = "tar has no end-of-archive marker: it was cut short, and the images after the last one read are missing"
        if not self.members and self.cut_short is None:
            raise PageError("tar holds no image members (png, jpg, tiff, webp, ...)")
        # A cut-short tar has one more page: an error row that says so, so the loss is recorded.
        self.n_pages = len(self.members) + (self.cut_short is not None)

    def name(self, number: int) -> str | None:
        if number >= len(self.members):
            return None
        # tarfile gives names that are not UTF-8 (old latin-1 tars) with surrogates, which Arrow refuses:
        # write their odd bytes as \xNN escapes, so the name stays readable and unambiguous.
        raw = self.members[number].name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace")

    def close(self) -> None:
        self.tar.close()

    def image_bytes(self, number: int) -> bytes | None:
        if number == len(self.members):
            raise PageError(self.cut_short)
        try:
            return self.tar.extractfile(self.members[number]).read()
        except tarfile.TarError as exc:
            raise PageError(f"tar is cut short inside this image: {exc}") from None


class ParquetImages:
    """An open Parquet table of images, read one row group at a time."""

    def __init__(self, data: bytes):
        try:
            self.file = pq.ParquetFile(pa.BufferReader(data))
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
            raise PageError(f"cannot open Parquet: {exc}") from None
        self.column, self.is_struct = image_column(self.file.schema_arrow)
        self.n_pages = self.file.metadata.num_rows
        if not self.n_pages:
            raise PageError("Parquet table has no rows")
        # Row group boundaries: row number -> (row group, row within it).
        self.starts = [0]
        for group in range(self.file.num_row_groups):
            self.starts.append(self.starts[-1] + self.file.metadata.row_group(group).num_rows)
        self._group, self._images, self._names = -1, [], []

    def _load(self, number: int) -> int:
        group = bisect.bisect_right(self.starts, number) - 1
        if group != self._group:
            column = self.file.read_row_group(group, columns=[self.column]).column(0).combine_chunks()
            if self.is_struct:
                index = column.type.get_field_index("path")
                named = index >= 0 and pa.types.is_string(column.type.field(index).type)
                self._names = column.field("path").to_pylist() if named else [None] * len(column)
                column = column.field("bytes")
            else:
                self._names = [None] * len(column)
            self._group, self._images = group, column
        return number - self.starts[group]

    def close(self) -> None:
        self.file.close()

    def name(self, number: int) -> str | None:
        row = self._load(number)  # first: it replaces the lists below
        return self._names[row]

    def image_bytes(self, number: int) -> bytes | None:
        row = self._load(number)
        value = self._images[row]
        return value.as_py() if value.is_valid else None


def image_column(schema) -> tuple[str, bool]:
    """(the image column's name, whether it is a Hugging Face `Image` struct of bytes and path)."""
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    for field in schema:
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0 \
                and any(is_binary(field.type.field("bytes").type) for is_binary in binary):
            return field.name, True
    for field in schema:
        if field.name.lower() in IMAGE_COLUMN_NAMES and any(is_binary(field.type) for is_binary in binary):
            return field.name, False
    raise PageError("Parquet table has no image column: a Hugging Face Image struct (bytes, path) or a "
                    f"binary column named one of {', '.join(IMAGE_COLUMN_NAMES)}")


SHARD_KINDS = {"tar": TarShard, "parquet": ParquetImages}


def open_shard(kind: str, data: bytes, settings: RenderSpec) -> TarShard | ParquetImages:
    if not data:
        raise PageError("file is empty (0 bytes)")
    with time_limit(settings.timeout_s, "reading the shard's index"):
        return SHARD_KINDS[kind](data)


def shard_frames(kind: str, data: bytes, settings: RenderSpec, skip: set[int],
                 image_frames: Callable) -> Iterator[dict]:
    """One frame per image not in `skip`: page, n_pages, member, and pixels or an error.
    `image_frames(kind, data, settings, skip)` decodes one image file (in the sandbox or here).
    Raises PageError if the shard cannot be opened."""
    shard = open_shard(kind, data, settings)
    for number in range(shard.n_pages):
        if number in skip:
            continue
        head = {"page": number, "n_pages": shard.n_pages, "member": None}
        try:
            head["member"] = shard.name(number)
            image = shard.image_bytes(number)
            if image is None:
                raise PageError("this row has no image (null)")
            frames = image_frames("image", image, settings, set())
            try:
                frame = next(frames)  # a multi-frame image (TIFF) is one sample: its first frame
            finally:
                frames.close()
        except PageError as exc:
            frame = {"error": str(exc)}
        except Exception as exc:
            frame = {"error": f"reading image {number} failed: {type(exc).__name__}: {exc}"}
        yield {**frame, **head}
