"""The continuous engine (`[model] engine = "continuous"`) gives what the static engine and the model
card's snippet give, token for token, and what it cannot do runs on the static engine.

On the image-sensitive tiny checkpoint, CPU, fp32, greedy: pages of different sizes and colours, PDF
pages and images together; a question over a document's first pages; few-shot examples with images;
tasks of different `max_new_tokens` in one engine; stop strings. Both engines record each row's
confidence (`logprob_mean`, `logprob_min`), and they agree on it.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from PIL import Image

from scriptorium.core.errors import SpecError
from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, OutputSpec, ResourceSpec, TaskSpec, spec_from_dict
from scriptorium.jobs.runner import run_job
from tests.conftest import job, make_image, make_pdf, plan_row, read_rows, run_stages
from tests.test_fidelity import MAX_NEW_TOKENS, snippet_generate
from tests.test_multi_image import reference, reference_generate, rendered_pages, split_model, three_pages  # noqa: F401

TASKS = [TaskSpec(kind="caption", max_new_tokens=MAX_NEW_TOKENS),
         TaskSpec(kind="qa", questions=["What is written here?"], max_new_tokens=MAX_NEW_TOKENS)]


def continuous(spec: JobSpec) -> JobSpec:
    return spec.updated(model={"engine": "continuous"})


def both_engines(model, tasks, plan_rows) -> tuple[list[dict], list[dict]]:
    """(static rows, continuous rows) of the same job, each sorted by unit."""
    return run_stages(job(model, tasks), plan_rows), run_stages(continuous(job(model, tasks)), plan_rows)


def assert_same_generation(static: list[dict], engine: list[dict]) -> None:
    """Same units, same text and token counts, same confidence (up to float rounding)."""
    assert [(r["source_uri"], r["page"], r["task"]) for r in engine] == \
           [(r["source_uri"], r["page"], r["task"]) for r in static]
    for ours, theirs in zip(engine, static):
        assert ours["status"] == theirs["status"] == "ok", (ours["error"], theirs["error"])
        assert (ours["text"], ours["n_output_tokens"], ours["truncated"]) == \
               (theirs["text"], theirs["n_output_tokens"], theirs["truncated"]), ours["source_uri"]
        for column in ("logprob_mean", "logprob_min"):
            assert ours[column] == pytest.approx(theirs[column], abs=1e-4), column


def assert_confidence_is_a_log_probability(rows: list[dict]) -> None:
    for row in rows:
        mean, lowest = row["logprob_mean"], row["logprob_min"]
        assert math.isfinite(mean) and math.isfinite(lowest), row
        assert lowest <= mean + 1e-6 and mean <= 0, row


@pytest.fixture(scope="module")
def mixed_pages(tmp_path_factory) -> list:
    """Images of different sizes and colours, and a two-page PDF, to go through one batch."""
    folder = tmp_path_factory.mktemp("mixed")
    images = [make_image(folder / f"img{i}.png", size=size, color=(40 * i, 200 - 30 * i, 90), text=f"image {i}")
              for i, size in enumerate([(400, 300), (300, 520), (1200, 900), (90, 700)])]
    return images + [make_pdf(folder / "report.pdf", ["Quarterly report\nRevenue", "Appendix: the tables"])]


def test_mixed_pages_give_the_static_engines_and_the_snippets_tokens(tiny_model, mixed_pages):
    static, engine = both_engines(tiny_model, TASKS, [plan_row(p) for p in mixed_pages])

    assert len(engine) == (4 + 2) * 2
    assert_same_generation(static, engine)
    assert_confidence_is_a_log_probability(engine)
    from transformers import AutoProcessor

    pdf_pages = rendered_pages(mixed_pages[-1], AutoProcessor.from_pretrained(str(tiny_model), backend="pil"))
    for row in engine:
        image = pdf_pages[row["page"]] if row["source_uri"].endswith(".pdf") else Image.open(row["source_uri"])
        expected = snippet_generate(tiny_model, row["prompt"], [image])
        assert (row["text"], row["n_output_tokens"]) == expected, (row["source_uri"], row["page"])


def test_a_document_prompt_gives_the_references_tokens(split_model, reference, three_pages):
    task = TaskSpec(kind="qa", name="about", scope="document", document_pages=2, questions=["What is this?"],
                    max_new_tokens=6)
    static, engine = both_engines(split_model, [task], [plan_row(three_pages)])

    assert_same_generation(static, engine)
    [row] = engine
    page_0, page_1, _ = rendered_pages(three_pages, reference[0])
    assert (row["text"], row["n_output_tokens"]) == reference_generate(reference, row["prompt"], [page_0, page_1], 6)


def test_few_shot_examples_give_the_references_tokens(split_model, reference, tmp_path):
    example = make_image(tmp_path / "example.png", color=(200, 30, 30), text="TOTAL 12.00")
    pages = [make_image(tmp_path / f"receipt{i}.png", size=size, color=(30, 200 - 60 * i, 30), text=f"TOTAL {i}9.50")
             for i, size in enumerate([(320, 240), (240, 400)])]
    task = TaskSpec(kind="qa", questions=["What is the total?"], max_new_tokens=5,
                    examples=[{"image": str(example), "prompt": "What is the total?", "text": "12.00"}])
    static, engine = both_engines(split_model, [task], [plan_row(p) for p in pages])

    assert_same_generation(static, engine)
    for row in engine:
        images = [Image.open(example).convert("RGB"), Image.open(row["source_uri"]).convert("RGB")]
        assert (row["text"], row["n_output_tokens"]) == reference_generate(reference, row["prompt"], images, 5)


def test_each_request_stops_at_its_own_max_new_tokens(tiny_model, mixed_pages):
    tasks = [TaskSpec(kind="caption", max_new_tokens=3), TaskSpec(kind="ocr", max_new_tokens=9)]
    static, engine = both_engines(tiny_model, tasks, [plan_row(p) for p in mixed_pages[:3]])

    assert_same_generation(static, engine)
    limits = {"caption": 3, "ocr": 9}
    for row in engine:
        assert row["n_output_tokens"] <= limits[row["task"]]
        assert row["n_output_tokens"] == limits[row["task"]] or not row["truncated"]
    assert {r["n_output_tokens"] for r in engine if r["truncated"]} == {3, 9}  # both limits reached somewhere


def test_stop_strings_cut_the_text_as_generate_does(tiny_model, mixed_pages):
    """The engine has no stop strings: its tokens are cut where `generate` would have stopped."""
    plans = [plan_row(p) for p in mixed_pages[:3]]
    [free] = run_stages(job(tiny_model, [TASKS[0]]), plans[:1])
    stop = free["text"][len(free["text"]) // 2:][:3]  # a piece of an answer the model is known to write
    task = TaskSpec(kind="caption", max_new_tokens=MAX_NEW_TOKENS, stop_strings=[stop])
    static, engine = both_engines(tiny_model, [task], plans)

    assert_same_generation(static, engine)
    first = next(r for r in engine if r["source_uri"] == free["source_uri"])
    assert stop not in first["text"] and first["n_output_tokens"] < free["n_output_tokens"] and not first["truncated"]


def test_a_repetition_penalty_runs_on_the_static_engine_and_says_so(tiny_model, mixed_pages, caplog):
    tasks = [TaskSpec(kind="caption", max_new_tokens=6, repetition_penalty=1.3), TASKS[1]]
    with caplog.at_level(logging.INFO, logger="scriptorium"):
        # One page: a batch of several would pad its prompts differently in the two runs, and the penalty
        # counts pad tokens too.
        static, engine = both_engines(tiny_model, tasks, [plan_row(mixed_pages[0])])

    # The unpenalised task ran on the engine in one run and not in the other: the same tokens. The
    # penalised one ran on the static engine both times; its tokens agree on a quiet machine, but with
    # this random checkpoint's near ties the penalty can tip a later token when torch's threads are
    # contended, so here it must only be whole and of the same length.
    assert_same_generation([r for r in static if r["task"] != "caption"], [r for r in engine if r["task"] != "caption"])
    penalised = [(r["status"], r["n_output_tokens"]) for rows in (static, engine) for r in rows if r["task"] == "caption"]
    assert penalised == [("ok", 6), ("ok", 6)]
    said = [r.getMessage() for r in caplog.records if "runs on the static engine" in r.getMessage()]
    assert said == ["task 'caption' runs on the static engine: repetition_penalty = 1.3 (transformers' continuous "
                    "batching has no per-request repetition penalty)"]


def test_a_sampling_job_samples_on_the_engine(tiny_model, mixed_pages):
    task = TaskSpec(kind="caption", max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9)
    rows = run_stages(continuous(job(tiny_model, [task])), [plan_row(p) for p in mixed_pages[:3]])

    assert all(r["status"] == "ok" and 0 < r["n_output_tokens"] <= 8 for r in rows)
    assert_confidence_is_a_log_probability(rows)


def test_rows_the_model_did_not_make_have_no_confidence(tiny_model, tmp_path):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not really")
    [row] = run_stages(continuous(job(tiny_model, [TASKS[0]])), [plan_row(broken)])
    assert row["status"] == "error" and row["logprob_mean"] is None and row["logprob_min"] is None


def test_the_engine_decodes_requests_of_different_lengths_together(tiny_model):
    """The engine itself: per-request max_new_tokens, with no end-of-sequence token to stop earlier."""
    from scriptorium.pipeline.model.continuous import ContinuousEngine, EngineRequest

    from scriptorium.core.image_settings import ImageSettings
    from scriptorium.pipeline.crops import model_crops
    from scriptorium.pipeline.model.features import encode_crops
    from scriptorium.pipeline.model.loading import load_model, load_processor

    processor = load_processor(str(tiny_model))
    settings = ImageSettings.from_processor(processor)
    model = load_model(ModelSpec(id=str(tiny_model), device="cpu", dtype="fp32"), "cpu")
    engine = ContinuousEngine(model, eos_ids=set(), image_token_id=model.config.image_token_id, cache_tokens=4096)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                           add_generation_prompt=True)
    ids = processor(text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    crops = [model_crops(torch.randint(0, 255, (200, 150 + 50 * i, 3), dtype=torch.uint8).numpy(), settings) for i in range(3)]
    features = encode_crops(model, crops, settings, "cpu", torch.float32).split(64)
    lengths = [2, 17, 5]
    try:
        results = engine.generate_all([EngineRequest(ids, f, n) for f, n in zip(features, lengths)])
    finally:
        engine.close()
    assert [len(r.tokens) for r in results] == [len(r.logprobs) for r in results] == lengths
    assert all(r.error is None for r in results)


def test_the_feature_buffer_stays_within_its_bytes(tiny_model, monkeypatch):
    """However many crops are asked for, the buffer holds what FEATURE_BUFFER_BYTES allows (a request of
    more crops than that goes to the static engine; requests beyond it wait)."""
    from scriptorium.pipeline.model import continuous
    from scriptorium.pipeline.model.loading import load_model

    model = load_model(ModelSpec(id=str(tiny_model), device="cpu", dtype="fp32"), "cpu")
    slot_bytes = 64 * model.config.text_config.hidden_size * 4  # 64 rows of fp32 features a crop
    monkeypatch.setattr(continuous, "FEATURE_BUFFER_BYTES", 10 * slot_bytes + slot_bytes // 2)
    engine = continuous.ContinuousEngine(model, set(), model.config.image_token_id, cache_tokens=1024, feature_slots=500)
    assert engine.slots.capacity == 10 and engine.slots.rows.numel() * 4 <= continuous.FEATURE_BUFFER_BYTES
    assert engine.fits([model.config.image_token_id] * 640, 640) and not engine.fits([model.config.image_token_id] * 704, 704)


@pytest.mark.slow
def test_the_continuous_actor_runs_under_ray(tiny_model, mixed_pages, ray_local, tmp_path):
    """Through Ray Data: the async actor, two blocks in flight, rows equal to the static engine's."""
    spec = JobSpec(run_id="engine", input=InputSpec(uri=str(mixed_pages[0].parent)),
                   output=OutputSpec(uri=str(tmp_path / "out")),
                   model=ModelSpec(id=str(tiny_model), device="cpu", dtype="fp32", engine="continuous"),
                   tasks=[TASKS[0]], resources=ResourceSpec(batch_size=2))
    run_job(spec)
    rows = sorted(read_rows(tmp_path / "out"), key=lambda r: (r["source_uri"], r["page"]))
    static = run_stages(job(tiny_model, [TASKS[0]]), [plan_row(p) for p in mixed_pages])
    assert_same_generation(static, rows)


def test_the_engine_is_a_validated_choice():
    base = {"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"id": "m"}, "tasks": [{"kind": "ocr"}]}
    assert spec_from_dict(base).check_runnable().model.engine == "static"
    assert spec_from_dict({**base, "model": {"id": "m", "engine": "continuous"}}).check_runnable().model.engine == "continuous"
    with pytest.raises(SpecError, match="model.engine = 'paged' is not one of static, continuous"):
        spec_from_dict({**base, "model": {"id": "m", "engine": "paged"}}).check_runnable()
    with pytest.raises(SpecError, match="needs attn_implementation"):
        spec_from_dict({**base, "model": {"id": "m", "engine": "continuous", "attn_implementation": "eager"}}).check_runnable()


def test_a_sequence_the_engine_cannot_hold_is_generated_on_the_static_engine(split_model, three_pages, caplog):
    """A KV cache too small for any of these prompts (five crops, 320 image tokens, in one 256-token
    block): the engine fails the requests, the static engine generates them, and the engine starts afresh
    for the next block."""
    from scriptorium.pipeline.local import step_results
    from scriptorium.pipeline.model.continuous_stage import GenerateAnswersContinuously
    from scriptorium.pipeline.model.loading import open_model_config
    from scriptorium.pipeline.prompts import PromptBook
    from tests.conftest import preprocessed

    spec = continuous(job(split_model, [TaskSpec(kind="ocr", max_new_tokens=4)]))
    static = run_stages(job(split_model, [TaskSpec(kind="ocr", max_new_tokens=4)]), [plan_row(three_pages)])
    _, settings = open_model_config(spec.model)
    replica = GenerateAnswersContinuously(spec.model, settings, PromptBook(spec.tasks), ResourceSpec(max_batch_tokens=100),
                                          run_id="small-cache", batch_size=4)
    pages = preprocessed(spec, [plan_row(three_pages)])
    try:
        with caplog.at_level(logging.WARNING, logger="scriptorium"):
            first = step_results(replica(pages.slice(0, 2)))[0].to_pylist()
            second = step_results(replica(pages.slice(2)))[0].to_pylist()
    finally:
        replica.close()
    assert_same_generation(static, sorted(first + second, key=lambda r: r["page"]))
    assert any("generating it on the static engine" in r.getMessage() for r in caplog.records)


def test_requests_in_flight_are_capped_on_a_gpu_under_sdpa_only(tiny_model):
    """SDPA's packed mask grows with the square of the requests in flight (BENCHMARKS.md, GPU): on a GPU
    the engine takes at most SDPA_MAX_REQUESTS_ON_GPU under it; flash attention and the CPU are not capped."""
    from scriptorium.pipeline.model.continuous import SDPA_MAX_REQUESTS_ON_GPU, requests_in_flight
    from scriptorium.pipeline.model.loading import load_model

    cap = SDPA_MAX_REQUESTS_ON_GPU
    assert requests_in_flight(256, on_gpu=True, attention="sdpa") == cap
    assert requests_in_flight(0, on_gpu=True, attention="sdpa") == cap
    assert requests_in_flight(cap // 4, on_gpu=True, attention="sdpa") == cap // 4
    assert requests_in_flight(256, on_gpu=True, attention="flash_attention_2") == 256
    assert requests_in_flight(256, on_gpu=False, attention="sdpa") == 256
    # What the engine reads the attention from: the text model's config, as the job loaded it.
    model = load_model(ModelSpec(id=str(tiny_model), device="cpu", dtype="fp32"), "cpu")
    assert model.config.text_config._attn_implementation == "sdpa"


def test_the_engine_leaves_the_shared_text_config_alone(tiny_model):
    """transformers writes each forward's `is_causal` into its module's config for the call; the engine's
    SDPA steps pass False. The static engine's text model must never see that: a fallback `generate`
    beside the engine would build its prompt's attention without the causal mask."""
    from scriptorium.pipeline.model.continuous import ContinuousEngine, EngineRequest
    from scriptorium.pipeline.model.loading import load_model

    model = load_model(ModelSpec(id=str(tiny_model), device="cpu", dtype="fp32"), "cpu")
    shared_config = model.model.text_model.config
    before = getattr(shared_config, "is_causal", None)
    seen = []
    model.model.text_model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(getattr(shared_config, "is_causal", None)))
    rows = model.config.perceiver_config.resampler_n_latents
    image = model.config.image_token_id
    engine = ContinuousEngine(model, eos_ids=set(), image_token_id=image, max_requests=2, cache_tokens=1024)
    try:
        features = torch.randn(rows, model.config.text_config.hidden_size)
        results = engine.generate_all([EngineRequest([1, *[image] * rows, 5, 6], features, 4)] * 2)
    finally:
        engine.close()
    assert [len(r.tokens) for r in results] == [4, 4]
    assert seen and set(seen) == {before}


def test_a_static_fallback_beside_the_engine_gives_the_static_engines_rows(split_model, three_pages):
    """A greedy task on the engine and a repetition-penalty task on the static engine, in one block:
    the fallback runs in a thread while the engine decodes, on the same modules."""
    tasks = [TaskSpec(kind="ocr", max_new_tokens=24),
             TaskSpec(kind="caption", max_new_tokens=24, repetition_penalty=1.3)]
    static, engine = both_engines(split_model, tasks, [plan_row(three_pages)])
    assert_same_generation(static, engine)
