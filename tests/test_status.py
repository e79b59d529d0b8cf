"""`scriptorium status OUTPUT` (jobs/status.py): whether a run holds the output's lease, what it has
published, its rate and ETA, and the exit status a scheduler acts on.

Against real runs (`scriptorium run` drivers, slow): a run in progress on a local folder (its lease live,
part of its output published) and then finished, and one on S3 (SeaweedFS) in progress and then killed,
which leaves a stale lease. Without a process (fast): outputs laid out by hand as a run leaves them: a
lease of a host whose heartbeat stopped, a run that stopped before its summary, an output with nothing in it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scriptorium.connectors.lease import LeaseRecord, LocalLeaseFile
from scriptorium.connectors.namespace import LEASE_FILE
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.errors import SpecError
from scriptorium.core.schema import RESULT_SCHEMA, table_from_rows
from scriptorium.jobs.status import format_status, output_status
from tests.conftest import REPO, driver_job_toml, make_pdf, run_cli


# -- outputs laid out by hand ---------------------------------------------------------------------------
def publish_rows(store: ParquetStore, run_id: str, pages: dict[str, int], errors: int = 0) -> None:
    """One published file of `run_id` with an OCR row per page of each source (the first `errors` rows
    are errors)."""
    rows = [{"source_uri": f"/in/{name}", "page": page, "n_pages": n, "task": "ocr", "status": "ok", "run_id": run_id,
             "n_input_tokens": 10, "n_output_tokens": 3}
            for name, n in pages.items() for page in range(n)]
    for row in rows[:errors]:
        row.update(status="error", stage="render", error="render: cannot open PDF")
    store.publish(table_from_rows(rows, RESULT_SCHEMA), f"part-{run_id}-000000-0123abcd.parquet")
    store.record_own_files(run_id)


def write_record(store: ParquetStore, run_id: str, name: str, record: dict) -> None:
    store.fs.pipe_file(f"{store.root}/_runs/{run_id}/{name}", json.dumps(record).encode())


def plan_record(run_id: str, planned: float, documents: int, token: str = "0123456789ab") -> dict:
    return {"kind": "plan", "run_id": run_id, "token": token, "started": planned - 5, "planned": planned,
            "documents": {"planned": documents, "skipped_complete": 0}, "before": {"documents": 0, "pages": 0},
            "lease_timeout_s": 120.0}


def plant_lease(store: ParquetStore, **fields) -> LeaseRecord:
    now = time.time()
    record = LeaseRecord(**{"run_id": "nightly", "host": "ray-head-7f9c", "pid": 4242, "machine": "another-machine",
                            "pid_start": "1", "started": now - 600, "heartbeat": now - 3, "token": "0123456789ab",
                            "timeout_s": 120.0, **fields})
    assert LocalLeaseFile(f"{store.root}/{LEASE_FILE}", "planter").create(record.to_bytes()) is not None
    return record


def test_a_live_lease_of_another_host_is_a_running_run_with_its_rate_and_eta(tmp_path):
    store = ParquetStore(str(tmp_path / "out"))
    publish_rows(store, "nightly", {"a.pdf": 3, "b.pdf": 2}, errors=1)
    write_record(store, "nightly", "plan.json", plan_record("nightly", time.time() - 100, documents=20))
    plant_lease(store)

    status = output_status(store)

    assert status["state"] == "running" and status["exit_code"] == 3
    assert status["lease"]["run_id"] == "nightly" and status["lease"]["host"] == "ray-head-7f9c"
    assert 2 <= status["lease"]["heartbeat_age_s"] < 30 and status["lease"]["stale_reason"] is None
    run = status["run"]
    assert run["pages"] == {"total": 5, "ok": 4, "error": 1}
    assert run["rows"]["by_status"] == {"error": 1, "ok": 4}
    attempt = run["attempt"]
    assert attempt["documents"] == 2 and attempt["documents_planned"] == 20 and attempt["pages"] == 5
    assert attempt["pages_per_s"] == pytest.approx(0.05, rel=0.1)
    assert attempt["eta_s"] == pytest.approx(900, rel=0.1)  # 2 of 20 documents in 100 s: 18 more in 900 s
    text = format_status(status)
    assert text.startswith(f"output {store.uri}: running, run nightly (host ray-head-7f9c, pid 4242, heartbeat")
    assert "docs 2/20 | ETA 15:0" in text and "pages       5 (4 ok, 1 with errors)" in text


def test_a_lease_whose_heartbeat_stopped_is_reported_stale(tmp_path):
    store = ParquetStore(str(tmp_path / "out"))
    publish_rows(store, "nightly", {"a.pdf": 2})
    write_record(store, "nightly", "plan.json", plan_record("nightly", time.time() - 1000, documents=4))
    plant_lease(store, heartbeat=time.time() - 400)

    status = output_status(store)

    assert status["state"] == "stale" and status["exit_code"] == 4
    assert status["lease"]["stale_reason"] == "its last heartbeat is 400 s old (output.lease_timeout_s = 120)"
    assert status["run"]["attempt"] is None and status["run"]["pages"]["total"] == 2
    assert "lease       left by run nightly (host ray-head-7f9c" in format_status(status)


def test_a_lease_of_an_older_scriptorium_is_judged_by_the_timeout_given(tmp_path):
    store = ParquetStore(str(tmp_path / "out"))
    plant_lease(store, heartbeat=time.time() - 400, timeout_s=0.0)  # no timeout recorded

    assert output_status(store)["state"] == "stale"  # the default, 120 s
    assert output_status(store, lease_timeout_s=600)["state"] == "running"


def test_a_run_that_ended_without_its_summary_is_stopped_and_one_with_it_finished(tmp_path):
    store = ParquetStore(str(tmp_path / "out"))
    publish_rows(store, "first", {"a.pdf": 2})
    planned = time.time() - 50
    write_record(store, "first", "plan.json", plan_record("first", planned, documents=2))

    stopped = output_status(store)
    assert (stopped["state"], stopped["exit_code"], stopped["lease"]) == ("stopped", 5, None)
    assert "rerun it with --run-id first to resume" in format_status(stopped)

    finished_at = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(planned + 20))
    write_record(store, "first", "summary.json", {"kind": "run", "run_id": "first", "finished_at": finished_at,
                                                  "started_at": finished_at, "wall_s": 25.0, "throughput": {}})
    finished = output_status(store)
    assert (finished["state"], finished["exit_code"]) == ("finished", 0)
    assert finished["run"]["pages"]["total"] == 2 and finished["run"]["summary"]["wall_s"] == 25.0

    write_record(store, "first", "plan.json", plan_record("first", planned + 60, documents=2))  # resumed, then died
    assert output_status(store)["state"] == "stopped"


def test_an_output_without_results_is_an_error_naming_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="holds no Scriptorium results and no run is writing to it"):
        output_status(ParquetStore(str(tmp_path / "empty")))


# -- real runs ------------------------------------------------------------------------------------------
DOCUMENTS, PAGES = 3, 4
@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("status-inputs")
    for number in range(DOCUMENTS):
        make_pdf(folder / f"doc{number}.pdf", [f"document {number}, page {p}" for p in range(PAGES)], size=(200, 260))
    return folder


def start_driver(job: Path, input_uri: str, output_uri: str, model: Path, log: Path, *extra: str) -> subprocess.Popen:
    args = ["run", "--job", str(job), "--input", input_uri, "--output", output_uri, "--task", "ocr",
            "--model", str(model), "--max-new-tokens", "48", *extra]
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "scriptorium.jobs.cli", *args], cwd=REPO, stdout=handle,
                                stderr=handle, start_new_session=True)


def status_of(output: str, *flags: str) -> tuple[int, dict, str]:
    """`scriptorium status OUTPUT --json` and the text one: (exit status, the JSON, the text)."""
    as_json = run_cli("status", output, "--json", *flags, timeout=120)
    as_text = run_cli("status", output, *flags, timeout=120)
    assert as_json.returncode == as_text.returncode, (as_json.stderr, as_text.stderr)
    assert "Traceback" not in as_json.stderr + as_text.stderr, as_json.stderr + as_text.stderr
    return as_json.returncode, json.loads(as_json.stdout), as_text.stdout


def wait_for_published_rows(published, driver: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600
    while not published():
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "nothing published in 600 s"
        time.sleep(0.2)


def status_while_paused(driver: subprocess.Popen, output: str, *flags: str) -> tuple[int, dict, str]:
    """The status of a run caught mid-way: its driver is paused (SIGSTOP, the driver alone: Ray's
    processes go on) while both statuses are taken, so a quick run cannot end in between."""
    os.kill(driver.pid, signal.SIGSTOP)
    try:
        return status_of(output, *flags)
    finally:
        os.kill(driver.pid, signal.SIGCONT)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_status_of_a_local_run_while_it_runs_and_once_it_finished(documents, tiny_model, tmp_path):
    job, output = tmp_path / "job.toml", tmp_path / "out"
    job.write_text(driver_job_toml(rows_per_file=2))
    driver = start_driver(job, str(documents), str(output), tiny_model, tmp_path / "run.log", "--run-id", "watched")
    try:
        wait_for_published_rows(lambda: list(output.glob("part-*.parquet")), driver, tmp_path / "run.log")
        code, running, text = status_while_paused(driver, str(output))
    finally:
        finished_code = driver.wait(timeout=600)
    assert finished_code == 0, (tmp_path / "run.log").read_text()[-3000:]

    assert code == 3 and running["state"] == "running", running
    lease = running["lease"]
    assert (lease["run_id"], lease["host"], lease["pid"]) == ("watched", socket.gethostname(), driver.pid)
    assert lease["heartbeat_age_s"] < lease["timeout_s"] / 2 and lease["stale_reason"] is None
    run = running["run"]
    assert run["run_id"] == "watched" and run["plan"]["documents"] == {"planned": DOCUMENTS, "skipped_complete": 0}
    assert 2 <= run["pages"]["total"] < DOCUMENTS * PAGES and run["rows"]["by_status"]["ok"] >= 2  # partial: published so far
    assert run["attempt"]["pages_per_s"] > 0 and run["attempt"]["documents_planned"] == DOCUMENTS
    assert text.startswith(f"output {output}: running, run watched (host {socket.gethostname()}, pid {driver.pid}")

    code, finished, text = status_of(str(output))
    assert code == 0 and finished["state"] == "finished" and finished["lease"] is None
    assert finished["run"]["pages"] == {"total": DOCUMENTS * PAGES, "ok": DOCUMENTS * PAGES, "error": 0}
    assert finished["run"]["rows"]["total"] == DOCUMENTS * PAGES and finished["run"]["summary"]["wall_s"] > 0
    assert text.startswith(f"output {output}: finished, run watched finished ")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_status_on_s3_while_a_run_runs_and_after_it_was_killed(documents, tiny_model, tmp_path, s3_server):
    bucket = s3_server.new_bucket("status")
    for path in sorted(documents.iterdir()):
        s3_server.put(bucket, f"in/{path.name}", path)
    job = tmp_path / "job.toml"
    job.write_text(driver_job_toml(rows_per_file=2) + f'[storage]\nendpoint_url = "{s3_server.endpoint}"\n')
    output = f"s3://{bucket}/out"
    driver = start_driver(job, f"s3://{bucket}/in/", output, tiny_model, tmp_path / "run.log", "--run-id", "on-s3")
    try:
        wait_for_published_rows(lambda: s3_server.client.list_objects_v2(Bucket=bucket, Prefix="out/part-")
                                .get("KeyCount"), driver, tmp_path / "run.log")
        code, running, _ = status_while_paused(driver, output, "--endpoint-url", s3_server.endpoint)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started: the lease stays
        driver.wait()

    assert code == 3 and running["state"] == "running" and running["lease"]["run_id"] == "on-s3", running
    assert running["run"]["plan"]["documents"]["planned"] == DOCUMENTS and running["run"]["pages"]["total"] >= 2

    code, stale, text = status_of(output, "--endpoint-url", s3_server.endpoint)
    assert code == 4 and stale["state"] == "stale", stale
    assert stale["lease"]["stale_reason"] == f"its process (pid {driver.pid}) no longer runs on this machine"
    assert stale["run"]["pages"]["total"] >= 2 and stale["run"]["attempt"] is None
    assert f"lease       left by run on-s3 (host {socket.gethostname()}, pid {driver.pid}" in text
    assert s3_server.client.head_object(Bucket=bucket, Key=f"out/{LEASE_FILE}")  # status only reads

