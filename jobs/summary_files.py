"""Where run summaries are kept, beside the output's Parquet files:

- `_runs/<run_id>/summary.json`: the run view (jobs/summary.py), written when the run ends, since wall
  time and resources are known only then; a resumed run id's summary adds the new attempt to it.
- `_summary.json`: the run view and the output view as of the last run.
- `_runs/<run_id>/plan.json`: what an attempt planned, written when its planning ends, so that
  `scriptorium status` can tell its progress, rate and ETA from any machine (jobs/status.py):

      {"kind": "plan", "run_id": "nightly", "token": "<lease token>", "started": 1764554400.0,
       "planned": 1764554412.5, "documents": {"planned": 40, "skipped_complete": 3},
       "before": {"documents": 0, "pages": 0}, "lease_timeout_s": 120.0}

  `before` counts what the run id had published when the attempt began (a resumed run id), so the rate
  and the ETA are this attempt's own; times are wall-clock seconds.

`scriptorium summary OUTPUT` reads the run view back and recomputes the output view. The bookkeeping
names start with `_`, so dataset readers skip them and the folder stays one dataset.
"""

from __future__ import annotations

import json
import posixpath
import time

from scriptorium.connectors.namespace import DATA_FILE
from scriptorium.connectors.parquet_sink import ParquetStore
from scriptorium.core.errors import SpecError
from scriptorium.jobs.summary import build_output_summary, build_run_summary, with_earlier_attempts
from scriptorium.jobs.summary_text import summary_json
from scriptorium.jobs.tally import RowTally

RUNS_DIR = "_runs"
LATEST_FILE = "_summary.json"


def _read_run_files(store: ParquetStore, name: str, kind: str) -> list[dict]:
    """Every `_runs/*/NAME` of this kind, unordered."""
    store.fs.invalidate_cache(f"{store.root}/{RUNS_DIR}")  # s3fs/gcsfs cache listings: a run may be writing
    found = []
    for path in store.fs.glob(f"{store.root}/{RUNS_DIR}/*/{name}"):
        try:
            record = json.loads(store.fs.cat_file(path))
        except (OSError, ValueError):
            continue  # being written right now, or damaged: the readers do without it
        if isinstance(record, dict) and record.get("kind") == kind:  # not the older, shorter summary format
            found.append(record)
    return found


def read_run_summaries(store: ParquetStore) -> list[dict]:
    """Every `_runs/*/summary.json`, oldest first."""
    summaries = _read_run_files(store, "summary.json", "run")
    return sorted(summaries, key=lambda s: (s.get("finished_at", ""), s.get("run_id", "")))


def read_run_plans(store: ParquetStore) -> list[dict]:
    """Every `_runs/*/plan.json` (each run id's latest attempt), oldest first."""
    return sorted(_read_run_files(store, "plan.json", "plan"), key=lambda p: (p.get("planned") or 0, p.get("run_id", "")))


def write_run_plan(store: ParquetStore, spec, plan, started: float) -> dict:
    """When planning ends: `_runs/<run_id>/plan.json`, what this attempt will do (see the module's
    docstring). `plan` is the planner's Plan; `started`: when the attempt began (wall clock)."""
    run_id = spec.run_id
    before = {"documents": 0, "pages": 0}
    own = [path for path in store.data_files() if (m := DATA_FILE.fullmatch(posixpath.basename(path))) and m["run"] == run_id]
    if own:  # a resumed run id: what its earlier attempts published, from its own files only
        tally = RowTally()
        tally.add_files(store, own, run_id)
        counts = tally.as_dict()
        before = {"documents": counts["documents"]["total"], "pages": counts["pages"]["total"]}
    record = {
        "kind": "plan", "run_id": run_id, "token": store.lease.token if store.lease else "",
        "started": round(started, 3), "planned": round(time.time(), 3),
        "documents": {"planned": plan.planned, "skipped_complete": plan.skipped},
        "before": before, "lease_timeout_s": spec.output.lease_timeout_s,
    }
    store.fs.pipe_file(f"{store.root}/{RUNS_DIR}/{run_id}/plan.json", summary_json(record).encode())
    return record


def write_run_summary(store: ParquetStore, spec, result, gpus_per_replica: float) -> dict:
    """At the end of a run: `_runs/<run_id>/summary.json` (with the attempts before this one, if the
    run id was resumed) and `_summary.json` (this run + the output)."""
    run = build_run_summary(store, spec, result, gpus_per_replica)
    path = f"{store.root}/{RUNS_DIR}/{result.run_id}/summary.json"
    summaries = read_run_summaries(store)
    earlier = next((r for r in summaries if r.get("run_id") == result.run_id), None)
    if earlier is not None:
        run = with_earlier_attempts(earlier, run)
    store.fs.pipe_file(path, summary_json(run).encode())
    runs = [r for r in summaries if r.get("run_id") != run["run_id"]] + [run]
    latest = {"run": run, "output": build_output_summary(store, runs)}
    store.fs.pipe_file(f"{store.root}/{LATEST_FILE}", summary_json(latest).encode())
    return latest


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
