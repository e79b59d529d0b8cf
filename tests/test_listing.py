"""Input selection against a real S3 API (moto on loopback) and the local disk: prefixes, globs,
include/exclude, size limits, provenance (ETag / mtime), and a listing that streams page by page."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from scriptorium.connectors.listing import LIST_PAGE, list_inputs
from scriptorium.core.spec import InputSpec, StorageSpec
from tests.conftest import StoreProxy

ARCHIVE = {
    "archive/a.pdf": b"%PDF a",
    "archive/sub/b.pdf": b"%PDF bb",
    "archive/sub/c.png": b"png ccc",
    "archive/_work/plan-000000.parquet": b"bookkeeping",  # `_` names: temporary or our own state
    "archive/.hidden.pdf": b"hidden",
    "archive/empty-folder/": b"",  # a console-made "folder" placeholder, not an input
    "other/d.pdf": b"%PDF d",
}


@pytest.fixture(scope="module")
def archive(s3_server) -> str:
    bucket = s3_server.new_bucket("listing")
    for key, body in ARCHIVE.items():
        s3_server.put(bucket, key, body)
    return bucket


def listed(uri: str, s3_server, **input_settings) -> list[dict]:
    return list(list_inputs(InputSpec(uri=uri, **input_settings), StorageSpec(endpoint_url=s3_server.endpoint)))


@pytest.mark.slow
def test_prefix_lists_every_object_below_it_with_size_and_etag(archive, s3_server):
    rows = listed(f"s3://{archive}/archive/", s3_server)

    assert [r["source_uri"] for r in rows] == [f"s3://{archive}/archive/{k}" for k in ("a.pdf", "sub/b.pdf", "sub/c.png")]
    for row in rows:
        head = s3_server.client.head_object(Bucket=archive, Key=row["source_uri"].split("/", 3)[3])
        assert row["etag"] == head["ETag"].strip('"')
        assert row["size"] == head["ContentLength"]
        assert row["error"] is None and row["questions"] is None
    assert [r["kind"] for r in rows] == ["pdf", "pdf", "image"]


# Globs over the ARCHIVE layout and the names they select (tests/test_storage_gcs.py runs them on gs://).
GLOB_CASES = [
    ("archive/**/*.pdf", ["archive/a.pdf", "archive/sub/b.pdf"]),
    ("archive/*.pdf", ["archive/a.pdf"]),
    ("arch*/sub/*", ["archive/sub/b.pdf", "archive/sub/c.png"]),
    ("archive/sub/?.png", ["archive/sub/c.png"]),
    ("*/**/*.pdf", ["archive/a.pdf", "archive/sub/b.pdf", "other/d.pdf"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("pattern, expected", GLOB_CASES)
def test_glob_selects_matching_keys(archive, s3_server, pattern, expected):
    rows = listed(f"s3://{archive}/{pattern}", s3_server)
    assert [r["source_uri"] for r in rows] == [f"s3://{archive}/{key}" for key in expected]


@pytest.mark.slow
def test_include_exclude_and_size_limit(archive, s3_server):
    rows = listed(f"s3://{archive}/archive", s3_server, include=["*.pdf", "*.png"], exclude=["sub/*.png"])
    assert [r["source_uri"] for r in rows] == [f"s3://{archive}/archive/a.pdf", f"s3://{archive}/archive/sub/b.pdf"]

    rows = listed(f"s3://{archive}/archive", s3_server, max_size_mb=6.5 / 1024 / 1024)  # 6.5 bytes
    too_large = {r["source_uri"].rsplit("/", 1)[-1]: r["error"] for r in rows if r["error"]}
    assert len(rows) == 3  # too large is an error row, not a silently dropped input
    assert set(too_large) == {"b.pdf", "c.png"}  # 7 bytes each; a.pdf has 6
    assert too_large["c.png"].startswith("file is 7 bytes, more than input.max_size_mb=")


@pytest.mark.slow
def test_missing_prefix_is_reported_not_an_empty_job(archive, s3_server):
    with pytest.raises(FileNotFoundError):
        listed(f"s3://{archive}/no-such-prefix/", s3_server)


@pytest.mark.slow
def test_listing_streams_a_large_prefix_one_page_at_a_time(s3_server):
    bucket = s3_server.new_bucket("stream")
    keys = [f"many/doc-{i:05d}.pdf" for i in range(LIST_PAGE + 1)]  # two ListObjectsV2 pages
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3_server.put(bucket, key, b"%PDF"), keys))
    with StoreProxy(s3_server.endpoint) as proxy:  # records every request the lister makes
        rows = list_inputs(InputSpec(uri=f"s3://{bucket}/many/"), StorageSpec(endpoint_url=proxy.endpoint))

        def page_requests() -> int:  # full listing pages, not the 1-key probe that tells a folder from a file
            return sum("list-type=2" in path and "max-keys=1&" not in path + "&" for _, path in proxy.requests)

        first = next(rows)
        assert first["source_uri"] == f"s3://{bucket}/{keys[0]}"
        assert page_requests() == 1  # the first document is planned before the second page is fetched
        rest = list(rows)
        assert page_requests() == 2
        assert [r["source_uri"] for r in [first, *rest]] == [f"s3://{bucket}/{k}" for k in keys]


def test_local_folder_and_glob_use_mtime_as_version(tmp_path):
    (tmp_path / "scans" / "2024").mkdir(parents=True)
    first = tmp_path / "scans" / "a.pdf"
    first.write_bytes(b"%PDF 1")
    (tmp_path / "scans" / "2024" / "b.png").write_bytes(b"png")
    (tmp_path / "scans" / "_tmp.pdf").write_bytes(b"partial")

    rows = list(list_inputs(InputSpec(uri=str(tmp_path / "scans")), StorageSpec()))
    assert [r["source_uri"] for r in rows] == [str(tmp_path / "scans" / "a.pdf"), str(tmp_path / "scans" / "2024" / "b.png")]
    assert rows[0]["etag"] == f"mtime:{os.stat(first).st_mtime}"
    assert rows[0]["size"] == 6

    os.utime(first, (1_700_000_000, 1_700_000_000))  # the source changed: its version must change
    rows = list(list_inputs(InputSpec(uri=f"file://{tmp_path}/scans/**/*.pdf"), StorageSpec()))
    assert [(r["source_uri"], r["etag"]) for r in rows] == [(str(first), "mtime:1700000000.0")]


def test_a_file_name_that_is_not_utf8_is_an_error_row_not_a_crashed_plan(tmp_path):
    import pyarrow as pa

    from scriptorium.core.schema import PLAN_SCHEMA, table_from_rows

    folder = os.fsencode(tmp_path)
    open(os.path.join(folder, b"caf\xe9.png"), "wb").write(b"png")  # a Latin-1 name from an old archive
    open(os.path.join(folder, b"receipt.png"), "wb").write(b"png")
    rows = list(list_inputs(InputSpec(uri=str(tmp_path)), StorageSpec()))
    table_from_rows(rows, PLAN_SCHEMA)  # the plan file can be written: every string is UTF-8
    bad = next(r for r in rows if "caf" in r["source_uri"])
    assert bad["source_uri"].endswith("caf\\xe9.png") and "not valid UTF-8" in bad["error"]
    assert next(r for r in rows if r["source_uri"].endswith("receipt.png"))["error"] is None
    assert isinstance(pa.array([bad["source_uri"]]), pa.Array)
