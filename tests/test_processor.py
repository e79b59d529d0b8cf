"""The Ray Data processor: a job's stages as a function over a Dataset of documents, as a team with a Ray
Data pipeline of its own would use it (`build_processor(spec)(dataset)`), on a local Ray."""

from __future__ import annotations

import pytest

from scriptorium.core.errors import SpecError
from scriptorium.core.spec import spec_from_dict
from scriptorium.pipeline.processor import build_processor
from tests.conftest import make_image, make_pdf


def processor_spec(model, **extra) -> dict:
    return {"model": {"id": str(model), "device": "cpu", "dtype": "fp32"},
            "tasks": [{"kind": "ocr", "max_new_tokens": 3}, {"kind": "caption", "max_new_tokens": 3}], **extra}


@pytest.mark.slow
def test_documents_by_uri_and_by_bytes_become_result_rows(ray_local, tiny_model, tmp_path):
    import ray

    pdf = make_pdf(tmp_path / "letter.pdf", ["Dear reader,", "Yours faithfully."])
    photo = make_image(tmp_path / "photo.png", color=(200, 40, 40))
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not a PDF at all")
    documents = ray.data.from_items([
        {"source_uri": str(pdf)},
        {"source_uri": "uploads/photo.png", "data": photo.read_bytes()},  # bytes, no readable URI
        {"source_uri": str(broken)},
    ])

    results = build_processor(spec_from_dict(processor_spec(tiny_model)))(documents)
    rows = sorted(results.take_all(), key=lambda r: (r["source_uri"], r["page"], r["task"]))

    keys = [(r["source_uri"].rsplit("/", 1)[-1], r["page"], r["task"], r["status"]) for r in rows]
    assert keys == [("broken.pdf", 0, "caption", "error"), ("broken.pdf", 0, "ocr", "error"),
                    ("letter.pdf", 0, "caption", "ok"), ("letter.pdf", 0, "ocr", "ok"),
                    ("letter.pdf", 1, "caption", "ok"), ("letter.pdf", 1, "ocr", "ok"),
                    ("photo.png", 0, "caption", "ok"), ("photo.png", 0, "ocr", "ok")]
    assert all("cannot open PDF" in r["error"] for r in rows if r["status"] == "error")
    assert {r["route"] for r in rows if r["status"] == "ok"} == {"model"}
    assert results.schema().names[:4] == ["source_uri", "page", "n_pages", "member"]


def test_a_processor_needs_what_its_stages_need(tiny_model):
    with pytest.raises(SpecError, match="no task"):
        build_processor(spec_from_dict({"model": {"id": str(tiny_model)}}))
    with pytest.raises(SpecError, match="dedup"):  # dedup joins duplicates in a job's driver
        build_processor(spec_from_dict(processor_spec(tiny_model, routing={"dedup": True})))
