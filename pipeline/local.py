"""The in-process runner: a job's stages walked in this process, without Ray, over a few plan rows.

It runs the same declared stages (stages.py) with the same steps and the same rows per call as the Ray
Data processor; only the scheduling is left out. The tests use it to run what a job runs, and it checks
every table against the schema its stage declares, so a stage that drifts from its contract fails here.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import pyarrow as pa

from scriptorium.core.schema import PLAN_SCHEMA, table_from_rows
from scriptorium.core.spec import JobSpec
from scriptorium.pipeline.routes.dedup import DedupJoin
from scriptorium.pipeline.stages import Derived, Stage, derive, job_stages
from scriptorium.pipeline.steps import step_results


def walk(stages: list[Stage], tables: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """Tables through each stage in turn: each step built once, fed `rows_per_call` rows at a time."""
    for stage in stages:
        tables = _through(stage, tables)
    return iter(tables)


def _through(stage: Stage, tables: Iterable[pa.Table]) -> Iterator[pa.Table]:
    step = stage.step(**stage.kwargs)
    for table in tables:
        _check(table, stage.input_schema, f"input of stage {stage.name}")
        for start in range(0, table.num_rows, stage.rows_per_call):
            for out in step_results(step(table.slice(start, stage.rows_per_call))):
                _check(out, stage.output_schema, f"output of stage {stage.name}")
                yield out


def _check(table: pa.Table, schema: pa.Schema, what: str) -> None:
    if not table.schema.equals(schema):
        raise TypeError(f"the {what} does not have its declared schema:\n{table.schema}\nexpected:\n{schema}")


def run_in_process(spec: JobSpec, plan_rows: list[dict], derived: Derived | None = None,
                   dedup_registry=None) -> pa.Table:
    """The result rows of `spec` over `plan_rows` (rows of PLAN_SCHEMA), as a job would make them; with
    a dedup registry, duplicates are joined as the driver joins them."""
    stages = job_stages(spec, derived or derive(spec), dedup_registry)
    results = walk(stages, [table_from_rows(plan_rows, PLAN_SCHEMA)])
    if dedup_registry is not None:
        results = DedupJoin(dedup_registry).join(results)
    tables = [t for t in results if t.num_rows]
    return pa.concat_tables(tables) if tables else stages[-1].output_schema.empty_table()
