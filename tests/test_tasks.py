"""The task catalogue: OCR, short and detailed captions, document QA (questions from the job spec or per
document from a manifest), custom prompts; several tasks in one pass over a page; generation settings
recorded per row; resume with per-document questions."""

from __future__ import annotations

import json

import pytest

from scriptorium.pipeline import family
from scriptorium.pipeline.render import stage as render_stage
from scriptorium.connectors.ledger import read_ledger
from scriptorium.connectors.listing import list_inputs
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.errors import SpecError
from scriptorium.core.schema import RESULT_SCHEMA, table_from_rows
from scriptorium.core.spec import InputSpec, JobSpec, OutputSpec, StorageSpec, TaskSpec
from scriptorium.core.units import work_units
from scriptorium.pipeline.model.loading import load_processor
from scriptorium.pipeline.model.outputs import generated_output
from tests.conftest import job, make_pdf, plan_row, run_stages


@pytest.fixture(scope="module")
def two_pages(tmp_path_factory):
    return make_pdf(tmp_path_factory.mktemp("docs") / "letter.pdf",
                    ["Dear reader,\nthe invoice total is 42 euros.", "Signed, the archivist. 3 March 2024"])


def counting(monkeypatch, module, name: str) -> list:
    """Count the calls of module.name (which still runs as usual)."""
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_every_task_kind_in_one_pass(tiny_model, two_pages, monkeypatch):
    tasks = [
        TaskSpec(kind="ocr", max_new_tokens=4),
        TaskSpec(kind="caption", max_new_tokens=4),
        TaskSpec(kind="caption", name="caption_detailed", detail="detailed", max_new_tokens=4),
        TaskSpec(kind="qa", questions=["What is the total?", "Who signed?"], max_new_tokens=4),
        TaskSpec(kind="custom", name="keywords", prompt="List three keywords for this page.", max_new_tokens=4),
    ]
    reads = counting(monkeypatch, render_stage, "pages_of")
    resizes = counting(monkeypatch, family, "model_crops")
    rows = run_stages(job(tiny_model, tasks), [plan_row(two_pages)])

    # Read and rendered once, preprocessed once per page, six rows per page.
    assert len(reads) == 1 and len(resizes) == 2
    assert [(r["page"], r["task"], r["question"]) for r in rows] == [
        (page, task, question) for page in (0, 1) for task, question in [
            ("caption", None), ("caption_detailed", None), ("keywords", None), ("ocr", None),
            ("qa", "What is the total?"), ("qa", "Who signed?")]
    ]
    assert all(r["status"] == "ok" and r["route"] == "model" and r["n_output_tokens"] > 0 for r in rows)
    instruction = {r["task"]: r["prompt"] for r in rows if r["page"] == 0 and r["task"] != "qa"}
    assert instruction == {
        "ocr": "User:<image>Transcribe all the text on this page, in reading order.<end_of_utterance>\nAssistant:",
        "caption": "User:<image>Describe this image in one sentence.<end_of_utterance>\nAssistant:",
        "caption_detailed": "User:<image>Describe this image in detail.<end_of_utterance>\nAssistant:",
        "keywords": "User:<image>List three keywords for this page.<end_of_utterance>\nAssistant:",
    }


def test_manifest_questions_give_one_row_per_question(tiny_model, tmp_path):
    a = make_pdf(tmp_path / "a.pdf", ["Contract between Ada and Bob, 2021."])
    b = make_pdf(tmp_path / "b.pdf", ["Receipt. Total: 12.50"])
    c = make_pdf(tmp_path / "c.pdf", ["A page nobody asked about."])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(entry) for entry in [
        {"uri": "a.pdf", "questions": ["Who signed?", "When?"]},
        {"uri": "b.pdf", "question": "What is the total?"},
        {"uri": "c.pdf"},
    ]))
    plan = list(list_inputs(InputSpec(uri=str(manifest), manifest=True), StorageSpec()))
    tasks = [TaskSpec(kind="qa", max_new_tokens=3),  # no questions of its own: each document's
             TaskSpec(kind="qa", name="language", questions=["Which language is this?"], max_new_tokens=3)]
    spec = job(tiny_model, tasks, input=InputSpec(uri=str(manifest), manifest=True),
               output=OutputSpec(uri=str(tmp_path / "out")))
    spec.check_runnable()  # a QA task without questions is fine when the manifest brings them
    rows = run_stages(spec, plan)

    by_source = {}
    for r in rows:
        by_source.setdefault(r["source_uri"], []).append((r["task"], r["question"], r["status"]))
    assert by_source[str(a)] == [("language", "Which language is this?", "ok"), ("qa", "When?", "ok"),
                                 ("qa", "Who signed?", "ok")]
    assert by_source[str(b)] == [("language", "Which language is this?", "ok"), ("qa", "What is the total?", "ok")]
    # A document without questions is not dropped: its QA unit is an error row saying why.
    assert by_source[str(c)] == [("language", "Which language is this?", "ok"), ("qa", None, "error")]
    [missing] = [r for r in rows if r["source_uri"] == str(c) and r["task"] == "qa"]
    assert "no question for this document" in missing["error"]
    with pytest.raises(SpecError, match="needs a question"):
        JobSpec(input=InputSpec(uri="x"), output=spec.output, model=spec.model,
                tasks=[TaskSpec(kind="qa")]).check_runnable()


def test_resume_knows_each_documents_own_questions(tmp_path):
    """The ledger checks a document against its own units: new manifest questions make it incomplete."""
    store = ParquetStore(str(tmp_path / "out"))
    tasks = [TaskSpec(kind="ocr"), TaskSpec(kind="qa"),
             TaskSpec(kind="caption", name="overview", scope="document")]

    def rows(page, units):
        return [{"source_uri": "a.pdf", "page": page, "n_pages": 2, "task": t, "question": q, "status": "ok",
                 "source_etag": "v1"} for t, q in units]

    published = rows(0, [("ocr", None), ("qa", "Who?")]) + rows(1, [("ocr", None), ("qa", "Who?")])
    store.publish(table_from_rows(published, RESULT_SCHEMA), "part-run1-000001-00000001.parquet")
    ledger = read_ledger(store, work_units(tasks))
    one_question = work_units(tasks, ["Who?"])
    assert ledger.done_pages_of("a.pdf", one_question) == [0, 1]  # pages done, document row (-1) not
    assert not ledger.is_complete("a.pdf", "v1", one_question)

    store.publish(table_from_rows(rows(-1, [("overview", None)]), RESULT_SCHEMA), "part-run1-000002-00000002.parquet")
    ledger = read_ledger(store, work_units(tasks))
    assert ledger.is_complete("a.pdf", "v1", one_question)
    two_questions = work_units(tasks, ["Who?", "When?"])  # the manifest gained a question
    assert not ledger.is_complete("a.pdf", "v1", two_questions)
    assert ledger.done_pages_of("a.pdf", two_questions) == [-1]
    assert not ledger.is_complete("a.pdf", "v2", one_question)  # the source changed


def test_generation_settings_are_recorded_and_truncation_is_detected(tiny_model, two_pages):
    greedy = TaskSpec(kind="ocr", max_new_tokens=6)
    sampled = TaskSpec(kind="caption", max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9,
                       repetition_penalty=1.3)
    rows = run_stages(job(tiny_model, [greedy, sampled]), [plan_row(two_pages)])
    for row in rows:
        task = greedy if row["task"] == "ocr" else sampled
        assert json.loads(row["generation"]) == {
            "max_new_tokens": 6, "repetition_penalty": task.repetition_penalty, "do_sample": task.do_sample,
            "temperature": task.temperature, "top_p": task.top_p, "stop_strings": []}
        assert row["max_new_tokens"] == 6
        # Random weights never say </s> this early: every row ran out of tokens, and says so.
        assert row["n_output_tokens"] == 6 and row["truncated"] is True

    # A stop string found in that output ends generation there: shorter, not truncated, stop string cut.
    first = next(r for r in rows if r["task"] == "ocr" and r["page"] == 0)
    stop = next(ch for i, ch in enumerate(first["text"]) if i > 0 and ch.isalnum() and ch not in first["text"][:i])
    stopping = TaskSpec(kind="ocr", max_new_tokens=6, stop_strings=[stop])
    [row, _] = run_stages(job(tiny_model, [stopping]), [plan_row(two_pages)])
    assert row["text"] == first["text"][: first["text"].index(stop)].strip()
    assert row["truncated"] is False and row["n_output_tokens"] < 6
    assert json.loads(row["generation"])["stop_strings"] == [stop]


def test_how_a_generated_sequence_ends(tiny_model):
    tokenizer = load_processor(str(tiny_model)).tokenizer
    words = tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def decode(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=True)

    # Ended by itself; the padding generate adds while the rest of the batch goes on is not counted.
    assert generated_output(words + [eos, pad, pad], {eos}, (), decode) == (len(words) + 1, True, "the quick brown fox")
    # Ran out of tokens: as many as produced, not finished (the caller compares with max_new_tokens).
    assert generated_output(words, {eos}, (), decode) == (len(words), False, "the quick brown fox")
    # Stopped at a stop string: counted up to the token that completed it, text cut before it.
    n, finished, text = generated_output(words + [pad, pad], {eos}, ("brown",), decode)
    assert finished and text == "the quick" and decode(words[:n]).endswith("brown")
    assert "brown" not in decode(words[: n - 1])
