"""Result rows: the one place a page row becomes the rows of its units (one per task and question).

Every stage that emits results (the model stage, and the answer stage of jobs without a model) builds
them here, by one rule: units answered before the model (routes) take their answer, every unit of a
failed page is an error row with the page's error, a QA unit without a question is an error row saying
so, and only the units left are handed to the stage's own answerer.
"""

from __future__ import annotations

from typing import Callable

from scriptorium.core.spec import TaskSpec
from scriptorium.core.units import NO_QUESTION, open_units


def page_result(page: dict, **values) -> dict:
    """The columns of a result row that come from its page row, plus `values`."""
    return {
        "source_uri": page["source_uri"],
        "page": page["page"],
        "n_pages": page.get("n_pages"),
        "member": page.get("member"),
        "width": page.get("width"),
        "height": page.get("height"),
        "source_size": page.get("size"),
        "source_etag": page.get("etag"),
        "content_hash": page.get("content_hash"),
        **values,
    }


def routed(task: TaskSpec, question: str | None, **values) -> dict:
    """A unit answered before the model, as it rides on its page row (`routed`) to the answer stage."""
    return {"task": task.task_name, "question": question, **values}


def unit_rows(page: dict, tasks: list[TaskSpec], answer_open: Callable[[TaskSpec, str | None], dict | None],
              **extra) -> list[dict]:
    """One result row per unit of `page` not published before this run (`done_units`): routed units from
    their answers, units of a failed page and QA units without a question as error rows, and the rest
    through `answer_open(task, question)` (a row, or None when the caller answers it later). `extra`
    columns (run_id, model, ...) go on every row."""
    answered = {(r["task"], r["question"]): r for r in page.get("routed") or []}
    rows = []
    for task, question in open_units(tasks, page):
        unit = {**extra, "task": task.task_name, "question": question}
        done = answered.get((task.task_name, question))
        if done is not None:  # its own values (model, text, ...) over the caller's defaults
            rows.append(page_result(page, **{**unit, **{k: v for k, v in done.items() if v is not None}}))
        elif page["status"] != "ok":
            rows.append(page_result(page, **unit, status="error", error=page["error"], stage=page["stage"]))
        elif task.kind == "qa" and question is None:
            rows.append(page_result(page, **unit, status="error", stage="plan",
                                    error=NO_QUESTION.format(task=task.task_name)))
        else:
            row = answer_open(task, question)
            if row is not None:
                rows.append(row)
    return rows
