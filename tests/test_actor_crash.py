"""Crashes: a model replica killed mid-batch is restarted and its batch retried, nothing lost; a page that
kills its replica every time is isolated (pipeline/model/journal.py) and becomes an error row; a replica
whose CUDA context is lost ends its own process and is restarted the same way (pipeline/model/recovery.py).

The kills are real: a watcher thread in the test reads the replicas' crash journals (which say which
process is generating which units, pipeline/model/journal.py) and SIGKILLs the replica's process in the
middle of its `generate` call, the way the OOM killer ends it. A lost CUDA context is a hook on the
replica's text model that raises a CUDA error in one process, at every call, as a device-side assert does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from scriptorium.pipeline import stages
from scriptorium.core.spec import spec_from_dict
from scriptorium.core.units import unit_key
from scriptorium.jobs.runner import run_job
from scriptorium.pipeline.model.journal import CrashJournal, journal_folder
from tests.conftest import make_pdf, read_rows, small_ocr_job
from tests.lost_cuda_context import ContinuousLosingItsCudaContext, StaticLosingItsCudaContext, lost_context_marker


class ReplicaKiller(threading.Thread):
    """Watches a run's crash journals; SIGKILLs a replica while it generates a unit `should_kill` picks."""

    def __init__(self, run_id: str, should_kill):
        super().__init__(daemon=True)
        self.folder = journal_folder(run_id)
        self.should_kill = should_kill
        self.killed: list[tuple[int, list[str]]] = []  # (pid, units in flight)
        self.replicas: set[int] = set()  # pids of every replica process seen writing a note
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for note in self.folder.glob("*.json") if self.folder.exists() else []:
                try:
                    state = json.loads(note.read_text())
                except (OSError, ValueError):
                    continue
                in_flight = state.get("in_flight") or []
                self.replicas.add(state["pid"])
                if state["pid"] in {pid for pid, _ in self.killed}:
                    continue  # killed already: its note stays until the restarted replica reads it
                if in_flight and self.should_kill(in_flight, self.killed):
                    try:
                        os.kill(state["pid"], signal.SIGKILL)
                        self.killed.append((state["pid"], in_flight))
                    except ProcessLookupError:
                        pass
            time.sleep(0.01)


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("crash-inputs")
    for name in ("a", "b", "c"):
        make_pdf(folder / f"{name}.pdf", [f"{name} page {p}" for p in range(4)], size=(200, 260))
    return folder


def crash_job(documents: Path, output: Path, model: Path, run_id: str):
    # 48 new tokens: long enough to be killed in the middle
    return spec_from_dict({"run_id": run_id, **small_ocr_job(documents, output, model, max_new_tokens=48)})


@pytest.fixture(autouse=True)
def clean_journals():
    yield
    for folder in journal_folder("x").parent.glob(f"crash-*-{os.getpid()}"):
        shutil.rmtree(folder, ignore_errors=True)


def rows_by_page(output: Path) -> dict[tuple[str, int], list[dict]]:
    rows = read_rows(output)
    assert max(Counter((r["source_uri"], r["page"], r["task"]) for r in rows).values()) == 1  # never twice
    return {(Path(r["source_uri"]).name, r["page"]): r for r in rows}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_replica_killed_mid_batch_is_restarted_and_nothing_is_lost(documents, tiny_model, tmp_path, ray_local):
    run_id = f"crash-once-{os.getpid()}"
    killer = ReplicaKiller(run_id, should_kill=lambda in_flight, killed: not killed)  # the first batch, once
    killer.start()
    try:
        result = run_job(crash_job(documents, tmp_path / "out", tiny_model, run_id))
    finally:
        killer.done.set()
    assert len(killer.killed) == 1
    rows = rows_by_page(tmp_path / "out")
    assert sorted(rows) == [(f"{d}.pdf", p) for d in "abc" for p in range(4)]
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert result.error_rows == 0
    # The killed batch was generated again, by the restarted replica (the same actor, a new process).
    assert len(killer.replicas) == 2 and killer.killed[0][0] in killer.replicas
    assert not journal_folder(run_id).exists()  # the run cleared its replicas' notes when it finished


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_page_that_kills_its_replica_every_time_becomes_an_error_row(documents, tiny_model, tmp_path, ray_local):
    run_id = f"crash-poison-{os.getpid()}"
    poison = unit_key(str(documents / "b.pdf"), 2, "ocr", None)
    killer = ReplicaKiller(run_id, should_kill=lambda in_flight, killed: poison in in_flight)
    killer.start()
    try:
        run_job(crash_job(documents, tmp_path / "out", tiny_model, run_id))
    finally:
        killer.done.set()
    rows = rows_by_page(tmp_path / "out")
    assert sorted(rows) == [(f"{d}.pdf", p) for d in "abc" for p in range(4)]
    failed = {page for page, row in rows.items() if row["status"] == "error"}
    assert failed == {("b.pdf", 2)}
    assert rows["b.pdf", 2]["stage"] == "generate" and "model replica died" in rows["b.pdf", 2]["error"]
    # It took two restarts: the page's batch died (with the other block the replica had in flight, if
    # any), then the page alone (its batch mates, suspects too, were generated one by one and came out ok).
    first, second = [units for _, units in killer.killed]
    assert poison in first and len(first) in (4, 8) and second == [poison]


# -- a lost CUDA context: the replica's process ends and Ray restarts it ------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_a_lost_cuda_context_ends_the_replica_which_restarts_and_nothing_is_lost(engine, documents, tiny_model,
                                                                                 tmp_path, ray_local, monkeypatch):
    run_id = f"cuda-{engine}-{os.getpid()}"
    marker = lost_context_marker(run_id)
    marker.unlink(missing_ok=True)
    # The job's model stage, which the Ray actors import by name (tests/lost_cuda_context.py).
    monkeypatch.setattr(stages, "GenerateAnswers", StaticLosingItsCudaContext)
    monkeypatch.setattr(stages, "GenerateAnswersContinuously", ContinuousLosingItsCudaContext)
    job = small_ocr_job(documents, tmp_path / "out", tiny_model, max_new_tokens=8)
    try:
        result = run_job(spec_from_dict({"run_id": run_id, **job, "model": {**job["model"], "engine": engine}}))
        lost_in = int(marker.read_text())
    finally:
        marker.unlink(missing_ok=True)
    rows = rows_by_page(tmp_path / "out")  # every unit exactly once
    assert sorted(rows) == [(f"{d}.pdf", p) for d in "abc" for p in range(4)]
    # Every row ok: none was made by the process that lost its context (its every call raised), so it ended
    # and a restarted one generated its batch again.
    assert {(r["status"], r["error"]) for r in rows.values()} == {("ok", None)}
    assert result.error_rows == 0 and lost_in > 0
    assert not journal_folder(run_id).exists()


# -- the journal itself, without Ray: a restart is a new CrashJournal on the same file ----------------------
def test_units_in_flight_when_a_replica_dies_count_a_crash_on_restart(tmp_path):
    path = tmp_path / "actor.json"
    journal = CrashJournal(path)
    with journal.in_flight(["p1", "p2"]):
        pass  # returned normally: nothing to count
    assert not CrashJournal(path).is_suspect("p1")

    journal = CrashJournal(path)
    journal._save(["p1", "p2"])  # what a process killed inside `in_flight` leaves behind
    restarted = CrashJournal(path)
    assert restarted.restarted_after_crash and restarted.is_suspect("p1") and restarted.is_suspect("p2")
    assert not restarted.is_poison("p1")


def test_a_unit_is_poison_after_crashing_twice_once_alone(tmp_path):
    path = tmp_path / "actor.json"
    CrashJournal(path)._save(["p1", "p2"])  # crash 1: in a batch of two
    CrashJournal(path)._save(["p1"])  # crash 2: alone
    journal = CrashJournal(path)
    assert journal.is_poison("p1") and not journal.is_poison("p2")
    assert "died 2 times" in journal.poison_reason("p1")


def test_a_python_exception_is_not_a_crash(tmp_path):
    path = tmp_path / "actor.json"
    journal = CrashJournal(path)
    with pytest.raises(RuntimeError):
        with journal.in_flight(["p1"]):
            raise RuntimeError("CUDA out of memory")  # handled by splitting the batch, in-process
    assert not CrashJournal(path).is_suspect("p1")
