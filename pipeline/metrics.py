"""Application metrics through Ray's metrics system (`ray.util.metrics`): every process that records one
(a render task, a model replica, the driver) reports it to its node's Ray metrics agent, which Prometheus
scrapes beside Ray's own metrics. Prometheus sees each name with Ray's prefix: `scriptorium_pages_total`
is `ray_scriptorium_pages_total` there. The names, labels and queries: docs/operations.md#metrics.

A stage records a whole batch in one call (`Meter.pages(...)`, `Meter.batch(...)`, `Meter.rows(...)`):
a few counter increments per batch, never one per row. A `Meter` is a small picklable value (the run id,
and whether metrics are on: `[resources] metrics`); the instruments themselves are made once per process,
on first use, and only in a process joined to Ray, so the in-process walker and the unit tests record
nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

# Seconds a model batch takes (a histogram's buckets: Ray sums it from bucket midpoints, so its _sum is
# approximate; scriptorium_generate_seconds_total is exact).
GENERATE_SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250]
WAIT_SECONDS_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]

_lock = threading.Lock()
_instruments: dict | None = None


def _make_instruments() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    def counter(name, description, *labels):
        return Counter(name, description=description, tag_keys=("run_id", *labels))

    def gauge(name, description, *labels):
        return Gauge(name, description=description, tag_keys=("run_id", *labels))

    def histogram(name, description, boundaries, *labels):
        return Histogram(name, description=description, boundaries=boundaries, tag_keys=("run_id", *labels))

    return {
        "pages": counter("scriptorium_pages_total", "Pages through a stage (render, route, preprocess, generate), "
                         "by the status they left it with", "stage", "status"),
        "bytes_read": counter("scriptorium_read_bytes_total", "Bytes of the input files read by the render stage"),
        "routed": counter("scriptorium_routed_units_total", "Units answered before the model, by route "
                          "(text_layer, tesseract, dedup: a dedup hit) and status", "route", "status"),
        "rows": counter("scriptorium_rows_total", "Result rows written to the output, by task, status, the stage "
                        "that failed them and the route that answered them", "task", "status", "stage", "route"),
        "input_tokens": counter("scriptorium_input_tokens_total", "Prompt tokens of the generated sequences "
                                "(images included)", "replica", "node"),
        "output_tokens": counter("scriptorium_output_tokens_total", "Tokens generated", "replica", "node"),
        "batches": counter("scriptorium_batches_total", "Model batches generated", "replica", "node"),
        "batch_pages": counter("scriptorium_batch_pages_total", "Sequences (page, prompt) in the model batches, "
                               "retries included", "replica", "node"),
        "batch_tokens": counter("scriptorium_batch_tokens_total", "KV-cache tokens the model batches asked for "
                                "(prompt + max_new_tokens per sequence)", "replica", "node"),
        "budget_pages": gauge("scriptorium_batch_budget_pages", "Pages per model batch, the replica's upper bound",
                              "replica", "node"),
        "budget_tokens": gauge("scriptorium_batch_budget_tokens", "Tokens per model batch, the replica's budget "
                               "(0: none, on CPU)", "replica", "node"),
        "generate_seconds": histogram("scriptorium_generate_seconds", "Seconds per model batch (encode and "
                                      "generate)", GENERATE_SECONDS_BUCKETS, "replica", "node"),
        "generate_seconds_total": counter("scriptorium_generate_seconds_total", "Seconds the model batches took, "
                                          "summed", "replica", "node"),
        "wait_seconds": histogram("scriptorium_replica_wait_seconds", "Seconds a block of pages waited between "
                                  "preprocessing and its replica", WAIT_SECONDS_BUCKETS, "replica", "node"),
        "replica_starts": counter("scriptorium_replica_starts_total", "Model replicas started (loaded)", "node"),
        "replica_restarts": counter("scriptorium_replica_restarts_total", "Model replicas restarted by Ray after "
                                    "their process died", "node"),
        "retried": counter("scriptorium_units_retried_total", "Units generated again: a failed batch's units "
                           "(halved), degenerate outputs (resampled)", "reason"),
        "documents_planned": gauge("scriptorium_documents_planned", "Documents this run planned"),
        "documents_done": gauge("scriptorium_documents_done", "Documents with all their pages written"),
        "eta_seconds": gauge("scriptorium_eta_seconds", "Seconds left at the pace so far (the progress line's ETA)"),
    }


def instruments() -> dict | None:
    """This process's instruments, made on first use; None outside Ray (nothing records), and where Ray
    is not installed at all (a bare checkout on a lent GPU machine: docs/development.md)."""
    global _instruments
    if _instruments is None:
        try:
            import ray
        except ImportError:
            return None
        if not ray.is_initialized():
            return None
        with _lock:
            if _instruments is None:
                _instruments = _make_instruments()
    return _instruments


def _label(value) -> str:
    return "" if value is None else str(value)


@dataclass(frozen=True)
class Meter:
    """What a stage records its batches with. Off by default: a stage built without one records nothing."""

    run_id: str = ""
    enabled: bool = False

    def _on(self) -> dict | None:
        return instruments() if self.enabled else None

    def _inc(self, metric: dict, name: str, value: float, **labels) -> None:
        if value > 0:
            metric[name].inc(value, tags={"run_id": self.run_id, **labels})

    # -- the CPU stages ------------------------------------------------------------------------------
    def pages(self, stage: str, rows: list[dict]) -> None:
        """Page rows that went through `stage`, counted by the status they left it with."""
        m = self._on()
        if m is None or not rows:
            return
        failed = sum(row["status"] == "error" for row in rows)
        self._inc(m, "pages", len(rows) - failed, stage=stage, status="ok")
        self._inc(m, "pages", failed, stage=stage, status="error")

    def bytes_read(self, n: int) -> None:
        m = self._on()
        if m is not None:
            self._inc(m, "bytes_read", n)

    def routed(self, rows: list[dict]) -> None:
        """The units the routes answered on these page rows (their `routed` lists), by route and status."""
        m = self._on()
        if m is None:
            return
        counts: dict[tuple[str, str], int] = {}
        for row in rows:
            for unit in row.get("routed") or ():
                key = (_label(unit["route"]), _label(unit["status"]))
                counts[key] = counts.get(key, 0) + 1
        for (route, status), n in counts.items():
            self._inc(m, "routed", n, route=route, status=status)

    # -- the model stage ------------------------------------------------------------------------------
    def replica_started(self, replica: str, node: str, pages_per_batch: int, tokens_per_batch: int) -> None:
        m = self._on()
        if m is None:
            return
        import ray

        node = node[:8]
        self._inc(m, "replica_starts", 1, node=node)
        context = ray.get_runtime_context()
        if context.get_actor_id() and context.was_current_actor_reconstructed:
            self._inc(m, "replica_restarts", 1, node=node)
        tags = {"run_id": self.run_id, "replica": replica, "node": node}
        m["budget_pages"].set(pages_per_batch, tags=tags)
        m["budget_tokens"].set(tokens_per_batch, tags=tags)

    def batch(self, replica: str, node: str, rows: list[dict], seconds: float) -> None:
        """One model batch: its result rows (n_input_tokens, n_output_tokens, max_new_tokens) and time."""
        m = self._on()
        if m is None or not rows:
            return
        labels = dict(replica=replica, node=node[:8])
        n_in = sum(row["n_input_tokens"] or 0 for row in rows)
        self._inc(m, "pages", len(rows), stage="generate", status="ok")
        self._inc(m, "batches", 1, **labels)
        self._inc(m, "batch_pages", len(rows), **labels)
        self._inc(m, "batch_tokens", n_in + sum(row["max_new_tokens"] or 0 for row in rows), **labels)
        self._inc(m, "input_tokens", n_in, **labels)
        self._inc(m, "output_tokens", sum(row["n_output_tokens"] or 0 for row in rows), **labels)
        self._inc(m, "generate_seconds_total", seconds, **labels)
        m["generate_seconds"].observe(seconds, tags={"run_id": self.run_id, **labels})

    def waited(self, replica: str, node: str, pages: pa.Table, now: float) -> None:
        """How long a block's pages waited for this replica: from their `preprocessed_at` to `now`."""
        m = self._on()
        if m is None or "preprocessed_at" not in pages.column_names:
            return
        earliest = pc.min(pages["preprocessed_at"]).as_py()
        if earliest is not None:
            m["wait_seconds"].observe(max(now - earliest, 0.0),
                                      tags={"run_id": self.run_id, "replica": replica, "node": node[:8]})

    def retried(self, reason: str, n: int) -> None:
        m = self._on()
        if m is not None:
            self._inc(m, "retried", n, reason=reason)

    # -- the driver -----------------------------------------------------------------------------------
    def rows(self, batch: pa.Table) -> None:
        """Result rows written: one increment per (task, status, stage, route) in the batch."""
        m = self._on()
        if m is None or not batch.num_rows:
            return
        keys = ["task", "status", "stage", "route"]
        counts = batch.select(keys).group_by(keys).aggregate([([], "count_all")])
        for group in counts.to_pylist():
            self._inc(m, "rows", group["count_all"], **{k: _label(group[k]) for k in keys})

    def progress(self, planned: int, done: int, eta_s: float | None) -> None:
        m = self._on()
        if m is None:
            return
        tags = {"run_id": self.run_id}
        m["documents_planned"].set(planned, tags=tags)
        m["documents_done"].set(done, tags=tags)
        if eta_s is not None:
            m["eta_seconds"].set(eta_s, tags=tags)
