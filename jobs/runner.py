"""Run a job: check it, plan it against the ledger, stream it through Ray, publish results.

    spec -> check model & output -> ledger (what is done) -> plan (what is left) -> Ray Data graph
         -> results streamed to the Parquet sink -> run summary
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from connectors.ledger import Ledger, read_ledger
from connectors.listing import list_inputs
from connectors.parquet_sink import OutputError, ParquetSink, ParquetStore
from connectors.storage import StorageOptions, redact
from jobs.spec import JobSpec, SpecError
from pipeline.schema import PLAN_SCHEMA, table_from_rows

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


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]


def check_run_id(run_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        raise SpecError(f"run_id {run_id!r} may only contain letters, digits, '-' and '_' (at most 64)")
    return run_id


def open_model_config(spec: JobSpec):
    """Load the checkpoint's processor in the driver: fails fast on a missing model, gives image settings."""
    from pipeline.generate import load_processor
    from pipeline.preprocess import ImageSettings

    model_id = spec.model.id
    looks_local = model_id.startswith((".", "/", "~")) or os.path.sep in model_id.strip("/").split("/", 1)[-1]
    if looks_local and not os.path.isdir(os.path.expanduser(model_id)):
        raise SpecError(f"model path {model_id} does not exist: build one with `scriptorium tiny-model DIR` "
                        "or pass a hub id such as HuggingFaceM4/idefics2-8b")
    try:
        processor = load_processor(model_id)
    except Exception as exc:
        raise SpecError(
            f"cannot load model {model_id!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
            "Pass a local checkpoint directory, or a hub id with network access (unset HF_HUB_OFFLINE)"
        ) from None
    overrides = {
        "do_image_splitting": spec.model.do_image_splitting,
        "longest_edge": spec.model.longest_edge,
        "shortest_edge": spec.model.shortest_edge,
    }
    settings = ImageSettings.from_processor(processor, overrides)
    return processor, settings


def init_ray(spec: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = spec.resources.address or os.environ.get("SCRIPTORIUM_RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    # Ray schedules by logical CPUs. With as many as cores, one model actor plus render tasks can
    # leave no CPU for Ray Data's own read/write tasks on a 2-core machine and the job stalls, so a
    # local Ray gets at least 4 logical CPUs; the OS shares the real cores between them.
    num_cpus = spec.resources.ray_num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level=logging.WARNING)


def write_plan(spec: JobSpec, store: ParquetStore, storage: StorageOptions, ledger: Ledger) -> tuple[list[str], int, list[str]]:
    """Stream the listing into plan files under `_work/<run_id>/`, skipping complete sources.

    Returns (plan file paths, number of skipped sources, stale sources whose old rows must go).
    """
    work = f"{store.root}/_work/{spec.run_id}"
    paths, buffer, skipped, stale = [], [], 0, []

    def flush():
        if buffer:
            path = f"{work}/plan-{len(paths):06d}.parquet"
            store.fs.makedirs(work, exist_ok=True)
            import pyarrow.parquet as pq
            import io

            out = io.BytesIO()
            pq.write_table(table_from_rows(buffer, PLAN_SCHEMA), out)
            store.fs.pipe_file(path, out.getvalue())
            paths.append(path)
            buffer.clear()

    for row in list_inputs(spec.input, storage):
        uri, etag = row["source_uri"], row["etag"]
        if ledger.is_complete(uri, etag):
            skipped += 1
            continue
        if ledger.is_stale(uri, etag):
            stale.append(uri)
        else:
            row["done_pages"] = ledger.done_pages.get(uri)
        buffer.append(row)
        if len(buffer) >= PLAN_ROWS_PER_FILE:
            flush()
    flush()
    return paths, skipped, stale


def run_job(spec: JobSpec) -> RunResult:
    """Run `spec` to completion (or resume it). Raises SpecError/OutputError for job-level problems."""
    started = time.monotonic()
    spec.validate()
    spec.run_id = check_run_id(spec.run_id or new_run_id())
    storage = StorageOptions.from_spec(spec.storage)
    processor, image_settings = open_model_config(spec)

    from pipeline.prompts import plan_prompts, resolve_prompt_format

    prompt_format = resolve_prompt_format(processor, spec.model.prompt_format)
    plans = plan_prompts(processor, spec.tasks, prompt_format)
    units = {(p.task, p.question) for p in plans}

    store = ParquetStore(spec.output.uri, storage)
    store.ensure_writable()
    if spec.output.overwrite:
        store.delete_all()
    store.recover()
    if spec.output.retry_failed:
        store.drop_rows(lambda t: pc.equal(t["status"], "error"), ["status"])
    ledger = read_ledger(store, units)

    try:
        plan_files, skipped, stale = write_plan(spec, store, storage, ledger)
    except FileNotFoundError:
        raise SpecError(f"input {spec.input.uri} does not exist") from None
    except PermissionError as exc:
        raise SpecError(redact(f"input {spec.input.uri} cannot be listed: access denied ({exc})")) from None
    if stale:
        stale_set = pa.array(stale)
        store.drop_rows(lambda t: pc.is_in(t["source_uri"], value_set=stale_set), ["source_uri"])
        ledger = read_ledger(store, units)

    result = RunResult(run_id=spec.run_id, output=spec.output.uri, skipped_inputs=skipped)
    sink = ParquetSink(store, spec.run_id, spec.output.rows_per_file, spec.output.seconds_per_file)
    if plan_files:
        result.planned_inputs = _run_pipeline(spec, plan_files, store, storage, image_settings, plans, ledger, sink, result)
    sink.close()
    if store.fs.exists(f"{store.root}/_work/{spec.run_id}"):
        store.fs.rm(f"{store.root}/_work/{spec.run_id}", recursive=True)
    result.rows_written = sink.rows_written
    result.files = sink.published
    result.wall_s = time.monotonic() - started
    write_summary(store, spec, result)
    return result


def _run_pipeline(spec, plan_files, store, storage, image_settings, plans, ledger, sink, result) -> int:
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from pipeline.assemble import build_dataset

    init_ray(spec)
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = 0  # never drop a block silently: failures are rows, not lost blocks
    plan = ray.data.read_parquet(plan_files, filesystem=PyFileSystem(FSSpecHandler(store.fs)))
    n_planned = sum(store.read(p, ["source_uri"]).num_rows for p in plan_files)
    dataset = build_dataset(plan, spec, image_settings, plans, storage)
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        if ledger.done_keys:
            batch = _drop_done(batch, ledger.done_keys)
        statuses = batch["status"].to_pylist()
        result.ok_rows += statuses.count("ok")
        result.error_rows += statuses.count("error")
        sink.write(batch)
    return n_planned


def _drop_done(batch: pa.Table, done: set[tuple]) -> pa.Table:
    keys = zip(*(batch[c].to_pylist() for c in ("source_uri", "page", "task", "question")))
    keep = [key not in done for key in keys]
    return batch.filter(pa.array(keep))


def write_summary(store: ParquetStore, spec: JobSpec, result: RunResult) -> None:
    """A small JSON next to the output (hidden from dataset readers by its `_` prefix)."""
    summary = {
        "run_id": result.run_id,
        "output": result.output,
        "planned_inputs": result.planned_inputs,
        "skipped_inputs": result.skipped_inputs,
        "rows_written": result.rows_written,
        "ok_rows": result.ok_rows,
        "error_rows": result.error_rows,
        "wall_s": round(result.wall_s, 3),
        "model": spec.model.id,
        "tasks": [t.task_name for t in spec.tasks],
    }
    store.fs.pipe_file(f"{store.root}/_runs/{result.run_id}/summary.json", json.dumps(summary, indent=2).encode())
