"""Run summaries: what a run did and what it cost, in two views built from the counts of published rows
(jobs/tally.py) and from what the runner knows only at the end (wall time, resources):

- the *run* view, from the rows this run id published: rows by status, task and error reason, pages and
  documents, input/output tokens, wall time, pages/s, GPU-hours (replicas x GPUs per replica x wall
  time) and, with `resources.gpu_price_per_hour` set, cost per million pages. A run id resumed again is
  one run of several attempts: each attempt is kept in `attempts` (its start, end, wall time, rows
  written, GPU-hours and cost), and the run's wall time, GPU-hours and cost are their sums, so a resume
  never hides what the attempts before it cost. The run's limits (render caps, input size cap, manifest
  policy) are kept too: `scriptorium report` renders under them.
- the *output* view, over every published file in the output folder (all runs, after resumes and
  retries), plus the run count, total wall time and GPU-hours summed from the run summaries.

Where they are kept is jobs/summary_files.py; how they read, jobs/summary_text.py.
"""

from __future__ import annotations

import posixpath
import time

from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.redaction import redact_uri
from scriptorium.jobs.tally import tally_files, tally_run


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
def build_output_summary(store: ParquetStore, runs: list[dict]) -> dict:
    """The output view: every published row, whichever run wrote it; `runs`: the output's run summaries."""
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
