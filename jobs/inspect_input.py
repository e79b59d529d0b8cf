"""`scriptorium inspect INPUT`: what a job would process, and roughly what it would cost, without a model.

It lists the input exactly as a run would (same listing, include/exclude and size rules), opens each file
with the run's own decoders just far enough to count its pages (PDF: PyMuPDF's page count, nothing
rendered; images: the header and frame count; tar shards: their image members; Parquet shards: the
footer), and
reports documents, pages and bytes by file type, the files a run would turn into error rows (and why),
the job's model as far as its files or its name tell without loading it (its family, and the crops and
image tokens of a typical page), and an estimate of GPU-hours:

    GPU-hours = pages x (task units per page) / (pages per second per GPU) / 3600

The throughput figure is an assumption until you measure it: run a pilot job on a sample of your
documents and pass the `pages/s` that `scriptorium summary` reports (per GPU) as `--pages-per-second`.
Without it, the default (DEFAULT_PAGES_PER_SECOND) is used for an Idefics2 checkpoint only, the family it
was measured with. For any other family, or a model whose family cannot be told, there is no GPU-hour
figure, and the estimate says why: no throughput of another family has been measured, and none can be
derived from Idefics2's. Idefics2's time on the H200 went 52% to the vision tower, ~6% to prefill and
~33% to decoding, whose steps were bound by the host, not the GPU (BENCHMARKS.md, "Where a static batch's
time goes"). Each part changes differently in another family: the vision tower with its size and the
tiles (a Letter page is 17 crops for Idefics3 and SmolVLM, 5 for Idefics2), prefill with the image tokens
(320 for a split Letter page with Idefics2, 2873 with Idefics3-8B, 1088 with SmolVLM-256M), decoding
hardly at all with the text model's size (8B, or 256M to 2.2B) while its steps wait on the host. A
figure scaled by image tokens or parameters would look measured and could be wrong several times over,
in either direction; a pilot run's pages/s is the figure to plan with.

The family comes from a local checkpoint's config.json (`model_type`), or from a hub id's name (one of
idefics2, idefics3, smolvlm in it); the image settings from the checkpoint's processor files, or for a hub
id from the published checkpoint its name matches, then the job's [model] overrides. Crops and image
tokens are given for a Letter and an A4 portrait page rendered by the run's own rule: inspect counts pages
without opening them, so it does not know each page's size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from scriptorium.connectors.listing import list_inputs
from scriptorium.connectors.storage import read_bytes, redact
from scriptorium.core.errors import PageError
from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.kinds import KINDS
from scriptorium.core.spec import InputSpec, JobSpec, ModelSpec, RenderSpec, StorageSpec
from scriptorium.pipeline.crops_idefics3 import PUBLISHED, image_grid
from scriptorium.pipeline.family import FAMILIES  # the config model_types of the checkpoints Scriptorium runs
from scriptorium.pipeline.render.size import page_pixel_size, resolved_render
from scriptorium.pipeline.render.sources import open_source

# Planning default, per GPU and per task unit (one page through one prompt): the static engine's pages/s
# on an H200 at 512 new tokens with splitting (BENCHMARKS.md, GPU), with idefics2-8b. It stands for the
# Idefics2 family only (MEASURED_FAMILY); replace it with a pilot run's figure for other GPUs and lengths.
DEFAULT_PAGES_PER_SECOND = 6.3
MEASURED_FAMILY = "idefics2"
OPEN_WORKERS = 8  # files opened in parallel (object stores are latency-bound)


def count_pages(data: bytes, kind: str, render: RenderSpec) -> int:
    """Pages a run would make of one file, by the run's own decoders (so the reasons cannot drift from a
    run's); raises PageError with the reason a run would record."""
    settings = render.updated(timeout_s=0)  # nothing is rendered: no time limit to keep
    document = open_source(kind, data, settings)
    try:
        return document.n_pages
    finally:
        document.close()


def inspect_file(planned: dict, storage: StorageSpec, render: RenderSpec) -> dict:
    """One listed input -> {source_uri, type, size, pages, error}."""
    uri = planned["source_uri"]
    entry = {"source_uri": uri, "type": _file_type(uri), "kind": planned["kind"], "size": planned["size"],
             "pages": 0, "error": planned.get("error")}
    if entry["error"]:
        return entry
    if planned["kind"] not in KINDS:
        entry["error"] = f"unsupported file type: {posixpath.basename(uri)}"
        return entry
    if not planned["size"]:
        entry["error"] = "file is empty (0 bytes)"
        return entry
    try:
        # A signed URL is read as listed (`fetch_uri`); the entry shows it redacted (`source_uri`).
        entry["pages"] = count_pages(read_bytes(planned.get("fetch_uri") or uri, storage), planned["kind"], render)
    except PageError as exc:
        entry["error"] = str(exc)
    except Exception as exc:
        entry["error"] = redact(f"cannot read: {type(exc).__name__}: {exc}")
    return entry


def inspect_inputs(spec: InputSpec, storage: StorageSpec, render: RenderSpec | None = None) -> Iterator[dict]:
    """Every input a run would plan, opened and counted, in listing order."""
    render = render or RenderSpec()
    listed = list_inputs(spec, storage)
    with ThreadPoolExecutor(OPEN_WORKERS) as pool:
        # A chunk at a time: pool.map would take the whole listing up front.
        while chunk := list(islice(listed, OPEN_WORKERS * 32)):
            yield from pool.map(lambda row: inspect_file(row, storage, render), chunk)


def _file_type(uri: str) -> str:
    name = posixpath.basename(uri).lower()
    return name[name.rfind("."):] if "." in name else "(none)"


def task_units(spec: JobSpec) -> int:
    """Model passes per page: one per task, one per question for QA (at least one when unknown)."""
    units = sum(max(len(t.questions), 1) if t.kind == "qa" else 1 for t in spec.tasks)
    return max(units, 1)


# The job's model, without loading it ------------------------------------------------------------------

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # "org/name", as the driver tells a hub id from a path (loading.py)

# The pages crops and image tokens are given for: Letter and A4 portrait, width and height in points.
TYPICAL_PAGES = {"letter": (612, 792), "a4": (595, 842)}
PAGE_NAMES = {"letter": "Letter", "a4": "A4"}


def published_settings(published: str | None, image_seq_len: int) -> ImageSettings:
    """A published checkpoint's image settings, read by Scriptorium's own reader off transformers' PIL image
    processor at that checkpoint's sizes (crops_idefics3.PUBLISHED); None: Idefics2's class defaults."""
    if published is None:
        return ImageSettings(image_seq_len=image_seq_len)  # 980 px, no splitting
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return ImageSettings.from_image_processor(Idefics3ImageProcessorPil(**PUBLISHED[published]), image_seq_len)


# The published checkpoints, for a hub id (inspect reads no network): the first row whose words all occur
# in the id, in lower case, with the sizes it publishes and its image tokens a crop. Image tokens a crop:
# Idefics2's perceiver has 64 latents; the others, (tile / patch)^2 / pixel shuffle^2: Idefics3-8B
# (364 / 14)^2 / 2^2 = 169, SmolVLM-256M and -500M (512 / 16)^2 / 4^2 = 64, SmolVLM-Instruct and
# SmolVLM2-2.2B (384 / 14 = 27)^2 / 3^2 = 81. Idefics2 splits as its model card says: the
# instruction-tuned checkpoints were trained with splitting, the base one without; which is why inspect
# says "assumed" unless the job sets [model] do_image_splitting.
PUBLISHED_CHECKPOINTS = [
    (("idefics2", "base"), None, 64, False),  # idefics2-8b-base
    (("idefics2",), None, 64, True),  # idefics2-8b
    (("idefics3",), "idefics3", 169, True),  # Idefics3-8B-Llama3
    (("smolvlm", "256m"), "smolvlm", 64, True),  # SmolVLM-256M-Instruct, SmolVLM2-256M-Video-...
    (("smolvlm", "500m"), "smolvlm", 64, True),  # SmolVLM-500M-Instruct, SmolVLM2-500M-Video-...
    (("smolvlm", "2.2b"), "smolvlm-instruct", 81, True),  # SmolVLM2-2.2B-Instruct
    (("smolvlm-instruct",), "smolvlm-instruct", 81, True),  # SmolVLM-Instruct (2.2B)
]

# Image tokens a crop where a checkpoint's processor_config.json leaves it out: its processor class's default.
DEFAULT_IMAGE_SEQ_LEN = {"idefics2": 64, "idefics3": 169, "smolvlm": 169}


def checkpoint_family(model_id: str) -> tuple[str | None, str]:
    """(the checkpoint's family or model_type, where that was read); (None, why) when it cannot be told."""
    if not model_id:
        return None, "no model named (--model or --job)"
    folder = Path(os.path.expanduser(model_id))
    if folder.is_dir():
        model_type = _read_json(folder / "config.json").get("model_type")
        return (model_type, "config.json") if model_type else (None, "no model_type in its config.json")
    if HUB_ID.fullmatch(model_id) and not model_id.startswith("."):
        for family in FAMILIES:
            if family in model_id.lower():
                return family, "hub id"
        return None, "its hub id names none of " + ", ".join(FAMILIES)
    return None, "neither a checkpoint folder nor a hub id"


def checkpoint_image_settings(model: ModelSpec, family: str | None) -> tuple[ImageSettings | None, str]:
    """The image settings a run would resolve (from the checkpoint's processor files, or the published
    checkpoint a hub id names), with the job's [model] overrides; (None, why) when they cannot be told."""
    if family not in FAMILIES:
        return None, ("not a family Scriptorium runs" if family else "unknown family")
    folder = Path(os.path.expanduser(model.id))
    if folder.is_dir():
        try:
            settings, source = local_image_settings(folder, family), "processor files"
        except Exception as exc:  # a folder that is not a whole checkpoint: said, as for a hub id unknown
            return None, f"its processor files cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    else:
        name = model.id.lower()
        published = next((row[1:] for row in PUBLISHED_CHECKPOINTS if all(word in name for word in row[0])), None)
        if published is None:
            return None, "its hub id matches no published checkpoint: inspect a local copy"
        sizes, image_seq_len, splits = published
        settings = dataclasses.replace(published_settings(sizes, image_seq_len), do_image_splitting=splits)
        source = "published checkpoint"
    overrides = {"do_image_splitting": model.do_image_splitting, "longest_edge": model.longest_edge}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None}), source


def local_image_settings(folder: Path, family: str) -> ImageSettings:
    """A checkpoint folder's image settings, as a run reads them (`ImageSettings.from_image_processor`), off
    transformers' PIL image processor (which, unlike SmolVLM's whole processor, needs no torchvision)."""
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    image_seq_len = _read_json(folder / "processor_config.json").get("image_seq_len", DEFAULT_IMAGE_SEQ_LEN[family])
    return ImageSettings.from_image_processor(image_processor, int(image_seq_len))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def page_image_tokens(settings: ImageSettings, render: RenderSpec, width_pt: float, height_pt: float) -> dict:
    """A PDF page of this size (points), rendered by the run's rule: its pixel size, crops and `<image>`
    tokens, and the prompt's whole image part (`prompt_image_tokens`): those with the tags around them as the
    processors write them, each tag and newline counted as one token."""
    import pymupdf

    document = pymupdf.open()
    document.new_page(width=width_pt, height=height_pt)
    width, height = page_pixel_size(document[0], resolved_render(render, settings))
    if settings.idefics3_rule:
        rows, cols = image_grid(height, width, settings)
        crops = rows * cols + 1 if rows else 1
        # Idefics3Processor.replace_image_token: <fake_token_around_image><row_i_col_j> before each tile, a
        # newline after each row and one before the global image, itself <fake_token_around_image>
        # <global-img>, its tokens, <fake_token_around_image>.
        tags = 2 * rows * cols + rows + 1 + 3 if rows else 3
    else:
        crops = settings.images_per_page
        tags = crops + 1  # Idefics2Processor: <fake_token_around_image> before each crop and after the last
    tokens = crops * settings.image_seq_len
    return {"width": width, "height": height, "crops": crops, "image_tokens": tokens,
            "prompt_image_tokens": tokens + tags}


def model_plan(spec: JobSpec) -> dict:
    """What inspect tells of the job's model without loading it: its family, where that was read, and with
    its image settings the crops and image tokens of TYPICAL_PAGES."""
    family, family_from = checkpoint_family(spec.model.id)
    plan = {"id": spec.model.id or None, "family": family, "family_from": family_from,
            "supported": family in FAMILIES}
    settings, settings_from = checkpoint_image_settings(spec.model, family)
    plan["settings_from"] = settings_from
    if settings is None:
        return plan
    plan["do_image_splitting"] = settings.do_image_splitting
    plan["splitting_from"] = "job" if spec.model.do_image_splitting is not None else settings_from
    plan["image_tokens_per_crop"] = settings.image_seq_len
    plan["pages"] = {name: page_image_tokens(settings, spec.render, *size) for name, size in TYPICAL_PAGES.items()}
    return plan


def throughput(pages_per_second: float | None, family: str | None) -> tuple[float | None, str]:
    """(pages/s per GPU the estimate uses, where it comes from); None when there is no figure to use: the
    default was measured with Idefics2, and no other family's can be derived from it (module docstring)."""
    if pages_per_second is not None:
        return pages_per_second, "--pages-per-second"
    if family == MEASURED_FAMILY:
        return DEFAULT_PAGES_PER_SECOND, "measured with idefics2-8b on an H200 at 512 new tokens (BENCHMARKS.md)"
    model = family or "an unknown model"
    return None, f"not measured for {model} (the default, {DEFAULT_PAGES_PER_SECOND:g}, was measured with Idefics2)"


def summarize_inspection(entries: Iterable[dict], spec: JobSpec, pages_per_second: float | None) -> dict:
    by_type: dict[str, dict] = defaultdict(lambda: {"documents": 0, "pages": 0, "bytes": 0, "unreadable": 0})
    unreadable, files = [], []
    for entry in entries:
        files.append(entry)
        kind = by_type[entry["type"]]
        kind["documents"] += 1
        kind["bytes"] += entry["size"] or 0
        kind["pages"] += entry["pages"]
        if entry["error"]:
            kind["unreadable"] += 1
            unreadable.append({"source_uri": entry["source_uri"], "reason": entry["error"]})
    pages = sum(t["pages"] for t in by_type.values())
    model = model_plan(spec)
    return {
        "input": spec.input.uri,
        "documents": len(files),
        "unreadable": len(unreadable),
        "pages": pages,
        "bytes": sum(t["bytes"] for t in by_type.values()),
        "by_type": dict(sorted(by_type.items())),
        "unreadable_files": unreadable,
        "files": files,
        "model": model,
        "estimate": estimate(pages, spec, *throughput(pages_per_second, model["family"])),
    }


def estimate(pages: int, spec: JobSpec, pages_per_second: float | None, pages_per_second_from: str) -> dict:
    """GPU-hours for `pages`, wall time on the spec's replicas, and cost at the spec's GPU price; all None
    when there is no pages/s to plan with."""
    units = task_units(spec)
    resources = spec.resources
    gpus = resources.num_replicas * (resources.gpus_per_replica if resources.gpus_per_replica is not None else 1.0)
    price = resources.gpu_price_per_hour
    gpu_hours = pages * units / pages_per_second / 3600 if pages_per_second else None
    known = gpu_hours is not None
    return {
        "units_per_page": units,
        "pages_per_second_per_gpu": pages_per_second,
        "pages_per_second_from": pages_per_second_from,
        "gpu_hours": round(gpu_hours, 4) if known else None,
        "gpus": gpus,
        "wall_hours": round(gpu_hours / gpus, 4) if known and gpus else None,
        "price_per_hour": price or None,
        "cost": round(gpu_hours * price, 2) if known and price else None,
    }


def format_inspection(report: dict, list_files: bool = False) -> str:
    lines = [f"input {report['input']}: {report['documents']} documents, {report['pages']} pages, "
             f"{_size(report['bytes'])}; {report['unreadable']} would become error rows"]
    lines.append(f"  {'type':<8} {'documents':>10} {'pages':>10} {'size':>10} {'unreadable':>11}")
    for name, t in report["by_type"].items():
        lines.append(f"  {name:<8} {t['documents']:>10} {t['pages']:>10} {_size(t['bytes']):>10} {t['unreadable']:>11}")
    if list_files:
        for f in report["files"]:
            status = f"ERROR {f['error']}" if f["error"] else f"{f['pages']} pages"
            lines.append(f"  {f['source_uri']}  {_size(f['size'])}  {status}")
    elif report["unreadable_files"]:
        for f in report["unreadable_files"][:20]:
            lines.append(f"  unreadable  {f['source_uri']}: {f['reason']}")
        if len(report["unreadable_files"]) > 20:
            lines.append(f"  ... {len(report['unreadable_files']) - 20} more (--files lists every file)")
    lines += format_model(report["model"])
    e = report["estimate"]
    line = f"estimate: {report['pages']} pages x {e['units_per_page']} task unit(s)"
    if e["gpu_hours"] is None:
        lines.append(line + f"; GPU-hours not estimated: pages/s {e['pages_per_second_from']}")
        lines.append("  (run a pilot on a sample of the documents and pass its pages/s as --pages-per-second)")
        return "\n".join(lines)
    line += f" at {e['pages_per_second_per_gpu']:g} pages/s per GPU = {e['gpu_hours']:.4g} GPU-hours"
    if e["wall_hours"] is not None:
        line += f", about {e['wall_hours']:.3g} h on {e['gpus']:g} GPU(s)"
    if e["cost"] is not None:
        line += f", cost about {e['cost']:,.2f} at {e['price_per_hour']:g}/GPU-hour"
    lines.append(line)
    lines.append(f"  (pages/s {e['pages_per_second_from']}: a planning assumption until a pilot run measures "
                 "it; pass that as --pages-per-second)")
    return "\n".join(lines)


def format_model(model: dict) -> list[str]:
    """The model's lines: its family and where that was read, then a typical page's crops and tokens."""
    if model["family"] is None:
        return [f"model {model['id'] or '(none)'}: family unknown: {model['family_from']}"]
    line = f"model {model['id']}: {model['family']} (from its {model['family_from']})"
    if "pages" not in model:
        return [f"{line}: image tokens unknown: {model['settings_from']}"]
    splitting = "on" if model["do_image_splitting"] else "off"
    if model["splitting_from"] == "published checkpoint":  # a hub id, and the job does not say
        splitting += " (assumed: the job leaves it to the checkpoint)"
    lines = [f"{line}, settings of its {model['settings_from']}, image splitting {splitting}"]
    for name, page in model["pages"].items():
        lines.append(f"  {PAGE_NAMES[name]} page: {page['width']}x{page['height']} px, {page['crops']} crop(s), "
                     f"{page['image_tokens']} image tokens ({page['prompt_image_tokens']} with their tags)")
    return lines


def _size(n: int) -> str:
    value = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
