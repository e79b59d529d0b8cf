"""The dedup route: pages whose rendered pixels are identical to a page seen earlier in the run, or
published by an earlier run into the same output with the same model, prompt and generation settings
(routing.dedup), reuse that page's result instead of being generated again.

Exactly once per run. Ray Data runs blocks in parallel, so a duplicate can be routed while its
original is still on its way to the GPU. A small registry actor (one per run) keys each unit by
(pixel hash, task, question) and answers one of three things when a page claims it:
  lead  nobody had it: this page is processed normally (the original);
  done  the original's result is known: it is copied here at once (route dedup, dedup_of = original);
  wait  the original is still in flight: the unit travels as a `pending` row, and the driver, the single
        consumer of results (`DedupJoin`), fills it in when the original's row arrives.
When the driver sees an original's row it *settles* the key in the registry, which returns how many
pending rows wait for it (after settling, nobody else waits on that key: later duplicates get `done`,
or `lead` again if the original failed or its result was evicted). The driver keeps an original's row
only until those pending rows are filled, and the registry keeps ok results in a bounded LRU
(routing.dedup_cache_mb), so memory stays bounded in both. Pending rows never reach the sink.

Across runs: before a run starts, the driver *seeds* the registry with the ok results earlier runs
published (`earlier_results`: the same model, prompt and generation settings only), so an incremental
run over a grown corpus does not caption a copy of an image it already captioned. Seeded results share
the LRU with the run's own (routing.dedup_across_runs = false turns this off).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, defaultdict
from itertools import islice
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray

from scriptorium.core.schema import RESULT_SCHEMA, table_from_rows
from scriptorium.core.spec import RoutingSpec
from scriptorium.pipeline.extraction import COLUMN_PREFIX as EXTRACT_PREFIX
from scriptorium.pipeline.results import routed

RESULT_FIELDS = ("status", "text", "error", "stage", "model", "prompt", "generation", "max_new_tokens",
                 "n_input_tokens", "n_output_tokens", "truncated")


# -- dedup ------------------------------------------------------------------------------------------------
def content_hash(row: dict) -> str:
    """A hash of the rendered pixels and their shape: equal hashes mean the model sees equal inputs."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{row['width']}x{row['height']}:".encode())
    digest.update(row["image"])
    return digest.hexdigest()


def page_id(row: dict) -> str:
    return f"{row['source_uri']}#{row['page']}"


def dedup_key(content: str, task: str, question: str | None) -> str:
    return f"{content}|{task}|{question or ''}"


class DedupRegistry:
    """One per run (a Ray actor): which page leads each unit key, and the results of finished ones."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.results: OrderedDict[str, dict] = OrderedDict()  # key -> an ok result (LRU)
        self.bytes = 0
        self.in_flight: dict[str, list] = {}  # key -> [leader page id, number of pending followers]

    def claim(self, keys: list[str], ids: list[str]) -> list[tuple[str, object]]:
        answers = []
        for key, claimant in zip(keys, ids):
            if key in self.results:
                self.results.move_to_end(key)
                answers.append(("done", self.results[key]))
            elif key in self.in_flight and self.in_flight[key][0] != claimant:
                self.in_flight[key][1] += 1
                answers.append(("wait", self.in_flight[key][0]))
            else:  # first claim, or the same page claiming again (a retried task): it leads
                self.in_flight.setdefault(key, [claimant, 0])
                answers.append(("lead", None))
        return answers

    def settle(self, outcomes: list[tuple[str, dict | None]]) -> list[int]:
        """Record originals' outcomes (an ok result, or None); return each key's pending followers."""
        waiting = []
        for key, result in outcomes:
            waiting.append(self.in_flight.pop(key, [None, 0])[1])
            if result is not None and key not in self.results:
                self.results[key] = result
                self.bytes += _size(result)
                while self.bytes > self.max_bytes and self.results:
                    self.bytes -= _size(self.results.popitem(last=False)[1])
        return waiting


    def seed(self, entries: list[tuple[str, dict]]) -> tuple[int, bool]:
        """Results published by earlier runs, reused like this run's own. Returns how many were taken,
        and whether the cache is now full (then more would only push earlier ones out)."""
        added = 0
        for key, result in entries:
            if self.bytes >= self.max_bytes:
                break
            if key not in self.results:
                added += 1
                self.results[key] = result
                self.bytes += _size(result)
        return added, self.bytes >= self.max_bytes


def earlier_results(store, book, processor, model_id: str) -> Iterator[tuple[str, dict]]:
    """(dedup key, shared result) of each ok row earlier runs published that this run would make the same
    way: the same model, prompt and generation settings, for a page whose pixels were hashed (a run with
    routing.dedup). A page of this run with the same pixels then reuses it instead of generating."""
    tasks = {t.task_name: t for t in book.tasks if t.scope == "page"}
    columns = ["source_uri", "page", "task", "question", "content_hash", "dedup_of", *RESULT_FIELDS]
    for path in store.data_files():
        table = store.read(path, columns)
        reusable = pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["content_hash"]))
        for row in table.filter(reusable).to_pylist():
            task = tasks.get(row["task"])
            if task is None or row["model"] != model_id:
                continue
            plan = book.plan(processor, task, row["question"])
            if (row["prompt"], row["generation"]) != (plan.prompt, plan.generation):
                continue
            shared = {**{k: row[k] for k in RESULT_FIELDS}, "dedup_of": row["dedup_of"] or page_id(row)}
            yield dedup_key(row["content_hash"], row["task"], row["question"]), shared


def seed_registry(registry, entries: Iterator[tuple[str, dict]], chunk: int = 2000) -> int:
    """Hand `entries` to the registry actor a chunk at a time, until its cache is full (earlier runs'
    results beyond routing.dedup_cache_mb are not read at all); return how many it took."""
    taken, full = 0, False
    while not full and (batch := list(islice(entries, chunk))):
        added, full = ray.get(registry.seed.remote(batch))
        taken += added
    return taken


def _size(result: dict) -> int:
    return 200 + sum(len(v) for v in result.values() if isinstance(v, str))


def start_registry(routing: RoutingSpec, run_id: str):
    """The run's dedup registry actor (None when routing.dedup is off)."""
    if not routing.dedup:
        return None
    actor = ray.remote(num_cpus=0, max_restarts=0)(DedupRegistry)
    return actor.options(name=f"scriptorium-dedup-{run_id}", get_if_exists=True).remote(routing.dedup_cache_mb << 20)


def _shared_result(row: dict) -> dict:
    """What a duplicate copies from its original: the result columns and any typed extract column."""
    extracted = {k: v for k, v in row.items() if k.startswith(EXTRACT_PREFIX)}
    return {"dedup_of": page_id(row), **{k: row.get(k) for k in RESULT_FIELDS}, **extracted}


class DedupJoin:
    """Driver side of dedup: settles originals, fills pending duplicates, never lets a pending row out."""

    def __init__(self, registry):
        self.registry = registry
        self.originals: dict[str, list] = {}  # key -> [original's shared result, followers still to fill]
        self.pending: dict[str, list[dict]] = defaultdict(list)
        self.schema = RESULT_SCHEMA

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.schema = batch.schema  # the results' (with a job's extract columns)
        out, settle = [], []
        for row in batch.to_pylist():
            key = dedup_key(row["content_hash"], row["task"], row["question"]) if row.get("content_hash") else None
            if row["status"] == "pending":
                self.pending[key].append(row)
                continue
            out.append(row)
            if key and row.get("route") not in ("dedup", "text_layer"):
                settle.append((key, _shared_result(row)))
        if settle:
            outcomes = [(k, r if r["status"] == "ok" else None) for k, r in settle]
            for (key, shared), n_waiting in zip(settle, ray.get(self.registry.settle.remote(outcomes))):
                if n_waiting:
                    self.originals[key] = [shared, n_waiting]
        for key in [k for k in self.pending if k in self.originals]:
            original = self.originals[key]
            for row in self.pending.pop(key):
                out.append(fill_duplicate(row, original[0]))
                original[1] -= 1
            if original[1] <= 0:
                del self.originals[key]
        return table_from_rows(out, self.schema)

    def join(self, batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
        for batch in batches:
            yield self(batch)
        yield self.close()

    def close(self) -> pa.Table:
        """Pending rows whose original never arrived (should not happen) become error rows, not gaps."""
        rows = [{**row, "status": "error", "stage": "dedup",
                 "error": f"duplicate of {row.get('dedup_of')}, whose result never arrived"}
                for rows in self.pending.values() for row in rows]
        self.pending.clear()
        return table_from_rows(rows, self.schema)


def fill_duplicate(row: dict, shared: dict) -> dict:
    filled = {**row, **{k: v for k, v in shared.items() if k != "dedup_of"}, "route": "dedup",
              "dedup_of": shared["dedup_of"]}
    if shared["status"] != "ok":
        filled["error"] = f"duplicate of {shared['dedup_of']}, which failed: {shared.get('error')}"
    return filled


def route_duplicates(rows: list[dict], open_units: dict[int, list], registry) -> None:
    """Claim every open unit of `rows` (ok page rows) in the registry by its pixels' hash; units another
    page leads are answered now (`done`) or travel as `pending` rows for the driver to fill (`wait`)."""
    claims = []  # (row, task, question, key)
    for row in rows:
        row["content_hash"] = content_hash(row)
        for task, question in open_units[id(row)]:
            if not (task.kind == "qa" and question is None):
                claims.append((row, task, question, dedup_key(row["content_hash"], task.task_name, question)))
    if not claims:
        return
    answers = ray.get(registry.claim.remote([c[3] for c in claims], [page_id(c[0]) for c in claims]))
    for (row, task, question, _key), (answer, value) in zip(claims, answers):
        if answer == "lead":
            continue
        if answer == "done":
            entry = {**{k: value.get(k) for k in RESULT_FIELDS}, "dedup_of": value["dedup_of"]}
            row["routed"].append(routed(task, question, route="dedup", **entry))
        else:
            row["routed"].append(routed(task, question, route="dedup", status="pending", dedup_of=value))
        open_units[id(row)].remove((task, question))
