"""Units of work: which (task, question) pairs a page or document row asks for, and how a unit is named.

A unit is (task, question): one result row per unit per page, or per document for tasks with
`scope = "document"` (page = DOCUMENT_PAGE). QA tasks without questions of their own ask each document's
manifest questions, one row per question. The driver (planning, the ledger), the routes and the model
stage all count units the same way, with these functions; none of them needs a model or a processor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from scriptorium.core.schema import DOCUMENT_PAGE
from scriptorium.core.spec import TaskSpec

NO_QUESTION = "task {task!r} has no question for this document: give it questions in the job spec or the manifest"


@dataclass(frozen=True)
class Units:
    """The (task name, question) pairs a source needs: on every page, and on its document row."""

    page: frozenset = frozenset()
    document: frozenset = frozenset()


def questions_for(task: TaskSpec, document_questions) -> list[str | None]:
    """The questions `task` asks of a document: its own, else the document's; [None] for non-QA tasks.

    A QA task with no question at all still gets one unit (question None), which becomes an error row:
    a document is never silently left out.
    """
    if task.kind != "qa":
        return [None]
    return list(task.questions) or list(document_questions or []) or [None]


def row_units(tasks: list[TaskSpec], page: int, document_questions=None) -> list[tuple[TaskSpec, str | None]]:
    """The (task, question) units of a page row (page >= 0) or of a document row (page = DOCUMENT_PAGE)."""
    scope = "document" if page == DOCUMENT_PAGE else "page"
    return [(task, question) for task in tasks if task.scope == scope
            for question in questions_for(task, document_questions)]


def open_units(tasks: list[TaskSpec], row: dict) -> list[tuple[TaskSpec, str | None]]:
    """The units of a page or document row still to do: its `row_units` less those published before
    this run (the row's `done_units`, set by the planner for pages that owe only some of their units)."""
    published = {(u["task"], u["question"]) for u in row.get("done_units") or [] if u["page"] == row["page"]}
    return [(task, question) for task, question in row_units(tasks, row["page"], row.get("questions"))
            if (task.task_name, question) not in published]


def work_units(tasks: list[TaskSpec], document_questions=None) -> Units:
    """What one document must have published to be complete."""

    def names(page: int) -> frozenset:
        return frozenset((t.task_name, q) for t, q in row_units(tasks, page, document_questions))

    return Units(page=names(0), document=names(DOCUMENT_PAGE))


def document_window(tasks: list[TaskSpec]) -> int:
    """How many leading pages a document row shows (0: no task has scope = "document")."""
    return max((t.document_pages for t in tasks if t.scope == "document"), default=0)


def units_by_page(plan_row: dict) -> dict[int, list[dict]]:
    """A plan row's `done_units` (units published on pages that still owe others), by page."""
    by_page: dict[int, list[dict]] = {}
    for unit in plan_row.get("done_units") or []:
        by_page.setdefault(unit["page"], []).append(unit)
    return by_page


def unit_key(source_uri: str, page: int, task: str, question: str | None) -> str:
    """One unit as a string (the crash journal's key): the values of KEY_COLUMNS, in order."""
    return json.dumps([source_uri, page, task, question])
