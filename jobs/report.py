"""`scriptorium report OUTPUT --html FILE`: one self-contained HTML page to review a run by eye.

It shows a sample of pages plus every page with an error row; each page is a card with a thumbnail of
the page image (re-read from the source and rendered small, embedded as a JPEG data URI) next to its
result rows (task, question, transcription/answer/caption, status, error, confidence). Two selects filter
the rows by status and by task, a third orders the pages by confidence (the lowest token log-probability
of their rows, worst first), in plain JavaScript: no CDN, no network, one file to mail or attach to a ticket.

Thumbnails are rendered under the run's own limits (its summary keeps them): the render sandbox with
the run's time and memory limits and caps, its manifest policy for http(s) sources, and no source read
that the run could not read or refused (too large, unsupported, not allowed), so a report over a
hostile corpus takes bounded time and memory.

Everything shown is model output or file names, so all of it is HTML-escaped, and a Content Security
Policy allows only this page's own script and style (by hash) and data: images: even a missed escape
could not run script or load anything.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import html
import io
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.connectors.storage import redact
from scriptorium.core.kinds import kind_of
from scriptorium.core.pixels import page_image
from scriptorium.core.spec import RenderSpec, StorageSpec
from scriptorium.jobs.summary import format_summary, load_summary
from scriptorium.pipeline.render.stage import pages_of

KEY_COLUMNS = ["source_uri", "page", "status", "run_id"]
ROW_COLUMNS = ["source_uri", "page", "n_pages", "member", "task", "question", "text", "status", "error", "stage",
               "n_output_tokens", "truncated", "route", "logprob_mean", "logprob_min", "run_id", "source_size"]
NOT_READ_STAGES = ("list", "read")  # a source whose rows failed here was refused or unreadable: not read again
THUMB_EDGE = 256
MAX_ERROR_PAGES = 500  # pages with errors shown (all of them up to this many; the summary counts the rest)


def choose_pages(store: ParquetStore, sample: int, run_id: str | None, seed: int = 0) -> tuple[set, int]:
    """(source_uri, page) keys to show: every page with an error row (up to MAX_ERROR_PAGES) and a
    deterministic pseudo-random sample of `sample` other pages. Reads only the key columns.
    Returns (keys, number of error pages left out)."""
    error_pages: set[tuple] = set()
    sampled: list[tuple] = []  # heap of (-rank, key): the `sample` pages of smallest rank
    in_sample: set[tuple] = set()  # a page has a row per task: sample it once
    for path in store.data_files():
        keys = store.read(path, KEY_COLUMNS)
        if run_id:
            keys = keys.filter(pc.equal(keys["run_id"], run_id))
        for source, page, status in zip(*(keys[c].to_pylist() for c in ("source_uri", "page", "status"))):
            key = (source, page)
            if status == "error":
                error_pages.add(key)
            if key in in_sample:
                continue
            # The rank depends on the page only, so a page that left the sample can never come back.
            rank = zlib.crc32(f"{seed}|{source}|{page}".encode())
            if len(sampled) < sample:
                heapq.heappush(sampled, (-rank, key))
                in_sample.add(key)
            elif sample and -sampled[0][0] > rank:
                in_sample.discard(heapq.heapreplace(sampled, (-rank, key))[1])
                in_sample.add(key)
    errors = sorted(error_pages)
    chosen = set(errors[:MAX_ERROR_PAGES]) | {key for _, key in sampled}
    return chosen, max(len(errors) - MAX_ERROR_PAGES, 0)


def read_rows(store: ParquetStore, keys: set, run_id: str | None) -> list[dict]:
    """Every result row of the chosen pages."""
    sources = pa.array(sorted({source for source, _ in keys}), pa.string())
    rows = []
    for path in store.data_files():
        table = store.read(path, ROW_COLUMNS)
        table = table.filter(pc.is_in(table["source_uri"], value_set=sources))
        if run_id:
            table = table.filter(pc.equal(table["run_id"], run_id))
        rows.extend(r for r in table.to_pylist() if (r["source_uri"], r["page"]) in keys)
    return sorted(rows, key=lambda r: (r["source_uri"], r["page"], r["task"] or "", r["question"] or ""))


# -- thumbnails ----------------------------------------------------------------------------------------
def thumbnail_settings(limits: dict, edge: int = THUMB_EDGE) -> RenderSpec:
    """The run's render limits (from its summary; the defaults for a run that kept none), at `edge` px."""
    kept = {key: value for key, value in (limits.get("render") or {}).items() if key in RenderSpec.model_fields}
    return RenderSpec().updated(**{**kept, "page_edge": edge})


def thumbnails(sources: dict[str, dict], storage: StorageSpec, settings: RenderSpec) -> dict:
    """{(source, page): data URI or "!reason"} for the wanted pages, rendering each source once.
    `sources`: {source_uri: {"pages": pages wanted, "size": bytes or None, "error": why not to read it}}."""
    with ThreadPoolExecutor(4) as pool:
        results = pool.map(lambda item: _source_thumbnails(item[0], item[1], storage, settings), sources.items())
        return {key: value for part in results for key, value in part.items()}


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
        sources[source]["pages"].add(_thumb_page(page))
    for row in rows:
        source = sources[row["source_uri"]]
        source["size"] = row["source_size"] if row["source_size"] is not None else source["size"]
        if row["status"] == "error" and row["stage"] in NOT_READ_STAGES:
            source["error"] = row["error"]
    return dict(sources)


def _thumb_page(page: int) -> int:
    """A whole-document row (page -1) is shown with the document's first page."""
    return max(page, 0)


def _data_uri(row: dict, edge: int) -> str:
    image = Image.fromarray(page_image(row))
    image.thumbnail((edge, edge))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


# -- the page --------------------------------------------------------------------------------------------
STYLE = """
[hidden] { display: none !important; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
header { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ccc; }
pre.summary { font-size: 12px; background: #f6f6f6; padding: .5em; overflow-x: auto; }
section.page { display: flex; gap: 1em; border-bottom: 1px solid #ddd; padding: 1em 0; }
section.page img, .no-thumb { width: 256px; min-width: 256px; object-fit: contain; align-self: flex-start; }
.no-thumb { background: #eee; color: #a00; padding: .5em; box-sizing: border-box; font-size: 12px; }
.rows { flex: 1; min-width: 0; }
h2 { font-size: 14px; margin: 0 0 .4em; word-break: break-all; }
table { border-collapse: collapse; width: 100%; }
td, th { border-top: 1px solid #eee; padding: .3em; vertical-align: top; text-align: left; }
td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; word-break: break-word; }
tr.error td { background: #fff0f0; }
.status-error { color: #a00; font-weight: bold; }
"""

SCRIPT = """
(function () {
  var statusFilter = document.getElementById('status-filter');
  var taskFilter = document.getElementById('task-filter');
  var counter = document.getElementById('visible-count');
  function apply() {
    var status = statusFilter.value, task = taskFilter.value, shown = 0, total = 0;
    document.querySelectorAll('section.page').forEach(function (card) {
      var inCard = 0;
      card.querySelectorAll('tr.result').forEach(function (row) {
        var visible = (!status || row.dataset.status === status) && (!task || row.dataset.task === task);
        row.hidden = !visible;
        total += 1;
        if (visible) { inCard += 1; }
      });
      card.hidden = inCard === 0;
      shown += inCard;
    });
    counter.textContent = shown + ' of ' + total + ' rows shown';
  }
  var order = document.getElementById('order');
  var main = document.querySelector('main');
  var cards = Array.from(document.querySelectorAll('section.page'));
  function sort() {
    // Pages without a confidence (errors, routed rows) keep their place after the scored ones.
    var key = function (card) { var v = card.dataset.confidence; return v === '' ? Infinity : Number(v); };
    var sorted = order.value === 'confidence'
      ? cards.slice().sort(function (a, b) { return key(a) - key(b) || cards.indexOf(a) - cards.indexOf(b); })
      : cards;
    sorted.forEach(function (card) { main.appendChild(card); });
  }
  statusFilter.addEventListener('change', apply);
  taskFilter.addEventListener('change', apply);
  order.addEventListener('change', sort);
  apply();
})();
"""


def _page_label(page: int, n_pages: int | None, member: str | None = None) -> str:
    if page < 0:
        return "whole document"
    if member:  # a tar shard's image
        return f"{member} (image {page} of {n_pages})"
    return f"page {page}" + (f" of {n_pages}" if n_pages else "")


def _confidence(row: dict) -> str:
    """A model row's mean and lowest token log-probability; nothing for rows the model did not make."""
    if row["logprob_min"] is None:
        return ""
    return f"{row['logprob_mean']:.2f} / {row['logprob_min']:.2f}"


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render_html(title: str, summary_text: str, rows: list[dict], thumbs: dict, note: str = "") -> str:
    esc = lambda value: html.escape("" if value is None else str(value), quote=True)  # noqa: E731
    statuses = sorted({r["status"] or "" for r in rows})
    tasks = sorted({r["task"] or "" for r in rows})
    by_page: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_page[(row["source_uri"], row["page"])].append(row)

    cards = []
    for (source, page), page_rows in by_page.items():
        thumb = thumbs.get((source, _thumb_page(page)), "!no preview")
        if thumb.startswith("data:image/jpeg;base64,"):
            picture = f'<img src="{esc(thumb)}" alt="page {esc(page)} of {esc(source)}">'
        else:
            picture = f'<div class="no-thumb">no preview: {esc(thumb[1:])}</div>'
        n_pages, member = page_rows[0]["n_pages"], page_rows[0]["member"]
        scores = [r["logprob_min"] for r in page_rows if r["logprob_min"] is not None]
        worst = f"{min(scores):.4f}" if scores else ""
        body = []
        for r in page_rows:
            detail = r["text"] if r["status"] == "ok" else f"[{r['stage']}] {r['error']}"
            tokens = "" if r["n_output_tokens"] is None else f"{r['n_output_tokens']}{' (truncated)' if r['truncated'] else ''}"
            body.append(
                f'<tr class="result {esc(r["status"])}" data-status="{esc(r["status"])}" data-task="{esc(r["task"])}">'
                f'<td>{esc(r["task"])}</td><td>{esc(r["question"])}</td>'
                f'<td class="status-{esc(r["status"])}">{esc(r["status"])}</td>'
                f'<td class="route">{esc(r["route"])}</td>'
                f'<td class="text">{esc(detail)}</td><td>{esc(tokens)}</td><td>{esc(_confidence(r))}</td></tr>'
            )
        cards.append(
            f'<section class="page" data-confidence="{worst}">{picture}<div class="rows"><h2>{esc(source)} &middot; {esc(_page_label(page, n_pages, member))}'
            f'</h2><table><thead><tr><th>task</th><th>question</th>'
            f'<th>status</th><th>route</th><th>text / error</th><th>tokens</th><th>log-prob mean / min</th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody>'
            f'</table></div></section>'
        )

    options = lambda values: "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)  # noqa: E731
    csp = f"default-src 'none'; img-src data:; style-src {_csp_hash(STYLE)}; script-src {_csp_hash(SCRIPT)}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{STYLE}</style></head>
<body><header><h1>{esc(title)}</h1>
<label>status <select id="status-filter"><option value="">all</option>{options(statuses)}</select></label>
<label>task <select id="task-filter"><option value="">all</option>{options(tasks)}</select></label>
<label>order <select id="order"><option value="">as listed</option>
<option value="confidence">lowest confidence first</option></select></label>
<span id="visible-count"></span>{f" &middot; {esc(note)}" if note else ""}</header>
<pre class="summary">{esc(summary_text)}</pre>
<main>{"".join(cards) or "<p>No rows to show.</p>"}</main>
<script>{SCRIPT}</script></body></html>
"""


def build_report(output: str, storage: StorageSpec, sample: int = 50, run_id: str | None = None,
                 thumb_edge: int = THUMB_EDGE) -> tuple[str, dict]:
    """The report's HTML and a few counts (pages, rows, errors left out). Raises SpecError when the
    output has no results."""
    store = ParquetStore(output, storage)
    summary = load_summary(store, run_id)  # SpecError for an empty output or an unknown run
    keys, errors_left_out = choose_pages(store, sample, run_id)
    rows = read_rows(store, keys, run_id)
    limits = (summary.get("run") or {}).get("limits") or {}
    manifest_allow = (limits.get("input") or {}).get("manifest_allow") or []
    storage = storage.updated(http_allow=tuple(manifest_allow))  # the run's policy for http(s) sources
    thumbs = thumbnails(sources_to_preview(keys, rows), storage, thumbnail_settings(limits, thumb_edge))
    note = f"{errors_left_out} more pages with errors not shown" if errors_left_out else ""
    title = f"Scriptorium report: {redact(output)}" + (f" (run {run_id})" if run_id else "")
    page = render_html(title, format_summary(summary), rows, thumbs, note)
    return page, {"pages": len(keys), "rows": len(rows), "errors_left_out": errors_left_out}
