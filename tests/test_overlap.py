"""A static replica works on two blocks at once (Ray Data calls it from two threads): one block's crops are
decompressed and encoded while the other block's batches decode, and the rows are those of one block after
the other."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from scriptorium.core.spec import TaskSpec
from scriptorium.pipeline.model.loading import open_model_config
from scriptorium.pipeline.model.stage import GenerateAnswers
from scriptorium.pipeline.prompts import PromptBook
from scriptorium.pipeline.stages import derive, job_stages, stage_named
from tests.conftest import job, make_image, plan_row, preprocessed

TASKS = [TaskSpec(kind="ocr", max_new_tokens=12), TaskSpec(kind="caption", max_new_tokens=12)]


def replica(spec, settings) -> GenerateAnswers:
    return GenerateAnswers(spec.model, settings, PromptBook(spec.tasks, "instruct", {}), batch_size=2)


def rows_of(tables) -> list[dict]:
    rows = [row for table in tables for row in pa.concat_tables(table).to_pylist()]
    return sorted(rows, key=lambda r: (r["source_uri"], r["task"]))


def test_two_blocks_at_once_give_the_rows_of_one_block_after_the_other(tiny_model, tmp_path, monkeypatch):
    pages = [make_image(tmp_path / f"p{i}.png", size=(300 + 40 * i, 400), color=(30 * i, 90, 160), text=f"page {i}")
             for i in range(6)]
    spec = job(tiny_model, TASKS)
    _, settings = open_model_config(spec.model)
    table = preprocessed(spec, [plan_row(p) for p in pages])
    blocks = [table.slice(0, 3), table.slice(3)]
    one_after_the_other = rows_of([replica(spec, settings)(block) for block in blocks])

    from scriptorium.pipeline.model import features, stage

    encoded = {"ahead": 0, "per batch": 0}

    def counting(name, encode):
        def encode_and_count(*args, **kwargs):
            encoded[name] += 1
            return encode(*args, **kwargs)
        return encode_and_count

    monkeypatch.setattr(features, "encode_crops", counting("ahead", features.encode_crops))
    monkeypatch.setattr(stage, "encode_crops", counting("per batch", stage.encode_crops))
    both = replica(spec, settings)
    with ThreadPoolExecutor(2) as threads:
        at_once = rows_of(threads.map(lambda block: list(both(block)), blocks))

    assert [(r["source_uri"], r["task"], r["status"], r["text"], r["n_output_tokens"]) for r in at_once] == \
           [(r["source_uri"], r["task"], r["status"], r["text"], r["n_output_tokens"]) for r in one_after_the_other]
    assert len(at_once) == 12 and all(r["status"] == "ok" for r in at_once)
    # Each block's crops went through the vision tower once, ahead of its batches (2 tasks x 2 batches).
    assert encoded == {"ahead": 2, "per batch": 0}


def test_the_model_stage_takes_two_blocks_at_once_in_both_engines(tiny_model):
    for engine in ("static", "continuous"):
        spec = job(tiny_model, TASKS).updated(model={"engine": engine})
        model_stage = stage_named(job_stages(spec, derive(spec)), "generate")
        assert (model_stage.name, model_stage.concurrent_calls) == ("generate", 2), engine
