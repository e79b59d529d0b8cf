"""Planning a run: the input's listing, checked against the ledger (what the output already holds), into
plan files of what is left to do; then the published rows the plan redoes are dropped.

A source is skipped when complete and unchanged; planned whole when new or changed since its rows were
made (those rows go); planned with its done pages and units when partly done, so the stages skip them;
and with --retry-failed its error rows go too, for the units they stood for to be made again. A resume
by another model than the one that made the output's rows is warned about, not refused.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scriptorium.connectors.ledger import Ledger
from scriptorium.connectors.listing import list_inputs, results_filter
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.connectors.storage import redact
from scriptorium.core.errors import SpecError
from scriptorium.core.schema import PLAN_SCHEMA, table_from_rows
from scriptorium.core.spec import JobSpec, TaskSpec
from scriptorium.core.units import Units, work_units

log = logging.getLogger("scriptorium")

PLAN_ROWS_PER_FILE = 200  # documents per plan file: one Ray read task each


@dataclass
class Plan:
    """What planning decided: the plan files to run, and the sources whose old rows must go first."""

    files: list[str] = field(default_factory=list)
    planned: int = 0  # sources in the plan files
    skipped: int = 0  # complete, unchanged sources
    stale: list[str] = field(default_factory=list)  # changed since their rows were made
    retried: list[str] = field(default_factory=list)  # with error rows this run redoes (--retry-failed)


def plan_run(spec: JobSpec, store: ParquetStore, ledger: Ledger, output_template: str) -> Plan:
    """Write the plan of this run and drop the published rows it redoes. An input that cannot be listed
    is a SpecError."""
    warn_if_resuming_another_model(ledger, spec)
    try:
        plan = write_plan(spec, store, ledger, output_template)
    except FileNotFoundError:
        raise SpecError(f"input {spec.input.uri} does not exist") from None
    except PermissionError as exc:
        raise SpecError(redact(f"input {spec.input.uri} cannot be listed: access denied ({exc})")) from None
    drop_redone_rows(store, ledger, plan)
    return plan


def write_plan(spec: JobSpec, store: ParquetStore, ledger: Ledger, output_template: str = "") -> Plan:
    """Stream the listing into plan files under `_work/<run_id>.<lease token>/`, skipping complete sources
    and results (an output inside its input; `output_template`: the output URI before `{run_id}` is set)."""
    results = results_filter(spec.input, spec.storage, output_template or spec.output.uri, store.own_files().owns_uri)
    listing = list_inputs(spec.input, spec.storage, skip=results)
    units_of = partial(units_of_source, spec.tasks, work_units(spec.tasks))
    plan = Plan()
    files = PlanFiles(store, store.work_folder(spec.run_id), plan)
    for row, units, source in ledger.look_up(listing, units_of):
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
        files.add(row)
    files.flush()
    return plan


def units_of_source(tasks: list[TaskSpec], job_units: Units, row: dict) -> Units:
    """What one listed source must have published: the job's units, or its own when it brings its QA
    questions (a manifest's per-document questions)."""
    return work_units(tasks, row["questions"]) if row.get("questions") else job_units


class PlanFiles:
    """Plan rows, written PLAN_ROWS_PER_FILE at a time as Parquet files into the run's work folder; each
    file written is added to `plan`."""

    def __init__(self, store: ParquetStore, work: str, plan: Plan):
        self.store, self.work, self.plan = store, work, plan
        self.buffer: list[dict] = []

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= PLAN_ROWS_PER_FILE:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        path = f"{self.work}/plan-{len(self.plan.files):06d}.parquet"
        self.store.fs.makedirs(self.work, exist_ok=True)
        out = io.BytesIO()
        pq.write_table(table_from_rows(self.buffer, PLAN_SCHEMA), out)
        self.store.fs.pipe_file(path, out.getvalue())
        self.plan.files.append(path)
        self.plan.planned += len(self.buffer)
        self.buffer.clear()


def drop_redone_rows(store: ParquetStore, ledger: Ledger, plan: Plan) -> None:
    """The rows of changed sources, and with --retry-failed the error rows of the sources this run plans.
    Error rows of sources it does not list (a narrower --include, a smaller manifest) stay, so no unit
    goes from "error" to missing."""
    if plan.stale:
        stale_set = pa.array(plan.stale)
        store.drop_rows(lambda t: pc.is_in(t["source_uri"], value_set=stale_set), ["source_uri"])
    if plan.retried:
        retried_set = pa.array(plan.retried)
        store.drop_rows(lambda t: pc.and_(pc.equal(t["status"], "error"), pc.is_in(t["source_uri"], value_set=retried_set)),
                        ["source_uri", "status"])
    ledger.forget(plan.stale)  # their rows are gone; the retried error rows never counted as done


def warn_if_resuming_another_model(ledger: Ledger, spec: JobSpec) -> None:
    """A resume skips what is published, whatever model made it: say so when the model changed, so one
    output does not silently mix two models (use a new output, or --overwrite, to redo everything)."""
    made_by_models = {m for m in ledger.models if not m.startswith(("tesseract:", "pymupdf-"))}
    if spec.needs_model and made_by_models and spec.model.id not in made_by_models:
        log.warning("output %s already holds rows made by %s; this run (%s) only adds what is missing. "
                    "Use a new output or --overwrite to redo everything with %s",
                    spec.output.uri, ", ".join(sorted(made_by_models)), spec.model.id, spec.model.id)
