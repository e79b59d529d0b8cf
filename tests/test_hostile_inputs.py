"""Hostile inputs: every page of every file ends as exactly one row, nothing hangs, nothing crashes the run.

Most checks run the page stage in-process over the generated corpus (tests/hostile_corpus.py); one runs
`scriptorium run` over the whole corpus, through the model, and reads the output back.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from scriptorium.core.errors import PageError
from scriptorium.core.kinds import kind_of
from scriptorium.core.pixels import page_image
from scriptorium.core.spec import RenderSpec, StorageSpec
from scriptorium.pipeline.render import sandbox
from scriptorium.pipeline.render.decoders import local_frames, time_limit
from scriptorium.pipeline.render.stage import pages_of
from tests.conftest import make_pdf, read_rows, run_cli
from tests.hostile_corpus import (
    BOMB_DEPTH,
    Expected,
    _photo,
    _xobject_bomb_pdf,
    write_hostile_corpus,
)

STAGES = {"list", "read", "render", "decode", "preprocess", "generate", "write"}
# Small pages keep the test fast; a short limit keeps the rendering bomb's cost to seconds.
SETTINGS = RenderSpec(page_edge=64, timeout_s=1.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Expected]]:
    folder = tmp_path_factory.mktemp("hostile")
    return folder, write_hostile_corpus(folder)


def plan_row(path: Path, done_pages=None) -> dict:
    return {"source_uri": str(path), "size": path.stat().st_size, "etag": "e1", "kind": kind_of(path.name),
            "error": None, "done_pages": done_pages}


def rows_of(path: Path, settings: RenderSpec = SETTINGS, done_pages=None) -> list[dict]:
    return list(pages_of(plan_row(path, done_pages), settings, StorageSpec()))


@pytest.mark.timeout(120)
def test_every_hostile_file_becomes_exactly_its_pages_ok_or_error(corpus):
    folder, expected = corpus
    for name, want in expected.items():
        rows = rows_of(folder / name)
        pages = [r["page"] for r in rows]
        assert len(rows) == want.pages, (name, pages)
        assert sorted(pages) == list(range(want.pages)), name  # each page once, none missing
        assert sum(r["status"] == "ok" for r in rows) == want.ok, (name, [r["error"] for r in rows])
        for row in rows:
            if row["status"] == "error":
                assert row["stage"] in STAGES and want.reason.lower() in row["error"].lower(), (name, row["error"])
            else:
                assert row["error"] is None and len(row["image"]) == row["width"] * row["height"] * 3


def test_pdf_pages_are_rendered_at_the_capped_size_whatever_their_page_box_says(corpus):
    folder, _ = corpus
    for name in ("giant_page.pdf", "tiny_page.pdf", "extreme_aspect_page.pdf"):
        (row,) = rows_of(folder / name)
        assert row["status"] == "ok" and max(row["width"], row["height"]) == SETTINGS.page_edge, name


def test_every_frame_of_a_multi_frame_tiff_is_a_page_with_its_own_size(corpus):
    folder, _ = corpus
    rows = rows_of(folder / "frames.tiff")
    assert [(r["page"], r["n_pages"], r["width"], r["height"]) for r in rows] == [
        (0, 3, 120, 90), (1, 3, 60, 200), (2, 3, 300, 40)]


def test_a_16_bit_scan_keeps_its_tones_instead_of_turning_white(corpus):
    folder, _ = corpus
    (row,) = rows_of(folder / "gray16.png")
    gray = page_image(row)[:, :, 0].astype(int)
    # The gradient runs from black to white, left to right (Pillow's own conversion clips it to white).
    assert gray[:, 0].max() <= 1 and gray[:, -1].min() >= 254
    assert 110 < gray.mean() < 145


def test_a_jpeg_2000_master_scan_decodes_to_its_exact_pixels(corpus):
    from PIL import Image

    folder, _ = corpus
    row = rows_of(folder / "master_scan.jp2", RenderSpec(page_edge=64, sandbox=False))[0]
    assert np.array_equal(page_image(row), np.asarray(_photo(Image, 200, 150).convert("RGB")))  # lossless


def test_transparency_is_composited_onto_white(corpus):
    folder, _ = corpus
    (row,) = rows_of(folder / "rgba.png")
    image = page_image(row)
    assert image[0, 0].tolist() == [255, 255, 255]  # the gradient alpha is 0 at the top left: white


def test_a_resumed_file_that_can_no_longer_be_read_gets_a_row_for_its_first_missing_page(tmp_path):
    path = make_pdf(tmp_path / "moved.pdf", ["a", "b", "c", "d"])
    row = plan_row(path, done_pages=[0, 1])
    path.unlink()
    (error,) = pages_of(row, SETTINGS, StorageSpec())
    assert (error["page"], error["status"], error["stage"]) == (2, "error", "read")


def test_only_the_pages_not_done_are_rendered_on_resume(tmp_path):
    path = make_pdf(tmp_path / "four.pdf", ["a", "b", "c", "d"])
    rows = rows_of(path, done_pages=[0, 2])
    assert [(r["page"], r["status"]) for r in rows] == [(1, "ok"), (3, "ok")]


# -- time limits ---------------------------------------------------------------------------------------
def test_time_limit_interrupts_python_code_then_is_disarmed():
    started = time.monotonic()
    with pytest.raises(PageError, match="busy loop took longer than 0.2 s"):
        with time_limit(0.2, "busy loop"):
            while True:
                pass
    assert time.monotonic() - started < 2
    previous = signal.getsignal(signal.SIGALRM)
    with time_limit(0.2, "quick"):
        pass
    time.sleep(0.4)  # the timer is cleared when the body ends: nothing fires later
    assert signal.getsignal(signal.SIGALRM) is previous


def test_time_limit_is_a_no_op_off_the_main_thread():
    outcome = []

    def body():
        with time_limit(0.05, "in a thread"):
            time.sleep(0.2)
        outcome.append("finished")

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert outcome == ["finished"]


def test_the_page_limit_does_not_run_on_while_the_consumer_holds_a_page(tmp_path):
    """The limit covers rendering a page, not the time the caller spends with the page it was given."""
    path = make_pdf(tmp_path / "three.pdf", ["a", "b", "c"])
    rows = []
    for frame in local_frames("pdf", path.read_bytes(), RenderSpec(page_edge=64, timeout_s=0.3), set()):
        time.sleep(0.5)
        rows.append(frame)
    assert [("error" in r, r["page"]) for r in rows] == [(False, 0), (False, 1), (False, 2)]


@pytest.mark.timeout(60)
def test_a_page_that_never_returns_from_mupdf_is_killed_at_the_hard_limit(tmp_path):
    """MuPDF draws the bomb page in one C call (4**12 nested draws, minutes): the soft SIGALRM limit
    cannot interrupt it, so the sandbox kills the renderer; the next page renders in a fresh one."""
    path = tmp_path / "bomb.pdf"
    path.write_bytes(_xobject_bomb_pdf(BOMB_DEPTH))
    settings = RenderSpec(page_edge=64, timeout_s=0.5)
    started = time.monotonic()
    rows = rows_of(path, settings)
    assert time.monotonic() - started < sandbox.hard_limit_s(settings) + 30
    assert [(r["page"], r["status"]) for r in rows] == [(0, "ok"), (1, "error"), (2, "ok")]
    assert "hard limit; the renderer was killed" in rows[1]["error"] and rows[1]["stage"] == "render"


@pytest.mark.timeout(60)
def test_a_renderer_that_crashes_costs_one_page(tmp_path):
    """A renderer process that dies on a page (here: killed while on the bomb page, as a segfault would
    end it) makes that page an error row; the document goes on in a fresh renderer."""
    path = tmp_path / "bomb.pdf"
    path.write_bytes(_xobject_bomb_pdf(BOMB_DEPTH))
    box = sandbox.sandbox_for_this_thread()
    pages = pages_of(plan_row(path), RenderSpec(page_edge=64, timeout_s=60), StorageSpec())
    rows = [next(pages)]  # page 0; the renderer is asked for the bomb page only when we ask for the next

    def kill_the_renderer_soon(pid=box.pid):
        time.sleep(0.5)
        os.kill(pid, signal.SIGSEGV)

    threading.Thread(target=kill_the_renderer_soon, daemon=True).start()
    rows += list(pages)
    assert [(r["page"], r["status"]) for r in rows] == [(0, "ok"), (1, "error"), (2, "ok")]
    assert "crashed the renderer (killed by SIGSEGV)" in rows[1]["error"]


@pytest.mark.timeout(60)
def test_a_file_that_keeps_stalling_the_renderer_is_given_up_with_a_row_per_page(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_LOST_PAGES", 1)
    path = tmp_path / "bomb.pdf"
    path.write_bytes(_xobject_bomb_pdf(BOMB_DEPTH))
    rows = rows_of(path, RenderSpec(page_edge=64, timeout_s=0.2))
    assert [(r["page"], r["status"]) for r in rows] == [(0, "ok"), (1, "error"), (2, "error")]
    assert rows[2]["error"] == "not rendered: 1 pages of this file hung or crashed the renderer"


# -- the whole corpus through `scriptorium run` ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(720)
def test_a_run_over_the_hostile_corpus_exits_zero_and_accounts_for_every_page(corpus, tiny_model, tmp_path):
    """Then `scriptorium report` over it renders every error page's thumbnail under the run's limits: the
    page that stalls MuPDF is killed at the run's hard limit (2 s soft, 5 s hard) instead of hanging."""
    folder, expected = corpus
    output = tmp_path / "out"
    job = tmp_path / "hostile.toml"
    job.write_text(
        "[render]\npage_edge = 64\ntimeout_s = 2\n"
        "[model]\nlongest_edge = 56\nshortest_edge = 28\ndevice = \"cpu\"\n"
        "[resources]\nbatch_size = 16\n"
        "[output]\nrows_per_file = 100\n"
    )
    proc = run_cli("run", "--job", str(job), "--input", str(folder), "--output", str(output), "--task", "ocr",
                   "--model", str(tiny_model), "--max-new-tokens", "2", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = read_rows(output)
    keys = Counter((r["source_uri"], r["page"], r["task"]) for r in rows)
    assert max(keys.values()) == 1  # no page twice
    by_file = defaultdict(list)
    for row in rows:
        by_file[Path(row["source_uri"]).name].append(row)
    assert set(by_file) == set(expected)
    for name, want in expected.items():
        got = by_file[name]
        assert len(got) == want.pages, name
        assert sum(r["status"] == "ok" for r in got) == want.ok, (name, {r["error"] for r in got})
        assert all(r["stage"] in STAGES and r["error"] for r in got if r["status"] == "error"), name
    assert len(rows) == sum(w.pages for w in expected.values())

    report = tmp_path / "review.html"
    review = run_cli("report", str(output), "--html", str(report), timeout=240)
    assert review.returncode == 0, review.stderr[-3000:]
    cards = report.read_text().split('<section class="page"')
    (bomb_page,) = [card for card in cards if "xobject_bomb.pdf &middot; page 2 of 3" in card]  # its page 1
    assert "no preview:" in bomb_page and "longer than" in bomb_page, bomb_page[:600]
    assert any("data:image/jpeg;base64," in card for card in cards)  # the pages that render have thumbnails


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "RGB"])
def test_rgb_conversion_is_the_transformers_reference(mode):
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    from scriptorium.pipeline.render.decoders import to_rgb

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA").convert(mode)
    if mode == "P":
        image.info["transparency"] = 3
    assert np.array_equal(to_rgb(image), convert_to_rgb(image, return_numpy=True))


def test_without_a_renderer_process_pages_are_rendered_in_process(tmp_path, monkeypatch, caplog):
    """Where no child process can start (here: the interpreter path is broken), rendering goes on in the
    worker itself, with the soft time limit only, and says so once."""
    path = make_pdf(tmp_path / "two.pdf", ["a", "b"])
    monkeypatch.setattr(sandbox.sys, "executable", "/bin/false")
    outcome = []
    worker = threading.Thread(target=lambda: outcome.extend(rows_of(path) + rows_of(path)))  # a fresh sandbox
    worker.start()
    worker.join()
    assert [(r["page"], r["status"]) for r in outcome] == [(0, "ok"), (1, "ok")] * 2
    assert [r.message for r in caplog.records].count(
        "rendering in-process, without a hard time limit: starting the renderer crashed the renderer (exit status 1)") == 1
