"""CPU stage throughput: render + split + preprocess at 980 with splitting, on one core, against the
transformers reference processor on the same pages.

    .venv/bin/python bench/preprocess.py [--pages 200] [--longest-edge 980]

Ours is the pipeline's own CPU steps, as Ray runs them: `RenderPages` (read the PDF, render each page
straight at the longest edge) then `PreprocessPages` (split into 4 quadrants + the whole page, resize to
the processor's rule, pack uint8 crops into Arrow rows). The reference renders the same pages the same
way (the processor has no renderer) and runs `processor.image_processor` with do_image_splitting=True on
each page as a PIL image, as the model card does: float32 pixel_values and an int64 mask. Bytes per page
are what each ships to the model stage: our whole Arrow row, the reference's two tensors.

The process is pinned to one CPU core, so pages/s is per core. The fidelity of the shipped crops is
checked on a few pages (collated, they equal the reference tensors bit for bit).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _setup  # noqa: F401  (the repository's packages first; see bench/_setup.py)
from documents import write_reports  # noqa: E402

PAGES_PER_DOCUMENT = 10


def pin_to_one_core() -> int:
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    import torch

    torch.set_num_threads(1)
    return core


def run_ours(paths, render, settings):
    """The pipeline's CPU steps on every document; returns (seconds, preprocessed tables)."""
    from core.schema import PLAN_SCHEMA, table_from_rows
    from core.spec import StorageSpec
    from pipeline.preprocess import PreprocessPages
    from pipeline.render.stage import RenderPages

    render_step, preprocess_step = RenderPages(render, StorageSpec()), PreprocessPages(settings)
    tables = []
    started = time.perf_counter()
    for path in paths:
        plan = table_from_rows([{"source_uri": str(path), "size": path.stat().st_size, "kind": "pdf"}], PLAN_SCHEMA)
        for pages in render_step(plan):
            tables.extend(preprocess_step(pages))
    return time.perf_counter() - started, tables


def run_reference(paths, render, image_processor):
    """Render the same way, then the reference image processor per page; returns (seconds, bytes/page, outputs)."""
    import numpy as np
    from PIL import Image

    from pipeline.render.decoders import local_frames


    outputs, total_bytes, n = [], 0, 0
    started = time.perf_counter()
    for path in paths:
        for page in local_frames("pdf", path.read_bytes(), render, skip=set()):
            image = Image.fromarray(np.frombuffer(page["image"], np.uint8).reshape(page["height"], page["width"], 3))
            out = image_processor([image], return_tensors="pt")
            total_bytes += out["pixel_values"].nbytes + out["pixel_attention_mask"].nbytes
            n += 1
            if len(outputs) < 4:
                outputs.append(out)
    return time.perf_counter() - started, total_bytes / n, outputs


def check_fidelity(tables, reference_outputs, settings) -> bool:
    import torch

    from core.pixels import unpack_crops
    from pipeline.model.collate import collate_pixels

    rows = [row for table in tables for row in table.to_pylist()][: len(reference_outputs)]
    for row, ref in zip(rows, reference_outputs):
        pixels, mask = collate_pixels([unpack_crops(row["pixels"], row["crop_shapes"])], settings)
        if not (torch.equal(pixels, ref["pixel_values"]) and torch.equal(mask, ref["pixel_attention_mask"].bool())):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--longest-edge", type=int, default=980)
    args = parser.parse_args()

    from transformers import AutoProcessor

    from core.image_settings import ImageSettings
    from core.spec import RenderSpec
    from pipeline.model.tiny import build_tiny_idefics2

    core = pin_to_one_core()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The idefics2-8b processor settings (980 / 378, mean = std = 0.5), with image splitting on.
        checkpoint = build_tiny_idefics2(tmp / "model", do_image_splitting=True, longest_edge=args.longest_edge)
        processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
        settings = ImageSettings.from_processor(processor)
        render = RenderSpec(longest_edge=settings.longest_edge)
        paths = write_reports(tmp / "pdfs", args.pages, PAGES_PER_DOCUMENT)

        run_ours(paths[:1], render, settings)  # warm-up: imports, first-call costs
        ours_s, tables = run_ours(paths, render, settings)
        ref_s, ref_bytes, ref_outputs = run_reference(paths, render, processor.image_processor)

    n_pages = sum(t.num_rows for t in tables)
    ours_bytes = sum(t.nbytes for t in tables) / n_pages
    exact = check_fidelity(tables, ref_outputs, settings)
    ours_rate, ref_rate = n_pages / ours_s, n_pages / ref_s

    print(f"pages: {n_pages} rendered at longest edge {settings.longest_edge}, splitting on "
          f"({settings.images_per_page} crops per page); one process pinned to CPU core {core}")
    print(f"{'':34}{'pages/s/core':>14}{'ms/page':>10}{'MB/page shipped':>18}")
    print(f"{'scriptorium (uint8 crops)':34}{ours_rate:14.1f}{1000 / ours_rate:10.1f}{ours_bytes / 1e6:18.2f}")
    print(f"{'reference processor (fp32+int64)':34}{ref_rate:14.1f}{1000 / ref_rate:10.1f}{ref_bytes / 1e6:18.2f}")
    print(f"ratios: {ours_rate / ref_rate:.1f}x faster, {ref_bytes / ours_bytes:.1f}x fewer bytes; "
          f"collated crops equal the reference tensors exactly: {'yes' if exact else 'NO'}")
    print(f"RESULT preprocess_pages_per_core {ours_rate:.1f} pages/s target >= 20")
    print(f"RESULT bytes_per_page {ours_bytes / 1e6:.2f} MB target <= 10")
    if not exact:
        sys.exit("the shipped crops do not collate to the reference tensors")


if __name__ == "__main__":
    main()
