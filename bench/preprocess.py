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
the render stage's page function (`pages_of`, PDF pages at the family's render edge, its longest edge)
then `crops_idefics3.idefics3_crops` and `compress_crops` per page, the preprocess stage's work; shipped
bytes are the compressed crops. The reference is `Idefics3ImageProcessorPil` / `SmolVLMImageProcessorPil`
with the checkpoint's settings, splitting on, on the same page images. Each family prints
`RESULT preprocess_pages_per_core_<family>`; Idefics2's lines are as they were.
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


def cpu_job(checkpoint: Path, render_edge: int):
    """(the CPU stages, the derived settings) of an OCR job on `checkpoint`, PDF pages at `render_edge` px
    (0: the render rule)."""
    from scriptorium.core.spec import JobSpec, ModelSpec, RenderSpec, TaskSpec
    from scriptorium.pipeline.stages import derive, job_stages, stages_until

    spec = JobSpec(model=ModelSpec(id=str(checkpoint), device="cpu"), tasks=[TaskSpec(kind="ocr")],
                   render=RenderSpec(page_edge=render_edge))
    derived = derive(spec)
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
    import torch

    from scriptorium.core.pixels import decompress_crops
    from scriptorium.pipeline.model.collate import collate_pixels

    rows = [row for table in tables for row in table.to_pylist()][: len(reference_outputs)]
    for row, ref in zip(rows, reference_outputs):
        pixels, mask = collate_pixels([decompress_crops(row["pixels"], row["crop_shapes"])], settings)
        if not (torch.equal(pixels, ref["pixel_values"]) and torch.equal(mask, ref["pixel_attention_mask"].bool())):
            return False
    return True


FAMILY_TARGETS = {"idefics3": 10, "smolvlm": 5, "smolvlm-instruct": 8}  # pages/s per core


def family_processor(family: str):
    """The family's reference image processor (PIL backend) at its published checkpoint's settings."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from scriptorium.pipeline.crops_idefics3 import PUBLISHED

    cls = Idefics3ImageProcessorPil if family == "idefics3" else SmolVLMImageProcessorPil
    return cls(**PUBLISHED[family])


def run_family_ours(paths, render, settings):
    """Render, cut and compress every page of `paths`; returns (seconds, CPU seconds, [(blob, shapes, page)])."""
    from scriptorium.core.pixels import compress_crops, page_image
    from scriptorium.core.spec import StorageSpec
    from scriptorium.pipeline.crops_idefics3 import idefics3_crops
    from scriptorium.pipeline.render.stage import pages_of

    started, started_cpu = time.perf_counter(), cpu_seconds()
    shipped = []
    for path in paths:
        for row in pages_of(plan_of(path).to_pylist()[0], render, StorageSpec()):
            crops, rows, cols = idefics3_crops(page_image(row), settings)
            shipped.append((*compress_crops(crops), (rows, cols)))
    return time.perf_counter() - started, cpu_seconds() - started_cpu, shipped


def check_family_fidelity(shipped, reference_outputs, settings) -> bool:
    import torch

    from scriptorium.core.pixels import decompress_crops
    from scriptorium.pipeline.model.collate import collate_pixels

    for (blob, shapes, grid), ref in zip(shipped, reference_outputs):
        pixels, mask = collate_pixels([decompress_crops(blob, shapes)], settings)
        if not (torch.equal(pixels, ref["pixel_values"]) and torch.equal(mask, ref["pixel_attention_mask"].bool())
                and grid == (ref["rows"][0][0], ref["cols"][0][0])):
            return False
    return True


def measure_family(family: str, by_kind: dict, core: int) -> bool:
    """One Idefics3-family run on the mix beside its reference processor; prints its table and RESULT line."""
    from scriptorium.core.image_settings import ImageSettings
    from scriptorium.core.spec import RenderSpec
    from scriptorium.pipeline.render.size import resolved_render

    image_processor = family_processor(family)
    settings = ImageSettings.from_image_processor(image_processor)
    render = resolved_render(RenderSpec(), settings)
    run_family_ours([paths[0] for paths in by_kind.values()], render, settings)  # warm-up
    measured = {kind: run_family_ours(paths, render, settings) for kind, paths in by_kind.items()}

    def reference_processor(images, **kwargs):
        return image_processor(images, return_row_col_info=True, **kwargs)

    reference = {kind: run_reference(paths, render, reference_processor, FIDELITY_PAGES_PER_KIND)
                 for kind, paths in by_kind.items()}
    exact = all(check_family_fidelity(shipped, reference[kind][2], settings)
                for kind, (_, _, shipped) in measured.items())
    n_pages = sum(len(shipped) for _, _, shipped in measured.values())
    ours_s = sum(seconds for seconds, _, _ in measured.values())
    ours_cpu_s = sum(cpu for _, cpu, _ in measured.values())
    ours_bytes = sum(len(blob) + 8 * len(shapes) for _, _, shipped in measured.values()
                     for blob, shapes, _ in shipped) / n_pages
    ref_s = sum(seconds for seconds, _, _ in reference.values())
    ref_bytes = sum(per_page * len(measured[kind][2]) for kind, (_, per_page, _) in reference.items()) / n_pages
    ours_rate, ref_rate = n_pages / ours_s, n_pages / ref_s
    crops = sum(len(shapes) for _, _, shipped in measured.values() for _, shapes, _ in shipped) / n_pages

    print(f"\n{family}: {image_processor.size['longest_edge']} px, tiles of {settings.tile_edge}, splitting on "
          f"({crops:.1f} crops per page on average); PDF pages rendered at {render.page_edge}; "
          f"one process pinned to CPU core {core}")
    print(f"{'':34}{'pages/s/core':>14}{'ms/page':>10}{'CPU ms/page':>13}{'MB/page shipped':>18}")
    for kind, (seconds, cpu, shipped) in measured.items():
        pages = len(shipped)
        print(f"{'  scriptorium, ' + kind:34}{pages / seconds:14.1f}{1000 * seconds / pages:10.1f}"
              f"{1000 * cpu / pages:13.1f}{sum(len(b) for b, _, _ in shipped) / pages / 1e6:18.2f}")
    print(f"{'scriptorium (compressed uint8)':34}{ours_rate:14.1f}{1000 / ours_rate:10.1f}"
          f"{1000 * ours_cpu_s / n_pages:13.1f}{ours_bytes / 1e6:18.2f}")
    print(f"{'reference processor (fp32+int64)':34}{ref_rate:14.1f}{1000 / ref_rate:10.1f}{'':13}{ref_bytes / 1e6:18.2f}")
    print(f"ratios: {ours_rate / ref_rate:.1f}x faster, {ref_bytes / ours_bytes:.1f}x fewer bytes; "
          f"collated crops equal the reference tensors exactly: {'yes' if exact else 'NO'}")
    print(f"RESULT preprocess_pages_per_core_{family} {ours_rate:.1f} pages/s target >= {FAMILY_TARGETS[family]}")
    return exact


def measure_idefics2(args, by_kind: dict, core: int, tmp: Path) -> bool:
    """Idefics2 through the job's own CPU stages beside its reference processor; prints its table and RESULTs."""
    from scriptorium.pipeline.model.tiny import build_tiny_idefics2

    # The idefics2-8b processor settings (980 / 378, mean = std = 0.5), with image splitting on.
    checkpoint = build_tiny_idefics2(tmp / "model", do_image_splitting=True)
    cpu_stages, derived = cpu_job(checkpoint, args.render_edge)
    settings, render = derived.image_settings, derived.render

    # Warm-up, one file of each kind: imports (torch's, in the renderer, comes with the first scan that
    # needs a resize), first-call costs; a worker pays them once for all the pages it ever renders.
    run_ours([paths[0] for paths in by_kind.values()], cpu_stages)
    measured = {kind: run_ours(paths, cpu_stages) for kind, paths in by_kind.items()}
    reference = {kind: run_reference(paths, render, derived.processor.image_processor, FIDELITY_PAGES_PER_KIND)
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

    edge = f"at longest edge {render.page_edge}" if args.render_edge else "by the render rule"
    print(f"pages: {n_pages} ({', '.join(f'{sum(t.num_rows for t in tables)} {kind}' for kind, (_, _, tables) in measured.items())}), "
          f"PDF pages rendered {edge}, splitting on ({settings.images_per_page} crops per page); "
          f"one process pinned to CPU core {core}")
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
    print(f"RESULT preprocess_pages_per_core {ours_rate:.1f} pages/s target >= 20")
    print(f"RESULT bytes_per_page {ours_bytes / 1e6:.2f} MB target <= 2")
    return exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=120)
    parser.add_argument("--render-edge", type=int, default=0, help="render PDF pages at this longest edge "
                        "(0: the pipeline's rule)")
    parser.add_argument("--family", default="all", choices=["all", "idefics2", *FAMILY_TARGETS],
                        help="all: idefics2, idefics3 and smolvlm, one after the other")
    args = parser.parse_args()
    families = ["idefics2", "idefics3", "smolvlm"] if args.family == "all" else [args.family]

    core = pin_to_one_core()
    exact = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        by_kind = write_mix(tmp / "mix", args.pages, PAGES_PER_DOCUMENT)
        for family in families:
            if family == "idefics2":
                exact &= measure_idefics2(args, by_kind, core, tmp)
            else:
                exact &= measure_family(family, by_kind, core)
    if not exact:
        sys.exit("the shipped crops do not collate to the reference tensors")


if __name__ == "__main__":
    main()
