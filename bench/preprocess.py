"""CPU stage throughput and bytes shipped: render + split + resize + compress on one core, on a mix of
born-digital pages, scanned pages and photos, against the transformers reference processor on the same pages.

    .venv/bin/python bench/preprocess.py [--pages 120] [--render-edge 0] [--family all]

Ours is an OCR job's own CPU stages (`job_stages` up to "preprocess"), walked with the rows per call Ray
gives them, at the default settings: render (read the file; a PDF page rendered at what the model can
use, pipeline/render/size.py: 1960 px with idefics2-8b's splitting at 980, a scan at no more than its
own resolution; an image decoded as it is) then preprocess (4 quadrants + the whole page, each resized
to the processor's rule, compressed losslessly: core/pixels.py). The reference gets the same page images (the processor has no
renderer) and runs `processor.image_processor` with do_image_splitting=True on each, as the model card
does: float32 pixel_values and an int64 mask. Bytes per page are what each ships to the model stage:
our whole Arrow row, the reference's two tensors. The mix is bench/mix.py: a third of each kind.

The process is pinned to one CPU core, so pages/s is per core. The fidelity of the shipped crops is
checked on pages of every kind: decompressed and collated, they equal the reference tensors bit for bit.
`--render-edge 980` renders every PDF page at 980 instead, as before the render rule (for comparison).

`--family` (default `all`: each in turn, in the same run) also measures the Idefics3 family on the same
mix, each beside its own reference processor: `idefics3` at Idefics3-8B-Llama3's settings (1456 / tiles of
364), `smolvlm` at SmolVLM-256M/500M's (2048 / 512); `smolvlm-instruct` (1536 / 384) on request. Ours is
the same job's CPU stages with the family's published image settings (pipeline/family.py: PDF pages at
the family's longest edge, cut into tiles by `crops_idefics3.idefics3_crops`, with each page's grid);
the reference is `Idefics3ImageProcessorPil` / `SmolVLMImageProcessorPil` at those settings, splitting
on, on the same page images, and the fidelity check also compares each page's grid to its rows and cols.
Each family prints `RESULT preprocess_pages_per_core_<family>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _setup  # noqa: F401  (the repository's packages first; see bench/_setup.py)
from mix import write_mix  # noqa: E402

PAGES_PER_DOCUMENT = 10
FIDELITY_PAGES_PER_KIND = 2


def pin_to_one_core() -> int:
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    import torch

    torch.set_num_threads(1)
    return core


def plan_of(path: Path):
    from scriptorium.core.kinds import kind_of
    from scriptorium.core.schema import PLAN_SCHEMA, table_from_rows

    return table_from_rows([{"source_uri": str(path), "size": path.stat().st_size, "kind": kind_of(path.name)}],
                           PLAN_SCHEMA)


def cpu_seconds() -> float:
    """CPU time of this process and of its render sandbox (pipeline/sandbox.py), which renders PDF pages."""
    from scriptorium.pipeline.render.sandbox import sandbox_for_this_thread

    seconds = time.process_time()
    pid = sandbox_for_this_thread().pid
    if pid is not None:
        with open(f"/proc/{pid}/stat") as stat:
            user, system = stat.read().rsplit(")", 1)[1].split()[11:13]
        seconds += (int(user) + int(system)) / os.sysconf("SC_CLK_TCK")
    return seconds


def cpu_job(checkpoint: Path, settings, render_edge: int):
    """(the CPU stages, the derived settings) of an OCR job on `checkpoint` with its image settings replaced
    by `settings` (a family's published ones: only they shape the CPU stages' work), PDF pages at
    `render_edge` px (0: the render rule)."""
    from dataclasses import replace

    from scriptorium.core.spec import JobSpec, ModelSpec, RenderSpec, TaskSpec
    from scriptorium.pipeline.render.size import resolved_render
    from scriptorium.pipeline.stages import derive, job_stages, stages_until

    render = RenderSpec(page_edge=render_edge)
    spec = JobSpec(model=ModelSpec(id=str(checkpoint), device="cpu"), tasks=[TaskSpec(kind="ocr")], render=render)
    derived = replace(derive(spec), image_settings=settings, render=resolved_render(render, settings))
    return stages_until(job_stages(spec, derived), "preprocess"), derived


def run_ours(paths, cpu_stages):
    """The job's CPU stages on every file; returns (seconds, CPU seconds, preprocessed tables)."""
    from scriptorium.pipeline.local import walk

    started, started_cpu = time.perf_counter(), cpu_seconds()
    tables = list(walk(cpu_stages, (plan_of(path) for path in paths)))
    return time.perf_counter() - started, cpu_seconds() - started_cpu, tables


def run_reference(paths, render, image_processor, keep: int):
    """The same page images through the reference image processor; returns (seconds, bytes/page, the
    first `keep` outputs with their images)."""
    from PIL import Image

    from scriptorium.core.pixels import page_image
    from scriptorium.core.spec import StorageSpec
    from scriptorium.pipeline.render.stage import pages_of

    images = [page_image(row) for path in paths
              for row in pages_of(plan_of(path).to_pylist()[0], render, StorageSpec())]
    outputs, total_bytes = [], 0
    started = time.perf_counter()
    for image in images:
        out = image_processor([Image.fromarray(image)], return_tensors="pt")
        total_bytes += out["pixel_values"].nbytes + out["pixel_attention_mask"].nbytes
        if len(outputs) < keep:
            outputs.append(out)
    return time.perf_counter() - started, total_bytes / len(images), outputs


def check_fidelity(tables, reference_outputs, settings) -> bool:
    """The shipped crops, decompressed and collated, equal the reference tensors, and each page's grid is
    the processor's rows and cols (the Idefics3 family's; Idefics2's reference has none)."""
    import torch

    from scriptorium.core.pixels import decompress_crops
    from scriptorium.pipeline.model.collate import collate_pixels

    rows = [row for table in tables for row in table.to_pylist()][: len(reference_outputs)]
    for row, ref in zip(rows, reference_outputs):
        pixels, mask = collate_pixels([decompress_crops(row["pixels"], row["crop_shapes"])], settings)
        if not (torch.equal(pixels, ref["pixel_values"]) and torch.equal(mask, ref["pixel_attention_mask"].bool())):
            return False
        if "rows" in ref and row["image_grids"] != [[ref["rows"][0][0], ref["cols"][0][0]]]:
            return False
    return True


# pages/s per core, and what each family's published settings are (besides Idefics2's own tiny checkpoint's)
TARGETS = {"idefics2": 20, "idefics3": 10, "smolvlm": 5, "smolvlm-instruct": 8}


def reference_processor(family: str, checkpoint_processor):
    """The family's reference image processor (PIL backend) at its published checkpoint's settings, and
    how to call it: Idefics2's is the tiny checkpoint's own (idefics2-8b's settings, splitting on); the
    Idefics3 family's also return each image's rows and cols."""
    if family == "idefics2":
        return checkpoint_processor.image_processor, checkpoint_processor.image_processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from scriptorium.pipeline.crops_idefics3 import PUBLISHED

    image_processor = (Idefics3ImageProcessorPil if family == "idefics3" else SmolVLMImageProcessorPil)(**PUBLISHED[family])
    return image_processor, lambda images, **kwargs: image_processor(images, return_row_col_info=True, **kwargs)


def measure(family: str, args, by_kind: dict, core: int, checkpoint: Path) -> bool:
    """One family through the job's own CPU stages on the mix, beside its reference processor on the same
    page images; prints its table and RESULT lines."""
    from transformers import AutoProcessor

    from scriptorium.core.image_settings import ImageSettings

    image_processor, call_reference = reference_processor(family, AutoProcessor.from_pretrained(checkpoint, backend="pil"))
    settings = ImageSettings.from_image_processor(image_processor)
    cpu_stages, derived = cpu_job(checkpoint, settings, args.render_edge)
    render = derived.render

    # Warm-up, one file of each kind: imports (torch's, in the renderer, comes with the first scan that
    # needs a resize), first-call costs; a worker pays them once for all the pages it ever renders.
    run_ours([paths[0] for paths in by_kind.values()], cpu_stages)
    measured = {kind: run_ours(paths, cpu_stages) for kind, paths in by_kind.items()}
    reference = {kind: run_reference(paths, render, call_reference, FIDELITY_PAGES_PER_KIND)
                 for kind, paths in by_kind.items()}

    exact = all(check_fidelity(tables, reference[kind][2], settings) for kind, (_, _, tables) in measured.items())
    n_pages = sum(t.num_rows for _, _, tables in measured.values() for t in tables)
    ours_s = sum(seconds for seconds, _, _ in measured.values())
    ours_cpu_s = sum(cpu for _, cpu, _ in measured.values())
    ours_bytes = sum(t.nbytes for _, _, tables in measured.values() for t in tables) / n_pages
    ref_s = sum(seconds for seconds, _, _ in reference.values())
    ref_bytes = sum(per_page * sum(t.num_rows for t in measured[kind][2])
                    for kind, (_, per_page, _) in reference.items()) / n_pages
    ours_rate, ref_rate = n_pages / ours_s, n_pages / ref_s
    crops = sum(len(shapes) for _, _, tables in measured.values() for t in tables
                for shapes in t.column("crop_shapes").to_pylist()) / n_pages

    edge = f"at longest edge {render.page_edge}" if args.render_edge else f"by the render rule ({render.page_edge})"
    tiles = f", tiles of {settings.tile_edge}" if settings.idefics3_rule else ""
    print(f"\n{family}: {n_pages} pages ({', '.join(f'{sum(t.num_rows for t in tables)} {kind}' for kind, (_, _, tables) in measured.items())}), "
          f"longest edge {settings.longest_edge}{tiles}, PDF pages rendered {edge}, splitting on "
          f"({crops:.1f} crops per page on average); one process pinned to CPU core {core}")
    # CPU ms/page: this process and its renderer's CPU time, a steadier figure than wall time on a busy machine.
    print(f"{'':34}{'pages/s/core':>14}{'ms/page':>10}{'CPU ms/page':>13}{'MB/page shipped':>18}")
    for kind, (seconds, cpu, tables) in measured.items():
        pages = sum(t.num_rows for t in tables)
        print(f"{'  scriptorium, ' + kind:34}{pages / seconds:14.1f}{1000 * seconds / pages:10.1f}"
              f"{1000 * cpu / pages:13.1f}{sum(t.nbytes for t in tables) / pages / 1e6:18.2f}")
    print(f"{'scriptorium (compressed uint8)':34}{ours_rate:14.1f}{1000 / ours_rate:10.1f}"
          f"{1000 * ours_cpu_s / n_pages:13.1f}{ours_bytes / 1e6:18.2f}")
    print(f"{'reference processor (fp32+int64)':34}{ref_rate:14.1f}{1000 / ref_rate:10.1f}{'':13}{ref_bytes / 1e6:18.2f}")
    print(f"ratios: {ours_rate / ref_rate:.1f}x faster, {ref_bytes / ours_bytes:.1f}x fewer bytes; "
          f"collated crops equal the reference tensors exactly: {'yes' if exact else 'NO'}")
    if family == "idefics2":
        print(f"RESULT preprocess_pages_per_core {ours_rate:.1f} pages/s target >= {TARGETS[family]}")
        print(f"RESULT bytes_per_page {ours_bytes / 1e6:.2f} MB target <= 2")
    else:
        print(f"RESULT preprocess_pages_per_core_{family} {ours_rate:.1f} pages/s target >= {TARGETS[family]}")
    return exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=120)
    parser.add_argument("--render-edge", type=int, default=0, help="render PDF pages at this longest edge "
                        "(0: the pipeline's rule)")
    parser.add_argument("--family", default="all", choices=["all", *TARGETS],
                        help="all: idefics2, idefics3 and smolvlm, one after the other")
    args = parser.parse_args()
    families = ["idefics2", "idefics3", "smolvlm"] if args.family == "all" else [args.family]

    from scriptorium.pipeline.model.tiny import build_tiny_idefics2

    core = pin_to_one_core()
    exact = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        by_kind = write_mix(tmp / "mix", args.pages, PAGES_PER_DOCUMENT)
        # The job needs a checkpoint to start; the CPU stages read only its image settings, which each
        # family's measurement sets to its published ones (this one's are idefics2-8b's, splitting on).
        checkpoint = build_tiny_idefics2(tmp / "model", do_image_splitting=True)
        for family in families:
            exact &= measure(family, args, by_kind, core, checkpoint)
    if not exact:
        sys.exit("the shipped crops do not collate to the reference tensors")


if __name__ == "__main__":
    main()
