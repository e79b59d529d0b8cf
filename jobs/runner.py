"""Run a job: check it, plan it against the ledger, stream it through Ray, publish results.

    spec -> check model & output -> lease on the output -> ledger (what is done) -> plan (what is left)
         -> the job's stages on Ray Data -> results streamed to the Parquet sink -> run summary

Ray is joined or started (jobs/ray_setup.py) only when something needs it: derive, to count the
cluster's GPUs for device = "auto", or a plan with work in it. Planning is jobs/planning.py, the
stages' run jobs/streaming.py, the summary jobs/summary_files.py.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field

from scriptorium.connectors.lease import hold_output
from scriptorium.connectors.ledger import read_ledger
from scriptorium.connectors.parquet_sink import ParquetSink, ParquetStore
from scriptorium.connectors.storage import unreachable_reason
from scriptorium.core.errors import SpecError
from scriptorium.core.spec import JobSpec, check_run_id, new_run_id, output_uri_for_run
from scriptorium.core.units import work_units
from scriptorium.jobs.planning import plan_run
from scriptorium.jobs.ray_setup import init_ray, joined_cluster_gpus, ray_address
from scriptorium.jobs.streaming import run_stages
from scriptorium.jobs.summary_files import write_run_plan, write_run_summary
from scriptorium.pipeline.model.journal import journal_folder
from scriptorium.pipeline.stages import Derived, derive, results_schema


@dataclass
class RunResult:
    run_id: str
    output: str
    planned_inputs: int = 0
    skipped_inputs: int = 0
    rows_written: int = 0
    ok_rows: int = 0
    error_rows: int = 0
    wall_s: float = 0.0
    files: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # {"run": ..., "output": ...}, see jobs/summary.py


def run_job(spec: JobSpec) -> RunResult:
    """Run `spec` to completion (or resume it). Raises SpecError/OutputError for job-level problems."""
    started = time.monotonic()
    output_template = spec.output.uri
    spec = checked_for_this_run(spec)
    # The checkpoint's processor, examples, render size and where replicas run: once, before any work.
    derived = derive(spec, cluster_gpus=lambda: joined_cluster_gpus(spec.resources))

    store = ParquetStore(spec.output.uri, spec.storage)
    store.ensure_writable()
    # One writer per output: from here to the end this run holds the output's lease (connectors/lease.py).
    lease = hold_output(store, spec.run_id, spec.output.lease_timeout_s, spec.output.wait)
    try:
        return run_holding_the_lease(spec, derived, store, started, output_template)
    finally:
        lease.release()


def checked_for_this_run(spec: JobSpec) -> JobSpec:
    """`spec` with its run id and output URI fixed and its reads under the manifest policy, after the
    checks that take seconds: what it needs, its Ray address, its input and output reachable."""
    spec.check_runnable()
    run_id = check_run_id(spec.run_id or new_run_id())
    spec = spec.updated(run_id=run_id, output={"uri": output_uri_for_run(spec.output.uri, run_id)})
    ray_address(spec.resources)  # a cluster address that cannot work fails now, not after planning
    # Every read of the job (the listing, the workers) fetches http(s) URLs under the manifest policy.
    spec = spec.updated(storage=spec.storage.with_manifest_policy(spec.input).model_dump())
    for role, uri in (("input", spec.input.uri), ("output", spec.output.uri)):
        unreachable = unreachable_reason(uri, spec.storage)  # in seconds, before loading anything
        if unreachable:
            raise SpecError(f"cannot reach {role} {uri}: {unreachable}")
    return spec


def run_holding_the_lease(spec: JobSpec, derived: Derived, store: ParquetStore, started: float,
                          output_template: str) -> RunResult:
    if spec.output.overwrite:
        store.delete_all()
    store.recover()
    store.check_columns(results_schema(spec, derived))  # one type per column across runs (extract tasks)
    # --retry-failed: error rows do not count as done, so planning redoes their units.
    ledger = read_ledger(store, work_units(spec.tasks), errors_done=not spec.output.retry_failed)
    plan = plan_run(spec, store, ledger, output_template)
    write_run_plan(store, spec, plan, started=time.time() - (time.monotonic() - started))  # for `status`

    result = RunResult(run_id=spec.run_id, output=spec.output.uri, skipped_inputs=plan.skipped, planned_inputs=plan.planned)
    sink = ParquetSink(store, spec.run_id, spec.output.rows_per_file, spec.output.seconds_per_file)
    if plan.files:
        init_ray(spec.resources)
        counts = run_stages(spec, derived, plan, store, ledger, sink)
        result.ok_rows, result.error_rows = counts.ok, counts.error
    sink.close()

    store.record_own_files()
    if store.fs.exists(store.work_folder(spec.run_id)):
        store.fs.rm(store.work_folder(spec.run_id), recursive=True)
    shutil.rmtree(journal_folder(spec.run_id), ignore_errors=True)  # this node's replica notes (a local run's all)
    result.rows_written = sink.rows_written
    result.files = sink.published
    result.wall_s = time.monotonic() - started
    result.summary = write_run_summary(store, spec, result, derived.gpus_per_replica)
    return result
