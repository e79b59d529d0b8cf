"""Cheaper routes before the GPU: the text layer of born-digital PDFs, Tesseract on CPU, and dedup of
pixel-identical pages. Every row says which route produced it."""

from __future__ import annotations

import shutil

import pymupdf
import pytest

from scriptorium.core.schema import PLAN_SCHEMA, table_from_rows
from scriptorium.core.spec import (
    InputSpec,
    JobSpec,
    ModelSpec,
    OutputSpec,
    RenderSpec,
    ResourceSpec,
    RoutingSpec,
    StorageSpec,
    TaskSpec,
)
from scriptorium.jobs.runner import run_job
from scriptorium.pipeline.render.stage import RenderPages
from scriptorium.pipeline.routes.dedup import DedupRegistry
from scriptorium.pipeline.routes.stage import RoutePages
from scriptorium.pipeline.routes.tesseract import tessdata_path
from scriptorium.pipeline.routes.text_layer import text_layer_problem
from tests.conftest import job, make_image, make_pdf, plan_row, read_rows, run_stages

LETTER = ("Dear Ms. Lovelace, thank you for your letter of 12 March 1843 and for the notes on the "
          "Analytical Engine. The translation of the memoir is now with the printer, and the proofs "
          "should reach you within a fortnight. Yours faithfully, Charles Wheatstone.")


def _tesseract_missing() -> str:
    try:
        tessdata_path()
        return ""
    except RuntimeError as exc:
        return str(exc)


# `make test` installs Debian's tesseract-ocr where it can (root with apt-get); elsewhere these skip.
TESSERACT_MISSING = _tesseract_missing()
needs_tesseract = pytest.mark.skipif(bool(TESSERACT_MISSING), reason=TESSERACT_MISSING or "tesseract present")


def make_scan(born_digital, path):
    """A 'scanned' PDF: each page is only a picture of the born-digital page, with no text layer."""
    scan = pymupdf.open()
    with pymupdf.open(born_digital) as doc:
        for page in doc:
            picture = page.get_pixmap(dpi=150)
            scan.new_page(width=page.rect.width, height=page.rect.height).insert_image(page.rect, pixmap=picture)
    scan.save(str(path))
    return path


def cer(hypothesis: str, reference: str) -> float:
    """Character error rate: Levenshtein distance over the reference's length (whitespace normalized)."""
    hypothesis, reference = " ".join(hypothesis.split()), " ".join(reference.split())
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, start=1):
        current = [i]
        for j, h in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / max(len(reference), 1)


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    folder = tmp_path_factory.mktemp("routing")
    born = make_pdf(folder / "letter.pdf", [LETTER])
    return born, make_scan(born, folder / "letter-scan.pdf")


def test_text_layer_quality():
    assert text_layer_problem(LETTER) is None
    assert "characters" in text_layer_problem("  Page 3 \n")  # a scan's stray page number
    assert "unmapped" in text_layer_problem("\ufffd\ufffd\ufffd\ufffd" + LETTER[:100])  # a broken font encoding
    assert "symbols" in text_layer_problem("@#%&*!$^~+=|<>{}[]/\\" * 4 + "ab")


def test_born_digital_pages_are_read_from_their_text_layer_scans_go_to_the_model(tiny_model, documents):
    born, scan = documents
    tasks = [TaskSpec(kind="ocr", max_new_tokens=4), TaskSpec(kind="caption", max_new_tokens=4)]
    spec = job(tiny_model, tasks, routing=RoutingSpec(text_layer=True))
    rows = {(r["source_uri"].rsplit("/", 1)[-1], r["task"]): r for r in run_stages(spec, [plan_row(born), plan_row(scan)])}

    ocr = rows["letter.pdf", "ocr"]
    with pymupdf.open(born) as doc:
        assert ocr["text"] == doc[0].get_text().strip()
    assert (ocr["route"], ocr["status"], ocr["model"].startswith("pymupdf"), ocr["prompt"]) == ("text_layer", "ok", True, None)
    # Only OCR takes the text layer; the scan has none worth using, so its OCR goes to the model.
    assert [rows[k]["route"] for k in [("letter.pdf", "caption"), ("letter-scan.pdf", "ocr"),
                                       ("letter-scan.pdf", "caption")]] == ["model", "model", "model"]
    # Without routing.text_layer, the born-digital page goes to the model like any other.
    [plain_ocr] = [r for r in run_stages(job(tiny_model, tasks[:1]), [plan_row(born)])]
    assert plain_ocr["route"] == "model"


def test_pages_answered_before_the_model_skip_preprocessing(documents):
    born, scan = documents
    plans = table_from_rows([plan_row(born), plan_row(scan)], PLAN_SCHEMA)
    pages = next(RenderPages(RenderSpec(page_edge=980), StorageSpec())(plans))
    routed = next(RoutePages([TaskSpec(kind="ocr")], RoutingSpec(text_layer=True))(pages)).to_pylist()
    assert routed[0]["image"] is None and [r["route"] for r in routed[0]["routed"]] == ["text_layer"]
    assert routed[1]["image"] is not None and routed[1]["routed"] == []


@pytest.mark.slow
@needs_tesseract
def test_tesseract_transcribes_a_clean_page_without_a_model(documents, tmp_path):
    _, scan = documents
    spec = JobSpec(input=InputSpec(uri=str(scan)), output=OutputSpec(uri=str(tmp_path / "out")),
                   tasks=[TaskSpec(kind="ocr")], routing=RoutingSpec(ocr_engine="tesseract"))
    spec.check_runnable()  # no model needed: every task is OCR, and Tesseract does it
    assert not spec.needs_model
    [row] = run_stages(spec, [plan_row(scan)])
    assert (row["route"], row["status"], row["model"]) == ("tesseract", "ok", "tesseract:eng")
    error_rate = cer(row["text"], LETTER)
    print(f"tesseract CER on a clean rendered page: {error_rate:.4f}")
    assert error_rate < 0.02


@pytest.mark.slow
@needs_tesseract
def test_tesseract_ocr_next_to_a_model_task(tiny_model, documents):
    _, scan = documents
    tasks = [TaskSpec(kind="ocr"), TaskSpec(kind="caption", max_new_tokens=3)]
    rows = run_stages(job(tiny_model, tasks, routing=RoutingSpec(ocr_engine="tesseract")), [plan_row(scan)])
    assert [(r["task"], r["route"], r["status"]) for r in rows] == [("caption", "model", "ok"), ("ocr", "tesseract", "ok")]


def test_dedup_registry_leads_waits_and_reuses():
    registry = DedupRegistry(max_bytes=10_000)
    assert registry.claim(["k1", "k1", "k1"], ["a#0", "b#0", "a#0"]) == [("lead", None), ("wait", "a#0"), ("lead", None)]
    assert registry.settle([("k1", {"dedup_of": "a#0", "text": "hello", "status": "ok"})]) == [1]  # b#0 waits
    assert registry.claim(["k1"], ["c#0"]) == [("done", {"dedup_of": "a#0", "text": "hello", "status": "ok"})]
    registry.claim(["k2", "k2"], ["a#1", "b#1"])
    assert registry.settle([("k2", None)]) == [1]  # the original failed: not kept...
    assert registry.claim(["k2"], ["c#1"]) == [("lead", None)]  # ...so the next copy is processed anew
    registry.settle([(f"big{i}", {"text": "x" * 3000}) for i in range(5)])
    assert registry.bytes <= 10_000 and "k1" not in registry.results  # least recently used went first


@pytest.mark.slow
def test_identical_pages_are_generated_once(tiny_model, ray_local, tmp_path):
    from scriptorium.pipeline.routes.dedup import start_registry

    pdf = make_pdf(tmp_path / "minutes.pdf", ["Minutes of the meeting", "Attendance list", "Minutes of the meeting"])
    registry = start_registry(RoutingSpec(dedup=True), "test-dedup")
    tasks = [TaskSpec(kind="ocr", max_new_tokens=5), TaskSpec(kind="caption", max_new_tokens=5)]
    spec = job(tiny_model, tasks, routing=RoutingSpec(dedup=True))
    rows = run_stages(spec, [plan_row(pdf)], registry)

    page = {(r["page"], r["task"]): r for r in rows}
    for task in ("ocr", "caption"):
        original, copy = page[0, task], page[2, task]
        assert (original["route"], copy["route"]) == ("model", "dedup")
        assert copy["dedup_of"] == f"{pdf}#0" and copy["content_hash"] == original["content_hash"]
        assert (copy["status"], copy["text"], copy["prompt"]) == ("ok", original["text"], original["prompt"])
        assert page[1, task]["route"] == "model" and page[1, task]["content_hash"] != original["content_hash"]
    assert all(r["status"] != "pending" for r in rows)

    # Later in the run, the same page in another document reuses the known result at once.
    later = tmp_path / "copy.pdf"
    shutil.copy(pdf, later)
    plans = table_from_rows([plan_row(later)], PLAN_SCHEMA)
    routed = next(RoutePages(tasks, spec.routing, registry)(next(RenderPages(RenderSpec(page_edge=980), StorageSpec())(plans))))
    first = routed.to_pylist()[0]
    assert first["image"] is None  # nothing left for the model
    assert {(r["task"], r["route"], r["text"]) for r in first["routed"]} == {
        (task, "dedup", page[0, task]["text"]) for task in ("ocr", "caption")}


@pytest.mark.slow
@needs_tesseract
def test_routes_through_ray(tiny_model, ray_local, documents, tmp_path):
    """The whole graph on Ray: text layer, model and dedup rows; no pending row reaches the output; a
    rerun finds everything done."""
    born, scan = documents
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(born, inputs / "letter.pdf")
    shutil.copy(scan, inputs / "letter-scan.pdf")
    make_image(inputs / "stamp-1.png", text="RECEIVED")
    shutil.copy(inputs / "stamp-1.png", inputs / "stamp-2.png")
    spec = JobSpec(
        run_id="routes", input=InputSpec(uri=str(inputs)), output=OutputSpec(uri=str(tmp_path / "out")),
        model=ModelSpec(id=str(tiny_model), device="cpu", dtype="fp32"),
        tasks=[TaskSpec(kind="ocr", max_new_tokens=4), TaskSpec(kind="caption", max_new_tokens=4)],
        routing=RoutingSpec(text_layer=True, dedup=True), resources=ResourceSpec(batch_size=4),
    )
    result = run_job(spec)
    assert (result.rows_written, result.error_rows) == (8, 0)
    rows = read_rows(tmp_path / "out")
    routes = {(r["source_uri"].rsplit("/", 1)[-1], r["task"]): r["route"] for r in rows}
    assert routes["letter.pdf", "ocr"] == "text_layer" and routes["letter.pdf", "caption"] == "model"
    assert routes["letter-scan.pdf", "ocr"] == routes["letter-scan.pdf", "caption"] == "model"
    # One of the two identical images was generated, the other reuses its rows (whichever came first).
    for task in ("ocr", "caption"):
        assert sorted([routes["stamp-1.png", task], routes["stamp-2.png", task]]) == ["dedup", "model"]
    assert {r["status"] for r in rows} == {"ok"}

    spec = spec.updated(run_id="routes-again")
    again = run_job(spec)
    assert (again.skipped_inputs, again.rows_written) == (4, 0)

    # Tesseract only: the graph has no model stage at all, and no model is named.
    cpu_only = JobSpec(run_id="tesseract", input=InputSpec(uri=str(inputs), include=["*.pdf"]),
                       output=OutputSpec(uri=str(tmp_path / "tesseract")), tasks=[TaskSpec(kind="ocr")],
                       routing=RoutingSpec(ocr_engine="tesseract"))
    assert run_job(cpu_only).rows_written == 2
    rows = read_rows(tmp_path / "tesseract")
    assert all(r["route"] == "tesseract" and cer(r["text"], LETTER) < 0.02 for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_later_run_reuses_earlier_results_for_identical_images_with_the_same_settings(tiny_model, ray_local, tmp_path):
    """An incremental run over a grown corpus: a new copy of an image captioned before is not generated
    again, unless the prompt or generation settings changed."""
    inputs, output = tmp_path / "corpus", tmp_path / "captions"
    inputs.mkdir()
    make_image(inputs / "cat.png", text="CAT")

    def caption_run(run_id: str, max_new_tokens: int = 4, **routing):
        return run_job(JobSpec(
            run_id=run_id, input=InputSpec(uri=str(inputs)), output=OutputSpec(uri=str(output)),
            model=ModelSpec(id=str(tiny_model), device="cpu", dtype="fp32"),
            tasks=[TaskSpec(kind="caption", max_new_tokens=max_new_tokens)],
            routing=RoutingSpec(dedup=True, **routing), resources=ResourceSpec(batch_size=4)))

    def rows() -> dict[str, dict]:
        table = read_rows(output)
        return {(r["source_uri"].rsplit("/", 1)[-1], r["max_new_tokens"]): r for r in table}

    caption_run("first")
    shutil.copy(inputs / "cat.png", inputs / "cat-copy.png")  # the corpus grows: a copy, and a new image
    make_image(inputs / "dog.png", text="DOG", color=(200, 120, 30))
    second = caption_run("second")

    assert second.planned_inputs == 2
    cat, copy, dog = rows()["cat.png", 4], rows()["cat-copy.png", 4], rows()["dog.png", 4]
    assert (copy["route"], copy["dedup_of"], copy["text"]) == ("dedup", f"{inputs}/cat.png#0", cat["text"])
    assert (copy["run_id"], dog["route"]) == ("second", "model")

    # Other settings make other answers: a copy captioned with 6 tokens reuses nothing from 4-token ones.
    shutil.copy(inputs / "cat.png", inputs / "cat-copy-2.png")
    caption_run("longer", max_new_tokens=6)
    assert rows()["cat-copy-2.png", 6]["route"] == "model"
    # And with dedup_across_runs = false, only copies within the run are reused.
    shutil.copy(inputs / "cat.png", inputs / "cat-copy-3.png")
    caption_run("within-run-only", dedup_across_runs=False)
    assert rows()["cat-copy-3.png", 4]["route"] == "model"


def test_seeding_stops_when_the_dedup_cache_is_full():
    registry = DedupRegistry(max_bytes=1000)
    entries = [(f"k{i}", {"dedup_of": f"p{i}#0", "text": "x" * 300, "status": "ok"}) for i in range(10)]
    added, full = registry.seed(entries)
    assert full and added == 2 and registry.bytes >= 1000  # ~500 bytes each: the first two fill it
    assert registry.claim(["k0", "k5"], ["c#0", "c#1"]) == [("done", entries[0][1]), ("lead", None)]
