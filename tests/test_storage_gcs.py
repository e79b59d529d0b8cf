"""Google Cloud Storage end to end against fake-gcs-server, the GCS emulator, on loopback (tests/fake_gcs.py;
gcsfs is given its endpoint, nothing reaches Google): a listing that streams page by page, hidden names,
globs and include patterns, provenance, and a job from gs:// to local and gs://."""

from __future__ import annotations

import math

import pytest

from scriptorium.connectors.listing import LIST_PAGE, list_inputs
from scriptorium.connectors.storage import filesystem_for, fsspec_options, read_bytes
from scriptorium.core.spec import InputSpec, StorageSpec, spec_from_dict
from scriptorium.jobs.runner import run_job
from tests.conftest import make_image, make_pdf, read_rows, small_ocr_job
from tests.fake_gcs import FakeGcs
from tests.test_listing import GLOB_CASES

pytestmark = pytest.mark.slow

ARCHIVE = {
    "archive/a.pdf": b"%PDF a",
    "archive/sub/b.pdf": b"%PDF bb",
    "archive/sub/c.png": b"png ccc",
    "archive/_x/plan-000000.parquet": b"bookkeeping",  # `_` names: temporary or our own state
    "archive/_y.pdf": b"temporary",
    "archive/.y.pdf": b"hidden",
    "archive/empty-folder/": b"",  # a console-made "folder" placeholder, not an input
    "other/d.pdf": b"%PDF d",
}


@pytest.fixture(scope="module")
def gcs():
    server = FakeGcs()
    yield server
    server.close()


@pytest.fixture(scope="module")
def archive(gcs) -> str:
    bucket = gcs.new_bucket("listing")
    for name, body in ARCHIVE.items():
        gcs.put(bucket, name, body)
    return bucket


def options(gcs) -> StorageSpec:
    return StorageSpec(gcs_endpoint_url=gcs.endpoint, anon=True)  # what `[storage]` in a job spec sets


def listed(uri: str, gcs, **input_settings) -> list[dict]:
    return list(list_inputs(InputSpec(uri=uri, **input_settings), options(gcs)))


def test_a_large_prefix_is_listed_one_page_at_a_time(gcs):
    bucket = gcs.new_bucket("stream")
    names = [f"many/doc-{i:05d}.pdf" for i in range(2500)]
    for name in names:
        gcs.put(bucket, name, b"%PDF")
    gcs.put(bucket, "many-more/not-below-the-prefix.pdf", b"%PDF")

    def pages() -> list[dict]:  # full listing pages: flat (no delimiter), not the 1-result folder probe
        return [query for query in gcs.list_requests(bucket) if "delimiter" not in query]

    rows = list_inputs(InputSpec(uri=f"gs://{bucket}/many/"), options(gcs))
    first = next(rows)
    assert first["source_uri"] == f"gs://{bucket}/{names[0]}"
    assert len(pages()) == 1  # the first document is planned before the second page is asked for
    rest = list(rows)

    assert [r["source_uri"] for r in [first, *rest]] == [f"gs://{bucket}/{n}" for n in names]  # each once
    assert len(pages()) == math.ceil(len(names) / LIST_PAGE)
    assert [p.get("maxResults") for p in pages()] == [str(LIST_PAGE)] * 3
    assert [p.get("prefix") for p in pages()] == ["many/"] * 3
    assert "pageToken" not in pages()[0] and all(p.get("pageToken") for p in pages()[1:])
    assert {r["etag"] for r in [first, *rest]} == {gcs.resource(bucket, n)["etag"] for n in names}


def test_prefix_lists_every_object_below_it_with_size_and_version(archive, gcs):
    rows = listed(f"gs://{archive}/archive/", gcs)

    assert [r["source_uri"] for r in rows] == [f"gs://{archive}/archive/{k}" for k in ("a.pdf", "sub/b.pdf", "sub/c.png")]
    for row in rows:
        resource = gcs.resource(archive, row["source_uri"].split("/", 3)[3])
        assert (row["etag"], row["size"]) == (resource["etag"], int(resource["size"]))
        assert row["error"] is None
    assert [r["kind"] for r in rows] == ["pdf", "pdf", "image"]


def test_a_changed_object_gets_a_new_version(gcs):
    bucket = gcs.new_bucket("version")
    gcs.put(bucket, "scan.pdf", b"%PDF first")
    before = listed(f"gs://{bucket}/", gcs)[0]["etag"]
    gcs.put(bucket, "scan.pdf", b"%PDF second")  # a new generation: a rerun must redo it
    after = listed(f"gs://{bucket}/", gcs)[0]["etag"]
    assert before and after and before != after


@pytest.mark.parametrize("pattern, expected", GLOB_CASES)
def test_glob_selects_matching_names(archive, gcs, pattern, expected):
    rows = listed(f"gs://{archive}/{pattern}", gcs)
    assert [r["source_uri"] for r in rows] == [f"gs://{archive}/{name}" for name in expected]


def test_include_exclude_and_missing_prefix(archive, gcs):
    rows = listed(f"gs://{archive}/archive", gcs, include=["*.pdf", "*.png"], exclude=["sub/*.png"])
    assert [r["source_uri"] for r in rows] == [f"gs://{archive}/archive/a.pdf", f"gs://{archive}/archive/sub/b.pdf"]

    with pytest.raises(FileNotFoundError):
        listed(f"gs://{archive}/no-such-prefix/", gcs)


def test_the_endpoint_comes_from_the_job_or_from_storage_emulator_host(gcs, monkeypatch):
    bucket = gcs.new_bucket("endpoint")
    gcs.put(bucket, "a.txt", b"from the emulator")
    assert read_bytes(f"gs://{bucket}/a.txt", options(gcs)) == b"from the emulator"

    # An S3 endpoint is not a GCS one: a job may read from MinIO and from GCS at once.
    both = StorageSpec(endpoint_url="http://minio:9000", gcs_endpoint_url=gcs.endpoint)
    assert fsspec_options("gs", both)["endpoint_url"] == gcs.endpoint
    assert fsspec_options("s3", both)["client_kwargs"]["endpoint_url"] == "http://minio:9000"

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint.removeprefix("http://"))  # how Google's tools set it
    assert read_bytes(f"gs://{bucket}/a.txt", StorageSpec(anon=True)) == b"from the emulator"


def ocr_job(source: str, output: str, gcs, model) -> dict:
    return {**small_ocr_job(source, output, model), "storage": {"gcs_endpoint_url": gcs.endpoint, "anon": True}}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["local", "gs"])
def test_run_from_gcs_writes_every_page_once_and_a_rerun_does_nothing(target, gcs, tiny_model, ray_local, tmp_path):
    source = gcs.new_bucket("archive")
    gcs.put(source, "scans/letter.pdf", make_pdf(tmp_path / "letter.pdf", ["Dear reader,", "Yours."], size=(200, 260)).read_bytes())
    gcs.put(source, "scans/map.png", make_image(tmp_path / "map.png").read_bytes())
    gcs.put(source, "scans/2025/photo.jpg", make_image(tmp_path / "photo.jpg", size=(160, 120)).read_bytes())
    gcs.put(source, "scans/_partial.pdf", b"%PDF half an upload")  # hidden: never planned
    if target == "gs":
        bucket = gcs.new_bucket("results")
        output, fs, folder = f"gs://{bucket}/ocr", filesystem_for(f"gs://{bucket}", options(gcs))[0], f"{bucket}/ocr"
    else:
        output, fs, folder = str(tmp_path / "out"), None, str(tmp_path / "out")

    first = run_job(spec_from_dict(ocr_job(f"gs://{source}/scans/", output, gcs, tiny_model)))

    rows = read_rows(folder, filesystem=fs)
    expected = [(f"gs://{source}/scans/{name}", page)
                for name, page in [("2025/photo.jpg", 0), ("letter.pdf", 0), ("letter.pdf", 1), ("map.png", 0)]]
    assert sorted((r["source_uri"], r["page"]) for r in rows) == expected  # every page, each once
    assert {(r["status"], r["task"]) for r in rows} == {("ok", "ocr")}
    for row in rows:  # provenance: what the bucket says about each source
        resource = gcs.resource(source, row["source_uri"].split("/", 3)[3])
        assert (row["source_size"], row["source_etag"]) == (int(resource["size"]), resource["etag"])
    assert (first.planned_inputs, first.ok_rows) == (3, 4)

    again = run_job(spec_from_dict(ocr_job(f"gs://{source}/scans/", output, gcs, tiny_model)))  # same versions
    assert (again.planned_inputs, again.skipped_inputs, again.rows_written) == (0, 3, 0)
