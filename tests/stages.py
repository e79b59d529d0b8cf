"""Run a job's stages in-process, in the order `pipeline/assemble.py` chains them, without Ray.

    plan rows -> RenderPages -> RoutePages (if routing) -> PreprocessPages -> Idefics2Generator -> results

Each stage is the real callable Ray Data would run; only the scheduling is left out. Model replicas are
cached per checkpoint (loading one costs a second or two), and given each job's PromptBook.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from connectors.storage import StorageOptions
from jobs.runner import open_model_config
from jobs.spec import JobSpec, ModelSpec, RenderSpec, TaskSpec
from pipeline.pages import RenderPages
from pipeline.preprocess import ImageSettings, PreprocessPages
from pipeline.prompts import PromptBook, document_window, load_examples, resolve_prompt_format
from pipeline.render_size import render_settings
from pipeline.routes import DedupJoin, RoutedResults, RoutePages
from pipeline.schema import PLAN_SCHEMA, table_from_rows

_replicas: dict = {}


def plan_row(path: Path, questions: list[str] | None = None, done_pages: list[int] | None = None) -> dict:
    """A planned input, as the lister (and the manifest reader, for `questions`) makes it."""
    kind = "pdf" if path.suffix == ".pdf" else "image"
    return {"source_uri": str(path), "size": path.stat().st_size, "etag": "test", "kind": kind,
            "questions": questions, "done_pages": done_pages}


def job(model: Path | str, tasks: list[TaskSpec], **sections) -> JobSpec:
    spec = JobSpec(model=ModelSpec(id=str(model), device="cpu", dtype="fp32"), tasks=tasks, run_id="test")
    for name, value in sections.items():
        setattr(spec, name, value)
    return spec


def replica(spec: JobSpec, settings: ImageSettings, book: PromptBook):
    from pipeline.generate import Idefics2Generator

    key = (spec.model.id, settings)
    if key not in _replicas:
        _replicas[key] = Idefics2Generator(spec.model, settings, book, run_id=spec.run_id, batch_size=8)
    generator = _replicas[key]
    generator.book = book
    return generator


def concat(tables) -> pa.Table:
    tables = list(tables)
    return pa.concat_tables(tables) if tables else None


def preprocessed(settings: ImageSettings, plan_rows: list[dict]) -> pa.Table:
    """Page rows of `plan_rows` as the model stage receives them: rendered, then preprocessed."""
    render = RenderPages(render_settings(RenderSpec(), settings), StorageOptions())
    return concat(PreprocessPages(settings)(concat(render(table_from_rows(plan_rows, PLAN_SCHEMA)))))


def run_stages(spec: JobSpec, plan_rows: list[dict], registry=None) -> list[dict]:
    """The result rows of `spec` over `plan_rows`, sorted by (source, page, task, question)."""
    if spec.needs_model:
        processor, settings = open_model_config(spec)
    else:
        processor, settings = None, ImageSettings()
    book = PromptBook(spec.tasks, resolve_prompt_format(processor, spec.model.prompt_format),
                      load_examples(spec.tasks, settings))
    render = RenderPages(render_settings(spec.render, settings), StorageOptions(),
                         document_window=document_window(spec.tasks),
                         page_rows=any(t.scope == "page" for t in spec.tasks))
    pages = concat(render(table_from_rows(plan_rows, PLAN_SCHEMA)))
    if spec.routing.text_layer or spec.routing.ocr_engine == "tesseract" or registry is not None:
        pages = concat(RoutePages(spec.tasks, spec.routing, registry)(pages))
    if spec.needs_model:
        results = concat(replica(spec, settings, book)(concat(PreprocessPages(settings)(pages))))
    else:
        results = concat(RoutedResults(spec.tasks, spec.run_id)(pages))
    if registry is not None:
        results = concat(DedupJoin(registry).join([results]))
    return sorted(results.to_pylist(), key=lambda r: (r["source_uri"], r["page"], r["task"], r["question"] or ""))
