"""One writer per output (connectors/lease.py), on a local folder, a real S3 server (SeaweedFS, which
enforces conditional writes) and the GCS test server: contenders that race for a free or a stale lease,
holders that are alive, dead or taken over, and `scriptorium run` drivers started on one output at once
or killed in the middle."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from scriptorium.connectors.lease import LeaseHeld, LeaseLost, LeaseRecord, OutputLease, this_machine
from scriptorium.connectors.namespace import LEASE_FILE, data_file_name
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.errors import OutputError
from scriptorium.core.spec import StorageSpec
from tests.conftest import REPO, StoreProxy, driver_job_toml, make_pdf, one_line_error, run_cli
from tests.fake_gcs import FakeGcs
from tests.test_sink import results

CONTENDERS = 8


@pytest.fixture(scope="module")
def gcs():
    server = FakeGcs()
    yield server
    server.close()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow),  # s3 and gcs start a server
                        pytest.param("gcs", marks=pytest.mark.slow)])
def store(request, tmp_path) -> ParquetStore:
    """An empty output on each kind of store we write to."""
    if request.param == "local":
        return ParquetStore(str(tmp_path / "out"))
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return ParquetStore(f"s3://{server.new_bucket('lease')}/out", StorageSpec(endpoint_url=server.endpoint))
    server = request.getfixturevalue("gcs")
    options = StorageSpec(gcs_endpoint_url=server.endpoint, anon=True)
    return ParquetStore(f"gs://{server.new_bucket('lease')}/out", options)


def lease_for(store: ParquetStore, run_id: str, **settings) -> OutputLease:
    return OutputLease(store.fs, store.root, store.uri, run_id, **settings)


def plant(store: ParquetStore, **fields) -> LeaseRecord:
    """Write a lease by hand, as another run would have left it."""
    now = time.time()
    record = LeaseRecord(**{"run_id": "elsewhere-run", "host": "elsewhere", "pid": 4242, "machine": "another-machine",
                            "pid_start": "1", "started": now, "heartbeat": now, "token": "0123456789ab", **fields})
    assert lease_for(store, "planter").object.create(record.to_bytes()) is not None
    return record


def contend(store: ParquetStore) -> tuple[list[OutputLease], list[str]]:
    """CONTENDERS runs take the output's lease at the same instant: (winners, the refusals' messages)."""
    leases = [lease_for(store, f"contender-{n}") for n in range(CONTENDERS)]
    start, won, refused = threading.Barrier(CONTENDERS), [], []

    def take(lease):
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


def test_of_runs_racing_for_a_free_lease_exactly_one_wins(store):
    won, refused = contend(store)
    try:
        assert len(won) == 1 and len(refused) == CONTENDERS - 1
        assert all(f"is being written by run {won[0].run_id} (host {socket.gethostname()}, pid {os.getpid()}" in m
                   for m in refused)
    finally:
        for lease in won:
            lease.release()
    assert lease_for(store, "after").object.read() is None  # released: nothing left behind


def test_of_runs_racing_to_take_over_a_stale_lease_exactly_one_wins(store, caplog):
    plant(store, heartbeat=time.time() - 3600)  # a run on another host that stopped an hour ago
    won, refused = contend(store)
    try:
        assert len(won) == 1 and len(refused) == CONTENDERS - 1  # the takeover is conditional: one winner
        assert all(f"by run {won[0].run_id} " in message for message in refused)
        takeovers = [r.message for r in caplog.records if "took over the lease" in r.message]
        assert len(takeovers) == 1 and "run elsewhere-run (host elsewhere, pid 4242" in takeovers[0]
        assert re.search(r"its last heartbeat is 36\d\d s old \(output.lease_timeout_s = 120\)", takeovers[0])
    finally:
        for lease in won:
            lease.release()


@pytest.mark.slow
def test_a_live_lease_of_another_host_is_respected_and_one_of_a_dead_process_here_is_not(store):
    plant(store)  # another host, heartbeat just now: it may well be running
    with pytest.raises(LeaseHeld, match=r"by run elsewhere-run \(host elsewhere, pid 4242, heartbeat \d s ago\): "
                                        r"pass --wait to run after it"):
        lease_for(store, "second").acquire()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process of this machine that has ended, with a fresh heartbeat
    holder = lease_for(store, "reader").object
    current = holder.read()
    dead = LeaseRecord("killed-run", socket.gethostname(), dead_pid, this_machine(), "12345", time.time(),
                       time.time(), "ba5eba11dead")
    assert holder.replace(dead.to_bytes(), current.version) is not None
    with lease_for(store, "rerun"):  # taken over at once: no heartbeat timeout to wait for
        assert LeaseRecord.from_bytes(holder.read().data).run_id == "rerun"


def test_a_holder_whose_lease_was_taken_over_stops_writing_and_leaves_the_new_lease(store):
    first = lease_for(store, "first", timeout_s=6).acquire()  # renews every second
    store.lease = first
    current = first.object.read()
    # Another run takes over (as after this holder's heartbeat went stale): a conditional replace.
    taker = LeaseRecord("taker", "elsewhere", 99, "", "", time.time(), time.time(), "7a4e07e47a4e")
    assert first.object.replace(taker.to_bytes(), current.version) is not None

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the next renewal finds the lease changed
        try:
            first.ensure_held()
        except LeaseLost:
            break
        time.sleep(0.1)
    with pytest.raises(LeaseLost, match="run taker \\(host elsewhere, pid 99.*took it over"):
        store.publish(results("a.pdf", [0], 1), data_file_name("first", 0))
    first.release()
    assert LeaseRecord.from_bytes(first.object.read().data).run_id == "taker"  # not deleted by the loser
    assert not store.data_files()


def test_a_waiting_run_takes_the_lease_once_the_holder_releases_it(store):
    holder = lease_for(store, "holder").acquire()
    waiter = lease_for(store, "waiter", wait=True)
    events = []
    thread = threading.Thread(target=lambda: (waiter.acquire(), events.append("waiter holds it")))
    thread.start()
    time.sleep(3)  # the waiter polls meanwhile
    events.append("holder releases it")
    holder.release()
    thread.join(timeout=60)
    assert events == ["holder releases it", "waiter holds it"]
    assert LeaseRecord.from_bytes(waiter.object.read().data).run_id == "waiter"
    waiter.release()


@pytest.mark.slow
def test_a_store_that_ignores_conditional_writes_is_refused_rather_than_trusted(s3_server):
    bucket = s3_server.new_bucket("noconditions")
    with StoreProxy(s3_server.endpoint, drop_headers=("If-None-Match", "If-Match")) as careless:
        store = ParquetStore(f"s3://{bucket}/out", StorageSpec(endpoint_url=careless.endpoint))
        with pytest.raises(OutputError, match="the store ignores conditional writes"):
            lease_for(store, "first").acquire()
    assert not s3_server.client.list_objects_v2(Bucket=bucket, Prefix=f"out/{LEASE_FILE}")["KeyCount"]  # none left


# -- recover touches only the leftovers of runs that no longer hold the lease ----------------------------
def test_recover_removes_only_what_killed_runs_left_and_lists_unlisted_files_of_ours(tmp_path):
    store = ParquetStore(str(tmp_path))
    with lease_for(store, "earlier") as earlier:
        store.lease = earlier
        store.recover()  # lists run "earlier"
        published = store.publish(results("a.pdf", [0], 1), data_file_name("earlier", 0))  # not in the list yet
    store.lease = None
    killed_temporary = tmp_path / f".{data_file_name('earlier', 1)}.{earlier.token}.0badf00d.tmp"
    killed_temporary.write_bytes(b"PAR1 half")
    (tmp_path / "_work" / f"earlier.{earlier.token}").mkdir(parents=True)
    foreign = [tmp_path / "notes" / ".draft.0badf00d.tmp", tmp_path / "user-table.parquet"]
    foreign[0].parent.mkdir()
    for path in foreign:
        path.write_bytes(b"not ours")

    with lease_for(store, "now") as now:
        store.lease = now
        own_temporary = tmp_path / f".{data_file_name('now', 0)}.{now.token}.0badf00d.tmp"
        own_temporary.write_bytes(b"being written")
        (tmp_path / "_work" / f"now.{now.token}").mkdir()
        removed = store.recover()

    assert sorted(removed) == sorted([str(killed_temporary), str(tmp_path / "_work" / f"earlier.{earlier.token}")])
    assert own_temporary.exists() and (tmp_path / "_work" / f"now.{now.token}").exists()
    assert all(path.read_bytes() == b"not ours" for path in foreign)
    listing = (tmp_path / "_scriptorium" / "files.json").read_text()
    assert Path(published).name in listing and '"now"' in listing and '"earlier"' in listing
    assert store.data_files() == [published]  # the user's table is not ours


# -- drivers: `scriptorium run` processes on one output ------------------------------------------------------
JOB = driver_job_toml(rows_per_file=3)


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lease-inputs")
    for number in range(3):
        make_pdf(folder / f"doc{number}.pdf", [f"document {number}, page {p}" for p in range(4)], size=(200, 260))
    return folder


UNITS = sorted((f"doc{d}.pdf", p) for d in range(3) for p in range(4))


def driver(job: Path, input_uri: str, output_uri: str, model: Path, log: Path, *extra: str) -> subprocess.Popen:
    args = ["run", "--job", str(job), "--input", input_uri, "--output", output_uri, "--task", "ocr",
            "--model", str(model), *extra]
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "scriptorium.jobs.cli", *args], cwd=REPO, stdout=handle, stderr=handle,
                                start_new_session=True)


def first_to_end(processes: list[subprocess.Popen], timeout_s: float = 600) -> subprocess.Popen:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                return process
        time.sleep(0.1)
    raise AssertionError("no driver ended")


def units_written(rows: list[dict]) -> Counter:
    return Counter((Path(r["source_uri"]).name, r["page"]) for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_drivers_on_one_folder_one_writes_and_the_other_refuses_at_once(documents, tiny_model, tmp_path):
    job, output = tmp_path / "job.toml", tmp_path / "out"
    job.write_text(JOB)
    drivers = {run_id: driver(job, str(documents), str(output), tiny_model, tmp_path / f"{run_id}.log",
                              "--run-id", run_id) for run_id in ("first", "second")}

    refused = first_to_end(list(drivers.values()))  # refused at the lease, while the other one works
    winner = next(p for p in drivers.values() if p is not refused)
    assert winner.poll() is None, "the writer should still be running when the other is refused"
    assert winner.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    loser_id = next(run_id for run_id, p in drivers.items() if p is refused)
    winner_id = next(run_id for run_id, p in drivers.items() if p is winner)
    log = (tmp_path / f"{loser_id}.log").read_text()
    line = one_line_error(subprocess.CompletedProcess([], refused.returncode, "", log))
    assert f"is being written by run {winner_id} (host {socket.gethostname()}, pid {winner.pid}," in line
    assert "--wait" in line and f"{output}/{LEASE_FILE}" in line

    rows = pads.dataset(str(output), format="parquet").to_table().to_pylist()
    assert sorted(units_written(rows)) == UNITS and set(units_written(rows).values()) == {1}
    assert {r["run_id"] for r in rows} == {winner_id}
    assert not (output / LEASE_FILE).exists()  # released at the end


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_drivers_with_wait_on_s3_run_one_after_the_other(documents, tiny_model, tmp_path, s3_server):
    bucket = s3_server.new_bucket("wait")
    for path in sorted(documents.iterdir()):
        s3_server.put(bucket, f"in/{path.name}", path)
    job = tmp_path / "job.toml"
    job.write_text(JOB + f'[storage]\nendpoint_url = "{s3_server.endpoint}"\n')
    drivers = {run_id: driver(job, f"s3://{bucket}/in/", f"s3://{bucket}/out", tiny_model, tmp_path / f"{run_id}.log",
                              "--run-id", run_id, "--wait") for run_id in ("first", "second")}
    for run_id, process in drivers.items():
        assert process.wait(timeout=900) == 0, (tmp_path / f"{run_id}.log").read_text()[-3000:]

    logs = {run_id: (tmp_path / f"{run_id}.log").read_text() for run_id in drivers}
    waited = [run_id for run_id, log in logs.items() if "waiting for it (--wait)" in log]
    assert len(waited) == 1  # the other one wrote
    assert "0 inputs processed, 3 already done" in logs[waited[0]]
    rows = pads.dataset(f"{bucket}/out", filesystem=s3_server.filesystem(), format="parquet").to_table().to_pylist()
    assert sorted(units_written(rows)) == UNITS and set(units_written(rows).values()) == {1}
    assert {r["run_id"] for r in rows} == set(drivers) - set(waited)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_driver_killed_mid_run_on_s3_is_taken_over_by_the_rerun_which_resumes(documents, tiny_model, tmp_path,
                                                                               s3_server):
    bucket = s3_server.new_bucket("killed")
    for path in sorted(documents.iterdir()):
        s3_server.put(bucket, f"in/{path.name}", path)
    job = tmp_path / "job.toml"
    storage = f'[storage]\nendpoint_url = "{s3_server.endpoint}"\n'
    job.write_text(JOB.replace("rows_per_file = 3", "rows_per_file = 2") + storage)
    command = (job, f"s3://{bucket}/in/", f"s3://{bucket}/out", tiny_model)

    killed = driver(*command, tmp_path / "killed.log", "--max-new-tokens", "48")
    deadline = time.monotonic() + 600
    while not s3_server.client.list_objects_v2(Bucket=bucket, Prefix="out/part-").get("KeyCount"):
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "nothing published in 600 s"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # the driver and everything it started, at once
    killed.wait()
    assert s3_server.client.head_object(Bucket=bucket, Key=f"out/{LEASE_FILE}")  # left behind by the kill

    rerun = driver(*command, tmp_path / "rerun.log", "--max-new-tokens", "48")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    log = (tmp_path / "rerun.log").read_text()
    assert "took over the lease of run" in log and f"its process (pid {killed.pid}) no longer runs" in log

    rows = pads.dataset(f"{bucket}/out", filesystem=s3_server.filesystem(), format="parquet").to_table().to_pylist()
    assert sorted(units_written(rows)) == UNITS and set(units_written(rows).values()) == {1}
    assert len({r["run_id"] for r in rows}) == 2  # what the killed run published was kept, not redone


def test_a_run_that_fails_after_taking_the_lease_releases_it(tiny_model, tmp_path):
    from scriptorium.core.errors import SpecError
    from scriptorium.core.spec import spec_from_dict
    from scriptorium.jobs.runner import run_job
    from tests.conftest import small_ocr_job

    output = tmp_path / "out"
    with pytest.raises(SpecError, match="does not exist"):  # found when listing, with the lease held
        run_job(spec_from_dict(small_ocr_job(tmp_path / "no-such-folder", output, tiny_model)))
    assert (output / "_scriptorium" / "files.json").exists() and not (output / LEASE_FILE).exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_stopped_with_sigterm_releases_its_lease(documents, tiny_model, tmp_path):
    """What `ray job stop`, a deadline's `timeout` and Kubernetes send."""
    job, output = tmp_path / "job.toml", tmp_path / "out"
    job.write_text(JOB)
    running = driver(job, str(documents), str(output), tiny_model, tmp_path / "run.log", "--max-new-tokens", "48")
    deadline = time.monotonic() + 600
    while not list(output.glob("part-*.parquet")):
        assert running.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "nothing published in 600 s"
        time.sleep(0.2)
    assert (output / LEASE_FILE).exists()
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=120) != 0
    assert not (output / LEASE_FILE).exists(), (tmp_path / "run.log").read_text()[-3000:]


@pytest.mark.slow
def test_a_run_refused_by_a_live_lease_says_who_holds_it_in_one_line(documents, tiny_model, tmp_path):
    output = tmp_path / "out"
    plant(ParquetStore(str(output)), run_id="nightly-20261201", host="ray-head-7f9c")

    done = run_cli("run", "--input", str(documents), "--output", str(output), "--task", "ocr",
                   "--model", str(tiny_model), timeout=300)

    line = one_line_error(done, "is being written by run nightly-20261201 (host ray-head-7f9c, pid 4242, heartbeat")
    assert f"once its heartbeat is 120 s old, or at once if you delete {output}/{LEASE_FILE}" in line
    assert not list(output.glob("*.parquet"))
