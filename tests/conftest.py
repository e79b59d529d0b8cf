"""Shared fixtures: a tiny random-weight Idefics2 checkpoint, a local Ray, and document factories.

Tests use the real pieces: a real checkpoint saved with save_pretrained and loaded by from_pretrained,
a real Ray runtime, real PDFs made with PyMuPDF and real images made with Pillow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Idefics2 checkpoint without image splitting (fast)."""
    from pipeline.tiny_model import build_tiny_idefics2

    return build_tiny_idefics2(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_split(tmp_path_factory) -> Path:
    """The same architecture with `do_image_splitting=True` in its processor config."""
    from pipeline.tiny_model import build_tiny_idefics2

    return build_tiny_idefics2(tmp_path_factory.mktemp("models") / "tiny-split", do_image_splitting=True)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_pdf(path: Path, pages: list[str], size=(595, 842)) -> Path:
    import pymupdf

    doc = pymupdf.open()
    for text in pages:
        page = doc.new_page(width=size[0], height=size[1])
        page.insert_textbox(pymupdf.Rect(40, 40, size[0] - 40, size[1] - 40), text, fontsize=14)
    doc.save(str(path))
    return path


def make_image(path: Path, size=(320, 240), color=(30, 120, 200), mode="RGB", text="hello") -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, size[0] // 2, size[1] // 2], fill=color)
    draw.text((12, size[1] // 2 + 10), text, fill="black")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `scriptorium ARGS` in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
