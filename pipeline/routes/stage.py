"""The routing stage, between rendering and preprocessing, and the answer stage of jobs without a model.

`RoutePages` tries the cheap routes on each ok page row, per (task, question) unit, in this order: the
text layer (routing.text_layer), identical pages (routing.dedup), Tesseract (routing.ocr_engine =
"tesseract"). Answered units ride on their page row (`routed`) to the answer stage, which emits them as
result rows without generating; a page whose every unit is answered drops its pixels and skips
preprocessing and the model. Everything else goes on to the model.
"""

from __future__ import annotations

from scriptorium.core.schema import DOCUMENT_PAGE
from scriptorium.core.spec import RoutingSpec, TaskSpec
from scriptorium.core.units import open_units
from scriptorium.pipeline.metrics import Meter
from scriptorium.pipeline.results import page_result
from scriptorium.pipeline.routes.dedup import route_duplicates
from scriptorium.pipeline.routes.tesseract import route_tesseract
from scriptorium.pipeline.routes.text_layer import route_text_layer
from scriptorium.pipeline.steps import AnswerStep, PageStep


class RoutePages(PageStep):
    """Page rows in, page rows with the units answered before the model (`routed`) out."""

    stage_name = "route"

    def __init__(self, tasks: list[TaskSpec], routing: RoutingSpec, registry=None, meter: Meter = Meter()):
        self.tasks = tasks
        self.routing = routing
        self.registry = registry  # the run's dedup registry actor (None: routing.dedup is off)
        self.meter = meter

    def process(self, rows: list[dict]) -> None:
        routable = [r for r in rows if r["page"] != DOCUMENT_PAGE]
        still_open = {}
        for row in routable:
            row["routed"] = []
            still_open[id(row)] = route_text_layer(row, open_units(self.tasks, row), self.routing)
        if self.registry is not None:
            route_duplicates(routable, still_open, self.registry)
        for row in routable:
            still_open[id(row)] = route_tesseract(row, still_open[id(row)], self.routing)
            if not still_open[id(row)]:
                row["image"] = None  # nothing left for the model: no preprocessing, lighter blocks
        self.meter.routed(routable)  # by route: route="dedup" counts the dedup hits


class AnswerWithoutModel(AnswerStep):
    """The last stage of a job that needs no model (every task is Tesseract OCR): page rows to results.
    A unit no route answered (which the spec check makes rare) is an error row saying why."""

    def __init__(self, tasks: list[TaskSpec], run_id: str = ""):
        self.tasks = tasks
        self.run_id = run_id

    def row_values(self, page: dict) -> dict:
        return {"run_id": self.run_id}

    def answer(self, units):
        return [page_result(page, task=task.task_name, question=question, status="error", stage="route",
                            run_id=self.run_id,
                            error=f"task {task.task_name!r} needs the model, and this job runs without one")
                for page, task, question in units]
