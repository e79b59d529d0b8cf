"""Object storage end to end against a real S3 server on loopback (SeaweedFS; every client is given its
endpoint, nothing reaches a cloud): URI resolution, retries, missing objects, unusable outputs,
`scriptorium run` from s3:// to s3://, and credentials that never leak. Access denied by a policy is
injected with moto's IAM (the `moto_server` fixture), a fault SeaweedFS cannot be asked for; moto also
gives AWS's own answer to a missing bucket."""

from __future__ import annotations

import json
import urllib.request
import uuid
from contextlib import contextmanager
from typing import Iterator

import pyarrow.parquet as pq
import pytest
import s3fs

from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.connectors.storage import filesystem_for, fsspec_options, read_bytes, uri_for
from scriptorium.core.errors import OutputError
from scriptorium.core.spec import StorageSpec
from tests.conftest import StoreProxy, make_image, make_pdf, one_line_error, run_cli

SLOW_DOWN = (503, b'<?xml version="1.0" encoding="UTF-8"?>\n'
                  b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")


@pytest.mark.parametrize(
    "uri, protocol, path",
    [
        ("s3://bucket/archive/a.pdf", "s3", "bucket/archive/a.pdf"),
        ("s3a://bucket/a.pdf", "s3", "bucket/a.pdf"),
        ("gs://bucket/scans/b.png", "gs", "bucket/scans/b.png"),
        ("memory://scratch/c.pdf", "memory", "/scratch/c.pdf"),
        ("file:///data/d.pdf", "file", "/data/d.pdf"),
        ("/data/e.pdf", "file", "/data/e.pdf"),
    ],
)
def test_every_kind_of_uri_resolves_to_a_filesystem_and_back(uri, protocol, path):
    fs, inner = filesystem_for(uri, StorageSpec(endpoint_url="http://127.0.0.1:9", anon=True))
    assert protocol in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)
    assert inner == path
    assert filesystem_for(uri_for(fs, inner), StorageSpec(endpoint_url="http://127.0.0.1:9", anon=True))[1] == path


def test_plain_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert filesystem_for("scans/a.pdf")[1] == str(tmp_path / "scans" / "a.pdf")


@pytest.mark.slow
def test_endpoint_and_region_come_from_the_environment_unless_the_job_sets_them(s3_server, monkeypatch):
    bucket = s3_server.new_bucket("env")
    s3_server.put(bucket, "a.txt", b"from the environment")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")

    assert read_bytes(f"s3://{bucket}/a.txt") == b"from the environment"  # no [storage] section at all
    options = fsspec_options("s3", StorageSpec(endpoint_url="http://minio:9000", region="us-east-1", profile="p", anon=True))
    assert options["client_kwargs"] == {"endpoint_url": "http://minio:9000", "region_name": "us-east-1"}
    assert (options["profile"], options["anon"]) == ("p", True)
    assert fsspec_options("s3", StorageSpec())["client_kwargs"]["region_name"] == "eu-west-3"


@pytest.mark.slow
def test_throttled_reads_are_retried_and_missing_objects_are_not(s3_server):
    bucket = s3_server.new_bucket("retry")
    s3_server.put(bucket, "scan.pdf", b"%PDF-1.7 bytes")
    with StoreProxy(s3_server.endpoint) as proxy:  # a busy endpoint: the next two requests get 503 SlowDown
        options = StorageSpec(endpoint_url=proxy.endpoint)
        assert read_bytes(f"s3://{bucket}/scan.pdf", options) == b"%PDF-1.7 bytes"
        clean_read = len(proxy.requests)

        proxy.requests.clear()
        proxy.failures = [SLOW_DOWN, SLOW_DOWN]
        assert read_bytes(f"s3://{bucket}/scan.pdf", options) == b"%PDF-1.7 bytes"
        assert len(proxy.requests) == clean_read + 2  # both throttled requests were sent again

        proxy.requests.clear()
        with pytest.raises(FileNotFoundError, match=f"no such object: s3://{bucket}/gone.pdf"):
            read_bytes(f"s3://{bucket}/gone.pdf", options)
        assert len(set(proxy.requests)) == len(proxy.requests)  # a permanent error is never asked again


@pytest.mark.slow
def test_stores_without_their_own_retries_get_the_generic_one(s3_server):
    """Plain HTTPS inputs (e.g. in a manifest) have no client-side retries; read_bytes adds them."""
    bucket = s3_server.new_bucket("http")
    s3_server.client.put_object(Bucket=bucket, Key="page.png", Body=b"png bytes", ACL="public-read")
    with StoreProxy(s3_server.endpoint) as proxy:
        proxy.failures = [(503, b"busy"), (429, b"slow down")]
        assert read_bytes(f"{proxy.endpoint}/{bucket}/page.png") == b"png bytes"
        assert len(proxy.requests) == 3
        proxy.requests.clear()
        with pytest.raises(FileNotFoundError):
            read_bytes(f"{proxy.endpoint}/{bucket}/nothing.png")
        assert len(proxy.requests) == 1


@contextmanager
def iam_enforced(moto_server, deny: list[dict]) -> Iterator[dict]:
    """Switch on moto's IAM checks for a new user allowed s3:* except the `deny` statements.

    Yields that user's credentials (a moto-generated secret). Everything inside must use them.
    """
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    user = f"reader-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}, *deny]}
    iam.put_user_policy(UserName=user, PolicyName="archive", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def set_auth(count: bytes) -> None:
        request = urllib.request.Request(f"{moto_server.endpoint}/moto-api/reset-auth", data=count,
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request).close()

    set_auth(b"0")
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients hold the old credentials
    try:
        yield {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        set_auth(b"inf")
        s3fs.S3FileSystem.clear_instance_cache()


def deny(action: str, resource: str) -> dict:
    return {"Effect": "Deny", "Action": action, "Resource": f"arn:aws:s3:::{resource}"}


def test_forbidden_object_and_unwritable_output_are_reported_clearly(moto_server, monkeypatch):
    bucket = moto_server.new_bucket("iam")
    moto_server.put(bucket, "private/secret.pdf", b"%PDF secret")
    with iam_enforced(moto_server, [deny("s3:GetObject", f"{bucket}/private/*"),
                                  deny("s3:PutObject", f"{bucket}/locked/*")]) as credentials:
        for name, value in credentials.items():
            monkeypatch.setenv(name, value)
        options = StorageSpec(endpoint_url=moto_server.endpoint)

        with pytest.raises(PermissionError, match=f"access denied: s3://{bucket}/private/secret.pdf"):
            read_bytes(f"s3://{bucket}/private/secret.pdf", options)
        with pytest.raises(OutputError, match=f"cannot write to output s3://{bucket}/locked/results: PermissionError"):
            ParquetStore(f"s3://{bucket}/locked/results", options).ensure_writable()
        ParquetStore(f"s3://{bucket}/open/results", options).ensure_writable()  # the rest of the bucket is fine


def read_results(s3_server, uri: str):
    """The published results, read back from the bucket by pyarrow (which wants no `s3://`)."""
    return pq.read_table(uri.removeprefix("s3://"), filesystem=s3_server.filesystem())


def everything_stored_under(s3_server, bucket: str) -> bytes:
    fs = s3_server.filesystem()
    return b"".join(fs.cat_file(path) for path in fs.find(bucket))


@pytest.mark.slow
def test_run_from_s3_to_s3_publishes_every_page_once(s3_server, tiny_model, tmp_path):
    source, target = s3_server.new_bucket("archive"), s3_server.new_bucket("results")
    s3_server.put(source, "scans/2024/letter.pdf", make_pdf(tmp_path / "letter.pdf", ["Dear reader,", "Yours."]))
    s3_server.put(source, "scans/2024/map.png", make_image(tmp_path / "map.png"))
    s3_server.put(source, "scans/2025/deed.pdf", make_pdf(tmp_path / "deed.pdf", ["Deed of sale"]))
    secret = f"scriptorium-DO-NOT-LEAK-{uuid.uuid4().hex}"
    command = ["run", "--input", f"s3://{source}/scans/", "--output", f"s3://{target}/ocr",
               "--endpoint-url", s3_server.endpoint, "--model", str(tiny_model), "--task", "ocr",
               "--max-new-tokens", "4"]

    done = run_cli(*command, env={"AWS_SECRET_ACCESS_KEY": secret})

    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_results(s3_server, f"s3://{target}/ocr").to_pylist()
    expected = [(f"s3://{source}/scans/{name}", page)
                for name, page in [("2024/letter.pdf", 0), ("2024/letter.pdf", 1), ("2024/map.png", 0), ("2025/deed.pdf", 0)]]
    assert sorted((r["source_uri"], r["page"]) for r in rows) == expected  # every page, each once
    assert {(r["status"], r["task"]) for r in rows} == {("ok", "ocr")}
    for row in rows:  # provenance: what the bucket says about each source
        head = s3_server.client.head_object(Bucket=source, Key=row["source_uri"].split("/", 3)[3])
        assert (row["source_size"], row["source_etag"]) == (head["ContentLength"], head["ETag"].strip('"'))
    assert secret not in done.stdout + done.stderr
    assert secret.encode() not in everything_stored_under(s3_server, target)
    assert secret not in json.dumps(rows, default=str)

    again = run_cli(*command, env={"AWS_SECRET_ACCESS_KEY": secret})  # same ETags: nothing to redo
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 inputs processed, 3 already done" in again.stdout
    assert read_results(s3_server, f"s3://{target}/ocr").num_rows == len(rows)


@pytest.mark.slow
def test_manifest_run_records_missing_and_forbidden_objects_as_error_rows(moto_server, tiny_model, tmp_path):
    bucket = moto_server.new_bucket("manifest-run")
    moto_server.put(bucket, "docs/a.pdf", make_pdf(tmp_path / "a.pdf", ["Minutes of the meeting"]))
    moto_server.put(bucket, "docs/forbidden.pdf", make_pdf(tmp_path / "f.pdf", ["Restricted"]))
    manifest = "".join(json.dumps({"uri": u}) + "\n" for u in ["../docs/a.pdf", "../docs/missing.pdf", "../docs/forbidden.pdf"])
    moto_server.put(bucket, "lists/batch.jsonl", manifest.encode())

    job = tmp_path / "job.toml"  # this time the settings come from a job spec, [storage] included
    job.write_text(f"""
[input]
uri = "s3://{bucket}/lists/batch.jsonl"
manifest = true
[output]
uri = "s3://{bucket}/results"
[storage]
endpoint_url = "{moto_server.endpoint}"
[model]
id = "{tiny_model}"
[[tasks]]
kind = "ocr"
max_new_tokens = 4
""")

    with iam_enforced(moto_server, [deny("s3:GetObject", f"{bucket}/docs/forbidden.pdf")]) as credentials:
        done = run_cli("run", "--job", str(job), env=credentials)

    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["source_uri"].rsplit("/", 1)[-1]: r for r in read_results(moto_server, f"s3://{bucket}/results").to_pylist()}
    assert sorted(rows) == ["a.pdf", "forbidden.pdf", "missing.pdf"]
    assert rows["a.pdf"]["status"] == "ok"
    for name, reason in [("missing.pdf", "no such object"), ("forbidden.pdf", "access denied")]:
        assert (rows[name]["status"], rows[name]["stage"]) == ("error", "read")
        assert rows[name]["error"].startswith(f"cannot read: {reason}: s3://{bucket}/docs/{name}")
    secret = credentials["AWS_SECRET_ACCESS_KEY"]
    assert secret not in done.stdout + done.stderr
    assert secret not in json.dumps(list(rows.values()), default=str)


@pytest.mark.slow
def test_missing_output_bucket_stops_the_job_with_one_clear_line(moto_server, tiny_model, tmp_path):
    """AWS answers a write to a missing bucket with NoSuchBucket, as moto does (SeaweedFS: AccessDenied)."""
    source = moto_server.new_bucket("input")
    moto_server.put(source, "a.png", make_image(tmp_path / "a.png"))
    missing = f"no-such-bucket-{uuid.uuid4().hex[:6]}"

    done = run_cli("run", "--input", f"s3://{source}/", "--output", f"s3://{missing}/results",
                   "--endpoint-url", moto_server.endpoint, "--model", str(tiny_model), "--task", "ocr")

    assert one_line_error(done) == (f"scriptorium: error: cannot write to output s3://{missing}/results: "
                                    "FileNotFoundError: The specified bucket does not exist")
    assert missing not in [b["Name"] for b in moto_server.client.list_buckets()["Buckets"]]  # not created behind our back
