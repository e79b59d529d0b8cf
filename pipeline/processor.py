"""The Ray Data processor: a job's stages as one function over Ray Datasets, documents in, result rows out.

    from scriptorium.core.spec import spec_from_dict
    from scriptorium.pipeline.processor import build_processor

    spec = spec_from_dict({"model": {"id": "HuggingFaceM4/idefics2-8b"}, "tasks": [{"kind": "ocr"}]})
    ocr = build_processor(spec)                       # loads the processor config once, here
    documents = ray.data.from_items([{"source_uri": "s3://bucket/scan.pdf"},
                                     {"source_uri": "photo.jpg", "data": jpeg_bytes}])
    ocr(documents).write_parquet("s3://bucket/ocr/")  # one row per page and task (core/schema.py)

A document row names its file (`source_uri`) and may carry its bytes (`data`) instead of a readable URI,
and its QA questions (`questions`); every other planning column is optional. The processor walks the
stages that `pipeline/stages.py` declares, each with its resources: CPU tasks for rendering, routing and
preprocessing, an actor pool with one model replica per actor (and `num_gpus` per replica on GPU
clusters) for generation. The code never assumes a GPU exists. `scriptorium run` is built on it and adds
what a job has around it: planning against the output (resume), the Parquet sink, dedup's driver join,
progress and the summary.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import ray

from scriptorium.core.kinds import kind_of
from scriptorium.core.schema import PLAN_SCHEMA
from scriptorium.core.spec import JobSpec
from scriptorium.pipeline.stages import Derived, Stage, derive, job_stages


def build_processor(spec: JobSpec, derived: Derived | None = None, dedup_registry=None) -> "Processor":
    """The processor of `spec`'s model, tasks, render, routing and resources sections (its input and
    output sections are the caller's business here)."""
    spec.check_processable()
    return Processor(job_stages(spec, derived or derive(spec), dedup_registry))


class Processor:
    def __init__(self, stages: list[Stage]):
        self.stages = stages

    def __call__(self, documents: ray.data.Dataset) -> ray.data.Dataset:
        dataset = documents.map_batches(as_plan_rows, batch_format="pyarrow")
        for stage in self.stages:
            dataset = map_stage(dataset, stage)
        return dataset


def as_plan_rows(documents: pa.Table) -> pa.Table:
    """Document rows with the planning columns they lack: the kind from the file name, nulls elsewhere."""
    columns = {}
    for field in PLAN_SCHEMA:
        if field.name in documents.column_names:
            columns[field.name] = documents[field.name].cast(field.type)
        elif field.name == "kind":
            names = documents["source_uri"].to_pylist()
            columns["kind"] = pa.array([kind_of(posixpath.basename(n or "")) for n in names], pa.string())
        else:
            columns[field.name] = pa.nulls(documents.num_rows, field.type)
    return pa.table(columns, schema=PLAN_SCHEMA)


def map_stage(dataset: ray.data.Dataset, stage: Stage) -> ray.data.Dataset:
    """One declared stage over a dataset, with its resources. Repartitions stream (no shuffle, nothing is
    materialized)."""
    if stage.rows_per_block:
        dataset = dataset.repartition(target_num_rows_per_block=stage.rows_per_block)
    options = dict(batch_size=stage.rows_per_call, batch_format="pyarrow", **stage.resources)
    if not stage.replicas:  # a stateless step: built here, pickled to each task
        return dataset.map_batches(stage.step(**stage.kwargs), **options)
    return dataset.map_batches(
        stage.step,
        fn_constructor_kwargs=stage.kwargs,
        # Two blocks in flight per replica: while one batch generates, the next one's blocks are already
        # fetched to the replica's node, so the GPU does not wait for the object store between batches.
        compute=ray.data.ActorPoolStrategy(size=stage.replicas, max_tasks_in_flight_per_actor=2,
                                           max_concurrent_calls_per_actor=stage.concurrent_calls,
                                           # A synchronous step's calls then run in threads at once (Ray
                                           # Data serialises them otherwise); an async step's, on its loop.
                                           enable_true_multi_threading=stage.concurrent_calls > 1),
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: a replica that dies
        # (OOM, CUDA error, killed) is restarted and its batch retried, so no page is lost with it.
        **options,
    )
