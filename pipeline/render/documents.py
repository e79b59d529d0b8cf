"""Document rows: the first N pages of a document as one multi-image row, for tasks with scope = "document".

A prompt over several pages needs all their crops in one sequence, so the pages must meet in one row
before the model stage (Ray Data runs blocks in parallel, so pages of one document may otherwise reach
different replicas). The render step is the one place where a document's pages pass through one process
in order, so it builds the row there: page = -1, the pages' images concatenated in page order, one
[h, w] per image in `image_shapes`. If any page of the window fails, the document row is an error row
that names it.
"""

from __future__ import annotations

from typing import Callable, Iterator

from scriptorium.core.schema import DOCUMENT_PAGE, SOURCE_COLUMNS
from scriptorium.core.units import units_by_page


def with_document_row(
    plan_row: dict,
    render: Callable[[dict], Iterator[dict]],
    window: int,
    page_rows: bool = True,
) -> Iterator[dict]:
    """The page rows `render(plan_row)` yields (if `page_rows`), plus one document row of the first
    `window` pages, unless the plan says the document row is already published (resume)."""
    done = set(plan_row.get("done_pages") or [])
    if DOCUMENT_PAGE in done:
        if page_rows:
            yield from render(plan_row)
        return
    # The document row needs its pages even where their own rows are published: render them again,
    # but do not emit their page rows twice.
    again = {p for p in done if 0 <= p < window}
    shown: list[dict] = []
    complete = False
    for page in render({**plan_row, "done_pages": sorted(done - again)}):
        if not complete:
            shown.append(page)
            complete = _window_complete(shown, window)
            if complete:
                yield document_row(plan_row, shown)
        if page_rows and page["page"] not in again:
            yield page
        elif complete and not page_rows:
            return  # no page tasks: stop rendering the rest of the document
    if not complete and shown:
        yield document_row(plan_row, shown)


def _window_complete(shown: list[dict], window: int) -> bool:
    last = shown[-1]
    whole_document_failed = last.get("n_pages") is None  # unreadable file: one error row, page 0
    return whole_document_failed or len(shown) >= window or last["page"] >= last["n_pages"] - 1


def document_row(plan_row: dict, pages: list[dict]) -> dict:
    base = {k: plan_row.get(k) for k in SOURCE_COLUMNS}
    published = units_by_page(plan_row).get(DOCUMENT_PAGE)
    row = {**base, "page": DOCUMENT_PAGE, "n_pages": pages[-1].get("n_pages"), "done_units": published}
    failed = next((p for p in pages if p.get("status") != "ok"), None)
    if failed is not None:
        where = f"page {failed['page']}: " if failed.get("n_pages") is not None else ""
        return {**row, "status": "error", "error": f"{where}{failed.get('error')}", "stage": failed.get("stage")}
    return {
        **row,
        "image": b"".join(p["image"] for p in pages),
        "image_shapes": [[p["height"], p["width"]] for p in pages],
        "status": "ok",
        "error": None,
        "stage": None,
    }
