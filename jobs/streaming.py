"""A plan through the job's stages on Ray Data (pipeline/processor.py), its results into the sink.

Results leave Ray in completion order. Each batch goes to the progress line, then through the dedup
join (duplicates' placeholders filled) and the sink guard (a unit published before, or delivered twice
by Ray, is written once) into the Parquet sink; the rows written are counted in the metrics
(pipeline/metrics.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray.data
from pyarrow.fs import FSSpecHandler, PyFileSystem

from scriptorium.connectors.ledger import Ledger
from scriptorium.connectors.parquet_sink import ParquetSink, ParquetStore
from scriptorium.connectors.sink_guard import SinkGuard
from scriptorium.core.spec import JobSpec
from scriptorium.jobs.planning import Plan
from scriptorium.jobs.progress import Progress
from scriptorium.jobs.ray_setup import tune_ray_data
from scriptorium.pipeline.metrics import Meter
from scriptorium.pipeline.processor import build_processor
from scriptorium.pipeline.routes.dedup import DedupJoin, earlier_results, seed_registry, start_registry
from scriptorium.pipeline.stages import Derived

log = logging.getLogger("scriptorium")


@dataclass
class RowCounts:
    """Rows written by status."""

    ok: int = 0
    error: int = 0


def run_stages(spec: JobSpec, derived: Derived, plan: Plan, store: ParquetStore, ledger: Ledger,
               sink: ParquetSink) -> RowCounts:
    """Run `plan`'s files through the stages on the Ray this process has joined; write every new result."""
    tune_ray_data(ray.data.DataContext.get_current(), spec.resources)  # before the dataset copies it
    plan_rows = ray.data.read_parquet(plan.files, filesystem=PyFileSystem(FSSpecHandler(store.fs)))
    registry = start_registry(spec.routing, spec.run_id)  # None unless routing.dedup
    if registry is not None and spec.routing.dedup_across_runs and spec.needs_model:
        reused = seed_registry(registry, earlier_results(store, derived.prompts, derived.processor, spec.model.id))
        if reused:
            log.info("dedup: %d results of earlier runs can be reused by identical pages", reused)
    dataset = build_processor(spec, derived, registry)(plan_rows)
    guard = SinkGuard(ledger)
    counts = RowCounts()
    meter = Meter(spec.run_id, spec.resources.metrics)  # rows counted where they are written
    with Progress(plan.planned, plan.skipped, ledger.done_page_counts()) as progress:
        batches = dataset.iter_batches(batch_format="pyarrow", batch_size=None)
        if registry is not None:  # duplicates' placeholders are filled here and never reach the sink
            batches = DedupJoin(registry).join(batches)
        for batch in batches:
            progress.update(batch)  # before dropping re-done units: it counts pages out of the model
            batch = guard.drop_done(batch)
            statuses = batch["status"].to_pylist()
            counts.ok += statuses.count("ok")
            counts.error += statuses.count("error")
            sink.write(batch)
            meter.rows(batch)
            meter.progress(plan.planned, progress.docs_done, progress.eta_s)
    return counts
