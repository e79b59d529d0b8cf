"""`scriptorium inspect INPUT`: what a job would process, and roughly what it would cost, without a model.

It lists the input exactly as a run would (same listing, include/exclude and size rules), opens each file
with the run's own decoders just far enough to count its pages (PDF: PyMuPDF's page count, nothing
rendered; images: the header and frame count; tar shards: their image members; Parquet shards: the
footer), and
reports documents, pages and bytes by file type, the files a run would turn into error rows (and why),
and an estimate of GPU-hours:

    GPU-hours = pages x (task units per page) / (pages per second per GPU) / 3600

The throughput figure is an assumption until you measure it: run a pilot job on a sample of your
documents and pass the `pages/s` that `scriptorium summary` reports (per GPU) as `--pages-per-second`.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Iterable, Iterator

from scriptorium.connectors.listing import list_inputs
from scriptorium.connectors.storage import read_bytes, redact
from scriptorium.core.errors import PageError
from scriptorium.core.kinds import KINDS
from scriptorium.core.spec import InputSpec, JobSpec, RenderSpec, StorageSpec
from scriptorium.pipeline.render.sources import open_source

# Planning default, per GPU and per task unit (one page through one prompt): the static engine's pages/s
# on an H200 at 512 new tokens with splitting (BENCHMARKS.md, GPU). Replace it with a pilot run's figure
# for other GPUs and lengths.
DEFAULT_PAGES_PER_SECOND = 6.3
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


def summarize_inspection(entries: Iterable[dict], spec: JobSpec, pages_per_second: float) -> dict:
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
    return {
        "input": spec.input.uri,
        "documents": len(files),
        "unreadable": len(unreadable),
        "pages": pages,
        "bytes": sum(t["bytes"] for t in by_type.values()),
        "by_type": dict(sorted(by_type.items())),
        "unreadable_files": unreadable,
        "files": files,
        "estimate": estimate(pages, spec, pages_per_second),
    }


def estimate(pages: int, spec: JobSpec, pages_per_second: float) -> dict:
    """GPU-hours for `pages`, wall time on the spec's replicas, and cost at the spec's GPU price."""
    units = task_units(spec)
    gpu_hours = pages * units / pages_per_second / 3600
    resources = spec.resources
    gpus = resources.num_replicas * (resources.gpus_per_replica if resources.gpus_per_replica is not None else 1.0)
    price = resources.gpu_price_per_hour
    return {
        "units_per_page": units,
        "pages_per_second_per_gpu": pages_per_second,
        "gpu_hours": round(gpu_hours, 4),
        "gpus": gpus,
        "wall_hours": round(gpu_hours / gpus, 4) if gpus else None,
        "price_per_hour": price or None,
        "cost": round(gpu_hours * price, 2) if price else None,
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
    e = report["estimate"]
    line = (f"estimate: {report['pages']} pages x {e['units_per_page']} task unit(s) at "
            f"{e['pages_per_second_per_gpu']:g} pages/s per GPU = {e['gpu_hours']:.4g} GPU-hours")
    if e["wall_hours"] is not None:
        line += f", about {e['wall_hours']:.3g} h on {e['gpus']:g} GPU(s)"
    if e["cost"] is not None:
        line += f", cost about {e['cost']:,.2f} at {e['price_per_hour']:g}/GPU-hour"
    lines.append(line)
    lines.append("  (pages/s is a planning assumption: measure it with a pilot run and pass --pages-per-second)")
    return "\n".join(lines)


def _size(n: int) -> str:
    value = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
