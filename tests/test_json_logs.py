"""Structured logs (jobs/logs.py): with `--log-format json` every line a run's driver writes is one JSON
object with its time, level, run id and event, the stages' warnings on Ray workers included, and none
holds a secret of the signed-URL manifest it runs (tests/test_signed_urls.py's). Without a process: the
formatter, the lines forwarded from workers, and what a worker's setup hook sets up."""

from __future__ import annotations

import json
import logging

import pytest

from scriptorium.jobs import logs
from tests.conftest import run_cli
from tests.test_signed_urls import SECRETS, FileServer, leaked, serve_documents, signed_urls


@pytest.fixture
def json_run_id():
    saved = dict(logs._state)
    logs._state.update(format="json", run_id="nightly-7")
    yield "nightly-7"
    logs._state.update(saved)


def test_a_log_record_is_one_redacted_json_line_with_its_event_and_fields(json_run_id):
    url = signed_urls("http://127.0.0.1:9")["a.pdf"]
    record = logging.LogRecord("scriptorium.storage", logging.WARNING, __file__, 1, "cannot read %s", (url,), None)
    record.event, record.fields = "read.retry", {"uri": url, "attempt": 2}

    line = logs.JsonFormatter().format(record)

    assert "\n" not in line and leaked(line) == []
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["run_id"] == "nightly-7" and entry["event"] == "read.retry"
    assert entry["message"] == "cannot read http://127.0.0.1:9/a.pdf" and entry["logger"] == "scriptorium.storage"
    assert entry["fields"] == {"uri": "http://127.0.0.1:9/a.pdf", "attempt": 2}
    assert entry["time"].endswith("Z")


def test_lines_forwarded_from_a_worker_become_json_objects_with_the_worker_named(json_run_id, capsys):
    url = signed_urls("http://127.0.0.1:9")["d.png"]
    worker_line = json.dumps({"time": "t", "level": "WARNING", "run_id": "nightly-7", "event": "log",
                              "message": f"retrying {url}"})
    logs.worker_lines_as_json({"pid": 4242, "ip": "10.0.0.7", "actor_name": "MapWorker(Generate)", "is_err": True,
                               "lines": [worker_line, f"Traceback of {url}", ""]})
    logs.worker_lines_as_json({"pid": "autoscaler", "ip": "10.0.0.7", "is_err": False,
                               "lines": ["======== Autoscaler status ========", " 2.0/4.0 CPU"]})

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and leaked("\n".join(lines)) == []
    logged, wrapped = (json.loads(line) for line in lines)
    assert logged["message"] == "retrying http://127.0.0.1:9/d.png"
    assert logged["fields"] == {"pid": 4242, "ip": "10.0.0.7", "worker": "MapWorker(Generate)"}
    assert wrapped["event"] == "worker.output" and wrapped["level"] == "WARNING" and wrapped["run_id"] == "nightly-7"
    assert wrapped["message"] == "Traceback of http://127.0.0.1:9/d.png" and wrapped["fields"]["pid"] == 4242


def test_text_logs_stay_lines_for_people_and_redacted(caplog):
    formatter = logs.RedactingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("scriptorium", logging.INFO, __file__, 1, "read %s", (signed_urls("http://h")["b.png"],),
                               None)
    assert formatter.format(record) == "INFO read http://h/b.png"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_line_of_a_json_logging_run_parses_carries_its_run_id_and_no_secret(tiny_model, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    serve_documents(served)
    output = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text("[render]\npage_edge = 64\n[model]\nlongest_edge = 56\nshortest_edge = 28\ndevice = \"cpu\"\n"
                   "[resources]\nbatch_size = 4\n")
    with FileServer(served) as server:
        server.unavailable_once.add("/a.pdf")  # its worker retries the read, logging a warning with its URL
        manifest = tmp_path / "signed.jsonl"
        manifest.write_text("".join(json.dumps({"uri": url}) + "\n" for url in signed_urls(server.origin).values()))
        run = run_cli("run", "--job", str(job), "--input", str(manifest), "--manifest", "--output", str(output),
                      "--task", "ocr", "--model", str(tiny_model), "--max-new-tokens", "2",
                      "--manifest-allow", f"{server.origin}/", "--log-format", "json", timeout=540)
    assert run.returncode == 0, run.stderr[-3000:]

    assert leaked(run.stdout + run.stderr) == [], [name for name in SECRETS if SECRETS[name] in run.stderr]
    entries = []
    for line in (run.stdout + run.stderr).splitlines():
        entry = json.loads(line)  # every line, stdout's and stderr's
        assert isinstance(entry, dict) and {"time", "level", "run_id", "event"} <= set(entry), line
        entries.append(entry)
    finished = [e for e in entries if e["event"] == "run.finished"]
    assert len(finished) == 1 and finished[0]["fields"]["rows_written"] == 9
    run_id = finished[0]["fields"]["summary"]["run"]["run_id"]
    assert run_id and {e["run_id"] for e in entries} == {run_id}
    assert any(e["event"] == "progress" and e["fields"]["documents"] == 8 for e in entries)
    retried = [e for e in entries if "transient storage error" in e.get("message", "")]
    assert retried and retried[0]["level"] == "WARNING" and retried[0]["fields"]["pid"], retried  # from a Ray worker
    assert not any(e["fields"]["pid"] == "autoscaler" for e in entries if e["event"] == "worker.output")
