"""Shards of images, tar (WebDataset style) and Parquet (Hugging Face datasets style): each image is a
page of the shard, named in `member`, decoded exactly as the same image file would be; other members
are not pages; a bad image is an error row for its page, a bad shard an error row for the file;
captions join back to samples by name."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scriptorium.core.pixels import page_image
from scriptorium.core.schema import PAGE_SCHEMA, table_from_rows
from scriptorium.core.spec import RenderSpec, StorageSpec, spec_from_dict
from scriptorium.jobs.runner import run_job
from scriptorium.pipeline.render.stage import pages_of
from tests.conftest import make_image, read_rows

SETTINGS = RenderSpec(page_edge=980, sandbox=False)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, images: dict[str, Path], extra: dict[str, bytes] | None = None) -> Path:
    """A WebDataset-style shard: each sample's image, then its caption and metadata members."""
    with tarfile.open(path, "w") as tar:
        for key, image in images.items():
            add(tar, f"{key}{image.suffix}", image.read_bytes())
            add(tar, f"{key}.txt", f"original caption of {key}".encode())
            add(tar, f"{key}.json", b'{"width": 0}')
        for name, data in (extra or {}).items():
            add(tar, name, data)
    return path


def make_image_table(path: Path, images: dict[str, Path], extra_rows: list[dict] = ()) -> Path:
    """A Hugging Face datasets-style table: `image` is a struct of bytes and path, beside other columns;
    two rows per row group, so reads cross row groups."""
    rows = [{"image": {"bytes": image.read_bytes(), "path": f"{key}{image.suffix}"}, "caption": f"about {key}"}
            for key, image in images.items()]
    pq.write_table(pa.Table.from_pylist([*rows, *extra_rows]), path, row_group_size=2)
    return path


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("samples")
    return {
        "000000": make_image(folder / "a.jpg", size=(320, 240), color=(200, 30, 30), text="red"),
        "000001": make_image(folder / "b.png", size=(240, 320), color=(30, 200, 30), text="green"),
        "000002": make_image(folder / "c.webp", size=(400, 300), color=(30, 30, 200), text="blue"),
    }


def plan(path: Path) -> dict:
    kind = {".tar": "tar", ".parquet": "parquet"}.get(path.suffix, "image")
    return {"source_uri": str(path), "kind": kind, "size": path.stat().st_size, "etag": "e"}


def test_each_image_member_is_a_page_decoded_as_the_image_file_would_be(samples, tmp_path):
    shard = make_shard(tmp_path / "shard-000.tar", samples)
    rows = list(pages_of(plan(shard), SETTINGS, StorageSpec()))

    assert [(r["page"], r["n_pages"], r["member"], r["status"]) for r in rows] == [
        (0, 3, "000000.jpg", "ok"), (1, 3, "000001.png", "ok"), (2, 3, "000002.webp", "ok")]
    for row, image in zip(rows, samples.values()):
        alone = next(pages_of(plan(image), SETTINGS, StorageSpec()))
        assert np.array_equal(page_image(row), page_image(alone))


def test_a_bad_member_is_an_error_row_for_its_page_only(samples, tmp_path):
    shard = make_shard(tmp_path / "shard-001.tar", samples, {"000003.jpg": b"\xff\xd8 not really a jpeg",
                                                             "000004.png": b""})
    rows = list(pages_of(plan(shard), RenderSpec(page_edge=980), StorageSpec()))  # in the sandbox

    assert [(r["member"], r["status"]) for r in rows] == [
        ("000000.jpg", "ok"), ("000001.png", "ok"), ("000002.webp", "ok"), ("000003.jpg", "error"), ("000004.png", "error")]
    assert "cannot decode image" in rows[3]["error"] and rows[3]["stage"] == "decode"
    assert rows[4]["error"] == "file is empty (0 bytes)"


def test_a_member_name_that_is_not_utf8_is_written_with_escapes(tmp_path):
    from tests.hostile_corpus import _tar_bytes

    image = make_image(tmp_path / "x.png")
    (tmp_path / "old.tar").write_bytes(_tar_bytes({"caf\xe9.png": image.read_bytes()}, encoding="latin-1"))
    rows = list(pages_of(plan(tmp_path / "old.tar"), SETTINGS, StorageSpec()))
    assert [(r["member"], r["status"]) for r in rows] == [("caf\\xe9.png", "ok")]
    table_from_rows(rows, PAGE_SCHEMA)  # Arrow takes it: a surrogate would stop the whole block


@pytest.mark.parametrize(
    "content, reason",
    [(b"these bytes are not a tar archive" * 40, "cannot open tar"),
     (None, "tar holds no image members")],
)
def test_a_shard_that_gives_no_pages_is_one_error_row(tmp_path, content, reason):
    path = tmp_path / "bad.tar"
    if content is None:  # a valid tar with captions and no images
        with tarfile.open(path, "w") as tar:
            add(tar, "000000.txt", b"a caption without its image")
    else:
        path.write_bytes(content)
    rows = list(pages_of(plan(path), SETTINGS, StorageSpec()))
    assert len(rows) == 1 and rows[0]["status"] == "error" and rows[0]["error"].startswith(reason)


def test_a_resumed_shard_decodes_only_its_missing_members(samples, tmp_path):
    shard = make_shard(tmp_path / "shard-002.tar", samples)
    rows = list(pages_of({**plan(shard), "done_pages": [0, 2], "known_pages": 3}, SETTINGS, StorageSpec()))
    assert [(r["page"], r["member"]) for r in rows] == [(1, "000001.png")]


def test_each_row_of_an_image_table_is_a_page_named_by_its_path(samples, tmp_path):
    table = make_image_table(tmp_path / "train-00000.parquet", samples, [
        {"image": None, "caption": "a row whose image is missing"},
        {"image": {"bytes": b"not an image", "path": "000004.jpg"}, "caption": "garbage"},
    ])
    rows = list(pages_of(plan(table), SETTINGS, StorageSpec()))

    assert [(r["page"], r["n_pages"], r["member"], r["status"]) for r in rows] == [
        (0, 5, "000000.jpg", "ok"), (1, 5, "000001.png", "ok"), (2, 5, "000002.webp", "ok"),
        (3, 5, None, "error"), (4, 5, "000004.jpg", "error")]
    assert rows[3]["error"] == "this row has no image (null)"
    assert rows[4]["error"].startswith("cannot decode image")
    for row, image in zip(rows, samples.values()):
        assert np.array_equal(page_image(row), page_image(next(pages_of(plan(image), SETTINGS, StorageSpec()))))


def test_a_binary_image_column_works_too_and_a_table_without_one_is_an_error_row(samples, tmp_path):
    jpgs = tmp_path / "jpgs.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": [samples["000000"].read_bytes()] * 2}), jpgs)
    rows = list(pages_of(plan(jpgs), SETTINGS, StorageSpec()))
    assert [(r["page"], r["member"], r["status"]) for r in rows] == [(0, None, "ok"), (1, None, "ok")]

    metadata = tmp_path / "metadata.parquet"
    pq.write_table(pa.table({"url": ["https://example.com/a.jpg"], "caption": ["a cat"]}), metadata)
    rows = list(pages_of(plan(metadata), SETTINGS, StorageSpec()))
    assert len(rows) == 1 and rows[0]["status"] == "error"
    assert rows[0]["error"].startswith("Parquet table has no image column")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_captions_of_a_shard_join_back_to_its_samples(samples, tiny_model, tmp_path, ray_local):
    inputs = tmp_path / "corpus"
    inputs.mkdir()
    make_shard(inputs / "shard-000.tar", samples, {"000003.jpg": b"truncated"})
    make_image_table(inputs / "table-000.parquet", samples)
    make_image(inputs / "loose.png")
    output = tmp_path / "captions"
    spec = spec_from_dict({
        "input": {"uri": str(inputs)}, "output": {"uri": str(output)},
        "model": {"id": str(tiny_model), "device": "cpu"},
        "tasks": [{"kind": "caption", "max_new_tokens": 4}], "resources": {"batch_size": 4},
    })
    first = run_job(spec)
    # 3 tar members, 3 table rows and the loose image; the truncated member
    assert (first.ok_rows, first.error_rows) == (7, 1)

    samples_json = tmp_path / "samples.json"  # the corpus's own index, keyed like WebDataset's __key__
    samples_json.write_text("\n".join(f'{{"key": "{key}"}}' for key in [*samples, "000003"]))
    joined = duckdb.sql(f"""
        SELECT s.key, r.status, r.page FROM read_json_auto('{samples_json}') s
        JOIN read_parquet('{output}/*.parquet') r ON r.member = s.key || regexp_extract(r.member, '\\.[a-z]+$')
        WHERE r.source_uri LIKE '%.tar' ORDER BY s.key""").fetchall()
    assert joined == [("000000", "ok", 0), ("000001", "ok", 1), ("000002", "ok", 2), ("000003", "error", 3)]
    loose = [r for r in read_rows(output) if r["member"] is None]
    assert [Path(r["source_uri"]).name for r in loose] == ["loose.png"]

    again = run_job(spec_from_dict({**spec.to_dict(), "run_id": ""}))
    assert (again.planned_inputs, again.rows_written) == (0, 0)  # every member is done: the shard is skipped


def test_inspect_counts_the_images_of_shards(samples, tmp_path, capsys):
    import json

    from scriptorium.jobs.cli import main

    make_shard(tmp_path / "shard-000.tar", samples)
    make_image_table(tmp_path / "train-00000.parquet", samples, [{"image": None, "caption": "no image"}])
    (tmp_path / "captions-only.tar").write_bytes(b"not a tar at all" * 64)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["by_type"][".tar"]["documents"] == 2 and report["pages"] == 3 + 4  # every row: one may fail
    assert [f["reason"].split(":")[0] for f in report["unreadable_files"]] == ["cannot open tar"]
