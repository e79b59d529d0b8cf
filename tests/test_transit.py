"""Page pixels between stages are not copied where they need not be.

A page rendered at 1960 px is ~9 MB of pixels. Copying it through a socket and in and out of Python
bytes took as long as rendering the page, so: the render sandbox hands pages over through shared memory
(pipeline/render/sandbox.py, `SharedPixels`), `table_from_rows` wraps each large binary value without
copying it, and page steps read them back as Arrow buffers (core/schema.py, `rows_of`). These tests hold
each of those to giving the very same bytes as the plain way.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scriptorium.core.schema import PAGE_SCHEMA, rows_of, table_from_rows
from scriptorium.core.spec import RenderSpec
from scriptorium.pipeline.render.sandbox import RenderSandbox, SharedPixels
from scriptorium.pipeline.render.sources import source_frames


def page_rows() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"source_uri": "a.pdf", "page": 0, "status": "ok", "width": 4, "height": 2,
         "image": rng.integers(0, 256, 24, dtype=np.uint8).tobytes()},
        {"source_uri": "a.pdf", "page": 1, "status": "error", "error": "page has an empty page box", "image": None},
        {"source_uri": "b.png", "page": 0, "status": "ok", "width": 0, "height": 0, "image": b""},
        {"source_uri": "c.png", "page": 0, "status": "ok", "width": 1, "height": 1, "image": b"\x01\x02\x03"},
    ]


def test_a_page_table_holds_the_rows_own_bytes_without_copying_them():
    rows = page_rows()
    table = table_from_rows(rows, PAGE_SCHEMA)

    assert table.schema == PAGE_SCHEMA
    plain = pa.Table.from_pylist([{name: row.get(name) for name in PAGE_SCHEMA.names} for row in rows], PAGE_SCHEMA)
    assert table.to_pylist() == plain.to_pylist()
    assert table.equals(plain)
    first = table["image"].chunks[0].buffers()[2]
    assert first.address == pa.py_buffer(rows[0]["image"]).address  # the bytes object itself


def test_page_steps_read_the_pixels_in_place_and_give_back_the_same_rows(tmp_path):
    rows = page_rows()
    table = table_from_rows(rows, PAGE_SCHEMA)
    # As a model stage or a sink meets it: one chunk per column (Ray Data combines blocks), then sliced.
    combined = pa.concat_tables([table, table]).combine_chunks().slice(1, 6)
    read = rows_of(combined)

    assert [None if r["image"] is None else bytes(r["image"]) for r in read] == [r["image"] for r in (rows + rows)[1:7]]
    data = combined["image"].chunks[0].buffers()[2]
    assert data.address <= read[2]["image"].address < data.address + data.size  # a view, not a copy
    assert [list(r) for r in read] == [list(r) for r in combined.to_pylist()]  # same columns, same order
    # A step's output built from those buffers is an ordinary table: it writes and reads back as such.
    again = table_from_rows(read, PAGE_SCHEMA)
    pq.write_table(again, tmp_path / "pages.parquet")
    assert pq.read_table(tmp_path / "pages.parquet").to_pylist() == combined.to_pylist()


def pdf_of_page_sizes(sizes) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for number, (width, height) in enumerate(sizes):
        page = doc.new_page(width=width, height=height)
        page.draw_rect(pymupdf.Rect(0, 0, width / 2, height / 3), color=(0.8, 0.1, 0.1), fill=(0.1, 0.4, 0.8))
        page.insert_text((10, 30), f"page {number}", fontsize=20)
    return doc.tobytes()


def test_the_sandbox_hands_over_exactly_the_pages_rendered_in_process():
    """Pages that grow the shared file, a 75 MB one, and a small one after it (the file shrinks back)."""
    sizes = [(300, 200), (612, 792), (5000, 5000), (100, 150)]
    data = pdf_of_page_sizes(sizes)
    settings = RenderSpec(dpi=72)  # one pixel per point: the page sizes above, in pixels
    in_process = list(source_frames("pdf", data, settings, set()))
    sandbox = RenderSandbox()
    try:
        rendered = list(sandbox.frames("pdf", data, settings, set()))
    finally:
        sandbox.stop()

    assert [(f["width"], f["height"]) for f in rendered] == sizes
    assert rendered == in_process


def test_shared_pixels_grow_and_shrink_with_the_pages(tmp_path):
    child = SharedPixels.create()
    parent = SharedPixels(child.fd)
    try:
        for size in (10, 1000, 70 * 2**20, 5):
            data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
            assert parent.take(child.put(data)) == data
        assert os.fstat(child.fd).st_size == 5  # cut down after the large page, not kept at 70 MB
    finally:
        child.close()


def test_without_shared_memory_the_pages_come_through_the_socket(monkeypatch):
    """Where no memfd can be made (not Linux, a sandboxed container), the file and the pages are sent
    as messages: the same pages."""
    monkeypatch.setattr(SharedPixels, "create", classmethod(lambda cls: None))
    data = pdf_of_page_sizes([(300, 200), (612, 792)])
    settings = RenderSpec(dpi=72)
    sandbox = RenderSandbox()
    try:
        rendered = list(sandbox.frames("pdf", data, settings, set()))
    finally:
        sandbox.stop()
    assert rendered == list(source_frames("pdf", data, settings, set()))
    assert all(isinstance(frame["image"], bytes) and frame["image"] for frame in rendered)
