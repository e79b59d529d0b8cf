"""Legibility of small print in what the model receives: Tesseract on the crops of split Letter pages of
7-9 pt text (Helvetica and Times), at the render rule (1960 px for idefics2-8b's 980 with splitting) against rendering at 980
and splitting afterwards (before the rule).

    .venv/bin/python bench/legibility.py [--sizes 7 8 9] [--fonts helv tiro]

Each page goes through an OCR job's own CPU stages (`job_stages` up to "preprocess", on a tiny checkpoint
with idefics2-8b's processor settings), then the model stage's `decompress_crops`; its four quadrant crops, what carries the page's detail to the model, are
stitched back together and read by Tesseract (through PyMuPDF, as the `tesseract` route does). The
character error rate is the edit distance between Tesseract's text and the page's own text (the PDF's
text layer), whitespace collapsed, over the length of the page's text. Tesseract stands in for what a
reader of the crops can make out: a page it cannot read at a size has lost detail the model cannot have.
Needs Tesseract's English data (Debian: apt-get install tesseract-ocr tesseract-ocr-eng).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import _setup  # noqa: F401  (the repository's packages first; see bench/_setup.py)
import numpy as np  # noqa: E402

from mix import text_page_pdf  # noqa: E402

TODAY_EDGE = 980  # before the render rule: every PDF page at the processor's longest edge, then split


def cpu_job(checkpoint: Path, render_edge: int):
    """(the CPU stages, the resolved render spec) of an OCR job on `checkpoint`, PDF pages at `render_edge`
    px (0: the render rule)."""
    from scriptorium.core.spec import JobSpec, ModelSpec, RenderSpec, TaskSpec
    from scriptorium.pipeline.stages import derive, job_stages, stages_until

    spec = JobSpec(model=ModelSpec(id=str(checkpoint), device="cpu"), tasks=[TaskSpec(kind="ocr")],
                   render=RenderSpec(page_edge=render_edge))
    derived = derive(spec)
    return stages_until(job_stages(spec, derived), "preprocess"), derived.render


def model_view(path: Path, cpu_stages) -> np.ndarray:
    """The page's four quadrant crops as the model actor receives them, stitched back into one image."""
    from scriptorium.core.pixels import decompress_crops
    from scriptorium.core.schema import PLAN_SCHEMA, table_from_rows
    from scriptorium.pipeline.local import walk

    plan = table_from_rows([{"source_uri": str(path), "size": path.stat().st_size, "kind": "pdf"}], PLAN_SCHEMA)
    [row] = [r for table in walk(cpu_stages, [plan]) for r in table.to_pylist()]
    top_left, top_right, bottom_left, bottom_right = decompress_crops(row["pixels"], row["crop_shapes"])[:4]
    height = max(top_left.shape[0], top_right.shape[0]) + max(bottom_left.shape[0], bottom_right.shape[0])
    width = max(top_left.shape[1], bottom_left.shape[1]) + max(top_right.shape[1], bottom_right.shape[1])
    page = np.full((height, width, 3), 255, dtype=np.uint8)
    mid_h, mid_w = top_left.shape[:2]
    for crop, (y, x) in ((top_left, (0, 0)), (top_right, (0, mid_w)), (bottom_left, (mid_h, 0)),
                         (bottom_right, (mid_h, mid_w))):
        page[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
    return page


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one row of the table at a time in numpy: min over the row of (cost so far +
    the gap since), which is a running minimum."""
    b_codes = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    previous = np.arange(len(b) + 1)
    offsets = np.arange(len(b) + 1)
    for i, char in enumerate(a, start=1):
        substitute = previous[:-1] + (b_codes != ord(char))
        current = np.empty_like(previous)
        current[0] = i
        current[1:] = np.minimum(previous[1:] + 1, substitute)
        previous = np.minimum.accumulate(current - offsets) + offsets
    return int(previous[-1])


def character_error_rate(ocr: str, truth: str) -> float:
    truth, ocr = normalized(truth), normalized(ocr)
    return edit_distance(ocr, truth) / max(1, len(truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[7, 8, 9], help="text sizes in points")
    parser.add_argument("--fonts", nargs="+", default=["helv", "tiro"], help="PDF base fonts: helv, tiro, cour")
    args = parser.parse_args()

    from scriptorium.pipeline.model.tiny import build_tiny_idefics2
    from scriptorium.pipeline.routes.tesseract import tessdata_path, tesseract_ocr

    try:
        tessdata_path()
    except RuntimeError as exc:
        sys.exit(f"bench/legibility.py needs Tesseract: {exc}")
    with tempfile.TemporaryDirectory() as tmp:
        # The idefics2-8b processor settings: 980 / 378, image splitting on.
        checkpoint = build_tiny_idefics2(Path(tmp) / "model", do_image_splitting=True)
        jobs = {"render rule": cpu_job(checkpoint, 0),
                f"today ({TODAY_EDGE}, then split)": cpu_job(checkpoint, TODAY_EDGE)}
        rates: dict[str, list[float]] = {name: [] for name in jobs}
        print("character error rate of Tesseract on the stitched quadrant crops (their size in pixels)")
        print(f"{'page':>12}{'chars':>7}" + "".join(f"{name:>32}" for name in jobs))
        for seed, (font, size) in enumerate((font, size) for font in args.fonts for size in args.sizes):
            data, [truth] = text_page_pdf(1, seed=seed, fontsize=size, fontname=font)
            path = Path(tmp) / f"letter-{font}-{size:g}pt.pdf"
            path.write_bytes(data)
            line = f"{font:>6} {size:>3g} pt{len(normalized(truth)):7d}"
            for name, (cpu_stages, _) in jobs.items():
                view = model_view(path, cpu_stages)
                rates[name].append(character_error_rate(tesseract_ocr(view), truth))
                line += f"{rates[name][-1]:20.3f} ({view.shape[1]:>4}x{view.shape[0]:>4})"
            print(line)
    rule, today = (sum(values) / len(values) for values in rates.values())
    print(f"mean CER over {len(rates['render rule'])} Letter pages: render rule "
          f"({jobs['render rule'][1].page_edge} px) {rule:.3f}, today (render at {TODAY_EDGE}, then split) {today:.3f}")
    print(f"RESULT legibility_cer {rule:.3f} ratio target <= 0.02")


if __name__ == "__main__":
    main()
