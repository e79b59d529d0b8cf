"""The two shapes of step every stage runs, and the one rule for rows that already failed.

A step is a callable over Arrow tables, as Ray Data's `map_batches` wants (and `pipeline/local.py` calls
in-process): a table in, tables out, with the schemas it declares (`input_schema`, `output_schema`).

- A `PageStep` (routes, preprocessing) turns page rows into page rows. A row that failed in an earlier
  stage passes through untouched, only fitted to the output schema; the ok rows go to its `process`,
  which updates them in place and may fail them in turn (`fail`).
- An `AnswerStep` (the model, or the answer stage of a job without one) turns page rows into result rows,
  one per open unit of each page, by `pipeline.results.unit_rows`: answers made before the model, every
  unit of a failed page as an error row and QA units without a question as error rows come out the same
  way in every such step; only the units left go to its `answer`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Iterator

import pyarrow as pa

from scriptorium.core.schema import PAGE_SCHEMA, RESULT_SCHEMA, rows_of, table_from_rows
from scriptorium.core.spec import TaskSpec
from scriptorium.pipeline.metrics import Meter
from scriptorium.pipeline.results import unit_rows


def fail(row: dict, stage: str, error: str) -> None:
    """Mark a row as failed at `stage`: from here on every stage passes it through to the sink."""
    row.update(status="error", stage=stage, error=error)


class PageStep:
    input_schema = output_schema = PAGE_SCHEMA
    stage_name = ""  # its pages' stage label in the metrics (pipeline/metrics.py)
    meter = Meter()  # off unless the stage is given the run's

    def __call__(self, pages: pa.Table) -> Iterator[pa.Table]:
        rows = rows_of(pages)  # pixels as zero-copy buffers, not copied into Python bytes
        ok = [row for row in rows if row["status"] == "ok"]
        self.process(ok)
        self.meter.pages(self.stage_name, ok)
        yield table_from_rows(rows, self.output_schema)

    def process(self, rows: list[dict]) -> None:
        """Update ok page rows in place (failing some with `fail`)."""
        raise NotImplementedError


class AnswerStep:
    input_schema, output_schema = PAGE_SCHEMA, RESULT_SCHEMA
    tasks: list[TaskSpec]
    meter = Meter()  # off unless the step is given the run's
    replica = node = ""  # the model replica this step is, for its metrics' labels

    def __call__(self, pages: pa.Table) -> Iterator[pa.Table]:
        rows, wanted = self.split_units(pages)
        yield table_from_rows(rows + self.answer(wanted), self.output_schema)

    def split_units(self, pages: pa.Table) -> tuple[list[dict], list[tuple[dict, TaskSpec, str | None]]]:
        """The rows of the units the one rule answers, and the (page, task, question) units left."""
        self.meter.waited(self.replica, self.node, pages, time.time())  # preprocessed pages only
        rows, wanted = [], []
        for page in pages.to_pylist():
            def later(task, question, page=page):
                wanted.append((page, task, question))

            rows.extend(unit_rows(page, self.tasks, later, **self.row_values(page)))
        return rows, wanted

    def row_values(self, page: dict) -> dict:
        """Columns every result row of this step carries (run_id, model, replica...)."""
        return {}

    def answer(self, units: list[tuple[dict, TaskSpec, str | None]]) -> list[dict]:
        """Result rows for the (page, task, question) units no earlier stage answered."""
        raise NotImplementedError


def step_results(output) -> list[pa.Table] | Iterator[pa.Table]:
    """What a step's call gives: a step may be an async generator (the continuous engine's, which Ray
    Data runs on an event loop), collected here on a loop of its own."""
    if not hasattr(output, "__anext__"):
        return output

    async def collect():
        return [table async for table in output]

    return asyncio.run(collect())
