"""Errors a user can act on: a missing model, an unreachable bucket, a bad job spec. Each ends the
command with exit status 2 and one line naming the problem and the fix, never a traceback, and an
unreachable endpoint is reported in seconds rather than after minutes of retries.

Run through the real command line, as a user meets them."""

from __future__ import annotations

import time

import pytest

from tests.conftest import free_port, make_image, one_line_error, run_cli

pytestmark = pytest.mark.slow

FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAUSERERRORTEST000", "AWS_SECRET_ACCESS_KEY": "user-error-test-fake-secret",
             "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
             "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-errors-in")
    make_image(folder / "page.png")
    return folder


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once, as with a wrong endpoint."""
    return free_port()


def test_missing_model_path(one_image, tmp_path):
    proc = run_cli("run", "--input", str(one_image), "--output", str(tmp_path / "out"), "--task", "ocr",
                   "--model", str(tmp_path / "no-such-model"))
    one_line_error(proc, f"model path {tmp_path / 'no-such-model'} does not exist", "scriptorium tiny-model DIR",
                   "hub id")


def test_unreachable_output_bucket_fails_fast(one_image, tiny_model, closed_port):
    started = time.monotonic()
    proc = run_cli("run", "--input", str(one_image), "--output", "s3://results-bucket/run", "--task", "ocr",
                   "--model", str(tiny_model), "--endpoint-url", f"http://127.0.0.1:{closed_port}", env=FAKE_KEYS)
    elapsed = time.monotonic() - started
    one_line_error(proc, "cannot reach output s3://results-bucket/run", "check --endpoint-url")
    assert elapsed < 30, f"took {elapsed:.0f} s"  # the job's own retries would take minutes


def test_unreachable_input_bucket_fails_fast(tiny_model, tmp_path, closed_port):
    started = time.monotonic()
    proc = run_cli("run", "--input", "s3://scans-bucket/2026/", "--output", str(tmp_path / "out"), "--task", "ocr",
                   "--model", str(tiny_model), "--endpoint-url", f"http://127.0.0.1:{closed_port}", env=FAKE_KEYS)
    one_line_error(proc, "cannot reach input s3://scans-bucket/2026/", "check --endpoint-url")
    assert time.monotonic() - started < 30


def test_bucket_without_credentials(tiny_model, tmp_path, closed_port):
    no_keys = {**FAKE_KEYS, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""}
    proc = run_cli("run", "--input", "s3://scans-bucket/2026/", "--output", str(tmp_path / "out"), "--task", "ocr",
                   "--model", str(tiny_model), "--endpoint-url", f"http://127.0.0.1:{closed_port}", env=no_keys)
    one_line_error(proc, "cannot reach input s3://scans-bucket/2026/", "no credentials found", "--anon")


JOB = ('[input]\nuri = "{input}"\n[output]\nuri = "{output}"\n[model]\nid = "{model}"\n{model_extra}'
       '[resources]\n{resources}[[tasks]]\n{task}\n')


@pytest.mark.parametrize("change, fragments", [
    ({"model_extra": 'idd = "x"\n'}, ["unknown setting(s) in [model]: idd (did you mean id?)"]),
    ({"task": 'knid = "ocr"'}, ["unknown setting(s) in [tasks]: knid (did you mean kind?)"]),
    ({"resources": "batch_size = = 4\n"}, ["is not valid TOML", "(at line 8, column 14)"]),
    ({"resources": 'batch_size = "eight"\n'}, ["[resources] batch_size = 'eight' should be a whole number"]),
    ({"task": 'kind = "ocr"\nmax_new_tokens = 0'}, ["task 'ocr': max_new_tokens must be >= 1"]),
    ({"task": 'kind = "translate"'}, ["tasks.kind = 'translate' is not one of ocr, caption, qa"]),
], ids=["unknown-key", "unknown-task-key", "toml-syntax", "wrong-type", "bad-value", "bad-choice"])
def test_bad_job_spec(change, fragments, one_image, tmp_path, tiny_model):
    job = tmp_path / "job.toml"
    values = {"input": one_image, "output": tmp_path / "out", "model": tiny_model,
              "model_extra": "", "resources": "", "task": 'kind = "ocr"', **change}
    job.write_text(JOB.format(**values))
    proc = run_cli("run", "--job", str(job))
    one_line_error(proc, *fragments)
    assert not (tmp_path / "out").exists()  # refused before anything was started


def test_missing_job_file(tmp_path):
    proc = run_cli("run", "--job", str(tmp_path / "nope.toml"))
    one_line_error(proc, f"job spec {tmp_path / 'nope.toml'} does not exist")
