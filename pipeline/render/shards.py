"""Shards: one source holding many images, each image a page. Two layouts training corpora use:

- **Tar shards** (WebDataset and similar): samples are files sharing a key (`000123.jpg` beside
  `000123.json`). The image members, in the order the tar holds them, are pages 0..n-1 and each row
  names its member (`member`), so captions join back to the samples by key. Members that are not
  images (captions, metadata) are not pages.
- **Parquet tables of images** (Hugging Face datasets' `Image` feature, a struct of `bytes` and
  `path`; or a binary column named image, img, jpg, png, ...): row i is page i, and `member` is the
  row's `path` where the table has one.

Each image is decoded exactly as an image file is (`decoders.py`: the same size checks, the first frame,
transparency onto white). A shard is opened as one document (`ShardImages`, through sources.py) in the
render sandbox, like a PDF: its index is parsed there, under the sandbox's time and memory limits, never
in the worker.
An image that fails is an error row for its page; a shard that cannot be opened, or holds no images,
is an error row, as any unreadable file.

Bombs are refused from what the shard says about itself, before bytes are allocated: more images than
`render.max_pages` (tar members are counted only that far; a Parquet table's rows come from its
footer); an image over `render.max_image_mb` (a tar member's header size, a Parquet cell's length);
sparse tar members, which expand to the size their header claims (a 10 KB tar can claim gigabytes of
holes); Parquet row groups too large to read within `render.max_memory_mb` (from the footer), or whose
image dictionary holds a value over `render.max_image_mb` (from the dictionary page's header: the few-KB
table whose 8 rows share one 256 MiB value is refused without reading that value). A Parquet image
column is read dictionary-encoded, so a value shared by many rows stays one value, and a cell's length
is checked before its bytes are copied out.
"""

from __future__ import annotations

import bisect
import io
import tarfile

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scriptorium.core.errors import PageError
from scriptorium.core.kinds import kind_of
from scriptorium.core.spec import RenderSpec
from scriptorium.pipeline.render.decoders import ImageDocument, describe

# Binary columns taken for images when no column is a Hugging Face `Image` struct.
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")


# Reading a Parquet row group takes up to about this many times its columns' uncompressed size
# (decompression buffers, builders growing): measured with pyarrow 26 on image columns.
PARQUET_READ_EXPANSION = 4
MAX_NAME_BYTES = 4096  # a member's name or a row's path longer than this is refused (it is written to every row)


def megabytes(value: float) -> int:
    return int(value * 1024 * 1024)


class TarShard:
    """An open tar shard: its image members, read one at a time, each checked from its header first."""

    def __init__(self, data: bytes, settings: RenderSpec):
        self.max_image_mb = settings.max_image_mb
        try:
            self.tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        except tarfile.TarError as exc:
            raise PageError(f"cannot open tar: {exc}") from None
        self.members = []
        self.cut_short = None  # why the tar seems truncated (its members after the cut are unknown)
        try:  # a shard cut short (an interrupted upload) keeps the members before the cut
            for member in iter(self.tar.next, None):
                # Only files: links and devices name no image of their own. Sparse files count as files
                # here, to be refused when read (image_bytes), so that each one is an error row.
                if member.isfile() and kind_of(member.name) == "image":
                    if len(self.members) == settings.max_pages:
                        raise PageError(f"tar holds more than render.max_pages={settings.max_pages} images")
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
        if len(raw) > MAX_NAME_BYTES:
            raise PageError(f"member name is {len(raw)} bytes long, more than {MAX_NAME_BYTES}")
        return raw.decode("utf-8", "backslashreplace")

    def image_bytes(self, number: int) -> bytes | None:
        if number == len(self.members):
            raise PageError(self.cut_short)
        member = self.members[number]
        if member.issparse():  # GNU or PAX sparse: reading it writes out every hole its header claims
            raise PageError(f"tar member is a sparse file claiming {member.size} bytes: sparse members are refused")
        if member.size > megabytes(self.max_image_mb):
            raise PageError(f"tar member is {member.size} bytes, more than render.max_image_mb={self.max_image_mb:g}")
        try:
            return self.tar.extractfile(member).read()
        except tarfile.TarError as exc:
            raise PageError(f"tar is cut short inside this image: {exc}") from None

    def close(self) -> None:
        self.tar.close()


class ParquetImages:
    """An open Parquet table of images, read one row group at a time, its image column dictionary-encoded."""

    def __init__(self, data: bytes, settings: RenderSpec):
        self.max_image_mb, self.max_memory_mb = settings.max_image_mb, settings.max_memory_mb
        try:
            schema = pq.read_schema(pa.BufferReader(data))
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
            raise PageError(f"cannot open Parquet: {exc}") from None
        self.column, self.is_struct = image_column(schema)
        self.named = False  # a Hugging Face struct with a string `path`
        if self.is_struct:
            struct = schema.field(self.column).type
            index = struct.get_field_index("path")
            self.named = index >= 0 and pa.types.is_string(struct.field(index).type)
        leaves = [f"{self.column}.bytes", *([f"{self.column}.path"] if self.named else [])] if self.is_struct \
            else [self.column]
        self.data = data  # for the page headers
        try:  # dictionary-encoded, a value stored once for many rows is read once, not copied into each row
            self.file = pq.ParquetFile(pa.BufferReader(data), read_dictionary=leaves)
        except Exception as exc:
            raise PageError(f"cannot open Parquet: {exc}") from None
        metadata = self.file.metadata
        self.leaf_columns = [i for i in range(metadata.num_columns) if metadata.schema.column(i).path in leaves]
        self.image_leaf = next(i for i in self.leaf_columns if metadata.schema.column(i).path == leaves[0])
        self.n_pages = metadata.num_rows
        if not self.n_pages:
            raise PageError("Parquet table has no rows")
        if self.n_pages > settings.max_pages:  # from the footer: a million null rows take 2 KB
            raise PageError(f"Parquet table has {self.n_pages} rows, more than render.max_pages={settings.max_pages}")
        # Row group boundaries: row number -> (row group, row within it).
        self.starts = [0]
        for group in range(self.file.num_row_groups):
            self.starts.append(self.starts[-1] + metadata.row_group(group).num_rows)
        self._group, self._images, self._names = -1, None, None
        self._unreadable: dict[int, str] = {}  # row group -> why: each of its rows says so, without trying again

    def _load(self, number: int) -> int:
        group = bisect.bisect_right(self.starts, number) - 1
        if group in self._unreadable:
            raise PageError(self._unreadable[group])
        if group != self._group:
            self._images = self._names = None  # the previous group's, before the next is read
            try:
                self._check_group(group)
                column = self.file.read_row_group(group, columns=[self.column], use_threads=False).column(0)
            except PageError as exc:  # a cap, or the time limit while reading
                self._unreadable[group] = str(exc)
                raise
            column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
            if self.is_struct:
                self._names = column.field("path") if self.named else None
                column = column.field("bytes")
            self._group, self._images = group, column
        return number - self.starts[group]

    def _check_group(self, group: int) -> None:
        """Refuse a row group from its metadata: too large to read within the memory limit, or an image
        dictionary holding a value over the image cap (which the rows sharing it would each be)."""
        metadata = self.file.metadata.row_group(group)
        size = sum(metadata.column(i).total_uncompressed_size for i in self.leaf_columns)
        if 0 < megabytes(self.max_memory_mb) < size * PARQUET_READ_EXPANSION:
            raise PageError(f"row group {group} holds {size} bytes of images (uncompressed): reading it would take "
                            f"more than render.max_memory_mb={self.max_memory_mb}; write the table with smaller row groups")
        dictionary = dictionary_page(self.data, metadata.column(self.image_leaf))
        if dictionary is not None and dictionary[1] and dictionary[0] / dictionary[1] > megabytes(self.max_image_mb):
            raise PageError(f"row group {group} shares an image of more than render.max_image_mb={self.max_image_mb:g} "
                            f"between its rows (its dictionary holds {dictionary[1]} value(s) in {dictionary[0]} bytes)")

    def name(self, number: int) -> str | None:
        row = self._load(number)
        if self._names is None:
            return None
        return _cell(self._names, row, MAX_NAME_BYTES, "this row's path", str(MAX_NAME_BYTES))

    def image_bytes(self, number: int) -> bytes | None:
        row = self._load(number)
        return _cell(self._images, row, megabytes(self.max_image_mb), "this row's image",
                     f"render.max_image_mb={self.max_image_mb:g}")

    def close(self) -> None:
        self.file.close()


def _cell(array: pa.Array, row: int, limit: int, what: str, setting: str):
    """Row `row` of a binary or string column (None if null), its length checked before it is copied
    out: past `limit` bytes, a PageError naming `what` and the `setting` that sets the limit."""
    if pa.types.is_dictionary(array.type):
        index = array.indices[row]
        if not index.is_valid:
            return None
        array, row = array.dictionary, index.as_py()
    value = array.slice(row, 1)
    if value.null_count:
        return None
    length = pc.binary_length(value)[0].as_py()
    if length > limit:
        raise PageError(f"{what} is {length} bytes, more than {setting}")
    return value[0].as_py()


def dictionary_page(data: bytes, chunk) -> tuple[int, int] | None:
    """(uncompressed bytes, number of values) of a column chunk's dictionary page, from the page's header,
    which pyarrow does not show: a Thrift compact-protocol PageHeader whose field 2 is the uncompressed
    size and field 7 the DictionaryPageHeader (its field 1: the number of values). None where the chunk
    has no dictionary or its header holds anything else than the integers and structs read here."""
    if not chunk.has_dictionary_page or chunk.dictionary_page_offset is None:
        return None
    try:
        header, _ = _compact_struct(data, chunk.dictionary_page_offset)
        return header[2], header[7][1]
    except (IndexError, KeyError, TypeError, ValueError):
        return None


def _compact_struct(data: bytes, at: int, depth: int = 0) -> tuple[dict, int]:
    """A Thrift compact-protocol struct's integer, boolean and struct fields: ({field id: value}, end)."""
    fields, field_id = {}, 0
    while True:
        byte, at = data[at], at + 1
        if byte == 0:  # the end of the struct
            return fields, at
        kind, delta = byte & 0x0F, byte >> 4
        if delta:
            field_id += delta
        else:
            field_id, at = _zigzag_varint(data, at)
        if kind in (1, 2):  # booleans carry their value in the kind
            fields[field_id] = kind == 1
        elif kind in (3, 4, 5, 6):  # i8 as a byte, i16, i32 and i64 as zigzag varints
            fields[field_id], at = (data[at], at + 1) if kind == 3 else _zigzag_varint(data, at)
        elif kind == 12 and depth < 2:
            fields[field_id], at = _compact_struct(data, at, depth + 1)
        else:
            raise ValueError(f"field type {kind} is not read here")


def _zigzag_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte, at = data[at], at + 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), at


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


SHARD_CLASSES = {"tar": TarShard, "parquet": ParquetImages}


class ShardImages:
    """A shard opened as a document: page i is its i-th image, decoded as that image file would be
    (its first frame: a multi-frame image is one sample). Every frame names its member."""

    what = "decoding image"

    def __init__(self, kind: str, data: bytes, settings: RenderSpec):
        self.shard = SHARD_CLASSES[kind](data, settings)
        self.n_pages = self.shard.n_pages
        self.settings = settings

    def render(self, number: int) -> dict:
        member = None
        try:
            member = self.shard.name(number)
            image = self.shard.image_bytes(number)
            if image is None:
                raise PageError("this row has no image (null)")
            if not image:
                raise PageError("file is empty (0 bytes)")
            document = ImageDocument(image, self.settings, all_frames=False)
            try:
                return {"member": member, **document.render(0)}
            finally:
                document.close()
        except PageError as exc:  # the time limit's too: the row keeps its member's name
            return {"member": member, "error": str(exc)}
        except Exception as exc:
            return {"member": member, "error": f"reading image {number} failed: {type(exc).__name__}: {describe(exc)}"}

    def close(self) -> None:
        self.shard.close()
