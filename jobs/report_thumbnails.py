"""The report's page thumbnails: each page re-read from its source and rendered small, as a JPEG data URI.

They are rendered under the run's own limits (its summary keeps them): the render sandbox with the
run's time and memory limits and caps, its manifest policy for http(s) sources, and no source read that
the run could not read or refused (too large, unsupported, not allowed), so a report over a hostile
corpus takes bounded time and memory. A page without a thumbnail gets the reason instead ("!reason").
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat

from PIL import Image

from scriptorium.connectors.storage import redact
from scriptorium.core.kinds import kind_of
from scriptorium.core.pixels import page_image
from scriptorium.core.spec import RenderSpec, StorageSpec
from scriptorium.pipeline.render.stage import pages_of

NOT_READ_STAGES = ("list", "read")  # a source whose rows failed here was refused or unreadable: not read again
THUMB_EDGE = 256


def thumbnail_settings(limits: dict, edge: int = THUMB_EDGE) -> RenderSpec:
    """The run's render limits (from its summary; the defaults for a run that kept none), at `edge` px."""
    kept = {key: value for key, value in (limits.get("render") or {}).items() if key in RenderSpec.model_fields}
    return RenderSpec().updated(**{**kept, "page_edge": edge})


def thumbnails(sources: dict[str, dict], storage: StorageSpec, settings: RenderSpec) -> dict:
    """{(source, page): data URI or "!reason"} for the wanted pages, rendering each source once.
    `sources`: {source_uri: {"pages": pages wanted, "size": bytes or None, "error": why not to read it}}."""
    with ThreadPoolExecutor(4) as pool:
        parts = pool.map(_source_thumbnails, sources, sources.values(), repeat(storage), repeat(settings))
        return {key: value for part in parts for key, value in part.items()}


def _source_thumbnails(source: str, wanted_source: dict, storage: StorageSpec, settings: RenderSpec) -> dict:
    wanted = wanted_source["pages"]
    plan = {"source_uri": source, "kind": kind_of(source), "error": wanted_source["error"], "size": wanted_source["size"],
            "done_pages": sorted(set(range(max(wanted))) - wanted)}  # pages_of skips "done" pages
    found: dict = {}
    problem = "!no such page in the source"  # or why the source yields no pages at all
    try:
        for row in pages_of(plan, settings, storage):
            if row["status"] != "ok":
                problem = f"!{row['error']}"
            if row["page"] in wanted:
                found[(source, row["page"])] = _data_uri(row, settings.page_edge) if row["status"] == "ok" else problem
            if len(found) == len(wanted):
                break  # the rest of the document is not needed
    except Exception as exc:  # a preview must never stop the report
        problem = "!" + redact(f"{type(exc).__name__}: {exc}")
    return {(source, page): found.get((source, page), problem) for page in wanted}


def sources_to_preview(keys: set, rows: list[dict]) -> dict[str, dict]:
    """The pages to preview of each source, its size, and why it is not to be read at all (its rows
    say the run refused it or could not read it)."""
    sources: dict[str, dict] = defaultdict(lambda: {"pages": set(), "size": None, "error": None})
    for source, page in keys:
        sources[source]["pages"].add(thumbnail_page(page))
    for row in rows:
        source = sources[row["source_uri"]]
        source["size"] = row["source_size"] if row["source_size"] is not None else source["size"]
        if row["status"] == "error" and row["stage"] in NOT_READ_STAGES:
            source["error"] = row["error"]
    return dict(sources)


def thumbnail_page(page: int) -> int:
    """A whole-document row (page -1) is shown with the document's first page."""
    return max(page, 0)


def _data_uri(row: dict, edge: int) -> str:
    image = Image.fromarray(page_image(row))
    image.thumbnail((edge, edge))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
