"""Run a job: check it, plan it against the ledger, stream it through Ray, publish results.

    spec -> check model & output -> ledger (what is done) -> plan (what is left)
         -> the job's stages on Ray Data (pipeline/processor.py) -> dedup join, at-most-once check
         -> results streamed to the Parquet sink -> run summary
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from scriptorium.connectors.lease import hold_output
from scriptorium.connectors.ledger import Ledger, read_ledger
from scriptorium.connectors.listing import list_inputs, results_filter
from scriptorium.connectors.parquet_sink import ParquetSink, ParquetStore
from scriptorium.connectors.sink_guard import SinkGuard
from scriptorium.connectors.storage import redact, unreachable_reason
from scriptorium.core.errors import SpecError
from scriptorium.core.schema import PLAN_SCHEMA, table_from_rows
from scriptorium.core.spec import JobSpec, check_run_id, new_run_id, output_uri_for_run
from scriptorium.core.units import work_units
from scriptorium.jobs.progress import Progress
from scriptorium.jobs.quiet_ray import spend_actor_restart_warning
from scriptorium.jobs.summary import write_run_summary
from scriptorium.jobs.block_stats import bound_block_stats
from scriptorium.pipeline.model.journal import journal_folder
from scriptorium.pipeline.model.loading import gpus_in_cluster
from scriptorium.pipeline.processor import build_processor
from scriptorium.pipeline.routes.dedup import (
    DedupJoin,
    earlier_results,
    seed_registry,
    start_registry,
)
from scriptorium.pipeline.stages import Derived, derive

log = logging.getLogger("scriptorium")

PLAN_ROWS_PER_FILE = 200  # documents per plan file: one Ray read task each


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


def ray_address(spec: JobSpec) -> str:
    """The cluster to join ("" for a local Ray). A Ray Client address (ray://) is refused up front:
    Ray Data cannot run through Ray Client (ray-project/ray#48682), so a job is driven from inside
    the cluster instead, which is what `scriptorium submit` arranges."""
    address = spec.resources.address or os.environ.get("SCRIPTORIUM_RAY_ADDRESS", "")
    if address.startswith("ray://"):
        raise SpecError(f"address {address}: Ray Data cannot run through Ray Client (ray://). Submit the job "
                        "to the cluster instead: scriptorium submit --address http://HEAD:8265 --job FILE.toml, "
                        "or run it on a cluster node with --address auto")
    return address


def init_ray(spec: JobSpec) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = ray_address(spec)
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    # Ray schedules by logical CPUs. With as many as cores, one model actor plus render tasks can
    # leave no CPU for Ray Data's own read/write tasks on a 2-core machine and the job stalls, so a
    # local Ray gets at least 4 logical CPUs; the OS shares the real cores between them.
    num_cpus = spec.resources.ray_num_cpus or max(4, os.cpu_count() or 1)
    # address="local": a Ray of our own, never one found on the machine (a plain ray.init() joins the
    # cluster `ray start` recorded in /tmp/ray). Its processes die with this driver (Ray ties them to
    # it), so a killed run leaves nothing behind that could disturb its rerun.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level=logging.WARNING)
    spend_actor_restart_warning()  # a false alarm Ray would print in the middle of the progress lines


def joined_cluster_gpus(spec: JobSpec) -> float:
    """The GPUs of the cluster this run joins, for derive to decide device = "auto": Ray is started (or
    joined) here only when derive asks, after its checks, so a job that fails them never waits for Ray."""
    init_ray(spec)
    return gpus_in_cluster()


@dataclass
class Plan:
    """What planning decided: the plan files to run, and the sources whose old rows must go first."""

    files: list[str] = field(default_factory=list)
    planned: int = 0  # sources in the plan files
    skipped: int = 0  # complete, unchanged sources
    stale: list[str] = field(default_factory=list)  # changed since their rows were made
    retried: list[str] = field(default_factory=list)  # with error rows this run redoes (--retry-failed)


def write_plan(spec: JobSpec, store: ParquetStore, ledger: Ledger, output_template: str = "") -> Plan:
    """Stream the listing into plan files under `_work/<run_id>.<lease token>/`, skipping complete sources
    and results (an output inside its input; `output_template`: the output URI before `{run_id}` is set)."""
    work = store.work_folder(spec.run_id)
    results = results_filter(spec.input, spec.storage, output_template or spec.output.uri, store.own_files().owns_uri)
    plan, buffer = Plan(), []

    def flush():
        if buffer:
            path = f"{work}/plan-{len(plan.files):06d}.parquet"
            store.fs.makedirs(work, exist_ok=True)
            out = io.BytesIO()
            pq.write_table(table_from_rows(buffer, PLAN_SCHEMA), out)
            store.fs.pipe_file(path, out.getvalue())
            plan.files.append(path)
            plan.planned += len(buffer)
            buffer.clear()

    job_units = work_units(spec.tasks)

    def units_of(row: dict):  # per source: QA questions may come per document
        return work_units(spec.tasks, row["questions"]) if row.get("questions") else job_units

    for row, units, source in ledger.look_up(list_inputs(spec.input, spec.storage, skip=results), units_of):
        uri, etag = row["source_uri"], row["etag"]
        if source.is_complete(etag, units):
            plan.skipped += 1
            continue
        if source.is_stale(etag):
            plan.stale.append(uri)
        elif source.has_done:
            row["done_pages"] = source.done_pages(units)
            row["done_units"] = source.done_units(row["done_pages"])
            row["known_pages"] = source.n_pages
        if spec.output.retry_failed and source.has_errors:
            plan.retried.append(uri)
        buffer.append(row)
        if len(buffer) >= PLAN_ROWS_PER_FILE:
            flush()
    flush()
    return plan


def run_job(spec: JobSpec) -> RunResult:
    """Run `spec` to completion (or resume it). Raises SpecError/OutputError for job-level problems."""
    started = time.monotonic()
    spec.check_runnable()
    run_id = check_run_id(spec.run_id or new_run_id())
    output_template = spec.output.uri
    spec = spec.updated(run_id=run_id, output={"uri": output_uri_for_run(spec.output.uri, run_id)})
    ray_address(spec)  # a cluster address that cannot work fails now, not after planning
    # Every read of the job (the listing, the workers) fetches http(s) URLs under the manifest policy.
    spec = spec.updated(storage=spec.storage.with_manifest_policy(spec.input).model_dump())
    for role, uri in (("input", spec.input.uri), ("output", spec.output.uri)):
        unreachable = unreachable_reason(uri, spec.storage)  # in seconds, before loading anything
        if unreachable:
            raise SpecError(f"cannot reach {role} {uri}: {unreachable}")
    # The checkpoint's processor, examples, render size and where replicas run: once, before any work.
    derived = derive(spec, cluster_gpus=lambda: joined_cluster_gpus(spec))

    store = ParquetStore(spec.output.uri, spec.storage)
    store.ensure_writable()
    # One writer per output: from here to the end this run holds the output's lease (connectors/lease.py).
    lease = hold_output(store, spec.run_id, spec.output.lease_timeout_s, spec.output.wait)
    try:
        return _run_holding_the_lease(spec, derived, store, started, output_template)
    finally:
        lease.release()


def _run_holding_the_lease(spec: JobSpec, derived: Derived, store: ParquetStore, started: float,
                           output_template: str) -> RunResult:
    units = work_units(spec.tasks)
    if spec.output.overwrite:
        store.delete_all()
    store.recover()
    # --retry-failed: error rows do not count as done, so planning redoes their units; the error rows
    # of the sources this run plans are dropped just before it runs (below), those of sources it does
    # not list (a narrower --include, a smaller manifest) stay, so no unit goes from "error" to missing.
    ledger = read_ledger(store, units, errors_done=not spec.output.retry_failed)
    warn_if_resuming_another_model(ledger, spec)

    try:
        plan = write_plan(spec, store, ledger, output_template)
    except FileNotFoundError:
        raise SpecError(f"input {spec.input.uri} does not exist") from None
    except PermissionError as exc:
        raise SpecError(redact(f"input {spec.input.uri} cannot be listed: access denied ({exc})")) from None
    if plan.stale:
        stale_set = pa.array(plan.stale)
        store.drop_rows(lambda t: pc.is_in(t["source_uri"], value_set=stale_set), ["source_uri"])
    if plan.retried:
        retried_set = pa.array(plan.retried)
        store.drop_rows(lambda t: pc.and_(pc.equal(t["status"], "error"), pc.is_in(t["source_uri"], value_set=retried_set)),
                        ["source_uri", "status"])
    ledger.forget(plan.stale)  # their rows are gone; the retried error rows never counted as done

    result = RunResult(run_id=spec.run_id, output=spec.output.uri, skipped_inputs=plan.skipped, planned_inputs=plan.planned)
    sink = ParquetSink(store, spec.run_id, spec.output.rows_per_file, spec.output.seconds_per_file)
    if plan.files:
        _run_pipeline(spec, derived, plan.files, store, ledger, sink, result)
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


def warn_if_resuming_another_model(ledger: Ledger, spec: JobSpec) -> None:
    """A resume skips what is published, whatever model made it: say so when the model changed, so one
    output does not silently mix two models (use a new output, or --overwrite, to redo everything)."""
    made_by_models = {m for m in ledger.models if not m.startswith(("tesseract:", "pymupdf-"))}
    if spec.needs_model and made_by_models and spec.model.id not in made_by_models:
        log.warning("output %s already holds rows made by %s; this run (%s) only adds what is missing. "
                    "Use a new output or --overwrite to redo everything with %s",
                    spec.output.uri, ", ".join(sorted(made_by_models)), spec.model.id, spec.model.id)


def _run_pipeline(spec: JobSpec, derived: Derived, plan_files: list[str], store: ParquetStore, ledger: Ledger,
                  sink: ParquetSink, result: RunResult) -> None:
    init_ray(spec)
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = 0  # never drop a block silently: failures are rows, not lost blocks
    bound_block_stats(ctx)  # Ray Data keeps a record per output block in the driver: only the latest
    # Bounded in-flight work, so memory stays flat from 500 pages to 5 million: the listing streams into
    # plan files; Ray Data starts tasks for a stage only while its output fits the stage's share of the
    # object-store budget (resource_limits: by default half the cluster's object store, re-read as nodes
    # join or leave, so it grows with the cluster, never with the input); each model replica holds at
    # most two batches (pipeline/processor.py). Ordered output would have to buffer every page finished
    # behind a slow one, so results leave in completion order (the Parquet keys say where rows belong).
    ctx.execution_options.preserve_order = False
    _quiet_ray_progress(ctx)  # before the dataset is made: it keeps a copy of the context
    plan = ray.data.read_parquet(plan_files, filesystem=PyFileSystem(FSSpecHandler(store.fs)))
    registry = start_registry(spec.routing, spec.run_id)  # None unless routing.dedup
    if registry is not None and spec.routing.dedup_across_runs and spec.needs_model:
        reused = seed_registry(registry, earlier_results(store, derived.prompts, derived.processor, spec.model.id))
        if reused:
            log.info("dedup: %d results of earlier runs can be reused by identical pages", reused)
    dataset = build_processor(spec, derived, registry)(plan)
    guard = SinkGuard(ledger)  # a unit published before, or delivered twice by Ray, is written once
    with Progress(result.planned_inputs, result.skipped_inputs, ledger.done_page_counts()) as progress:
        batches = dataset.iter_batches(batch_format="pyarrow", batch_size=None)
        if registry is not None:  # duplicates' placeholders are filled here and never reach the sink
            batches = DedupJoin(registry).join(batches)
        for batch in batches:
            progress.update(batch)  # before dropping re-done units: it counts pages out of the model
            batch = guard.drop_done(batch)
            statuses = batch["status"].to_pylist()
            result.ok_rows += statuses.count("ok")
            result.error_rows += statuses.count("error")
            sink.write(batch)


def _quiet_ray_progress(ctx) -> None:
    """Our progress line replaces Ray Data's bars (which would garble it on a terminal) and its
    per-operator log blocks (every few seconds in CI logs). SCRIPTORIUM_RAY_PROGRESS=1 keeps them,
    for looking into a stalled operator."""
    if os.environ.get("SCRIPTORIUM_RAY_PROGRESS") == "1":
        return
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)  # "finished in"
