"""Run summaries: what a run did and what it cost, as JSON next to the output and as readable text.

Two views, both computed from published Parquet rows rather than from counters kept on the side
(by DuckDB, in bounded memory: an output of 10^8 rows is counted exactly without holding its pages):

- the *run* view, from the rows this run id published: rows by status, task and error reason, pages and
  documents, input/output tokens, wall time, pages/s, GPU-hours (replicas x GPUs per replica x wall
  time) and, with `resources.gpu_price_per_hour` set, cost per million pages. It is written to
  `_runs/<run_id>/summary.json` when the run ends, since wall time and resources are known only then.
  A run id resumed again is one run of several attempts: each attempt is kept in `attempts` (its
  start, end, wall time, rows written, GPU-hours and cost), and the run's wall time, GPU-hours and cost
  are their sums, so a resume never hides what the attempts before it cost. The run's limits (render
  caps, input size cap, manifest policy) are kept too: `scriptorium report` renders under them.
- the *output* view, over every published file in the output folder (all runs, after resumes and
  retries), plus the run count, total wall time and GPU-hours summed from the run summaries.
  `_summary.json` holds both as of the last run; `scriptorium summary OUTPUT` recomputes the output view.

The bookkeeping names start with `_`, so dataset readers skip them and the folder stays one dataset.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from collections import Counter
from typing import Iterable

import pyarrow as pa

from scriptorium.connectors.output_query import PublishedFiles, sql_type, connect, page_bit, page_word
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.errors import SpecError
from scriptorium.core.redaction import redact_uri

SUMMARY_COLUMNS = ["source_uri", "page", "task", "status", "error", "stage", "n_input_tokens", "n_output_tokens", "truncated"]
RUNS_DIR = "_runs"
LATEST_FILE = "_summary.json"


# -- counting rows -------------------------------------------------------------------------------------
def error_reason(stage: str | None, error: str | None) -> str:
    """Group similar errors: `render: cannot open PDF`, `list: file is N bytes, more than input.max_size_mb=N`.

    The error's first clause (up to ': ', which is where details like a file name or the library's
    message start) with numbers replaced by N; an exception class name right after it is kept, so
    `generate failed: OutOfMemoryError: CUDA out of memory...` stays distinguishable from other failures.
    """
    text = (error or "unknown error").strip()
    parts = text.split(": ")
    head = parts[0]
    if len(parts) > 1 and re.fullmatch(r"[A-Z]\w*(Error|Exception|Exceeded|Timeout)", parts[1]):
        head += ": " + parts[1]
    head = re.sub(r"\d+", "N", head)[:120]
    return f"{stage or 'unknown'}: {head}"


class RowTally:
    """Counts over result rows, exact and in bounded memory whatever their number: the rows are summed
    up by one DuckDB query (connectors/output_query.py), pages and documents as per-source bitmaps of
    64 pages, so neither rows nor pages are ever held in Python. Fed Arrow tables (`add`) or published
    files (`add_files`, read by DuckDB itself, in parallel)."""

    def __init__(self):
        self.db = connect()
        columns = ", ".join(f"{name} {sql_type(name)}" for name in SUMMARY_COLUMNS)
        self.db.execute(f"CREATE TEMP TABLE added ({columns})")
        self._files: PublishedFiles | None = None
        self._run_id: str | None = None

    def add(self, table: pa.Table) -> None:
        self.db.register("incoming", table.select(SUMMARY_COLUMNS))
        try:
            self.db.execute("INSERT INTO added SELECT * FROM incoming")
        finally:
            self.db.unregister("incoming")

    def add_files(self, store: ParquetStore, paths: list[str], run_id: str | None = None) -> None:
        """Count the rows of these files (only those of `run_id`, if given)."""
        self._files = PublishedFiles(self.db, store, list(paths), SUMMARY_COLUMNS + ["run_id"] * (run_id is not None))
        self._run_id = run_id

    def as_dict(self) -> dict:
        if self._files is None:
            self._files = _NoFiles(self.db)
        # One scan, several groupings: per source and 64 pages (distinct pages and documents), per
        # status, per task, per error text (grouped into reasons below), and the totals.
        self._files.execute(f"""
            CREATE OR REPLACE TEMP TABLE tally AS
            SELECT GROUPING(source_uri, word) = 0 AS by_page, GROUPING(status) = 0 AS by_status,
                   GROUPING(task) = 0 AS by_task, GROUPING(stage, error) = 0 AS by_error,
                   source_uri, word, status, task, stage, error, count(*) AS n,
                   bit_or(bit) AS pages, bit_or(bit) FILTER (WHERE status = 'error') AS failed,
                   count(*) FILTER (WHERE truncated) AS truncated,
                   coalesce(sum(n_input_tokens), 0) AS input_tokens, coalesce(sum(n_output_tokens), 0) AS output_tokens
            FROM (SELECT *, {page_word()} AS word, {page_bit()} AS bit FROM (SELECT * FROM added UNION ALL
                  SELECT {", ".join(SUMMARY_COLUMNS)} FROM {{rows}} {self._of_the_run()}))
            GROUP BY GROUPING SETS ((source_uri, word), (status), (task), (status, stage, error), ())""")
        documents, failed_documents, pages, failed_pages = self.db.execute("""
            SELECT count(DISTINCT source_uri), count(DISTINCT source_uri) FILTER (WHERE failed IS NOT NULL),
                   coalesce(sum(bit_count(pages)) FILTER (WHERE word >= 0), 0),
                   coalesce(sum(bit_count(failed)) FILTER (WHERE word >= 0), 0)
            FROM tally WHERE by_page""").fetchone()
        rows, truncated, input_tokens, output_tokens = self.db.execute(
            "SELECT n, truncated, input_tokens, output_tokens FROM tally "
            "WHERE NOT (by_page OR by_status OR by_task OR by_error)").fetchone()
        by_status = dict(self.db.execute("SELECT coalesce(status, 'null'), n FROM tally WHERE by_status AND NOT by_error").fetchall())
        by_task = dict(self.db.execute("SELECT coalesce(task, 'null'), n FROM tally WHERE by_task").fetchall())
        errors_by_reason: Counter = Counter()
        texts = self.db.execute("SELECT stage, error, n FROM tally WHERE by_error AND status = 'error'")
        while chunk := texts.fetchmany(10_000):  # one row per distinct error text: streamed, not listed
            for stage, error, n in chunk:
                errors_by_reason[error_reason(stage, error)] += n
        self.db.execute("DROP TABLE tally")
        return {
            "documents": {"total": documents, "with_errors": failed_documents},
            "pages": {"total": pages, "ok": pages - failed_pages, "error": failed_pages},
            "rows": {
                "total": rows,
                "by_status": dict(sorted(by_status.items())),
                "by_task": dict(sorted(by_task.items())),
                "truncated": truncated,
            },
            "errors_by_reason": dict(errors_by_reason.most_common()),
            "tokens": {"input": int(input_tokens), "output": int(output_tokens)},
        }


    def _of_the_run(self) -> str:
        if self._run_id is None:
            return ""
        return "WHERE run_id = '" + self._run_id.replace("'", "''") + "'"


class _NoFiles:
    """Stands for PublishedFiles when only tables were added: `{rows}` is then empty."""

    def __init__(self, db):
        self.db = db

    def execute(self, query: str):
        return self.db.execute(query.format(rows="(SELECT * FROM added LIMIT 0)"))


def tally_files(store: ParquetStore, paths: Iterable[str]) -> dict:
    tally = RowTally()
    tally.add_files(store, list(paths))
    return tally.as_dict()


def tally_run(store: ParquetStore, run_id: str) -> dict:
    """Counts over the rows run `run_id` published, in whichever attempt and file (a file rewritten by
    --retry-failed, an attempt killed before it could write a summary)."""
    tally = RowTally()
    tally.add_files(store, store.data_files(), run_id)
    return tally.as_dict()


# -- the run view ----------------------------------------------------------------------------------
def gpu_figures(replicas: int, gpus_per_replica: float, wall_s: float, pages: int, price_per_hour: float) -> dict:
    """GPU-hours the run held (replicas x GPUs per replica x wall time) and what they cost."""
    gpu_hours = replicas * gpus_per_replica * wall_s / 3600
    cost = gpu_hours * price_per_hour if price_per_hour > 0 and gpu_hours > 0 else None
    return {
        "replicas": replicas,
        "gpus_per_replica": gpus_per_replica,
        "gpu_hours": round(gpu_hours, 6),
        "price_per_hour": price_per_hour or None,
        "cost": None if cost is None else round(cost, 6),
        "cost_per_million_pages": None if cost is None or not pages else round(cost / pages * 1e6, 2),
    }


def build_run_summary(store: ParquetStore, spec, result, gpus_per_replica: float) -> dict:
    """The run view of one attempt, with the rows of every attempt of its run id. `result` is the
    runner's RunResult."""
    counts = tally_run(store, result.run_id)
    wall_s = result.wall_s
    finished = time.time()
    pages = counts["pages"]["total"]
    gpu = gpu_figures(spec.resources.num_replicas, gpus_per_replica, wall_s, pages, spec.resources.gpu_price_per_hour)
    started_at, finished_at = _iso(finished - wall_s), _iso(finished)
    inputs = {"planned": result.planned_inputs, "skipped_complete": result.skipped_inputs}
    return {
        "kind": "run",
        "run_id": result.run_id,
        "output": redact_uri(result.output),
        "model": spec.model.id,
        "tasks": [t.task_name for t in spec.tasks],
        "started_at": started_at,
        "finished_at": finished_at,
        "wall_s": round(wall_s, 3),
        "inputs": inputs,
        **counts,
        "files": [posixpath.basename(p) for p in result.files],
        "throughput": _throughput(pages, counts["tokens"]["output"], wall_s),
        "gpu": gpu,
        "limits": {"render": spec.render.model_dump(),
                   "input": {"max_size_mb": spec.input.max_size_mb, "manifest_allow": list(spec.input.manifest_allow)}},
        "attempts": [{"started_at": started_at, "finished_at": finished_at, "wall_s": round(wall_s, 3),
                      "inputs": inputs, "rows_written": result.rows_written, "gpu_hours": gpu["gpu_hours"],
                      "cost": gpu["cost"]}],
    }


def _throughput(pages: int, output_tokens: int, wall_s: float) -> dict:
    return {
        "pages_per_s": round(pages / wall_s, 4) if wall_s else None,
        "output_tokens_per_s": round(output_tokens / wall_s, 2) if wall_s else None,
    }


def with_earlier_attempts(earlier: dict, run: dict) -> dict:
    """`run` (an attempt's run view) as the sum of its run id's attempts: `earlier` is the summary the
    attempts before it left. Wall time, GPU-hours and cost add up; counts are already over all of them."""
    attempts = earlier.get("attempts") or [{  # a summary from before attempts were kept: one attempt
        "started_at": earlier.get("started_at"), "finished_at": earlier.get("finished_at"),
        "wall_s": earlier.get("wall_s") or 0, "inputs": earlier.get("inputs"), "rows_written": None,
        "gpu_hours": (earlier.get("gpu") or {}).get("gpu_hours") or 0, "cost": (earlier.get("gpu") or {}).get("cost")}]
    attempts = [*attempts, *run["attempts"]]
    wall_s = sum(a["wall_s"] or 0 for a in attempts)
    costs = [a["cost"] for a in attempts if a["cost"] is not None]
    cost = round(sum(costs), 6) if costs else None
    pages = run["pages"]["total"]
    gpu = {**run["gpu"], "gpu_hours": round(sum(a["gpu_hours"] or 0 for a in attempts), 6), "cost": cost,
           "cost_per_million_pages": None if cost is None or not pages else round(cost / pages * 1e6, 2)}
    files = list(dict.fromkeys([*earlier.get("files", []), *run["files"]]))
    return {**run, "started_at": attempts[0]["started_at"] or run["started_at"], "wall_s": round(wall_s, 3),
            "files": files, "throughput": _throughput(pages, run["tokens"]["output"], wall_s), "gpu": gpu,
            "attempts": attempts}


def _iso(epoch_s: float) -> str:
    """UTC with milliseconds: runs sort by it, and two short runs can end within one second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{int(epoch_s % 1 * 1000):03d}Z"


# -- the output view -------------------------------------------------------------------------------
def read_run_summaries(store: ParquetStore) -> list[dict]:
    """Every `_runs/*/summary.json`, oldest first."""
    pattern = f"{store.root}/{RUNS_DIR}/*/summary.json"
    summaries = []
    for path in store.fs.glob(pattern):
        try:
            summary = json.loads(store.fs.cat_file(path))
        except (OSError, ValueError):
            continue  # a summary being written right now, or damaged: the output view does without it
        if summary.get("kind") == "run":  # not the older, shorter format
            summaries.append(summary)
    return sorted(summaries, key=lambda s: (s.get("finished_at", ""), s.get("run_id", "")))


def build_output_summary(store: ParquetStore, runs: list[dict] | None = None) -> dict:
    """The output view: every published row, whichever run wrote it."""
    runs = read_run_summaries(store) if runs is None else runs
    files = store.data_files()
    gpu_hours = sum((r.get("gpu") or {}).get("gpu_hours") or 0 for r in runs)
    costs = [(r.get("gpu") or {}).get("cost") for r in runs]
    return {
        "kind": "output",
        "output": redact_uri(store.uri),
        "n_files": len(files),
        "runs": [r.get("run_id") for r in runs],
        **tally_files(store, files),
        "wall_s_total": round(sum(r.get("wall_s") or 0 for r in runs), 3),
        "gpu_hours_total": round(gpu_hours, 6),
        "cost_total": round(sum(c for c in costs if c), 6) if any(costs) else None,
    }


def write_run_summary(store: ParquetStore, spec, result, gpus_per_replica: float) -> dict:
    """At the end of a run: `_runs/<run_id>/summary.json` (with the attempts before this one, if the
    run id was resumed) and `_summary.json` (this run + the output)."""
    run = build_run_summary(store, spec, result, gpus_per_replica)
    path = f"{store.root}/{RUNS_DIR}/{result.run_id}/summary.json"
    summaries = read_run_summaries(store)
    earlier = next((r for r in summaries if r.get("run_id") == result.run_id), None)
    if earlier is not None:
        run = with_earlier_attempts(earlier, run)
    store.fs.pipe_file(path, _dump(run))
    runs = [r for r in summaries if r.get("run_id") != run["run_id"]] + [run]
    latest = {"run": run, "output": build_output_summary(store, runs)}
    store.fs.pipe_file(f"{store.root}/{LATEST_FILE}", _dump(latest))
    return latest


def _dump(data: dict) -> bytes:
    return json.dumps(data, indent=2).encode()


def load_summary(store: ParquetStore, run_id: str | None = None) -> dict:
    """For `scriptorium summary`: the latest run's (or `run_id`'s) stored summary and a fresh output view.

    Raises SpecError with a one-line reason when the output has nothing to summarize.
    """
    runs = read_run_summaries(store)
    if run_id:
        matches = [r for r in runs if r.get("run_id") == run_id]
        if not matches:
            known = ", ".join(r.get("run_id", "?") for r in runs) or "none"
            raise SpecError(f"no run {run_id!r} in {store.uri} (runs there: {known})")
        run = matches[-1]
    else:
        run = runs[-1] if runs else None
    output = build_output_summary(store, runs)
    if run is None and not output["n_files"]:
        raise SpecError(f"{store.uri} holds no Scriptorium results: pass the --output of a run")
    return {"run": run, "output": output}


# -- text ----------------------------------------------------------------------------------------------
def format_summary(summary: dict) -> str:
    lines = []
    run, output = summary.get("run"), summary.get("output")
    if run:
        attempts = run.get("attempts") or []
        lines.append(f"run {run['run_id']}  finished {run['finished_at']}  wall {format_duration(run['wall_s'])}"
                     + (f" over {len(attempts)} attempts" if len(attempts) > 1 else ""))
        lines.append(f"  model       {run['model']}  tasks: {', '.join(run['tasks'])}")
        inputs = run["inputs"]
        lines.append(f"  inputs      {inputs['planned']} processed, {inputs['skipped_complete']} already complete")
        lines += _count_lines(run)
        throughput = run["throughput"]
        if throughput["pages_per_s"] is not None:
            lines.append(f"  throughput  {throughput['pages_per_s']:.3g} pages/s, "
                         f"{throughput['output_tokens_per_s']:.3g} output tokens/s (over wall time)")
        lines.append("  GPU         " + _gpu_line(run["gpu"]))
    if output:
        runs = output["runs"]
        lines.append(f"output {output['output']}  {output['n_files']} files from {len(runs)} run(s)"
                     + (f", {format_duration(output['wall_s_total'])} in all" if runs else ""))
        lines += _count_lines(output)
        if output["gpu_hours_total"]:
            cost = output["cost_total"]
            lines.append(f"  GPU         {output['gpu_hours_total']:.4g} GPU-hours in all"
                         + (f", cost {cost:,.2f}" if cost else ""))
    return "\n".join(lines)


def _count_lines(view: dict) -> list[str]:
    docs, pages, rows, tokens = view["documents"], view["pages"], view["rows"], view["tokens"]
    lines = [
        f"  documents   {docs['total']} ({docs['with_errors']} with errors)",
        f"  pages       {pages['total']} ({pages['ok']} ok, {pages['error']} with errors)",
        f"  rows        {rows['total']}: " + _pairs(rows["by_status"]) + "; by task: " + _pairs(rows["by_task"])
        + f"; {rows['truncated']} hit max_new_tokens",
        f"  tokens      {tokens['input']:,} input, {tokens['output']:,} output",
    ]
    for reason, count in list(view["errors_by_reason"].items())[:10]:
        lines.append(f"  error       {count} x {reason}")
    if len(view["errors_by_reason"]) > 10:
        lines.append(f"  error       ... {len(view['errors_by_reason']) - 10} more reasons in the JSON")
    return lines


def _pairs(counts: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.items()) or "none"


def _gpu_line(gpu: dict) -> str:
    if not gpu["gpus_per_replica"]:
        return "none requested (CPU run): no GPU-hours or GPU cost"
    line = f"{gpu['replicas']} replica(s) x {gpu['gpus_per_replica']:g} GPU = {gpu['gpu_hours']:.4g} GPU-hours"
    if gpu["cost"] is None:
        return line + "; set resources.gpu_price_per_hour for cost figures"
    line += f" x {gpu['price_per_hour']:g}/GPU-hour = {gpu['cost']:,.4g}"
    if gpu["cost_per_million_pages"] is not None:
        line += f"; {gpu['cost_per_million_pages']:,.2f} per million pages"
    return line


def format_duration(seconds: float | None) -> str:
    """H:MM:SS, or M:SS under an hour."""
    seconds = int(round(seconds or 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
