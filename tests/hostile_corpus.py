"""A corpus of hostile inputs, generated on the spot: what a bulk job meets in a real archive.

`write_hostile_corpus(folder)` writes the files and returns, per file name, what a run must make of it:
how many rows (per task) and how many of them ok. Every file is accounted for: a page that renders is
an ok row, one that does not is an error row, a file with no usable page is one error row.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import draw_image


@dataclass(frozen=True)
class Expected:
    pages: int  # rows per task
    ok: int  # of which status = "ok"; the others are errors
    reason: str = ""  # a phrase every error row's reason contains (case-insensitive)


# The XObject bomb: pages of a PDF that take MuPDF minutes to draw (4**12 nested form draws).
BOMB_DEPTH = 12


def write_hostile_corpus(folder: Path) -> dict[str, Expected]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(5)
    expected: dict[str, Expected] = {}

    def put(name: str, data: bytes, outcome: Expected) -> None:
        (folder / name).write_bytes(data)
        expected[name] = outcome

    # -- PDFs --------------------------------------------------------------------------------------
    three_pages = _pdf_bytes(3)
    put("empty.pdf", b"", Expected(1, 0, "empty"))
    put("random.pdf", rng.randbytes(4096), Expected(1, 0, "cannot open pdf"))
    put("garbage_after_header.pdf", b"%PDF-1.7\n" + rng.randbytes(4000), Expected(1, 0, "cannot open pdf"))
    put("truncated_head.pdf", three_pages[:200], Expected(1, 0, "cannot open pdf"))
    # A download cut off before the cross-reference table: MuPDF rebuilds it from the objects.
    put("truncated_tail.pdf", three_pages[: three_pages.rindex(b"xref")], Expected(3, 3))
    # Wrong offsets in the cross-reference table (an edited file saved by a careless tool): repaired.
    put("corrupted_xref.pdf", _garble_xref(three_pages), Expected(3, 3))
    put("zero_pages.pdf", _handmade_pdf(["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [] /Count 0 >>"]),
        Expected(1, 0, "no pages"))
    put("encrypted_user_password.pdf", _pdf_bytes(2, user_pw="secret", owner_pw="owner"), Expected(1, 0, "password"))
    put("encrypted_owner_only.pdf", _pdf_bytes(2, owner_pw="owner"), Expected(2, 2))
    put("giant_page.pdf", _pdf_bytes(1, size=(14400, 14400)), Expected(1, 1))
    put("tiny_page.pdf", _pdf_bytes(1, size=(1, 1)), Expected(1, 1))
    put("extreme_aspect_page.pdf", _pdf_bytes(1, size=(14400, 3)), Expected(1, 1))
    put("many_pages.pdf", _pdf_bytes(300, size=(200, 200)), Expected(300, 300))
    # Three pages, the middle one a rendering bomb: pages 0 and 2 render, page 1 hits the time limit.
    put("xobject_bomb.pdf", _xobject_bomb_pdf(BOMB_DEPTH), Expected(3, 2, "longer than"))

    # -- images ------------------------------------------------------------------------------------
    def image_bytes(image, fmt: str, **options) -> bytes:
        out = io.BytesIO()
        image.save(out, format=fmt, **options)
        return out.getvalue()

    photo = _photo(Image, 200, 150)
    png, jpeg = image_bytes(photo, "PNG"), image_bytes(photo, "JPEG", quality=90)
    put("empty.png", b"", Expected(1, 0, "empty"))
    put("random.png", rng.randbytes(4096), Expected(1, 0, "not an image format"))
    put("truncated.png", png[: len(png) // 2], Expected(1, 0, "truncated"))
    put("truncated.jpg", jpeg[: len(jpeg) // 2], Expected(1, 0, "truncated"))
    put("decompression_bomb.png", _png_header_only(50_000, 50_000), Expected(1, 0, "decompression bomb"))
    put("over_max_pixels.png", _png_header_only(8_000, 6_000), Expected(1, 0, "max_pixels"))
    put("cmyk.jpg", image_bytes(photo.convert("CMYK"), "JPEG"), Expected(1, 1))
    put("rgba.png", image_bytes(_with_alpha(Image, photo), "PNG"), Expected(1, 1))
    put("palette_transparent.gif", image_bytes(photo.convert("P"), "GIF", transparency=0), Expected(1, 1))
    put("gray.png", image_bytes(photo.convert("L"), "PNG"), Expected(1, 1))
    put("gray16.png", image_bytes(gradient_16bit(Image), "PNG"), Expected(1, 1))
    put("frames.tiff", _multi_frame_tiff(Image), Expected(3, 3))
    put("master_scan.jp2", image_bytes(photo, "JPEG2000"), Expected(1, 1))  # lossless by default
    put("photo.avif", image_bytes(photo, "AVIF", quality=80), Expected(1, 1))
    put("wide.png", image_bytes(Image.new("RGB", (5000, 20), "white"), "PNG"), Expected(1, 1))
    put("tall.png", image_bytes(Image.new("RGB", (20, 5000), "white"), "PNG"), Expected(1, 1))

    # -- shards of images --------------------------------------------------------------------------------
    good = {f"{i:06d}.png": png for i in range(3)}
    whole = _tar_bytes(good)
    # An upload cut in the middle of the third image: two images, the third an error row, then one more
    # error row saying the images after it (unknown) are lost.
    put("cut_short.tar", whole[: whole.index(png, 3 * 512 + 2 * len(png)) + len(png) // 2], Expected(4, 2, "tar is"))
    put("bomb_member.tar", _tar_bytes({"000000.png": png, "000001.png": _png_header_only(50_000, 50_000)}),
        Expected(2, 1, "decompression bomb"))
    put("random.tar", rng.randbytes(4096), Expected(1, 0, "cannot open tar"))
    put("latin1_names.tar", _tar_bytes({"caf\xe9.png": png}, encoding="latin-1"), Expected(1, 1))
    put("random.parquet", rng.randbytes(4096), Expected(1, 0, "cannot open parquet"))

    # -- not documents at all ------------------------------------------------------------------------
    put("notes.txt", b"just some text\n", Expected(1, 0, "unsupported file type"))
    put("report.docx", b"PK\x03\x04" + rng.randbytes(500), Expected(1, 0, "unsupported file type"))
    put("no_extension", b"%PDF-1.7\n", Expected(1, 0, "unsupported file type"))
    return expected


def _tar_bytes(members: dict[str, bytes], encoding: str = "utf-8") -> bytes:
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT, encoding=encoding) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- PDF makers -----------------------------------------------------------------------------------------
def _pdf_bytes(n_pages: int, size=(300, 400), user_pw: str = "", owner_pw: str = "") -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for number in range(n_pages):
        page = doc.new_page(width=size[0], height=size[1])
        if size[0] >= 50 and size[1] >= 50:
            page.insert_text((10, 30), f"page {number}", fontsize=min(12, size[1] / 4))
    if user_pw or owner_pw:
        return doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=user_pw, owner_pw=owner_pw)
    return doc.tobytes()


def _handmade_pdf(objects: list[str | bytes]) -> bytes:
    """A PDF from raw object bodies (object 1 is the catalog), with a correct cross-reference table."""
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        body = body.encode() if isinstance(body, str) else body
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def _stream(dictionary: str, content: str) -> bytes:
    data = content.encode()
    return f"<< {dictionary} /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream"


def _xobject_bomb_pdf(depth: int) -> bytes:
    """Pages 0 and 2 are plain; page 1 draws form X1, which draws X2 four times, ... down to X`depth`:
    4**depth rectangles from a file of a few kilobytes."""
    objects: list[str | bytes] = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R 4 0 R 5 0 R] /Count 3 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 6 0 R >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 7 0 R /Resources << /XObject << /X 8 0 R >> >> >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 6 0 R >>",
        _stream("", "0 0 100 100 re f"),
        _stream("", "/X Do"),
    ]
    for level in range(depth):  # object 8 + level draws object 9 + level four times
        child = len(objects) + 2
        objects.append(_stream(f"/Type /XObject /Subtype /Form /BBox [0 0 200 200] /Resources << /XObject << /Y {child} 0 R >> >>",
                               "/Y Do /Y Do /Y Do /Y Do"))
    objects.append(_stream("/Type /XObject /Subtype /Form /BBox [0 0 200 200]", "0 0 200 200 re f"))
    return _handmade_pdf(objects)


def _garble_xref(pdf: bytes) -> bytes:
    """Shift every offset in the cross-reference table, so each one points at the wrong place."""
    head, _, tail = pdf.rpartition(b"xref")
    lines = tail.split(b"\n")
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) == 3 and parts[2] == b"n":
            lines[i] = b"%010d %s n " % (int(parts[0]) + 7, parts[1])
    return head + b"xref" + b"\n".join(lines)


# -- image makers ---------------------------------------------------------------------------------------
def _photo(Image, width: int, height: int):
    return draw_image((width, height), (30, 120, 200), "hostile")


def _with_alpha(Image, photo):
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    return rgba


def gradient_16bit(Image):
    """A 16-bit grayscale left-to-right gradient over the whole 0..65535 range."""
    import numpy as np

    row = np.linspace(0, 65535, 256).astype(np.uint16)
    return Image.fromarray(np.tile(row, (64, 1)))


def _multi_frame_tiff(Image) -> bytes:
    frames = [_photo(Image, 120, 90), Image.new("L", (60, 200), 128), _photo(Image, 300, 40).convert("CMYK")]
    out = io.BytesIO()
    frames[0].save(out, format="TIFF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`x`height` grayscale pixels but carries a few bytes: a decompression bomb's
    header, without the gigabytes (nothing may allocate from the claim)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")


# -- bombs: files of a few kilobytes that claim gigabytes or thousands of pages -----------------------------
SPARSE_CLAIM = 8 * 2**30  # what the sparse tar member would expand to
DICTIONARY_VALUE = 256 * 2**20  # the one value the dictionary bomb's rows share
DICTIONARY_ROWS = 8
TIFF_FRAMES = 6000
NULL_ROWS = 1_000_000


def write_bomb_corpus(folder: Path) -> dict[str, Expected]:
    """The four bombs, each named after what it claims, and what a run must make of each: a few error rows."""
    folder.mkdir(parents=True, exist_ok=True)
    png = _png_bytes()
    (folder / "sparse_bomb.tar").write_bytes(sparse_tar_bomb(png))
    dictionary_bomb_parquet(folder / "dictionary_bomb.parquet")
    (folder / "frames_bomb.tiff").write_bytes(many_frame_tiff(TIFF_FRAMES))
    null_rows_parquet(folder / "null_rows_bomb.parquet")
    return {
        "sparse_bomb.tar": Expected(2, 1, "sparse"),  # a good image, then the sparse member
        "dictionary_bomb.parquet": Expected(DICTIONARY_ROWS, 0, "max_image_mb"),
        "frames_bomb.tiff": Expected(1, 0, "max_pages"),
        "null_rows_bomb.parquet": Expected(1, 0, "max_pages"),
    }


def _png_bytes() -> bytes:
    out = io.BytesIO()
    draw_image((120, 90), (200, 60, 30), "beside a bomb").save(out, format="PNG")
    return out.getvalue()


def sparse_tar_bomb(png: bytes, claimed: int = SPARSE_CLAIM) -> bytes:
    """A 10 KB tar: `000000.png`, then `000001.png`, an old-GNU sparse member (type 'S') that stores one
    block of data and claims `claimed` bytes: reading it would write out every byte of its holes."""
    import tarfile

    good = tarfile.TarInfo("000000.png")
    good.size = len(png)
    data = b"\x89PNG" + bytes(tarfile.BLOCKSIZE - 4)
    header = bytearray(tarfile.BLOCKSIZE)

    def put(offset: int, value: bytes) -> None:
        header[offset:offset + len(value)] = value

    put(0, b"000001.png")
    put(100, b"0000644\0")
    put(108, b"0000000\0")
    put(116, b"0000000\0")
    put(124, b"%011o\0" % len(data))  # bytes stored in the archive
    put(136, b"%011o\0" % 0)
    put(156, b"S")  # GNUTYPE_SPARSE
    put(257, b"ustar  \0")  # the GNU magic
    put(386, b"%011o\0" % 0 + b"%011o\0" % len(data))  # the sparse map: data at 0, holes after it
    put(483, b"%012o" % claimed)  # the real size
    put(148, b" " * 8)
    put(148, b"%06o\0 " % sum(header))
    archive = (good.tobuf(tarfile.GNU_FORMAT) + png + bytes(-len(png) % tarfile.BLOCKSIZE)
               + bytes(header) + data + bytes(2 * tarfile.BLOCKSIZE))
    return archive + bytes(-len(archive) % tarfile.RECORDSIZE)


def dictionary_bomb_parquet(path: Path, value_bytes: int = DICTIONARY_VALUE, rows: int = DICTIONARY_ROWS) -> Path:
    """A Hugging Face-style image table of a few KB whose `rows` rows share one dictionary value of
    `value_bytes` zeros: read as a plain column, each row's cell is `value_bytes` (2 GiB in all).
    Written from one value, dictionary-encoded, never from the rows' copies."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    value = pa.py_buffer(np.zeros(value_bytes, np.uint8))  # untouched zero pages: no memory until read
    offsets = pa.py_buffer(np.array([0, value_bytes], np.int32))
    dictionary = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, value])
    images = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), dictionary)
    paths = pa.array([f"{i:06d}.png" for i in range(rows)])
    table = pa.table({"image": pa.StructArray.from_arrays([images, paths], names=["bytes", "path"])})
    pq.write_table(table, path, compression="zstd", dictionary_pagesize_limit=2 * value_bytes,
                   write_statistics=False, store_schema=False)  # the schema a reader sees: plain binary
    return path


def null_rows_parquet(path: Path, rows: int = NULL_ROWS) -> Path:
    """A Hugging Face-style image table of `rows` rows, every image null: about 2 KB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.nulls(rows, image)}), path, compression="zstd")
    return path


def many_frame_tiff(frames: int) -> bytes:
    """A TIFF of `frames` frames of one 8-bit gray pixel each (116 bytes a frame), written by hand:
    Pillow takes minutes to save thousands of frames."""
    tags = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, None), (277, 3, 1),
            (278, 3, 1), (279, 4, 1)]  # width, height, bits, no compression, black is zero, strip, ...
    out = bytearray(b"II*\0\0\0\0\0")
    next_pointer = 4  # where the offset of the next frame's directory goes
    for _ in range(frames):
        pixel_at = len(out)
        out += b"\x80\0"  # the frame's pixel, padded to a word
        out[next_pointer:next_pointer + 4] = struct.pack("<I", len(out))
        out += struct.pack("<H", len(tags))
        for tag, kind, value in tags:
            out += struct.pack("<HHII", tag, kind, 1, pixel_at if value is None else value)
        next_pointer = len(out)
        out += b"\0\0\0\0"  # no next directory, until the next frame's
    return bytes(out)
