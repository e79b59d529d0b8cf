"""Extract tasks: answers constrained to a JSON Schema, landing as typed columns.

The tiny checkpoint's weights are random, so whatever it "reads" is noise: only the grammar can make its
answers valid JSON. Every ok row must follow the schema (checked with `jsonschema`, not with our own
code) and its typed column must hold exactly the parsed text; the constrained tokens must equal those of
an independent reference, the model card's snippet with llguidance's own mask loop around `generate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor

from scriptorium.core.errors import OutputError
from scriptorium.core.schema import DOCUMENT_PAGE
from scriptorium.core.spec import RenderSpec, TaskSpec, spec_from_dict
from scriptorium.jobs.cli import main
from scriptorium.pipeline.extraction import ParseExtractions, arrow_typed, load_schemas
from scriptorium.pipeline.stages import derive, job_stages, stage_named
from tests.conftest import job, make_image, make_pdf, make_scan_pdf, plan_row, run_stages
from tests.test_fidelity import load_reference, rendered_page

# Everything the issue asks the grammar to enforce, bounded so that random weights can close it.
RECORD = {
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "kind", "year", "amount", "signed", "parts"],
    "properties": {
        "title": {"type": "string", "maxLength": 4},
        "kind": {"enum": ["letter", "form", "photo", "other"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2030},
        "amount": {"type": "number", "minimum": 0, "maximum": 99},
        "signed": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
        "parts": {"type": "array", "maxItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {"name": {"type": "string", "maxLength": 3},
                           "count": {"type": "integer", "minimum": 0, "maximum": 9}}}},
        "place": {"type": "object", "additionalProperties": False, "required": ["city"],
                  "properties": {"city": {"type": "string", "maxLength": 3}, "empty": {"type": "null"}}},
    },
}
SUMMARY = {"type": "object", "additionalProperties": False, "required": ["pages", "handwritten"],
           "properties": {"pages": {"type": "integer", "minimum": 1, "maximum": 9}, "handwritten": {"type": "boolean"}}}
MAX_NEW_TOKENS = 160
TASKS = [
    TaskSpec(kind="extract", name="record", schema=RECORD, max_new_tokens=MAX_NEW_TOKENS),
    TaskSpec(kind="extract", name="summary", schema=SUMMARY, scope="document", document_pages=2,
             max_new_tokens=MAX_NEW_TOKENS),
    TaskSpec(kind="caption", max_new_tokens=4),
]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> list[Path]:
    """PDF pages, a scan and photos of odd sizes."""
    folder = tmp_path_factory.mktemp("mixed")
    return [make_pdf(folder / "report.pdf", ["Invoice 7\nTotal 12", "Thank you"], size=(612, 792)),
            make_scan_pdf(folder / "scan.pdf", dpi=40, text="A scanned letter"),
            make_image(folder / "photo.jpg", size=(300, 520), color=(200, 40, 40), text="photo"),
            make_image(folder / "wide.png", size=(700, 90), color=(20, 160, 90), text="wide")]


@pytest.fixture(scope="module")
def extracted(tiny_model, mixed) -> list[dict]:
    spec = job(tiny_model, TASKS, render=RenderSpec(page_edge=128))
    return run_stages(spec, [plan_row(path) for path in mixed])


def matches(typed, value) -> bool:
    """A typed column's value holds exactly the parsed JSON: a struct has a field per property (null
    where the answer left it out), numbers compare as numbers."""
    if isinstance(typed, dict):
        return isinstance(value, dict) and set(value) <= set(typed) and all(
            matches(typed[k], value.get(k)) for k in typed)
    if isinstance(typed, list):
        return isinstance(value, list) and len(typed) == len(value) and all(map(matches, typed, value))
    return typed == value and type(typed) is not bool or typed is value


def test_every_ok_answer_follows_its_schema_and_its_typed_column_holds_it(extracted):
    extract_rows = [r for r in extracted if r["task"] in ("record", "summary")]
    assert len(extract_rows) == 5 + 4  # a record per page (2 + 1 + 1 + 1), a summary per document
    ok = [r for r in extract_rows if r["status"] == "ok"]
    assert len(ok) >= 6, [(r["task"], r["error"]) for r in extract_rows]  # random weights, yet mostly closed
    for row in ok:
        value = json.loads(row["text"])
        jsonschema.validate(value, RECORD if row["task"] == "record" else SUMMARY)
        column, other = ("extract_record", "extract_summary") if row["task"] == "record" else \
            ("extract_summary", "extract_record")
        assert matches(row[column], value), (row[column], value)
        assert row[other] is None
        assert row["truncated"] is False and row["route"] == "model"
    assert {r["page"] for r in ok if r["task"] == "summary"} == {DOCUMENT_PAGE}
    for row in extracted:
        if row["task"] == "caption":
            assert row["extract_record"] is None and row["extract_summary"] is None
    # Answers differ between pages: the grammar constrains, the image still decides.
    assert len({r["text"] for r in ok if r["task"] == "record"}) > 1


def test_cut_answers_are_error_rows_that_keep_their_text(extracted):
    for row in extracted:
        if row["task"] in ("record", "summary") and row["status"] == "error":
            assert row["stage"] == "extract" and "max_new_tokens" in row["error"]
            assert row["text"] and row["n_output_tokens"] == MAX_NEW_TOKENS


def test_an_answer_that_cannot_close_within_max_new_tokens_is_an_error_row(tiny_model, mixed):
    tasks = [TaskSpec(kind="extract", name="record", schema=RECORD, max_new_tokens=5)]
    rows = run_stages(job(tiny_model, tasks, render=RenderSpec(page_edge=128)), [plan_row(mixed[2])])
    (row,) = rows
    assert (row["status"], row["stage"], row["truncated"]) == ("error", "extract", True)
    assert row["error"].startswith("the answer was cut at max_new_tokens = 5 before its JSON closed")
    assert row["text"].startswith('{"') and row["n_output_tokens"] == 5 and row["extract_record"] is None


class ReferenceMask(LogitsProcessor):
    """llguidance's documented loop for one sequence: take the chosen token, compute the next mask, apply
    it with the library's numpy kernel."""

    def __init__(self, tokenizer, vocab_size: int, eos: list[int], schema: dict):
        import llguidance
        import llguidance.hf

        tokens = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        self.matcher = llguidance.LLMatcher(tokens, grammar)
        self.vocab_size = vocab_size
        self.steps = 0

    def __call__(self, input_ids, scores):
        import llguidance.numpy as lnp

        if self.steps:
            assert self.matcher.consume_token(int(input_ids[0, -1])), self.matcher.get_error()
        self.steps += 1
        bitmask = lnp.allocate_token_bitmask(1, self.vocab_size)
        lnp.fill_next_token_bitmask(self.matcher, bitmask, 0)
        logits = scores.numpy().copy()
        lnp.apply_token_bitmask_inplace(logits, bitmask)
        return torch.from_numpy(logits)


def test_constrained_tokens_equal_the_snippet_with_llguidances_own_mask(tiny_model, extracted):
    processor, model = load_reference(tiny_model)
    tokenizer = processor.tokenizer
    eos = sorted({tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.eos_token_id})
    vocab = model.get_output_embeddings().out_features
    compared = 0
    for row in extracted:
        if row["task"] != "record" or row["page"] == DOCUMENT_PAGE:
            continue
        assert json.dumps(RECORD, separators=(",", ":")) in row["prompt"]  # the instruction shows the schema
        image = rendered_page(row["source_uri"], row["page"], row["width"], row["height"]) \
            if row["source_uri"].endswith(".pdf") else Image.open(row["source_uri"])
        inputs = processor(text=row["prompt"], images=[[image]], return_tensors="pt")
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                       logits_processor=[ReferenceMask(tokenizer, vocab, eos, RECORD)])
        new = generated[0, inputs["input_ids"].shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        assert (row["text"], row["n_output_tokens"]) == (text, len(new)), row["source_uri"]
        compared += 1
    assert compared == 5


def test_without_the_grammar_the_same_model_gives_no_json(tiny_model, mixed, monkeypatch):
    # The checks above fail when the mask is off: the answers are then the random model's noise.
    from scriptorium.pipeline.model.grammar import Grammars

    monkeypatch.setattr(Grammars, "hooks", lambda self, task, batch_size: ())
    tasks = [TaskSpec(kind="extract", name="record", schema=RECORD, max_new_tokens=40)]
    rows = run_stages(job(tiny_model, tasks, render=RenderSpec(page_edge=128)), [plan_row(p) for p in mixed[2:]])
    assert rows and all(r["status"] == "error" and r["stage"] == "extract" for r in rows), \
        [(r["status"], r["stage"], r["error"]) for r in rows]


# -- typed columns and their readers ----------------------------------------------------------------------
def test_arrow_types_follow_the_schema():
    typed = arrow_typed(RECORD).type
    assert typed == pa.struct([
        pa.field("title", pa.string(), nullable=False), pa.field("kind", pa.string(), nullable=False),
        pa.field("code", pa.string()), pa.field("year", pa.int64(), nullable=False),
        pa.field("amount", pa.float64(), nullable=False), pa.field("signed", pa.bool_(), nullable=False),
        pa.field("note", pa.string()),
        pa.field("parts", pa.list_(pa.struct([pa.field("name", pa.string(), nullable=False),
                                              pa.field("count", pa.int64())])), nullable=False),
        pa.field("place", pa.struct([pa.field("city", pa.string(), nullable=False), pa.field("empty", pa.null())])),
    ])
    # What has no one Arrow type is kept as JSON text: free-form objects, unions of different types.
    assert arrow_typed({"type": "object"}).type == pa.string()
    assert arrow_typed({"anyOf": [{"type": "string"}, {"type": "integer"}]}).type == pa.string()
    assert arrow_typed({"type": ["integer", "number", "null"]}).type == pa.float64()
    assert arrow_typed({"$defs": {"n": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/n"}}).type \
        == pa.list_(pa.int64())


def test_a_value_outside_its_column_type_is_an_error_row_not_a_crash():
    parse = ParseExtractions([TaskSpec(kind="extract", name="n", schema={"type": "integer"})],
                             {"n": {"type": "integer"}})
    rows = pa.Table.from_pylist([{"task": "n", "status": "ok", "text": str(2**70), "truncated": False},
                                 {"task": "n", "status": "ok", "text": "12", "truncated": False},
                                 {"task": "n", "status": "ok", "text": "[1", "truncated": False}],
                                schema=parse.input_schema)
    out = next(parse(rows)).to_pylist()
    assert out[0]["status"] == "error" and "outside the range of int64" in out[0]["error"] and out[0]["text"]
    assert (out[1]["status"], out[1]["extract_n"]) == ("ok", 12)
    assert out[2]["status"] == "error" and out[2]["error"].startswith("the answer is not JSON")


@pytest.mark.slow
def test_a_run_writes_typed_columns_every_reader_sees(tiny_model, mixed, tmp_path, ray_local):
    import datasets
    import polars as pl

    from scriptorium.jobs.runner import run_job

    out = tmp_path / "out"
    spec = spec_from_dict({
        "run_id": "typed", "input": {"uri": str(mixed[0].parent)}, "output": {"uri": str(out)},
        "model": {"id": str(tiny_model), "device": "cpu", "dtype": "fp32"}, "render": {"page_edge": 128},
        "tasks": [t.model_dump() for t in TASKS[:2]], "resources": {"batch_size": 4},
    })
    result = run_job(spec)
    assert result.rows_written == 9
    files = sorted(str(p) for p in out.glob("*.parquet"))
    record_type = arrow_typed(RECORD).type
    assert pq.read_schema(files[0]).field("extract_record").type == record_type
    ok = duckdb.sql(f"SELECT text, extract_record.year, extract_record.parts FROM read_parquet({files}) "
                    "WHERE task = 'record' AND status = 'ok'").fetchall()
    assert ok and all(json.loads(text)["year"] == year and len(parts) == len(json.loads(text)["parts"])
                      for text, year, parts in ok)
    frame = pl.read_parquet(files)
    assert frame.schema["extract_record"].to_schema()["year"] == pl.Int64  # a struct's field, typed
    features = datasets.Dataset.from_parquet(files).features
    assert features["extract_summary"]["pages"].dtype == "int64"

    # Another schema for the same column on this output is refused before any work.
    changed = {**RECORD, "properties": {**RECORD["properties"], "year": {"type": "string", "maxLength": 4}}}
    again = spec.updated(tasks=[TaskSpec(kind="extract", name="record", schema=changed).model_dump()])
    with pytest.raises(OutputError, match="holds column extract_record as struct"):
        run_job(again)


# -- bad schemas: exit 2, one line ------------------------------------------------------------------------
@pytest.mark.parametrize("schema, message", [
    ({"type": "objekt"}, "task 'bad': invalid JSON Schema at type: 'objekt' is not valid"),
    ({"type": "array", "uniqueItems": True}, 'keyword(s) ["uniqueItems"] are not supported'),
    ({"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}}},
     'keyword(s) ["not"] are not supported'),
    ("missing.json", "task 'bad': schema {folder}/missing.json cannot be read"),
    ("not-json.json", "task 'bad': schema {folder}/not-json.json is not JSON"),
])
def test_a_schema_that_cannot_be_enforced_stops_the_job_with_one_line(schema, message, tiny_model, tmp_path, capsys):
    (tmp_path / "not-json.json").write_text("{type: object")
    (tmp_path / "in").mkdir()
    job_file = tmp_path / "job.toml"
    job_file.write_text(f'[input]\nuri = "{tmp_path / "in"}"\n[output]\nuri = "{tmp_path / "out"}"\n'
                        f'[model]\nid = "{tiny_model}"\ndevice = "cpu"\n'
                        f'[[tasks]]\nkind = "extract"\nname = "bad"\n'
                        f'schema = {toml_value(schema if isinstance(schema, dict) else str(tmp_path / schema))}\n')
    assert main(["run", "--job", str(job_file)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message.format(folder=tmp_path) in error, error


def toml_value(value) -> str:
    """A value as TOML (inline tables), for writing a job file."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return json.dumps(value)


def test_load_schemas_reads_a_schema_file_and_takes_inline_tables(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SUMMARY))
    tasks = [TaskSpec(kind="extract", name="a", schema=str(tmp_path / "s.json")),
             TaskSpec(kind="extract", name="b", schema=RECORD), TaskSpec(kind="ocr")]
    assert load_schemas(tasks) == {"a": SUMMARY, "b": RECORD}


def test_extract_tasks_run_on_the_static_engine_of_a_continuous_job(tiny_model, mixed, caplog):
    spec = job(tiny_model, TASKS[:1], render=RenderSpec(page_edge=128)).updated(
        model={"engine": "continuous"})
    assert stage_named(job_stages(spec, derive(spec)), "extract").output_schema.field("extract_record")
    with caplog.at_level("INFO", logger="scriptorium"):
        rows = run_stages(spec, [plan_row(mixed[2])])
    assert "task 'record' runs on the static engine: an extract task decodes under its schema's grammar" in caplog.text
    (row,) = rows
    if row["status"] == "ok":
        jsonschema.validate(json.loads(row["text"]), RECORD)
    else:
        assert row["stage"] == "extract" and row["truncated"]


@pytest.mark.slow
def test_the_ray_data_processor_gives_typed_records(ray_local, tiny_model, mixed):
    import ray

    from scriptorium.pipeline.processor import build_processor

    spec = spec_from_dict({"model": {"id": str(tiny_model), "device": "cpu", "dtype": "fp32"},
                           "render": {"page_edge": 128}, "tasks": [TASKS[0].model_dump()]})
    documents = ray.data.from_items([{"source_uri": str(mixed[2])}, {"source_uri": str(mixed[3])}])
    results = build_processor(spec)(documents).materialize()
    assert results.schema().base_schema.field("extract_record").type == arrow_typed(RECORD).type
    rows = results.take_all()
    assert len(rows) == 2 and any(r["status"] == "ok" for r in rows)
    for row in rows:
        if row["status"] == "ok":
            jsonschema.validate(json.loads(row["text"]), RECORD)
            assert matches(row["extract_record"], json.loads(row["text"]))


def test_each_steps_masks_start_before_its_forward(tiny_model):
    # generate calls the stopping criterion as soon as a step's tokens are chosen: the masks of the next
    # step start there, on the mask thread, and the processor finds them done.
    import threading

    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from scriptorium.pipeline.model.grammar import GrammarMask, Grammars

    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_utterance>")})
    grammars = Grammars(tokenizer, model.get_output_embeddings().out_features, eos, {"summary": SUMMARY})
    threads = []
    advance = GrammarMask._advance
    ids = torch.tensor([tokenizer.encode("User: Extract. Assistant:")] * 3)

    def generated(ahead: bool) -> list[list[int]]:
        mask, criterion = grammars.hooks("summary", 3)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=60,
                                 do_sample=False, eos_token_id=eos, pad_token_id=0, logits_processor=[mask],
                                 stopping_criteria=[criterion] if ahead else None)
        # The last step's criterion starts masks no step will read: let them end before the next call
        # records its own, or a busy machine interleaves the two calls' records.
        grammars.thread.submit(lambda: None).result()
        return out[:, ids.shape[1]:].tolist()

    def recording(self, tokens):
        threads.append(threading.current_thread().name)
        return advance(self, tokens)

    GrammarMask._advance = recording
    try:
        early, late = generated(ahead=True), generated(ahead=False)
    finally:
        GrammarMask._advance = advance
    assert early == late  # the same tokens either way
    steps = len(threads) // 2 + 1
    assert threads[:steps].count(threading.main_thread().name) == 1  # only the first step's, in place
    assert all(name.startswith("grammar-masks") for name in threads[1:steps - 1])
    for row in early:
        text = tokenizer.decode(row, skip_special_tokens=True)
        jsonschema.validate(json.loads(text), SUMMARY)


def test_sampled_answers_are_constrained_too(tiny_model, mixed):
    tasks = [TaskSpec(kind="extract", name="summary", schema=SUMMARY, do_sample=True, temperature=1.5,
                      top_p=0.95, max_new_tokens=MAX_NEW_TOKENS)]
    rows = run_stages(job(tiny_model, tasks, render=RenderSpec(page_edge=128)), [plan_row(p) for p in mixed])
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 3, [r["error"] for r in rows]
    for row in ok:
        assert json.loads(row["generation"])["do_sample"] is True
        assert matches(row["extract_summary"], json.loads(row["text"]))
        jsonschema.validate(json.loads(row["text"]), SUMMARY)
